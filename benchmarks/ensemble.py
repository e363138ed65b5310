"""Score an ensemble of finished runs as served: each run's network plus its stacked, calibrated prior, their
log-probabilities averaged, full ranking with the history excluded (the same `evaluate` as training).

Why: distillation (`distill_from`) teaches one network the distribution of such an ensemble, so the ensemble's
own validation and test scores bound what a student can learn from it; this measures them, e.g. three
teachers against six.

    python benchmarks/ensemble.py outputs/quality/beauty/fp32-inputs-drop0.6/seed{42,43,44}
    python benchmarks/ensemble.py outputs/quality/beauty/fp32-inputs-drop0.6/seed4{2,3,4,5,6,7} --json out.json

The runs must share one recipe's data (their vocabularies are checked). The prior is counted on each split's
input histories, as `seqrec_hf.train.finish` does for a run with `transition_prior_counts='inputs'`
(validation: the train histories; test: they plus each user's validation item); otherwise on the train split.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from seqrec_hf import ItemTokenizer, SeqRecForNextItemPrediction
from seqrec_hf.evaluation import ensemble_score_fn, evaluate, format_metrics_table
from seqrec_hf.train import TrainingRecipe, count_prior_on_inputs, prepare_data, recipe_of_run

sys.path.insert(0, str(Path(__file__).resolve().parent))
from quality import git_commit  # noqa: E402


def load_run(run_dir: Path) -> tuple[TrainingRecipe, ItemTokenizer, SeqRecForNextItemPrediction]:
    recipe = recipe_of_run(run_dir)
    tokenizer = ItemTokenizer.from_pretrained(run_dir)
    model = SeqRecForNextItemPrediction.from_pretrained(run_dir).eval()
    return recipe, tokenizer, model


def ensemble_metrics(run_dirs: list[Path], splits_wanted: list[str], batch_size: int | None = None) -> dict[str, dict]:
    runs = [load_run(Path(d)) for d in run_dirs]
    recipe, tokenizer, _ = runs[0]
    for (other, other_tokenizer, _), folder in zip(runs[1:], run_dirs[1:]):
        if other_tokenizer.get_vocab() != tokenizer.get_vocab():
            raise ValueError(f"{folder}: another item vocabulary than {run_dirs[0]}: runs must share their data")
        if other.max_length != recipe.max_length:
            raise ValueError(f"{folder}: max_length {other.max_length} differs from {recipe.max_length}")
    splits, tokenizer, _ = prepare_data(recipe, tokenizer)
    result = {}
    for split in splits_wanted:
        for run_recipe, _, model in runs:  # finish()'s counts: the split's inputs, or the train split as saved
            count_prior_on_inputs(model, run_recipe, tokenizer, splits[split])

        score = ensemble_score_fn([model for _, _, model in runs])
        batch = batch_size or recipe.eval_batch_size
        result[split] = evaluate(score, splits[split], tokenizer, batch_size=batch, max_length=recipe.max_length)
    return result


def _options(args: argparse.Namespace) -> list[str]:
    options = ["--splits", *args.splits] if args.splits != ["validation", "test"] else []
    return options + (["--batch-size", str(args.batch_size)] if args.batch_size else [])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", nargs="+", type=Path, help="finished run folders (metrics.json, model, tokenizer)")
    parser.add_argument("--splits", nargs="+", default=["validation", "test"], choices=["validation", "test"])
    parser.add_argument("--batch-size", type=int, help="default: the runs' eval_batch_size")
    parser.add_argument("--json", type=Path, help="also write the metrics here")
    args = parser.parse_args(argv)
    result = ensemble_metrics(args.runs, args.splits, args.batch_size)
    for split, metrics in result.items():
        shown = {k: v for k, v in metrics.items() if not k.startswith("num_")}
        print(format_metrics_table(shown, f"{split}: ensemble of {len(args.runs)} runs"))
    if args.json:
        # provenance as the other benchmark scripts record it: the command that reproduces it, and the commit
        command = "python benchmarks/ensemble.py " + " ".join([str(r) for r in args.runs] + _options(args))
        payload = {"runs": [str(r) for r in args.runs], "command": command, "commit": git_commit(), **result}
        args.json.write_text(json.dumps(payload, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
