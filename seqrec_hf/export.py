"""Export a trained model for serving with `torch.export`: a self-contained program, no Python model code.

The exported program maps a left-padded batch `(input_ids, attention_mask[, timestamps, query_timestamps])` to

- the user vector, i.e. the last position's hidden state (B, hidden_size), when `top_k=None`: score it against
  the item table in your own index (ANN, a vector database), or
- the top-k `(item_ids, scores)` (B, k) over the catalog, exactly as `model.recommend()` returns them (special
  tokens never returned, history excluded), the catalog scored `chunk_size` items at a time so memory stays
  O(batch x chunk) however large the catalog.

Batch size and history length are dynamic. The program is saved as one `.pt2` file (`torch.export.save`) with
the facts a runner needs (time-aware or not, top-k, vocabulary size) stored inside it, and loaded back as a
`ServingProgram` that checks inputs as the eager model does:

    program = export_for_serving(model, **tokenizer(["i1 i2", "i3"], return_tensors="pt"), top_k=10)
    save_serving_program(program, "model.pt2")
    ids, scores = load_serving_program("model.pt2")(**batch)
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .modeling_seqrec import SeqRecForNextItemPrediction

_META_FILE = "seqrec_serving.json"
_MIN_POSITIONS = 3


class SeqRecServingModule(nn.Module):
    """What gets exported: the Transformer up to the user vector, then (optionally) a chunked top-k.

    The top-k follows `SeqRecForNextItemPrediction.recommend()` step by step (same chunks, same running top-k,
    same exclusions) but marks history items with a scatter instead of `nonzero()`, whose data-dependent
    output shape `torch.export` cannot trace.
    """

    def __init__(
        self,
        model: SeqRecForNextItemPrediction,
        top_k: int | None = None,
        chunk_size: int | None = None,
        exclude_history: bool = True,
    ):
        super().__init__()
        self.model = model
        self.top_k = top_k
        self.chunk_size = chunk_size or model.config.recommend_chunk_size
        self.exclude_history = exclude_history
        self.time_aware = bool(model.config.uses_timestamps)
        # An item graph is fixed after training: bake the smoothed table in once, instead of a sparse product
        # in every call of the program.
        table = None
        if model.model.item_graph is not None:
            with torch.no_grad():
                table = model.model.item_table(model.item_head.weight).detach().clone()
        self.register_buffer("table", table)

    def user_vectors(self, input_ids, attention_mask, timestamps=None, query_timestamps=None) -> torch.Tensor:
        tied = self.table is not None and self.model.config.tie_word_embeddings
        hidden = self.model.model(
            input_ids,
            attention_mask=attention_mask,
            timestamps=timestamps,
            query_timestamps=query_timestamps,
            item_table=self.table if tied else None,
        ).last_hidden_state
        return self.model.score_users(hidden[:, -1])  # (B, d): left padding puts the latest event last

    def forward(self, input_ids, attention_mask, timestamps=None, query_timestamps=None):
        user_state = self.user_vectors(input_ids, attention_mask, timestamps, query_timestamps)
        if self.top_k is None:
            return user_state
        weight = self.model.score_table(self.model.item_head.weight if self.table is None else self.table)
        vocab_size = weight.shape[0]
        first = self.model.config.num_special_tokens
        history = input_ids.masked_fill(attention_mask == 0, -1)  # (B, T); padding never matches an item
        prior = dense = None
        if self.model.transition_prior is not None:
            index, value = self.model.transition_prior(input_ids, attention_mask)
            prior = index[:, -1], value[:, -1].float()
            dense = self.model.transition_prior.dense(vocab_size)
        best_scores = best_ids = None
        for start in range(first, vocab_size, self.chunk_size):  # a static loop: unrolled in the program
            end = min(start + self.chunk_size, vocab_size)
            width = end - start
            scores = (user_state @ weight[start:end].t()).float()  # (B, width)
            if prior is not None:  # sparse transition scores inside this chunk; the rest to a spare column
                local = prior[0] - start
                inside = (local >= 0) & (local < width)
                spare = F.pad(scores, (0, 1)).scatter_add(1, torch.where(inside, local, width), prior[1] * inside)
                scores = spare[:, :width]
            if dense is not None:  # recent popularity: the same for every user
                scores = scores + dense[start:end]
            if self.exclude_history:
                local = history - start
                local = torch.where((local >= 0) & (local < width), local, width)  # out of chunk -> spare column
                seen = torch.zeros(scores.shape[0], width + 1, dtype=torch.bool, device=scores.device)
                seen = seen.scatter(1, local, True)[:, :width]
                scores = scores.masked_fill(seen, float("-inf"))
            chunk_scores, chunk_ids = scores.topk(min(self.top_k, width), dim=-1)
            chunk_ids = chunk_ids + start
            if best_scores is None:
                best_scores, best_ids = chunk_scores, chunk_ids
            else:
                best_scores = torch.cat([best_scores, chunk_scores], dim=1)
                best_ids = torch.cat([best_ids, chunk_ids], dim=1)
                best_scores, order = best_scores.topk(self.top_k, dim=-1)
                best_ids = best_ids.gather(1, order)
        best_ids = best_ids.masked_fill(torch.isneginf(best_scores), -1)
        return best_ids, best_scores


@dataclass
class ServingProgram:
    """An exported serving program plus what is needed to call it safely; call it like the eager model.

    Attributes:
        program: the `torch.export.ExportedProgram`.
        time_aware: the model uses timestamps (`config.uses_timestamps`).
        top_k: number of items returned, or None when the program returns user vectors.
        vocab_size, num_special_tokens, pad_token_id, max_position_embeddings: copied from the model config.
    """

    program: torch.export.ExportedProgram
    time_aware: bool
    top_k: int | None
    vocab_size: int
    num_special_tokens: int
    pad_token_id: int
    max_position_embeddings: int

    def __post_init__(self) -> None:
        self._module = self.program.module()  # build the callable graph module once, not per call

    def metadata(self) -> dict:
        """The JSON-serialisable facts saved next to the program."""
        return {
            "time_aware": self.time_aware,
            "top_k": self.top_k,
            "vocab_size": self.vocab_size,
            "num_special_tokens": self.num_special_tokens,
            "pad_token_id": self.pad_token_id,
            "max_position_embeddings": self.max_position_embeddings,
        }

    def __call__(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        timestamps: torch.Tensor | None = None,
        query_timestamps: torch.Tensor | None = None,
    ):
        """User vectors (B, d), or `(item_ids, scores)` (B, top_k); inputs as for the eager model."""
        inputs = _serving_inputs(
            input_ids, attention_mask, timestamps, query_timestamps, self.time_aware, self.pad_token_id
        )
        _check_values(inputs, self.vocab_size, self.max_position_embeddings)
        with torch.no_grad():
            return self._module(*inputs)


def _serving_inputs(input_ids, attention_mask, timestamps, query_timestamps, time_aware: bool, pad_token_id: int):
    """The positional inputs of the program: time-blind (ids, mask), time-aware (ids, mask, times, query times)."""
    if input_ids.dim() != 2 or input_ids.shape[1] == 0:
        raise ValueError(f"input_ids must be a non-empty (batch, seq_len) tensor, got shape {tuple(input_ids.shape)}")
    if attention_mask is None:
        attention_mask = (input_ids != pad_token_id).long()
    if attention_mask.shape != input_ids.shape:
        raise ValueError(f"attention_mask shape {tuple(attention_mask.shape)} != input_ids {tuple(input_ids.shape)}")
    input_ids, attention_mask = input_ids.long(), attention_mask.long()
    if time_aware:
        if timestamps is None:
            raise ValueError("this model uses time (config.uses_timestamps): pass `timestamps`")
        if timestamps.shape != input_ids.shape:
            raise ValueError(f"timestamps shape {tuple(timestamps.shape)} != input_ids shape {tuple(input_ids.shape)}")
        if query_timestamps is None:  # the eager model's default: the time of the latest event
            query_timestamps = timestamps[:, -1]
        timestamps, query_timestamps = timestamps.long(), query_timestamps.long().view(-1)
    # The traced time-gap code holds for histories of 3+ positions only (torch.export adds the guard
    # seq_len - 1 != 1 on `torch.cat([t[:, 1:], ...])`): pad shorter batches on the left, which changes no
    # output (positions count from the first real event and padding keys are masked).
    missing = _MIN_POSITIONS - input_ids.shape[1]
    if missing > 0:
        input_ids = F.pad(input_ids, (missing, 0), value=pad_token_id)
        attention_mask = F.pad(attention_mask, (missing, 0), value=0)
        if time_aware:
            timestamps = torch.cat([timestamps[:, :1].expand(-1, missing), timestamps], dim=1)
    if not time_aware:
        return input_ids, attention_mask
    return input_ids, attention_mask, timestamps, query_timestamps


def _check_values(inputs, vocab_size: int, max_positions: int) -> None:
    """The value checks the eager model makes (skipped inside the exported graph, which cannot raise)."""
    input_ids, attention_mask = inputs[0], inputs[1]
    low, high = int(input_ids.min()), int(input_ids.max())
    if low < 0 or high >= vocab_size:
        raise ValueError(f"input_ids must lie in [0, vocab_size={vocab_size}), got values in [{low}, {high}]")
    longest = int(attention_mask.sum(-1).max())
    if longest > max_positions:
        raise ValueError(f"a history has {longest} items but max_position_embeddings={max_positions}")


def export_for_serving(
    model: SeqRecForNextItemPrediction,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    timestamps: torch.Tensor | None = None,
    query_timestamps: torch.Tensor | None = None,
    *,
    top_k: int | None = None,
    chunk_size: int | None = None,
    exclude_history: bool = True,
) -> ServingProgram:
    """Export `model` with `torch.export` (batch size and history length dynamic) for serving.

    Args:
        model: a `SeqRecForNextItemPrediction` (put in eval mode here; weights are copied into the program).
        input_ids, attention_mask, timestamps, query_timestamps: an example batch, e.g. the tokenizer's output
            Use at least two rows: a batch of one is specialised while tracing.
        top_k: return the top-k `(item_ids, scores)` as `recommend()` does; None returns user vectors, to be
            scored against `model.item_table()` (graph-smoothed, unit length with `score_norm`) in an ANN
            index; a transition prior is then not applied (it needs the history, which the index never sees).
        chunk_size: catalog items scored at once (default `config.recommend_chunk_size`).
        exclude_history: never recommend items of the input history (as `recommend()`).
    """
    config = model.config
    if top_k is not None and not 1 <= top_k <= config.vocab_size - config.num_special_tokens:
        raise ValueError(f"top_k must be in [1, number of items = {config.vocab_size - config.num_special_tokens}]")
    model.eval()
    module = SeqRecServingModule(model, top_k=top_k, chunk_size=chunk_size, exclude_history=exclude_history).eval()
    inputs = _serving_inputs(
        input_ids, attention_mask, timestamps, query_timestamps, module.time_aware, config.pad_token_id
    )
    _check_values(inputs, config.vocab_size, config.max_position_embeddings)
    if inputs[0].shape[0] == 1:  # a batch of one would be specialised to one: trace with two rows
        inputs = tuple(torch.cat([value, value]) for value in inputs)
    batch, seq = torch.export.Dim.DYNAMIC, torch.export.Dim.DYNAMIC
    dynamic_shapes = ({0: batch, 1: seq}, {0: batch, 1: seq})
    if module.time_aware:
        dynamic_shapes += ({0: batch, 1: seq}, {0: batch})
    with torch.no_grad():
        program = torch.export.export(module, inputs, dynamic_shapes=dynamic_shapes, strict=False)
    return ServingProgram(
        program=program,
        time_aware=module.time_aware,
        top_k=top_k,
        vocab_size=config.vocab_size,
        num_special_tokens=config.num_special_tokens,
        pad_token_id=config.pad_token_id,
        max_position_embeddings=config.max_position_embeddings,
    )


def save_serving_program(program: ServingProgram, path: str | os.PathLike) -> None:
    """Write the program and its metadata to one `.pt2` file."""
    torch.export.save(program.program, path, extra_files={_META_FILE: json.dumps(program.metadata())})


def load_serving_program(path: str | os.PathLike) -> ServingProgram:
    """Read a program written by `save_serving_program`; no seqrec_hf model code runs when it is called."""
    extra_files = {_META_FILE: ""}
    program = torch.export.load(path, extra_files=extra_files)
    return ServingProgram(program=program, **json.loads(extra_files[_META_FILE]))


__all__ = [
    "SeqRecServingModule",
    "ServingProgram",
    "export_for_serving",
    "load_serving_program",
    "save_serving_program",
]
