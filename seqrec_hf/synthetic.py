"""Synthetic interactions with temporal structure: the built-in dataset of ``make demo``.

Why synthetic: the demo must run offline, with no download and no data licence, and it must show what each
model can learn. The generator plants four signals, each documented in docs/synthetic_data.md:

1. themes with a typical order (episodes, a course): a Markov chain gets part of it, a longer context more;
2. a few long-term interests per user that drift over time;
3. behaviour that depends on the time gap before an event (the strongest signal): after a few minutes the
   user continues the current theme; after seconds (they left the last item at once) they jump to its related
   theme; after hours to days they resume another of their interests; after weeks they start something new;
4. Zipf-like popularity, so the popularity baseline is reasonable but beatable.

Rows follow the sequence schema of docs/CONTRACT.md: ``user_id``, ``item_ids`` (oldest first), ``timestamps``.
"""

from __future__ import annotations

import csv
import dataclasses
import math
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import datasets
import numpy as np

__all__ = [
    "BOUNCE_GAP_SECONDS",
    "BREAK_GAP_SECONDS",
    "GAP_BUCKETS",
    "RETURN_GAP_SECONDS",
    "SESSION_GAP_SECONDS",
    "SyntheticConfig",
    "describe",
    "gap_bucket",
    "generate_synthetic_interactions",
    "synthetic_catalog",
    "write_synthetic_csv",
]

# Gap ranges (seconds) of the four kinds of step. They do not overlap, so `gap_bucket` recovers the kind of
# step from the gap alone; a time-aware model can learn the same thresholds.
BOUNCE_GAP_SECONDS = (5, 60)  # left the last item at once: 5 s to 1 min
SESSION_GAP_SECONDS = (3 * 60, 40 * 60)  # same session, last item consumed: 3 to 40 min
RETURN_GAP_SECONDS = (2 * 3600, 3 * 86400)  # next visit: 2 h to 3 days
BREAK_GAP_SECONDS = (7 * 86400, 60 * 86400)  # back from a break: 1 week to 2 months
GAP_BUCKETS = ("bounce", "session", "return", "break")
_BUCKET_UPPER_BOUNDS = (100, 3600, 5 * 86400)  # between the ranges above

SEQUENCE_FEATURES = datasets.Features(
    {
        "user_id": datasets.Value("string"),
        "item_ids": datasets.List(datasets.Value("string")),
        "timestamps": datasets.List(datasets.Value("int64")),
    }
)


@dataclass(frozen=True)
class SyntheticConfig:
    """Every knob of the generator, with defaults sized for a demo that trains in minutes on 2 CPU cores.

    A dataclass so that recipes and ``transformers.HfArgumentParser`` can read it like the other arguments.
    """

    num_users: int = field(default=2000, metadata={"help": "Number of users (one row each)."})
    num_items: int = field(default=500, metadata={"help": "Catalog size; every item belongs to one theme."})
    num_themes: int = field(default=25, metadata={"help": "Number of themes (ordered item series)."})
    min_len: int = field(default=10, metadata={"help": "Shortest user history."})
    max_len: int = field(default=50, metadata={"help": "Longest user history (lengths are log-uniform)."})
    seed: int = field(default=0, metadata={"help": "Seed; the same seed gives the same data."})
    theme_zipf_exponent: float = field(
        default=1.0, metadata={"help": "Theme popularity ~ 1 / rank**exponent (popularity skew)."}
    )
    item_zipf_exponent: float = field(
        default=1.0, metadata={"help": "Popularity of impulse items ~ 1 / rank**exponent."}
    )
    min_interests: int = field(default=2, metadata={"help": "Fewest themes a user follows at the start."})
    max_interests: int = field(default=4, metadata={"help": "Most themes a user follows at once."})
    min_session_continue: float = field(
        default=0.55, metadata={"help": "Lowest per-user chance that a visit goes on after an item."}
    )
    max_session_continue: float = field(
        default=0.8, metadata={"help": "Highest per-user chance that a visit goes on after an item."}
    )
    bounce_prob: float = field(
        default=0.22, metadata={"help": "In a visit, chance to leave an item at once for the related theme."}
    )
    break_prob: float = field(default=0.3, metadata={"help": "Share of new visits that follow a long break."})
    resume_same_prob: float = field(
        default=0.1, metadata={"help": "After a return gap, chance to go on with the same theme."}
    )
    new_theme_after_break_prob: float = field(
        default=0.7, metadata={"help": "After a break, chance to start a theme never seen before."}
    )
    skip_prob: float = field(default=0.1, metadata={"help": "Chance to skip one item of the theme order."})
    impulse_prob: float = field(
        default=0.05, metadata={"help": "In a visit, chance of a one-off popular item off the theme."}
    )
    join_midway_prob: float = field(
        default=0.15, metadata={"help": "Chance to start a theme part-way instead of at its first item."}
    )
    interest_drift: float = field(
        default=0.3, metadata={"help": "Std of the random walk of log interest weights, per visit."}
    )
    interest_memory_days: float = field(
        default=7.0, metadata={"help": "Interest weights decay as exp(-days since last touched / this)."}
    )
    start_timestamp: int = field(default=1_672_531_200, metadata={"help": "Earliest first event (2023-01-01)."})
    start_span_days: int = field(default=365, metadata={"help": "First events spread over this many days."})

    def __post_init__(self) -> None:
        if not 0 < self.num_themes <= self.num_items:
            raise ValueError(f"need 0 < num_themes <= num_items, got {self.num_themes}, {self.num_items}")
        if not 1 <= self.min_len <= self.max_len:
            raise ValueError(f"need 1 <= min_len <= max_len, got {self.min_len}, {self.max_len}")
        if self.max_len > self.num_items:
            raise ValueError("max_len must not exceed num_items: a user never sees an item twice")
        if not 1 <= self.min_interests <= self.max_interests:
            raise ValueError("need 1 <= min_interests <= max_interests")
        if not 0 <= self.min_session_continue <= self.max_session_continue <= 1:
            raise ValueError("need 0 <= min_session_continue <= max_session_continue <= 1")
        probabilities = ("bounce_prob", "break_prob", "resume_same_prob", "new_theme_after_break_prob")
        for name in probabilities + ("skip_prob", "impulse_prob", "join_midway_prob"):
            if not 0 <= getattr(self, name) <= 1:
                raise ValueError(f"{name} must be a probability, got {getattr(self, name)}")


@dataclass
class _Catalog:
    themes: list[np.ndarray]  # item indices of each theme, in the theme's typical order
    related: np.ndarray  # (num_themes,) the theme users jump to when they leave one at once; -1: none
    theme_probs: np.ndarray  # (num_themes,) chance to pick a theme when starting a new one
    item_cdf: np.ndarray  # (num_items,) cumulative popularity of impulse items
    item_names: list[str]  # readable ids, "i0042"


def _build_catalog(cfg: SyntheticConfig) -> _Catalog:
    rng = np.random.default_rng([cfg.seed, 0])
    if cfg.num_items >= 3 * cfg.num_themes:
        # Theme sizes vary (short series and long ones); each theme gets at least 3 items.
        weights = rng.dirichlet(np.full(cfg.num_themes, 2.0))
        sizes = 3 + rng.multinomial(cfg.num_items - 3 * cfg.num_themes, weights)
    else:  # tiny catalogs (tests): near-equal sizes
        sizes = np.diff(np.linspace(0, cfg.num_items, cfg.num_themes + 1).round().astype(int))
    # Items are shuffled across themes so that an id says nothing about its theme or position.
    themes = np.split(rng.permutation(cfg.num_items), np.cumsum(sizes)[:-1])
    theme_probs = 1.0 / np.arange(1, cfg.num_themes + 1) ** cfg.theme_zipf_exponent
    theme_probs = rng.permutation(theme_probs / theme_probs.sum())
    # A related theme (sequel, spin-off, accessories) for each theme, never itself; popular ones more often.
    related = np.full(cfg.num_themes, -1)
    for theme in range(cfg.num_themes if cfg.num_themes > 1 else 0):
        probs = theme_probs.copy()
        probs[theme] = 0.0
        related[theme] = rng.choice(cfg.num_themes, p=probs / probs.sum())
    item_probs = rng.permutation(1.0 / np.arange(1, cfg.num_items + 1) ** cfg.item_zipf_exponent)
    width = max(4, len(str(cfg.num_items - 1)))
    return _Catalog(
        themes=themes,
        related=related,
        theme_probs=theme_probs,
        item_cdf=np.cumsum(item_probs / item_probs.sum()),
        item_names=[f"i{i:0{width}d}" for i in range(cfg.num_items)],
    )


def _log_uniform(rng: np.random.Generator, low_high: tuple[int, int]) -> int:
    low, high = low_high
    return int(math.exp(rng.uniform(math.log(low), math.log(high))))


class _UserSimulator:
    """One user's walk through the catalog; the state is the user's interests and how far they got in each."""

    def __init__(self, cfg: SyntheticConfig, catalog: _Catalog, rng: np.random.Generator) -> None:
        self.cfg, self.catalog, self.rng = cfg, catalog, rng
        self.seen: set[int] = set()
        self.started: set[int] = set()
        # theme -> [next position, log weight, time last touched]; only themes with an unseen item left
        self.interests: dict[int, list[float]] = {}
        self.items: list[int] = []
        self.times: list[int] = []

    def _next_position(self, theme: int, position: int) -> int:
        """First position >= `position` the user has not seen; len(theme) when there is none."""
        items = self.catalog.themes[theme]
        while position < len(items) and items[position] in self.seen:
            position += 1
        return position

    def _add_interest(self, theme: int, position: int, now: int) -> None:
        if len(self.interests) >= self.cfg.max_interests:
            # Drift: the stalest interest is forgotten to make room for the new one.
            del self.interests[min(self.interests, key=lambda t: self.interests[t][2])]
        self.started.add(theme)
        self.interests[theme] = [position, float(self.rng.normal()), now]

    def _start_new_theme(self, now: int) -> int | None:
        """Start a theme never seen before, picked by popularity (or any with items left, in tiny catalogs)."""
        probs = self.catalog.theme_probs.copy()
        probs[list(self.started)] = 0.0
        if probs.sum() <= 0:
            probs = self.catalog.theme_probs.copy()
            for theme in range(len(probs)):
                if theme in self.interests or self._next_position(theme, 0) >= len(self.catalog.themes[theme]):
                    probs[theme] = 0.0
            if probs.sum() <= 0:
                return None
        theme = int(self.rng.choice(len(probs), p=probs / probs.sum()))
        size = len(self.catalog.themes[theme])
        position = 0
        if self.rng.random() < self.cfg.join_midway_prob:
            position = int(self.rng.integers(0, size // 2 + 1))
        position = self._next_position(theme, position)
        if position >= size:
            position = self._next_position(theme, 0)
        if position >= size:
            self.started.add(theme)
            return self._start_new_theme(now)
        self._add_interest(theme, position, now)
        return theme

    def _choose_interest(self, now: int, exclude: int | None) -> int | None:
        """Pick one of the user's interests by its drifting weight; a new theme when there is none."""
        candidates = [t for t in self.interests if t != exclude]
        if not candidates:
            theme = self._start_new_theme(now)
            return exclude if theme is None and exclude in self.interests else theme
        memory = self.cfg.interest_memory_days * 86400
        # Interests fade in wall-clock time, not in number of events: only timestamps show how stale one is.
        logits = np.array([self.interests[t][1] - (now - self.interests[t][2]) / memory for t in candidates])
        probs = np.exp(logits - logits.max())
        return candidates[int(self.rng.choice(len(candidates), p=probs / probs.sum()))]

    def _related_theme(self, theme: int, now: int) -> int | None:
        """The theme users jump to when they leave `theme` at once; another interest when it has nothing left."""
        related = int(self.catalog.related[theme])
        if related >= 0 and related not in self.interests:
            position = self._next_position(related, 0)
            if position < len(self.catalog.themes[related]):
                self._add_interest(related, position, now)
        if related >= 0 and related in self.interests:
            return related
        return self._choose_interest(now, exclude=theme)

    def _emit(self, item: int, now: int) -> None:
        self.seen.add(item)
        self.items.append(item)
        self.times.append(now)
        # Keep the invariant: every interest has an unseen item left (an impulse may have taken the last one).
        for theme in list(self.interests):
            state = self.interests[theme]
            state[0] = self._next_position(theme, int(state[0]))
            if state[0] >= len(self.catalog.themes[theme]):
                del self.interests[theme]

    def _emit_from_theme(self, theme: int, now: int) -> None:
        """Emit the theme's next item, sometimes skipping one."""
        state, items = self.interests[theme], self.catalog.themes[theme]
        position = int(state[0])
        if self.rng.random() < self.cfg.skip_prob:
            skipped = self._next_position(theme, position + 1)
            position = skipped if skipped < len(items) else position
        state[0], state[2] = position + 1, now
        self._emit(int(items[position]), now)

    def _emit_impulse(self, now: int) -> None:
        """A one-off click on a globally popular item; it does not move the user's place in any theme."""
        for _ in range(20):
            item = int(np.searchsorted(self.catalog.item_cdf, self.rng.random()))
            item = min(item, len(self.catalog.item_cdf) - 1)
            if item not in self.seen:
                self._emit(item, now)
                return

    def run(self, length: int, now: int) -> None:
        """Simulate up to `length` events starting at unix time `now`."""
        cfg, rng = self.cfg, self.rng
        continue_prob = rng.uniform(cfg.min_session_continue, cfg.max_session_continue)
        for _ in range(int(rng.integers(cfg.min_interests, cfg.max_interests + 1))):
            self._start_new_theme(now)
        current = self._choose_interest(now, exclude=None)
        while current is not None and len(self.items) < length:
            self._emit_from_theme(current, now)
            if len(self.items) >= length:
                break
            if current in self.interests and rng.random() < continue_prob:
                if rng.random() < cfg.bounce_prob:
                    # Left the item after seconds: it did not please, so jump to the related theme.
                    now += _log_uniform(rng, BOUNCE_GAP_SECONDS)
                    current = self._related_theme(current, now)
                    continue
                # Same visit, item consumed (minutes): go on with the theme, sometimes after a one-off click.
                now += _log_uniform(rng, SESSION_GAP_SECONDS)
                if rng.random() < cfg.impulse_prob:
                    self._emit_impulse(now)
                    now += _log_uniform(rng, SESSION_GAP_SECONDS)
                    if current not in self.interests:
                        current = self._choose_interest(now, exclude=None)
                continue
            # A new visit: interests drift, and what the user does depends on how long they were away.
            for state in self.interests.values():
                state[1] += cfg.interest_drift * rng.normal()
            if rng.random() < cfg.break_prob:
                now += _log_uniform(rng, BREAK_GAP_SECONDS)
                new_theme = rng.random() < cfg.new_theme_after_break_prob or not self.interests
                current = self._start_new_theme(now) if new_theme else None
                if current is None:
                    current = self._choose_interest(now, exclude=None)
            else:
                now += _log_uniform(rng, RETURN_GAP_SECONDS)
                if current not in self.interests or rng.random() >= cfg.resume_same_prob:
                    current = self._choose_interest(now, exclude=current)


def _simulate(cfg: SyntheticConfig) -> tuple[_Catalog, list[tuple[list[int], list[int]]]]:
    catalog = _build_catalog(cfg)
    # One child seed per user: user u's history does not change when num_users changes.
    user_seeds = np.random.SeedSequence([cfg.seed, 1]).spawn(cfg.num_users)
    histories = []
    log_min, log_max = math.log(cfg.min_len), math.log(cfg.max_len + 1)
    for user_seed in user_seeds:
        rng = np.random.default_rng(user_seed)
        length = min(cfg.max_len, int(math.exp(rng.uniform(log_min, log_max))))
        start = cfg.start_timestamp + int(rng.integers(0, cfg.start_span_days * 86400))
        user = _UserSimulator(cfg, catalog, rng)
        user.run(length, start)
        histories.append((user.items, user.times))
    return catalog, histories


def _resolve(config: SyntheticConfig | None, overrides: dict[str, Any]) -> SyntheticConfig:
    return dataclasses.replace(SyntheticConfig() if config is None else config, **overrides)


def generate_synthetic_interactions(config: SyntheticConfig | None = None, /, **overrides: Any) -> datasets.Dataset:
    """Generate one row per user (``user_id``, ``item_ids`` oldest first, int64 ``timestamps``).

    Pass a `SyntheticConfig`, keyword overrides of its fields, or both:
    ``generate_synthetic_interactions(num_users=500, seed=1)``. Deterministic for a given config; no user sees
    an item twice, so evaluation may exclude the history from the candidates.
    """
    cfg = _resolve(config, overrides)
    catalog, histories = _simulate(cfg)
    width = max(4, len(str(cfg.num_users - 1)))
    names = catalog.item_names
    return datasets.Dataset.from_dict(
        {
            "user_id": [f"u{u:0{width}d}" for u in range(cfg.num_users)],
            "item_ids": [[names[i] for i in items] for items, _ in histories],
            "timestamps": [times for _, times in histories],
        },
        features=SEQUENCE_FEATURES,
    )


def write_synthetic_csv(path: str | Path, config: SyntheticConfig | None = None, /, **overrides: Any) -> Path:
    """Write the same data as a long CSV ``user_id,item_id,timestamp``, so the demo also exercises the readers.

    Rows are grouped by user and in time order. Returns the path.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    dataset = generate_synthetic_interactions(config, **overrides)
    with path.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["user_id", "item_id", "timestamp"])
        for row in dataset:
            writer.writerows((row["user_id"], item, ts) for item, ts in zip(row["item_ids"], row["timestamps"]))
    return path


def synthetic_catalog(config: SyntheticConfig | None = None, /, **overrides: Any) -> datasets.Dataset:
    """The ground truth behind the data: one row per item with its ``theme`` ("t07") and ``position`` in it.

    Models never see it; it is for explaining recommendations in the demo and for checking the signals.
    """
    cfg = _resolve(config, overrides)
    catalog = _build_catalog(cfg)
    width = max(2, len(str(cfg.num_themes - 1)))
    rows: dict[str, list[Any]] = {"item_id": [], "theme": [], "position": []}
    for theme, items in enumerate(catalog.themes):
        for position, item in enumerate(items):
            rows["item_id"].append(catalog.item_names[item])
            rows["theme"].append(f"t{theme:0{width}d}")
            rows["position"].append(position)
    return datasets.Dataset.from_dict(rows)


def gap_bucket(gap_seconds: float) -> str:
    """Name the kind of step a time gap means in this data: "bounce", "session", "return" or "break"."""
    for name, upper in zip(GAP_BUCKETS, _BUCKET_UPPER_BOUNDS):
        if gap_seconds < upper:
            return name
    return GAP_BUCKETS[-1]


def describe(dataset: datasets.Dataset) -> dict[str, Any]:
    """Sanity statistics of any sequence dataset: sizes, lengths, popularity skew and gap quantiles (seconds).

    Works on every dataset in the sequence schema, so the demo can print the same summary for real data.
    """
    histories = dataset["item_ids"]
    if not histories:
        raise ValueError("describe() needs at least one user")
    lengths = np.array([len(h) for h in histories])
    counts = np.array(sorted(Counter(item for h in histories for item in h).values(), reverse=True))
    top = max(1, len(counts) // 10)
    stats: dict[str, Any] = {
        "users": len(histories),
        "items": len(counts),
        "interactions": int(lengths.sum()),
        "mean_length": float(lengths.mean()),
        "min_length": int(lengths.min()),
        "max_length": int(lengths.max()),
        "top10pct_item_share": float(counts[:top].sum() / counts.sum()),
    }
    if "timestamps" in dataset.column_names:
        gaps = np.concatenate([np.diff(np.asarray(t, dtype=np.int64)) for t in dataset["timestamps"]])
        if gaps.size:
            for q in (0.1, 0.5, 0.9):
                stats[f"gap_p{int(q * 100)}_seconds"] = float(np.quantile(gaps, q))
    return stats
