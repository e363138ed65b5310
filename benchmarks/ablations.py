"""Ablations on the validation split: short runs of one recipe with one change each, compared epoch by epoch.

    # train each variant for 12 epochs (seed 42) and tabulate validation NDCG@10 per epoch
    python benchmarks/ablations.py --recipe training/configs/beauty.yaml --name beauty --epochs 12 \\
        --variant base embedding_norm=false --variant embedding-norm \\
        --variant position-bias use_position_bias=true

    # or tabulate runs that already exist (their train_log.jsonl), naming the command that made each
    python benchmarks/ablations.py --name beauty --collect base=outputs/abl-base "training/train.py ..."

Only validation metrics are compared (model choices are never made on test). Results are merged into
benchmarks/results/ablations.json and ablations.md is rewritten from it.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from seqrec_hf.train import load_recipe, parse_overrides, train

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
sys.path.insert(0, str(HERE))
from quality import git_commit, merge_results  # noqa: E402


def validation_curve(run_dir: str | os.PathLike) -> list[dict]:
    """[{epoch, step, NDCG@10, HR@10}] from a run's train_log.jsonl (one row per validation)."""
    path = Path(run_dir) / "train_log.jsonl"
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no training log (is {run_dir} a training output directory?)")
    rows = []
    for line in path.read_text().splitlines():
        record = json.loads(line)
        if "validation" in record:
            v = record["validation"]
            rows.append(
                {"epoch": record["epoch"], "step": record["step"], "NDCG@10": v["NDCG@10"], "HR@10": v["HR@10"]}
            )
    return rows


def render(results: dict) -> str:
    lines = [
        "# Ablations: validation NDCG@10 per epoch (one change per row, seed 42)",
        "",
        "Written by `benchmarks/ablations.py` from ablations.json. Validation split only: the test split is never"
        " used to choose the model. Runs are short (a fixed number of epochs), so they rank changes by how fast"
        " and how far validation improves, not by converged quality.",
        "",
    ]
    for dataset in sorted({e["dataset"] for e in results.values()}):
        entries = [e for e in results.values() if e["dataset"] == dataset]
        epochs = sorted({row["epoch"] for e in entries for row in e["curve"]})
        shown = [ep for ep in epochs if ep % 3 == 2 or ep == epochs[-1]]
        lines += [f"## {dataset}", "", "| variant | " + " | ".join(f"epoch {ep + 1}" for ep in shown) + " | best |",
                  "|---" * (len(shown) + 2) + "|"]  # fmt: skip
        for e in entries:
            by_epoch = {row["epoch"]: row["NDCG@10"] for row in e["curve"]}
            cells = [f"{by_epoch[ep]:.4f}" if ep in by_epoch else "-" for ep in shown]
            best = max(row["NDCG@10"] for row in e["curve"])
            lines.append(f"| {e['variant']} | " + " | ".join(cells) + f" | {best:.4f} |")
        lines.append("")
        for e in entries:
            where = f"commit {e['commit']}" if e["commit"] else "collected run; its commit is in the command"
            lines.append(f"- `{e['variant']}`: `{e['command']}` ({where})")
        lines.append("")
    return "\n".join(lines)


def store(entries: list[dict]) -> None:
    merge_results(RESULTS / "ablations.json", {f"{e['dataset']}/{e['variant']}": e for e in entries}, render)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--name", required=True, help="dataset name in the results")
    parser.add_argument("--recipe", help="recipe to ablate (with --variant)")
    parser.add_argument("--epochs", type=int, default=12)
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--variant", nargs="+", action="append", default=[], metavar=("NAME", "KEY=VALUE"))
    parser.add_argument("--set", nargs="+", action="extend", default=[], metavar="KEY=VALUE", dest="overrides")
    parser.add_argument(
        "--collect", nargs=2, action="append", default=[], metavar=("NAME=DIR", "COMMAND"),
        help="tabulate an existing run directory, with the command that made it",
    )  # fmt: skip
    parser.add_argument("--output-root", default="outputs/ablations")
    args = parser.parse_args(argv)
    if args.variant and not args.recipe:
        parser.error("--variant needs --recipe")
    command = "python benchmarks/ablations.py " + " ".join(argv if argv is not None else sys.argv[1:])
    entries = []
    for spec, made_by in args.collect:
        name, _, run_dir = spec.partition("=")
        entries.append({"dataset": args.name, "variant": name, "curve": validation_curve(run_dir),
                        "command": made_by, "commit": None})  # fmt: skip
    commit = git_commit()  # before training: the code and recipe the runs start from
    for variant in args.variant:
        name, extra = variant[0], parse_overrides(variant[1:])
        run_dir = os.path.join(args.output_root, args.name, name)
        overrides = {**parse_overrides(args.overrides), **extra, "seed": args.seed, "num_epochs": args.epochs,
                     "early_stopping_patience": args.epochs, "output_dir": run_dir}  # fmt: skip
        train(load_recipe(args.recipe, overrides))
        entries.append({"dataset": args.name, "variant": name, "curve": validation_curve(run_dir),
                        "command": command, "commit": commit})  # fmt: skip
    if not entries:
        parser.error("nothing to do: give --variant (with --recipe) or --collect")
    store(entries)
    return 0


if __name__ == "__main__":
    sys.exit(main())
