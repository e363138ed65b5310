"""Fuzzing the readers and the tokenizer: any input either loads or fails with a documented error that
names the file (and the line where there is one). Never a crash deep in a parser or in torch."""

import gzip
import string

import pytest
import torch
from conftest import make_model
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from seqrec_hf import ItemTokenizer
from seqrec_hf.data import DataFormatError, leave_one_out_split, load_sequences

FUZZ = settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])

cells = st.one_of(
    st.integers(-(10**12), 10**12).map(str),
    st.text(alphabet=string.ascii_letters + string.digits + "-_.:/é中", min_size=0, max_size=8),
    st.sampled_from(["", "nan", "1e9", "2021-01-01", "2021-13-45", "\ufeffu1", "x" * 300, "1.5", "-", "::"]),
)
line_strategy = st.lists(cells, min_size=0, max_size=6)
separators = {"csv": ",", "tsv": "\t", "movielens": "\t", "sequences": " ", "pairs": " "}
headers = {
    "csv": "user_id,item_id,timestamp",
    "tsv": "user_id\titem_id\ttimestamp",
    "movielens": None,
    "sequences": None,
    "pairs": None,
}


def write(tmp_path, name, text, newline, bom, gz):
    data = ("\ufeff" if bom else "") + text.replace("\n", newline)
    path = tmp_path / (name + (".gz" if gz else ""))
    raw = data.encode("utf-8")
    path.write_bytes(gzip.compress(raw) if gz else raw)
    return path


@FUZZ
@given(
    format=st.sampled_from(sorted(separators)),
    rows=st.lists(line_strategy, min_size=0, max_size=12),
    newline=st.sampled_from(["\n", "\r\n"]),
    bom=st.booleans(),
    gz=st.booleans(),
)
def test_readers_load_or_fail_with_a_documented_error(tmp_path_factory, format, rows, newline, bom, gz):
    tmp_path = tmp_path_factory.mktemp("fuzz")
    sep = separators[format]
    lines = [sep.join(row) for row in rows]
    if headers[format]:
        lines.insert(0, headers[format])
    path = write(tmp_path, f"data.{format}", "\n".join(lines) + "\n", newline, bom, gz)
    try:
        ds = load_sequences(path, format)
    except DataFormatError as err:
        assert str(path) in str(err) or path.name in str(err)
        assert err.line is None or err.line >= 1
        return
    except ValueError as err:  # documented: empty after filtering, bad options
        assert path.name in str(err) or "no users" in str(err) or "empty" in str(err), str(err)
        return
    # loaded: the schema holds and every history is a list of non-empty string ids
    assert set(ds.column_names) >= {"user_id", "item_ids"}
    for row in ds:
        assert row["item_ids"] and all(isinstance(i, str) and i for i in row["item_ids"])
        if "timestamps" in row:
            assert row["timestamps"] == sorted(row["timestamps"])
            assert len(row["timestamps"]) == len(row["item_ids"])
    try:
        splits = leave_one_out_split(ds)
    except ValueError as err:
        assert "events" in str(err)
        return
    assert len(splits["test"]) == len(splits["validation"])


@pytest.mark.parametrize(
    "format, text, expect",
    [
        ("csv", "user_id,item_id,timestamp\nu1,i1\n", "line 2"),  # wrong column count
        ("csv", "user_id,item_id,timestamp\nu1,i1,soon\n", "line 2"),  # non-numeric timestamp
        ("movielens", "1\t2\t3\n", "line 1"),
        ("movielens", "1\t2\t5\tyesterday\n", "line 1"),
        ("pairs", "u1\n", "line 1"),
        ("csv", "", "empty"),
        ("sequences", "\n\n", "empty"),
    ],
)
def test_hand_made_bad_files(tmp_path, format, text, expect):
    path = tmp_path / f"bad.{format}"
    path.write_text(text, encoding="utf-8")
    with pytest.raises(ValueError) as info:
        load_sequences(path, format)
    message = str(info.value)
    assert path.name in message
    assert expect in message or expect.split()[-1] in message, message


def test_odd_but_valid_files(tmp_path):
    long_id = "x" * 5000
    text = "\ufeffuser_id,item_id,timestamp\r\nü,é1,5\r\nü,é1,5\r\nü,中,6\r\nsolo,a,1\r\nü," + long_id + ",7\r\n"
    path = tmp_path / "odd.csv"
    path.write_text(text, encoding="utf-8")
    ds = load_sequences(path, "csv")
    rows = {r["user_id"]: r for r in ds}
    assert rows["ü"]["item_ids"] == ["é1", "é1", "中", long_id]  # duplicated events are kept (documented)
    assert rows["solo"]["item_ids"] == ["a"]
    splits = leave_one_out_split(ds)  # the one-event user is reported, not a crash
    assert list(splits["test"]["user_id"]) == ["ü"]


@FUZZ
@given(
    histories=st.lists(
        st.lists(st.one_of(st.text(min_size=0, max_size=6), st.integers(-5, 5)), min_size=0, max_size=70),
        min_size=0,
        max_size=4,
    ),
    max_length=st.integers(1, 60),
)
def test_tokenizer_and_model_fail_only_with_documented_errors(histories, max_length):
    tokenizer = ItemTokenizer.from_items([f"i{i}" for i in range(20)])
    model = make_model(vocab_size=len(tokenizer), max_position_embeddings=60)
    try:
        batch = tokenizer(histories, max_length=max_length, return_tensors="pt")
    except ValueError as err:
        assert any(word in str(err) for word in ("empty", "history", "histories")), str(err)
        return
    assert batch["input_ids"].shape[1] <= max_length
    ids, scores = model.recommend(**batch, top_k=5)
    assert ids.shape == (len(histories), 5)
    assert torch.all((ids >= 2) | (ids == -1))
