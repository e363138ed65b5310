"""Model cards rendered from `metrics.json` through `huggingface_hub.ModelCard`.

The card is the honest summary of a checkpoint: what it is, what data and protocol produced its numbers,
and a snippet that runs. Its YAML `model-index` holds every evaluation result so the Hub can show them.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from huggingface_hub import EvalResult, ModelCard, ModelCardData

TEMPLATE_PATH = Path(__file__).with_name("model_card_template.md")
HEADLINE_METRICS = ("HR@5", "HR@10", "HR@20", "NDCG@5", "NDCG@10", "NDCG@20", "MRR", "Coverage@10")


def _dataset_name(recipe: dict[str, Any]) -> str:
    path = str(recipe.get("data_path", "unknown"))
    return "synthetic (seqrec_hf.synthetic)" if path == "synthetic" else Path(path).name


def card_data(metrics: dict[str, Any], model_name: str) -> ModelCardData:
    """YAML metadata with a `model-index` entry per split and metric (what the Hub shows as results)."""
    recipe = metrics.get("recipe", {})
    dataset = _dataset_name(recipe)
    results = [
        EvalResult(
            task_type="next-item-recommendation",
            task_name="Next-item recommendation (full ranking, history excluded)",
            dataset_type=dataset,
            dataset_name=dataset,
            dataset_split=split,
            metric_type=name,
            metric_name=name,
            metric_value=float(values[name]),
        )
        for split in ("test", "validation")
        for values in [metrics.get(split) or {}]
        for name in HEADLINE_METRICS
        if name in values
    ]
    return ModelCardData(
        library_name="seqrec-hf",
        license="apache-2.0",
        tags=["recommendation", "sequential-recommendation", "next-item-recommendation", "seqrec", "transformers"],
        model_name=model_name,
        eval_results=results or None,
    )


def _table(metrics: dict[str, Any]) -> str:
    rows = ["| split | " + " | ".join(HEADLINE_METRICS) + " |", "|---" * (len(HEADLINE_METRICS) + 1) + "|"]
    for split in ("validation", "test"):
        values = metrics.get(split) or {}
        cells = [f"{values[m]:.4f}" if m in values else "-" for m in HEADLINE_METRICS]
        rows.append(f"| {split} | " + " | ".join(cells) + " |")
    for name, values in (metrics.get("baselines") or {}).items():
        cells = [f"{values[m]:.4f}" if m in values else "-" for m in HEADLINE_METRICS]
        rows.append(f"| test, baseline {name} | " + " | ".join(cells) + " |")
    return "\n".join(rows)


def render_model_card(metrics: dict[str, Any], model_name: str = "seqrec model", repo_id: str | None = None) -> str:
    """The card text (YAML header + markdown) for a checkpoint described by its metrics.json content."""
    recipe = metrics.get("recipe", {})
    data = card_data(metrics, model_name)
    hyper = {
        k: recipe[k]
        for k in (
            "max_length",
            "hidden_size",
            "num_hidden_layers",
            "num_attention_heads",
            "intermediate_size",
            "hidden_dropout_prob",
            "attention_dropout",
            "use_time_bias",
            "batch_size",
            "learning_rate",
            "weight_decay",
            "num_epochs",
            "mixed_precision",
            "seed",
        )
        if k in recipe
    }
    template = TEMPLATE_PATH.read_text(encoding="utf-8")
    card = ModelCard.from_template(
        data,
        template_str=template,
        model_name=model_name,
        repo_id=repo_id or "path/to/this/folder",
        dataset=_dataset_name(recipe),
        data_path=recipe.get("data_path", "unknown"),
        split=recipe.get("split", "leave_one_out"),
        time_aware="yes (relative time-gap attention bias)" if recipe.get("use_time_bias") else "no",
        hyperparameters="\n".join(f"- `{k}`: {v}" for k, v in hyper.items()),
        results_table=_table(metrics),
        num_parameters=metrics.get("num_parameters", "unknown"),
        train_seconds=f"{metrics.get('train_seconds', 0.0):.0f}",
        tokens_per_second=f"{metrics.get('tokens_per_second') or 0.0:.0f}",
        best_step=metrics.get("best_step", "unknown"),
        has_plot=(metrics.get("plot") is not None),
        plot=metrics.get("plot") or "",
    )
    return str(card)


def write_model_card(folder: str | os.PathLike, metrics: dict[str, Any] | None = None, **kwargs: Any) -> Path:
    """Write README.md (the card) into a checkpoint folder, from its metrics.json unless metrics are given."""
    folder = Path(folder)
    if metrics is None:
        metrics_path = folder / "metrics.json"
        if not metrics_path.is_file():
            raise FileNotFoundError(f"{metrics_path}: no metrics.json to build the card from (train first)")
        metrics = json.loads(metrics_path.read_text(encoding="utf-8"))
    kwargs.setdefault("model_name", folder.resolve().name)
    text = render_model_card(metrics, **kwargs)
    path = folder / "README.md"
    tmp = folder / "README.md.tmp"
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)
    return path


__all__ = ["card_data", "render_model_card", "write_model_card"]
