"""Item-graph smoothing of the item vectors: construction, the propagation itself, training, saving, serving."""

import json

import pytest
import torch
import torch.nn.functional as F
from conftest import TINY, make_model

from seqrec_hf import SeqRecForNextItemPrediction
from seqrec_hf.export import export_for_serving
from seqrec_hf.modeling_seqrec import build_item_graph
from seqrec_hf.train import load_recipe, parse_overrides, train


def dense_reference(histories, vocab_size, num_special):
    """S_ij = #(i then j) + #(j then i) over consecutive events, normalised D^-1/2 S D^-1/2, as a dense matrix."""
    counts = torch.zeros(vocab_size, vocab_size)
    for ids in histories:
        for a, b in zip(ids, ids[1:]):
            if a >= num_special and b >= num_special and a != b:
                counts[a, b] += 1
                counts[b, a] += 1
    degree = counts.sum(1)
    scale = torch.where(degree > 0, degree.rsqrt(), torch.zeros_like(degree))
    return scale[:, None] * counts * scale[None, :]


def as_dense(index, value, vocab_size):
    return torch.sparse_coo_tensor(index, value, (vocab_size, vocab_size), check_invariants=True).to_dense()


def test_graph_matches_a_direct_count_and_normalisation():
    histories = [[2, 3, 4, 3], [5, 2, 3], [1, 6, 6, 7], [8]]  # [UNK] (1) and the self-transition 6 -> 6 are skipped
    index, value = build_item_graph(histories, vocab_size=10, num_special=2)
    torch.testing.assert_close(as_dense(index, value, 10), dense_reference(histories, 10, 2))
    dense = as_dense(index, value, 10)
    torch.testing.assert_close(dense, dense.t())
    assert dense[:2].abs().sum() == 0 and dense[6, 6] == 0
    empty_index, empty_value = build_item_graph([[2], [1, 3]], 10, 2)
    assert empty_index.shape == (2, 0) and empty_value.numel() == 0


def graph_model(layers=2, gain=0.7, vocab=20, seed=0, **overrides):
    histories = [[2, 3, 4, 5], [3, 4, 6, 7, 8], [9, 10, 2, 4]]
    index, value = build_item_graph(histories, vocab, 2)
    model = make_model(
        vocab_size=vocab, item_graph_layers=layers, item_graph_gain=gain, item_graph_edges=value.numel(),
        seed=seed, **overrides,
    )  # fmt: skip
    model.model.item_graph.set_graph(index, value)
    return model, as_dense(index, value, vocab)


def test_item_table_is_the_embedding_plus_gained_hops_and_drives_inputs_and_scores():
    model, adjacency = graph_model(layers=2, gain=0.7)
    with torch.no_grad():
        model.model.item_graph.gain.copy_(torch.tensor([0.7, -0.3]))
    weight = model.model.embed_items.weight
    expected = weight + 0.7 * adjacency @ weight - 0.3 * adjacency @ adjacency @ weight
    torch.testing.assert_close(model.item_table(), expected)
    assert not torch.allclose(expected, weight)

    ids = torch.tensor([[0, 2, 3, 4], [5, 6, 7, 8]])
    logits = model(input_ids=ids).logits
    hidden = model.model(input_ids=ids, item_table=expected).last_hidden_state
    torch.testing.assert_close(logits, hidden @ expected.t())  # inputs and scores both read the table
    assert not torch.allclose(hidden, model.model(input_ids=ids, item_table=weight).last_hidden_state)
    items, scores = model.recommend(input_ids=ids, top_k=3)
    brute = (hidden[:, -1] @ expected.t()).clone()
    brute[:, :2] = float("-inf")
    brute.scatter_(1, ids, float("-inf"))
    torch.testing.assert_close(scores, brute.topk(3).values)


def test_graph_gains_are_trained_and_the_graph_is_fixed():
    model, _ = graph_model()
    model.train()
    ids = torch.tensor([[2, 3, 4, 5, 6]])
    model(input_ids=ids, labels=ids).loss.backward()
    assert model.model.item_graph.gain.grad.abs().sum() > 0
    assert not model.model.item_graph.value.requires_grad
    with pytest.raises(ValueError, match="item_graph_edges"):
        model.model.item_graph.set_graph(torch.zeros(2, 3, dtype=torch.long), torch.zeros(3))


def test_graph_round_trips_through_save_pretrained_and_exports(tmp_path):
    model, _ = graph_model()
    model.save_pretrained(tmp_path)
    loaded = SeqRecForNextItemPrediction.from_pretrained(tmp_path).eval()
    torch.testing.assert_close(loaded.item_table(), model.item_table())
    ids = torch.tensor([[0, 2, 3, 4], [5, 6, 7, 8]])
    mask = (ids != 0).long()
    ref_ids, ref_scores = model.recommend(input_ids=ids, attention_mask=mask, top_k=5)
    program = export_for_serving(model, input_ids=ids, attention_mask=mask, top_k=5)
    got_ids, got_scores = program(input_ids=ids, attention_mask=mask)
    assert torch.equal(got_ids, ref_ids)
    torch.testing.assert_close(got_scores, ref_scores, rtol=1e-5, atol=1e-5)


def test_resized_vocabulary_keeps_the_graph_of_the_old_items():
    model, _ = graph_model(vocab=20)
    before = model.item_table()[:20].detach().clone()
    model.resize_token_embeddings(24)
    table = model.item_table()
    assert table.shape[0] == 24
    torch.testing.assert_close(table[:20], before)


def test_training_builds_the_graph_from_the_train_split(tmp_path):
    overrides = TINY + ["max_steps=10", "eval_every_steps=5", "item_graph_layers=1"]
    train(load_recipe(None, dict(parse_overrides(overrides), output_dir=str(tmp_path))))
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["item_graph_layers"] == 1 and config["item_graph_edges"] > 0
    model = SeqRecForNextItemPrediction.from_pretrained(tmp_path)
    assert model.model.item_graph.value.sum() > 0
    with pytest.raises(ValueError, match="item_graph_layers"):
        make_model(item_graph_layers=-1)


@pytest.mark.parametrize("with_graph", [False, True])
def test_cosine_scores_in_logits_loss_recommend_and_export(with_graph):
    if with_graph:
        model, _ = graph_model(score_norm=True, score_temperature=0.1)
    else:
        model = make_model(vocab_size=20, score_norm=True, score_temperature=0.1)
    ids = torch.tensor([[0, 2, 3, 4], [5, 6, 7, 8]])
    mask = (ids != 0).long()
    table = model.model.item_table(model.item_head.weight)
    hidden = model.model(input_ids=ids, attention_mask=mask, item_table=table if with_graph else None)
    hidden = hidden.last_hidden_state
    expected = F.normalize(hidden, dim=-1) @ F.normalize(table, dim=-1).t() / 0.1
    logits = model(input_ids=ids, attention_mask=mask).logits
    torch.testing.assert_close(logits, expected)
    assert logits.abs().max() <= 10.0 + 1e-4
    labels = ids.masked_fill(ids == 0, -100)
    loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
    reference = F.cross_entropy(expected[:, :-1][mask[:, :-1].bool()][:, 2:], labels[:, 1:][mask[:, :-1].bool()] - 2)
    torch.testing.assert_close(loss, reference)
    items, scores = model.recommend(input_ids=ids, attention_mask=mask, top_k=4)
    brute = expected[:, -1].clone()
    brute[:, :2] = float("-inf")
    brute.scatter_(1, ids, float("-inf"))
    torch.testing.assert_close(scores, brute.topk(4).values)
    program = export_for_serving(model, input_ids=ids, attention_mask=mask, top_k=4)
    got_ids, got_scores = program(input_ids=ids, attention_mask=mask)
    assert torch.equal(got_ids, items)
    torch.testing.assert_close(got_scores, scores, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="score_temperature"):
        make_model(score_norm=True, score_temperature=0)


def test_graph_model_cast_to_bf16_still_runs():
    model, _ = graph_model()
    model = model.to(torch.bfloat16)
    assert torch.isfinite(model(input_ids=torch.tensor([[2, 3, 4]])).logits.float()).all()
