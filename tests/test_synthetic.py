"""The synthetic demo data: schema, determinism, and that the planted signals are really in the data.

The signal tests measure the generated rows (and the published catalog), never the generator's hidden state,
so they fail if a change to the generator silently removes a signal the demo relies on.
"""

from __future__ import annotations

import csv
import re
from collections import Counter, defaultdict

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from seqrec_hf.synthetic import (
    BOUNCE_GAP_SECONDS,
    BREAK_GAP_SECONDS,
    RETURN_GAP_SECONDS,
    SESSION_GAP_SECONDS,
    SyntheticConfig,
    describe,
    gap_bucket,
    generate_synthetic_interactions,
    synthetic_catalog,
    write_synthetic_csv,
)

SMALL = {"num_users": 300, "num_items": 400, "num_themes": 25, "min_len": 8, "max_len": 40}


@pytest.fixture(scope="module")
def demo_data():
    """The default demo dataset, generated once (about a second)."""
    return generate_synthetic_interactions()


def _transitions(dataset):
    for items, times in zip(dataset["item_ids"], dataset["timestamps"]):
        for i in range(1, len(items)):
            yield items[i - 1], items[i], times[i] - times[i - 1]


def test_same_seed_same_data_other_seed_other_data():
    first = generate_synthetic_interactions(seed=3, **SMALL)
    assert first.to_dict() == generate_synthetic_interactions(seed=3, **SMALL).to_dict()
    other = generate_synthetic_interactions(seed=4, **SMALL)
    assert first["item_ids"] != other["item_ids"]
    assert first["timestamps"] != other["timestamps"]


def test_config_and_keyword_overrides_agree():
    config = SyntheticConfig(seed=5, **SMALL)
    assert (
        generate_synthetic_interactions(config).to_dict() == generate_synthetic_interactions(seed=5, **SMALL).to_dict()
    )
    with pytest.raises(TypeError):
        generate_synthetic_interactions(num_user=10)  # typo must not be ignored


def test_a_user_history_does_not_depend_on_the_number_of_users():
    few = generate_synthetic_interactions(**{**SMALL, "num_users": 20})
    many = generate_synthetic_interactions(**{**SMALL, "num_users": 60})
    assert few[:20] == many[:20]


def test_schema_and_dtypes(demo_data):
    assert demo_data.column_names == ["user_id", "item_ids", "timestamps"]
    assert demo_data.features["user_id"].dtype == "string"
    assert demo_data.features["item_ids"].feature.dtype == "string"
    assert demo_data.features["timestamps"].feature.dtype == "int64"
    assert len(demo_data) == 2000
    assert len(set(demo_data["user_id"])) == len(demo_data)
    row = demo_data[0]
    assert all(re.fullmatch(r"i\d{4}", item) for item in row["item_ids"])
    assert len(row["item_ids"]) == len(row["timestamps"])


def test_histories_are_in_time_order_within_bounds_and_without_repeats(demo_data):
    lengths = []
    for items, times in zip(demo_data["item_ids"], demo_data["timestamps"]):
        assert len(items) == len(times)
        assert np.all(np.diff(times) >= 0)
        assert len(set(items)) == len(items)
        lengths.append(len(items))
    assert min(lengths) >= 10 and max(lengths) <= 50
    # Lengths are spread over the range, not all equal.
    assert np.percentile(lengths, 90) - np.percentile(lengths, 10) >= 15
    first_times = [times[0] for times in demo_data["timestamps"]]
    assert 1_672_531_200 <= min(first_times) < max(first_times) < 1_672_531_200 + 366 * 86400


@settings(max_examples=25, deadline=None)
@given(
    num_items=st.integers(5, 60),
    num_themes=st.integers(1, 12),
    min_len=st.integers(1, 5),
    extra_len=st.integers(0, 20),
    seed=st.integers(0, 2**32 - 1),
)
def test_any_valid_config_keeps_the_invariants(num_items, num_themes, min_len, extra_len, seed):
    num_themes = min(num_themes, num_items)
    max_len = min(num_items, min_len + extra_len)
    min_len = min(min_len, max_len)
    config = SyntheticConfig(
        num_users=8, num_items=num_items, num_themes=num_themes, min_len=min_len, max_len=max_len, seed=seed
    )
    dataset = generate_synthetic_interactions(config)
    catalog_items = set(synthetic_catalog(config)["item_id"])
    for items, times in zip(dataset["item_ids"], dataset["timestamps"]):
        assert min_len <= len(items) <= max_len
        assert len(set(items)) == len(items)
        assert set(items) <= catalog_items
        assert all(b >= a for a, b in zip(times, times[1:]))


def test_invalid_configs_are_rejected():
    with pytest.raises(ValueError):
        SyntheticConfig(num_items=10, num_themes=11)
    with pytest.raises(ValueError):
        SyntheticConfig(min_len=20, max_len=10)
    with pytest.raises(ValueError):
        SyntheticConfig(num_items=30, num_themes=3, max_len=31)


def test_catalog_puts_every_item_in_exactly_one_ordered_theme():
    catalog = synthetic_catalog(**SMALL)
    assert sorted(catalog["item_id"]) == sorted(set(catalog["item_id"]))
    assert len(catalog) == SMALL["num_items"]
    positions = defaultdict(list)
    for theme, position in zip(catalog["theme"], catalog["position"]):
        positions[theme].append(position)
    assert len(positions) == SMALL["num_themes"]
    assert all(sorted(p) == list(range(len(p))) for p in positions.values())
    assert min(len(p) for p in positions.values()) >= 3


def test_gap_buckets_match_the_documented_ranges():
    for name, (low, high) in zip(
        ["bounce", "session", "return", "break"],
        [BOUNCE_GAP_SECONDS, SESSION_GAP_SECONDS, RETURN_GAP_SECONDS, BREAK_GAP_SECONDS],
    ):
        assert gap_bucket(low) == name and gap_bucket(high - 1) == name


def test_short_gaps_continue_the_theme_and_long_gaps_switch(demo_data):
    """The time-gap rule, measured with the ground-truth theme of each item."""
    catalog = synthetic_catalog()
    theme = dict(zip(catalog["item_id"], catalog["theme"]))
    same_theme = defaultdict(list)
    for previous, item, gap in _transitions(demo_data):
        same_theme[gap_bucket(gap)].append(theme[item] == theme[previous])
    rate = {bucket: np.mean(flags) for bucket, flags in same_theme.items()}
    assert rate["session"] > 0.8
    assert rate["bounce"] < 0.1
    assert rate["return"] < 0.3 and rate["break"] < 0.3
    assert min(len(flags) for flags in same_theme.values()) > 1000  # every kind of step is common


def test_the_gap_predicts_the_next_item_beyond_the_order_of_items(demo_data):
    """Data only (no catalog): the typical successor of an item, learned on half of the users, is what comes
    next after a gap of minutes far more often than after a gap of hours or more. A time-blind model sees the
    same item pair in both cases; only the gap tells them apart."""
    half = len(demo_data) // 2
    successors: dict[str, Counter] = defaultdict(Counter)
    for previous, item, _ in _transitions(demo_data.select(range(half))):
        successors[previous][item] += 1
    hits = defaultdict(list)
    for previous, item, gap in _transitions(demo_data.select(range(half, len(demo_data)))):
        if successors[previous]:
            predicted = successors[previous].most_common(1)[0][0]
            if 100 <= gap < 3600:
                hits["minutes"].append(item == predicted)
            elif gap >= 2 * 3600:
                hits["hours or more"].append(item == predicted)
    assert np.mean(hits["minutes"]) > 0.6
    assert np.mean(hits["hours or more"]) < 0.2


def _top_theme_share(dataset, config: SyntheticConfig, top: int = 5) -> float:
    """Share of all interactions that fall in the `top` most popular themes (ground truth from the catalog)."""
    catalog = synthetic_catalog(config)
    theme = dict(zip(catalog["item_id"], catalog["theme"]))
    counts = sorted(Counter(theme[i] for items in dataset["item_ids"] for i in items).values(), reverse=True)
    return sum(counts[:top]) / sum(counts)


def test_popularity_is_skewed_but_not_degenerate(demo_data):
    counts = np.array(sorted(Counter(i for items in demo_data["item_ids"] for i in items).values(), reverse=True))
    # ~0.51-0.56 over seeds 0-3; ~0.42 with flat theme popularity; a uniform catalog would give ~0.15.
    assert counts[: len(counts) // 10].sum() / counts.sum() > 0.47
    assert counts[0] / counts.sum() < 0.05  # no single item dominates
    assert len(counts) > 0.8 * SyntheticConfig().num_items  # most of the catalog is used
    # Zipf over themes: the 5 most popular of 25 themes hold ~half of the interactions (~1/3 when flat).
    assert _top_theme_share(demo_data, SyntheticConfig()) > 0.45


def test_the_zipf_exponent_drives_the_skew():
    zipf = SyntheticConfig(num_users=800)
    flat = SyntheticConfig(num_users=800, theme_zipf_exponent=0.0, item_zipf_exponent=0.0)
    # About 1.5-1.7x over seeds 0-5.
    zipf_share = _top_theme_share(generate_synthetic_interactions(zipf), zipf)
    assert zipf_share > 1.3 * _top_theme_share(generate_synthetic_interactions(flat), flat)


def test_describe_on_a_hand_made_dataset():
    import datasets

    dataset = datasets.Dataset.from_dict(
        {
            "user_id": ["a", "b"],
            "item_ids": [["x", "y", "z"], ["x"]],
            "timestamps": [[0, 10, 110], [5]],
        }
    )
    stats = describe(dataset)
    assert stats["users"] == 2 and stats["items"] == 3 and stats["interactions"] == 4
    assert stats["mean_length"] == 2.0 and stats["min_length"] == 1 and stats["max_length"] == 3
    assert stats["gap_p50_seconds"] == 55.0
    assert stats["top10pct_item_share"] == 0.5  # "x" holds 2 of 4 interactions
    assert "gap_p50_seconds" not in describe(dataset.remove_columns("timestamps"))


def test_describe_on_the_demo_data(demo_data):
    stats = describe(demo_data)
    assert stats["users"] == 2000 and 20 < stats["mean_length"] < 30
    assert stats["gap_p10_seconds"] < 3600 < 86400 < stats["gap_p90_seconds"]


def test_csv_holds_the_same_interactions(tmp_path):
    path = write_synthetic_csv(tmp_path / "sub" / "interactions.csv", seed=2, **SMALL)
    dataset = generate_synthetic_interactions(seed=2, **SMALL)
    with path.open(newline="") as f:
        rows = list(csv.reader(f))
    assert rows[0] == ["user_id", "item_id", "timestamp"]
    expected = [
        [user, item, str(ts)]
        for user, items, times in zip(dataset["user_id"], dataset["item_ids"], dataset["timestamps"])
        for item, ts in zip(items, times)
    ]
    assert rows[1:] == expected
