"""Serving export (`seqrec_hf.export`): the torch.export program must give what the eager model gives."""

import pytest
import torch
from conftest import make_model

from seqrec_hf.export import export_for_serving, load_serving_program, save_serving_program


def left_padded_batch(lengths, vocab=40, seed=1, times=False):
    """Left-padded batch of the given history lengths (item ids from 2, padding 0)."""
    g = torch.Generator().manual_seed(seed)
    width = max(lengths)
    ids = torch.zeros(len(lengths), width, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for row, length in enumerate(lengths):
        ids[row, width - length :] = torch.randint(2, vocab, (length,), generator=g)
        mask[row, width - length :] = 1
    batch = {"input_ids": ids, "attention_mask": mask}
    if times:
        gaps = torch.randint(1, 10**6, (len(lengths), width), generator=g)
        stamps = gaps.cumsum(-1) + 1_600_000_000
        for row, length in enumerate(lengths):  # padding repeats the first real time, as the tokenizer does
            stamps[row, : width - length] = stamps[row, width - length]
        batch["timestamps"] = stamps
    return batch


def eager_user_vectors(model, batch, query_timestamps=None):
    with torch.no_grad():
        out = model.model(**batch, query_timestamps=query_timestamps).last_hidden_state
    return out[:, -1]


@pytest.mark.parametrize("use_time_bias", [False, True])
def test_user_vectors_match_eager_for_other_shapes(use_time_bias):
    model = make_model(use_time_bias=use_time_bias, time_num_buckets=8)
    program = export_for_serving(model, **left_padded_batch([3, 5, 2], times=use_time_bias))
    assert program.time_aware is use_time_bias and program.top_k is None
    # batch sizes and lengths other than the example's, a single user and a one-item history included
    for seed, lengths in enumerate([[3, 5, 2], [1], [7], [16, 4, 1, 9, 12], [2, 2]]):
        batch = left_padded_batch(lengths, seed=seed, times=use_time_bias)
        torch.testing.assert_close(program(**batch), eager_user_vectors(model, batch), rtol=1e-5, atol=1e-5)


def test_filter_model_exports_with_dynamic_lengths():
    model = make_model(norm_style="post", filter_mix=0.7, filter_window=3, embedding_norm=True)
    program = export_for_serving(model, **left_padded_batch([5, 2, 7]))
    for seed, lengths in enumerate([[3, 1], [2], [9, 4, 2, 8]]):  # lengths below and above the window
        batch = left_padded_batch(lengths, seed=seed)
        torch.testing.assert_close(program(**batch), eager_user_vectors(model, batch), rtol=1e-5, atol=1e-5)


def test_time_aware_program_uses_query_timestamps():
    model = make_model(use_time_bias=True, time_num_buckets=8)
    with torch.no_grad():  # a non-zero time bias, so the query time matters
        for layer in model.model.layers:
            layer.time_bias.weight.normal_(0, 1.0)
    batch = left_padded_batch([4, 6], times=True)
    program = export_for_serving(model, **batch)
    query = batch["timestamps"][:, -1] + torch.tensor([10, 10**7])
    exported = program(**batch, query_timestamps=query)
    torch.testing.assert_close(exported, eager_user_vectors(model, batch, query), rtol=1e-5, atol=1e-5)
    assert not torch.allclose(exported, program(**batch))  # the default query time differs


@pytest.mark.parametrize("use_time_bias", [False, True])
@pytest.mark.parametrize("chunk_size", [7, 65536])
def test_top_k_matches_recommend(use_time_bias, chunk_size):
    model = make_model(vocab_size=60, use_time_bias=use_time_bias, time_num_buckets=8)
    example = left_padded_batch([3, 5, 2], vocab=60, times=use_time_bias)
    program = export_for_serving(model, **example, top_k=10, chunk_size=chunk_size)
    for seed, lengths in enumerate([[3, 5, 2], [1], [16, 8, 4, 11]]):
        batch = left_padded_batch(lengths, vocab=60, seed=seed, times=use_time_bias)
        ids, scores = program(**batch)
        ref_ids, ref_scores = model.recommend(**batch, top_k=10, chunk_size=chunk_size)
        assert torch.equal(ids, ref_ids)
        torch.testing.assert_close(scores, ref_scores, rtol=1e-5, atol=1e-5)
        history = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -1)
        assert not (ids[:, :, None] == history[:, None, :]).any()  # history excluded
        assert (ids >= model.config.num_special_tokens).all()  # never a special token


def test_save_and_load_round_trip(tmp_path):
    model = make_model(use_time_bias=True, time_num_buckets=8)
    example = left_padded_batch([3, 5, 2], times=True)
    program = export_for_serving(model, **example, top_k=5)
    path = tmp_path / "serving.pt2"
    save_serving_program(program, path)
    del model  # the loaded program needs no model object
    loaded = load_serving_program(path)
    assert loaded.metadata() == program.metadata()
    batch = left_padded_batch([6, 1], seed=3, times=True)
    for got, want in zip(loaded(**batch), program(**batch)):
        torch.testing.assert_close(got, want)


def test_runner_checks_inputs_like_the_eager_model():
    model = make_model(use_time_bias=True, time_num_buckets=8)
    program = export_for_serving(model, **left_padded_batch([3, 5], times=True))
    batch = left_padded_batch([3, 5], times=True)
    with pytest.raises(ValueError, match="timestamps"):
        program(batch["input_ids"], batch["attention_mask"])
    with pytest.raises(ValueError, match="vocab_size"):
        program(batch["input_ids"] + 100, batch["attention_mask"], batch["timestamps"])
    long = left_padded_batch([17], times=True)
    with pytest.raises(ValueError, match="max_position_embeddings"):
        program(**long)
    with pytest.raises(ValueError, match="top_k"):
        export_for_serving(model, **batch, top_k=1000)


def test_gap_embedding_only_model_is_exported_as_time_aware():
    model = make_model(use_time_gap_embedding=True, time_num_buckets=8)
    with torch.no_grad():
        model.model.embed_time_gaps.weight.normal_(0, 1.0)
    batch = left_padded_batch([4, 6], times=True)
    program = export_for_serving(model, **batch)
    query = batch["timestamps"][:, -1] + torch.tensor([10, 10**7])
    exported = program(**batch, query_timestamps=query)
    torch.testing.assert_close(exported, eager_user_vectors(model, batch, query), rtol=1e-5, atol=1e-5)
