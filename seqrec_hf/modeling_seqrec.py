"""SeqRec: a decoder-only Transformer that reads a user's time-ordered history and scores the next item.

SASRec-style architecture (item + learned position embeddings, pre- or post-norm causal blocks, output tied to the
item embeddings) with an optional HSTU-style relative attention bias from log-bucketed time gaps.

Conventions used everywhere in this file:
- Left padding: the most recent event is always at the last position, so `hidden[:, -1]` is the user state.
- Position ids count from each user's first real event (or back from the latest with `from_end`), so extra
  left padding changes nothing.
- Timestamps (int64 seconds) drive the time bias: the query at position i is the time of the event being
  predicted (t[i+1]; at the last position `query_timestamps` or, if absent, t[-1]); its keys are the times of
  the events it attends to. So the output at position i depends on items up to i and timestamps up to i+1.

This file is copied next to the weights by `save_pretrained` for `trust_remote_code=True` loads: it imports
only torch, transformers and the config file.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from safetensors import SafetensorError
from torch import nn
from torch.utils.checkpoint import checkpoint
from transformers import PreTrainedModel
from transformers import initialization as init
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
from transformers.utils import ModelOutput

from .configuration_seqrec import SeqRecConfig

_ACTIVATIONS = {"gelu": nn.GELU, "relu": nn.ReLU, "silu": nn.SiLU}


@dataclass
class SeqRecModelOutput(ModelOutput):
    """Output of the bare `SeqRecModel`.

    Args:
        last_hidden_state: (batch, seq_len, hidden_size) final hidden states (after the last LayerNorm).
        hidden_states: per-layer hidden states (embeddings first) when `output_hidden_states=True`.
        attentions: per-layer attention probabilities when `output_attentions=True` (eager attention only).
    """

    last_hidden_state: torch.FloatTensor | None = None
    hidden_states: tuple[torch.FloatTensor, ...] | None = None
    attentions: tuple[torch.FloatTensor, ...] | None = None


@dataclass
class NextItemPredictionOutput(ModelOutput):
    """Output of `SeqRecForNextItemPrediction`.

    Args:
        loss: mean next-item cross-entropy over the non-padding target positions (when `labels` is given).
        logits: (batch, kept_positions, vocab_size) item scores; `logits[:, -1]` scores the next item.
            Special-token columns are raw scores: `recommend()` and the evaluator mask them.
        last_hidden_state: (batch, seq_len, hidden_size) final hidden states.
        hidden_states: per-layer hidden states when `output_hidden_states=True`.
        attentions: per-layer attention probabilities when `output_attentions=True`.
    """

    loss: torch.FloatTensor | None = None
    logits: torch.FloatTensor | None = None
    last_hidden_state: torch.FloatTensor | None = None
    hidden_states: tuple[torch.FloatTensor, ...] | None = None
    attentions: tuple[torch.FloatTensor, ...] | None = None


def query_times(timestamps: torch.Tensor, query_timestamps: torch.Tensor | None) -> torch.Tensor:
    """(B, T) time of the event predicted at each position: t[i + 1], and the request time at the last one
    (`query_timestamps`, or the last event's own time when it is unknown)."""
    ts = timestamps.long()
    last_query = ts[:, -1:] if query_timestamps is None else query_timestamps.long().view(-1, 1)
    # roll + where, not cat([ts[:, 1:], last]): torch.export would guard seq_len - 1 != 1 on the cat
    is_last = torch.arange(ts.shape[1], device=ts.device) == ts.shape[1] - 1
    return torch.where(is_last, last_query, ts.roll(-1, dims=1))


def bucketize_gaps(gaps: torch.Tensor, num_buckets: int, base: float) -> torch.Tensor:
    """floor(log_base |gap|) clipped to [0, num_buckets); gaps under `base` seconds share bucket 0."""
    buckets = torch.floor(torch.log(gaps.abs().clamp(min=1).float()) / math.log(base)).long()
    return buckets.clamp(0, num_buckets - 1)


def time_gap_buckets(
    timestamps: torch.Tensor, query_timestamps: torch.Tensor | None, num_buckets: int, base: float
) -> torch.Tensor:
    """Log-bucketed gaps between each query time and each key event, as in HSTU.

    timestamps: (B, T) int64 seconds of the events. query_timestamps: (B,) time of the request (the event
    being predicted at the last position) or None. Returns (B, T, T) long bucket ids in [0, num_buckets).
    """
    queries = query_times(timestamps, query_timestamps)
    return bucketize_gaps(queries[:, :, None] - timestamps.long()[:, None, :], num_buckets, base)  # (B, T, T)


def eager_attention_forward(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float,
    dropout: float = 0.0,
    **kwargs,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Reference attention; `attention_mask` is an additive float mask (B, 1|H, T, T)."""
    attn_weights = torch.matmul(query, key.transpose(2, 3)) * scaling  # (B, H, T, T)
    if attention_mask is not None:
        attn_weights = attn_weights + attention_mask
    attn_weights = F.softmax(attn_weights, dim=-1, dtype=torch.float32).to(query.dtype)
    attn_weights = F.dropout(attn_weights, p=dropout, training=module.training)
    attn_output = torch.matmul(attn_weights, value).transpose(1, 2).contiguous()  # (B, T, H, hd)
    return attn_output, attn_weights


class SeqRecAttention(nn.Module):
    """Causal multi-head self-attention dispatched through the transformers attention interface."""

    def __init__(self, config: SeqRecConfig, layer_idx: int):
        super().__init__()
        self.config = config
        self.layer_idx = layer_idx
        self.num_heads = config.num_attention_heads
        self.head_dim = config.hidden_size // config.num_attention_heads
        self.scaling = self.head_dim**-0.5
        self.attention_dropout = config.attention_dropout
        self.is_causal = True
        self.qkv_proj = nn.Linear(config.hidden_size, 3 * config.hidden_size)
        self.o_proj = nn.Linear(config.hidden_size, config.hidden_size)

    def _attend(
        self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, attention_mask: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(B, H, T, hd) heads -> (B, T, H, hd) through the configured attention backend (eager, sdpa, ...)."""
        attention_interface = ALL_ATTENTION_FUNCTIONS.get_interface(
            self.config._attn_implementation, eager_attention_forward
        )
        return attention_interface(
            self,
            query,
            key,
            value,
            attention_mask.to(query.dtype),
            dropout=self.attention_dropout if self.training else 0.0,
            scaling=self.scaling,
        )

    def forward(
        self, hidden_states: torch.Tensor, attention_mask: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        batch, seq_len, _ = hidden_states.shape
        qkv = self.qkv_proj(hidden_states).view(batch, seq_len, 3, self.num_heads, self.head_dim)
        query, key, value = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # each (B, H, T, hd)
        attn_output, attn_weights = self._attend(query, key, value, attention_mask)
        attn_output = attn_output.reshape(batch, seq_len, -1)
        return self.o_proj(attn_output), attn_weights

    def forward_packed(
        self, hidden_states: torch.Tensor, attention_mask: torch.Tensor, packing: Packing
    ) -> torch.Tensor:
        """The same attention for real events only, (N, d) -> (N, d): the projections run on the N real
        events, only the (B, H, T, T) scores need the padded layout."""
        qkv = packing.pad(self.qkv_proj(hidden_states))  # (B, T, 3d), zeros at padding
        batch, seq_len, _ = qkv.shape
        query, key, value = qkv.view(batch, seq_len, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
        attn_output, _ = self._attend(query, key, value, attention_mask)
        return self.o_proj(packing.unpad(attn_output.reshape(batch, seq_len, -1)))


@dataclass
class Packing:
    """Where the real events of a left-padded (B, T) batch are: `index` into the flattened B * T positions.

    Training batches of short histories are mostly padding (Amazon: ~9 events per row of up to 50), and the
    position-wise layers (projections, feed-forward, norms, dropout) have no reason to run there: they run on
    the (N, d) real events, and only attention and the moving-average filter see the padded layout.
    """

    index: torch.Tensor  # (N,) positions of real events in the flattened batch
    batch: int
    seq_len: int

    @classmethod
    def from_mask(cls, valid: torch.Tensor) -> Packing:
        return cls(valid.flatten().nonzero().squeeze(1), valid.shape[0], valid.shape[1])

    def unpad(self, padded: torch.Tensor) -> torch.Tensor:
        """(B, T, ...) -> (N, ...)."""
        return padded.reshape(self.batch * self.seq_len, *padded.shape[2:]).index_select(0, self.index)

    def pad(self, packed: torch.Tensor) -> torch.Tensor:
        """(N, ...) -> (B, T, ...), zeros at padding."""
        out = packed.new_zeros(self.batch * self.seq_len, *packed.shape[1:]).index_copy(0, self.index, packed)
        return out.view(self.batch, self.seq_len, *packed.shape[1:])


class SeqRecMLP(nn.Module):
    """Position-wise feed-forward layer."""

    def __init__(self, config: SeqRecConfig):
        super().__init__()
        self.up_proj = nn.Linear(config.hidden_size, config.intermediate_size)
        self.act = _ACTIVATIONS[config.hidden_act]()
        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act(self.up_proj(hidden_states)))


class SeqRecTimeBias(nn.Module):
    """A learned per-head bias for each time-gap bucket (one table per layer, zero at init)."""

    def __init__(self, config: SeqRecConfig):
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(config.time_num_buckets, config.num_attention_heads))

    def forward(self, buckets: torch.Tensor) -> torch.Tensor:
        return F.embedding(buckets, self.weight).permute(0, 3, 1, 2)  # (B, T, T, H) -> (B, H, T, T)


class SeqRecPositionBias(nn.Module):
    """A learned per-head bias for each query-key distance in events (one table per layer, zero at init)."""

    def __init__(self, config: SeqRecConfig):
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(config.max_position_embeddings, config.num_attention_heads))

    def forward(self, seq_len: int, device: torch.device) -> torch.Tensor:
        index = torch.arange(seq_len, device=device)
        distance = (index[:, None] - index[None, :]).clamp(0, self.weight.shape[0] - 1)  # causal part only
        return F.embedding(distance, self.weight).permute(2, 0, 1)[None]  # (1, H, T, T)


class SeqRecTimeGapEmbedding(nn.Module):
    """Embedding of the bucketed gap between each event and the event it predicts, added to the input.

    Lets the model condition on how long after the last event the next one happens (a short gap: continue
    the session; a long one: something else), which attention biases alone capture only weakly. Zero at init.
    """

    def __init__(self, config: SeqRecConfig):
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(config.time_num_buckets, config.hidden_size))

    def forward(self, buckets: torch.Tensor) -> torch.Tensor:
        return F.embedding(buckets, self.weight)  # (B, T, d)


def causal_window_mean(hidden_states: torch.Tensor, valid: torch.Tensor, window: int) -> torch.Tensor:
    """Mean of each position's last `window` real events, itself included (0: all of them); padding ignored.

    Prefix sums make it O(T * d) and, because only real events count, left padding changes nothing.
    """
    weight = valid.to(torch.float32)[..., None]  # (B, T, 1)
    sums = (hidden_states.float() * weight).cumsum(1)
    counts = weight.cumsum(1)
    seq_len = hidden_states.shape[1]
    if window > 0:  # no test on seq_len: torch.export keeps the length dynamic (a longer window shifts in zeros)
        sums = sums - F.pad(sums, (0, 0, window, 0))[:, :seq_len]
        counts = counts - F.pad(counts, (0, 0, window, 0))[:, :seq_len]
    return (sums / counts.clamp(min=1.0)).to(hidden_states.dtype)


class SeqRecLowPassFilter(nn.Module):
    """low + beta^2 * (x - low), `low` a causal moving average: keeps the slow trend of the history and
    rescales what changes from event to event, per channel (beta = 1 at init: the identity)."""

    def __init__(self, config: SeqRecConfig):
        super().__init__()
        self.window = config.filter_window
        self.sqrt_beta = nn.Parameter(torch.ones(config.hidden_size))

    def forward(self, hidden_states: torch.Tensor, valid: torch.Tensor, packing: Packing | None = None) -> torch.Tensor:
        if packing is None:
            low = causal_window_mean(hidden_states, valid, self.window)
        else:  # (N, d) real events: the moving average runs along each padded row
            low = packing.unpad(causal_window_mean(packing.pad(hidden_states), valid, self.window))
        return low + self.sqrt_beta.square() * (hidden_states - low)


class SeqRecItemGraph(nn.Module):
    """Item embeddings smoothed over the item-item transition graph of the training data.

    E' = E + sum_k g_k * A^k E, where A is the symmetrically normalised count of "i then j" transitions
    (both directions; `build_item_graph`) and g_k a learned gain per hop (`item_graph_gain` at init). A rare
    item, trained as a target only a few times, then shares the representation of the items it is bought
    next to, and every user state that is near those items is near it too. The graph is stored as COO
    buffers (`index` (2, E), `value` (E,)) in the checkpoint; its size is `config.item_graph_edges`.
    """

    def __init__(self, config: SeqRecConfig):
        super().__init__()
        self.register_buffer("index", torch.zeros(2, config.item_graph_edges, dtype=torch.long))
        self.register_buffer("value", torch.zeros(config.item_graph_edges))
        self.gain = nn.Parameter(torch.full((config.item_graph_layers,), float(config.item_graph_gain)))

    def set_graph(self, index: torch.Tensor, value: torch.Tensor) -> None:
        """Load a graph from `build_item_graph`; its edge count must be the config's (it sized the buffers)."""
        if index.shape != self.index.shape or value.shape != self.value.shape:
            raise ValueError(
                f"the graph has {value.numel()} edges but config.item_graph_edges={self.value.numel()}:"
                " build the model from a config made with that edge count"
            )
        self.index.copy_(index)
        self.value.copy_(value)

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        vocab_size = weight.shape[0]
        keep = (self.index < vocab_size).all(0)  # a vocabulary cut after training drops its edges
        adjacency = torch.sparse_coo_tensor(
            self.index[:, keep],
            self.value[keep].float(),  # fp32 even in a model cast to bf16: sparse mm needs one dtype
            (vocab_size, vocab_size),
            is_coalesced=True,
            check_invariants=False,
        )  # built coalesced (sorted, unique) by `build_item_graph`
        with torch.autocast(weight.device.type, enabled=False):
            hop, out = weight.float(), weight.float()
            for gain in self.gain:
                hop = torch.sparse.mm(adjacency, hop)
                out = out + gain * hop
        return out.to(weight.dtype)


def build_item_graph(
    histories: list[list[int]], vocab_size: int, num_special: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """COO (index, value) of the symmetric transition graph: S_ij = #(i then j) + #(j then i) over consecutive
    events of `histories` (token ids; special ids and self-transitions skipped), normalised as
    D^-1/2 S D^-1/2 with D the row sums (LightGCN), so a hop averages neighbours without favouring hubs."""
    pairs = [(a, b) for ids in histories for a, b in zip(ids, ids[1:]) if a >= num_special and b >= num_special]
    pairs = [(a, b) for a, b in pairs if a != b]
    if not pairs:
        return torch.zeros(2, 0, dtype=torch.long), torch.zeros(0)
    both = torch.tensor(pairs, dtype=torch.long).t()
    both = torch.cat([both, both.flip(0)], dim=1)
    keys, counts = (both[0] * vocab_size + both[1]).unique(return_counts=True)
    rows, cols = keys // vocab_size, keys % vocab_size
    degree = torch.zeros(vocab_size).index_add_(0, rows, counts.float())
    value = counts.float() * degree[rows].rsqrt() * degree[cols].rsqrt()
    return torch.stack([rows, cols]), value


class SeqRecTransitionPrior(nn.Module):
    """Count-based transition scores added to the model's logits: score_j += sum_k w_k * log(1 + n_k(i_k, j)),
    where i_k is the event k steps before the current one and n_k(i, j) counts "i, then j k + 1 events later"
    in the training histories (the `size` most frequent successors of each item are kept; `build_transition_prior`).

    Exact co-purchase memory beside the network's generalisation, interpolated as n-gram models are with
    neural language models. By default the network trains alone and the weights w_k are fitted afterwards on
    held-out data (stacking; `evaluation.calibrate_transition_prior`): on its own training data the network
    is over-confident, so weights learned there would under-use the counts. With
    `config.transition_prior_in_loss` the prior is in the training loss instead and w_k are learned there;
    the count of the very transition being predicted is then left out (n - 1 at the target), so the prior is
    as informative in training as at serving time, where the next event was never counted.
    With `config.transition_prior_recent_window` one dense term more, the same for every user:
    w_pop * log(1 + n(j)), n(j) the times j is among the last events of a training history (recent popularity).
    The tables are buffers saved with the model.
    """

    def __init__(self, config: SeqRecConfig):
        super().__init__()
        lags, size = config.transition_prior_lags, config.transition_prior_size
        items = config.transition_prior_vocab_size or config.vocab_size  # fixed at training: resizing keeps it
        # tables 0..lags-1 read the event `table` steps back; the reverse table (last, optional) the current one
        self.lags = lags  # also the events a position's tables read: itself and lags - 1 before it
        tables = lags + int(config.transition_prior_reverse)
        self.register_buffer("index", torch.zeros(tables, items, size, dtype=torch.int32))
        self.register_buffer("value", torch.zeros(tables, items, size))
        # one weight per table, then (optional) the recent-popularity weight, which starts at 0 (init_weights)
        self.has_recent = config.transition_prior_recent_window > 0
        self.register_buffer("recent", torch.zeros(items) if self.has_recent else None)  # None: not saved
        self.weight = nn.Parameter(self.initial_weights(config))
        # Stacked (the default): the weights never reach the loss. A frozen parameter keeps them out of the
        # optimizer and out of DDP's gradient reduction, which fails on parameters without gradients.
        self.weight.requires_grad_(bool(config.transition_prior_in_loss))

    @staticmethod
    def initial_weights(config: SeqRecConfig) -> torch.Tensor:
        """`transition_prior_weight` for every table, 0 for the recent-popularity term: with it, the scores
        (and so training and early stopping) are those of the model without it until it is fitted."""
        tables = config.transition_prior_lags + int(config.transition_prior_reverse)
        weights = [float(config.transition_prior_weight)] * tables
        return torch.tensor(weights + [0.0] * int(config.transition_prior_recent_window > 0))

    def set_prior(self, index: torch.Tensor, value: torch.Tensor, recent: torch.Tensor | None = None) -> None:
        """Load tables from `build_transition_prior` (and, with a recent window, the log-counts of
        `build_recent_popularity`); their shape must be the config's (it sized the buffers)."""
        if index.shape != self.index.shape or value.shape != self.value.shape:
            raise ValueError(
                f"the prior tables have shape {tuple(index.shape)} but the config says {tuple(self.index.shape)}"
                " (transition_prior_lags + transition_prior_reverse, vocab_size, transition_prior_size)"
            )
        if (recent is not None) != self.has_recent or (recent is not None and recent.shape != self.recent.shape):
            got = None if recent is None else tuple(recent.shape)
            raise ValueError(
                f"recent-popularity log-counts of shape {got} given, but the config says "
                f"{tuple(self.recent.shape) if self.has_recent else None} (transition_prior_recent_window)"
            )
        self.index.copy_(index)
        self.value.copy_(value)
        if recent is not None:
            self.recent.copy_(recent)

    def dense(self, vocab_size: int, weighted: bool = True) -> torch.Tensor | None:
        """(vocab_size,) fp32 recent-popularity scores added for every user (None without the term); items
        beyond the counted vocabulary score 0. `weighted=False`: the raw log-counts."""
        if not self.has_recent:
            return None
        recent = F.pad(self.recent.float(), (0, vocab_size - self.recent.shape[0]))
        return self.weight[-1].float() * recent if weighted else recent

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        targets: torch.Tensor | None = None,
        weighted: bool = True,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(index, value), each (B, T, tables * size): the sparse scores of every position's next item.

        `targets` (B, T): the item each position is trained to predict (-100: none); its count is left out of
        the forward tables (the reverse table never counted it: it holds "target, then source" pairs).
        `weighted=False`: the raw log-counts, lag by lag (what calibration re-weights).
        """
        known = self.index.shape[1]  # items added after training have no counts: row 0 ([PAD]) is empty
        ids = torch.where(attention_mask.bool() & (input_ids < known), input_ids, 0)
        indices, values = [], []
        for lag in range(self.index.shape[0]):
            forward = lag < self.lags
            shift = lag if forward else 0
            source = F.pad(ids, (shift, 0))[:, : ids.shape[1]]  # the event `shift` steps before each position
            index = self.index[lag][source].long()  # (B, T, size)
            value = self.value[lag][source].float()  # fp32 in a bf16 model too: log-counts need the precision
            if targets is not None and forward:  # leave-one-out: this (source -> target) is not evidence
                hit = index == targets[..., None]
                value = torch.where(hit, torch.log1p((torch.expm1(value) - 1.0).clamp(min=0.0)), value)
            indices.append(index)
            values.append(self.weight[lag] * value if weighted else value)
        return torch.cat(indices, dim=-1), torch.cat(values, dim=-1)


def build_transition_prior(
    histories: list[list[int]], vocab_size: int, num_special: int, lags: int, size: int, reverse: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """(index, value), each (lags + reverse, vocab_size, size): for every item, its `size` most frequent
    successors `lag + 1` events later in `histories` (token ids; ties by id) and log(1 + count); with
    `reverse`, a last table of its most frequent direct predecessors. Unused slots point at [PAD] (id 0, never
    scored) with value 0."""
    index = torch.zeros(lags + int(reverse), vocab_size, size, dtype=torch.int32)
    value = torch.zeros(lags + int(reverse), vocab_size, size)
    for lag in range(lags):
        pairs = [(a, b) for ids in histories for a, b in zip(ids, ids[lag + 1 :]) if min(a, b) >= num_special]
        _fill_top_successors(index[lag], value[lag], pairs, vocab_size, size)
        if lag == 0 and reverse:  # the last table: the direct pairs keyed by the later event
            _fill_top_successors(index[-1], value[-1], [(b, a) for a, b in pairs], vocab_size, size)
    return index, value


def build_recent_popularity(histories: list[list[int]], vocab_size: int, num_special: int, window: int) -> torch.Tensor:
    """(vocab_size,) log(1 + n(j)), n(j) the times item j is among the last `window` events of a history."""
    counts = torch.zeros(vocab_size)
    recent = [i for ids in histories for i in ids[-window:] if i >= num_special]
    if recent:
        counts += torch.bincount(torch.tensor(recent, dtype=torch.long), minlength=vocab_size).float()
    return torch.log1p(counts)


def _fill_top_successors(index: torch.Tensor, value: torch.Tensor, pairs: list, vocab_size: int, size: int) -> None:
    """Write each source's `size` most frequent targets among `pairs` (source, target) and their log(1 + count)
    into one table, `index` and `value` each (vocab_size, size)."""
    if not pairs:
        return
    both = torch.tensor(pairs, dtype=torch.long)
    keys, counts = (both[:, 0] * vocab_size + both[:, 1]).unique(return_counts=True)
    order = torch.argsort(-counts, stable=True)  # most frequent first, ties by id (keys are sorted)
    order = order[torch.argsort(keys[order] // vocab_size, stable=True)]  # grouped by source
    keys, counts = keys[order], counts[order]
    source, target = keys // vocab_size, keys % vocab_size
    rank = torch.arange(len(keys)) - torch.searchsorted(source, source)  # position among the source's successors
    kept = rank < size
    index[source[kept], rank[kept]] = target[kept].int()
    value[source[kept], rank[kept]] = torch.log1p(counts[kept].float())


class SeqRecBlock(nn.Module):
    """Transformer block. Pre-norm: x + Attn(LN(x)), then x + MLP(LN(x)); post-norm: LN(x + Attn(x)), then
    LN(x + MLP(x)). With `filter_mix` > 0 the attention output is blended with a causal low-pass filter."""

    def __init__(self, config: SeqRecConfig, layer_idx: int):
        super().__init__()
        self.pre_norm = config.norm_style == "pre"
        self.attn_norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.self_attn = SeqRecAttention(config, layer_idx)
        self.mlp_norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.mlp = SeqRecMLP(config)
        self.dropout = nn.Dropout(config.hidden_dropout_prob)
        self.time_bias = SeqRecTimeBias(config) if config.use_time_bias else None
        self.position_bias = SeqRecPositionBias(config) if config.use_position_bias else None
        self.filter_mix = config.filter_mix
        self.low_pass = SeqRecLowPassFilter(config) if config.filter_mix > 0 else None

    def forward(
        self,
        hidden_states: torch.Tensor,
        attention_mask: torch.Tensor,
        time_buckets: torch.Tensor | None,
        valid: torch.Tensor,
        packing: Packing | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        if self.time_bias is not None and time_buckets is not None:
            attention_mask = attention_mask + self.time_bias(time_buckets)
        if self.position_bias is not None:
            # the mask's last dim is the padded length T, whether hidden_states are (B, T, d) or packed (N, d)
            attention_mask = attention_mask + self.position_bias(attention_mask.shape[-1], hidden_states.device)
        inputs = self.attn_norm(hidden_states) if self.pre_norm else hidden_states
        if packing is None:
            mixed, attn_weights = self.self_attn(inputs, attention_mask)
        else:  # hidden_states are the (N, d) real events; everything below is position-wise
            mixed, attn_weights = self.self_attn.forward_packed(inputs, attention_mask, packing), None
        if self.low_pass is not None:
            mixed = self.filter_mix * self.low_pass(inputs, valid, packing) + (1.0 - self.filter_mix) * mixed
        hidden_states = hidden_states + self.dropout(mixed)
        if self.pre_norm:
            hidden_states = hidden_states + self.dropout(self.mlp(self.mlp_norm(hidden_states)))
        else:
            hidden_states = self.attn_norm(hidden_states)
            hidden_states = self.mlp_norm(hidden_states + self.dropout(self.mlp(hidden_states)))
        return hidden_states, attn_weights


class SeqRecPreTrainedModel(PreTrainedModel):
    """Weight init and the transformers plumbing shared by the bare model and the heads."""

    config_class = SeqRecConfig
    config: SeqRecConfig
    base_model_prefix = "model"
    main_input_name = "input_ids"
    supports_gradient_checkpointing = False
    _no_split_modules = ["SeqRecBlock"]
    _supports_sdpa = True
    _supports_flex_attn = False
    _supports_attention_backend = True

    def save_pretrained(self, save_directory, *args, **kwargs):
        """Save as safetensors; `auto_map` lists every Auto class so remote-code loads find each head."""
        if self._auto_class is not None:
            self.config.auto_map = {
                **(getattr(self.config, "auto_map", None) or {}),
                "AutoConfig": "configuration_seqrec.SeqRecConfig",
                "AutoModel": "modeling_seqrec.SeqRecModel",
                "AutoModelForCausalLM": "modeling_seqrec.SeqRecForNextItemPrediction",
            }
        return super().save_pretrained(save_directory, *args, **kwargs)

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *args, **kwargs):
        """`PreTrainedModel.from_pretrained`, but strict: a weight file that cannot be read, or whose keys do
        not match the architecture, is an error. transformers would only warn and leave random weights,
        which means silently wrong recommendations."""
        want_info = kwargs.pop("output_loading_info", False)
        try:
            model, info = super().from_pretrained(
                pretrained_model_name_or_path, *args, output_loading_info=True, **kwargs
            )
        except SafetensorError as err:
            raise OSError(
                f"{pretrained_model_name_or_path}: model.safetensors cannot be read ({err}); the file is truncated "
                "or corrupted: save or download the checkpoint again"
            ) from None
        except RuntimeError as err:
            if "ignore_mismatched_sizes" not in str(err) or kwargs.get("ignore_mismatched_sizes"):
                raise
            # Load once more only to name the offending tensors (transformers logs them, then raises).
            kwargs["ignore_mismatched_sizes"] = True
            _, info = super().from_pretrained(pretrained_model_name_or_path, *args, output_loading_info=True, **kwargs)
        problems = []
        for kind in ("missing", "unexpected"):
            keys = sorted(info.get(f"{kind}_keys") or [])
            if keys:
                problems.append(f"{len(keys)} {kind} key(s): {', '.join(keys[:8])}")
        mismatched = sorted(info.get("mismatched_keys") or [], key=str)
        if mismatched:
            problems.append(f"{len(mismatched)} key(s) with a shape that does not fit the config: {mismatched[:8]}")
        if problems:
            raise ValueError(
                f"{pretrained_model_name_or_path}: the weights do not match {cls.__name__} with this config ("
                + "; ".join(problems)
                + ")"
            )
        return (model, info) if want_info else model

    def _init_weights(self, module: nn.Module) -> None:
        super()._init_weights(module)
        if isinstance(module, (SeqRecTimeBias, SeqRecTimeGapEmbedding, SeqRecPositionBias)):
            # Zero bias at init: a time-aware model starts as its time-blind twin and learns what gaps mean.
            init.zeros_(module.weight)
        if isinstance(module, SeqRecLowPassFilter):
            init.ones_(module.sqrt_beta)  # beta = 1: the filter starts as the identity
        if isinstance(module, SeqRecItemGraph):
            init.constant_(module.gain, float(self.config.item_graph_gain))
        if isinstance(module, SeqRecTransitionPrior):
            init.copy_(module.weight, module.initial_weights(self.config))


class SeqRecModel(SeqRecPreTrainedModel):
    """The bare Transformer: item ids (+ timestamps) in, one hidden state per position out."""

    def __init__(self, config: SeqRecConfig):
        super().__init__(config)
        self.embed_items = nn.Embedding(config.vocab_size, config.hidden_size, padding_idx=config.pad_token_id)
        self.item_graph = SeqRecItemGraph(config) if config.item_graph_layers > 0 else None
        self.embed_positions = (
            nn.Embedding(config.max_position_embeddings, config.hidden_size)
            if config.position_embedding_type in ("absolute", "from_end")
            else None
        )
        self.embed_time_gaps = SeqRecTimeGapEmbedding(config) if config.use_time_gap_embedding else None
        self.embed_norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps) if config.embedding_norm else None
        self.embed_dropout = nn.Dropout(config.hidden_dropout_prob)
        self.layers = nn.ModuleList([SeqRecBlock(config, i) for i in range(config.num_hidden_layers)])
        self.final_norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.post_init()

    def get_input_embeddings(self) -> nn.Embedding:
        return self.embed_items

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.embed_items = value

    def item_table(self, weight: torch.Tensor | None = None) -> torch.Tensor:
        """(V, d) item vectors as the model uses them: `weight` (default: the input embeddings), smoothed over
        the item graph when `config.item_graph_layers` > 0."""
        weight = self.embed_items.weight if weight is None else weight
        return weight if self.item_graph is None else self.item_graph(weight)

    def _check_inputs(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, timestamps: torch.Tensor | None
    ) -> None:
        if input_ids.dim() != 2:
            raise ValueError(f"input_ids must be 2-D (batch, seq_len), got shape {tuple(input_ids.shape)}")
        if input_ids.shape[1] == 0:
            raise ValueError("input_ids is empty: every history needs at least one item")
        if attention_mask.shape != input_ids.shape:
            raise ValueError(
                f"attention_mask shape {tuple(attention_mask.shape)} != input_ids shape {tuple(input_ids.shape)}"
            )
        if timestamps is not None and timestamps.shape != input_ids.shape:
            raise ValueError(f"timestamps shape {tuple(timestamps.shape)} != input_ids shape {tuple(input_ids.shape)}")
        if self.config.uses_timestamps and timestamps is None:
            raise ValueError("this model uses time (config.use_time_bias/use_time_gap_embedding): pass `timestamps`")
        if torch.compiler.is_compiling():
            return
        low, high = int(input_ids.min()), int(input_ids.max())
        if low < 0 or high >= self.config.vocab_size:
            raise ValueError(
                f"input_ids must lie in [0, vocab_size={self.config.vocab_size}), got values in [{low}, {high}]:"
                " encode histories with the model's own tokenizer"
            )
        longest = int(attention_mask.sum(-1).max())
        if longest > self.config.max_position_embeddings:
            raise ValueError(
                f"a history has {longest} items but max_position_embeddings={self.config.max_position_embeddings};"
                " truncate with tokenizer(..., max_length=...)"
            )

    def forward(
        self,
        input_ids: torch.LongTensor,
        attention_mask: torch.Tensor | None = None,
        timestamps: torch.LongTensor | None = None,
        query_timestamps: torch.LongTensor | None = None,
        output_hidden_states: bool = False,
        output_attentions: bool = False,
        item_table: torch.Tensor | None = None,
        **kwargs,
    ) -> SeqRecModelOutput:
        r"""
        Args:
            input_ids: (B, T) item ids, left padded.
            attention_mask: (B, T) 1 for real events, 0 for padding; derived from `pad_token_id` if absent.
            timestamps: (B, T) int64 seconds of each event; needed when `config.use_time_bias`.
            query_timestamps: (B,) time of the request, i.e. of the event predicted at the last position.
            item_table: (V, d) precomputed `item_table()` (the head computes it once for inputs and scores).
        """
        if attention_mask is None:
            attention_mask = (input_ids != self.config.pad_token_id).long()
        self._check_inputs(input_ids, attention_mask, timestamps)
        batch, seq_len = input_ids.shape
        valid = attention_mask.bool()

        if self.training and self.config.item_dropout > 0:
            dropped = valid & (torch.rand(input_ids.shape, device=input_ids.device) < self.config.item_dropout)
            input_ids = input_ids.masked_fill(dropped, self.config.unk_token_id)
        # Training runs the position-wise layers on real events only (see `Packing`); evaluation, export and
        # requests for per-layer outputs keep the padded layout, which gives the same values at real events.
        packing = None
        if (
            self.training
            and self.config.unpad_training
            and not (output_hidden_states or output_attentions or torch.compiler.is_compiling())
            and not bool(valid.all())
        ):
            packing = Packing.from_mask(valid)
        flat = packing.unpad if packing is not None else (lambda tensor: tensor)  # (B, T, ...) -> (N, ...)
        if item_table is None and self.item_graph is not None:
            item_table = self.item_table()
        if item_table is None:
            hidden_states = self.embed_items(flat(input_ids))
        else:
            hidden_states = F.embedding(flat(input_ids), item_table, padding_idx=self.config.pad_token_id)
        if self.embed_positions is not None:
            real = attention_mask.long()
            if self.config.position_embedding_type == "from_end":  # the latest event -> 0
                position_ids = (real.flip(-1).cumsum(-1).flip(-1) - 1).clamp(min=0)
            else:  # the first real event -> 0
                position_ids = (real.cumsum(-1) - 1).clamp(min=0)
            hidden_states = hidden_states + self.embed_positions(flat(position_ids))
        if self.embed_time_gaps is not None:
            gaps = query_times(timestamps, query_timestamps) - timestamps.long()  # (B, T)
            buckets = bucketize_gaps(gaps, self.config.time_num_buckets, self.config.time_bucket_base)
            hidden_states = hidden_states + self.embed_time_gaps(flat(buckets))
        if self.embed_norm is not None:
            hidden_states = self.embed_norm(hidden_states)
        hidden_states = self.embed_dropout(hidden_states)  # (B, T, d)

        # Additive mask (B, 1, T, T): causal and no padding keys. The diagonal stays open so padding rows
        # (which attend to nothing real) still have one finite entry and softmax never yields NaN.
        causal = torch.ones(seq_len, seq_len, dtype=torch.bool, device=input_ids.device).tril()
        diagonal = torch.eye(seq_len, dtype=torch.bool, device=input_ids.device)
        allowed = (causal & valid[:, None, :]) | diagonal
        mask = torch.zeros(batch, 1, seq_len, seq_len, device=input_ids.device, dtype=hidden_states.dtype)
        mask = mask.masked_fill(~allowed[:, None], float("-inf"))

        time_buckets = None
        if self.config.use_time_bias:
            time_buckets = time_gap_buckets(
                timestamps, query_timestamps, self.config.time_num_buckets, self.config.time_bucket_base
            )

        all_hidden = (hidden_states,) if output_hidden_states else None
        all_attn = () if output_attentions else None
        for layer in self.layers:
            hidden_states, attn_weights = layer(hidden_states, mask, time_buckets, valid, packing)
            if output_hidden_states:
                all_hidden += (hidden_states,)
            if output_attentions:
                all_attn += (attn_weights,)
        hidden_states = self.final_norm(hidden_states)
        if packing is not None:  # back to (B, T, d), zeros at padding (never scored: no target there)
            hidden_states = packing.pad(hidden_states)
        return SeqRecModelOutput(last_hidden_state=hidden_states, hidden_states=all_hidden, attentions=all_attn)


# Most logits scored at once by the full cross-entropy (512 MB in fp32), whatever `loss_chunk_size` says: with a
# 1M-item catalog a chunk is 134 positions, with 12k items the whole `loss_chunk_size` (4,096).
MAX_LOGITS_PER_CHUNK = 2**27
# On a CPU, a chunk's logits (16 MB in fp32) stay in the last-level cache through log-softmax, exp and the two
# gradient matmuls: 4,096-position chunks of a 18k-item catalog (300 MB) go to DRAM on every pass, and the
# element-wise passes run ~3x slower (measured in docs/performance.md). Never fewer than CPU_MIN_CHUNK rows,
# so the matmuls keep a useful shape on large catalogs. GPUs keep `loss_chunk_size` (fewer, larger kernels).
CPU_CACHE_LOGITS_PER_CHUNK = 2**22
CPU_MIN_CHUNK = 128


class _FullCrossEntropy(torch.autograd.Function):
    """Summed cross-entropy of `hidden @ weight.T` over the whole catalog, `chunk_size` rows at a time.

    The loss is a scalar, so its gradients are computed in the same pass: per chunk, logits -> log-softmax ->
    softmax (in place) minus the target distribution -> two matmuls into grad_hidden (N, d) and grad_weight
    (V, d). Backward only scales them. Nothing is recomputed (3 matmuls per chunk instead of 4 with
    checkpointing) and one (chunk, V) block is live at a time, so memory is O(chunk x catalog), never
    O(positions x catalog). Targets are (N, K) with weights (N, K) summing to 1 per row: a one-hot target is
    K = 1, soft targets over several items cost one gather more, not another pass over the catalog.
    `row_weights` (N,) scales each row's whole term (its loss and gradient); None: every row 1.
    """

    @staticmethod
    def forward(
        ctx,
        hidden,
        weight,
        targets,
        target_weights,
        history,
        num_special: int,
        chunk_size: int,
        with_grads: bool,
        smoothing: float,
        bias_index,
        bias_value,
        row_weights,
    ):
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        grad_hidden = torch.empty_like(hidden) if with_grads else None
        grad_weight = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if with_grads else None
        with_bias = bias_index is not None
        grad_bias = torch.empty_like(bias_value) if with_bias and with_grads else None
        for start in range(0, hidden.shape[0], chunk_size):
            rows, chunk_targets = hidden[start : start + chunk_size], targets[start : start + chunk_size]
            chunk_weights = (1.0 - smoothing) * target_weights[start : start + chunk_size]  # (c, K)
            chunk_rows = None if row_weights is None else row_weights[start : start + chunk_size, None]  # (c, 1)
            if chunk_rows is not None:
                chunk_weights = chunk_weights * chunk_rows
            logits = (rows @ weight.t()).float()  # (c, V)
            if with_bias:  # sparse additive scores (transition prior): a few entries per row
                chunk_bias = bias_index[start : start + chunk_size]
                logits.scatter_add_(1, chunk_bias, bias_value[start : start + chunk_size].float())
            logits[:, :num_special] = float("-inf")
            if history is not None:  # the row's own history is no candidate; its targets always are
                target_logits = logits.gather(1, chunk_targets)
                logits.scatter_(1, history[start : start + chunk_size], float("-inf"))
                logits.scatter_(1, chunk_targets, target_logits)
            log_probs = torch.log_softmax(logits, dim=1)
            del logits
            target_log_probs = log_probs.gather(1, chunk_targets).masked_fill(chunk_weights == 0, 0.0)
            total -= (target_log_probs * chunk_weights).sum()
            if smoothing and history is None:  # the rest of the mass spread evenly over the catalog
                share = smoothing / (log_probs.shape[1] - num_special)
                if chunk_rows is not None:
                    share = share * chunk_rows  # (c, 1)
                    total -= (share[:, 0] * log_probs[:, num_special:].sum(1)).sum()
                else:
                    total -= share * log_probs[:, num_special:].sum()
            elif smoothing:  # ... over each row's own candidates (finite logits)
                candidates = torch.isfinite(log_probs)
                share = smoothing / candidates.sum(1, keepdim=True)  # (c, 1)
                if chunk_rows is not None:
                    share = share * chunk_rows
                total -= (log_probs.masked_fill(~candidates, 0.0) * share).sum()
            if not with_grads:
                continue
            probs = log_probs.exp_()  # softmax, in place
            if chunk_rows is not None:
                probs.mul_(chunk_rows)  # a row's softmax mass is its weight
            probs.scatter_add_(1, chunk_targets, -chunk_weights)  # d loss / d logits = softmax - target mass
            if smoothing and history is None:
                probs[:, num_special:] -= share
            elif smoothing:
                probs -= candidates * share
            if grad_bias is not None:  # d loss / d bias entry = d loss / d its logit
                grad_bias[start : start + chunk_size] = probs.gather(1, chunk_bias)
            probs = probs.to(weight.dtype)
            grad_hidden[start : start + chunk_size] = probs @ weight  # (c, d)
            if weight.dtype == torch.float32:
                grad_weight.addmm_(probs.t(), rows)  # (V, d), accumulated in place
            else:
                grad_weight += (probs.t() @ rows).float()
        if with_grads:
            ctx.save_for_backward(grad_hidden, grad_weight, grad_bias)
            ctx.weight_dtype = weight.dtype
        return total

    @staticmethod
    def backward(ctx, grad_total):
        grad_hidden, grad_weight, grad_bias = ctx.saved_tensors
        grad_weight = (grad_weight * grad_total).to(ctx.weight_dtype)
        grad_bias = None if grad_bias is None else grad_bias * grad_total
        return grad_hidden * grad_total, grad_weight, None, None, None, None, None, None, None, None, grad_bias, None


def loss_chunk_rows(chunk_size: int, catalog_size: int, device_type: str) -> int:
    """Positions per chunk of the full cross-entropy: `chunk_size` at most, at most MAX_LOGITS_PER_CHUNK
    logits, and on a CPU about CPU_CACHE_LOGITS_PER_CHUNK (cache-resident) but never below CPU_MIN_CHUNK."""
    rows = min(chunk_size, MAX_LOGITS_PER_CHUNK // catalog_size)
    if device_type == "cpu":
        rows = min(rows, max(CPU_MIN_CHUNK, CPU_CACHE_LOGITS_PER_CHUNK // catalog_size))
    return max(1, rows)


def full_cross_entropy_sum(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    num_special: int,
    chunk_size: int,
    history: torch.Tensor | None = None,
    label_smoothing: float = 0.0,
    target_weights: torch.Tensor | None = None,
    bias_index: torch.Tensor | None = None,
    bias_value: torch.Tensor | None = None,
    row_weights: torch.Tensor | None = None,
) -> torch.Tensor:
    """Summed full-catalog cross-entropy of the rows of `hidden` (N, d) against `targets`; special ids excluded.

    `bias_index`/`bias_value` (N, E): sparse scores added to each row's logits (repeated indices add up),
    differentiable in `bias_value` (the transition prior's learned weights train through it).

    `targets` (N,) one item per row, or (N, K) several with `target_weights` (N, K), each row summing to 1
    (weight 0 marks an unused slot).
    `history` (N, L): item ids also excluded from each row's softmax (pad with a special id), except the targets.
    `label_smoothing` eps: the target distribution is 1 - eps on the targets plus eps spread over the row's
    candidates (torch's `label_smoothing` restricted to the items that can be recommended).
    `row_weights` (N,): each row's term is multiplied by its weight (None: all 1).

    Under autocast the matmuls run in the autocast dtype (bf16 on CPU), the softmax in fp32.
    """
    if targets.dim() == 1:
        targets = targets[:, None]
    if target_weights is None:
        target_weights = torch.ones(targets.shape, dtype=torch.float32, device=targets.device)
    device_type = hidden.device.type
    if torch.is_autocast_enabled(device_type):
        dtype = torch.get_autocast_dtype(device_type)
        hidden, weight = hidden.to(dtype), weight.to(dtype)
    chunk_size = loss_chunk_rows(chunk_size, weight.shape[0], device_type)
    with_grads = torch.is_grad_enabled() and (
        hidden.requires_grad or weight.requires_grad or (bias_value is not None and bias_value.requires_grad)
    )
    with torch.autocast(device_type, enabled=False):
        return _FullCrossEntropy.apply(
            hidden,
            weight,
            targets,
            target_weights.float(),
            history,
            num_special,
            chunk_size,
            with_grads,
            float(label_smoothing),
            bias_index,
            None if bias_value is None else bias_value.float(),
            None if row_weights is None else row_weights.float(),
        )


def _chunk_sampled_softmax(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    candidates: torch.Tensor,
    candidate_log_q: torch.Tensor,
) -> torch.Tensor:
    """Summed softmax cross-entropy of each target against shared sampled candidates (logQ-corrected)."""
    positive = (hidden * weight[targets]).sum(-1).float()  # (n,)
    negative = (hidden @ weight[candidates].t()).float() - candidate_log_q  # (n, C)
    negative = negative.masked_fill(candidates[None, :] == targets[:, None], float("-inf"))  # accidental hits
    return (torch.logsumexp(torch.cat([positive[:, None], negative], dim=1), dim=1) - positive).sum()


def _chunk_gbce(
    hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, negatives: torch.Tensor, beta: float
) -> torch.Tensor:
    """Summed gBCE (gSASRec): -beta * log sigmoid(s+) - sum_j log sigmoid(-s_j) over the sampled negatives."""
    positive = (hidden * weight[targets]).sum(-1).float()  # (n,)
    negative = (hidden @ weight[negatives].t()).float()  # (n, k)
    negative_loss = -F.logsigmoid(-negative).masked_fill(negatives[None, :] == targets[:, None], 0.0)
    return (-beta * F.logsigmoid(positive) + negative_loss.sum(-1)).sum()


def _sampled_candidates(
    targets: torch.Tensor, num_negatives: int, in_batch: bool, num_special: int, vocab_size: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Candidates shared by every position of the batch, with their logQ corrections.

    Mixed negatives (Yang et al., 2020): `num_negatives` uniform draws from the catalog plus, with `in_batch`,
    the batch's targets, which are drawn in proportion to popularity. Under that sampler item j is expected
    E_j = u + c_j times (u = num_negatives / items, c_j = its count among the batch targets). Each uniform
    draw of j is weighted 1 / E_j and each distinct batch item c_j / E_j (logQ correction, Yi et al., 2019),
    so the candidates' summed exp(score) estimates the full softmax denominator without favouring popular
    items. The positive keeps its exact score, and its copies among the candidates are dropped.
    """
    num_items = vocab_size - num_special
    uniform_count = num_negatives / num_items
    counts = torch.zeros(vocab_size, device=targets.device)
    distinct, counts_per_item = targets.unique(return_counts=True)
    if in_batch:
        counts[distinct] = counts_per_item.float()
    parts, log_q = [], []
    if num_negatives > 0:
        draws = torch.randint(num_special, vocab_size, (num_negatives,), device=targets.device)
        parts.append(draws)
        log_q.append(torch.log(uniform_count + counts[draws]))
    if in_batch:
        parts.append(distinct)
        log_q.append(torch.log((uniform_count + counts_per_item.float()) / counts_per_item.float()))
    return torch.cat(parts), torch.cat(log_q)


def gbce_beta(num_negatives: int, num_items: int, t: float) -> float:
    """gSASRec's calibration exponent: beta = alpha * (t * (1 - 1/alpha) + 1/alpha), alpha = k / (items - 1)."""
    alpha = num_negatives / (num_items - 1)
    return alpha * (t * (1 - 1 / alpha) + 1 / alpha)


def target_positions(labels: torch.Tensor, attention_mask: torch.Tensor, num_special_tokens: int) -> torch.Tensor:
    """(B, T - 1) mask of the positions that predict a real target: position t is real and labels[t + 1] is an
    item (not -100, padding or [UNK])."""
    return (labels[:, 1:] >= num_special_tokens) & attention_mask[:, :-1].bool()


def position_histories(input_ids: torch.Tensor) -> torch.Tensor:
    """(B, T, T): row t holds the ids position t has seen (events <= t), 0 (the padding id) elsewhere."""
    seq_len = input_ids.shape[1]
    seen = torch.ones(seq_len, seq_len, dtype=torch.bool, device=input_ids.device).tril()  # t sees <= t
    return input_ids[:, None, :].masked_fill(~seen, 0)


def next_item_loss(
    hidden_states: torch.Tensor,
    labels: torch.Tensor,
    attention_mask: torch.Tensor,
    item_weight: torch.Tensor,
    num_special_tokens: int,
    chunk_size: int,
    loss_type: str = "full_ce",
    num_negatives: int = 256,
    in_batch_negatives: bool = True,
    gbce_t: float = 0.75,
    history_ids: torch.Tensor | None = None,
    label_smoothing: float = 0.0,
    target_window: int = 1,
    target_window_decay: float = 0.5,
    bias_index: torch.Tensor | None = None,
    bias_value: torch.Tensor | None = None,
    recency_half_life: float = 0.0,
    soft_targets: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> torch.Tensor:
    """Next-item loss averaged over the real target positions.

    Labels (B, T) are aligned with the inputs and shifted here (position t predicts labels[t + 1]); labels (B,)
    are one target per row, predicted by its last position (prefix rows, see `data.prefix_rows`). Only real
    (non-padding) positions predict, and targets that are -100 or special ids are ignored. Those positions
    are gathered first (padding never reaches the output layer) and scored `chunk_size` at a time (full CE:
    at most `MAX_LOGITS_PER_CHUNK` logits; gradients computed in the same pass; sampled losses: chunks
    recomputed in the backward pass), so peak memory is O(chunk x catalog), never O(positions x catalog).

    loss_type: `full_ce` (softmax over the whole catalog), `sampled_softmax` (mixed negatives, logQ
    correction; for catalogs too large to score in full), `gbce` (gSASRec's calibrated BCE with
    `num_negatives` uniform negatives).

    history_ids: (B, T) the input items; when given (full CE only), the items each position has already seen
    are left out of its softmax, as they are left out of the ranking at evaluation and serving time.

    target_window k > 1 (full CE only): position t's target distribution covers the next k events of its
    sequence, event t + j weighted decay^(j - 1) and the weights normalised over the events that exist.

    bias_index/bias_value (B, T, E) (full CE only): sparse scores added to each position's logits (the
    transition prior), gathered with the positions.

    recency_half_life h > 0 ((B, T) labels, full CE only): a weighted mean instead, the target d events
    before its row's last target weighted 0.5^(d / h), so each history's latest transitions count most.

    soft_targets (ids, weights), each (B, T, K) ((B, T) labels, full CE only): position t's target
    distribution over K items, each position's weights summing to 1 (e.g. the true next item mixed with a
    teacher's top items: distillation). Used at the positions `labels` marks as real targets, instead of them.
    """
    weights = history = bias = row_weights = None
    if soft_targets is not None and (loss_type != "full_ce" or labels.dim() == 1 or target_window > 1):
        raise ValueError("soft_targets need loss_type='full_ce', (batch, seq_len) labels and target_window=1")
    if recency_half_life and (loss_type != "full_ce" or labels.dim() == 1):
        raise ValueError("recency_half_life needs loss_type='full_ce' and (batch, seq_len) labels")
    if bias_index is not None and loss_type != "full_ce":
        raise ValueError("the transition prior is implemented for loss_type='full_ce' only")
    if labels.dim() == 1:  # one target per row, after its last event (prefix rows): the last position predicts
        if target_window > 1:
            raise ValueError("target_window > 1 needs (batch, seq_len) labels: a row with one target has no window")
        keep = (labels >= num_special_tokens) & attention_mask[:, -1].bool()  # left padding: the last one is real
        hidden, targets = hidden_states[:, -1][keep], labels[keep]
        if bias_index is not None:
            bias = bias_index[:, -1][keep], bias_value[:, -1][keep]
        if history_ids is not None and loss_type == "full_ce":  # padding -> 0, a special id, never a candidate
            history = history_ids.masked_fill(~attention_mask.bool(), 0).clamp(min=0)[keep]  # (N, T)
    else:
        shifted = labels[:, 1:]  # (B, T-1)
        keep = target_positions(labels, attention_mask, num_special_tokens)
        hidden, targets = hidden_states[:, :-1][keep], shifted[keep]  # (N, d), (N,)
        if recency_half_life:  # d = real targets after this one in its row
            after = keep.flip(1).cumsum(1).flip(1) - 1
            row_weights = 0.5 ** (after[keep].float() / recency_half_life)
        if bias_index is not None:
            bias = bias_index[:, :-1][keep], bias_value[:, :-1][keep]
        if target_window > 1 and loss_type == "full_ce":
            future = torch.stack(
                [F.pad(labels[:, j:], (0, j - 1), value=-100) for j in range(1, target_window + 1)], dim=-1
            )[keep]  # (N, k): event t + j of the same sequence, -100 past its end
            decay = target_window_decay ** torch.arange(target_window, device=future.device, dtype=torch.float32)
            weights = decay * (future >= num_special_tokens)
            weights = weights / weights.sum(1, keepdim=True)  # column 0 is the next event: never empty
            targets = future.clamp(min=0)  # unused slots point at a special id with weight 0
        if soft_targets is not None:
            targets, weights = soft_targets[0][:, :-1][keep], soft_targets[1][:, :-1][keep]  # (N, K)
        if history_ids is not None and loss_type == "full_ce":
            history = position_histories(history_ids)[:, :-1].clamp(min=0)[keep]  # (N, T); 0 is special
    num = hidden.shape[0]
    if num == 0:
        return hidden_states.sum() * 0.0
    if loss_type == "full_ce":
        total = full_cross_entropy_sum(
            hidden,
            item_weight,
            targets,
            num_special_tokens,
            chunk_size,
            history,
            label_smoothing,
            weights,
            *(bias or (None, None)),
            row_weights,
        )
        return total / (num if row_weights is None else row_weights.sum())
    if history_ids is not None:
        raise ValueError("excluding the history from the loss is implemented for loss_type='full_ce' only")
    if label_smoothing or target_window > 1:
        raise ValueError("label smoothing and target windows are implemented for loss_type='full_ce' only")
    total = _sampled_loss_sum(
        hidden,
        targets,
        item_weight,
        num_special_tokens,
        chunk_size,
        loss_type,
        num_negatives,
        in_batch_negatives,
        gbce_t,
    )
    return total / num


def contrastive_loss(view_a: torch.Tensor, view_b: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """NT-Xent (SimCLR, SimCSE) between two views (N, d) of the same N rows: row i of one view must pick row
    i of the other among the 2N - 1 other vectors of both views, by cosine similarity over `temperature`.
    Averaged over the 2N anchors; 0 when N < 2 (no negatives). Cosine, not DuoRec's dot product: on Beauty
    the dot product (temperature 1) slowed the next-item loss so much that early stopping ended the run at
    epoch 8 (docs/quality.md)."""
    num = view_a.shape[0]
    if num < 2:
        return view_a.sum() * 0.0
    both = F.normalize(torch.cat([view_a, view_b]).float(), dim=-1, eps=1e-6)  # (2N, d) unit vectors
    sims = both @ both.t() / temperature
    sims = sims.masked_fill(torch.eye(2 * num, dtype=torch.bool, device=sims.device), float("-inf"))
    partner = (torch.arange(2 * num, device=sims.device) + num) % (2 * num)  # row i <-> row i + N
    return F.cross_entropy(sims, partner)


def _sampled_loss_sum(
    hidden: torch.Tensor,
    targets: torch.Tensor,
    item_weight: torch.Tensor,
    num_special_tokens: int,
    chunk_size: int,
    loss_type: str,
    num_negatives: int,
    in_batch_negatives: bool,
    gbce_t: float,
) -> torch.Tensor:
    """Summed sampled softmax or gBCE over the rows of `hidden` (N, d), `chunk_size` rows at a time (each
    chunk recomputed in the backward pass)."""
    num = targets.numel()
    vocab_size = item_weight.shape[0]
    if loss_type == "sampled_softmax":
        candidates, log_q = _sampled_candidates(
            targets, num_negatives, in_batch_negatives, num_special_tokens, vocab_size
        )
        fn, extra = _chunk_sampled_softmax, (candidates, log_q)
    elif loss_type == "gbce":
        negatives = torch.randint(num_special_tokens, vocab_size, (num_negatives,), device=targets.device)
        beta = gbce_beta(num_negatives, vocab_size - num_special_tokens, gbce_t)
        fn, extra = _chunk_gbce, (negatives, beta)
    else:
        raise ValueError(f"unknown loss_type {loss_type!r}")

    def chunk_args(start: int, end: int) -> tuple:
        return (hidden[start:end], item_weight, targets[start:end], *extra)

    if num <= chunk_size:
        total = fn(*chunk_args(0, num))
    else:
        total = hidden.new_zeros((), dtype=torch.float32)
        for start in range(0, num, chunk_size):
            total = total + checkpoint(fn, *chunk_args(start, start + chunk_size), use_reentrant=False)
    return total


def _as_allowed_mask(allowed_items, vocab_size: int, device: torch.device) -> torch.Tensor:
    allowed = torch.as_tensor(allowed_items, device=device)
    if allowed.dtype == torch.bool:
        if allowed.shape != (vocab_size,):
            raise ValueError(
                f"a boolean allowed_items mask must have shape ({vocab_size},), got {tuple(allowed.shape)}"
            )
        return allowed
    allowed = allowed.long().flatten()
    if allowed.numel() and (allowed.min() < 0 or allowed.max() >= vocab_size):
        raise ValueError(f"allowed_items must be item ids in [0, {vocab_size})")
    mask = torch.zeros(vocab_size, dtype=torch.bool, device=device)
    mask[allowed] = True
    return mask


class SeqRecForNextItemPrediction(SeqRecPreTrainedModel):
    """SeqRec with an output layer that scores every catalog item as the next one (tied to the item embeddings)."""

    _tied_weights_keys = {"item_head.weight": "model.embed_items.weight"}

    def __init__(self, config: SeqRecConfig):
        super().__init__(config)
        self.model = SeqRecModel(config)
        self.item_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.transition_prior = SeqRecTransitionPrior(config) if config.transition_prior_lags > 0 else None
        self.post_init()

    def get_input_embeddings(self) -> nn.Embedding:
        return self.model.embed_items

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.model.embed_items = value

    def get_output_embeddings(self) -> nn.Linear:
        return self.item_head

    def resize_token_embeddings(self, *args, **kwargs):
        """`PreTrainedModel.resize_token_embeddings`, keeping the transition prior's tables at the size they were
        counted at (items added later have no counts), so the resized model saves and loads."""
        if self.transition_prior is not None and not self.config.transition_prior_vocab_size:
            self.config.transition_prior_vocab_size = self.transition_prior.index.shape[1]
        return super().resize_token_embeddings(*args, **kwargs)

    def item_table(self) -> torch.Tensor:
        """(V, d) item vectors that score the next item: the output embeddings, smoothed over the item graph
        when the config has one (the smoothed table is also the input embedding of tied models), unit length
        with `score_norm`."""
        return self.score_table(self.model.item_table(self.item_head.weight))

    def score_table(self, table: torch.Tensor) -> torch.Tensor:
        """The item side of the score: unit vectors with `score_norm` (cosine scores), else as is."""
        return F.normalize(table, dim=-1, eps=1e-6) if self.config.score_norm else table

    def score_users(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """The user side of the score: unit vectors over `score_temperature` with `score_norm`, else as is."""
        if not self.config.score_norm:
            return hidden_states
        return F.normalize(hidden_states, dim=-1, eps=1e-6) / self.config.score_temperature

    def check_tokenizer(self, tokenizer) -> None:
        """Raise `ValueError` if the tokenizer's vocabulary is not the one this model scores (wrong pairing)."""
        if len(tokenizer) != self.config.vocab_size:
            raise ValueError(
                f"the tokenizer has {len(tokenizer)} ids but the model's config.vocab_size is "
                f"{self.config.vocab_size}: they do not belong together (after add_items, call "
                "model.resize_token_embeddings(len(tokenizer)))"
            )

    def set_output_embeddings(self, value: nn.Linear) -> None:
        self.item_head = value

    def forward(
        self,
        input_ids: torch.LongTensor,
        attention_mask: torch.Tensor | None = None,
        timestamps: torch.LongTensor | None = None,
        query_timestamps: torch.LongTensor | None = None,
        labels: torch.LongTensor | None = None,
        logits_to_keep: int | None = None,
        output_hidden_states: bool = False,
        output_attentions: bool = False,
        target_ids: torch.LongTensor | None = None,
        target_weights: torch.Tensor | None = None,
        **kwargs,
    ) -> NextItemPredictionOutput:
        r"""
        Args:
            labels: (B, T) next-item targets aligned with `input_ids` (usually `input_ids` with -100 at padding);
                shifted by one inside, so position t is trained to predict labels[:, t + 1].
            target_ids, target_weights: optional (B, T, K) soft targets of each position (weights summing to 1),
                used in the loss instead of the one-hot labels at the positions `labels` marks as targets
                (distillation; see `next_item_loss`).
            logits_to_keep: score only the last N positions (`1` for next-item scores). Default: every position
                without `labels`, none with `labels` (training never materialises [B, T, catalog]).
        """
        table = self.model.item_table(self.item_head.weight) if self.model.item_graph is not None else None
        encoder_inputs = dict(  # the contrastive term encodes the same rows again
            attention_mask=attention_mask,
            timestamps=timestamps,
            query_timestamps=query_timestamps,
            item_table=table if self.config.tie_word_embeddings else None,
        )
        outputs = self.model(
            input_ids, output_hidden_states=output_hidden_states, output_attentions=output_attentions, **encoder_inputs
        )
        hidden_states = outputs.last_hidden_state
        output_weight = self.score_table(self.item_head.weight if table is None else table)
        scoring_states = self.score_users(hidden_states)
        if attention_mask is None:
            attention_mask = input_ids != self.config.pad_token_id
        bias = (None, None)
        loss = None
        if labels is not None:
            if self.transition_prior is not None and self.config.transition_prior_in_loss:
                if labels.dim() == 2:  # position t predicts labels[t + 1]
                    position_targets = F.pad(labels[:, 1:], (0, 1), value=-100)
                else:  # the last position predicts labels
                    position_targets = F.pad(labels[:, None], (input_ids.shape[1] - 1, 0), value=-100)
                bias = self.transition_prior(input_ids, attention_mask, position_targets)
            loss = next_item_loss(
                scoring_states,
                labels,
                attention_mask,
                output_weight,
                self.config.num_special_tokens,
                self.config.loss_chunk_size,
                loss_type=self.config.loss_type,
                num_negatives=self.config.num_negatives,
                in_batch_negatives=self.config.in_batch_negatives,
                gbce_t=self.config.gbce_t,
                history_ids=input_ids if self.config.loss_exclude_history else None,
                label_smoothing=self.config.label_smoothing,
                target_window=self.config.target_window,
                target_window_decay=self.config.target_window_decay,
                bias_index=bias[0],
                bias_value=bias[1],
                recency_half_life=self.config.loss_recency_half_life,
                soft_targets=None if target_ids is None else (target_ids, target_weights),
            )
            if self.training and self.config.contrastive_weight > 0:
                second = self.model(input_ids, **encoder_inputs).last_hidden_state  # fresh dropout
                loss = loss + self.config.contrastive_weight * self._contrastive_term(
                    hidden_states, second, labels, attention_mask
                )
        if logits_to_keep is None:
            logits_to_keep = 0 if labels is None else -1
        logits = None
        if logits_to_keep >= 0:
            kept = scoring_states if logits_to_keep == 0 else scoring_states[:, -logits_to_keep:]
            logits = kept @ output_weight.t()
            if self.transition_prior is not None:  # the serving-time prior (nothing left out), in fp32 as in
                keep = kept.shape[1]  # recommend() and the export; only the kept positions and their sources
                span = keep + self.transition_prior.lags - 1
                index, value = self.transition_prior(input_ids[:, -span:], attention_mask[:, -span:])
                logits = logits.float().scatter_add(-1, index[:, -keep:], value[:, -keep:])
                dense = self.transition_prior.dense(logits.shape[-1])
                if dense is not None:
                    logits = logits + dense
        return NextItemPredictionOutput(
            loss=loss,
            logits=logits,
            last_hidden_state=hidden_states,
            hidden_states=outputs.hidden_states,
            attentions=outputs.attentions,
        )

    def _contrastive_term(
        self, first: torch.Tensor, second: torch.Tensor, labels: torch.Tensor, attention_mask: torch.Tensor
    ) -> torch.Tensor:
        """`contrastive_loss` between two dropout passes at each row's last position that predicts a target
        (the one before the last event for sequence labels, the last one for one-target prefix rows)."""
        position = -2 if labels.dim() == 2 else -1
        if first.shape[1] < -position:  # a one-event batch has no position that predicts a later event
            return first.sum() * 0.0
        target = labels[:, -1] if labels.dim() == 2 else labels
        keep = (target >= self.config.num_special_tokens) & attention_mask[:, position].bool()
        return contrastive_loss(
            first[:, position][keep], second[:, position][keep], self.config.contrastive_temperature
        )

    @torch.no_grad()
    def recommend(
        self,
        input_ids: torch.LongTensor,
        attention_mask: torch.Tensor | None = None,
        timestamps: torch.LongTensor | None = None,
        top_k: int = 10,
        exclude_history: bool = True,
        allowed_items=None,
        query_timestamps: torch.LongTensor | None = None,
        chunk_size: int | None = None,
    ) -> tuple[torch.LongTensor, torch.FloatTensor]:
        """Top-k next items per user as `(item_ids, scores)`, each (batch, top_k), best first.

        Special tokens are never returned; history items are excluded unless `exclude_history=False`;
        `allowed_items` (ids, or a boolean mask over the vocabulary) restricts the candidates. The catalog is
        scored `chunk_size` items at a time (default `config.recommend_chunk_size`) with a running top-k, so
        memory is O(batch x chunk) however large the catalog. Slots that cannot be filled (fewer candidates
        than `top_k`) hold id -1 and score -inf.
        """
        if top_k < 1:
            raise ValueError(f"top_k must be >= 1, got {top_k}")
        if attention_mask is None:
            attention_mask = (input_ids != self.config.pad_token_id).long()
        table = self.model.item_table(self.item_head.weight)
        tied_graph = self.config.tie_word_embeddings and self.model.item_graph is not None
        user_state = self.model(
            input_ids,
            attention_mask=attention_mask,
            timestamps=timestamps,
            query_timestamps=query_timestamps,
            item_table=table if tied_graph else None,
        ).last_hidden_state[:, -1]  # (B, d): left padding puts the latest event last
        user_state, weight = self.score_users(user_state), self.score_table(table)
        prior = None
        if self.transition_prior is not None:
            index, value = self.transition_prior(
                input_ids[:, -self.transition_prior.lags :],
                attention_mask[:, -self.transition_prior.lags :],
            )
            prior = index[:, -1], value[:, -1].float()  # (B, lags * size) of the last position
        vocab_size, device = weight.shape[0], weight.device
        dense = self.transition_prior.dense(vocab_size) if self.transition_prior is not None else None
        batch = input_ids.shape[0]
        first = self.config.num_special_tokens
        chunk_size = chunk_size or self.config.recommend_chunk_size
        allowed = None if allowed_items is None else _as_allowed_mask(allowed_items, vocab_size, device)
        history = input_ids.masked_fill(~attention_mask.bool(), -1)  # padding never matches an item

        best_scores = torch.full((batch, 0), float("-inf"), device=device)
        best_ids = torch.full((batch, 0), -1, dtype=torch.long, device=device)
        for start in range(first, vocab_size, chunk_size):
            end = min(start + chunk_size, vocab_size)
            scores = (user_state @ weight[start:end].t()).float()  # (B, chunk)
            if prior is not None:
                local = prior[0] - start
                inside = (local >= 0) & (local < end - start)
                spare = F.pad(scores, (0, 1))  # out-of-chunk entries land in a spare column
                spare.scatter_add_(1, torch.where(inside, local, end - start), prior[1] * inside)
                scores = spare[:, :-1]
            if dense is not None:
                scores = scores + dense[start:end]
            if allowed is not None:
                scores.masked_fill_(~allowed[start:end], float("-inf"))
            if exclude_history:
                in_chunk = (history >= start) & (history < end)
                rows, cols = in_chunk.nonzero(as_tuple=True)
                scores[rows, history[rows, cols] - start] = float("-inf")
            k = min(top_k, end - start)
            chunk_scores, chunk_ids = scores.topk(k, dim=-1)
            best_scores = torch.cat([best_scores, chunk_scores], dim=1)
            best_ids = torch.cat([best_ids, chunk_ids + start], dim=1)
            if best_scores.shape[1] > top_k:
                best_scores, order = best_scores.topk(top_k, dim=-1)
                best_ids = best_ids.gather(1, order)
        if best_scores.shape[1] < top_k:  # catalog smaller than top_k
            pad = top_k - best_scores.shape[1]
            best_scores = F.pad(best_scores, (0, pad), value=float("-inf"))
            best_ids = F.pad(best_ids, (0, pad), value=-1)
        best_ids = best_ids.masked_fill(torch.isneginf(best_scores), -1)
        return best_ids, best_scores


__all__ = [
    "NextItemPredictionOutput",
    "SeqRecForNextItemPrediction",
    "SeqRecModel",
    "SeqRecModelOutput",
    "SeqRecPreTrainedModel",
    "next_item_loss",
    "bucketize_gaps",
    "contrastive_loss",
    "query_times",
    "time_gap_buckets",
]
