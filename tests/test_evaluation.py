"""Full-ranking evaluation checked against a brute-force reference written with plain Python loops."""

from __future__ import annotations

import math
import random

import pytest
import torch
from conftest import make_model
from hypothesis import given, settings
from hypothesis import strategies as st

from seqrec_hf.evaluation import compute_ranks, evaluate, metrics_from_ranks, model_score_fn

NUM_SPECIAL = 2


def brute_force_rank(scores: list[float], target: int, excluded: set[int]) -> float:
    """1 + number of other rankable items scoring >= the target (pessimistic ties)."""
    if target < NUM_SPECIAL:
        return math.inf
    others = [s for i, s in enumerate(scores) if i != target and i not in excluded]
    return 1 + sum(1 for s in others if s >= scores[target])


def brute_force_metrics(ranks: list[float]) -> dict[str, float]:
    out = {}
    for k in (5, 10, 20):
        out[f"HR@{k}"] = sum(r <= k for r in ranks) / len(ranks)
    for k in (5, 10, 20):
        out[f"NDCG@{k}"] = sum(1 / math.log2(r + 1) for r in ranks if r <= k) / len(ranks)
    out["MRR"] = sum(1 / r for r in ranks) / len(ranks)
    return out


@settings(max_examples=80, deadline=None)
@given(
    batch=st.integers(1, 6),
    vocab=st.integers(3, 30),
    levels=st.integers(1, 4),  # few distinct scores: many ties
    seed=st.integers(0, 2**31),
)
def test_compute_ranks_matches_brute_force_with_ties(batch, vocab, levels, seed):
    rng = random.Random(seed)
    scores = [[float(rng.randrange(levels)) for _ in range(vocab)] for _ in range(batch)]
    targets = [rng.randrange(vocab) for _ in range(batch)]
    excluded = [[rng.random() < 0.3 for _ in range(vocab)] for _ in range(batch)]
    ranks = compute_ranks(torch.tensor(scores), torch.tensor(targets), torch.tensor(excluded))
    for row in range(batch):
        skip = {i for i, e in enumerate(excluded[row]) if e}
        others = [s for i, s in enumerate(scores[row]) if i != targets[row] and i not in skip]
        assert ranks[row].item() == 1 + sum(s >= scores[row][targets[row]] for s in others)
    # Without exclusion: every other column counts.
    plain = compute_ranks(torch.tensor(scores), torch.tensor(targets))
    for row in range(batch):
        assert plain[row].item() == sum(s >= scores[row][targets[row]] for s in scores[row])


def test_ranks_are_pessimistic_and_handle_infinities():
    scores = torch.tensor([[0.0, 0.0, 1.0, 1.0, 1.0, 0.5], [0.0, 0.0, -math.inf, 2.0, -math.inf, 1.0]])
    excluded = torch.tensor([[True, True, False, False, False, False], [True, True, False, False, True, True]])
    ranks = compute_ranks(scores, torch.tensor([3, 2]), excluded)
    assert ranks.tolist() == [3, 2]  # tie with 2 others -> last of the three; -inf target: all rankable
    with pytest.raises(ValueError, match="NaN"):
        compute_ranks(torch.tensor([[0.0, float("nan"), 1.0]]), torch.tensor([2]))


def test_metrics_from_ranks_by_hand():
    metrics = metrics_from_ranks(torch.tensor([1.0, 3.0, 7.0, math.inf]))
    assert metrics["HR@5"] == pytest.approx(0.5)
    assert metrics["HR@10"] == pytest.approx(0.75)
    assert metrics["NDCG@5"] == pytest.approx((1 + 1 / math.log2(4)) / 4)
    assert metrics["NDCG@10"] == pytest.approx((1 + 1 / math.log2(4) + 1 / math.log2(8)) / 4)
    assert metrics["MRR"] == pytest.approx((1 + 1 / 3 + 1 / 7) / 4)


def random_examples(rng: random.Random, num_users: int, num_items: int, with_time: bool):
    rows = []
    for user in range(num_users):
        length = rng.randint(1, 12)
        history = [f"i{rng.randrange(num_items)}" for _ in range(length)]
        target = f"i{rng.randrange(num_items)}" if rng.random() > 0.05 else "never-seen"
        row = {"user_id": str(user), "item_ids": history, "target": target}
        if with_time:
            row["timestamps"] = sorted(rng.randrange(1000) for _ in range(length))
            row["target_timestamp"] = 1000 + user
        rows.append(row)
    rows[0]["target"] = "never-seen"  # at least one unknown target
    rows[1]["target"] = rows[1]["item_ids"][0]  # at least one target repeating a history item
    return rows


class TableScorer:
    """Scores that depend on the whole model input (last 3 ids): any truncation bug changes them."""

    def __init__(self, vocab_size: int, levels: int | None, seed: int):
        self.vocab_size, self.levels, self.seed = vocab_size, levels, seed

    def row_scores(self, key: tuple[int, ...]) -> list[float]:
        """`levels` distinct values (many ties), or distinct continuous scores when None."""
        rng = random.Random(hash((self.seed, key)))
        if self.levels is None:
            return [rng.random() for _ in range(self.vocab_size)]
        return [float(rng.randrange(self.levels)) for _ in range(self.vocab_size)]

    def __call__(self, batch):
        ids = batch["input_ids"]
        return torch.tensor([self.row_scores(tuple(([0, 0, 0] + row.tolist())[-3:])) for row in ids])


@pytest.mark.parametrize("seed", range(4))
def test_evaluate_matches_brute_force(tokenizer, seed):
    rng = random.Random(seed)
    examples = random_examples(rng, num_users=37, num_items=38, with_time=seed % 2 == 0)
    scorer = TableScorer(len(tokenizer), levels=3 + seed, seed=seed)  # few score levels: ties everywhere
    max_length = 4
    metrics = evaluate(scorer, examples, tokenizer, batch_size=5, max_length=max_length, show_progress=False)

    ranks, unknown, repeats = [], 0, 0
    for row in examples:
        ids = tokenizer.convert_items_to_ids(row["item_ids"])
        model_input = [0, 0, 0] + ids[-max_length:]  # the scorer reads the last 3 of the truncated input
        scores = scorer.row_scores(tuple(model_input[-3:]))
        target = tokenizer.convert_items_to_ids([row["target"]])[0]
        history = set(ids)  # the FULL history is excluded, not only the truncated input
        unknown += target < NUM_SPECIAL
        repeats += target >= NUM_SPECIAL and target in history
        ranks.append(brute_force_rank(scores, target, set(range(NUM_SPECIAL)) | (history - {target})))
    expected = brute_force_metrics(ranks)
    for name, value in expected.items():
        assert metrics[name] == pytest.approx(value), name
    assert metrics["num_users"] == len(examples)
    assert metrics["num_unknown_targets"] == unknown > 0
    assert metrics["num_repeat_targets"] == repeats > 0
    # Batching never changes the result.
    again = evaluate(scorer, examples, tokenizer, batch_size=64, max_length=max_length, show_progress=False)
    assert again == metrics


def test_coverage_matches_brute_force(tokenizer):
    examples = random_examples(random.Random(7), num_users=12, num_items=38, with_time=False)
    scorer = TableScorer(len(tokenizer), levels=None, seed=7)  # distinct scores: the top-k is unambiguous
    metrics = evaluate(scorer, examples, tokenizer, batch_size=4, max_length=5, coverage_k=3, show_progress=False)
    served = set()
    for row in examples:
        ids = tokenizer.convert_items_to_ids(row["item_ids"])
        scores = scorer.row_scores(tuple(([0, 0, 0] + ids[-5:])[-3:]))
        rankable = [i for i in range(NUM_SPECIAL, len(scores)) if i not in set(ids)]  # history never served
        served.update(sorted(rankable, key=lambda i: -scores[i])[:3])
    assert metrics["Coverage@3"] == pytest.approx(len(served) / (len(tokenizer) - NUM_SPECIAL))


def test_history_is_excluded_with_the_full_history_and_target_stays_rankable():
    vocab = {"a": 2, "b": 3, "c": 4, "d": 5}

    def scores(batch):  # a > b > c > d for everyone
        return torch.tensor([[0.0, 0.0, 4.0, 3.0, 2.0, 1.0]]).expand(batch["input_ids"].shape[0], -1)

    # "a" is in the history but outside the truncated input (max_length=1): still excluded.
    examples = [
        {"item_ids": ["a", "c"], "target": "b"},  # a excluded -> b is first
        {"item_ids": ["b", "a"], "target": "c"},  # a, b excluded -> c is first
        {"item_ids": ["a", "c"], "target": "a"},  # repeated target: rankable, first
        {"item_ids": ["b"], "target": "d"},  # a, c above d -> rank 3
    ]
    metrics = evaluate(scores, examples, vocab, max_length=1, show_progress=False)
    assert metrics["MRR"] == pytest.approx((1 + 1 + 1 + 1 / 3) / 4)
    assert metrics["num_repeat_targets"] == 1
    # Coverage@10 counts what is served (history excluded): every item appears in someone's list.
    assert metrics["Coverage@10"] == 1.0


def test_unknown_targets_are_misses_and_query_timestamps_are_passed():
    seen = {}

    def scorer(batch):
        seen.update(batch)
        return torch.zeros(batch["input_ids"].shape[0], 5)

    examples = {
        "item_ids": [["a"], ["b"]],
        "timestamps": [[10], [20]],
        "target": ["b", "zzz"],
        "target_timestamp": [11, 21],
    }
    metrics = evaluate(scorer, examples, {"a": 2, "b": 3, "c": 4}, show_progress=False)
    assert metrics["num_unknown_targets"] == 1
    assert metrics["HR@5"] == pytest.approx(0.5)  # the known one ties with c: rank 2; the unknown is a miss
    assert seen["query_timestamps"].tolist() == [11, 21] and seen["timestamps"].tolist() == [[10], [20]]


def test_extra_score_columns_are_ignored_and_bad_shapes_raise():
    def wide(batch):  # a model with a padded vocabulary: the extra columns are not items
        out = torch.zeros(batch["input_ids"].shape[0], 8)
        out[:, 6:] = 100.0
        return out

    metrics = evaluate(wide, [{"item_ids": ["a"], "target": "b"}], {"a": 2, "b": 3}, show_progress=False)
    assert metrics["MRR"] == 1.0
    with pytest.raises(ValueError, match="score_fn must return"):
        evaluate(lambda b: torch.zeros(1, 3), [{"item_ids": ["a"], "target": "b"}], {"a": 2, "b": 3})


def test_model_score_fn_ranks_last_position_logits(tokenizer):
    model = make_model(vocab_size=len(tokenizer))
    model.train()
    score_fn = model_score_fn(model)
    assert not model.training  # dropout off
    examples = [{"item_ids": ["i1", "i2", "i3"], "target": "i4"}, {"item_ids": ["i5"], "target": "i6"}]
    metrics = evaluate(score_fn, examples, tokenizer, max_length=16, show_progress=False)
    with torch.no_grad():
        batch = tokenizer([e["item_ids"] for e in examples], return_tensors="pt", max_length=16)
        logits = model(**batch).logits[:, -1]
    ranks = []
    for row, example in enumerate(examples):
        ids = tokenizer.convert_items_to_ids(example["item_ids"])
        target = tokenizer.convert_items_to_ids([example["target"]])[0]
        ranks.append(brute_force_rank(logits[row].tolist(), target, set(range(NUM_SPECIAL)) | set(ids)))
    assert metrics["MRR"] == pytest.approx(brute_force_metrics(ranks)["MRR"], rel=1e-6)
