"""Quality benchmark: train a recipe over several seeds and report test metrics next to anchors and baselines.

    python benchmarks/quality.py --recipe training/configs/beauty.yaml --seeds 42 43 44 --name beauty
    python benchmarks/quality.py --recipe training/configs/ml1m-half.yaml --seeds 42 43 44 --name ml1m-half \
        --variant time-aware use_time_bias=true --variant time-blind use_time_bias=false

Every number comes from `seqrec_hf.train.train` (the same code as `seqrec-hf train`): full ranking over the
catalog, history excluded, model selected on validation NDCG@10 only. Results are merged into
benchmarks/results/quality.json (one entry per dataset and variant) and quality.md is rewritten from it, with
the git commit and the exact command of each entry. Baselines come from benchmarks/results/baselines.json.
"""

from __future__ import annotations

import argparse
import dataclasses
import fcntl
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

from seqrec_hf.train import load_recipe, parse_overrides, train

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
CARDS = HERE.parent / "model_cards"
METRICS = ("HR@5", "HR@10", "HR@20", "NDCG@5", "NDCG@10", "NDCG@20", "MRR")

# Published full-ranking anchors (../shared/docs/benchmarks.md); quoted, not re-run.
ANCHORS = {
    "beauty": [
        ("BSARec (AAAI'24)", 0.1008, 0.0611),
        ("ICSRec (WSDM'24)", 0.0959, 0.0578),
        ("SASRec + sampled softmax (eSASRec paper)", 0.0921, 0.0531),
        ("SASRec, BCE + 1 negative (as usually quoted)", 0.0605, 0.0318),
    ],
    "sports": [("BSARec", 0.0612, None), ("ICSRec (WSDM'24)", 0.0565, 0.0335)],
}


def git_commit() -> str:
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, cwd=HERE).stdout.strip()
        # results and cards are this script's outputs, not inputs: their edits do not make the code dirty
        outputs = [":(top,exclude)benchmarks/results", ":(top,exclude)model_cards"]
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no", "--", ":(top)", *outputs],
                               capture_output=True, text=True, cwd=HERE).stdout.strip()  # fmt: skip
        return commit + (" + uncommitted changes" if dirty else "")
    except OSError:
        return "unknown"


def summarise(runs: list[dict]) -> dict:
    """Mean and (sample) standard deviation over seeds of every test metric and of validation NDCG@10."""
    out = {}
    for name in METRICS:
        values = [r["test"][name] for r in runs]
        out[name] = {"mean": statistics.fmean(values), "std": statistics.stdev(values) if len(values) > 1 else 0.0}
    values = [r["validation"]["NDCG@10"] for r in runs]
    spread = statistics.stdev(values) if len(values) > 1 else 0.0
    out["validation NDCG@10"] = {"mean": statistics.fmean(values), "std": spread}
    out["train_seconds"] = {"mean": statistics.fmean(r["train_seconds"] for r in runs), "std": 0.0}
    return out


def finished_run(path: Path, recipe) -> dict:
    """The metrics.json of a finished run, if it was trained with exactly `recipe` (output_dir aside).

    A field the run does not record was added to the recipe later: it counts as its default, which is what
    the run trained with (new options are off by default)."""
    result = json.loads(path.read_text())
    recorded, wanted = result.get("recipe") or {}, dataclasses.asdict(recipe)
    defaults = {f.name: f.default for f in dataclasses.fields(recipe) if f.default is not dataclasses.MISSING}
    differ = sorted(k for k in wanted if k != "output_dir" and recorded.get(k, defaults.get(k)) != wanted[k])
    if differ:
        details = ", ".join(f"{k}: {recorded.get(k)!r} there, {wanted[k]!r} here" for k in differ)
        raise ValueError(f"{path}: trained with another recipe ({details}); remove it or drop --reuse")
    result.setdefault("wall_seconds", result.get("train_seconds"))
    return result


def merge_results(store: Path, entries: dict, render_fn) -> None:
    """Merge `entries` into the JSON `store` and rewrite its .md twin, under a lock: several benchmark
    invocations (one per dataset or variant) may run side by side and must not drop each other's results."""
    store.parent.mkdir(parents=True, exist_ok=True)
    with open(store.parent / ".quality.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        results = json.loads(store.read_text()) if store.is_file() else {}
        results.update(entries)
        store.write_text(json.dumps(results, indent=2))
        store.with_suffix(".md").write_text(render_fn(results))


def dataset_key(name: str) -> str:
    """'ML-1M-half' (baselines.json) and 'ml1m-half' (--name) name the same data."""
    return name.lower().replace("-", "").replace("_", "")


def baseline_results(dataset: str) -> dict[str, dict]:
    """{baseline name: test metrics} of a dataset from benchmarks/results/baselines.json."""
    path = RESULTS / "baselines.json"
    rows = json.loads(path.read_text()).get("results", []) if path.is_file() else []
    return {
        r["baseline"]: r["metrics"]
        for r in rows
        if r["split"] == "test" and dataset_key(r["dataset"]) == dataset_key(dataset)
    }


def write_card(entry: dict, output_root: str) -> Path:
    """Card of the seed with the best validation NDCG@10 (never chosen on test) -> model_cards/<name>.md.

    The card is the checkpoint's own (its metrics.json, config, curve) plus the spread over all seeds.
    """
    from seqrec_hf.modelcard import render_model_card_for_folder

    best = max(range(len(entry["runs"])), key=lambda i: entry["runs"][i]["validation"]["NDCG@10"])
    seed = entry["seeds"][best]
    folder = Path(output_root) / entry["dataset"] / entry["variant"] / f"seed{seed}"
    slug = entry["dataset"] if entry["variant"] == "default" else f"{entry['dataset']}-{entry['variant']}"
    cards = CARDS
    plot = None
    if (folder / "training_curve.png").is_file():
        plot = f"{slug}.png"
        shutil.copy(folder / "training_curve.png", cards / plot)
    text = render_model_card_for_folder(
        folder,
        baselines=baseline_results(entry["dataset"]),
        model_name=f"seqrec-hf {slug}",
        plot=plot,
        dataset=entry["dataset"],
    )
    s = entry["summary"]
    rows = "\n".join(f"| {m} | {s[m]['mean']:.4f} ± {s[m]['std']:.4f} |" for m in METRICS)
    text += (
        f"\n\n## Across seeds\n\nThis checkpoint is seed {seed} of {entry['seeds']}, picked on validation NDCG@10. "
        f"Test metrics over all {len(entry['seeds'])} seeds (mean ± std), from `{entry['command']}` "
        f"(commit {entry['commit']}):\n\n| metric | test |\n|---|---|\n{rows}\n"
    )
    path = cards / f"{slug}.md"
    path.write_text(text, encoding="utf-8")
    return path


def render(results: dict) -> str:
    lines = [
        "# Quality: full-ranking test metrics (mean ± std over seeds)",
        "",
        "Protocol: ../shared/docs/benchmarks.md (leave-one-out, full ranking, history excluded, pessimistic ties,"
        " selection on validation NDCG@10). Rewritten by `benchmarks/quality.py` from quality.json.",
        "",
    ]
    for dataset in sorted({entry["dataset"] for entry in results.values()}):
        lines += [f"## {dataset}", "", "| model | seeds | HR@5 | HR@10 | HR@20 | NDCG@5 | NDCG@10 | NDCG@20 | MRR | "
                  "val NDCG@10 | train s |", "|---" * 11 + "|"]  # fmt: skip
        for entry in results.values():
            if entry["dataset"] != dataset:
                continue
            s = entry["summary"]
            cells = [f"{s[m]['mean']:.4f} ± {s[m]['std']:.4f}" for m in METRICS]
            lines.append(
                f"| {entry['variant']} | {len(entry['seeds'])} | "
                + " | ".join(cells)
                + f" | {s['validation NDCG@10']['mean']:.4f} | {s['train_seconds']['mean']:.0f} |"
            )
            ablations = (("test_prior_train_counts", "its prior counted on the train split"),
                         ("test_network_only", "its network alone (no prior)"))  # fmt: skip
            for key, label in ablations:  # the same runs (network and weights), scored another way
                if all(key in r for r in entry["runs"]):
                    other = summarise([{**r, "test": r[key]} for r in entry["runs"]])
                    cells = [f"{other[m]['mean']:.4f} ± {other[m]['std']:.4f}" for m in METRICS]
                    lines.append(f"| {entry['variant']}: {label} | {len(entry['seeds'])} | "
                                 + " | ".join(cells) + " | - | - |")  # fmt: skip
        for name, values in baseline_results(dataset).items():
            cells = [f"{values[m]:.4f}" if m in values else "-" for m in METRICS]
            lines.append(f"| baseline: {name} | - | " + " | ".join(cells) + " | - | - |")
        for name, hr, ndcg in ANCHORS.get(dataset, []):
            lines.append(f"| anchor (published): {name} | - | - | {hr:.4f} | - | - | "
                         f"{'-' if ndcg is None else f'{ndcg:.4f}'} | - | - | - | - |")  # fmt: skip
        lines.append("")
        for entry in results.values():
            if entry["dataset"] == dataset:
                where = f"commit {entry['commit']}, {entry['machine']}"
                lines.append(f"- `{entry['variant']}`: `{entry['command']}` ({where})")
        lines.append("")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--recipe", help="training recipe (YAML); not needed with --cards-only")
    parser.add_argument("--name", required=True, help="dataset name in the results (beauty, sports, ml1m-half, ...)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[42, 43, 44])
    parser.add_argument(
        "--variant",
        nargs="+",
        action="append",
        metavar=("NAME", "KEY=VALUE"),
        help="a named variant with recipe overrides; repeatable (default: the recipe as is)",
    )
    parser.add_argument("--output-root", default="outputs/quality")
    parser.add_argument(
        "--reuse", action="store_true",
        help="take a seed's finished run (its metrics.json, same recipe) instead of training it again: lets seeds"
        " run in separate processes, then be collected into one entry",
    )  # fmt: skip
    parser.add_argument("--cards", action="store_true", help="write model_cards/<name>.md for the best seed")
    parser.add_argument(
        "--cards-only", action="store_true", help="only (re)write the cards of --name from quality.json and the runs"
    )
    parser.add_argument("overrides", nargs="*", help="key=value overrides applied to every variant")
    parser.add_argument(
        "--set", nargs="+", action="extend", default=[], metavar="KEY=VALUE", dest="set_overrides",
        help="like the positional overrides, but usable after --seeds/--variant (which swallow what follows)",
    )  # fmt: skip
    args = parser.parse_args(argv)
    args.overrides = args.overrides + args.set_overrides
    variants = args.variant or [["default"]]
    command = "python benchmarks/quality.py " + " ".join(argv if argv is not None else sys.argv[1:])
    RESULTS.mkdir(parents=True, exist_ok=True)
    store = RESULTS / "quality.json"
    if args.cards_only:
        results = json.loads(store.read_text()) if store.is_file() else {}
        entries = [e for e in results.values() if e["dataset"] == args.name]
        if not entries:
            parser.error(f"{store} has no results for {args.name!r}: run without --cards-only first")
        for entry in entries:
            print(write_card(entry, entry.get("output_root", args.output_root)))
        return 0
    if not args.recipe:
        parser.error("--recipe is required (unless --cards-only)")
    commit = git_commit()  # before training: the code and recipe the runs start from
    for variant in variants:
        name, extra = variant[0], parse_overrides(variant[1:])
        runs = []
        for seed in args.seeds:
            overrides = {**parse_overrides(args.overrides), **extra, "seed": seed}
            overrides["output_dir"] = os.path.join(args.output_root, args.name, name, f"seed{seed}")
            recipe = load_recipe(args.recipe, overrides)
            done = Path(recipe.output_dir) / "metrics.json"
            if args.reuse and done.is_file():
                result = finished_run(done, recipe)
            else:
                start = time.time()
                result = train(recipe)
                result["wall_seconds"] = time.time() - start
            keys = ("test", "validation", "train_seconds", "best_step", "wall_seconds", "test_network_only",
                    "test_prior_train_counts")  # fmt: skip
            runs.append({k: result[k] for k in keys if k in result})
            print(f"{args.name}/{name} seed {seed}: test NDCG@10 {result['test']['NDCG@10']:.4f} "
                  f"HR@10 {result['test']['HR@10']:.4f}", flush=True)  # fmt: skip
        entry = {
            "dataset": args.name,
            "variant": name,
            "recipe": args.recipe,
            "overrides": args.overrides + variant[1:],
            "seeds": args.seeds,
            "runs": runs,
            "summary": summarise(runs),
            "command": command,
            "output_root": args.output_root,
            "commit": commit,
            "machine": f"{platform.processor() or platform.machine()}, torch {torch.__version__}, "
            f"{torch.get_num_threads()} threads",
        }
        merge_results(store, {f"{args.name}/{name}": entry}, render)
        if args.cards:
            print(write_card(entry, args.output_root))
    return 0


if __name__ == "__main__":
    sys.exit(main())
