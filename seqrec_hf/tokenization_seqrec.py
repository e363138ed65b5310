"""Item tokenizer: maps a user's raw item ids (strings) to model ids and back.

Items are whole tokens (no sub-word splitting). Histories are truncated from the LEFT (the most recent
`max_length` events are kept) and padded on the LEFT, so the latest event is always the last position.
This file is copied next to the weights for `trust_remote_code=True` loads: it imports only transformers.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Iterable, Sequence
from typing import Any

from transformers import BatchEncoding, PreTrainedTokenizer

logger = logging.getLogger(__name__)

VOCAB_FILES_NAMES = {"vocab_file": "vocab.json"}
PAD_TOKEN = "[PAD]"
UNK_TOKEN = "[UNK]"
SPECIAL_TOKENS = (PAD_TOKEN, UNK_TOKEN)  # ids 0 and 1, in this order

_NO_LIMIT = 10**6  # transformers' "no model_max_length" sentinel is ~1e30; anything this large means none


def _is_history(value: Any) -> bool:
    return isinstance(value, (list, tuple)) and all(isinstance(v, (str, int)) for v in value)


class ItemTokenizer(PreTrainedTokenizer):
    """Tokenizer for a catalog of items: `[PAD]`=0, `[UNK]`=1, then one id per raw item id.

    Build one with `ItemTokenizer.from_items(catalog)`; save and load it like any HF tokenizer.
    """

    vocab_files_names = VOCAB_FILES_NAMES
    model_input_names = ["input_ids", "attention_mask", "timestamps"]

    def __init__(
        self,
        vocab_file: str | None = None,
        items: Iterable[str | int] | None = None,
        pad_token: str = PAD_TOKEN,
        unk_token: str = UNK_TOKEN,
        padding_side: str = "left",
        truncation_side: str = "left",
        **kwargs,
    ):
        if (vocab_file is None) == (items is None):
            raise ValueError("ItemTokenizer needs exactly one of `vocab_file` (a vocab.json) or `items`")
        if vocab_file is not None:
            self.item_to_id = self._read_vocab(vocab_file)
        else:
            self.item_to_id = {PAD_TOKEN: 0, UNK_TOKEN: 1}
            self._add_new_items(items)
        self.id_to_item = [None] * len(self.item_to_id)
        for item, index in self.item_to_id.items():
            self.id_to_item[index] = item
        if padding_side != "left" or truncation_side != "left":
            raise ValueError("ItemTokenizer pads and truncates on the left: the latest event must stay last")
        super().__init__(
            pad_token=pad_token,
            unk_token=unk_token,
            padding_side=padding_side,
            truncation_side=truncation_side,
            **kwargs,
        )

    @staticmethod
    def _read_vocab(vocab_file: str) -> dict[str, int]:
        try:
            with open(vocab_file, encoding="utf-8") as handle:
                vocab = json.load(handle)
        except json.JSONDecodeError as err:
            raise ValueError(f"{vocab_file}: not a valid JSON vocabulary ({err})") from err
        if not isinstance(vocab, dict) or not all(isinstance(v, int) for v in vocab.values()):
            raise ValueError(f"{vocab_file}: expected a JSON object mapping item id (str) -> index (int)")
        if sorted(vocab.values()) != list(range(len(vocab))):
            raise ValueError(f"{vocab_file}: indices must be 0..{len(vocab) - 1} without gaps or repeats")
        for index, token in enumerate(SPECIAL_TOKENS):
            if vocab.get(token) != index:
                raise ValueError(f"{vocab_file}: expected special token {token!r} at index {index}")
        return vocab

    def _add_new_items(self, items: Iterable[str | int]) -> int:
        added = 0
        for item in items:
            if not isinstance(item, (str, int)) or isinstance(item, bool):
                raise ValueError(f"item ids must be str or int, got {type(item).__name__}: {item!r}")
            key = str(item)
            if key in SPECIAL_TOKENS:
                raise ValueError(f"item id {key!r} collides with a special token")
            if not key or key.split() != [key]:
                raise ValueError(f"item id {key!r} must be non-empty and contain no whitespace")
            if key not in self.item_to_id:
                self.item_to_id[key] = len(self.item_to_id)
                added += 1
        return added

    @classmethod
    def from_items(cls, items: Iterable[str | int], **kwargs) -> ItemTokenizer:
        """Build a tokenizer from raw item ids (str or int, kept as strings; first occurrence fixes the id)."""
        return cls(items=list(items), **kwargs)

    def add_items(self, items: Iterable[str | int]) -> int:
        """Grow the vocabulary with new items (fine-tuning on new data); returns how many were new.

        Resize the model afterwards: `model.resize_token_embeddings(len(tokenizer))`.
        """
        added = self._add_new_items(items)
        self.id_to_item.extend([None] * added)
        for item, index in self.item_to_id.items():
            if index >= len(self.id_to_item) - added:
                self.id_to_item[index] = item
        self._update_total_vocab_size()
        return added

    # --- the PreTrainedTokenizer contract -------------------------------------------------------------
    @property
    def vocab_size(self) -> int:
        return len(self.item_to_id)

    @property
    def num_special_tokens(self) -> int:
        """Ids below this are special tokens (padding, unknown)."""
        return len(SPECIAL_TOKENS)

    def get_vocab(self) -> dict[str, int]:
        return dict(self.item_to_id)

    def _tokenize(self, text: str, **kwargs) -> list[str]:
        return text.split()

    def _convert_token_to_id(self, token: str) -> int:
        return self.item_to_id.get(token, self.unk_token_id)

    def _convert_id_to_token(self, index: int) -> str:
        return self.id_to_item[index]

    def convert_tokens_to_string(self, tokens: list[str]) -> str:
        return " ".join(tokens)

    def save_vocabulary(self, save_directory: str, filename_prefix: str | None = None) -> tuple[str]:
        name = (filename_prefix + "-" if filename_prefix else "") + VOCAB_FILES_NAMES["vocab_file"]
        path = os.path.join(save_directory, name)
        with open(path, "w", encoding="utf-8") as handle:
            json.dump(self.item_to_id, handle, ensure_ascii=False, indent=0)
        return (path,)

    # --- items <-> ids ---------------------------------------------------------------------------------
    def convert_items_to_ids(self, items: Iterable[str | int], strict: bool = False) -> list[int]:
        """Map raw item ids to model ids; unknown items become `[UNK]` (or raise with `strict=True`)."""
        ids, unknown = self._lookup(items, strict)
        if unknown:
            logger.warning("%d unknown item(s) mapped to %s (first: %r)", len(unknown), UNK_TOKEN, unknown[0])
        return ids

    def _lookup(self, items: Iterable[str | int], strict: bool) -> tuple[list[int], list[str]]:
        unk = self.unk_token_id
        ids, unknown = [], []
        for item in items:
            index = self.item_to_id.get(str(item))
            if index is None or index < self.num_special_tokens:
                if strict:
                    raise ValueError(f"unknown item {str(item)!r}: not in the tokenizer's vocabulary")
                unknown.append(str(item))
                index = unk
            ids.append(index)
        return ids, unknown

    def convert_ids_to_items(self, ids: Any) -> Any:
        """Map model ids (int, list, nested lists or a tensor) back to raw item ids (strings)."""
        if hasattr(ids, "tolist"):
            ids = ids.tolist()
        if isinstance(ids, int):
            return self.id_to_item[ids]
        return [self.convert_ids_to_items(i) for i in ids]

    # --- encoding --------------------------------------------------------------------------------------
    def __call__(
        self,
        histories: str | Sequence[str | int] | Sequence[str | Sequence[str | int]],
        timestamps: Sequence[int] | Sequence[Sequence[int]] | None = None,
        query_timestamps: int | Sequence[int] | None = None,
        max_length: int | None = None,
        padding: bool | str = "longest",
        truncation: bool = True,
        return_tensors: str | None = None,
        strict: bool = False,
        is_split_into_words: bool = False,
        **kwargs,
    ) -> BatchEncoding:
        """Encode one history or a batch of histories.

        A history is a whitespace-joined string or a list of raw item ids. As in transformers, a `str` is one
        history and a list of strings is a batch of histories, unless `is_split_into_words=True` (then a list of
        strings is ONE history of items); a list of ints is one history; a list of lists is a batch.
        `timestamps` mirrors the histories (int seconds per event). Keeps the most recent `max_length` events
        (default: `model_max_length`), pads on the left to the longest (`padding="max_length"`: to max_length).
        Returns `input_ids`, `attention_mask` (and `timestamps`, `query_timestamps` when given).
        """
        if kwargs:
            raise TypeError(f"ItemTokenizer got unexpected arguments: {sorted(kwargs)}")
        batch, is_batch = self._as_batch(histories, is_split_into_words)
        if not batch:
            raise ValueError("no histories to encode: got an empty batch")
        batch_times = None
        if timestamps is not None:
            batch_times = [list(timestamps)] if not is_batch else [list(t) for t in timestamps]
            if len(batch_times) != len(batch):
                raise ValueError(f"got {len(batch)} histories but {len(batch_times)} timestamp lists")
        if max_length is None and self.model_max_length < _NO_LIMIT:
            max_length = int(self.model_max_length)

        all_ids, all_times, unknown = [], [], []
        for row, history in enumerate(batch):
            if len(history) == 0:
                raise ValueError(f"history {row} is empty: a recommendation needs at least one past item")
            ids, missing = self._lookup(history, strict)
            unknown.extend(missing)
            times = None
            if batch_times is not None:
                times = batch_times[row]
                if len(times) != len(ids):
                    raise ValueError(f"history {row} has {len(ids)} items but {len(times)} timestamps")
                for t in times:
                    if isinstance(t, bool) or not isinstance(t, int):
                        raise ValueError(f"history {row}: timestamps must be integers (seconds), got {t!r}")
            if truncation and max_length is not None and len(ids) > max_length:
                ids = ids[-max_length:]  # keep the most recent events
                times = times[-max_length:] if times is not None else None
            all_ids.append(ids)
            all_times.append(times)
        if unknown:
            logger.warning("%d unknown item(s) mapped to %s (first: %r)", len(unknown), UNK_TOKEN, unknown[0])

        if padding is True or padding == "longest":
            width = max(len(ids) for ids in all_ids)
        elif padding == "max_length":
            if max_length is None:
                raise ValueError("padding='max_length' needs max_length")
            width = max_length
        elif padding is False or padding == "do_not_pad":
            width = None
        else:
            raise ValueError(f"padding must be True, False, 'longest' or 'max_length', got {padding!r}")

        encoded: dict[str, Any] = {"input_ids": [], "attention_mask": []}
        if batch_times is not None:
            encoded["timestamps"] = []
        for ids, times in zip(all_ids, all_times):
            pad = 0 if width is None else width - len(ids)
            encoded["input_ids"].append([self.pad_token_id] * pad + ids)
            encoded["attention_mask"].append([0] * pad + [1] * len(ids))
            if times is not None:
                encoded["timestamps"].append([times[0]] * pad + times)  # padding repeats the first time
        if query_timestamps is not None:
            queries = [query_timestamps] if not is_batch else list(query_timestamps)
            if len(queries) != len(batch):
                raise ValueError(f"got {len(batch)} histories but {len(queries)} query_timestamps")
            encoded["query_timestamps"] = queries
        if not is_batch:
            encoded = {key: value[0] for key, value in encoded.items()}
        return BatchEncoding(encoded, tensor_type=return_tensors)

    @staticmethod
    def _as_batch(histories: Any, is_split_into_words: bool) -> tuple[list[list[str | int]], bool]:
        if isinstance(histories, str):
            return [histories.split()], False
        if not isinstance(histories, (list, tuple)):
            raise ValueError(f"histories must be a string or a list, got {type(histories).__name__}")
        if is_split_into_words or (histories and all(isinstance(h, int) for h in histories)):
            return [list(histories)], False
        batch = []
        for row, history in enumerate(histories):
            if isinstance(history, str):
                batch.append(history.split())
            elif _is_history(history):
                batch.append(list(history))
            else:
                raise ValueError(f"history {row} must be a string or a list of item ids, got {history!r}")
        return batch, True


__all__ = ["ItemTokenizer"]
