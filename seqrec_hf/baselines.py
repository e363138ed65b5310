"""Non-neural baselines, scored by the same evaluator as the models (`seqrec_hf.evaluation.evaluate`).

A model that does not beat these by a wide margin has learned little. Both are fitted on the INPUTS of the
split being evaluated, never on its targets:
- test split: every user's history without their last item (which is the test target);
- validation split: every user's history without their last two items.
So for the test split, popularity counts every event except each user's last one: the same information a
model may read at test time, and nothing from the future of the target.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np
import torch

from .evaluation import as_vocab


class PopularityBaseline:
    """Score = number of occurrences of the item in the fitted input histories (the same for every user)."""

    def __init__(self, tokenizer: Any):
        self.vocab = as_vocab(tokenizer)
        self.counts = torch.zeros(len(self.vocab), dtype=torch.float64)

    def _ids(self, sequence: Sequence[str]) -> list[int]:
        return self.vocab.convert_items_to_ids(list(sequence))

    def fit(self, sequences: Iterable[Sequence[str]]) -> PopularityBaseline:
        """Count item occurrences in `sequences` (the inputs of the split to evaluate)."""
        counter: Counter[int] = Counter()
        for sequence in sequences:
            counter.update(self._ids(sequence))
        self.counts.zero_()
        if counter:
            ids = torch.tensor(list(counter.keys()), dtype=torch.long)
            self.counts[ids] = torch.tensor(list(counter.values()), dtype=torch.float64)
        self.counts[: self.vocab.num_special_tokens] = 0  # [PAD]/[UNK] are never recommended
        return self

    def __call__(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """(B, V) scores: the popularity vector for every user of the batch."""
        return self.counts.expand(batch["input_ids"].shape[0], -1)


class MarkovBaseline(PopularityBaseline):
    """First-order Markov chain: score = count of (last input item -> item) transitions, ties by popularity.

    Transitions are counted between consecutive items of each fitted history. An item never seen after the
    user's last item (including every item when the last one was never followed) is ranked by popularity,
    below every item with a transition: score = transitions * (max popularity + 1) + popularity, which is
    exact in float64.
    """

    def fit(self, sequences: Iterable[Sequence[str]]) -> MarkovBaseline:
        """Count item popularity and item -> next-item transitions in `sequences`."""
        sequences = [self._ids(sequence) for sequence in sequences]
        super().fit([])  # reset
        pairs: Counter[tuple[int, int]] = Counter()
        popularity: Counter[int] = Counter()
        for ids in sequences:
            popularity.update(ids)
            pairs.update(zip(ids, ids[1:]))
        for item, count in popularity.items():
            self.counts[item] = count
        self.counts[: self.vocab.num_special_tokens] = 0
        # Transitions as CSR rows: the successors of item i are dst[indptr[i]:indptr[i + 1]].
        size = len(self.vocab)
        keys = sorted(pairs)
        src = np.array([k[0] for k in keys], dtype=np.int64)
        self.dst = torch.tensor([k[1] for k in keys], dtype=torch.long)
        self.weight = torch.tensor([pairs[k] for k in keys], dtype=torch.float64)
        self.indptr = np.searchsorted(src, np.arange(size + 1), side="left")
        self.scale = float(self.counts.max().item()) + 1.0
        return self

    def __call__(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """(B, V) scores from the transitions out of each user's last input item (left padding: column -1)."""
        last = batch["input_ids"][:, -1].tolist()
        scores = self.counts.repeat(len(last), 1)  # (B, V)
        special = self.vocab.num_special_tokens
        for row, item in enumerate(last):
            if item < special:
                continue  # [UNK] history: popularity only
            begin, end = int(self.indptr[item]), int(self.indptr[item + 1])
            if end > begin:
                scores[row, self.dst[begin:end]] += self.weight[begin:end] * self.scale
        return scores


BASELINES = {"popularity": PopularityBaseline, "markov": MarkovBaseline}


def fit_baseline(name: str, tokenizer: Any, sequences: Iterable[Sequence[str]]) -> PopularityBaseline:
    """Build and fit a baseline by name (`"popularity"` or `"markov"`) on the inputs of a split."""
    if name not in BASELINES:
        raise ValueError(f"unknown baseline {name!r}; choose one of {', '.join(BASELINES)}")
    return BASELINES[name](tokenizer).fit(sequences)


__all__ = ["BASELINES", "MarkovBaseline", "PopularityBaseline", "fit_baseline"]
