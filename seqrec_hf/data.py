"""Raw interaction files -> one row per user (`datasets.Dataset`) -> splits -> training batches.

Every entry point (CLI, Trainer, Accelerate script, benchmarks) goes through `load_sequences`, the two split
functions and `SeqRecCollator`, so data handling is identical everywhere. The choices that change published
numbers are made once, here, and documented in docs/data_and_evaluation.md:
- each user's events are sorted by timestamp with a STABLE sort (ties keep file order);
- malformed input raises `DataFormatError` naming the file, the line and what was expected;
- users too short for a split are counted and logged, never dropped silently.
"""

from __future__ import annotations

import csv
import gzip
import hashlib
import io
import json
import logging
import os
import shutil
import urllib.error
import urllib.request
import zipfile
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import datasets
import torch

logger = logging.getLogger(__name__)

FORMATS = ("auto", "movielens", "csv", "tsv", "parquet", "jsonl", "sequences", "pairs")

# Column names tried, in order, when the caller does not name the columns of a csv/tsv/parquet/jsonl file.
_USER_COLUMNS = ("user_id", "userId", "user", "uid", "UserID", "reviewerID", "session_id", "visitorid")
_ITEM_COLUMNS = ("item_id", "itemId", "item", "movieId", "iid", "ItemID", "MovieID", "product_id", "asin")
_TIME_COLUMNS = ("timestamp", "Timestamp", "time", "ts", "unixReviewTime", "datetime", "date")
_RATING_COLUMNS = ("rating", "Rating", "overall", "score")


class DataFormatError(ValueError):
    """Malformed input: says which file, which line (or row) and what was expected.

    `str(err)` reads like a compiler message, e.g.
    `ratings.dat:12: expected 4 '::'-separated fields user::item::rating::timestamp, got 3`.
    """

    def __init__(self, path: str | os.PathLike, line: int | None, message: str):
        super().__init__(str(path), line, message)  # keeps the error picklable (multiprocessing, datasets)
        self.path = str(path)
        self.line = line
        self.message = message

    def __str__(self) -> str:
        where = self.path if self.line is None else f"{self.path}:{self.line}"
        return f"{where}: {self.message}"


# --------------------------------------------------------------------------------------------------------
# Reading raw files
# --------------------------------------------------------------------------------------------------------


def _open_binary(path: Path) -> io.BufferedIOBase:
    """Open a file for reading bytes, transparently gunzipping it (detected from the magic bytes)."""
    with open(path, "rb") as handle:
        magic = handle.read(2)
    if magic == b"\x1f\x8b":
        return gzip.open(path, "rb")
    return open(path, "rb")


def _iter_lines(path: Path) -> Iterator[tuple[int, str]]:
    """Yield `(line_number, text)` for every non-blank line: UTF-8, BOM and CR/LF removed, gzip undone."""
    try:
        with _open_binary(path) as handle:
            for lineno, raw in enumerate(handle, 1):
                if lineno == 1 and raw.startswith(b"\xef\xbb\xbf"):
                    raw = raw[3:]
                try:
                    text = raw.decode("utf-8")
                except UnicodeDecodeError as err:
                    raise DataFormatError(
                        path, lineno, f"not valid UTF-8 (byte {err.start}); re-encode the file as UTF-8"
                    ) from None
                text = text.rstrip("\r\n")
                if text.strip():
                    yield lineno, text
    except (gzip.BadGzipFile, EOFError) as err:
        raise DataFormatError(path, None, f"corrupt or truncated gzip file ({err})") from None


def _parse_timestamp(value: Any) -> int:
    """Integer seconds from an int, an integral float, a numeric string or an ISO-8601 date (UTC if naive)."""
    if isinstance(value, bool):
        raise ValueError(f"expected a timestamp, got {value!r}")
    if isinstance(value, int):
        return value
    if isinstance(value, float):
        if value != value or value in (float("inf"), float("-inf")):
            raise ValueError(f"expected a finite timestamp, got {value!r}")
        return int(value)
    if isinstance(value, datetime):
        moment = value if value.tzinfo else value.replace(tzinfo=timezone.utc)
        return int(moment.timestamp())
    text = str(value).strip()
    try:
        return int(text)
    except ValueError:
        pass
    try:
        number = float(text)
        if number == number and abs(number) != float("inf"):
            return int(number)
    except ValueError:
        pass
    try:
        return _parse_timestamp(datetime.fromisoformat(text))
    except ValueError:
        raise ValueError(f"expected an integer unix timestamp (seconds) or an ISO-8601 date, got {text!r}") from None


def _parse_rating(value: Any) -> float:
    try:
        return float(value)
    except (TypeError, ValueError):
        raise ValueError(f"expected a numeric rating, got {value!r}") from None


@dataclass
class _Events:
    """Events of one user while reading: parallel lists (timestamps/ratings stay None when absent)."""

    items: list[str]
    timestamps: list[int] | None
    ratings: list[float] | None


class _Collector:
    """Groups (user, item, timestamp, rating) events per user, users in order of first appearance."""

    def __init__(self, path: Path, has_time: bool, has_rating: bool):
        self.path = path
        self.has_time = has_time
        self.has_rating = has_rating
        self.users: dict[str, _Events] = {}
        self.last_user: str | None = None  # user of the last line (the one a truncated file cuts)
        self.num_events = 0

    def add(self, user: str, item: str, timestamp: int | None, rating: float | None) -> None:
        events = self.users.get(user)
        if events is None:
            events = _Events([], [] if self.has_time else None, [] if self.has_rating else None)
            self.users[user] = events
        events.items.append(item)
        if events.timestamps is not None:
            events.timestamps.append(timestamp)
        if events.ratings is not None:
            events.ratings.append(rating)
        self.last_user = user
        self.num_events += 1


def _movielens_layout(path: Path, first_line: str) -> tuple[str, str, bool]:
    """(separator, description, has_header) of a MovieLens ratings file, from its first line."""
    if "::" in first_line:  # ml-1m, ml-10m ratings.dat
        return "::", "4 '::'-separated fields user::item::rating::timestamp", False
    if "\t" in first_line:  # ml-100k u.data
        return "\t", "4 tab-separated fields user item rating timestamp", False
    if first_line.replace(" ", "").lower().startswith("userid,movieid,rating,timestamp"):  # ml-latest, 20m, 25m
        return ",", "4 comma-separated fields userId,movieId,rating,timestamp", True
    raise DataFormatError(
        path,
        1,
        "not a MovieLens ratings file: expected u.data lines (user<TAB>item<TAB>rating<TAB>timestamp), "
        "ratings.dat lines (user::item::rating::timestamp) or a ratings.csv header "
        f"(userId,movieId,rating,timestamp); got {first_line[:80]!r}",
    )


def _read_movielens(path: Path) -> _Collector:
    collector = _Collector(path, has_time=True, has_rating=True)
    layout = None
    for lineno, line in _iter_lines(path):
        if layout is None:
            layout = _movielens_layout(path, line)
            if layout[2]:
                continue
        sep, expected, _ = layout
        fields = line.split(sep)
        if len(fields) != 4:
            raise DataFormatError(path, lineno, f"expected {expected}, got {len(fields)}")
        user, item, rating, timestamp = (field.strip() for field in fields)
        if not user or not item:
            raise DataFormatError(path, lineno, f"expected {expected}, got an empty user or item id")
        try:
            collector.add(user, item, _parse_timestamp(timestamp), _parse_rating(rating))
        except ValueError as err:
            raise DataFormatError(path, lineno, str(err)) from None
    return collector


def _read_sequences(path: Path) -> _Collector:
    collector = _Collector(path, has_time=False, has_rating=False)
    seen: dict[str, int] = {}
    for lineno, line in _iter_lines(path):
        fields = line.split()
        if len(fields) < 2:
            raise DataFormatError(
                path, lineno, "expected a user id followed by at least one item id (`user i1 i2 ...`), got 1 field"
            )
        user = fields[0]
        if user in seen:
            raise DataFormatError(
                path, lineno, f"user {user!r} already has a line (line {seen[user]}); expected one line per user"
            )
        seen[user] = lineno
        for item in fields[1:]:
            collector.add(user, item, None, None)
    return collector


def _read_pairs(path: Path) -> _Collector:
    collector = _Collector(path, has_time=False, has_rating=False)
    for lineno, line in _iter_lines(path):
        fields = line.split()
        if len(fields) != 2:
            raise DataFormatError(
                path, lineno, f"expected 2 whitespace-separated fields `user item`, got {len(fields)}"
            )
        collector.add(fields[0], fields[1], None, None)
    return collector


def _resolve_column(
    path: Path, line: int | None, columns: Sequence[str], wanted: str | None, candidates: Sequence[str], role: str
) -> str | None:
    """The column to read for `role`: the one named by the caller, else the first known name present."""
    if wanted is not None:
        if wanted not in columns:
            raise DataFormatError(
                path, line, f"no {role} column {wanted!r}; the columns are: {', '.join(map(repr, columns))}"
            )
        return wanted
    for name in candidates:
        if name in columns:
            return name
    lowered = {c.lower(): c for c in columns}
    for name in candidates:
        if name.lower() in lowered:
            return lowered[name.lower()]
    return None


@dataclass
class _Columns:
    user: str
    item: str
    time: str | None
    rating: str | None


def _pick_columns(
    path: Path,
    line: int | None,
    columns: Sequence[str],
    user_col: str | None,
    item_col: str | None,
    time_col: str | None,
    rating_col: str | None,
) -> _Columns:
    user = _resolve_column(path, line, columns, user_col, _USER_COLUMNS, "user")
    item = _resolve_column(path, line, columns, item_col, _ITEM_COLUMNS, "item")
    for role, name, option in (("user", user, "user_col"), ("item", item, "item_col")):
        if name is None:
            raise DataFormatError(
                path,
                line,
                f"cannot tell which column holds the {role} id (columns: {', '.join(map(repr, columns))}); "
                f"name it with {option}= (--{option.replace('_', '-')})",
            )
    time = _resolve_column(path, line, columns, time_col, _TIME_COLUMNS, "timestamp")
    rating = _resolve_column(path, line, columns, rating_col, _RATING_COLUMNS, "rating")
    return _Columns(user, item, time, rating)


def _add_record(collector: _Collector, cols: _Columns, get: Callable[[str], Any], where: str) -> None:
    """Add one table record; `get(column)` returns its value, `where` names the record in messages."""
    user, item = get(cols.user), get(cols.item)
    if user is None or item is None or str(user).strip() == "" or str(item).strip() == "":
        missing = cols.user if user is None or str(user).strip() == "" else cols.item
        raise ValueError(f"{where}: empty value in column {missing!r}")
    try:
        timestamp = _parse_timestamp(get(cols.time)) if cols.time else None
    except ValueError as err:
        raise ValueError(f"{where}: column {cols.time!r}: {err}") from None
    try:
        rating = _parse_rating(get(cols.rating)) if cols.rating else None
    except ValueError as err:
        raise ValueError(f"{where}: column {cols.rating!r}: {err}") from None
    item = str(item).strip()
    if len(item.split()) != 1:  # histories are whitespace-joined strings in the tokenizer and the pipeline
        raise ValueError(f"{where}: item id {item!r} in column {cols.item!r} contains whitespace")
    collector.add(str(user).strip(), item, timestamp, rating)


def _read_delimited(path: Path, delimiter: str, **column_options: str | None) -> _Collector:
    """csv/tsv with a header row; quoted fields are handled by the csv module."""
    name = "comma" if delimiter == "," else "tab"
    lines = _iter_lines(path)
    try:
        header_line, header_text = next(lines)
    except StopIteration:
        raise DataFormatError(path, None, "file is empty: expected a header row and interaction rows") from None
    header = [c.strip() for c in next(csv.reader([header_text], delimiter=delimiter))]
    cols = _pick_columns(path, header_line, header, **column_options)
    collector = _Collector(path, has_time=cols.time is not None, has_rating=cols.rating is not None)
    index = {c: i for i, c in enumerate(header)}
    for lineno, text in lines:
        row = next(csv.reader([text], delimiter=delimiter))
        if len(row) != len(header):
            raise DataFormatError(
                path,
                lineno,
                f"expected {len(header)} {name}-separated fields ({delimiter.join(header)!r}), got {len(row)}",
            )
        try:
            _add_record(collector, cols, lambda c, row=row: row[index[c]], "row")
        except ValueError as err:
            raise DataFormatError(path, lineno, str(err).removeprefix("row: ")) from None
    return collector


def _read_jsonl(path: Path, **column_options: str | None) -> _Collector:
    collector: _Collector | None = None
    cols: _Columns | None = None
    for lineno, text in _iter_lines(path):
        try:
            record = json.loads(text)
        except json.JSONDecodeError as err:
            raise DataFormatError(path, lineno, f"expected one JSON object per line ({err.msg})") from None
        if not isinstance(record, dict):
            raise DataFormatError(path, lineno, f"expected a JSON object, got {type(record).__name__}")
        if cols is None:
            cols = _pick_columns(path, lineno, list(record), **column_options)
            collector = _Collector(path, has_time=cols.time is not None, has_rating=cols.rating is not None)
        for column in (cols.user, cols.item, cols.time, cols.rating):
            if column is not None and column not in record:
                raise DataFormatError(path, lineno, f"expected key {column!r} (as in the first record)")
        try:
            _add_record(collector, cols, record.get, "record")
        except ValueError as err:
            raise DataFormatError(path, lineno, str(err).removeprefix("record: ")) from None
    if collector is None:
        raise DataFormatError(path, None, "file is empty: expected one JSON object per interaction")
    return collector


def _read_parquet(path: Path, **column_options: str | None) -> _Collector:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        with _open_binary(path) as handle:
            table = pq.read_table(pa.BufferReader(handle.read()))
    except (pa.ArrowInvalid, OSError) as err:
        raise DataFormatError(path, None, f"not a readable parquet file ({err})") from None
    cols = _pick_columns(path, None, table.column_names, **column_options)
    for column in (cols.time,):
        if column is not None and pa.types.is_timestamp(table.schema.field(column).type):
            table = table.set_column(
                table.column_names.index(column), column, table[column].cast(pa.timestamp("s")).cast(pa.int64())
            )
    data = {c: table[c].to_pylist() for c in {cols.user, cols.item, cols.time, cols.rating} if c is not None}
    collector = _Collector(path, has_time=cols.time is not None, has_rating=cols.rating is not None)
    for row in range(table.num_rows):
        try:
            _add_record(collector, cols, lambda c, row=row: data[c][row], "row")
        except ValueError as err:
            raise DataFormatError(path, row + 1, f"(row {row + 1}) {str(err).removeprefix('row: ')}") from None
    return collector


_MOVIELENS_NAMES = ("u.data", "ratings.dat", "ratings.csv", "ratings.dat.gz", "ratings.csv.gz")


def _detect_format(path: Path) -> str:
    """Guess the format from the file name, then from the first lines (pass `format=` to be explicit)."""
    name = path.name.lower().removesuffix(".gz")
    if name.endswith(".parquet") or name.endswith(".pq"):
        return "parquet"
    if name.endswith(".jsonl") or name.endswith(".ndjson") or name.endswith(".json"):
        return "jsonl"
    first_lines = []
    for _, text in _iter_lines(path):
        first_lines.append(text)
        if len(first_lines) >= 200:
            break
    if not first_lines:
        raise DataFormatError(path, None, "file is empty: no interactions to read")
    first = first_lines[0]
    if name in _MOVIELENS_NAMES or name.startswith("ratings") or name.endswith(".dat"):
        if "::" in first or "\t" in first or first.replace(" ", "").lower().startswith("userid,movieid"):
            return "movielens"
    if name.endswith(".csv"):
        return "csv"
    if name.endswith(".tsv"):
        return "tsv"
    if "::" in first:
        return "movielens"
    fields = [text.split() for text in first_lines]
    if all(len(f) == 2 for f in fields) and len({f[0] for f in fields}) < len(fields):
        return "pairs"  # `user item` lines with repeated users
    return "sequences"


def _find_ratings_file(directory: Path) -> Path:
    for name in _MOVIELENS_NAMES:
        if (directory / name).is_file():
            return directory / name
    raise FileNotFoundError(
        f"{directory} is a directory without a ratings file; expected one of {', '.join(_MOVIELENS_NAMES)}"
    )


def _read(path: Path, format: str, column_options: dict[str, str | None]) -> _Collector:
    if format == "movielens":
        return _read_movielens(path)
    if format == "sequences":
        return _read_sequences(path)
    if format == "pairs":
        return _read_pairs(path)
    if format == "csv":
        return _read_delimited(path, ",", **column_options)
    if format == "tsv":
        return _read_delimited(path, "\t", **column_options)
    if format == "jsonl":
        return _read_jsonl(path, **column_options)
    if format == "parquet":
        return _read_parquet(path, **column_options)
    raise ValueError(f"unknown format {format!r}; choose one of {', '.join(FORMATS)}")


# --------------------------------------------------------------------------------------------------------
# From events to one row per user
# --------------------------------------------------------------------------------------------------------


def sequence_features(with_timestamps: bool) -> datasets.Features:
    """The features of a sequences dataset (see docs/CONTRACT.md)."""
    features = {"user_id": datasets.Value("string"), "item_ids": datasets.List(datasets.Value("string"))}
    if with_timestamps:
        features["timestamps"] = datasets.List(datasets.Value("int64"))
    return datasets.Features(features)


def _stable_sort_by_time(events: _Events) -> None:
    times = events.timestamps
    if times is None or all(a <= b for a, b in zip(times, times[1:])):
        return
    order = sorted(range(len(times)), key=times.__getitem__)  # Python's sort is stable: ties keep file order
    events.items = [events.items[i] for i in order]
    events.timestamps = [times[i] for i in order]
    if events.ratings is not None:
        events.ratings = [events.ratings[i] for i in order]


def _keep(events: _Events, keep: Sequence[bool]) -> _Events:
    def pick(values):
        return None if values is None else [v for v, k in zip(values, keep) if k]

    return _Events(pick(events.items), pick(events.timestamps), pick(events.ratings))


def _k_core(users: dict[str, _Events], k: int) -> dict[str, _Events]:
    """Iteratively drop items and users with fewer than k events until every one left has at least k."""
    while True:
        item_counts = Counter(item for events in users.values() for item in events.items)
        changed = False
        kept: dict[str, _Events] = {}
        for user, events in users.items():
            mask = [item_counts[item] >= k for item in events.items]
            if not all(mask):
                events = _keep(events, mask)
                changed = True
            if len(events.items) >= k:
                kept[user] = events
            else:
                changed = True
        users = kept
        if not changed:
            return users


def load_sequences(
    path: str | os.PathLike,
    format: str = "auto",
    *,
    user_col: str | None = None,
    item_col: str | None = None,
    time_col: str | None = None,
    rating_col: str | None = None,
    min_rating: float | None = None,
    k_core: int | None = None,
    drop_consecutive_repeats: bool = False,
    drop_last_user: bool = False,
    max_users: int | None = None,
    drop_last_events: int = 0,
) -> datasets.Dataset:
    """Read an interaction file into one row per user: `user_id`, `item_ids` (+ `timestamps` when known).

    Args:
        path: A file (optionally gzipped), a MovieLens folder (u.data / ratings.dat / ratings.csv inside),
            or the name of a public MovieLens set (`"ml-1m"`, see `MOVIELENS`), downloaded on first use.
        format: One of `FORMATS`; `"auto"` guesses from the name and the first lines.
        user_col, item_col, time_col, rating_col: Columns of csv/tsv/parquet/jsonl files (default: common
            names such as `user_id`/`userId`, `item_id`/`movieId`, `timestamp`, `rating`).
        min_rating: Keep only events rated at least this (needs a rating column).
        k_core: Iteratively keep only users and items with at least k events.
        drop_consecutive_repeats: Collapse runs of the same item in a user's history into its first event.
        drop_last_user: Drop the user of the file's last line: for files truncated in the middle of a user,
            such as ml-1m-partial/ratings.first487650.dat.gz (user 2999 is cut; users 1-2998 are complete).
        max_users: Keep the first N users in order of first appearance (quick experiments).
        drop_last_events: Drop each user's last N events, after every other filter. A leave-one-out split of
            the result is the protocol's split "as of N events earlier": with N = 1 its test target is the
            real validation item, so choices that depend on the test/validation gap can be studied without
            ever looking at the real test items.

    Users keep the order of their first appearance in the file; each user's events are sorted by timestamp
    with a stable sort (files without timestamps are taken to be in time order already). Filters run in the
    order: user selection, minimum rating, time sort, consecutive repeats, k-core.
    """
    path = Path(path)
    if not path.exists() and str(path) in MOVIELENS:  # a public set by name: "ml-1m"
        path = download_movielens(str(path))
        format = "movielens" if format == "auto" else format
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such file or directory")
    if path.is_dir():
        path = _find_ratings_file(path)
        format = "movielens" if format == "auto" else format
    if format not in FORMATS:
        raise ValueError(f"unknown format {format!r}; choose one of {', '.join(FORMATS)}")
    if format == "auto":
        format = _detect_format(path)
    column_options = {"user_col": user_col, "item_col": item_col, "time_col": time_col, "rating_col": rating_col}
    if format in ("movielens", "sequences", "pairs") and any(v is not None for v in column_options.values()):
        raise ValueError(f"column options only apply to csv/tsv/parquet/jsonl, not to format {format!r}")
    collector = _read(path, format, column_options)
    users = collector.users
    if not users:
        raise DataFormatError(path, None, f"file is empty: no interactions found (read as {format!r})")
    num_events = collector.num_events
    report = [f"{num_events} events of {len(users)} users"]

    if drop_last_user and collector.last_user is not None:
        users = {u: e for u, e in users.items() if u != collector.last_user}
        report.append(f"dropped the last user {collector.last_user!r} (drop_last_user)")
    if max_users is not None:
        users = dict(list(users.items())[:max_users])
    if min_rating is not None:
        if not collector.has_rating:
            raise ValueError(f"{path}: min_rating={min_rating} needs ratings, but the file has no rating column")
        users = {u: _keep(e, [r >= min_rating for r in e.ratings]) for u, e in users.items()}
        users = {u: e for u, e in users.items() if e.items}
    for events in users.values():
        _stable_sort_by_time(events)
    if drop_consecutive_repeats:
        for user, events in users.items():
            items = events.items
            users[user] = _keep(events, [i == 0 or items[i] != items[i - 1] for i in range(len(items))])
    if k_core is not None and k_core > 1:
        users = _k_core(users, k_core)
    if drop_last_events:
        if isinstance(drop_last_events, bool) or not isinstance(drop_last_events, int) or drop_last_events < 0:
            raise ValueError(f"drop_last_events must be a non-negative integer, got {drop_last_events!r}")
        kept = {
            u: _keep(e, [i < len(e.items) - drop_last_events for i in range(len(e.items))]) for u, e in users.items()
        }
        users = {u: e for u, e in kept.items() if e.items}
        report.append(f"dropped each user's last {drop_last_events} events (drop_last_events)")
    kept_events = sum(len(e.items) for e in users.values())
    if kept_events < num_events:
        report.append(f"kept {kept_events} events of {len(users)} users after filtering")
    logger.info("%s (%s): %s", path, format, "; ".join(report))
    if not users:
        raise ValueError(f"{path}: no users left after filtering ({'; '.join(report)})")

    columns: dict[str, list] = {
        "user_id": list(users),
        "item_ids": [e.items for e in users.values()],
    }
    if collector.has_time:
        columns["timestamps"] = [e.timestamps for e in users.values()]
    return datasets.Dataset.from_dict(columns, features=sequence_features(collector.has_time))


def build_item_vocab(sequences: Iterable[Sequence[str]], num_special_tokens: int = 2) -> dict[str, int]:
    """Map raw item ids to integer ids (first appearance order, starting after the special tokens).

    The same id layout as `ItemTokenizer` ([PAD]=0, [UNK]=1, items from 2), for code that needs a catalog
    without a tokenizer (baselines, the evaluator on plain mappings).
    """
    vocab: dict[str, int] = {}
    for sequence in sequences:
        for item in sequence:
            if item not in vocab:
                vocab[item] = len(vocab) + num_special_tokens
    return vocab


# --------------------------------------------------------------------------------------------------------
# Splits
# --------------------------------------------------------------------------------------------------------


def _rows(ds: datasets.Dataset) -> tuple[list[str], list[list[str]], list[list[int]] | None]:
    for column in ("user_id", "item_ids"):
        if column not in ds.column_names:
            raise ValueError(f"expected a sequences dataset with column {column!r}, got {ds.column_names}")
    times = ds["timestamps"] if "timestamps" in ds.column_names else None
    return list(ds["user_id"]), list(ds["item_ids"]), None if times is None else list(times)


def _split_features(with_timestamps: bool, with_target: bool) -> datasets.Features:
    features = sequence_features(with_timestamps)
    if with_target:
        features["target"] = datasets.Value("string")
        if with_timestamps:
            features["target_timestamp"] = datasets.Value("int64")
    return features


def _build_split(rows: list[dict[str, Any]], with_timestamps: bool, with_target: bool) -> datasets.Dataset:
    features = _split_features(with_timestamps, with_target)
    columns = {name: [row[name] for row in rows] for name in features}
    return datasets.Dataset.from_dict(columns, features=features)


def leave_one_out_split(ds: datasets.Dataset, min_events: int = 3) -> datasets.DatasetDict:
    """Leave-one-out split (the benchmark protocol): last event = test target, second-to-last = validation.

    - `train`: each user's history without the last two events (`user_id`, `item_ids`, `timestamps`).
    - `validation`: input = all but the last two events, `target` = the second-to-last item.
    - `test`: input = all but the last event (validation item included), `target` = the last item.
    With timestamps, evaluation rows also get `target_timestamp` (the time of the request).
    Users with fewer than `min_events` (>= 3) events cannot be split this way: they are left out of every
    split and their number is logged as a warning.
    """
    if min_events < 3:
        raise ValueError(
            f"min_events must be >= 3 (one training event, a validation and a test target), got {min_events}"
        )
    users, items, times = _rows(ds)
    has_time = times is not None
    train, validation, test = [], [], []
    too_short = 0
    for index, (user, history) in enumerate(zip(users, items)):
        if len(history) < min_events:
            too_short += 1
            continue
        stamps = times[index] if has_time else None
        train.append({"user_id": user, "item_ids": history[:-2], "timestamps": stamps[:-2] if has_time else None})
        validation.append(
            {
                "user_id": user,
                "item_ids": history[:-2],
                "timestamps": stamps[:-2] if has_time else None,
                "target": history[-2],
                "target_timestamp": stamps[-2] if has_time else None,
            }
        )
        test.append(
            {
                "user_id": user,
                "item_ids": history[:-1],
                "timestamps": stamps[:-1] if has_time else None,
                "target": history[-1],
                "target_timestamp": stamps[-1] if has_time else None,
            }
        )
    if too_short:
        logger.warning(
            "leave_one_out_split: %d of %d users have fewer than %d events and are left out of every split",
            too_short,
            len(users),
            min_events,
        )
    if not test:
        raise ValueError(f"no user has at least {min_events} events: nothing to split ({len(users)} users)")
    return datasets.DatasetDict(
        train=_build_split(train, has_time, with_target=False),
        validation=_build_split(validation, has_time, with_target=True),
        test=_build_split(test, has_time, with_target=True),
    )


def _to_seconds(moment: int | float | str | datetime) -> int:
    try:
        return _parse_timestamp(moment)
    except ValueError as err:
        raise ValueError(f"cutoff: {err}") from None


def temporal_split(
    ds: datasets.Dataset,
    cutoff: int | str | datetime,
    validation_cutoff: int | str | datetime | None = None,
) -> datasets.DatasetDict:
    """Global temporal split: nothing at or after the cutoff is trained on (the realistic protocol).

    - `train`: every user's events before `validation_cutoff` if given, else before `cutoff`.
    - `test`: users with events both before and at/after `cutoff`; input = their events before `cutoff`,
      `target` = their first event at or after `cutoff` (`target_timestamp` = its time).
    - `validation` (only with `validation_cutoff` < `cutoff`): input = events before `validation_cutoff`,
      target = the first event in [`validation_cutoff`, `cutoff`).
    Cutoffs are unix seconds, or ISO dates (UTC when no zone is given). Users without history before a
    cutoff (cold start) cannot be evaluated: their number is logged.
    """
    if "timestamps" not in ds.column_names:
        raise ValueError("temporal_split needs timestamps; this dataset has none (use leave_one_out_split)")
    end = _to_seconds(cutoff)
    start = end if validation_cutoff is None else _to_seconds(validation_cutoff)
    if start > end:
        raise ValueError(f"validation_cutoff ({start}) must not be after cutoff ({end})")
    users, items, times = _rows(ds)
    splits: dict[str, list[dict[str, Any]]] = {"train": [], "validation": [], "test": []}
    cold = {"validation": 0, "test": 0}

    def target_row(user, history, stamps, lower, upper, name):
        before = sum(1 for t in stamps if t < lower)  # events are time-sorted
        after = [i for i, t in enumerate(stamps) if lower <= t < upper]
        if not after:
            return
        if before == 0:
            cold[name] += 1
            return
        first = after[0]
        splits[name].append(
            {
                "user_id": user,
                "item_ids": history[:before],
                "timestamps": stamps[:before],
                "target": history[first],
                "target_timestamp": stamps[first],
            }
        )

    for user, history, stamps in zip(users, items, times):
        if any(b < a for a, b in zip(stamps, stamps[1:])):
            raise ValueError(f"user {user!r}: events are not sorted by time; load them with load_sequences")
        num_train = sum(1 for t in stamps if t < start)
        if num_train:
            splits["train"].append({"user_id": user, "item_ids": history[:num_train], "timestamps": stamps[:num_train]})
        if validation_cutoff is not None:
            target_row(user, history, stamps, start, end, "validation")
        target_row(user, history, stamps, end, float("inf"), "test")
    for name, count in cold.items():
        if count:
            logger.warning("temporal_split: %d users have %s events but no history before the cutoff", count, name)
    result = {
        "train": _build_split(splits["train"], True, with_target=False),
        "test": _build_split(splits["test"], True, with_target=True),
    }
    if validation_cutoff is not None:
        result["validation"] = _build_split(splits["validation"], True, with_target=True)
        result = {k: result[k] for k in ("train", "validation", "test")}
    return datasets.DatasetDict(result)


# --------------------------------------------------------------------------------------------------------
# Training batches
# --------------------------------------------------------------------------------------------------------


def sliding_windows(ds: datasets.Dataset, max_length: int, stride: int | None = None) -> datasets.Dataset:
    """Cut histories longer than `max_length` into several training rows, so old events are trained on too.

    Windows end at the last event, then every `stride` events earlier; the earliest one starts at the first
    event. The default stride, `max_length - 1`, makes consecutive windows share one event, so every
    next-item target is trained on exactly once. Other columns of the same length as `item_ids` (such as
    `timestamps`) are cut the same way; scalar columns are copied.
    """
    if max_length < 2:
        raise ValueError(f"max_length must be >= 2 to hold an input and a target, got {max_length}")
    stride = max_length - 1 if stride is None else stride
    if not 1 <= stride <= max_length - 1:
        raise ValueError(f"stride must be in [1, max_length - 1] = [1, {max_length - 1}], got {stride}")

    def expand(batch: dict[str, list]) -> dict[str, list]:
        out: dict[str, list] = {name: [] for name in batch}
        for row in range(len(batch["item_ids"])):
            length = len(batch["item_ids"][row])
            windows = []
            end = length
            while True:
                begin = max(0, end - max_length)
                windows.append((begin, end))
                if begin == 0:
                    break
                end -= stride
            for begin, end in windows:
                for name, values in batch.items():
                    value = values[row]
                    sliced = isinstance(value, list) and len(value) == length
                    out[name].append(value[begin:end] if sliced else value)
        return out

    return ds.map(expand, batched=True, desc="sliding windows")


def prefix_rows(ds: datasets.Dataset, max_length: int) -> datasets.Dataset:
    """Every prefix of every history as its own training row: `item_ids` = the (at most `max_length`) events
    before event k, `target` = event k, for k = 1 .. len - 1 (BSARec/FMLP-Rec/ICSRec's training samples).

    With the collator, such rows train only the last position, which is where evaluation and serving read the
    user state, and positions counted from the end (`position_embedding_type="from_end"`) then mean the
    same in training as at serving time. `timestamps` are cut the same way, the target's time becomes
    `target_timestamp` (the request time at evaluation); other scalar columns are copied.
    """
    if max_length < 1:
        raise ValueError(f"max_length must be >= 1, got {max_length}")

    def expand(batch: dict[str, list]) -> dict[str, list]:
        with_time = "timestamps" in batch
        out: dict[str, list] = {name: [] for name in batch}
        out["target"] = []
        if with_time:
            out["target_timestamp"] = []
        for row in range(len(batch["item_ids"])):
            items = batch["item_ids"][row]
            for k in range(1, len(items)):
                begin = max(0, k - max_length)
                for name, values in batch.items():
                    value = values[row]
                    sliced = isinstance(value, list) and len(value) == len(items)
                    out[name].append(value[begin:k] if sliced else value)
                out["target"].append(items[k])
                if with_time:
                    out["target_timestamp"].append(batch["timestamps"][row][k])
        return out

    return ds.map(expand, batched=True, remove_columns=ds.column_names, desc="prefix rows")


class LengthGroupedSampler(torch.utils.data.Sampler[int]):
    """Random order in which each run of `batch_size` indices has similar lengths (little padding).

    As `transformers`' sampler of that name: shuffle, cut into mega-batches of `mega_batches` batches, sort
    each by length; then the batches themselves are shuffled (the last, partial one stays last, so a
    DataLoader with the same `batch_size` cuts exactly these batches). Prefix rows range from 1 to
    `max_length` events: random batches would pad nearly every row to the longest, ~7x the encoder work
    on Beauty. The order depends only on (seed, epoch): `set_epoch` (Accelerate calls it) makes a resumed
    run see the batches an uninterrupted one would.
    """

    def __init__(self, lengths: Sequence[int], batch_size: int, seed: int = 0, mega_batches: int = 50):
        if batch_size < 1 or mega_batches < 1:
            raise ValueError(f"batch_size and mega_batches must be >= 1, got {batch_size} and {mega_batches}")
        self.lengths = torch.as_tensor(list(lengths), dtype=torch.long)
        self.batch_size = batch_size
        self.seed = seed
        self.mega_batches = mega_batches
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.lengths)

    def __iter__(self) -> Iterator[int]:
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        order = torch.randperm(len(self.lengths), generator=generator)
        mega = self.batch_size * self.mega_batches
        groups = []
        for start in range(0, len(order), mega):
            group = order[start : start + mega]
            groups.append(group[torch.argsort(self.lengths[group], descending=True, stable=True)])
        batches = list(torch.cat(groups).split(self.batch_size)) if groups else []
        full = [b for b in batches if len(b) == self.batch_size]
        rest = [b for b in batches if len(b) < self.batch_size]
        shuffled = [full[i] for i in torch.randperm(len(full), generator=generator).tolist()] + rest
        return iter(torch.cat(shuffled).tolist() if shuffled else [])


def _pad_left(sequences: Sequence[Sequence[int]], pad_value: int, width: int) -> torch.Tensor:
    """(B, width) long tensor, each row right-aligned (most recent value last)."""
    rows = [[pad_value] * (width - len(values)) + list(values) for values in sequences]
    return torch.tensor(rows, dtype=torch.long).view(len(sequences), width)


def pad_histories(
    id_lists: Sequence[Sequence[int]],
    pad_token_id: int,
    max_length: int | None = None,
    timestamps: Sequence[Sequence[int]] | None = None,
    pad_to_multiple_of: int | None = None,
) -> dict[str, torch.Tensor]:
    """Truncate to the most recent `max_length` ids and pad on the LEFT to the longest row.

    Returns `input_ids`, `attention_mask` and `timestamps` (padding repeats each row's first time, as the
    tokenizer does, so padded time gaps are zero). Shared by the training collator and the evaluator.
    """
    if max_length is not None:
        id_lists = [ids[-max_length:] if len(ids) > max_length else ids for ids in id_lists]
        if timestamps is not None:
            timestamps = [t[-max_length:] if len(t) > max_length else t for t in timestamps]
    width = max(1, max((len(ids) for ids in id_lists), default=1))
    if pad_to_multiple_of:
        width = -(-width // pad_to_multiple_of) * pad_to_multiple_of
    batch = {
        "input_ids": _pad_left(id_lists, pad_token_id, width),
    }
    lengths = torch.tensor([len(ids) for ids in id_lists])
    batch["attention_mask"] = (torch.arange(width)[None, :] >= (width - lengths)[:, None]).long()
    if timestamps is not None:
        padded = []
        for ids, times in zip(id_lists, timestamps):
            if len(times) != len(ids):
                raise ValueError(f"a history has {len(ids)} items but {len(times)} timestamps")
            first = times[0] if len(times) else 0
            padded.append([first] * (width - len(times)) + list(times))
        batch["timestamps"] = torch.tensor(padded, dtype=torch.long).view(len(id_lists), width)
    return batch


@dataclass
class SeqRecCollator:
    """Turn sequence rows into a training batch with next-item targets at every position (or, for rows with
    a `target`, such as `prefix_rows`, one target after the last position: `labels` is then (B,)).

    Rows carry `item_ids` (raw ids, converted with `tokenizer.convert_items_to_ids`) or already-tokenized
    `input_ids`, and optionally `timestamps`. Keeps the most recent `max_length` events, pads on the LEFT
    to the longest row in the batch (dynamic padding: no work on padding beyond that) and returns tensors
    `input_ids`, `attention_mask`, `labels` (= input_ids with -100 on padding and special tokens; the model
    shifts them by one) and `timestamps` when every row has them. With `transformers.Trainer`, set
    `remove_unused_columns=False` so `item_ids` reaches the collator.
    """

    tokenizer: Any
    max_length: int | None = None
    pad_to_multiple_of: int | None = None

    def __call__(self, features: Sequence[Mapping[str, Any]]) -> dict[str, torch.Tensor]:
        if not features:
            raise ValueError("SeqRecCollator got an empty batch")
        if all("input_ids" in f for f in features):
            id_lists = [list(f["input_ids"]) for f in features]
        else:
            lengths = [len(f["item_ids"]) for f in features]
            flat = self.tokenizer.convert_items_to_ids([item for f in features for item in f["item_ids"]])
            id_lists, offset = [], 0
            for length in lengths:
                id_lists.append(flat[offset : offset + length])
                offset += length
        has_time = [f.get("timestamps") is not None for f in features]
        if any(has_time) and not all(has_time):
            raise ValueError("some rows of the batch have timestamps and others do not")
        timestamps = [list(f["timestamps"]) for f in features] if all(has_time) else None
        batch = pad_histories(
            id_lists,
            self.tokenizer.pad_token_id,
            max_length=self.max_length,
            timestamps=timestamps,
            pad_to_multiple_of=self.pad_to_multiple_of,
        )
        num_special = getattr(self.tokenizer, "num_special_tokens", 2)
        with_target = ["target" in f for f in features]
        if any(with_target) and not all(with_target):
            raise ValueError("some rows of the batch have a `target` (prefix rows) and others do not")
        if all(with_target):  # prefix rows: one target, after the last event
            targets = [f["target"] for f in features]
            if not all("input_ids" in f for f in features):  # raw ids, like the inputs
                targets = self.tokenizer.convert_items_to_ids(targets)
            labels = torch.tensor(targets, dtype=torch.long)
            if all(f.get("target_timestamp") is not None for f in features) and "timestamps" in batch:
                batch["query_timestamps"] = torch.tensor([f["target_timestamp"] for f in features], dtype=torch.long)
        else:
            labels = batch["input_ids"].clone()
        labels[labels < num_special] = -100  # padding and [UNK] are never targets
        batch["labels"] = labels
        if all("row_index" in f for f in features):  # distillation finds its precomputed targets by row
            batch["row_index"] = torch.tensor([f["row_index"] for f in features], dtype=torch.long)
        return batch


# --------------------------------------------------------------------------------------------------------
# Public MovieLens downloads
# --------------------------------------------------------------------------------------------------------

# md5 of the zips published by GroupLens (https://files.grouplens.org/datasets/movielens/<name>.zip.md5).
MOVIELENS = {
    "ml-100k": ("u.data", "0e33842e24a9c977be4e0107933c0723"),
    "ml-1m": ("ratings.dat", "c4d9eecfca2ab87c1945afe126590906"),
    "ml-10m": ("ratings.dat", "ce571fd55effeba0271552578f2648bd"),
    "ml-20m": ("ratings.csv", "cd245b17a1ae2cc31bb14903e1204af3"),
    "ml-25m": ("ratings.csv", "6b51fb2759a8657d3bfcbfc42b592ada"),
    "ml-latest-small": ("ratings.csv", None),  # "latest" snapshots change: no pinned checksum
}
_MOVIELENS_URL = "https://files.grouplens.org/datasets/movielens/{name}.zip"


def default_cache_dir() -> Path:
    """Where downloads go: $SEQREC_CACHE, else ~/.cache/seqrec_hf."""
    return Path(os.environ.get("SEQREC_CACHE", Path.home() / ".cache" / "seqrec_hf"))


def download_movielens(name: str, cache_dir: str | os.PathLike | None = None) -> Path:
    """Path of a MovieLens ratings file, downloading and checking the GroupLens zip on first use.

    Offline, raises `FileNotFoundError` naming the file to place by hand and where. The data is under the
    GroupLens research-use license: see https://grouplens.org/datasets/movielens/.
    """
    if name not in MOVIELENS:
        raise ValueError(f"unknown MovieLens set {name!r}; choose one of {', '.join(MOVIELENS)}")
    ratings_name, md5 = MOVIELENS[name]
    folder = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    target = folder / name / ratings_name
    if target.is_file():
        return target
    url = _MOVIELENS_URL.format(name=name)
    folder.mkdir(parents=True, exist_ok=True)
    archive = folder / f"{name}.zip"
    try:
        if not archive.is_file():
            partial = archive.with_suffix(".zip.part")
            with urllib.request.urlopen(url, timeout=60) as response, open(partial, "wb") as out:
                shutil.copyfileobj(response, out)
            partial.replace(archive)
    except (urllib.error.URLError, TimeoutError, OSError) as err:
        raise FileNotFoundError(
            f"could not download {url} ({err}). Offline? Download {name}.zip elsewhere and place it at "
            f"{archive}, or place its {ratings_name} at {target}"
        ) from None
    if md5 is not None:
        digest = hashlib.md5(archive.read_bytes()).hexdigest()
        if digest != md5:
            raise ValueError(f"{archive}: md5 {digest} != expected {md5}; delete the file and download again")
    with zipfile.ZipFile(archive) as zipped:
        member = next((m for m in zipped.namelist() if m.endswith("/" + ratings_name)), None)
        if member is None:
            raise DataFormatError(archive, None, f"no {ratings_name} inside the archive")
        target.parent.mkdir(parents=True, exist_ok=True)
        with zipped.open(member) as source, open(target, "wb") as out:
            shutil.copyfileobj(source, out)
    return target


__all__ = [
    "FORMATS",
    "MOVIELENS",
    "DataFormatError",
    "SeqRecCollator",
    "build_item_vocab",
    "download_movielens",
    "leave_one_out_split",
    "load_sequences",
    "pad_histories",
    "sequence_features",
    "sliding_windows",
    "temporal_split",
]
