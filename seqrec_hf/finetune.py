"""Fine-tune a saved SeqRec checkpoint on new data with the Hugging Face `Trainer`.

Typical use: a model trained on last quarter's interactions is refreshed on this quarter's. Items the
checkpoint never saw are added to the tokenizer and the embedding matrix is resized before training.

Evaluation inside the Trainer stays bounded in memory: `preprocess_logits_for_metrics` turns each batch's
[batch, catalog] scores into one rank per user before anything is gathered, and `compute_metrics` averages
the ranks with the same functions as `seqrec_hf.evaluation`. The final test of the best model uses the full
protocol evaluator (full history excluded).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import datasets
import torch
from transformers import EvalPrediction, Trainer, TrainingArguments

from .data import SeqRecCollator, leave_one_out_split, load_sequences, temporal_split
from .evaluation import compute_ranks, evaluate, format_metrics_table, metrics_from_ranks, model_score_fn
from .modeling_seqrec import SeqRecForNextItemPrediction
from .tokenization_seqrec import ItemTokenizer

logger = logging.getLogger(__name__)


def grow_vocabulary(model: SeqRecForNextItemPrediction, tokenizer: ItemTokenizer, sequences) -> int:
    """Add the items of `sequences` unknown to the tokenizer and resize the (tied) embeddings; returns the count."""
    added = tokenizer.add_items(item for history in sequences for item in history)
    if added:
        model.resize_token_embeddings(len(tokenizer))
        model.config.vocab_size = len(tokenizer)
    return added


def with_target_appended(rows: datasets.Dataset) -> datasets.Dataset:
    """Evaluation rows as one sequence `history + [target]` so the model's own loss and logits serve the Trainer."""

    def append(row: dict[str, Any]) -> dict[str, Any]:
        out = {"item_ids": row["item_ids"] + [row["target"]]}
        if "timestamps" in row and row.get("target_timestamp") is not None:
            out["timestamps"] = row["timestamps"] + [row["target_timestamp"]]
        return out

    keep = [c for c in rows.column_names if c in ("item_ids", "timestamps")]
    return rows.map(append, remove_columns=[c for c in rows.column_names if c not in keep], desc="eval sequences")


@dataclass
class EvalCollator(SeqRecCollator):
    """The training collator plus `logits_to_keep=2`: position -2 scores the appended target."""

    def __call__(self, features):
        batch = super().__call__(features)
        batch["logits_to_keep"] = 2
        return batch


class NextItemTrainer(Trainer):
    """`Trainer` whose evaluation batches come from their own collator (target appended, two logits kept)."""

    def __init__(self, *args: Any, eval_data_collator: EvalCollator, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.eval_data_collator = eval_data_collator

    def get_eval_dataloader(self, eval_dataset=None):
        train_collator, self.data_collator = self.data_collator, self.eval_data_collator
        try:
            return super().get_eval_dataloader(eval_dataset)
        finally:
            self.data_collator = train_collator


def make_preprocess_logits(num_special_tokens: int):
    """(B, 2, V) logits -> (B,) pessimistic ranks of the last label, history (what the model read) excluded."""

    def preprocess(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        if isinstance(logits, tuple):
            logits = logits[0]
        scores = logits[:, 0].float()  # prediction after the history, i.e. for the appended target
        targets = labels[:, -1]
        excluded = torch.zeros_like(scores, dtype=torch.bool)
        history = labels[:, :-1].clamp(min=0)  # -100 (padding) -> 0, a special id excluded anyway
        excluded.scatter_(1, history, True)
        excluded[:, :num_special_tokens] = True
        ranks = compute_ranks(scores, targets.clamp(min=0), excluded).float()
        return torch.where(targets >= num_special_tokens, ranks, torch.full_like(ranks, float("inf")))

    return preprocess


def compute_metrics(prediction: EvalPrediction) -> dict[str, float]:
    ranks = torch.as_tensor(prediction.predictions).flatten()
    return metrics_from_ranks(ranks)


def finetune(
    model_dir: str,
    data: str,
    output_dir: str,
    data_format: str = "auto",
    split: str = "leave_one_out",
    temporal_cutoff: str | None = None,
    num_train_epochs: float = 3.0,
    learning_rate: float = 5e-4,
    batch_size: int = 128,
    max_steps: int = -1,
    seed: int = 42,
    bf16: bool = False,
    load_sequences_kwargs: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Fine-tune `model_dir` on `data`, keep the best epoch by validation NDCG@10, test it, save to output_dir."""
    tokenizer = ItemTokenizer.from_pretrained(model_dir)
    model = SeqRecForNextItemPrediction.from_pretrained(model_dir)
    sequences = load_sequences(data, data_format, **(load_sequences_kwargs or {}))
    if split == "temporal":
        if temporal_cutoff is None:
            raise ValueError("split='temporal' needs temporal_cutoff")
        splits = temporal_split(sequences, temporal_cutoff)
        if "validation" not in splits:
            splits["validation"] = splits["test"]
    else:
        splits = leave_one_out_split(sequences)
    added = grow_vocabulary(model, tokenizer, sequences["item_ids"])
    logger.info("fine-tuning %s: %d new items added (vocabulary %d)", model_dir, added, len(tokenizer))

    max_length = model.config.max_position_embeddings
    keep_time = model.config.uses_timestamps and "timestamps" in splits["train"].column_names
    train_rows = splits["train"].filter(lambda r: len(r["item_ids"]) >= 2)
    train_rows = train_rows.select_columns(["item_ids", "timestamps"] if keep_time else ["item_ids"])
    eval_rows = with_target_appended(splits["validation"])
    if not keep_time and "timestamps" in eval_rows.column_names:
        eval_rows = eval_rows.remove_columns("timestamps")

    args = TrainingArguments(
        output_dir=output_dir,
        num_train_epochs=num_train_epochs,
        max_steps=max_steps,
        learning_rate=learning_rate,
        per_device_train_batch_size=batch_size,
        per_device_eval_batch_size=batch_size,
        eval_strategy="epoch" if max_steps <= 0 else "steps",
        save_strategy="epoch" if max_steps <= 0 else "steps",
        eval_steps=max(1, max_steps // 2) if max_steps > 0 else None,
        save_steps=max(1, max_steps // 2) if max_steps > 0 else None,
        load_best_model_at_end=True,
        metric_for_best_model="NDCG@10",
        greater_is_better=True,
        save_total_limit=2,
        remove_unused_columns=False,
        report_to="none",
        logging_steps=10,
        seed=seed,
        bf16=bf16,
        disable_tqdm=False,
        dataloader_pin_memory=False,
    )
    trainer = NextItemTrainer(
        eval_data_collator=EvalCollator(tokenizer, max_length=max_length),
        model=model,
        args=args,
        train_dataset=train_rows,
        eval_dataset=eval_rows,
        data_collator=SeqRecCollator(tokenizer, max_length=max_length),
        processing_class=tokenizer,
        compute_metrics=compute_metrics,
        preprocess_logits_for_metrics=make_preprocess_logits(tokenizer.num_special_tokens),
    )
    trainer.train()
    validation = trainer.evaluate()

    best = trainer.model.eval()
    test = evaluate(model_score_fn(best), splits["test"], tokenizer, max_length=max_length)
    trainer.save_model(output_dir)  # best model (load_best_model_at_end) + tokenizer, safetensors
    result = {
        "validation": {k.removeprefix("eval_"): v for k, v in validation.items()},
        "test": test,
        "base_model": str(model_dir),
        "new_items": added,
        "vocab_size": len(tokenizer),
        "recipe": {"data_path": data, "split": split, "learning_rate": learning_rate, "batch_size": batch_size},
    }
    Path(output_dir, "metrics.json").write_text(json.dumps(result, indent=2, default=str))
    print(format_metrics_table({k: v for k, v in test.items() if not k.startswith("num_")}, "test metrics"))
    return result


def build_arg_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="seqrec-hf finetune", description="Fine-tune a saved SeqRec model on new data with the HF Trainer."
    )
    parser.add_argument("--model", required=True, help="checkpoint folder or Hub repo id")
    parser.add_argument("--data", required=True, help="interaction file of the new data")
    parser.add_argument("--format", default="auto", help="reader format (see seqrec_hf.data.FORMATS)")
    parser.add_argument("--output-dir", required=True)
    parser.add_argument("--split", default="leave_one_out", choices=("leave_one_out", "temporal"))
    parser.add_argument("--temporal-cutoff", help="cutoff of the temporal split (unix seconds or ISO date)")
    parser.add_argument("--epochs", type=float, default=3.0)
    parser.add_argument("--max-steps", type=int, default=-1)
    parser.add_argument("--learning-rate", type=float, default=5e-4)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--bf16", action="store_true", help="bf16 mixed precision (CPU or GPU)")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_arg_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    finetune(
        args.model,
        args.data,
        args.output_dir,
        data_format=args.format,
        split=args.split,
        temporal_cutoff=args.temporal_cutoff,
        num_train_epochs=args.epochs,
        learning_rate=args.learning_rate,
        batch_size=args.batch_size,
        max_steps=args.max_steps,
        seed=args.seed,
        bf16=args.bf16,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
