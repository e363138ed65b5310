"""Readers, filters, splits, collator and sliding windows of seqrec_hf.data, on small files written here."""

from __future__ import annotations

import copy
import gzip
import json
import logging

import pytest
import torch
from conftest import data_path
from hypothesis import given, settings
from hypothesis import strategies as st

from seqrec_hf.data import (
    DataFormatError,
    SeqRecCollator,
    download_movielens,
    leave_one_out_split,
    load_sequences,
    sliding_windows,
    temporal_split,
)


def write(path, text: str, *, gz: bool = False, bom: bool = False, crlf: bool = False):
    if crlf:
        text = text.replace("\n", "\r\n")
    data = (b"\xef\xbb\xbf" if bom else b"") + text.encode("utf-8")
    if gz:
        data = gzip.compress(data)
    path.write_bytes(data)
    return path


def as_dict(ds):
    return {row["user_id"]: row for row in ds}


# --------------------------------------------------------------------------------------------------------
# Readers
# --------------------------------------------------------------------------------------------------------

U_DATA = "2\t10\t5\t300\n1\t11\t4\t200\n1\t12\t3\t100\n1\t13\t3\t200\n2\t14\t1\t100\n"


def test_movielens_u_data_stable_sort_and_user_order(tmp_path):
    ds = load_sequences(write(tmp_path / "u.data", U_DATA))
    assert ds.column_names == ["user_id", "item_ids", "timestamps"]
    assert ds.features["timestamps"].feature.dtype == "int64"
    assert ds["user_id"] == ["2", "1"]  # order of first appearance
    rows = as_dict(ds)
    # user 1: times 200, 100, 200 -> 100 first, then the two 200s in FILE order (11 before 13)
    assert rows["1"]["item_ids"] == ["12", "11", "13"]
    assert rows["1"]["timestamps"] == [100, 200, 200]
    assert rows["2"]["item_ids"] == ["14", "10"]


@pytest.mark.parametrize("gz", [False, True])
def test_movielens_ratings_dat(tmp_path, gz):
    text = "1::1193::5::978300760\n1::661::3::978302109\n1::914::3::978301968\n"
    name = "ratings.dat.gz" if gz else "ratings.dat"
    ds = load_sequences(write(tmp_path / name, text, gz=gz))
    assert ds[0]["item_ids"] == ["1193", "914", "661"]
    assert ds[0]["timestamps"] == [978300760, 978301968, 978302109]


def test_movielens_ratings_csv_crlf_bom_and_folder(tmp_path):
    text = "userId,movieId,rating,timestamp\n1,1,4.0,964982703\n1,3,4.0,964981247\n2,5,2.5,5\n"
    write(tmp_path / "ratings.csv", text, crlf=True, bom=True)
    for source in (tmp_path / "ratings.csv", tmp_path):  # a MovieLens folder works too
        rows = as_dict(load_sequences(source, format="auto"))
        assert rows["1"]["item_ids"] == ["3", "1"]
        assert rows["2"]["timestamps"] == [5]


def test_csv_custom_columns_unicode_quotes(tmp_path):
    text = 'when,who,what,stars\n3,"Zoë","café,noir",5\n1,ユーザー,本,4\n2,Zoë,crème,1\n'
    path = write(tmp_path / "log.csv", text, bom=True, crlf=True)
    ds = load_sequences(path, user_col="who", item_col="what", time_col="when", rating_col="stars")
    rows = as_dict(ds)
    assert rows["Zoë"]["item_ids"] == ["crème", "café,noir"]
    assert rows["ユーザー"]["item_ids"] == ["本"]
    kept = as_dict(load_sequences(path, user_col="who", item_col="what", rating_col="stars", min_rating=4))
    assert kept["Zoë"]["item_ids"] == ["café,noir"]


def test_tsv_default_columns_iso_dates_without_time(tmp_path):
    text = "user_id\titem_id\ttimestamp\nu\ta\t2024-01-02T00:00:00\nu\tb\t2024-01-01\n"
    rows = as_dict(load_sequences(write(tmp_path / "x.tsv", text)))
    assert rows["u"]["item_ids"] == ["b", "a"]
    assert rows["u"]["timestamps"] == [1704067200, 1704153600]
    no_time = load_sequences(write(tmp_path / "y.tsv", "user_id\titem_id\nu\ta\nu\tb\n"), format="tsv")
    assert no_time.column_names == ["user_id", "item_ids"]
    assert no_time[0]["item_ids"] == ["a", "b"]


def test_jsonl(tmp_path):
    lines = [{"user": 7, "item": "x", "ts": 2}, {"user": 7, "item": "y", "ts": 1}, {"user": "é", "item": 3, "ts": 0}]
    path = write(tmp_path / "events.jsonl", "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in lines), gz=True)
    rows = as_dict(load_sequences(path))
    assert rows["7"]["item_ids"] == ["y", "x"]
    assert rows["é"]["item_ids"] == ["3"]


def test_parquet_with_timestamp_type(tmp_path):
    import datetime as dt

    import pyarrow as pa
    import pyarrow.parquet as pq

    table = pa.table(
        {
            "userId": ["a", "a", "b"],
            "itemId": [1, 2, 3],
            "time": pa.array(
                [dt.datetime(2020, 1, 2), dt.datetime(2020, 1, 1), dt.datetime(2020, 1, 3)], pa.timestamp("ms")
            ),
        }
    )
    pq.write_table(table, tmp_path / "x.parquet")
    rows = as_dict(load_sequences(tmp_path / "x.parquet"))
    assert rows["a"]["item_ids"] == ["2", "1"]
    assert rows["a"]["timestamps"] == [1577836800, 1577923200]


def test_sequences_and_pairs(tmp_path):
    seq = write(tmp_path / "Beauty.txt", "1 1 2 3\n2 4 5\n3 1 4 2 2\n", crlf=True, bom=True, gz=True)
    ds = load_sequences(seq)  # auto: sequences
    assert ds.column_names == ["user_id", "item_ids"]
    assert ds["item_ids"] == [["1", "2", "3"], ["4", "5"], ["1", "4", "2", "2"]]
    pairs = write(tmp_path / "beauty.txt", "1 1\n1 2\n2 3\n1 3\n")
    rows = as_dict(load_sequences(pairs))  # auto: pairs (two fields, repeated users)
    assert rows["1"]["item_ids"] == ["1", "2", "3"]
    assert as_dict(load_sequences(pairs, format="pairs")) == rows


def test_filters_k_core_repeats_last_user(tmp_path):
    # Item z has 2 events, so a 2-core keeps it at first; dropping user w (1 event after removing y, which
    # has 1 event) then leaves z with 1 event: only an ITERATIVE k-core removes it.
    text = "u a a b z\nv a b\nw z y\n"
    path = write(tmp_path / "s.txt", text)
    rows = as_dict(load_sequences(path, format="sequences", k_core=2))
    assert set(rows) == {"u", "v"}
    assert rows["u"]["item_ids"] == ["a", "a", "b"]
    rows = as_dict(load_sequences(path, format="sequences", drop_consecutive_repeats=True))
    assert rows["u"]["item_ids"] == ["a", "b", "z"]
    assert list(as_dict(load_sequences(path, format="sequences", drop_last_user=True))) == ["u", "v"]
    assert list(as_dict(load_sequences(path, format="sequences", max_users=1))) == ["u"]


def test_drop_last_events_shifts_the_split_by_whole_events(tmp_path):
    from seqrec_hf.data import leave_one_out_split

    path = write(tmp_path / "t.csv", "user,item,timestamp\nu,a,3\nu,b,1\nu,c,2\nu,d,4\nv,x,1\nw,p,1\nw,q,2\n")
    rows = as_dict(load_sequences(path, drop_last_events=1))
    assert (rows["u"]["item_ids"], rows["u"]["timestamps"]) == (["b", "c", "a"], [1, 2, 3])  # last in TIME order
    assert rows["w"]["item_ids"] == ["p"] and "v" not in rows  # a user with nothing left is dropped
    full = leave_one_out_split(load_sequences(path))
    shifted = leave_one_out_split(load_sequences(path, drop_last_events=1))
    # the shifted test target is the real validation target, with the same history
    assert shifted["test"][0]["target"] == full["validation"][0]["target"] == "a"
    assert shifted["test"][0]["item_ids"] == full["validation"][0]["item_ids"]
    with pytest.raises(ValueError, match="drop_last_events"):
        load_sequences(path, drop_last_events=-1)


# --------------------------------------------------------------------------------------------------------
# Bad input
# --------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "text", "format", "line", "message"),
    [
        (
            "u.data",
            "1\t2\t3\t4\n1\t2\n",
            "movielens",
            2,
            "expected 4 tab-separated fields user item rating timestamp, got 2",
        ),
        ("ratings.dat", "1::2::3::4\n\n1::2::3\n", "movielens", 3, "expected 4 '::'-separated fields"),
        ("u.data", "1\t2\t3\tyesterday\n", "movielens", 1, "expected an integer unix timestamp"),
        ("x.csv", "user_id,item_id\na,b\na,b,c\n", "csv", 3, "expected 2 comma-separated fields"),
        ("x.csv", "user_id,item_id\n,b\n", "csv", 2, "empty value in column 'user_id'"),
        ("x.csv", 'user_id,item_id\na,"b c"\n', "csv", 2, "item id 'b c' in column 'item_id' contains whitespace"),
        ("x.jsonl", '{"user_id": 1, "item_id": 2}\n{"user_id": 1\n', "jsonl", 2, "expected one JSON object per line"),
        ("x.jsonl", '{"user_id": 1, "item_id": 2}\n{"user_id": 1}\n', "jsonl", 2, "expected key 'item_id'"),
        ("p.txt", "1 2\n1 2 3\n", "pairs", 2, "expected 2 whitespace-separated fields `user item`, got 3"),
        ("s.txt", "1 2 3\n4\n", "sequences", 2, "expected a user id followed by at least one item id"),
        ("s.txt", "1 2 3\n1 4\n", "sequences", 2, "already has a line (line 1)"),
        ("x.csv", "who,what\na,b\n", "csv", 1, "cannot tell which column holds the user id"),
    ],
)
def test_malformed_input_names_file_line_and_expectation(tmp_path, name, text, format, line, message):
    path = write(tmp_path / name, text)
    with pytest.raises(DataFormatError) as info:
        load_sequences(path, format=format)
    err = info.value
    assert isinstance(err, ValueError)
    assert (err.path, err.line) == (str(path), line)
    assert message in err.message
    assert str(err).startswith(f"{path}:{line}: ")
    assert "invalid literal" not in str(err)


def test_documented_error_format_and_pickling(tmp_path):
    path = write(tmp_path / "u.data", "1\t2\t3\t4\n5\t6\n")
    with pytest.raises(DataFormatError) as info:
        load_sequences(path)
    assert str(info.value) == f"{path}:2: expected 4 tab-separated fields user item rating timestamp, got 2"
    # errors cross process boundaries (DataLoader workers, datasets.map(num_proc=...)) through __reduce__
    rebuilt = copy.deepcopy(info.value)
    assert (rebuilt.path, rebuilt.line, str(rebuilt)) == (info.value.path, 2, str(info.value))


def test_empty_file_non_utf8_and_unknown_column(tmp_path):
    for name, fmt in (("empty.txt", "sequences"), ("blank.dat", "movielens"), ("e.txt", "auto")):
        with pytest.raises(DataFormatError, match="empty"):
            load_sequences(write(tmp_path / name, "\n  \n"), format=fmt)
    bad = tmp_path / "latin.txt"
    bad.write_bytes(b"1 caf\xe9\n")
    with pytest.raises(DataFormatError, match=r"latin\.txt:1: not valid UTF-8"):
        load_sequences(bad, format="sequences")
    path = write(tmp_path / "x.csv", "user_id,item_id\na,b\n")
    with pytest.raises(DataFormatError, match="no timestamp column 'when'; the columns are: 'user_id', 'item_id'"):
        load_sequences(path, time_col="when")
    with pytest.raises(ValueError, match="needs ratings"):
        load_sequences(path, min_rating=3)
    with pytest.raises(FileNotFoundError):
        load_sequences(tmp_path / "missing.csv")


def test_offline_download_names_the_file_to_place(tmp_path, monkeypatch):
    import urllib.request

    def offline(*args, **kwargs):
        raise OSError("network is unreachable")

    monkeypatch.setattr(urllib.request, "urlopen", offline)
    with pytest.raises(FileNotFoundError) as info:
        download_movielens("ml-1m", cache_dir=tmp_path)
    assert "ml-1m.zip" in str(info.value) and str(tmp_path / "ml-1m" / "ratings.dat") in str(info.value)
    (tmp_path / "ml-1m").mkdir()
    placed = write(tmp_path / "ml-1m" / "ratings.dat", "1::2::3::4\n")  # placed by hand: no download needed
    assert download_movielens("ml-1m", cache_dir=tmp_path) == placed
    monkeypatch.setenv("SEQREC_CACHE", str(tmp_path))
    monkeypatch.chdir(tmp_path / "ml-1m")  # no local file named "ml-1m" here: the name means the public set
    assert load_sequences("ml-1m")[0]["item_ids"] == ["2"]
    with pytest.raises(FileNotFoundError, match=r"place it at .*ml-100k\.zip"):
        load_sequences("ml-100k")


# --------------------------------------------------------------------------------------------------------
# Splits
# --------------------------------------------------------------------------------------------------------


def test_leave_one_out_split_hand_example(tmp_path, caplog):
    path = write(tmp_path / "u.data", "a\t1\t5\t10\na\t2\t5\t20\na\t3\t5\t30\na\t4\t5\t40\nb\t9\t5\t1\nb\t8\t5\t2\n")
    with caplog.at_level(logging.WARNING, logger="seqrec_hf.data"):
        splits = leave_one_out_split(load_sequences(path))
    assert "1 of 2 users have fewer than 3 events" in caplog.text  # user b is reported, not silently dropped
    assert splits["train"].to_list() == [{"user_id": "a", "item_ids": ["1", "2"], "timestamps": [10, 20]}]
    assert splits["validation"].to_list() == [
        {"user_id": "a", "item_ids": ["1", "2"], "timestamps": [10, 20], "target": "3", "target_timestamp": 30}
    ]
    assert splits["test"].to_list() == [
        {"user_id": "a", "item_ids": ["1", "2", "3"], "timestamps": [10, 20, 30], "target": "4", "target_timestamp": 40}
    ]
    no_time = leave_one_out_split(load_sequences(write(tmp_path / "s.txt", "u 1 2 3\n"), format="sequences"))
    assert no_time["test"].to_list() == [{"user_id": "u", "item_ids": ["1", "2"], "target": "3"}]
    with pytest.raises(ValueError, match="min_events must be >= 3"):
        leave_one_out_split(load_sequences(path), min_events=2)


def test_temporal_split_hand_example(tmp_path, caplog):
    text = "a\t1\t5\t10\na\t2\t5\t20\na\t3\t5\t30\na\t4\t5\t40\nb\t7\t5\t25\nb\t8\t5\t35\nc\t9\t5\t5\n"
    ds = load_sequences(write(tmp_path / "u.data", text))
    splits = temporal_split(ds, cutoff=30)
    assert list(splits) == ["train", "test"]
    assert as_dict(splits["train"])["a"]["item_ids"] == ["1", "2"]
    assert as_dict(splits["train"])["b"]["item_ids"] == ["7"]
    test = as_dict(splits["test"])
    assert set(test) == {"a", "b"}  # c has nothing after the cutoff
    assert test["a"]["item_ids"] == ["1", "2"] and test["a"]["target"] == "3"  # first event at/after cutoff
    assert test["b"]["target"] == "8" and test["b"]["target_timestamp"] == 35
    for row in splits["train"]:
        assert max(row["timestamps"]) < 30  # no training on the future
    with caplog.at_level(logging.WARNING, logger="seqrec_hf.data"):
        splits = temporal_split(ds, cutoff="1970-01-01T00:00:30", validation_cutoff=20)
    assert list(splits) == ["train", "validation", "test"]
    assert as_dict(splits["train"])["a"]["item_ids"] == ["1"]
    valid = as_dict(splits["validation"])
    assert valid["a"]["item_ids"] == ["1"] and valid["a"]["target"] == "2"
    assert "b" not in valid and "1 users have validation events but no history" in caplog.text
    assert as_dict(splits["test"])["b"]["item_ids"] == ["7"]
    with pytest.raises(ValueError, match="needs timestamps"):
        temporal_split(load_sequences(write(tmp_path / "s.txt", "u 1 2 3\n"), format="sequences"), cutoff=1)


# --------------------------------------------------------------------------------------------------------
# Collator and sliding windows
# --------------------------------------------------------------------------------------------------------


def test_collator_left_pads_truncates_and_labels(tokenizer):
    collator = SeqRecCollator(tokenizer, max_length=3)
    batch = collator(
        [
            {"item_ids": ["i0", "i1", "i2", "i3"], "timestamps": [1, 2, 3, 4]},
            {"item_ids": ["i5", "nope"], "timestamps": [7, 8]},
        ]
    )
    ids = tokenizer.convert_items_to_ids
    assert batch["input_ids"].tolist() == [ids(["i1", "i2", "i3"]), [0] + ids(["i5"]) + [1]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [0, 1, 1]]
    assert batch["timestamps"].tolist() == [[2, 3, 4], [7, 7, 8]]  # padding repeats the first time
    assert batch["labels"].tolist() == [ids(["i1", "i2", "i3"]), [-100] + ids(["i5"]) + [-100]]  # [UNK] ignored
    assert all(t.dtype == torch.long for t in batch.values())
    # The tokenizer's own encoding agrees with the collator.
    encoded = tokenizer([["i0", "i1", "i2", "i3"], ["i5"]], max_length=3, return_tensors="pt")
    assert encoded["input_ids"][0].tolist() == batch["input_ids"][0].tolist()
    pre = collator([{"input_ids": [5, 6]}, {"input_ids": [7]}])
    assert pre["input_ids"].tolist() == [[5, 6], [0, 7]] and "timestamps" not in pre
    padded = SeqRecCollator(tokenizer, pad_to_multiple_of=4)([{"item_ids": ["i0"]}])
    assert padded["input_ids"].shape == (1, 4)


@settings(max_examples=60, deadline=None)
@given(length=st.integers(1, 40), max_length=st.integers(2, 12), data=st.data())
def test_sliding_windows_cover_every_target(length, max_length, data):
    import datasets

    stride = data.draw(st.one_of(st.none(), st.integers(1, max_length - 1)))
    items = [str(i) for i in range(length)]
    ds = datasets.Dataset.from_dict({"user_id": ["u"], "item_ids": [items], "timestamps": [list(range(length))]})
    windows = sliding_windows(ds, max_length, stride).to_list()
    assert windows[0]["item_ids"] == items[-max_length:]  # the most recent window first
    targets = []
    for window in windows:
        assert 1 <= len(window["item_ids"]) <= max_length
        assert window["timestamps"] == [int(i) for i in window["item_ids"]]
        targets.extend(window["item_ids"][1:])
    assert set(targets) == set(items[1:])  # every next-item target is trained on
    if stride is None:
        assert sorted(targets, key=int) == items[1:]  # ... exactly once with the default stride


# --------------------------------------------------------------------------------------------------------
# The research data (skipped when SEQREC_DATA_DIR is absent)
# --------------------------------------------------------------------------------------------------------


def test_ml100k_matches_an_independent_stable_sort():
    import pandas as pd

    path = data_path("ml-100k/u.data")
    ds = load_sequences(path)
    assert (len(ds), sum(len(s) for s in ds["item_ids"])) == (943, 100000)
    frame = pd.read_csv(path, sep="\t", names=["user", "item", "rating", "time"], dtype=str)
    frame["time"] = frame["time"].astype("int64")
    frame = frame.sort_values("time", kind="stable")  # pandas' stable sort as the reference
    reference = frame.groupby("user", sort=False)["item"].agg(list).to_dict()
    assert {row["user_id"]: row["item_ids"] for row in ds} == reference


def test_ml1m_partial_drops_the_cut_user_and_beauty_stats():
    ds = load_sequences(data_path("ml-1m-partial/ratings.first487650.dat.gz"), drop_last_user=True)
    assert len(ds) == 2998 and ds[-1]["user_id"] == "2998" and ds[0]["user_id"] == "1"
    assert len(ds[0]["item_ids"]) == 53
    beauty = load_sequences(data_path("amazon-yelp-s3rec-seq/Beauty.txt"))
    items = {item for sequence in beauty["item_ids"] for item in sequence}
    assert (len(beauty), len(items), sum(len(s) for s in beauty["item_ids"])) == (22363, 12101, 198502)
