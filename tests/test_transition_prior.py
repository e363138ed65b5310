"""The count-based transition prior: tables, leave-one-out training scores, logits, recommend(), export."""

import json
import math
from collections import Counter

import pytest
import torch
import torch.nn.functional as F
from conftest import TINY, make_model

from seqrec_hf import ItemTokenizer, SeqRecForNextItemPrediction
from seqrec_hf.export import export_for_serving
from seqrec_hf.modeling_seqrec import build_recent_popularity, build_transition_prior
from seqrec_hf.train import load_recipe, parse_overrides, prepare_data, train

HISTORIES = [[2, 3, 4, 5, 3, 4], [3, 4, 6, 2, 3, 5], [7, 3, 4, 8], [1, 9, 9, 2]]  # 1 is [UNK]: never counted


def direct_counts(histories, gap):
    return Counter((a, b) for ids in histories for a, b in zip(ids, ids[gap:]) if a >= 2 and b >= 2)


def test_tables_hold_the_most_frequent_successors_with_log_counts():
    index, value = build_transition_prior(HISTORIES, vocab_size=12, num_special=2, lags=2, size=2)
    assert index.shape == value.shape == (2, 12, 2)
    for lag in range(2):
        counts = direct_counts(HISTORIES, lag + 1)
        for source in range(12):
            successors = sorted(((-n, b) for (a, b), n in counts.items() if a == source))[:2]
            want = [b for _, b in successors] + [0] * (2 - len(successors))
            assert index[lag, source].tolist() == want, (lag, source)
            want_values = [math.log1p(-n) for n, _ in successors] + [0.0] * (2 - len(successors))
            torch.testing.assert_close(value[lag, source], torch.tensor(want_values))
    assert index[0, 3].tolist() == [4, 5]  # 3 -> 4 three times, 3 -> 5 once (ties by id)


def prior_model(lags=2, size=3, vocab=12, reverse=False, recent_window=0, **overrides):
    model = make_model(
        vocab_size=vocab, transition_prior_lags=lags, transition_prior_size=size, transition_prior_weight=0.8,
        transition_prior_reverse=reverse, transition_prior_recent_window=recent_window, **overrides,
    )  # fmt: skip
    recent = build_recent_popularity(HISTORIES, vocab, 2, recent_window) if recent_window else None
    tables = build_transition_prior(HISTORIES, vocab, 2, lags, size, reverse=reverse)
    model.transition_prior.set_prior(*tables, recent=recent)
    with torch.no_grad():  # the recent-popularity weight stays at its initial 0
        model.transition_prior.weight.copy_(
            torch.tensor([0.8, -0.4][:lags] + [0.6] * reverse + [0.0] * bool(recent_window))
        )
    return model


def dense_prior(model, ids, mask, targets=None):
    """(B, T, V) prior scores by a direct loop: sum over lags of w_k * log(1 + count), count - 1 at the target;
    with the reverse table, + w * log(1 + count of "j, then the current event") (nothing left out)."""
    prior = model.transition_prior
    lags, vocab = model.config.transition_prior_lags, model.config.vocab_size
    reverse = model.config.transition_prior_reverse
    out = torch.zeros(ids.shape[0], ids.shape[1], vocab)
    for b in range(ids.shape[0]):
        for t in range(ids.shape[1]):
            for table in range(lags + reverse):
                back = table if table < lags else 0  # the reverse table reads the current event
                if t - back < 0 or not mask[b, t - back]:
                    continue
                source = int(ids[b, t - back])
                for j, v in zip(prior.index[table, source].tolist(), prior.value[table, source].tolist()):
                    if v == 0:
                        continue
                    if targets is not None and j == targets[b, t] and table < lags:
                        v = math.log1p(max(math.expm1(v) - 1, 0.0))
                    out[b, t, j] += prior.weight[table].item() * v
    return out


IDS = torch.tensor([[0, 0, 2, 3, 4], [3, 4, 6, 2, 3], [0, 7, 3, 4, 8]])
MASK = (IDS != 0).long()


def assert_recommend_and_export_match(model, brute, chunk_size):
    """`recommend()` and its `torch.export` program both return the top 4 of the brute-force scores."""
    items, scores = model.recommend(input_ids=IDS, attention_mask=MASK, top_k=4, chunk_size=chunk_size)
    torch.testing.assert_close(scores, brute.topk(4).values)
    assert torch.equal(items, brute.topk(4).indices)
    program = export_for_serving(model, input_ids=IDS, attention_mask=MASK, top_k=4, chunk_size=chunk_size)
    got_items, got_scores = program(input_ids=IDS, attention_mask=MASK)
    assert torch.equal(got_items, items)
    torch.testing.assert_close(got_scores, scores, rtol=1e-5, atol=1e-5)


def test_reverse_table_holds_the_most_frequent_predecessors():
    index, value = build_transition_prior(HISTORIES, vocab_size=12, num_special=2, lags=2, size=2, reverse=True)
    forward = build_transition_prior(HISTORIES, vocab_size=12, num_special=2, lags=2, size=2)
    assert index.shape == value.shape == (3, 12, 2)
    assert torch.equal(index[:2], forward[0]) and torch.equal(value[:2], forward[1])  # the lags are unchanged
    counts = direct_counts(HISTORIES, 1)
    for item in range(12):
        predecessors = sorted(((-n, a) for (a, b), n in counts.items() if b == item))[:2]
        assert index[2, item].tolist() == [a for _, a in predecessors] + [0] * (2 - len(predecessors)), item
        want_values = [math.log1p(-n) for n, _ in predecessors] + [0.0] * (2 - len(predecessors))
        torch.testing.assert_close(value[2, item], torch.tensor(want_values))
    assert index[2, 4].tolist() == [3, 0]  # 4 comes after 3 only (three times)
    with pytest.raises(ValueError, match="transition_prior_reverse needs transition_prior_lags"):
        make_model(transition_prior_reverse=True)


@pytest.mark.parametrize("reverse", [False, True])
def test_logits_add_the_prior_of_each_position(reverse):
    model = prior_model(reverse=reverse)
    hidden = model.model(input_ids=IDS, attention_mask=MASK).last_hidden_state
    expected = hidden @ model.item_head.weight.t() + dense_prior(model, IDS, MASK)
    torch.testing.assert_close(model(input_ids=IDS, attention_mask=MASK).logits, expected)
    torch.testing.assert_close(model(input_ids=IDS, attention_mask=MASK, logits_to_keep=1).logits, expected[:, -1:])


@pytest.mark.parametrize("one_target_per_row", [False, True])
def test_training_loss_leaves_the_predicted_transition_out(one_target_per_row):
    model = prior_model(transition_prior_in_loss=True)
    labels = IDS.masked_fill(MASK == 0, -100)
    if one_target_per_row:
        labels = torch.tensor([5, 5, -100])
        targets = torch.full(IDS.shape, -100)
        targets[:, -1] = labels
    else:
        targets = F.pad(labels[:, 1:], (0, 1), value=-100)
    loss = model(input_ids=IDS, attention_mask=MASK, labels=labels).loss

    hidden = model.model(input_ids=IDS, attention_mask=MASK).last_hidden_state
    logits = hidden @ model.item_head.weight.t() + dense_prior(model, IDS, MASK, targets)
    logits[..., :2] = float("-inf")
    keep = (targets >= 2) & MASK.bool()  # padding positions never predict
    reference = F.cross_entropy(logits[keep], targets[keep])
    torch.testing.assert_close(loss, reference)
    # the leave-one-out changes the loss: a prior that counted the answer would look better than it is
    assert not torch.allclose(dense_prior(model, IDS, MASK, targets), dense_prior(model, IDS, MASK))

    loss.backward()  # the lag weights learn
    weight = model.transition_prior.weight
    grad = weight.grad.clone()
    weight.grad = None
    reference_weight = weight.detach().clone().requires_grad_(True)
    lags = []
    for lag in range(2):
        single = prior_model(lags=2, transition_prior_in_loss=True)
        with torch.no_grad():
            single.transition_prior.weight.copy_(torch.eye(2)[lag])
        lags.append(dense_prior(single, IDS, MASK, targets))
    logits = hidden.detach() @ model.item_head.weight.detach().t()
    logits = logits + reference_weight[0] * lags[0] + reference_weight[1] * lags[1]
    logits[..., :2] = float("-inf")
    F.cross_entropy(logits[keep], targets[keep]).backward()
    torch.testing.assert_close(grad, reference_weight.grad)


def test_joint_loss_with_the_reverse_table_leaves_only_forward_counts_out():
    model = prior_model(reverse=True, transition_prior_in_loss=True)
    ids = torch.cat([IDS, torch.tensor([[0, 2, 4, 3, 5]])])  # 4 -> 3: 3 is 4's predecessor in HISTORIES
    mask = (ids != 0).long()
    labels = ids.masked_fill(mask == 0, -100)
    targets = F.pad(labels[:, 1:], (0, 1), value=-100)
    hidden = model.model(input_ids=ids, attention_mask=mask).last_hidden_state
    logits = hidden @ model.item_head.weight.t() + dense_prior(model, ids, mask, targets)
    logits[..., :2] = float("-inf")
    keep = (targets >= 2) & mask.bool()
    torch.testing.assert_close(
        model(input_ids=ids, attention_mask=mask, labels=labels).loss, F.cross_entropy(logits[keep], targets[keep])
    )


def test_by_default_the_network_trains_alone():
    model = prior_model()
    labels = IDS.masked_fill(MASK == 0, -100)
    alone = make_model(vocab_size=12)  # same seed: the same network without a prior
    torch.testing.assert_close(
        model(input_ids=IDS, attention_mask=MASK, labels=labels).loss,
        alone(input_ids=IDS, attention_mask=MASK, labels=labels).loss,
    )


def test_calibration_picks_the_best_weights_on_held_out_rows(tokenizer):
    from seqrec_hf.evaluation import calibrate_transition_prior, evaluate, model_score_fn

    histories = [[f"i{i % 7}", f"i{(i + 1) % 7}", f"i{(i + 3) % 7}", f"i{(i + 4) % 7}"] for i in range(40)]
    ids = [tokenizer.convert_items_to_ids(h) for h in histories]
    model = make_model(vocab_size=len(tokenizer), transition_prior_lags=2, transition_prior_size=4)
    model.transition_prior.set_prior(*build_transition_prior([h[:-1] for h in ids], len(tokenizer), 2, 2, 4))
    rows = {"item_ids": [h[:-1] for h in histories], "target": [h[-1] for h in histories]}
    before = evaluate(model_score_fn(model), rows, tokenizer, show_progress=False)["NDCG@10"]
    result = calibrate_transition_prior(model, rows, tokenizer, grid=(0.0, 1.0, 4.0), show_progress=False)
    after = evaluate(model_score_fn(model), rows, tokenizer, show_progress=False)["NDCG@10"]
    assert model.transition_prior.weight.tolist() == result["weights"]
    assert after == pytest.approx(result["metric"]) and after >= before
    assert after > 0.9  # the counts know these deterministic transitions; the random network does not
    assert max(value for _, value in result["trials"]) == pytest.approx(result["metric"])
    with pytest.raises(ValueError, match="no transition prior"):
        calibrate_transition_prior(make_model(), rows, tokenizer)


@pytest.mark.parametrize("chunk_size,reverse", [(4, False), (65536, False), (4, True)])
def test_recommend_and_the_export_rank_with_the_prior(chunk_size, reverse):
    model = prior_model(reverse=reverse)
    hidden = model.model(input_ids=IDS, attention_mask=MASK).last_hidden_state[:, -1]
    brute = hidden @ model.item_head.weight.t() + dense_prior(model, IDS, MASK)[:, -1]
    brute[:, :2] = float("-inf")
    brute = brute.scatter(1, IDS, float("-inf"))  # history excluded (padding 0 is special anyway)
    assert_recommend_and_export_match(model, brute, chunk_size)


@pytest.mark.parametrize("reverse", [False, True])
def test_prior_round_trips_and_ignores_items_added_later(tmp_path, reverse):
    model = prior_model(reverse=reverse)
    model.save_pretrained(tmp_path)
    loaded = SeqRecForNextItemPrediction.from_pretrained(tmp_path).eval()
    torch.testing.assert_close(loaded(input_ids=IDS).logits, model(input_ids=IDS).logits)
    model.resize_token_embeddings(14)  # ids 12, 13 are new: no counts, no crash
    assert torch.isfinite(model(input_ids=torch.tensor([[2, 12, 13]])).logits).all()
    with pytest.raises(ValueError, match="transition_prior"):
        make_model(transition_prior_lags=1, loss_type="gbce")


@pytest.mark.parametrize("reverse", [False, True])
def test_training_counts_the_train_split_and_learns_the_weights(tmp_path, reverse):
    overrides = TINY + ["max_steps=15", "eval_every_steps=15", "transition_prior_lags=2", "transition_prior_size=8"]
    overrides += [f"transition_prior_reverse={str(reverse).lower()}"]
    train(load_recipe(None, dict(parse_overrides(overrides), output_dir=str(tmp_path))))
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["transition_prior_lags"] == 2 and config["transition_prior_size"] == 8
    assert config["transition_prior_reverse"] is reverse
    model = SeqRecForNextItemPrediction.from_pretrained(tmp_path)
    assert model.transition_prior.value.sum() > 0
    assert model.transition_prior.index.shape[0] == 2 + reverse
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    fitted = metrics["transition_prior_calibration"]["weights"]
    assert len(fitted) == 2 + reverse
    assert model.transition_prior.weight.tolist() == fitted  # the saved model carries the fitted weights
    assert metrics["validation"]["NDCG@10"] == pytest.approx(metrics["transition_prior_calibration"]["metric"])
    assert "NDCG@10" in metrics["test_network_only"] and "NDCG@10" in metrics["validation_at_selection"]
    card = (tmp_path / "README.md").read_text()
    assert "transition prior over the last 2 events" in card and str(fitted) in card
    assert ("predecessors" in card) is reverse


def test_joint_training_learns_the_weights(tmp_path):
    overrides = TINY + [
        "max_steps=15",
        "eval_every_steps=15",
        "transition_prior_lags=1",
        "transition_prior_in_loss=true",
    ]
    overrides += ["calibrate_transition_prior=false"]
    train(load_recipe(None, dict(parse_overrides(overrides), output_dir=str(tmp_path))))
    model = SeqRecForNextItemPrediction.from_pretrained(tmp_path)
    assert not torch.allclose(model.transition_prior.weight, torch.ones(1))  # trained away from the init


def test_resized_model_with_a_prior_saves_and_loads(tmp_path):
    model = prior_model()
    model.resize_token_embeddings(14)
    assert model.config.transition_prior_vocab_size == 12  # the tables keep the size they were counted at
    model.save_pretrained(tmp_path)
    loaded = SeqRecForNextItemPrediction.from_pretrained(tmp_path).eval()
    ids = torch.tensor([[2, 3, 12]])
    torch.testing.assert_close(loaded(input_ids=ids).logits, model(input_ids=ids).logits)


def test_bf16_model_and_autocast_agree_with_recommend():
    model = prior_model()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits = model(input_ids=IDS, attention_mask=MASK, logits_to_keep=1).logits[:, -1]
        assert logits.dtype == torch.float32  # the prior is added in fp32, as in recommend() and the export
        _, scores = model.recommend(input_ids=IDS, attention_mask=MASK, top_k=3, exclude_history=False)
    masked = logits.clone()
    masked[:, :2] = float("-inf")
    torch.testing.assert_close(scores, masked.topk(3).values, atol=2e-2, rtol=1e-2)
    cast = prior_model().to(torch.bfloat16)
    assert cast.transition_prior.value.dtype == torch.bfloat16
    assert torch.isfinite(cast(input_ids=IDS, attention_mask=MASK).logits).all()


def test_stacked_prior_weights_are_frozen_and_kept_out_of_the_optimizer():
    assert not prior_model().transition_prior.weight.requires_grad
    assert prior_model(transition_prior_in_loss=True).transition_prior.weight.requires_grad


def test_recent_popularity_counts_the_last_events_of_each_history():
    recent = build_recent_popularity(HISTORIES, vocab_size=12, num_special=2, window=2)
    counts = Counter(i for ids in HISTORIES for i in ids[-2:] if i >= 2)  # 3:1 4:2 5:1 8:1 9:1 2:1
    torch.testing.assert_close(recent, torch.log1p(torch.tensor([float(counts[j]) for j in range(12)])))
    assert recent[4] == pytest.approx(math.log(3))  # 4 ends two histories
    with pytest.raises(ValueError, match="recent_window needs transition_prior_lags"):
        make_model(transition_prior_recent_window=2)
    with pytest.raises(ValueError, match="recent_window is a stacked term"):
        make_model(transition_prior_lags=1, transition_prior_recent_window=2, transition_prior_in_loss=True)


def recent_model(**overrides):
    return prior_model(recent_window=2, **overrides)


def test_recent_popularity_starts_at_weight_zero_so_scores_and_loss_are_unchanged():
    model, plain = recent_model(), prior_model()  # same seed: the same network and tables
    assert model.transition_prior.weight.tolist() == pytest.approx([0.8, -0.4, 0.0])
    assert SeqRecForNextItemPrediction(model.config).transition_prior.weight.tolist()[-1] == 0.0  # the init
    labels = IDS.masked_fill(MASK == 0, -100)
    torch.testing.assert_close(model(input_ids=IDS, attention_mask=MASK).logits, plain(input_ids=IDS).logits)
    torch.testing.assert_close(
        model(input_ids=IDS, attention_mask=MASK, labels=labels).loss,
        plain(input_ids=IDS, attention_mask=MASK, labels=labels).loss,
    )
    with pytest.raises(ValueError, match="recent-popularity"):
        model.transition_prior.set_prior(*build_transition_prior(HISTORIES, 12, 2, 2, 3))  # the counts are missing


@pytest.mark.parametrize("chunk_size,reverse", [(4, False), (65536, True)])
def test_recent_popularity_is_added_to_logits_recommend_and_the_export(chunk_size, reverse, tmp_path):
    model = recent_model(reverse=reverse)
    with torch.no_grad():
        model.transition_prior.weight[-1] = 1.7
    recent = 1.7 * model.transition_prior.recent
    hidden = model.model(input_ids=IDS, attention_mask=MASK).last_hidden_state
    expected = hidden @ model.item_head.weight.t() + dense_prior(model, IDS, MASK) + recent
    torch.testing.assert_close(model(input_ids=IDS, attention_mask=MASK).logits, expected)
    brute = expected[:, -1].clone()
    brute[:, :2] = float("-inf")
    brute = brute.scatter(1, IDS, float("-inf"))
    assert_recommend_and_export_match(model, brute, chunk_size)
    model.save_pretrained(tmp_path)
    loaded = SeqRecForNextItemPrediction.from_pretrained(tmp_path).eval()
    torch.testing.assert_close(loaded(input_ids=IDS, attention_mask=MASK).logits, expected)
    model.resize_token_embeddings(14)  # new items have no recent counts
    assert model(input_ids=torch.tensor([[2, 12, 13]])).logits.shape[-1] == 14


def test_calibration_fits_the_recent_popularity_weight(tokenizer):
    from seqrec_hf.evaluation import calibrate_transition_prior, evaluate, model_score_fn

    # Every training history ends with the "hot" item i6, and so does every held-out target: only recent
    # popularity knows (the transitions into i6 come from everywhere, each seen once).
    histories = [[f"i{i % 5}", f"i{(i + 2) % 5}", "i6"] for i in range(30)]
    held_out = {"item_ids": [[f"i{(i + 1) % 5}"] for i in range(30)], "target": ["i6"] * 30}
    ids = [tokenizer.convert_items_to_ids(h) for h in histories]
    model = make_model(
        vocab_size=len(tokenizer), transition_prior_lags=1, transition_prior_size=2, transition_prior_recent_window=1
    )
    tables = build_transition_prior([h[:2] for h in ids], len(tokenizer), 2, 1, 2)  # no transition into i6
    model.transition_prior.set_prior(*tables, recent=build_recent_popularity(ids, len(tokenizer), 2, 1))
    before = evaluate(model_score_fn(model), held_out, tokenizer, show_progress=False)["NDCG@10"]
    result = calibrate_transition_prior(model, held_out, tokenizer, grid=(0.0, 1.0, 4.0), show_progress=False)
    assert len(result["weights"]) == 2 and result["weights"][-1] > 0
    assert result["metric"] == pytest.approx(1.0) and before < 0.9


def test_prior_counted_on_the_inputs_of_the_split_scored(tmp_path):
    # transition_prior_counts='inputs': validation (inputs = the train split) is exactly as before, the test
    # and the saved model use counts over the test inputs (each user's validation item added), no target.
    base = TINY + ["max_steps=15", "eval_every_steps=15", "transition_prior_lags=2", "transition_prior_size=8"]
    base += ["transition_prior_recent_window=2"]
    runs = {}
    for counts in ("train", "inputs"):
        out = tmp_path / counts
        overrides = parse_overrides(base + [f"transition_prior_counts={counts}"])
        train(load_recipe(None, dict(overrides, output_dir=str(out))))
        metrics = json.loads((out / "metrics.json").read_text())
        runs[counts] = (metrics, SeqRecForNextItemPrediction.from_pretrained(out))
    (plain, plain_model), (inputs, inputs_model) = runs["train"], runs["inputs"]
    assert inputs["validation"] == plain["validation"]
    assert inputs["transition_prior_calibration"]["weights"] == plain["transition_prior_calibration"]["weights"]
    assert inputs["test_network_only"] == plain["test_network_only"]  # the same network
    assert inputs["test_prior_train_counts"] == plain["test"] and "test_prior_train_counts" not in plain

    recipe = load_recipe(None, dict(parse_overrides(base), output_dir=str(tmp_path / "train")))
    tokenizer = ItemTokenizer.from_pretrained(tmp_path / "train")
    splits, tokenizer, _ = prepare_data(recipe, tokenizer)

    def tables(split):
        histories = [tokenizer.convert_items_to_ids(items) for items in splits[split]["item_ids"]]
        index, value = build_transition_prior(histories, len(tokenizer), 2, 2, 8)
        return index, value, build_recent_popularity(histories, len(tokenizer), 2, 2)

    for model, split in ((plain_model, "train"), (inputs_model, "test")):
        index, value, recent = tables(split)
        assert torch.equal(model.transition_prior.index, index) and torch.equal(model.transition_prior.value, value)
        assert torch.equal(model.transition_prior.recent, recent)
    assert not torch.equal(inputs_model.transition_prior.value, plain_model.transition_prior.value)
    # the test inputs end with the validation item, and nothing after it: the test targets are never counted
    test = splits["test"]
    assert all(items[-1] == target for items, target in zip(test["item_ids"], splits["validation"]["target"]))
    card = (tmp_path / "inputs" / "README.md").read_text()
    assert "plus every user's validation item" in card and "must not be scored on the validation split" in card
    best = SeqRecForNextItemPrediction.from_pretrained(tmp_path / "inputs" / "best_model")  # train counts kept
    assert torch.equal(best.transition_prior.value, plain_model.transition_prior.value)
    with pytest.raises(ValueError, match="transition_prior_counts"):
        load_recipe(None, {"transition_prior_counts": "test"})
    with pytest.raises(ValueError, match="leave_one_out"):
        load_recipe(None, {"transition_prior_counts": "inputs", "split": "temporal", "temporal_cutoff": 10})
