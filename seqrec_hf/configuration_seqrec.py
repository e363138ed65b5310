"""Configuration of the SeqRec next-item Transformer.

This file is copied next to the weights by `save_pretrained`, so `trust_remote_code=True` loads work where
`seqrec_hf` is not installed: it must only import from transformers.
"""

from __future__ import annotations

from huggingface_hub.dataclasses import strict
from transformers import PreTrainedConfig

_LOSS_TYPES = ("full_ce", "sampled_softmax", "gbce")


def _is_int(value) -> bool:
    """An int that is not a bool (YAML `true` must not pass as 1)."""
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value) -> bool:
    """An int or float that is not a bool."""
    return isinstance(value, (int, float)) and not isinstance(value, bool)


@strict
class SeqRecConfig(PreTrainedConfig):
    r"""Hyper-parameters of a decoder-only next-item Transformer (SASRec/HSTU family).

    Args:
        vocab_size: Number of item ids, special tokens included (= `len(tokenizer)`).
        hidden_size: Width of item embeddings and of every block.
        num_hidden_layers: Number of Transformer blocks.
        num_attention_heads: Attention heads per block; must divide `hidden_size`.
        intermediate_size: Width of the feed-forward layer inside each block.
        hidden_act: Activation of the feed-forward layer (`"gelu"`, `"relu"`, `"silu"`).
        hidden_dropout_prob: Dropout on embeddings, attention output and feed-forward output.
        attention_dropout: Dropout on attention probabilities.
        max_position_embeddings: Longest history the model reads (learned absolute positions).
        position_embedding_type: `"absolute"`: a learned embedding of each event's index, counted from the
            user's first event, is added to its item embedding (SASRec). `"from_end"`: the index counted back
            from the latest event (0 = most recent; BSARec/FMLP-Rec pad on the left and number the slots, which
            is the same thing), so a position means "k events ago"; train it on prefix rows
            (`data.prefix_rows`), where the predicting position is always the latest. `"none"`: no position embedding;
            order then comes only from the causal mask, the low-pass filter and the relative biases, so
            the model's view of a history does not depend on how long the user has been around.
        embedding_norm: LayerNorm on the summed input embeddings before dropout (as in S3-Rec/BSARec). The
            residual stream then starts at unit scale instead of the tiny initial embeddings, which makes the
            item signal visible to the first block from the first step.
        norm_style: Where each block normalises. `"pre"`: x + f(LN(x)) (GPT-2/SASRec, stable at any depth).
            `"post"`: LN(x + f(x)) (BERT/S3-Rec/BSARec; every block hands on a unit-scale state, which suits
            the shallow, heavily regularised models of small recommendation datasets).
        filter_mix: Weight alpha of a causal low-pass filter branch mixed with attention in every block:
            alpha * filter(x) + (1 - alpha) * attention(x). 0 turns it off. The filter is
            low + beta^2 * (x - low) with `low` the mean of the last `filter_window` events and beta a learned
            per-channel gain: a causal version of BSARec's frequency branch (BSARec filters the whole
            sequence with an FFT, which would let each position see its future in a sequence-wise loss).
        filter_window: Events averaged by the low-pass filter (0: the whole history up to each position).
        item_dropout: Training-time augmentation: each real input event is replaced by the unknown-item token
            with this probability (targets are untouched). Like word dropout, it makes the model predict from
            incomplete histories instead of leaning on one recent item; off at evaluation.
        item_graph_layers: Hops K of item-graph smoothing (0: off). Item vectors (inputs and scores) become
            E + sum_k g_k A^k E, A the normalised item-item transition graph of the training histories (stored
            with the weights), g_k learned gains. Rare items borrow the representation of the items they are
            bought next to (graph-enhanced embeddings as in LightGCN/GCE-GNN).
        item_graph_gain: Initial gain g_k of every hop.
        item_graph_edges: Number of stored graph edges (set by training from the data; sizes the buffers).
        transition_prior_lags: Add count-based transition scores to the logits (0: off): for each of the last
            `lags` events i_k, w_k * log(1 + #(i_k, then j k + 1 events later)) over the training histories
            (tables saved with the weights). Exact co-purchase memory that a 64-wide embedding only
            approximates, interpolated with the network as n-grams with a neural language model.
        transition_prior_size: Successors kept per item and lag (the most frequent ones).
        transition_prior_reverse: Add one more table, read at the current event i: w * log(1 + #(j, then i))
            over the training histories, the items bought just *before* i. Purchase orders within a basket are
            arbitrary, so "j came before i" is evidence for j next too (the counts of the forward tables only
            see one direction). Its weight is the last of the lag weights.
        transition_prior_recent_window: Add w * log(1 + n(j)) to every item's score, n(j) the times j is among
            the last `window` events of a training history (0: off): what users bought most recently, a
            trend signal for data without timestamps (the next events go to newer items than the average
            training event). Its weight comes after the tables' and starts at 0, so training (and early
            stopping) is unchanged until calibration fits it on validation. Needs transition_prior_lags >= 1.
        transition_prior_weight: Initial weight w_k of every lag (training calibrates them on validation).
        transition_prior_in_loss: Train the network together with the prior (w_k learned in the loss, the
            count of the predicted transition left out) instead of alone, with w_k fitted afterwards.
        transition_prior_vocab_size: Items the prior's tables cover (0: `vocab_size`); kept when the
            vocabulary grows, since items added later have no counts.
        score_norm: Score items by cosine similarity over a temperature instead of the dot product (user state
            and item vectors scaled to unit length): an item's score no longer grows with the norm its
            embedding gets from being a frequent target, so popular items do not win on norm alone.
        score_temperature: Temperature of the cosine scores (`score_norm`); logits lie in [-1/T, 1/T].
        layer_norm_eps: Epsilon of every LayerNorm.
        initializer_range: Standard deviation of the normal weight initialisation.
        tie_word_embeddings: Score items with the item embedding matrix (the output layer is tied to the
            input embeddings); halves the parameters and is what SASRec and its successors do.
        pad_token_id: Id of the padding token (left padding everywhere).
        unk_token_id: Id of the unknown-item token.
        num_special_tokens: Ids below this are special tokens, never recommended nor used as targets.
        use_position_bias: Add a learned per-head attention bias indexed by how many events separate the query
            and the key (relative position, as in T5/HSTU). Recency then reads directly off the bias instead of
            being inferred from absolute positions counted from the user's first event.
        use_time_bias: Add a learned relative attention bias indexed by the log-bucketed time gap between
            the query and key events (HSTU), so the model uses *when* things happened, not only their order.
            Needs `timestamps` at call time.
        use_time_gap_embedding: Add a learned embedding of the log-bucketed gap between each event and the
            event being predicted (the request time at the last position) to the input. Needs `timestamps`.
            Where behaviour depends on how long after the last event the next one comes, this is the strongest
            time feature.
        time_num_buckets: Number of log-spaced time-gap buckets (gaps beyond the last bucket are clipped).
        time_bucket_base: Base of the logarithm that defines the buckets (gap in seconds).
        loss_type: Training loss. `"full_ce"`: cross-entropy over the whole catalog (best quality when the
            catalog fits). `"sampled_softmax"`: softmax over sampled candidates with logQ correction, for huge
            catalogs. `"gbce"`: gSASRec's calibrated binary cross-entropy with uniform negatives.
        loss_exclude_history: Leave each position's own history out of its softmax (`full_ce` only), as
            evaluation and `recommend()` leave it out of the ranking. Without it the model must score the
            items it was just shown below everything else, which fights the co-purchase similarity that
            predicts the next item.
        label_smoothing: Full CE only: the target gets 1 - eps of the probability mass and the rest is spread
            evenly over the other candidates (the catalog minus special tokens and, with
            `loss_exclude_history`, the history), as in `torch.nn.CrossEntropyLoss(label_smoothing=eps)`.
            It keeps the model from becoming over-confident about the one observed next item.
        target_window: Full CE only: each position learns the next `target_window` events of its sequence,
            not just the next one, as one soft target (event t + j weighted `target_window_decay`^(j - 1),
            normalised). In purchase logs the order of nearby events is partly arbitrary (several reviews
            written the same day), so the next few events are all evidence of what comes next. Evaluation
            still scores the next event only. 1: plain next-item loss.
        target_window_decay: Weight ratio between consecutive events of the target window, in (0, 1].
        loss_recency_half_life: Full CE over sequences only: weight each target 0.5^(d / h), d the number of
            targets after it in its training row, so the latest transitions of each history (the closest
            in kind to the next, unseen one) count most; the loss is the weighted mean. 0: all equal.
        contrastive_weight: Add this times a contrastive term to the training loss (DuoRec/CL4SRec's
            unsupervised "model augmentation"; 0: off). Each training row is encoded a second time with
            fresh dropout; the two representations of a row at its last target position are the positive
            pair, the batch's other rows are the negatives (NT-Xent over cosine similarities). It spreads the user
            representations apart (against the collapse toward popular items) at the cost of one more encoder
            pass; the output layer is still scored once.
        contrastive_temperature: The contrastive term's softmax temperature (cosine similarities are divided by it).
        num_negatives: Uniform negatives per batch for `sampled_softmax` and `gbce` (shared by all positions).
        in_batch_negatives: `sampled_softmax` also uses the batch's other targets as negatives (mixed negatives).
        gbce_t: gBCE calibration parameter t in [0, 1] (1 = fully calibrated to the full softmax).
        loss_chunk_size: Positions scored at once when computing the loss; bounds the [positions x catalog]
            logits memory (gradients are computed chunk by chunk in the same pass).
        unpad_training: In training, run the position-wise layers (projections, feed-forward, norms, dropout)
            on real events only, not on padding; attention and the filter still see the padded batch. Same
            values at every real event (tested), less work where histories are short; `False` reproduces the
            dropout draws of runs made before it existed.
        recommend_chunk_size: Catalog items scored at once in `recommend()`; bounds serving memory.
    """

    model_type = "seqrec"

    vocab_size: int = 1002
    hidden_size: int = 64
    num_hidden_layers: int = 2
    num_attention_heads: int = 2
    intermediate_size: int = 256
    hidden_act: str = "gelu"
    hidden_dropout_prob: float = 0.2
    attention_dropout: float = 0.2
    max_position_embeddings: int = 200
    position_embedding_type: str = "absolute"
    embedding_norm: bool = False
    norm_style: str = "pre"
    filter_mix: float = 0.0
    filter_window: int = 0
    item_dropout: float = 0.0
    item_graph_layers: int = 0
    item_graph_gain: float = 1.0
    item_graph_edges: int = 0
    transition_prior_lags: int = 0
    transition_prior_size: int = 64
    transition_prior_reverse: bool = False
    transition_prior_recent_window: int = 0
    transition_prior_weight: float = 1.0
    transition_prior_in_loss: bool = False
    transition_prior_vocab_size: int = 0
    score_norm: bool = False
    score_temperature: float = 0.05
    layer_norm_eps: float = 1e-6
    initializer_range: float = 0.02
    tie_word_embeddings: bool = True
    pad_token_id: int = 0
    unk_token_id: int = 1
    num_special_tokens: int = 2
    use_position_bias: bool = False
    use_time_bias: bool = False
    use_time_gap_embedding: bool = False
    time_num_buckets: int = 32
    time_bucket_base: float = 2.0
    loss_type: str = "full_ce"
    loss_exclude_history: bool = False
    label_smoothing: float = 0.0
    target_window: int = 1
    target_window_decay: float = 0.5
    loss_recency_half_life: float = 0.0
    contrastive_weight: float = 0.0
    contrastive_temperature: float = 0.2
    num_negatives: int = 256
    in_batch_negatives: bool = True
    gbce_t: float = 0.75
    loss_chunk_size: int = 4096
    unpad_training: bool = True
    recommend_chunk_size: int = 65536

    @property
    def uses_timestamps(self) -> bool:
        """True when the model needs `timestamps` (any time feature is on)."""
        return bool(self.use_time_bias or self.use_time_gap_embedding)

    def __post_init__(self, **kwargs):
        super().__post_init__(**kwargs)
        self.check_fields()

    def check_fields(self) -> None:
        """Raise `ValueError` naming the field when a value or a combination is invalid.

        Runs at construction and on `from_pretrained`, so a hand-edited config.json fails loudly.
        """
        for name in (
            "vocab_size",
            "hidden_size",
            "num_hidden_layers",
            "num_attention_heads",
            "intermediate_size",
            "max_position_embeddings",
            "target_window",
            "time_num_buckets",
            "loss_chunk_size",
            "recommend_chunk_size",
        ):
            value = getattr(self, name)
            if not _is_int(value) or value <= 0:
                raise ValueError(f"SeqRecConfig.{name} must be a positive integer, got {value!r}")
        if self.hidden_size % self.num_attention_heads != 0:
            raise ValueError(
                f"SeqRecConfig.hidden_size ({self.hidden_size}) must be divisible by "
                f"num_attention_heads ({self.num_attention_heads})"
            )
        for name in ("hidden_dropout_prob", "attention_dropout", "item_dropout", "label_smoothing"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or not 0.0 <= value < 1.0:
                raise ValueError(f"SeqRecConfig.{name} must be in [0, 1), got {value!r}")
        if self.position_embedding_type not in ("absolute", "from_end", "none"):
            raise ValueError(
                "SeqRecConfig.position_embedding_type must be 'absolute', 'from_end' or 'none',"
                f" got {self.position_embedding_type!r}"
            )
        if self.norm_style not in ("pre", "post"):
            raise ValueError(f"SeqRecConfig.norm_style must be 'pre' or 'post', got {self.norm_style!r}")
        mix = self.filter_mix
        if not _is_number(mix) or not 0.0 <= mix <= 1.0:
            raise ValueError(f"SeqRecConfig.filter_mix must be a number in [0, 1], got {mix!r}")
        if not _is_int(self.filter_window) or self.filter_window < 0:
            raise ValueError(f"SeqRecConfig.filter_window must be a non-negative integer, got {self.filter_window!r}")
        for name in (
            "item_graph_layers",
            "item_graph_edges",
            "transition_prior_lags",
            "transition_prior_vocab_size",
            "transition_prior_recent_window",
        ):
            value = getattr(self, name)
            if not _is_int(value) or value < 0:
                raise ValueError(f"SeqRecConfig.{name} must be a non-negative integer, got {value!r}")
        if not _is_int(self.transition_prior_size) or self.transition_prior_size < 1:
            raise ValueError(
                f"SeqRecConfig.transition_prior_size must be a positive integer, got {self.transition_prior_size!r}"
            )
        if not _is_number(self.transition_prior_weight):
            raise ValueError(
                f"SeqRecConfig.transition_prior_weight must be a number, got {self.transition_prior_weight!r}"
            )
        if not isinstance(self.transition_prior_reverse, bool):
            raise ValueError(
                f"SeqRecConfig.transition_prior_reverse must be true or false, got {self.transition_prior_reverse!r}"
            )
        if self.transition_prior_reverse and not self.transition_prior_lags:
            raise ValueError("SeqRecConfig.transition_prior_reverse needs transition_prior_lags >= 1")
        if self.transition_prior_recent_window and not self.transition_prior_lags:
            raise ValueError("SeqRecConfig.transition_prior_recent_window needs transition_prior_lags >= 1")
        if self.transition_prior_recent_window and self.transition_prior_in_loss:
            raise ValueError(
                "SeqRecConfig.transition_prior_recent_window is a stacked term (fitted on validation): it cannot be"
                " combined with transition_prior_in_loss"
            )
        if self.transition_prior_lags and self.loss_type != "full_ce":
            raise ValueError("SeqRecConfig.transition_prior_lags is implemented for loss_type='full_ce' only")
        if not _is_number(self.item_graph_gain):
            raise ValueError(f"SeqRecConfig.item_graph_gain must be a number, got {self.item_graph_gain!r}")
        if not _is_number(self.score_temperature) or self.score_temperature <= 0:
            raise ValueError(
                f"SeqRecConfig.score_temperature must be a positive number, got {self.score_temperature!r}"
            )
        for name in ("layer_norm_eps", "initializer_range"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or value <= 0:
                raise ValueError(f"SeqRecConfig.{name} must be a positive number, got {value!r}")
        if not isinstance(self.time_bucket_base, (int, float)) or self.time_bucket_base <= 1.0:
            raise ValueError(f"SeqRecConfig.time_bucket_base must be > 1, got {self.time_bucket_base!r}")
        if self.hidden_act not in ("gelu", "relu", "silu"):
            raise ValueError(f"SeqRecConfig.hidden_act must be 'gelu', 'relu' or 'silu', got {self.hidden_act!r}")
        if not _is_int(self.num_negatives) or self.num_negatives < 0:
            raise ValueError(f"SeqRecConfig.num_negatives must be a non-negative integer, got {self.num_negatives!r}")
        if self.loss_type == "gbce" and self.num_negatives < 1:
            raise ValueError("SeqRecConfig.num_negatives must be >= 1 for loss_type='gbce'")
        if self.loss_type == "sampled_softmax" and self.num_negatives == 0 and not self.in_batch_negatives:
            raise ValueError("SeqRecConfig.num_negatives: sampled_softmax needs negatives (or in_batch_negatives)")
        if not isinstance(self.gbce_t, (int, float)) or not 0.0 <= self.gbce_t <= 1.0:
            raise ValueError(f"SeqRecConfig.gbce_t must be in [0, 1], got {self.gbce_t!r}")
        if self.loss_exclude_history and self.loss_type != "full_ce":
            raise ValueError("SeqRecConfig.loss_exclude_history is implemented for loss_type='full_ce' only")
        if not _is_number(self.contrastive_weight) or self.contrastive_weight < 0:
            raise ValueError(f"SeqRecConfig.contrastive_weight must be a number >= 0, got {self.contrastive_weight!r}")
        if not _is_number(self.contrastive_temperature) or self.contrastive_temperature <= 0:
            raise ValueError(
                f"SeqRecConfig.contrastive_temperature must be a number > 0, got {self.contrastive_temperature!r}"
            )
        if self.label_smoothing and self.loss_type != "full_ce":
            raise ValueError("SeqRecConfig.label_smoothing is implemented for loss_type='full_ce' only")
        if self.target_window > 1 and self.loss_type != "full_ce":
            raise ValueError("SeqRecConfig.target_window > 1 is implemented for loss_type='full_ce' only")
        decay = self.target_window_decay
        if not _is_number(decay) or not 0.0 < decay <= 1.0:
            raise ValueError(f"SeqRecConfig.target_window_decay must be in (0, 1], got {decay!r}")
        half_life = self.loss_recency_half_life
        if not _is_number(half_life) or half_life < 0:
            raise ValueError(f"SeqRecConfig.loss_recency_half_life must be a number >= 0, got {half_life!r}")
        if half_life and self.loss_type != "full_ce":
            raise ValueError("SeqRecConfig.loss_recency_half_life is implemented for loss_type='full_ce' only")
        if self.loss_type not in _LOSS_TYPES:
            raise ValueError(f"SeqRecConfig.loss_type must be one of {_LOSS_TYPES}, got {self.loss_type!r}")
        if not isinstance(self.num_special_tokens, int) or self.num_special_tokens < 1:
            raise ValueError(f"SeqRecConfig.num_special_tokens must be >= 1, got {self.num_special_tokens!r}")
        if self.num_special_tokens >= self.vocab_size:
            raise ValueError(
                f"SeqRecConfig.vocab_size ({self.vocab_size}) must exceed num_special_tokens "
                f"({self.num_special_tokens}): the catalog is empty"
            )
        for name in ("pad_token_id", "unk_token_id"):
            value = getattr(self, name)
            if not isinstance(value, int) or not 0 <= value < self.num_special_tokens:
                raise ValueError(
                    f"SeqRecConfig.{name} must be a special id in [0, num_special_tokens={self.num_special_tokens}),"
                    f" got {value!r}"
                )


__all__ = ["SeqRecConfig"]
