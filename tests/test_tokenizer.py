"""ItemTokenizer: encode/decode, left truncation and padding, unknown items, persistence."""

import logging

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from transformers import AutoTokenizer

from seqrec_hf import ItemTokenizer, SeqRecConfig

item_ids = st.text(
    alphabet=st.characters(blacklist_categories=("Cs", "Zs", "Zl", "Zp", "Cc")), min_size=1, max_size=12
).filter(lambda s: s.split() == [s] and s not in ("[PAD]", "[UNK]"))
catalogs = st.lists(item_ids, min_size=1, max_size=40, unique=True)


@settings(max_examples=60, deadline=None)
@given(catalog=catalogs, data=st.data())
def test_encode_decode_round_trip(catalog, data):
    tokenizer = ItemTokenizer.from_items(catalog)
    history = data.draw(st.lists(st.sampled_from(catalog), min_size=1, max_size=30))
    encoded = tokenizer(history, is_split_into_words=True)
    assert all(i >= tokenizer.num_special_tokens for i in encoded["input_ids"])
    assert tokenizer.convert_ids_to_items(encoded["input_ids"]) == history


@settings(max_examples=60, deadline=None)
@given(catalog=catalogs, data=st.data())
def test_truncation_keeps_most_recent_and_pads_left(catalog, data):
    tokenizer = ItemTokenizer.from_items(catalog)
    histories = data.draw(st.lists(st.lists(st.sampled_from(catalog), min_size=1, max_size=25), min_size=1, max_size=5))
    max_length = data.draw(st.integers(1, 12))
    times = [list(range(100, 100 + len(h))) for h in histories]
    enc = tokenizer(histories, timestamps=times, max_length=max_length)
    width = max(min(len(h), max_length) for h in histories)
    for row, history in enumerate(histories):
        kept = history[-max_length:]
        ids, mask = enc["input_ids"][row], enc["attention_mask"][row]
        assert len(ids) == width
        pad = width - len(kept)
        assert mask == [0] * pad + [1] * len(kept)
        assert ids[:pad] == [tokenizer.pad_token_id] * pad
        assert tokenizer.convert_ids_to_items(ids[pad:]) == kept
        assert enc["timestamps"][row][pad:] == times[row][-max_length:]


def test_input_forms(tokenizer):
    one = tokenizer("i1 i2 i3")
    assert one["input_ids"] == tokenizer(["i1", "i2", "i3"], is_split_into_words=True)["input_ids"]
    batch = tokenizer(["i1 i2 i3", "i4"], return_tensors="pt")
    assert batch["input_ids"].shape == (2, 3)
    assert batch["input_ids"][1].tolist() == [0, 0, tokenizer.convert_items_to_ids(["i4"])[0]]
    lists = tokenizer([["i1", "i2", "i3"], ["i4"]], return_tensors="pt")
    assert torch.equal(lists["input_ids"], batch["input_ids"])
    ints = ItemTokenizer.from_items([10, 20, 30])
    assert ints([10, 30])["input_ids"] == [2, 4]  # ints are kept as strings "10", "30"
    assert ints.convert_ids_to_items([2, 4]) == ["10", "30"]
    fixed = tokenizer(["i1"], padding="max_length", max_length=4)
    assert fixed["attention_mask"] == [[0, 0, 0, 1]]


def test_unknown_items_warn_and_strict_raises(tokenizer, caplog):
    with caplog.at_level(logging.WARNING):
        enc = tokenizer(["i1 nope i2 nada"])
    assert enc["input_ids"][0][1] == tokenizer.unk_token_id
    assert "2 unknown item(s)" in caplog.text
    with pytest.raises(ValueError, match="'nope'"):
        tokenizer(["i1 nope"], strict=True)


def test_empty_history_and_bad_timestamps(tokenizer):
    with pytest.raises(ValueError, match="empty"):
        tokenizer("")
    with pytest.raises(ValueError, match="empty"):
        tokenizer([["i1"], []])
    with pytest.raises(ValueError, match="2 items but 1 timestamps"):
        tokenizer([["i1", "i2"]], timestamps=[[5]])
    with pytest.raises(ValueError, match="integers"):
        tokenizer([["i1"]], timestamps=[["soon"]])


def test_bad_item_ids():
    with pytest.raises(ValueError, match="special token"):
        ItemTokenizer.from_items(["a", "[PAD]"])
    with pytest.raises(ValueError, match="whitespace"):
        ItemTokenizer.from_items(["a b"])


def test_add_items_grows_vocabulary(tokenizer):
    size = len(tokenizer)
    assert tokenizer.add_items(["i1", "new1", "new2", "new1"]) == 2
    assert len(tokenizer) == size + 2
    ids = tokenizer.convert_items_to_ids(["new1", "new2"], strict=True)
    assert ids == [size, size + 1]
    assert tokenizer.convert_ids_to_items(ids) == ["new1", "new2"]


def test_save_load_and_auto_tokenizer(tokenizer, tmp_path):
    tokenizer.add_items(["x9"])
    tokenizer.save_pretrained(tmp_path)
    SeqRecConfig(vocab_size=len(tokenizer)).save_pretrained(tmp_path)
    for loaded in (ItemTokenizer.from_pretrained(tmp_path), AutoTokenizer.from_pretrained(tmp_path)):
        assert isinstance(loaded, ItemTokenizer)
        assert loaded.get_vocab() == tokenizer.get_vocab()
        assert loaded(["i3 x9 i1"])["input_ids"] == tokenizer(["i3 x9 i1"])["input_ids"]
        assert loaded.padding_side == "left"


def test_corrupt_vocab_file_is_a_clear_error(tmp_path):
    bad = tmp_path / "vocab.json"
    bad.write_text('{"[PAD]": 0, "[UNK]": 1, "a": 5}')
    with pytest.raises(ValueError, match="vocab.json"):
        ItemTokenizer(vocab_file=str(bad))
    bad.write_text("not json")
    with pytest.raises(ValueError, match="vocab.json"):
        ItemTokenizer(vocab_file=str(bad))
