"""Prefix training rows (one target per row), positions counted from the end, length-grouped batches, and the
test-curve monitor of shifted splits."""

import json

import datasets
import pytest
import torch
import torch.nn.functional as F
from conftest import TINY, make_model

from seqrec_hf import ItemTokenizer
from seqrec_hf.data import LengthGroupedSampler, SeqRecCollator, prefix_rows
from seqrec_hf.train import load_recipe, parse_overrides, prepare_data, train


def test_prefix_rows_cover_every_target_with_its_most_recent_history():
    ds = datasets.Dataset.from_dict(
        {"user_id": ["u", "v"], "item_ids": [["a", "b", "c", "d"], ["e", "f"]], "timestamps": [[1, 2, 3, 4], [5, 6]]}
    )
    rows = prefix_rows(ds, max_length=2)
    assert rows["item_ids"] == [["a"], ["a", "b"], ["b", "c"], ["e"]]
    assert rows["target"] == ["b", "c", "d", "f"]
    assert rows["timestamps"] == [[1], [1, 2], [2, 3], [5]]
    assert rows["target_timestamp"] == [2, 3, 4, 6]
    assert rows["user_id"] == ["u", "u", "u", "v"]
    one = datasets.Dataset.from_dict({"item_ids": [["a"]]})
    assert len(prefix_rows(one, 5)) == 0  # a single event is no input/target pair
    with pytest.raises(ValueError, match="max_length"):
        prefix_rows(ds, 0)


def test_collator_turns_target_rows_into_one_label_per_row():
    tok = ItemTokenizer.from_items("abcdef")
    rows = [
        {"item_ids": ["a", "b"], "target": "c", "timestamps": [1, 2], "target_timestamp": 9},
        {"item_ids": ["e"], "target": "zz", "timestamps": [3], "target_timestamp": 7},
    ]
    batch = SeqRecCollator(tok, max_length=5)(rows)
    assert batch["labels"].tolist() == [tok.convert_items_to_ids(["c"])[0], -100]  # unknown target: ignored
    assert batch["query_timestamps"].tolist() == [9, 7]
    assert batch["input_ids"].tolist() == [tok.convert_items_to_ids(["a", "b"]), [0] + tok.convert_items_to_ids(["e"])]


@pytest.mark.parametrize("exclude_history", [False, True])
@pytest.mark.parametrize("smoothing", [0.0, 0.1])
def test_one_label_per_row_is_the_cross_entropy_of_the_last_position(exclude_history, smoothing):
    model = make_model(loss_exclude_history=exclude_history, label_smoothing=smoothing)
    ids = torch.tensor([[0, 0, 5, 6, 7], [3, 4, 5, 6, 9], [0, 0, 0, 0, 8]])
    mask = (ids != 0).long()
    labels = torch.tensor([6, 11, -100])  # row 0's target is in its history: it stays a candidate
    loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss

    logits = model(input_ids=ids, attention_mask=mask).logits[:, -1].float().clone()
    logits[:, :2] = float("-inf")
    if exclude_history:
        for b in range(2):
            target_score = logits[b, labels[b]].clone()
            logits[b, ids[b][mask[b].bool()]] = float("-inf")
            logits[b, labels[b]] = target_score
    logits = logits[:2]
    log_probs = torch.log_softmax(logits, dim=1)
    nll = F.nll_loss(log_probs, labels[:2], reduction="none")
    finite = torch.isfinite(log_probs)
    uniform = -(log_probs.masked_fill(~finite, 0.0).sum(1) / finite.sum(1))
    torch.testing.assert_close(loss, ((1 - smoothing) * nll + smoothing * uniform).mean())

    loss.backward()  # gradients flow through the last position only
    assert model.model.embed_items.weight.grad.abs().sum() > 0


def test_one_label_per_row_with_sampled_losses_and_bad_combinations():
    ids = torch.tensor([[0, 5, 6], [3, 4, 7]])
    for loss_type in ("sampled_softmax", "gbce"):
        model = make_model(loss_type=loss_type, num_negatives=8)
        assert torch.isfinite(model(input_ids=ids, labels=torch.tensor([9, 10])).loss)
    with pytest.raises(ValueError, match="target_window"):
        make_model(target_window=2)(input_ids=ids, labels=torch.tensor([9, 10]))
    assert make_model()(input_ids=ids, labels=torch.tensor([-100, -100])).loss == 0  # nothing to learn


def test_positions_from_end_number_events_back_from_the_latest():
    model = make_model(position_embedding_type="from_end", seed=3)
    ids = torch.tensor([[0, 0, 5, 6, 7]])
    with torch.no_grad():  # the latest event gets position 0, the one before 1, ...; padding changes nothing
        model.model.embed_positions.weight.zero_()
        model.model.embed_positions.weight[0] = 3.0
    base = make_model(position_embedding_type="from_end", seed=3)
    with torch.no_grad():
        base.model.embed_positions.weight.zero_()
    reference = base(input_ids=ids).logits
    shifted = model(input_ids=ids).logits
    torch.testing.assert_close(shifted[:, :-1], reference[:, :-1])  # only the last event's input moved
    assert not torch.allclose(shifted[:, -1], reference[:, -1])
    padded = model(input_ids=F.pad(ids, (3, 0))).logits[:, 3:]
    torch.testing.assert_close(padded, shifted, atol=1e-5, rtol=1e-5)


def test_length_grouped_sampler_is_a_resumable_low_padding_shuffle():
    lengths = torch.randint(1, 50, (1000,), generator=torch.Generator().manual_seed(0)).tolist()
    sampler = LengthGroupedSampler(lengths, batch_size=32, seed=7, mega_batches=8)
    order = list(sampler)
    assert sorted(order) == list(range(1000))  # every row once
    batches = [order[i : i + 32] for i in range(0, 1000, 32)]
    assert len(batches[-1]) == 1000 % 32  # the partial batch is last
    padded = sum(32 * max(lengths[i] for i in b) for b in batches[:-1])
    random_order = torch.randperm(1000, generator=torch.Generator().manual_seed(1)).tolist()
    random_padded = sum(32 * max(lengths[i] for i in random_order[j : j + 32]) for j in range(0, 992, 32))
    assert padded < 0.7 * random_padded
    assert list(LengthGroupedSampler(lengths, 32, seed=7, mega_batches=8)) == order  # same seed and epoch
    sampler.set_epoch(1)
    assert list(sampler) != order


def test_prefix_recipe_prepares_one_row_per_target():
    recipe = load_recipe(None, parse_overrides(TINY + ["train_rows=prefixes", "max_length=5"]))
    splits, _, rows = prepare_data(recipe)
    expected = sum(max(0, len(items) - 1) for items in splits["train"]["item_ids"])
    assert len(rows) == expected
    assert max(len(items) for items in rows["item_ids"]) <= 5
    with pytest.raises(ValueError, match="sliding_window_stride"):
        load_recipe(None, {"train_rows": "prefixes", "sliding_window_stride": 3})
    with pytest.raises(ValueError, match="train_rows"):
        load_recipe(None, {"train_rows": "windows"})
    for field, value in (("target_window", 3), ("loss_recency_half_life", 4.0)):  # need a target per position
        with pytest.raises(ValueError, match=field):
            load_recipe(None, {"train_rows": "prefixes", field: value})


def test_training_on_prefix_rows_with_grouped_batches_runs_and_learns(tmp_path):
    overrides = TINY + ["max_steps=30", "eval_every_steps=15", "train_rows=prefixes", "group_by_length=true"]
    overrides += ["position_embedding_type=from_end"]
    result = train(load_recipe(None, dict(parse_overrides(overrides), output_dir=str(tmp_path))))
    assert result["global_step"] == 30 and result["tokens_per_second"] > 0
    log = [json.loads(line) for line in (tmp_path / "train_log.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in log if "loss" in r]
    assert losses[-1] < losses[0]
    assert json.loads((tmp_path / "config.json").read_text())["position_embedding_type"] == "from_end"


def test_test_curves_are_logged_on_shifted_splits_only(tmp_path):
    with pytest.raises(ValueError, match="drop_last_events"):
        load_recipe(None, {"log_test_metrics": True})
    overrides = TINY + ["max_steps=10", "eval_every_steps=5", "drop_last_events=1", "log_test_metrics=true"]
    result = train(load_recipe(None, dict(parse_overrides(overrides), output_dir=str(tmp_path))))
    log = [json.loads(line) for line in (tmp_path / "train_log.jsonl").read_text().splitlines()]
    evaluations = [r for r in log if "validation" in r]
    assert len(evaluations) == 2 and all("NDCG@10" in r["test"] for r in evaluations)
    # the monitor does not choose: the best step is the best validation
    best = max(evaluations, key=lambda r: r["validation"]["NDCG@10"])
    assert result["best_step"] == best["step"]


def test_weight_average_follows_the_ramped_ema_and_round_trips(tmp_path):
    from seqrec_hf.train import WeightAverage

    model = make_model()
    average = WeightAverage(model, decay=0.9)
    expected = [p.detach().clone() for p in model.parameters()]
    for step in range(1, 6):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(0.1 * step)
        average.update()
        decay = min(0.9, (1 + step) / (10 + step))
        expected = [decay * e + (1 - decay) * p.detach() for e, p in zip(expected, model.parameters())]
    for got, want in zip(average.averaged().parameters(), expected):
        torch.testing.assert_close(got, want)
    assert not torch.equal(next(average.averaged().parameters()), next(model.parameters()))
    average.save(tmp_path)
    restored = WeightAverage(make_model(), decay=0.9)
    restored.load(tmp_path)
    assert restored.steps == 5
    for got, want in zip(restored.shadow, average.shadow):
        torch.testing.assert_close(got, want)
    with pytest.raises(FileNotFoundError, match="ema_decay"):
        restored.load(tmp_path / "nowhere")


def test_training_with_a_weight_average_selects_and_saves_the_average(tmp_path):
    from safetensors.torch import load_file

    overrides = TINY + ["max_steps=12", "eval_every_steps=6", "ema_decay=0.9", "save_every_steps=6"]
    train(load_recipe(None, dict(parse_overrides(overrides), output_dir=str(tmp_path))))
    log = [json.loads(line) for line in (tmp_path / "train_log.jsonl").read_text().splitlines()]
    best = max((r for r in log if "validation" in r), key=lambda r: r["validation"]["NDCG@10"])
    checkpoint = tmp_path / "checkpoints" / f"step-{best['step']}"  # both checkpoints are kept (keep 2)
    average = load_file(checkpoint / "ema.safetensors")
    live = load_file(checkpoint / "model.safetensors")
    saved = load_file(tmp_path / "model.safetensors")
    for key in ("model.layers.0.mlp.up_proj.weight", "model.embed_items.weight"):
        assert not torch.equal(average[key], live[key])  # the average is not the training model
        torch.testing.assert_close(saved[key], average[key])  # ... and it is what was selected and saved
    with pytest.raises(ValueError, match="ema_decay"):
        load_recipe(None, {"ema_decay": 1.0})


def test_rows_of_both_kinds_in_one_batch_are_an_error_and_padding_never_predicts():
    tok = ItemTokenizer.from_items("abc")
    with pytest.raises(ValueError, match="target"):
        SeqRecCollator(tok)([{"item_ids": ["a"], "target": "b"}, {"item_ids": ["a", "b"]}])
    model = make_model()
    ids = torch.tensor([[5, 6, 0]])  # right padded by mistake: the last position is padding
    loss = model(input_ids=ids, attention_mask=(ids != 0).long(), labels=torch.tensor([7])).loss
    assert loss == 0  # nothing learned from a padding position
