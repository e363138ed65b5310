"""`make demo` / `seqrec-hf demo`: the whole library on built-in synthetic data, in a few minutes on a laptop.

Generates interactions with temporal structure (seqrec_hf.synthetic), writes them as a CSV and reads them
back with the same reader users call, evaluates the popularity and Markov baselines, trains a time-blind and
a time-aware Transformer with the same recipe, prints the comparison, and recommends for a few users through
the `next-item-recommendation` pipeline. The time-aware checkpoint (with its card) is left in the output
folder, ready for `seqrec-hf recommend` or `from_pretrained`.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from .baselines import fit_baseline
from .data import leave_one_out_split, load_sequences
from .evaluation import evaluate
from .modelcard import write_model_card
from .train import load_recipe, train

logger = logging.getLogger(__name__)

DEMO_RECIPE = Path(__file__).resolve().parents[1] / "training" / "configs" / "demo.yaml"
SHOWN = ("HR@10", "NDCG@10", "NDCG@20", "MRR", "Coverage@10")


def comparison_table(rows: dict[str, dict[str, float]]) -> str:
    """A markdown table: one row per model, the headline metrics as columns."""
    lines = ["| model | " + " | ".join(SHOWN) + " |", "|---" * (len(SHOWN) + 1) + "|"]
    for name, metrics in rows.items():
        lines.append(f"| {name} | " + " | ".join(f"{metrics[m]:.4f}" for m in SHOWN) + " |")
    return "\n".join(lines)


def run_demo(output_dir: str = "outputs/demo", scale: float = 1.0, overrides: dict[str, Any] | None = None) -> dict:
    """Run the demo; `scale` < 1 shrinks users, items and epochs (the test suite runs a reduced demo)."""
    from .synthetic import write_synthetic_csv

    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    base = {}
    if DEMO_RECIPE.is_file():  # a source checkout; an installed package falls back to the recipe defaults
        base = {k: v for k, v in vars(load_recipe(DEMO_RECIPE)).items()}
    num_users = max(200, int(base.get("synthetic_num_users", 2000) * scale))
    num_items = max(100, int(base.get("synthetic_num_items", 1000) * scale))
    csv_path = write_synthetic_csv(out / "data" / "interactions.csv", num_users=num_users, num_items=num_items, seed=0)
    print(f"synthetic data: {num_users} users, {num_items} items -> {csv_path}")

    sequences = load_sequences(csv_path, "csv")
    splits = leave_one_out_split(sequences)
    catalog = [item for history in sequences["item_ids"] for item in history]
    from .tokenization_seqrec import ItemTokenizer

    tokenizer = ItemTokenizer.from_items(catalog)
    results: dict[str, dict[str, float]] = {}
    for name in ("popularity", "markov"):
        scorer = fit_baseline(name, tokenizer, splits["test"]["item_ids"])
        results[name] = evaluate(scorer, splits["test"], tokenizer, show_progress=False)

    recipe_values = dict(base)
    recipe_values.update(data_path=str(csv_path), data_format="csv")
    if scale < 1.0:
        recipe_values["num_epochs"] = max(2, int(recipe_values.get("num_epochs", 40) * scale))
    recipe_values.update(overrides or {})
    for name, timed in (("transformer (time-blind)", False), ("transformer (time-aware)", True)):
        folder = out / ("time_aware" if timed else "time_blind")
        time_features = {"use_time_bias": timed, "use_time_gap_embedding": timed}
        recipe = load_recipe(None, dict(recipe_values, **time_features, output_dir=str(folder)))
        print(f"\ntraining {name} -> {folder}")
        results[name] = train(recipe)["test"]

    # The card of the published demo checkpoint names its data and shows the baselines of the same run.
    baselines = {name: results[name] for name in ("popularity", "markov")}
    metrics_path = out / "time_aware" / "metrics.json"
    metrics = json.loads(metrics_path.read_text())
    metrics["baselines"] = baselines
    metrics_path.write_text(json.dumps(metrics, indent=2, default=str))
    write_model_card(out / "time_aware", metrics, dataset="synthetic")

    table = comparison_table(results)
    print("\nTest split, full ranking over the catalog, history excluded:\n" + table)
    (out / "comparison.md").write_text(table + "\n")
    (out / "comparison.json").write_text(json.dumps(results, indent=2))

    from transformers import pipeline

    rec = pipeline("next-item-recommendation", model=str(out / "time_aware"))
    print("\nExample recommendations (time-aware model):")
    for row in splits["test"].select(range(3)):
        request = {"items": row["item_ids"][-50:], "timestamps": row["timestamps"][-50:]}
        request["query_timestamp"] = row["target_timestamp"]
        top = rec(request, top_k=5)
        shown = " ".join(row["item_ids"][-5:])
        print(f"  user {row['user_id']}: ... {shown} -> {[r['item'] for r in top]} (actual next: {row['target']})")
    print(f"\ncheckpoint with model card: {out / 'time_aware'}")
    return results
