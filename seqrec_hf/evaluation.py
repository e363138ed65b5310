"""Full-ranking evaluation, exactly as in the benchmark protocol (../shared/docs/benchmarks.md).

- Every item of the catalog is ranked (no sampled negatives).
- Items of the user's history are excluded (score -inf), using the FULL history even when the model only
  reads the last `max_length` events. The target itself always stays rankable, even when it repeats a
  history item (see docs/data_and_evaluation.md for why and how often that happens).
- Ties are pessimistic: rank = 1 + number of OTHER rankable items whose score is >= the target's.
- A target unknown to the vocabulary counts as a miss (rank = inf) and is reported.
Users are scored in batches, so memory is O(batch x catalog) whatever the number of users.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import Any

import datasets
import pyarrow.compute as pc
import torch
from tqdm.auto import tqdm

from .data import pad_histories

logger = logging.getLogger(__name__)

ScoreFn = Callable[[dict[str, torch.Tensor]], torch.Tensor]
DEFAULT_KS = (5, 10, 20)


class MappingVocab:
    """Adapter giving a plain `{raw item id: int id}` mapping the parts of the `ItemTokenizer` API used here.

    Ids below `num_special_tokens` are reserved ([PAD]=0, [UNK]=1, as in the tokenizer).
    """

    def __init__(self, item_to_id: Mapping[str, int], num_special_tokens: int = 2, unk_token_id: int = 1):
        self.item_to_id = item_to_id
        self.num_special_tokens = num_special_tokens
        self.pad_token_id = 0
        self.unk_token_id = unk_token_id
        bad = [i for i in item_to_id.values() if i < num_special_tokens]
        if bad:
            raise ValueError(f"item ids must be >= num_special_tokens={num_special_tokens}, got {bad[0]}")
        self._size = max(item_to_id.values(), default=num_special_tokens - 1) + 1

    def __len__(self) -> int:
        return self._size

    def convert_items_to_ids(self, items: Iterable[str], strict: bool = False) -> list[int]:
        get, unk = self.item_to_id.get, self.unk_token_id
        return [get(str(item), unk) for item in items]


def as_vocab(tokenizer: Any) -> Any:
    """An `ItemTokenizer` is used as is; a mapping of raw item id -> id is wrapped in `MappingVocab`."""
    if isinstance(tokenizer, Mapping):
        return MappingVocab(tokenizer)
    return tokenizer


def _rank_targets(
    scores: torch.Tensor, targets: torch.Tensor, excluded: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(ranks (B,), scores with excluded items at -inf (B, V), number of rankable items (B,))."""
    if excluded is not None:
        excluded = excluded.scatter(1, targets[:, None], False)  # the target always stays rankable
        scores = scores.masked_fill(excluded, -math.inf)
        rankable = excluded.shape[1] - _count_true(excluded)
    else:
        rankable = torch.full(targets.shape, scores.shape[1], dtype=torch.long, device=scores.device)
    # excluded items are -inf by now, so only rankable ones are checked; max propagates NaN (one cheap pass)
    if scores.numel() and torch.isnan(scores.amax()):
        raise ValueError("score_fn returned NaN for rankable items: ranks would be meaningless")
    target_scores = scores.gather(1, targets[:, None])  # (B, 1)
    ranks = _count_true(scores >= target_scores)  # includes the target itself: 1 + others
    # A target scored -inf ties with every rankable item (and with the excluded ones, which must not count).
    ranks = torch.where(target_scores.squeeze(1) == -math.inf, rankable, ranks)
    return ranks, scores, rankable


def _count_true(mask: torch.Tensor) -> torch.Tensor:
    """Per-row count of a (B, V) bool mask, as long. An int32 sum: ~9x faster than `count_nonzero(dim=1)` or a
    long sum on CPU (torch 2.13), and exact while V < 2^31."""
    return mask.sum(dim=1, dtype=torch.int32).long()


def compute_ranks(scores: torch.Tensor, targets: torch.Tensor, excluded: torch.Tensor | None = None) -> torch.Tensor:
    """Pessimistic 1-based rank of each target among the rankable items.

    scores: (B, V) float; targets: (B,) long; excluded: (B, V) bool, True = not rankable (the target's own
    column is always ranked, whatever `excluded` says). rank = 1 + number of OTHER rankable items whose
    score is >= the target's score. Raises on NaN scores of rankable items.
    """
    return _rank_targets(scores, targets, excluded)[0]


def metrics_from_ranks(ranks: torch.Tensor, ks: Sequence[int] = DEFAULT_KS) -> dict[str, float]:
    """HR@k, NDCG@k (one relevant item: 1/log2(rank+1)) and MRR averaged over all users; inf rank = miss."""
    ranks = ranks.double()
    if ranks.numel() == 0:
        raise ValueError("no users to evaluate")
    metrics: dict[str, float] = {}
    for k in ks:
        metrics[f"HR@{k}"] = (ranks <= k).double().mean().item()
    for k in ks:
        gains = torch.where(ranks <= k, 1.0 / torch.log2(ranks.clamp(max=1e18) + 1.0), 0.0)
        metrics[f"NDCG@{k}"] = gains.mean().item()
    metrics["MRR"] = (1.0 / ranks).mean().item()  # 1/inf = 0
    return metrics


def _batches(examples: Any, batch_size: int) -> Iterator[dict[str, list]]:
    """Batches (dict of column lists) from a Dataset, a list of row dicts or a dict of column lists."""
    if isinstance(examples, datasets.Dataset):
        for start in range(0, len(examples), batch_size):
            yield examples[start : start + batch_size]
    elif isinstance(examples, Mapping):
        size = len(examples["item_ids"])
        for start in range(0, size, batch_size):
            yield {k: v[start : start + batch_size] for k, v in examples.items()}
    else:
        rows = list(examples)
        for start in range(0, len(rows), batch_size):
            chunk = rows[start : start + batch_size]
            yield {k: [row.get(k) for row in chunk] for k in chunk[0]}


def _sorted_by_length(examples: Any) -> Any:
    """The rows in order of history length (stable): batches then pad to similar lengths, so the model does
    little work on padding (Beauty: ~5x fewer positions than in file order). Every metric is an average or a
    union over users, so the order changes none of them."""
    if isinstance(examples, datasets.Dataset):  # list lengths from Arrow: no per-row Python objects (~1000x)
        column = examples.select_columns(["item_ids"]).with_format("arrow")[:]["item_ids"]
        lengths = pc.list_value_length(column).to_pylist()
        return examples.select(sorted(range(len(lengths)), key=lengths.__getitem__))
    if isinstance(examples, Mapping):
        histories = examples["item_ids"]
        order = sorted(range(len(histories)), key=lambda i: len(histories[i]))
        return {key: [values[i] for i in order] for key, values in examples.items()}
    return sorted(examples, key=lambda row: len(row["item_ids"]))


def _num_examples(examples: Any) -> int:
    if isinstance(examples, Mapping):
        return len(examples["item_ids"])
    return len(examples)


def evaluate(
    score_fn: ScoreFn,
    examples: datasets.Dataset | Sequence[Mapping[str, Any]] | Mapping[str, Sequence],
    tokenizer: Any,
    *,
    batch_size: int = 256,
    ks: Sequence[int] = DEFAULT_KS,
    max_length: int | None = None,
    coverage_k: int = 10,
    use_query_timestamps: bool = True,
    show_progress: bool = True,
) -> dict[str, float]:
    """Full-ranking metrics of `score_fn` on evaluation rows (`item_ids`, `target`, optional timestamps).

    Args:
        score_fn: batch -> (B, V) scores over the vocabulary. The batch has `input_ids`, `attention_mask`
            (left padded, the most recent `max_length` events) and, when the rows have timestamps,
            `timestamps` and `query_timestamps` (the target's time, i.e. when the request is made).
        examples: Rows from `leave_one_out_split`/`temporal_split` (a Dataset, row dicts or column lists).
        tokenizer: An `ItemTokenizer`, or a mapping raw item id -> id (ids from 2; 0 and 1 are reserved).
        max_length: History length the model reads; the exclusion always uses the full history.
        coverage_k: Coverage@k = share of the catalog that appears in at least one user's top-k.
        use_query_timestamps: Pass the target's timestamp as `query_timestamps` (known at request time).

    Returns HR@k, NDCG@k for each k, MRR, Coverage@{coverage_k}, num_users, plus num_unknown_targets
    (targets absent from the vocabulary, counted as misses) and num_repeat_targets (targets already in the
    history; they stay rankable).
    """
    vocab = as_vocab(tokenizer)
    num_special = vocab.num_special_tokens
    vocab_size = len(vocab)
    num_items = vocab_size - num_special
    if num_items <= 0:
        raise ValueError("the vocabulary has no items")
    total = _num_examples(examples)
    all_ranks: list[torch.Tensor] = []
    covered: torch.Tensor | None = None
    unknown_targets = 0
    repeat_targets = 0
    progress = tqdm(total=total, desc="evaluating", unit="user", disable=not show_progress)
    for batch in _batches(_sorted_by_length(examples), batch_size):
        histories = batch["item_ids"]
        lengths = [len(h) for h in histories]
        flat = vocab.convert_items_to_ids([item for h in histories for item in h] + list(batch["target"]))
        id_lists, offset = [], 0
        for length in lengths:
            id_lists.append(flat[offset : offset + length])
            offset += length
        targets = torch.tensor(flat[offset:], dtype=torch.long)  # (B,)
        times = batch.get("timestamps")
        has_time = times is not None and all(t is not None for t in times)
        model_inputs = pad_histories(
            id_lists, vocab.pad_token_id, max_length=max_length, timestamps=times if has_time else None
        )
        if has_time and use_query_timestamps and batch.get("target_timestamp") is not None:
            model_inputs["query_timestamps"] = torch.tensor(batch["target_timestamp"], dtype=torch.long)

        scores = score_fn(model_inputs)  # (B, V')
        if scores.dim() != 2 or scores.shape[0] != len(histories) or scores.shape[1] < vocab_size:
            raise ValueError(
                f"score_fn must return (batch, vocab_size) = ({len(histories)}, >= {vocab_size}) scores, "
                f"got {tuple(scores.shape)}"
            )
        device = scores.device
        targets = targets.to(device)
        known = targets >= num_special
        unknown_targets += int((~known).sum())
        safe_targets = torch.where(known, targets, torch.zeros_like(targets))

        # (B, V') True = not rankable: special tokens, ids beyond the vocabulary, the full history.
        excluded = torch.zeros(scores.shape, dtype=torch.bool, device=device)
        excluded[:, :num_special] = True
        excluded[:, vocab_size:] = True
        history = pad_histories(id_lists, 0)["input_ids"].to(device)  # full history; pad 0 is special anyway
        excluded.scatter_(1, history, True)
        repeats = int((excluded.gather(1, safe_targets[:, None]).squeeze(1) & known).sum())
        repeat_targets += repeats

        if known.all():
            ranks, masked, rankable = _rank_targets(scores, targets, excluded)
            ranks = ranks.double()
        else:  # unknown targets are misses; rank only the others
            ranks = torch.full(targets.shape, math.inf, dtype=torch.float64, device=device)
            known_ranks, masked, rankable = _rank_targets(scores[known], targets[known], excluded[known])
            ranks[known] = known_ranks.double()
        all_ranks.append(ranks.cpu())

        # Coverage@k: share of the catalog in some user's top-k, as served: the whole history excluded,
        # whatever the target (users with fewer than k rankable items contribute what they have).
        if repeats or not known.all():
            masked = scores.masked_fill(excluded, -math.inf)
            rankable = excluded.shape[1] - excluded.count_nonzero(dim=1)
        top = masked.topk(min(coverage_k, num_items), dim=1).indices  # (B, k)
        if covered is None:
            covered = torch.zeros(scores.shape[1], dtype=torch.bool, device=device)
        keep = torch.arange(top.shape[1], device=device)[None, :] < rankable[:, None]
        covered[top[keep]] = True
        progress.update(len(histories))
    progress.close()
    if not all_ranks:
        raise ValueError("no examples to evaluate")

    ranks = torch.cat(all_ranks)
    metrics = metrics_from_ranks(ranks, ks)
    metrics[f"Coverage@{coverage_k}"] = covered[num_special:vocab_size].sum().item() / num_items
    metrics["num_users"] = int(ranks.numel())
    metrics["num_unknown_targets"] = unknown_targets
    metrics["num_repeat_targets"] = repeat_targets
    if unknown_targets:
        logger.warning("%d of %d targets are not in the vocabulary: counted as misses", unknown_targets, ranks.numel())
    return metrics


def model_score_fn(model: torch.nn.Module) -> ScoreFn:
    """Score function of a `SeqRecForNextItemPrediction`: last-position logits, no grad, eval mode.

    Puts the model in eval mode (dropout off) and moves each batch to the model's device.
    """
    model.eval()
    device = next(model.parameters()).device

    @torch.no_grad()
    def score(batch: dict[str, torch.Tensor]) -> torch.Tensor:
        inputs = {key: value.to(device) for key, value in batch.items()}
        return model(**inputs, logits_to_keep=1).logits[:, -1].float()  # (B, V)

    return score


def ensemble_score_fn(models: Sequence[torch.nn.Module], num_special: int = 0) -> ScoreFn:
    """Score function of an ensemble: the mean of the models' log-softmax at the last position (each model as
    it scores, e.g. with its own stacked prior). `num_special` > 0 leaves the special ids out of each softmax."""
    scores = [model_score_fn(model) for model in models]  # eval mode, no grad, fp32, batch on the device

    def score(batch: dict[str, torch.Tensor]) -> torch.Tensor:
        logps = []
        for fn in scores:
            logits = fn(batch)
            logits[:, :num_special] = float("-inf")  # never candidates
            logps.append(torch.log_softmax(logits, -1))
        return torch.stack(logps).mean(0)

    return score


DEFAULT_PRIOR_GRID = (0.0, 0.25, 0.5, 0.75, 1.0, 1.5, 2.0, 3.0)


@torch.no_grad()
def calibrate_transition_prior(
    model: torch.nn.Module,
    examples: Any,
    tokenizer: Any,
    *,
    batch_size: int = 256,
    max_length: int | None = None,
    grid: Sequence[float] = DEFAULT_PRIOR_GRID,
    rounds: int = 2,
    metric: str = "NDCG@10",
    show_progress: bool = True,
) -> dict[str, Any]:
    """Fit the transition prior's weights (one per table, then the recent-popularity one) on held-out rows
    (the validation split): coordinate ascent of `metric` over `grid`, one weight at a time, `rounds` times;
    the weights are set on the model.

    Stacking: the network trained alone is over-confident on its own training data, so the mixing weights
    are chosen where it is not. The network's part of the scores is computed once and cached per batch
    (user states and prior entries, not the catalog scores), so each grid point costs one matmul pass.
    Returns {"weights": [...], "metric": best value, "trials": [(weights, value), ...]}.
    """
    prior = getattr(model, "transition_prior", None)
    if prior is None:
        raise ValueError("the model has no transition prior (config.transition_prior_lags = 0)")
    model.eval()
    device = next(model.parameters()).device
    tables, size = prior.index.shape[0], prior.index.shape[2]
    cache: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []
    table = model.score_table(model.model.item_table(model.item_head.weight)).float()
    recent = prior.dense(table.shape[0], weighted=False)  # raw recent-popularity log-counts (or None)

    def network_part(batch):
        inputs = {key: value.to(device) for key, value in batch.items()}
        index, value = prior(inputs["input_ids"], inputs["attention_mask"], weighted=False)  # weights applied below
        hidden = model.model(**inputs).last_hidden_state[:, -1]
        return model.score_users(hidden).float(), index[:, -1], value[:, -1].float()

    def score_fn_for(weights: torch.Tensor):
        # `evaluate` visits the rows in the same order on every call (sorted by length, then in batches), so
        # the i-th call of any grid point sees the i-th batch: the cache is keyed by that index.
        calls = iter(range(10**12))
        weights = weights.to(device)
        per_entry = weights[:tables].repeat_interleave(size)  # (tables * size,)

        def score(batch):
            i = next(calls)
            if i == len(cache):
                cache.append(network_part(batch))
            users, index, value = cache[i]
            scores = (users @ table.t()).float().scatter_add(1, index, value * per_entry)
            return scores if recent is None else scores + weights[tables] * recent

        return score

    trials = []

    def run(weights: torch.Tensor) -> float:
        value = evaluate(
            score_fn_for(weights), examples, tokenizer, batch_size=batch_size, max_length=max_length,
            show_progress=False,
        )[metric]  # fmt: skip
        trials.append(([round(float(w), 4) for w in weights], value))
        return value

    best = prior.weight.detach().float().cpu().clone()
    best_value = run(best)
    progress = tqdm(total=rounds * best.numel() * len(grid), desc="calibrating the prior", disable=not show_progress)
    for _ in range(rounds):
        for lag in range(best.numel()):  # each table's weight, then the recent-popularity weight if any
            for candidate in grid:
                progress.update(1)
                trial = best.clone()
                trial[lag] = candidate
                if torch.equal(trial, best):
                    continue
                value = run(trial)
                if value > best_value:
                    best, best_value = trial, value
    progress.close()
    prior.weight.copy_(best.to(prior.weight.device))
    return {"weights": [float(w) for w in best], "metric": best_value, "trials": trials}


def format_metrics_table(metrics: Mapping[str, float], title: str | None = None) -> str:
    """A fixed-width two-column table of the metrics (counts as integers, rates with 4 decimals)."""
    lines = [title] if title else []
    width = max(len(name) for name in metrics)
    for name, value in metrics.items():
        if isinstance(value, float):
            text = f"{value:.4f}"
        else:
            text = str(value)
        lines.append(f"{name:<{width}}  {text:>10}")
    return "\n".join(lines)


__all__ = [
    "DEFAULT_KS",
    "MappingVocab",
    "as_vocab",
    "compute_ranks",
    "evaluate",
    "format_metrics_table",
    "metrics_from_ranks",
    "model_score_fn",
]
