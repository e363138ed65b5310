"""Variants compared on the shifted split (`drop_last_events=1`): validation and the test one event earlier.

The shifted split is the protocol's leave-one-out split as of one event earlier: its test target is the real
validation item, its validation target the event before, and the real test items are never read. A run
trained there with `log_test_metrics=true` logs both at every validation; this script tabulates, per run,
the epoch chosen on (shifted) validation and both scores at that epoch. So a change can be judged on how it
carries one step past the data it was selected on, which is what the real test asks, without the real test.

    # tabulate finished runs (each: name=output_dir "the command that made it")
    python benchmarks/shifted.py --collect base=outputs/research/s1-base "training/train.py ... drop_last_events=1"

    # add a stacked transition prior to a finished run's best model, fitted on the shifted validation
    python benchmarks/shifted.py --posthoc-prior ema+prior2=outputs/research/s1-ema998 --lags 2
    python benchmarks/shifted.py --posthoc-prior recipe+recent3=outputs/research/s1-recipe --lags 2 --recent 3

    # a run trained with a stacked prior, scored with its fitted weights times each scale
    python benchmarks/shifted.py --prior-scales recipe=outputs/research/s1-recipe "training/train.py ..." --scales 0 1 2

    # average the log-probabilities of several finished runs (an ensemble, for reference only)
    python benchmarks/shifted.py --ensemble ens3 outputs/research/s1-base outputs/research/s1-ema998 ...

Results are merged into benchmarks/results/shifted.json and shifted.md is rewritten from it.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
sys.path.insert(0, str(HERE))
from quality import git_commit, merge_results  # noqa: E402


def selected_epoch(run_dir: str | Path) -> dict:
    """The validation chosen by early stopping (best validation NDCG@10) and the shifted test logged with it."""
    path = Path(run_dir) / "train_log.jsonl"
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no training log (is {run_dir} a training output directory?)")
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    rows = [r for r in rows if "validation" in r]
    if not rows or "test" not in rows[0]:
        raise ValueError(f"{path}: no test curve; train on a shifted split with log_test_metrics=true")
    best = max(rows, key=lambda r: r["validation"]["NDCG@10"])  # first best, as early stopping keeps it
    last = rows[-1]
    result = {
        "epoch": best["epoch"] + 1,
        "epochs_run": last["epoch"] + 1,
        "validation": best["validation"]["NDCG@10"],
        "test": best["test"]["NDCG@10"],
        "test_HR@10": best["test"]["HR@10"],
    }
    metrics_path = Path(run_dir) / "metrics.json"
    metrics = json.loads(metrics_path.read_text()) if metrics_path.is_file() else {}
    if "transition_prior_calibration" in metrics:  # the finished model: prior weights fitted on validation
        result["weights"] = metrics["transition_prior_calibration"]["weights"]
        result["validation"] = metrics["validation"]["NDCG@10"]
        result["test"] = metrics["test"]["NDCG@10"]
        result["test_HR@10"] = metrics["test"]["HR@10"]
        result["network_only_test"] = metrics["test_network_only"]["NDCG@10"]
    return result


def _recipe_and_splits(run_dir: str | Path):
    from seqrec_hf.train import prepare_data, recipe_of_run

    recipe = recipe_of_run(run_dir)
    if recipe.drop_last_events < 1:
        raise ValueError(f"{run_dir} was trained on the real split: this script only reads shifted splits")
    splits, tokenizer, _ = prepare_data(recipe)
    return recipe, splits, tokenizer


def posthoc_prior(run_dir: str | Path, lags: int, size: int = 64, reverse: bool = False, recent: int = 0) -> dict:
    """Stack a transition prior (counted on the run's train split) on its best model, fit the weights on
    the shifted validation, then score the shifted test (in fp32, as training's own evaluation)."""
    from seqrec_hf import SeqRecForNextItemPrediction
    from seqrec_hf.evaluation import calibrate_transition_prior, evaluate, model_score_fn
    from seqrec_hf.train import build_model

    recipe, splits, tokenizer = _recipe_and_splits(run_dir)
    trained = SeqRecForNextItemPrediction.from_pretrained(Path(run_dir) / "best_model")
    with_prior = dataclasses.replace(
        recipe, transition_prior_lags=lags, transition_prior_size=size, transition_prior_reverse=reverse,
        transition_prior_recent_window=recent,
    )  # fmt: skip
    model = build_model(with_prior, tokenizer, splits["train"])  # the prior counted as training counts it
    weights = {k: v for k, v in trained.state_dict().items() if not k.startswith("transition_prior.")}
    model.load_state_dict(weights, strict=False)  # the trained network; the prior is new
    model.eval()
    fit = calibrate_transition_prior(model, splits["validation"], tokenizer, max_length=recipe.max_length)
    test = evaluate(model_score_fn(model), splits["test"], tokenizer, max_length=recipe.max_length)
    return {
        "validation": fit["metric"],
        "test": test["NDCG@10"],
        "test_HR@10": test["HR@10"],
        "weights": fit["weights"],
    }


def prior_scales(run_dir: str | Path, scales: list[float]) -> dict[float, dict]:
    """Score a run trained with a stacked prior with its fitted weights times each scale, on both the shifted
    validation and test: does the weight that is best on validation stay best one step later?"""
    from seqrec_hf import SeqRecForNextItemPrediction
    from seqrec_hf.evaluation import evaluate, model_score_fn

    recipe, splits, tokenizer = _recipe_and_splits(run_dir)
    calibration = json.loads((Path(run_dir) / "metrics.json").read_text()).get("transition_prior_calibration")
    if not calibration:
        raise ValueError(f"{run_dir}: no fitted prior weights in metrics.json (was it trained with a prior?)")
    fitted = torch.tensor(calibration["weights"])
    model = SeqRecForNextItemPrediction.from_pretrained(Path(run_dir) / "best_model").eval()
    results = {}
    for scale in scales:
        with torch.no_grad():
            model.transition_prior.weight.copy_(fitted * scale)
        scores = {
            split: evaluate(model_score_fn(model), splits[split], tokenizer, max_length=recipe.max_length)
            for split in ("validation", "test")
        }
        results[scale] = {
            "validation": scores["validation"]["NDCG@10"],
            "test": scores["test"]["NDCG@10"],
            "test_HR@10": scores["test"]["HR@10"],
            "weights": [round(float(w), 4) for w in fitted * scale],
            "scale": scale,
        }
    return results


def ensemble(run_dirs: list[str]) -> dict:
    """Mean log-probabilities of the best models of several runs (same shifted split)."""
    from seqrec_hf import SeqRecForNextItemPrediction
    from seqrec_hf.evaluation import ensemble_score_fn, evaluate

    recipe, splits, tokenizer = _recipe_and_splits(run_dirs[0])
    models = [SeqRecForNextItemPrediction.from_pretrained(Path(d) / "best_model") for d in run_dirs]
    score = ensemble_score_fn(models, num_special=tokenizer.num_special_tokens)

    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=recipe.mixed_precision == "bf16"):
        validation = evaluate(score, splits["validation"], tokenizer, max_length=recipe.max_length)
        test = evaluate(score, splits["test"], tokenizer, max_length=recipe.max_length)
    return {"validation": validation["NDCG@10"], "test": test["NDCG@10"], "test_HR@10": test["HR@10"]}


def render(results: dict) -> str:
    lines = [
        "# Variants on the shifted split (Beauty, seed 42)",
        "",
        "Written by `benchmarks/shifted.py` from shifted.json. The shifted split (`drop_last_events=1`) is the"
        " leave-one-out split as of one event earlier: its test target is the real validation item, so these"
        " numbers never read a real test item. `validation` is the best shifted-validation NDCG@10 (the epoch"
        " early stopping keeps); `shifted test` is NDCG@10 / HR@10 at that same epoch. Rows with prior weights fit"
        " them on the shifted validation after training (post-hoc on a finished run, or at the end of a run"
        " trained with the prior) and then score the shifted test once.",
        "",
        "| variant | epoch (of) | validation NDCG@10 | shifted test NDCG@10 | shifted test HR@10 | note |",
        "|---|---|---|---|---|---|",
    ]
    for key, e in results.items():
        r = e["result"]
        epoch = f"{r['epoch']} ({r['epochs_run']})" if "epoch" in r else "-"
        if "scale" in r:
            note = f"prior weights {r['weights']} (the fitted ones x {r['scale']})"
        elif "weights" in r:
            note = f"prior weights {r['weights']} (fitted on validation)"
        else:
            note = ""
        if "network_only_test" in r:
            note += f"; the network alone: shifted test {r['network_only_test']:.4f}"
        lines.append(f"| {key} | {epoch} | {r['validation']:.4f} | {r['test']:.4f} | {r['test_HR@10']:.4f} | {note} |")
    lines.append("")
    for key, e in results.items():
        lines.append(f"- `{key}`: `{e['command']}` (commit {e['commit']})")
    lines.append("")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--collect", nargs=2, action="append", default=[], metavar=("NAME=DIR", "COMMAND"))
    parser.add_argument("--posthoc-prior", nargs=2, action="append", default=[], metavar=("NAME=DIR", "COMMAND"))
    parser.add_argument("--lags", type=int, default=2, help="lags of the post-hoc prior")
    parser.add_argument("--size", type=int, default=64, help="successors kept per item and lag (post-hoc prior)")
    parser.add_argument("--reverse", action="store_true", help="add the reverse table (transition_prior_reverse)")
    parser.add_argument("--recent", type=int, default=0, help="transition_prior_recent_window of the post-hoc prior")
    parser.add_argument(
        "--prior-scales", nargs=2, metavar=("NAME=DIR", "COMMAND"),
        help="a run trained with a stacked prior, scored with its fitted weights times each --scales value",
    )  # fmt: skip
    parser.add_argument("--scales", type=float, nargs="+", default=[0.0, 0.5, 1.0, 1.5, 2.0])
    parser.add_argument("--ensemble", nargs="+", metavar=("NAME", "DIR"), help="a name, then two or more runs")
    args = parser.parse_args(argv)
    commit = git_commit()
    entries = {}
    for spec, command in args.collect:
        name, run = spec.split("=", 1)
        entries[name] = {"result": selected_epoch(run), "command": command, "commit": commit}
    for spec, command in args.posthoc_prior:
        name, run = spec.split("=", 1)
        flags = f"--lags {args.lags} --size {args.size}" + (" --reverse" if args.reverse else "")
        flags += f" --recent {args.recent}" if args.recent else ""
        cmd = f"python benchmarks/shifted.py --posthoc-prior {spec} {flags} (on the run made by: {command})"
        result = posthoc_prior(run, args.lags, size=args.size, reverse=args.reverse, recent=args.recent)
        entries[name] = {"result": result, "command": cmd, "commit": commit}
    if args.prior_scales:
        (spec, command), scales = args.prior_scales, args.scales
        name, run = spec.split("=", 1)
        cmd = f"python benchmarks/shifted.py --prior-scales {spec} --scales {' '.join(map(str, scales))}"
        for scale, result in prior_scales(run, scales).items():
            entries[f"{name} x{scale}"] = {"result": result, "command": f"{cmd} (on the run made by: {command})",
                                           "commit": commit}  # fmt: skip
    if args.ensemble:
        name, runs = args.ensemble[0], args.ensemble[1:]
        if len(runs) < 2:
            parser.error("--ensemble needs a name and at least two run folders")
        cmd = "python benchmarks/shifted.py --ensemble " + " ".join(args.ensemble)
        entries[name] = {"result": ensemble(runs), "command": cmd, "commit": commit}
    if not entries:
        parser.error("nothing to do: give --collect, --posthoc-prior, --prior-scales or --ensemble")
    merge_results(RESULTS / "shifted.json", entries, render)
    for name, e in entries.items():
        print(name, json.dumps(e["result"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
