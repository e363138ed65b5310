"""Training from scratch with Accelerate: one implementation behind `python training/train.py`,
`accelerate launch training/train.py` and `seqrec-hf train`.

The same file runs on one CPU, on 2 gloo processes, or on many GPUs (DDP/FSDP/DeepSpeed are Accelerate
configuration, not code). It reads as the recipe: data -> tokenizer -> model -> optimizer -> prepare ->
loop (accumulate, clip, step) -> periodic full-ranking validation -> early stopping -> test of the best model.

Nothing is lost: checkpoints are `accelerator.save_state` folders written to a temporary name and renamed
when complete; `--resume` restarts from the latest complete one with the same data order and RNG state.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import logging
import math
import os
import re
import shutil
import string
import sys
import time
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import datasets
import torch
import yaml
from accelerate import Accelerator, DataLoaderConfiguration
from accelerate.state import AcceleratorState
from accelerate.utils import set_seed
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm
from transformers import HfArgumentParser, get_scheduler

from .configuration_seqrec import SeqRecConfig
from .data import (
    LengthGroupedSampler,
    SeqRecCollator,
    leave_one_out_split,
    load_sequences,
    prefix_rows,
    sliding_windows,
    temporal_split,
)
from .evaluation import calibrate_transition_prior, evaluate, format_metrics_table, model_score_fn
from .modeling_seqrec import (
    SeqRecForNextItemPrediction,
    build_item_graph,
    build_recent_popularity,
    build_transition_prior,
    position_histories,
    target_positions,
)
from .tokenization_seqrec import ItemTokenizer

logger = logging.getLogger(__name__)

SYNTHETIC = "synthetic"


@dataclass
class TrainingRecipe:
    """Everything a training run needs; read from a YAML recipe plus `key=value` overrides."""

    # data
    data_path: str = field(default=SYNTHETIC, metadata={"help": "Interaction file/folder, or 'synthetic'."})
    data_format: str = field(default="auto", metadata={"help": "Reader format (see seqrec_hf.data.FORMATS)."})
    user_col: str | None = field(default=None, metadata={"help": "User column of csv/tsv/parquet/jsonl files."})
    item_col: str | None = field(default=None, metadata={"help": "Item column of csv/tsv/parquet/jsonl files."})
    time_col: str | None = field(default=None, metadata={"help": "Timestamp column of tabular files."})
    min_rating: float | None = field(default=None, metadata={"help": "Keep events rated at least this."})
    k_core: int | None = field(default=None, metadata={"help": "Iterative k-core filter."})
    drop_last_user: bool = field(default=False, metadata={"help": "Drop the (truncated) last user of the file."})
    max_users: int | None = field(default=None, metadata={"help": "Keep only the first N users."})
    drop_last_events: int = field(default=0, metadata={"help": "Drop each user's last N events (shifted split)."})
    log_test_metrics: bool = field(
        default=False,
        metadata={"help": "Shifted split only: log test metrics at every validation (never used for selection)."},
    )
    split: str = field(default="leave_one_out", metadata={"help": "'leave_one_out' or 'temporal'."})
    temporal_cutoff: str | None = field(default=None, metadata={"help": "Test cutoff of the temporal split."})
    temporal_validation_cutoff: str | None = field(default=None, metadata={"help": "Validation cutoff."})
    synthetic_num_users: int = field(default=2000, metadata={"help": "Users of the synthetic data."})
    synthetic_num_items: int = field(default=500, metadata={"help": "Items of the synthetic data."})
    synthetic_seed: int = field(default=0, metadata={"help": "Seed of the synthetic data."})
    # model
    max_length: int = field(default=50, metadata={"help": "History length the model reads."})
    hidden_size: int = 64
    num_hidden_layers: int = 2
    num_attention_heads: int = 2
    intermediate_size: int = 256
    hidden_act: str = "gelu"
    hidden_dropout_prob: float = 0.2
    attention_dropout: float = 0.2
    embedding_norm: bool = field(default=False, metadata={"help": "LayerNorm on the input embeddings."})
    position_embedding_type: str = field(default="absolute", metadata={"help": "'absolute', 'from_end' or 'none'."})
    use_position_bias: bool = field(default=False, metadata={"help": "Relative position attention bias."})
    norm_style: str = field(default="pre", metadata={"help": "'pre' or 'post' LayerNorm in each block."})
    filter_mix: float = field(default=0.0, metadata={"help": "Weight of the causal low-pass branch (0: off)."})
    filter_window: int = field(default=0, metadata={"help": "Events the low-pass filter averages (0: all)."})
    item_dropout: float = field(default=0.0, metadata={"help": "Replace input events by UNK at this rate."})
    item_graph_layers: int = field(default=0, metadata={"help": "Hops of item-graph smoothing (0: off)."})
    item_graph_gain: float = field(default=1.0, metadata={"help": "Initial gain of each graph hop."})
    transition_prior_lags: int = field(default=0, metadata={"help": "Count-based transition scores (0: off)."})
    transition_prior_size: int = field(default=64, metadata={"help": "Successors kept per item and lag."})
    transition_prior_reverse: bool = field(default=False, metadata={"help": "Also score each item's predecessors."})
    transition_prior_recent_window: int = field(
        default=0, metadata={"help": "Add recent popularity: counts among each history's last N events (0: off)."}
    )
    transition_prior_counts: str = field(
        default="train",
        metadata={
            "help": "Count the prior on the train split ('train') or on the inputs of the split scored ('inputs')."
        },
    )
    transition_prior_weight: float = field(default=1.0, metadata={"help": "Initial weight of each lag."})
    transition_prior_in_loss: bool = field(default=False, metadata={"help": "Train the network with the prior."})
    calibrate_transition_prior: bool = field(
        default=True, metadata={"help": "Fit the prior's lag weights on validation after training."}
    )
    score_norm: bool = field(default=False, metadata={"help": "Cosine scores over score_temperature."})
    score_temperature: float = 0.05
    tie_word_embeddings: bool = field(
        default=True, metadata={"help": "Score items with the input item embeddings (False: a separate output layer)."}
    )
    use_time_bias: bool = False
    use_time_gap_embedding: bool = False
    time_num_buckets: int = 32
    loss_type: str = field(default="full_ce", metadata={"help": "'full_ce', 'sampled_softmax' or 'gbce'."})
    loss_exclude_history: bool = field(default=False, metadata={"help": "Full CE without seen items."})
    label_smoothing: float = field(default=0.0, metadata={"help": "Full CE label smoothing over the catalog."})
    target_window: int = field(default=1, metadata={"help": "Full CE: learn the next k events, not just one."})
    target_window_decay: float = field(default=0.5, metadata={"help": "Weight ratio of consecutive targets."})
    loss_recency_half_life: float = field(
        default=0.0, metadata={"help": "Full CE: weight targets 0.5^(d/h), d targets before the row's last (0: off)."}
    )
    contrastive_weight: float = field(
        default=0.0, metadata={"help": "Weight of the two-dropout-views contrastive term (DuoRec; 0: off)."}
    )
    contrastive_temperature: float = field(default=0.2, metadata={"help": "Temperature of the contrastive term."})
    distill_from: str | None = field(
        default=None,
        metadata={"help": "Comma-separated trained model folders: distil their averaged predictions (None: off)."},
    )
    distill_weight: float = field(default=0.5, metadata={"help": "Target mass on the teachers' distribution."})
    distill_top_k: int = field(default=32, metadata={"help": "Teacher items kept per position (renormalised)."})
    distill_temperature: float = field(default=1.0, metadata={"help": "Temperature of the teachers' softmax."})
    distill_prior: bool = field(
        default=False,
        metadata={"help": "Teachers score with their fitted stacked prior, counted on this run's training rows."},
    )
    num_negatives: int = field(default=256, metadata={"help": "Uniform negatives for sampled losses."})
    in_batch_negatives: bool = True
    gbce_t: float = 0.75
    loss_chunk_size: int = 4096
    attn_implementation: str = field(default="sdpa", metadata={"help": "'sdpa' or 'eager'."})
    # optimisation
    batch_size: int = field(default=128, metadata={"help": "Sequences per step and process."})
    gradient_accumulation_steps: int = 1
    learning_rate: float = 1e-3
    weight_decay: float = 0.0
    adam_beta2: float = 0.98
    warmup_steps: int = 100
    lr_scheduler: str = field(default="constant_with_warmup", metadata={"help": "transformers scheduler name."})
    max_grad_norm: float = 1.0
    ema_decay: float = field(
        default=0.0, metadata={"help": "Validate, select and save an exponential moving average of the weights."}
    )
    num_epochs: int = 50
    max_steps: int = field(default=-1, metadata={"help": "Stop after this many optimizer steps (-1: epochs)."})
    mixed_precision: str = field(default="no", metadata={"help": "'no', 'bf16' (CPU/GPU) or 'fp16' (GPU)."})
    seed: int = 42
    sliding_window_stride: int | None = field(default=None, metadata={"help": "Cut long histories (None: off)."})
    train_rows: str = field(
        default="sequences",
        metadata={"help": "'sequences' (one row per user, every position predicts) or 'prefixes' (one per target)."},
    )
    group_by_length: bool = field(default=False, metadata={"help": "Batch rows of similar length (less padding)."})
    # evaluation and checkpoints
    eval_every_steps: int = field(default=0, metadata={"help": "Validate every N steps (0: every epoch)."})
    eval_batch_size: int = 256
    early_stopping_patience: int = field(default=5, metadata={"help": "Validations without improvement."})
    save_every_steps: int = field(default=0, metadata={"help": "Checkpoint every N steps (0: at validation)."})
    keep_checkpoints: int = 2
    logging_steps: int = 20
    output_dir: str = "outputs/run"

    def __post_init__(self):
        if self.split not in ("leave_one_out", "temporal"):
            raise ValueError(f"split must be 'leave_one_out' or 'temporal', got {self.split!r}")
        if self.split == "temporal" and not self.temporal_cutoff:
            raise ValueError("split='temporal' needs temporal_cutoff")
        if self.mixed_precision not in ("no", "bf16", "fp16"):
            raise ValueError(f"mixed_precision must be 'no', 'bf16' or 'fp16', got {self.mixed_precision!r}")
        for name in ("batch_size", "gradient_accumulation_steps", "num_epochs", "max_length", "eval_batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.max_length < 2:
            raise ValueError("max_length must be >= 2")
        if not 0.0 <= self.ema_decay < 1.0:
            raise ValueError(f"ema_decay must be in [0, 1), got {self.ema_decay!r}")
        if self.train_rows not in ("sequences", "prefixes"):
            raise ValueError(f"train_rows must be 'sequences' or 'prefixes', got {self.train_rows!r}")
        if self.train_rows == "prefixes" and self.sliding_window_stride:
            raise ValueError("sliding_window_stride applies to train_rows='sequences' (prefix rows cover every target)")
        if self.position_embedding_type == "from_end" and self.train_rows == "sequences":
            logger.warning(
                "position_embedding_type='from_end' with train_rows='sequences': training positions are counted"
                " from the end of each training row, serving positions from the request; use train_rows='prefixes'"
            )
        if self.train_rows == "prefixes" and self.target_window > 1:
            raise ValueError("target_window > 1 needs train_rows='sequences' (a prefix row has one target)")
        if self.train_rows == "prefixes" and self.loss_recency_half_life:
            raise ValueError("loss_recency_half_life needs train_rows='sequences' (a prefix row has one target)")
        if self.distill_prior and self.distill_from is None:
            raise ValueError("distill_prior needs distill_from (the teachers whose prior is used)")
        if self.distill_from is not None:
            # canonical "a,b,c": the teachers and the model card split it the same way
            self.distill_from = ",".join(part.strip() for part in str(self.distill_from).split(",") if part.strip())
            if not self.distill_from:
                raise ValueError("distill_from: no teacher folder given (expected comma-separated model folders)")
            if self.train_rows != "sequences" or self.target_window > 1 or self.loss_type != "full_ce":
                raise ValueError(
                    "distill_from needs train_rows='sequences', target_window=1 and loss_type='full_ce'"
                    " (soft targets at every position of the full softmax)"
                )
            if self.distill_prior and self.transition_prior_lags <= 0:
                raise ValueError("distill_prior needs transition_prior_lags > 0 (the teachers' prior is counted so)")
            if not 0.0 < self.distill_weight <= 1.0 or self.distill_top_k < 1 or self.distill_temperature <= 0:
                raise ValueError(
                    "distill_weight must be in (0, 1], distill_top_k >= 1 and distill_temperature > 0, got"
                    f" {self.distill_weight!r}, {self.distill_top_k!r}, {self.distill_temperature!r}"
                )
        if self.transition_prior_counts not in ("train", "inputs"):
            raise ValueError(
                f"transition_prior_counts must be 'train' or 'inputs', got {self.transition_prior_counts!r}"
            )
        if self.transition_prior_counts == "inputs" and self.split != "leave_one_out":
            raise ValueError(
                "transition_prior_counts='inputs' needs split='leave_one_out' (validation inputs = the train split,"
                " test inputs = the train split + each user's validation item); temporal splits count the train split"
            )
        if self.transition_prior_counts == "inputs" and self.transition_prior_in_loss:
            raise ValueError(
                "transition_prior_counts='inputs' applies to a stacked prior, not to transition_prior_in_loss"
            )
        if self.log_test_metrics and self.drop_last_events < 1:
            raise ValueError(
                "log_test_metrics needs drop_last_events >= 1: test curves are logged only on a shifted split, whose"
                " test target is a real validation item; the real test split is read once, after training"
            )

    def model_config(self, vocab_size: int, item_graph_edges: int = 0) -> SeqRecConfig:
        """The model config: every recipe field that `SeqRecConfig` also has, under the same name, so a new
        model option needs only its recipe field; the length and attention backend are renamed."""
        shared = {f.name for f in dataclasses.fields(SeqRecConfig)}
        kwargs = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name in shared}
        return SeqRecConfig(
            vocab_size=vocab_size,
            max_position_embeddings=self.max_length,
            attn_implementation=self.attn_implementation,
            item_graph_edges=item_graph_edges,
            **kwargs,
        )


def build_model(recipe: TrainingRecipe, tokenizer: ItemTokenizer, train_split: datasets.Dataset):
    """A fresh model for the recipe; its item graph and transition prior, when the recipe asks for them, are
    counted on the training histories (the train split only: never a validation or test target)."""
    if recipe.item_graph_layers <= 0 and recipe.transition_prior_lags <= 0:
        return SeqRecForNextItemPrediction(recipe.model_config(len(tokenizer)))
    histories = _histories(tokenizer, train_split)
    special = tokenizer.num_special_tokens
    graph = build_item_graph(histories, len(tokenizer), special) if recipe.item_graph_layers > 0 else None
    edges = graph[1].numel() if graph is not None else 0
    config = recipe.model_config(len(tokenizer), item_graph_edges=edges)
    if recipe.transition_prior_lags > 0:
        config.transition_prior_vocab_size = len(tokenizer)
    model = SeqRecForNextItemPrediction(config)
    if graph is not None:
        model.model.item_graph.set_graph(*graph)
        logger.info("item graph: %d edges between %d items", edges, len(tokenizer))
    if recipe.transition_prior_lags > 0:
        count_transition_prior(model, recipe, tokenizer, histories)
    return model


def count_transition_prior(model, recipe: TrainingRecipe, tokenizer: ItemTokenizer, histories: list[list[int]]) -> None:
    """(Re)count the model's stacked transition prior (tables and recent popularity) on `histories` (token
    ids); its weights are kept. The one place the prior's counts are made, for training and for scoring."""
    special = tokenizer.num_special_tokens
    prior = build_transition_prior(
        histories,
        len(tokenizer),
        special,
        recipe.transition_prior_lags,
        recipe.transition_prior_size,
        reverse=recipe.transition_prior_reverse,
    )
    window = recipe.transition_prior_recent_window
    recent = build_recent_popularity(histories, len(tokenizer), special, window) if window > 0 else None
    model.transition_prior.set_prior(*prior, recent=recent)
    logger.info(
        "transition prior: %d lags, %d kept transitions from %d histories",
        recipe.transition_prior_lags,
        int((prior[1] > 0).sum()),
        len(histories),
    )


def count_prior_on_inputs(model, recipe: TrainingRecipe, tokenizer: ItemTokenizer, split: datasets.Dataset) -> None:
    """With `transition_prior_counts='inputs'`, count the stacked prior on the input histories of `split`
    (the test split: `finish` calls it). Under leave-one-out, which the setting requires, the validation
    inputs are the train split, so validation is scored with the train counts already; the test inputs add
    each user's validation item: the prior then holds every user's latest transition at test time as it does
    at validation, as a served model counting all known events would. Inputs only: no target is counted."""
    if recipe.transition_prior_counts != "inputs" or model.transition_prior is None:
        return
    count_transition_prior(model, recipe, tokenizer, _histories(tokenizer, split))


def _histories(tokenizer: ItemTokenizer, split: datasets.Dataset) -> list[list[int]]:
    return [tokenizer.convert_items_to_ids(items) for items in split["item_ids"]]


class RecipeLoader(yaml.SafeLoader):
    """SafeLoader with YAML 1.2 booleans: only true/false, so `mixed_precision: no` stays the string "no"
    (YAML 1.1 reads yes/no/on/off as booleans); bool fields still accept those words (`_coerce`)."""


RecipeLoader.yaml_implicit_resolvers = {
    first: [(tag, regexp) for tag, regexp in resolvers if tag != "tag:yaml.org,2002:bool"]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
RecipeLoader.add_implicit_resolver(
    "tag:yaml.org,2002:bool", re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"), list("tTfF")
)


def parse_overrides(pairs: list[str]) -> dict[str, Any]:
    """`key=value` strings -> dict, values read as YAML scalars (`lr=3e-4`, `use_time_bias=true`)."""
    out = {}
    for pair in pairs:
        if "=" not in pair:
            raise ValueError(f"override {pair!r} must look like key=value")
        key, value = pair.split("=", 1)
        out[key.strip().replace("-", "_")] = yaml.load(value, Loader=RecipeLoader) if value != "" else None
    return out


def load_recipe(path: str | os.PathLike | None = None, overrides: dict[str, Any] | None = None) -> TrainingRecipe:
    """Read a YAML recipe and apply overrides; unknown keys are an error naming the key and the file."""
    values: dict[str, Any] = {}
    if path is not None:
        with open(path, encoding="utf-8") as handle:
            loaded = yaml.load(handle, Loader=RecipeLoader) or {}
        if not isinstance(loaded, dict):
            raise ValueError(f"{path}: a recipe must be a YAML mapping of field: value")
        values.update(loaded)
    values.update(overrides or {})
    known = {f.name for f in dataclasses.fields(TrainingRecipe)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise ValueError(f"{path or 'overrides'}: unknown recipe field(s) {unknown}; known fields: {sorted(known)}")
    types = typing.get_type_hints(TrainingRecipe)
    values = {key: _coerce(key, value, types[key], path) for key, value in values.items()}
    (recipe,) = HfArgumentParser(TrainingRecipe).parse_dict(values, allow_extra_keys=False)
    return recipe


def recipe_of_run(run_dir: str | os.PathLike) -> TrainingRecipe:
    """The recipe a finished run recorded in its metrics.json (fields this code no longer has are dropped),
    so scripts that rescore a run rebuild its data exactly as training did."""
    path = Path(run_dir) / "metrics.json"
    if not path.is_file():
        raise FileNotFoundError(f"{run_dir}: no metrics.json (not a finished run)")
    recorded = json.loads(path.read_text())["recipe"]
    known = {f.name for f in dataclasses.fields(TrainingRecipe)}
    return TrainingRecipe(**{k: v for k, v in recorded.items() if k in known})


def _coerce(name: str, value: Any, annotation: Any, source: Any) -> Any:
    """YAML reads `3e-4` as a string and users write `true`/`1`: convert to the field's type or say which field."""
    options = typing.get_args(annotation) or (annotation,)
    optional = type(None) in options
    base = next(option for option in options if option is not type(None))
    kind = base.__name__ + (" or None" if optional else "")
    if value is None:
        if not optional:
            raise ValueError(f"{source or 'overrides'}: recipe field {name!r} cannot be empty")
        return None
    try:
        if base is bool:
            if isinstance(value, str) and value.lower() in ("true", "false", "yes", "no", "on", "off", "1", "0"):
                return value.lower() in ("true", "yes", "on", "1")
            if isinstance(value, bool):
                return value
            raise ValueError
        if base is int:
            if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
                raise ValueError
            return int(value)
        if base is float:
            if isinstance(value, bool):
                raise ValueError
            return float(value)
        if base is str:
            return str(value)
    except (TypeError, ValueError):
        raise ValueError(f"{source or 'overrides'}: recipe field {name!r} expects {kind}, got {value!r}") from None
    return value


# ----------------------------------------------------------------------------------------------------------
# Data: one function shared by training, fine-tuning, the CLI and the benchmarks
# ----------------------------------------------------------------------------------------------------------


def resolve_data_path(path: str) -> str:
    """Expand `${SEQREC_DATA_DIR}` (default: ../shared/data next to the checkout) and `~` in recipe paths."""
    default = Path(__file__).resolve().parents[2] / "shared" / "data"
    env = dict(os.environ)
    env.setdefault("SEQREC_DATA_DIR", str(default))
    return os.path.expanduser(string.Template(path).safe_substitute(env))


def load_recipe_sequences(recipe: TrainingRecipe) -> datasets.Dataset:
    """The recipe's interactions as one row per user."""
    if recipe.data_path == SYNTHETIC:
        from .synthetic import generate_synthetic_interactions

        return generate_synthetic_interactions(
            num_users=recipe.synthetic_num_users, num_items=recipe.synthetic_num_items, seed=recipe.synthetic_seed
        )
    return load_sequences(
        resolve_data_path(recipe.data_path),
        recipe.data_format,
        user_col=recipe.user_col,
        item_col=recipe.item_col,
        time_col=recipe.time_col,
        min_rating=recipe.min_rating,
        k_core=recipe.k_core,
        drop_last_user=recipe.drop_last_user,
        max_users=recipe.max_users,
        drop_last_events=recipe.drop_last_events,
    )


def prepare_data(recipe: TrainingRecipe, tokenizer: ItemTokenizer | None = None):
    """Load, split and tokenize: returns (splits, tokenizer, train_rows).

    The catalog is every item of the data set (full-ranking protocol). Training rows are the train split,
    cut into windows when `sliding_window_stride` is set, or every prefix of it with `train_rows='prefixes'`.
    """
    sequences = load_recipe_sequences(recipe)
    if recipe.split == "temporal":
        splits = temporal_split(sequences, recipe.temporal_cutoff, recipe.temporal_validation_cutoff)
    else:
        splits = leave_one_out_split(sequences)
    if tokenizer is None:
        tokenizer = ItemTokenizer.from_items(item for history in sequences["item_ids"] for item in history)
        tokenizer.model_max_length = recipe.max_length
    train_rows = splits["train"].filter(lambda row: len(row["item_ids"]) >= 2, desc="rows with a target")
    if recipe.sliding_window_stride:
        train_rows = sliding_windows(train_rows, recipe.max_length, recipe.sliding_window_stride)
    if not (recipe.use_time_bias or recipe.use_time_gap_embedding) and "timestamps" in train_rows.column_names:
        train_rows = train_rows.remove_columns("timestamps")
    train_rows = train_rows.remove_columns([c for c in train_rows.column_names if c not in ("item_ids", "timestamps")])
    if recipe.train_rows == "prefixes":
        train_rows = prefix_rows(train_rows, recipe.max_length)
    return splits, tokenizer, train_rows


def training_loader(recipe: TrainingRecipe, train_rows: datasets.Dataset, collator) -> torch.utils.data.DataLoader:
    """Shuffled training batches; with `group_by_length`, batches of rows of similar length (same seed and
    epoch, same batches: resumable)."""
    if recipe.group_by_length:
        lengths = [min(len(items), recipe.max_length) for items in train_rows["item_ids"]]
        sampler = LengthGroupedSampler(lengths, recipe.batch_size, seed=recipe.seed)
        return torch.utils.data.DataLoader(
            train_rows, batch_size=recipe.batch_size, sampler=sampler, collate_fn=collator
        )
    # A dedicated generator: creating a DataLoader iterator (at each epoch, or on resume) must not draw from
    # the global RNG, or dropout masks after a resume would differ from those of an uninterrupted run.
    return torch.utils.data.DataLoader(
        train_rows,
        batch_size=recipe.batch_size,
        shuffle=True,
        collate_fn=collator,
        generator=torch.Generator().manual_seed(recipe.seed),
    )


# ----------------------------------------------------------------------------------------------------------
# Checkpoints
# ----------------------------------------------------------------------------------------------------------

STATE_FILE = "trainer_state.json"


class TeacherEnsemble:
    """Soft targets for distillation: the averaged log-probabilities of trained networks at every position.

    Each position's target becomes `(1 - distill_weight)` on the true next item plus `distill_weight` spread
    over the teachers' `distill_top_k` most likely items (their softmax at `distill_temperature`,
    renormalised over those items), so the student learns which other items the teachers find plausible.
    The teachers score with their networks only (a stacked prior is the student's own, fitted after
    training), in eval mode, on the same batch the student reads; they must share the student's vocabulary.
    Each position's own history is left out of the teachers' distribution, as it is left out of the ranking:
    trained networks put about half their mass on the item just read (Beauty), which is never a target there.

    With `distill_prior`, the teachers score as they serve: network plus their stacked prior with the weights
    fitted on validation. The prior's counts are made again on this run's training histories (a teacher's
    saved counts may include validation items: `transition_prior_counts='inputs'`), and each position's own
    transition is left out of them (n - 1, as `transition_prior_in_loss` does), so the count of the very
    event being predicted never points at it.
    """

    def __init__(
        self,
        recipe: TrainingRecipe,
        tokenizer: ItemTokenizer,
        device: torch.device,
        train_split: datasets.Dataset | None = None,
    ):
        if not recipe.distill_from:
            raise ValueError("distill_from: no teacher folder given")
        self.models, prior_weights = [], []
        for folder in recipe.distill_from.split(","):
            if not (Path(folder) / "config.json").is_file():
                raise FileNotFoundError(f"distill_from: {folder} is not a saved model folder (no config.json)")
            teacher_vocab = ItemTokenizer.from_pretrained(folder).get_vocab()
            if teacher_vocab != tokenizer.get_vocab():
                raise ValueError(
                    f"distill_from: {folder} has another item vocabulary than this run's data"
                    f" ({len(teacher_vocab)} vs {len(tokenizer)} ids): teachers must be trained on the same data"
                )
            model = SeqRecForNextItemPrediction.from_pretrained(folder).to(device).eval()
            model.requires_grad_(False)
            if recipe.distill_prior:
                _check_teacher_prior(folder, model.config, recipe)
                prior_weights.append(model.transition_prior.weight.detach().clone())
            if model.transition_prior is not None:
                model.transition_prior.weight.zero_()  # the network's own scores
            self.models.append(model)
        self.prior = None
        if recipe.distill_prior:  # the teachers share the tables: the mean of their priors is one prior
            if train_split is None:
                raise ValueError("distill_prior: the teachers' prior is counted on the training split; pass it")
            count_transition_prior(self.models[0], recipe, tokenizer, _histories(tokenizer, train_split))
            self.prior = copy.deepcopy(self.models[0].transition_prior)
            self.prior.weight.copy_(torch.stack(prior_weights).mean(0))
        with torch.no_grad():  # frozen teachers: their concatenated item tables, scored against once per step
            self.table = torch.cat([model.item_table() for model in self.models], -1) / len(self.models)
        self.weight, self.top_k = recipe.distill_weight, recipe.distill_top_k
        self.temperature = recipe.distill_temperature
        self.num_special = tokenizer.num_special_tokens
        self.offsets: torch.Tensor | None = None
        self.cached: tuple[torch.Tensor, torch.Tensor] | None = None  # (ids, weights) after precompute()

    @torch.no_grad()
    def _top_items(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(keep, ids, weights): the positions with a target, (B, T - 1) mask, and for each of them (N, top_k)
        the teachers' most likely items with their share of `distill_weight`.

        The mean of the teachers' log-softmax differs from the mean of their logits by one constant per
        position, which neither the top items nor their softmax renormalised over those items depend on: so one
        matmul over the concatenated teachers suffices."""
        inputs = {k: batch[k] for k in ("input_ids", "attention_mask", "timestamps", "query_timestamps") if k in batch}
        labels, ids = batch["labels"], batch["input_ids"]
        keep = target_positions(labels, batch["attention_mask"], self.num_special)  # (B, T - 1)
        states = [model.score_users(model.model(**inputs).last_hidden_state[:, :-1][keep]) for model in self.models]
        logits = torch.cat(states, -1) @ self.table.t() / self.temperature  # (N, V): the teachers' mean logits
        if self.prior is not None:  # sparse counts of each position's next item, its own transition left out
            targets = torch.nn.functional.pad(labels[:, 1:], (0, 1), value=-100)
            index, value = self.prior(ids, batch["attention_mask"], targets)
            logits = logits.float().scatter_add(1, index[:, :-1][keep], value[:, :-1][keep] / self.temperature)
            dense = self.prior.dense(logits.shape[-1])
            if dense is not None:
                logits = logits + dense / self.temperature
        logits[:, : self.num_special] = float("-inf")  # never candidates
        # as evaluation: what a position has seen is not recommended (0, the padding id, is special anyway)
        logits.scatter_(1, position_histories(ids)[:, :-1][keep], float("-inf"))
        top = logits.float().topk(self.top_k, dim=-1)
        return keep, top.indices, self.weight * torch.softmax(top.values, -1)

    @torch.no_grad()
    def precompute(self, rows: datasets.Dataset, collator, batch_size: int = 256, show_progress: bool = True) -> None:
        """Score every training row once, so that training steps read the targets instead of running the
        teachers: frozen teachers in eval mode give a row the same targets in every epoch, and scoring them
        cost ~0.8 of a student step (Beauty/Sports recipes on CPU). Memory: top_k x 8 bytes per target.

        Entries are stored row after row, each row's target positions in order; a batch finds its own by
        `row_index` (the collator passes it through) and the rank of each target within its row, which
        padding does not change."""
        counts, ids, weights = [], [], []
        for start in tqdm(range(0, len(rows), batch_size), desc="teacher targets", disable=not show_progress):
            batch = collator([rows[i] for i in range(start, min(start + batch_size, len(rows)))])
            batch = {key: value.to(self.table.device) for key, value in batch.items()}
            keep, top_ids, top_weights = self._top_items(batch)
            counts.append(keep.sum(1))
            ids.append(top_ids.to(torch.int32))
            weights.append(top_weights)
        counts = torch.cat(counts)
        self.offsets = torch.cat([counts.new_zeros(1), counts.cumsum(0)[:-1]])  # first entry of each row
        self.cached = torch.cat(ids), torch.cat(weights)

    @torch.no_grad()
    def __call__(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The batch plus `target_ids`/`target_weights` (B, T, 1 + top_k): column 0 is the true next item.

        Only the positions with a target are scored; after `precompute`, batches with a `row_index` read them
        from the cache (the row index is dropped from the returned batch)."""
        batch = dict(batch)
        rows = batch.pop("row_index", None)
        labels = batch["labels"]
        if rows is not None and self.cached is not None:
            keep = target_positions(labels, batch["attention_mask"], self.num_special)
            entry = (self.offsets[rows][:, None] + keep.cumsum(1) - 1)[keep]  # the k-th target of its row
            top_ids, top_weights = self.cached[0][entry].long(), self.cached[1][entry]
        else:
            keep, top_ids, top_weights = self._top_items(batch)
        next_item = torch.nn.functional.pad(labels[:, 1:], (0, 1), value=0).clamp(min=0)  # position t -> t + 1
        target_ids = next_item[..., None].repeat(1, 1, self.top_k + 1)
        target_weights = torch.zeros(target_ids.shape, dtype=torch.float32, device=target_ids.device)
        target_weights[..., 0] = 1.0  # positions without a target: ignored by the loss, still well-formed
        target_ids[:, :-1][keep, 1:] = top_ids
        true_item = torch.full_like(top_weights[:, :1], 1.0 - self.weight)
        target_weights[:, :-1][keep] = torch.cat([true_item, top_weights], -1)
        return {**batch, "target_ids": target_ids, "target_weights": target_weights}


def _check_teacher_prior(folder: str, config: SeqRecConfig, recipe: TrainingRecipe) -> None:
    """With `distill_prior`, a teacher's prior must be the one this run counts (same lags, size, window)."""
    fields = ("transition_prior_lags", "transition_prior_size", "transition_prior_reverse")
    fields += ("transition_prior_recent_window",)
    differ = [f"{name}={getattr(config, name)!r} (this run: {getattr(recipe, name)!r})" for name in fields
              if getattr(config, name) != getattr(recipe, name)]  # fmt: skip
    if config.transition_prior_lags <= 0 or differ:
        raise ValueError(
            f"distill_prior: {folder} needs a stacked prior like this run's; "
            + (", ".join(differ) if differ else "it has none (transition_prior_lags=0)")
        )


def latest_checkpoint(output_dir: str | os.PathLike) -> Path | None:
    """The newest complete checkpoint (`checkpoints/step-N` with its state file), or None."""
    folder = Path(output_dir) / "checkpoints"
    if not folder.is_dir():
        return None
    complete = [p for p in folder.glob("step-*") if (p / STATE_FILE).is_file() and p.name[5:].isdigit()]
    return max(complete, key=lambda p: int(p.name[5:]), default=None)


def save_checkpoint(
    accelerator: Accelerator, output_dir: Path, state: dict[str, Any], keep: int, average: WeightAverage | None = None
) -> Path:
    """`save_state` into a temporary folder, then rename: a crash mid-write never leaves a half checkpoint."""
    folder = output_dir / "checkpoints"
    final = folder / f"step-{state['global_step']}"
    tmp = folder / f"tmp-step-{state['global_step']}"
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp), safe_serialization=True)
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        if average is not None:
            average.save(tmp)
        (tmp / STATE_FILE).write_text(json.dumps(state, indent=1))
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        done = sorted((p for p in folder.glob("step-*") if p.name[5:].isdigit()), key=lambda p: int(p.name[5:]))
        for old in done[:-keep] if keep > 0 else []:
            shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()
    return final


def save_pretrained_atomic(model, tokenizer, path: Path) -> None:
    """save_pretrained into a temporary folder, then swap it in."""
    tmp = path.with_name(path.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    old = path.with_name(path.name + ".old")
    shutil.rmtree(old, ignore_errors=True)
    if path.exists():
        os.replace(path, old)
    os.replace(tmp, path)
    shutil.rmtree(old, ignore_errors=True)


# ----------------------------------------------------------------------------------------------------------
# The training loop
# ----------------------------------------------------------------------------------------------------------


class WeightAverage:
    """Exponential moving average of a model's weights, kept in fp32 beside the training model.

    The decay ramps up as min(decay, (1 + t) / (10 + t)) so the random initial weights are forgotten quickly.
    `averaged()` returns a copy of the model holding the average (what is validated, selected and saved);
    checkpoints store it as `ema.safetensors`, so a resumed run continues the same average.
    """

    FILE = "ema.safetensors"

    def __init__(self, model: torch.nn.Module, decay: float):
        self.decay = decay
        self.steps = 0
        self.model = model
        self.names = [name for name, _ in model.named_parameters()]  # tied weights appear once
        self.shadow = [p.detach().float().clone() for p in model.parameters()]
        self._copy: torch.nn.Module | None = None

    @torch.no_grad()
    def update(self) -> None:
        self.steps += 1
        decay = min(self.decay, (1 + self.steps) / (10 + self.steps))
        params = [p.detach().float() for p in self.model.parameters()]
        torch._foreach_lerp_(self.shadow, params, 1.0 - decay)

    @torch.no_grad()
    def averaged(self) -> torch.nn.Module:
        if self._copy is None:
            self._copy = copy.deepcopy(self.model)
        for target, value in zip(self._copy.parameters(), self.shadow):
            target.copy_(value)
        return self._copy.eval()

    def save(self, folder: Path) -> None:
        tensors = dict(zip(self.names, self.shadow))
        save_file(tensors, str(folder / self.FILE), metadata={"steps": str(self.steps)})

    def load(self, folder: Path) -> None:
        path = folder / self.FILE
        if not path.is_file():
            raise FileNotFoundError(f"{path}: the checkpoint has no weight average but the recipe sets ema_decay")
        tensors = load_file(str(path))
        with safe_open(str(path), framework="pt") as handle:
            self.steps = int(handle.metadata()["steps"])
        missing = [name for name in self.names if name not in tensors]
        if missing:
            raise ValueError(f"{path}: no average for {missing[:5]}: the checkpoint belongs to another model")
        self.shadow = [tensors[name].to(value.device) for name, value in zip(self.names, self.shadow)]


def run_evaluation(accelerator, model, rows, tokenizer, recipe, desc: str) -> dict[str, float]:
    """Full-ranking metrics on the main process (others wait), in fp32 whatever the training precision: bf16
    logits (8 significant bits) tie items whose scores differ, and under the protocol's pessimistic ties every
    tie counts against the target (on Beauty that cost ~0.0003 NDCG@10)."""
    metrics: dict[str, float] = {}
    if accelerator.is_main_process:
        metrics = evaluate(
            model_score_fn(accelerator.unwrap_model(model)),
            rows,
            tokenizer,
            batch_size=recipe.eval_batch_size,
            max_length=recipe.max_length,
            show_progress=accelerator.is_local_main_process,
        )
        logger.info("%s: NDCG@10 %.4f HR@10 %.4f", desc, metrics["NDCG@10"], metrics["HR@10"])
    accelerator.wait_for_everyone()
    model.train()
    return metrics


def cpu_has_native_bf16() -> bool | None:
    """Whether this CPU computes bf16 natively (AVX-512 BF16 or AMX); None where torch cannot tell.

    Without it, PyTorch emulates bf16 matmuls, and autocast makes CPU training several times slower instead of
    faster (Beauty recipe, an AVX2-only EPYC, 2 threads: 5.2 s/step bf16 vs 0.74 s/step fp32).
    """
    checks = [getattr(torch.cpu, name, None) for name in ("_is_avx512_bf16_supported", "_is_amx_tile_supported")]
    if None in checks:  # private torch helpers (cpuinfo-based, every OS): absent in some torch builds
        return None
    return any(check() for check in checks)


def train(recipe: TrainingRecipe, resume: bool = False) -> dict[str, Any]:
    """Train a model from scratch as the recipe says; returns the metrics written to metrics.json."""
    output_dir = Path(recipe.output_dir)
    # Accelerate keeps its settings in a process-wide singleton; a second run in the same process (the demo,
    # the quality benchmark, a notebook) may use another precision. The process group (PartialState) stays.
    AcceleratorState._reset_state()
    accelerator = Accelerator(
        mixed_precision=recipe.mixed_precision,
        gradient_accumulation_steps=recipe.gradient_accumulation_steps,
        dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True),
    )
    set_seed(recipe.seed)
    is_main = accelerator.is_main_process
    if recipe.mixed_precision == "bf16" and accelerator.device.type == "cpu" and cpu_has_native_bf16() is False:
        logger.warning(
            "mixed_precision=bf16 on a CPU without AVX-512 BF16/AMX: bf16 is emulated and training runs several"
            " times slower than fp32; pass mixed_precision=no (quoted or not) unless you need the bf16 numbers"
        )
    if is_main:
        output_dir.mkdir(parents=True, exist_ok=True)

    splits, tokenizer, train_rows = prepare_data(recipe)
    if recipe.distill_from:  # the teachers' targets are precomputed once per row (TeacherEnsemble.precompute)
        train_rows = train_rows.add_column("row_index", list(range(len(train_rows))))
    collator = SeqRecCollator(tokenizer, max_length=recipe.max_length)
    loader = training_loader(recipe, train_rows, collator)
    model = build_model(recipe, tokenizer, splits["train"])
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if not param.requires_grad:  # e.g. the stacked prior's weights, fitted after training
            continue
        (no_decay if param.dim() < 2 or "norm" in name or "embed_positions" in name else decay).append(param)
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": recipe.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=recipe.learning_rate,
        betas=(0.9, recipe.adam_beta2),
    )
    steps_per_epoch = math.ceil(len(loader) / (recipe.gradient_accumulation_steps * accelerator.num_processes))
    total_steps = recipe.max_steps if recipe.max_steps > 0 else steps_per_epoch * recipe.num_epochs
    scheduler = get_scheduler(
        recipe.lr_scheduler,
        optimizer,
        num_warmup_steps=recipe.warmup_steps * accelerator.num_processes,
        num_training_steps=total_steps * accelerator.num_processes,
    )
    model, optimizer, loader, scheduler = accelerator.prepare(model, optimizer, loader, scheduler)
    average = WeightAverage(accelerator.unwrap_model(model), recipe.ema_decay) if recipe.ema_decay > 0 else None
    teachers = None
    if recipe.distill_from:
        teachers = TeacherEnsemble(recipe, tokenizer, accelerator.device, splits["train"])
        teachers.precompute(train_rows, collator, recipe.batch_size, show_progress=accelerator.is_local_main_process)

    state = {"global_step": 0, "epoch": 0, "best_ndcg": -1.0, "best_step": 0, "bad_evals": 0, "tokens": 0}
    state["train_seconds"] = 0.0
    state["learning_rate"] = recipe.learning_rate
    checkpoint = latest_checkpoint(output_dir) if resume else None
    if not resume and is_main:
        stale = [output_dir / name for name in ("checkpoints", "best_model", "train_log.jsonl", "metrics.json")]
        stale = [path for path in stale if path.exists()]
        if stale:  # a fresh run must not pick up another run's best model or log
            logger.warning("%s holds a previous run; starting afresh (use --resume to continue it)", output_dir)
            for path in stale:
                if path.is_dir():
                    shutil.rmtree(path)
                else:
                    path.unlink()
    accelerator.wait_for_everyone()
    if resume and checkpoint is None and is_main:
        logger.warning("--resume: no complete checkpoint in %s, starting from scratch", output_dir)
    if checkpoint is not None:
        accelerator.load_state(str(checkpoint))
        if average is not None:
            average.load(checkpoint)
        state.update(json.loads((checkpoint / STATE_FILE).read_text()))
        _apply_new_learning_rate(optimizer, scheduler, state.get("learning_rate"), recipe.learning_rate)
        state["learning_rate"] = recipe.learning_rate
        if is_main:
            logger.info("resumed from %s (step %d)", checkpoint, state["global_step"])

    eval_every = recipe.eval_every_steps or steps_per_epoch
    save_every = recipe.save_every_steps or eval_every
    log_path = output_dir / "train_log.jsonl"
    best_dir = output_dir / "best_model"
    progress = tqdm(
        total=total_steps, initial=state["global_step"], desc="training", disable=not accelerator.is_local_main_process
    )
    model.train()
    stop = state["global_step"] >= total_steps or state["bad_evals"] >= recipe.early_stopping_patience
    window = {"loss": 0.0, "batches": 0, "tokens": 0, "seconds": 0.0}
    while not stop:
        epoch = state["epoch"]
        loader.set_epoch(epoch)
        done_in_epoch = state["global_step"] - epoch * steps_per_epoch
        batches = loader
        if done_in_epoch > 0:
            batches = accelerator.skip_first_batches(loader, done_in_epoch * recipe.gradient_accumulation_steps)
        step_start = time.perf_counter()
        for batch in batches:
            with accelerator.accumulate(model):
                loss = model(**(teachers(batch) if teachers is not None else batch)).loss
                mean_loss = accelerator.reduce(loss.detach(), reduction="mean").item()  # same on every process
                if not math.isfinite(mean_loss):
                    raise NonFiniteLossError(_non_finite_message(mean_loss, state, output_dir, recipe))
                accelerator.backward(loss)
                if accelerator.sync_gradients and recipe.max_grad_norm > 0:
                    accelerator.clip_grad_norm_(model.parameters(), recipe.max_grad_norm)
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad()
            if average is not None and accelerator.sync_gradients:
                average.update()
            targets = count_targets(batch)
            window["tokens"] += int(accelerator.reduce(targets, reduction="sum"))
            window["loss"] += mean_loss
            window["batches"] += 1
            if not accelerator.sync_gradients:
                continue
            state["global_step"] += 1
            step = state["global_step"]
            now = time.perf_counter()
            window["seconds"] += now - step_start  # training time only: validation and checkpoints excluded
            step_start = now
            progress.update(1)
            if step % recipe.logging_steps == 0 or step == total_steps:
                record = {
                    "step": step,
                    "epoch": epoch,
                    "loss": window["loss"] / max(1, window["batches"]),
                    "lr": scheduler.get_last_lr()[0],
                    "tokens_per_second": window["tokens"] / max(window["seconds"], 1e-9),
                }
                state["tokens"] += window["tokens"]
                state["train_seconds"] += window["seconds"]
                window = {"loss": 0.0, "batches": 0, "tokens": 0, "seconds": 0.0}
                progress.set_postfix(loss=f"{record['loss']:.3f}", tok_s=f"{record['tokens_per_second']:.0f}")
                if is_main:
                    with open(log_path, "a", encoding="utf-8") as log:
                        log.write(json.dumps(record) + "\n")
            if step % eval_every == 0 or step == total_steps:
                scored = average.averaged() if average is not None else model  # the model that is selected
                metrics = run_evaluation(accelerator, scored, splits["validation"], tokenizer, recipe, "validation")
                if is_main:
                    improved = metrics["NDCG@10"] > state["best_ndcg"]
                    if improved:
                        state.update(best_ndcg=metrics["NDCG@10"], best_step=step, bad_evals=0)
                        save_pretrained_atomic(accelerator.unwrap_model(scored), tokenizer, best_dir)
                    else:
                        state["bad_evals"] += 1
                record = {"step": step, "epoch": epoch, "validation": metrics}
                if recipe.log_test_metrics:  # shifted split only (checked in the recipe): a monitor, not a selector
                    record["test"] = run_evaluation(accelerator, scored, splits["test"], tokenizer, recipe, "test")
                model.train()
                if is_main:
                    with open(log_path, "a", encoding="utf-8") as log:
                        log.write(json.dumps(record) + "\n")
                state = broadcast_state(accelerator, state)
                step_start = time.perf_counter()
            if step % save_every == 0 or step == total_steps:
                if step % steps_per_epoch == 0:
                    state["epoch"] = epoch + 1
                save_checkpoint(accelerator, output_dir, state, recipe.keep_checkpoints, average)
                step_start = time.perf_counter()
            if step >= total_steps or state["bad_evals"] >= recipe.early_stopping_patience:
                stop = True
                break
        else:
            state["epoch"] = epoch + 1
    progress.close()
    return finish(accelerator, recipe, tokenizer, splits, state)


def count_targets(batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Real target positions of a batch (labels shifted by one, padding and [UNK] excluded; prefix rows: one
    per row with a known target)."""
    labels = batch["labels"]
    if labels.dim() == 1:
        return (labels >= 0).sum()
    return ((labels[:, 1:] >= 0) & batch["attention_mask"][:, :-1].bool()).sum()


def _apply_new_learning_rate(optimizer, scheduler, saved: float | None, wanted: float) -> None:
    """`--resume learning_rate=...` after a divergence: rescale the restored optimizer and schedule."""
    if saved is None or saved == wanted:
        return
    factor = wanted / saved
    for group in optimizer.param_groups:
        group["lr"] *= factor
        if "initial_lr" in group:
            group["initial_lr"] *= factor
    inner = getattr(scheduler, "scheduler", scheduler)
    inner.base_lrs = [lr * factor for lr in inner.base_lrs]
    logger.info("learning rate changed on resume: %g -> %g", saved, wanted)


class NonFiniteLossError(RuntimeError):
    """Training diverged (NaN/inf loss). Nothing after the last good checkpoint is written."""


def _non_finite_message(value: float, state: dict[str, Any], output_dir: Path, recipe: TrainingRecipe) -> str:
    checkpoint = latest_checkpoint(output_dir)
    where = f"the last good checkpoint is {checkpoint}" if checkpoint else "no checkpoint was written yet"
    lower = recipe.learning_rate / 10
    return (
        f"loss is {value} at step {state['global_step'] + 1} (epoch {state['epoch']}): training stopped; {where}. "
        f"Resume with a lower learning rate, e.g.: seqrec-hf train --config <recipe> --output-dir {output_dir} "
        f"--resume learning_rate={lower:g} (or lower max_grad_norm / enable warm-up)"
    )


def broadcast_state(accelerator: Accelerator, state: dict[str, Any]) -> dict[str, Any]:
    """Early-stopping decisions are made on the main process; every process must follow them."""
    if accelerator.num_processes == 1:
        return state
    from accelerate.utils import broadcast_object_list

    holder = [state]
    broadcast_object_list(holder, from_process=0)
    return holder[0]


def finish(accelerator, recipe, tokenizer, splits, state) -> dict[str, Any]:
    """Test the best model, write it with its tokenizer, metrics.json and a model card to output_dir."""
    output_dir = Path(recipe.output_dir)
    result: dict[str, Any] = {}
    if accelerator.is_main_process:
        best_dir = output_dir / "best_model"
        if not best_dir.is_dir():
            raise RuntimeError(f"no validated model in {best_dir}: training ran no validation")
        best = SeqRecForNextItemPrediction.from_pretrained(best_dir).to(accelerator.device)  # train-split counts

        def score(split: str, show_progress: bool = False) -> dict[str, float]:  # fp32, as every evaluation
            return evaluate(
                model_score_fn(best),
                splits[split],
                tokenizer,
                batch_size=recipe.eval_batch_size,
                max_length=recipe.max_length,
                show_progress=show_progress,
            )

        validation = _best_validation(output_dir / "train_log.jsonl", state["best_step"])
        stacked = best.transition_prior is not None and not recipe.transition_prior_in_loss
        if stacked and recipe.calibrate_transition_prior:  # jointly trained weights are kept as learned
            # stacking: the lag weights are fitted on held-out rows (validation), never on test
            calibration = calibrate_transition_prior(
                best, splits["validation"], tokenizer, batch_size=recipe.eval_batch_size, max_length=recipe.max_length
            )
            result["validation_at_selection"] = validation
            validation = score("validation")
            result["transition_prior_calibration"] = calibration
            logger.info("transition prior weights fitted on validation: %s", calibration["weights"])
        if stacked and recipe.transition_prior_counts == "inputs":
            result["test_prior_train_counts"] = score("test")  # ablation beside: the counts of best_model
            count_prior_on_inputs(best, recipe, tokenizer, splits["test"])  # saved so: the served model's counts
        test = score("test", show_progress=True)
        if best.transition_prior is not None:  # ablation, reported beside (the prior was chosen on validation)
            fitted = best.transition_prior.weight.detach().clone()
            with torch.no_grad():
                best.transition_prior.weight.zero_()
            result["test_network_only"] = score("test")
            with torch.no_grad():
                best.transition_prior.weight.copy_(fitted)
        seconds = state["train_seconds"]
        result.update(
            {
                "validation": validation,
                "test": test,
                "best_step": state["best_step"],
                "global_step": state["global_step"],
                "train_seconds": seconds,
                "tokens_per_second": state["tokens"] / seconds if seconds > 0 else None,
                "num_parameters": sum(p.numel() for p in best.parameters()),
                "num_processes": accelerator.num_processes,
                "mixed_precision": recipe.mixed_precision,
                "recipe": dataclasses.asdict(recipe),
            }
        )
        save_pretrained_atomic(best, tokenizer, output_dir / "model.tmpdir")
        for name in os.listdir(output_dir / "model.tmpdir"):
            os.replace(output_dir / "model.tmpdir" / name, output_dir / name)
        shutil.rmtree(output_dir / "model.tmpdir")
        from .plotting import plot_training_curve

        plot = plot_training_curve(output_dir / "train_log.jsonl")  # None without matplotlib (optional extra)
        result["plot"] = plot.name if plot is not None else None  # the card shows it
        _write_json_atomic(output_dir / "metrics.json", result)
        from .modelcard import write_model_card

        write_model_card(output_dir, result)
        print(format_metrics_table({k: v for k, v in test.items() if not k.startswith("num_")}, "test metrics"))
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return result


def _best_validation(log_path: Path, best_step: int) -> dict[str, float]:
    found: dict[str, float] = {}
    with open(log_path, encoding="utf-8") as log:
        for line in log:
            record = json.loads(line)
            if record.get("step") == best_step and "validation" in record:
                found = record["validation"]
    return found


def _write_json_atomic(path: Path, payload: dict[str, Any]) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(payload, indent=2, default=str))
    os.replace(tmp, path)


def build_arg_parser():
    import argparse

    parser = argparse.ArgumentParser(
        prog="seqrec-hf train",
        description="Train a SeqRec model from scratch (Accelerate: 1 CPU to many GPUs).",
        epilog="Example: seqrec-hf train --config training/configs/demo.yaml --output-dir outputs/demo max_steps=200",
    )
    parser.add_argument("--config", help="YAML recipe (see training/configs/)")
    parser.add_argument("--output-dir", help="where checkpoints, the best model and metrics go")
    parser.add_argument("--max-steps", type=int, help="stop after N optimizer steps")
    parser.add_argument("--resume", action="store_true", help="continue from the latest complete checkpoint")
    parser.add_argument("overrides", nargs="*", help="recipe overrides as key=value")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_arg_parser().parse_args(argv)
    overrides = parse_overrides(args.overrides)
    if args.output_dir:
        overrides["output_dir"] = args.output_dir
    if args.max_steps is not None:
        overrides["max_steps"] = args.max_steps
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("accelerate").setLevel(logging.ERROR)  # per-file checkpoint chatter
    recipe = load_recipe(args.config, overrides)
    try:
        train(recipe, resume=args.resume)
    except NonFiniteLossError as err:
        print(f"error: {err}", file=sys.stderr)
        return 3
    return 0


if __name__ == "__main__":
    sys.exit(main())
