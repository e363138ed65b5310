"""Popularity and first-order Markov baselines on the benchmark datasets, full ranking, one command:

    .venv/bin/python benchmarks/baselines.py            # writes benchmarks/results/baselines.{md,json}

Protocol: ../shared/docs/benchmarks.md (leave-one-out, full ranking, history excluded, pessimistic ties),
through the same `load_sequences` / `leave_one_out_split` / `evaluate` as the models. Data are read from
$SEQREC_DATA_DIR (default ../shared/data next to the repository) and never copied.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))  # run from a checkout without `pip install -e .`

import torch  # noqa: E402

from seqrec_hf.baselines import fit_baseline  # noqa: E402
from seqrec_hf.data import build_item_vocab, leave_one_out_split, load_sequences  # noqa: E402
from seqrec_hf.evaluation import evaluate  # noqa: E402

# name, file under the data dir, load_sequences options, max sequence length of the protocol
DATASETS = [
    ("Beauty", "amazon-yelp-s3rec-seq/Beauty.txt", {"format": "sequences"}, 50),
    ("Sports", "amazon-yelp-s3rec-seq/Sports_and_Outdoors.txt", {"format": "sequences"}, 50),
    # The file stops inside user 2999: keep the complete users 1-2998.
    ("ML-1M-half", "ml-1m-partial/ratings.first487650.dat.gz", {"format": "movielens", "drop_last_user": True}, 200),
    ("ML-100K", "ml-100k/u.data", {"format": "movielens"}, 200),
]
BASELINES = ("popularity", "markov")
SPLITS = ("validation", "test")
COLUMNS = ("HR@5", "HR@10", "HR@20", "NDCG@5", "NDCG@10", "NDCG@20", "MRR", "Coverage@10")


def git_commit() -> str:
    """HEAD, marked when the working tree differs from it (read-only: no index refresh, no lock)."""
    env = {**os.environ, "GIT_OPTIONAL_LOCKS": "0"}

    def git(*args: str) -> str:
        result = subprocess.run(
            ["git", *args], cwd=REPO_ROOT, capture_output=True, text=True, check=True, timeout=10, env=env
        )
        return result.stdout.strip()

    try:
        commit = git("rev-parse", "HEAD")
    except (OSError, subprocess.SubprocessError):
        return "none (no commit yet)"
    try:
        dirty = bool(git("status", "--porcelain", "--untracked-files=normal"))
    except (OSError, subprocess.SubprocessError):
        dirty = False
    return f"{commit} + uncommitted changes" if dirty else commit


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def run(data_dir: Path, names: list[str] | None = None, drop_last_events: int = 0) -> list[dict]:
    results = []
    for name, relative, options, max_length in DATASETS:
        if names and name not in names:
            continue
        if drop_last_events:
            options = {**options, "drop_last_events": drop_last_events}
        path = data_dir / relative
        if not path.exists():
            raise SystemExit(f"{path} not found: set SEQREC_DATA_DIR or --data-dir to the research data folder")
        sequences = load_sequences(path, **options)
        splits = leave_one_out_split(sequences)
        vocab = build_item_vocab(sequences["item_ids"])  # the catalog: every item of the data set
        stats = {
            "users": len(sequences),
            "items": len(vocab),
            "interactions": sum(len(items) for items in sequences["item_ids"]),
        }
        for baseline in BASELINES:
            for split in SPLITS:
                examples = splits[split]
                start = time.perf_counter()
                score_fn = fit_baseline(baseline, vocab, examples["item_ids"])  # inputs of this split only
                metrics = evaluate(score_fn, examples, vocab, max_length=max_length, show_progress=False)
                seconds = time.perf_counter() - start
                results.append(
                    {
                        "dataset": name,
                        "file": relative,
                        "sha256": sha256(path),
                        "load_options": options,
                        "max_length": max_length,
                        **stats,
                        "baseline": baseline,
                        "split": split,
                        "metrics": metrics,
                        "seconds": round(seconds, 3),
                    }
                )
                summary = f"HR@10 {metrics['HR@10']:.4f}  NDCG@10 {metrics['NDCG@10']:.4f}  ({seconds:.1f} s)"
                print(f"{name:<11} {baseline:<10} {split:<10} {summary}", flush=True)
    return results


def markdown(report: dict) -> str:
    lines = [
        "# Baselines: popularity and first-order Markov (full ranking)",
        "",
        f"Command: `{report['command']}`  ",
        f"Commit: `{report['git_commit']}`  ",
        f"Date: {report['date']}; Python {report['python']}, torch {report['torch']}, "
        f"{report['torch_threads']} threads, {report['cpu']}",
        "",
        "Protocol (../shared/docs/benchmarks.md, docs/data_and_evaluation.md): leave-one-out; full ranking "
        "over every item of the data set; items of the user's whole input history excluded; pessimistic "
        "ties (rank = 1 + number of other items scoring >= the target); metrics averaged over all users. "
        "Both baselines are fitted on the inputs of the evaluated split only: for test, every user's history "
        "without its last item; for validation, without its last two. Markov = counts of last input item -> "
        "next item, popularity breaks ties and is the fallback.",
        "",
    ]
    shift = next((r["load_options"].get("drop_last_events", 0) for r in report["results"]), 0)
    if shift:
        lines += [
            f"**Shifted split:** every user's last {shift} events were dropped before splitting, so this is the"
            " protocol's split as of that many events earlier (its test target is the real validation item).",
            "",
        ]
    for split in ("test", "validation"):
        lines += [f"## {split.capitalize()} split", ""]
        lines.append("| dataset | users | items | baseline | " + " | ".join(COLUMNS) + " |")
        lines.append("|---|---:|---:|---|" + "---:|" * len(COLUMNS))
        for row in report["results"]:
            if row["split"] != split:
                continue
            values = " | ".join(f"{row['metrics'][c]:.4f}" for c in COLUMNS)
            lines.append(f"| {row['dataset']} | {row['users']} | {row['items']} | {row['baseline']} | {values} |")
        lines.append("")
    lines += [
        "Datasets: Beauty and Sports are the S3-Rec/ICLRec 5-core sequences (no timestamps, file order); "
        "ML-1M-half is ml-1m-partial/ratings.first487650.dat.gz with the truncated user 2999 dropped "
        "(users 1-2998; not comparable to published full ML-1M numbers); ML-100K is the original u.data. "
        "MovieLens histories are sorted by timestamp with a stable sort. File checksums are in baselines.json.",
        "",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    default_data = Path(os.environ.get("SEQREC_DATA_DIR", REPO_ROOT.parent / "shared" / "data"))
    parser.add_argument("--data-dir", type=Path, default=default_data)
    parser.add_argument("--output-dir", type=Path, default=REPO_ROOT / "benchmarks" / "results")
    parser.add_argument("--dataset", nargs="+", choices=[d[0] for d in DATASETS], help="only these data sets")
    parser.add_argument(
        "--drop-last-events",
        type=int,
        default=0,
        metavar="N",
        help="the split as of N events earlier (N=1: the real validation item is the test target); writes "
        "baselines-shift<N>.{md,json}",
    )
    args = parser.parse_args(argv)

    results = run(args.data_dir, args.dataset, args.drop_last_events)
    stem = f"baselines-shift{args.drop_last_events}" if args.drop_last_events else "baselines"
    report = {
        "command": " ".join(["python benchmarks/baselines.py", *(argv if argv is not None else sys.argv[1:])]),
        "git_commit": git_commit(),
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "cpu": cpu_name(),
        "results": results,
    }
    args.output_dir.mkdir(parents=True, exist_ok=True)
    (args.output_dir / f"{stem}.json").write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    (args.output_dir / f"{stem}.md").write_text(markdown(report), encoding="utf-8")
    print(f"wrote {args.output_dir / stem}.md and {stem}.json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
