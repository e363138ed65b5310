"""Seconds per training step of the quality recipes, with and without the two CPU fast paths of the loss and
encoder: training on real events only (`unpad_training`) and cache-sized loss chunks
(`CPU_CACHE_LOGITS_PER_CHUNK`), and what the optional contrastive term (`contrastive_weight`) and distillation
(`distill_from`: three teachers of the recipe's size, scored on the fly or precomputed once per row) add. One command:

    .venv/bin/python benchmarks/train_step.py                       # beauty + sports, 1 thread, fp32
    .venv/bin/python benchmarks/train_step.py --recipes sports --threads 2 --rounds 5

Each variant trains the recipe's own model on the recipe's own batches (`prepare_data`, `training_loader`,
`build_model` of seqrec_hf.train: forward with labels, backward, AdamW step) from the same initial weights.
After warm-up, windows of a few steps are timed; the variants' windows are interleaved round by round, so
load from other work on the machine hits all of them alike, and the ratio to the "before" variant is taken
within each round (median reported). Writes benchmarks/results/train_step.{md,json}.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

import torch

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

from seqrec_hf import modeling_seqrec  # noqa: E402
from seqrec_hf.data import SeqRecCollator  # noqa: E402
from seqrec_hf.train import (  # noqa: E402
    TeacherEnsemble,
    build_model,
    load_recipe,
    prepare_data,
    training_loader,
)

sys.path.insert(0, str(Path(__file__).resolve().parent))
from baselines import cpu_name, git_commit  # noqa: E402

# name -> (unpad_training, cache-sized CPU loss chunks, contrastive_weight, distillation); the last rows price
# the optional contrastive term (its second encoder pass) and distillation on top of the defaults
VARIANTS = {
    "before (padded encoder, 4096-position loss chunks)": (False, False, 0.0, None),
    "unpadded encoder": (True, False, 0.0, None),
    "cache-sized loss chunks": (False, True, 0.0, None),
    "both (current default)": (True, True, 0.0, None),
    "both + contrastive term (contrastive_weight > 0)": (True, True, 0.02, None),
    "both + distillation, 3 teachers scored every step": (True, True, 0.0, "on the fly"),
    "both + distillation, 3 teachers precomputed (current)": (True, True, 0.0, "precomputed"),
}


def step(model, optimizer, batch, teachers=None, distill=None) -> None:
    if distill == "precomputed":  # the teachers read each row's targets from their cache
        batch = teachers(batch)
    else:
        batch = {key: value for key, value in batch.items() if key != "row_index"}
        batch = teachers(batch) if distill else batch  # no row index: the teachers score the batch
    loss = model(**batch).loss
    loss.backward()
    optimizer.step()
    optimizer.zero_grad()


def bench_recipe(name: str, args) -> dict:
    path = Path(name) if name.endswith((".yaml", ".yml")) else REPO_ROOT / "training" / "configs" / f"{name}.yaml"
    recipe = load_recipe(path, {"mixed_precision": "no"})
    splits, tokenizer, rows = prepare_data(recipe)
    rows = rows.add_column("row_index", list(range(len(rows))))  # as train() adds it when distilling
    collator = SeqRecCollator(tokenizer, max_length=recipe.max_length)
    loader = training_loader(recipe, rows, collator)
    batches = []
    for batch in loader:
        batches.append(batch)
        if len(batches) == args.warmup + args.steps:
            break
    real = sum(int(b["attention_mask"].sum()) for b in batches) / len(batches)
    padded = sum(b["attention_mask"].numel() for b in batches) / len(batches)
    models = {}
    for variant in VARIANTS:
        torch.manual_seed(recipe.seed)
        model = build_model(recipe, tokenizer, splits["train"]).train()
        models[variant] = (model, torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3))
    with tempfile.TemporaryDirectory() as folder:  # speed does not depend on what the teachers learnt
        for seed in (1, 2, 3):
            torch.manual_seed(seed)
            build_model(recipe, tokenizer, splits["train"]).save_pretrained(f"{folder}/t{seed}")
            tokenizer.save_pretrained(f"{folder}/t{seed}")
        distilling = dataclasses.replace(recipe, distill_from=",".join(f"{folder}/t{seed}" for seed in (1, 2, 3)))
        teachers = TeacherEnsemble(distilling, tokenizer, torch.device("cpu"))
    start = time.perf_counter()
    teachers.precompute(rows, collator, recipe.batch_size)
    precompute_seconds = time.perf_counter() - start
    print(f"{name}: teacher targets of {len(rows)} rows precomputed in {precompute_seconds:.1f} s", flush=True)
    default_cache = modeling_seqrec.CPU_CACHE_LOGITS_PER_CHUNK
    seconds = {variant: [] for variant in VARIANTS}
    try:
        for round_index in range(args.rounds):
            for variant, (unpad, cache, contrastive, distill) in VARIANTS.items():
                model, optimizer = models[variant]
                model.config.unpad_training = unpad
                model.config.contrastive_weight = contrastive
                # without the cache cap only the memory cap (MAX_LOGITS_PER_CHUNK) bounds a chunk, as before
                modeling_seqrec.CPU_CACHE_LOGITS_PER_CHUNK = default_cache if cache else 2**62
                for batch in batches[: args.warmup] if round_index == 0 else []:
                    step(model, optimizer, batch, teachers, distill)
                start = time.perf_counter()
                for batch in batches[args.warmup :]:
                    step(model, optimizer, batch, teachers, distill)
                seconds[variant].append((time.perf_counter() - start) / args.steps)
                print(f"{name} round {round_index} {variant}: {seconds[variant][-1]:.3f} s/step", flush=True)
    finally:
        modeling_seqrec.CPU_CACHE_LOGITS_PER_CHUNK = default_cache
    before = next(iter(VARIANTS))
    rows_out = []
    for variant in VARIANTS:
        ratios = [b / s for b, s in zip(seconds[before], seconds[variant])]
        rows_out.append(
            {
                "variant": variant,
                "seconds_per_step_median": statistics.median(seconds[variant]),
                "seconds_per_step": seconds[variant],
                "speedup_vs_before_median": statistics.median(ratios),
                "speedup_vs_before": ratios,
            }
        )
    return {
        "recipe": str(path.relative_to(REPO_ROOT)) if path.is_relative_to(REPO_ROOT) else str(path),
        "catalog": len(tokenizer),
        "batch_size": recipe.batch_size,
        "real_events_per_batch": real,
        "padded_positions_per_batch": padded,
        "training_rows": len(rows),
        "teacher_precompute_seconds": precompute_seconds,
        "rows": rows_out,
    }


def write_markdown(payload: dict, path: Path) -> None:
    lines = [
        "# Training step time of the quality recipes: CPU fast paths on and off",
        "",
        f"Command: `{payload['command']}`  ",
        f"Commit: `{payload['commit']}`  ",
        f"Date: {payload['date']}; torch {payload['torch']}, {payload['threads']} torch thread(s), {payload['cpu']}, "
        f"load average {payload['load_start']:.2f} at the start, {payload['load_end']:.2f} at the end",
        "",
        "fp32, the recipe's model, batches and optimizer; the same initial weights for every variant; windows of "
        f"{payload['steps']} steps after {payload['warmup']} warm-up steps, variants interleaved in each of "
        f"{payload['rounds']} rounds; speed-up = before / variant within a round (median). Protocol: "
        "docs/performance.md.",
        "",
    ]
    for result in payload["results"]:
        share = result["real_events_per_batch"] / result["padded_positions_per_batch"]
        lines += [
            f"## {result['recipe']}",
            "",
            f"Catalog {result['catalog']:,} ids; batch {result['batch_size']}: "
            f"{result['real_events_per_batch']:.0f} real events in {result['padded_positions_per_batch']:.0f} padded "
            f"positions per batch ({share:.0%} real). Precomputing the 3 teachers' targets of all "
            f"{result['training_rows']:,} training rows took {result['teacher_precompute_seconds']:.1f} s "
            "(once per run).",
            "",
            "| variant | s/step (median) | per round | speed-up vs before (min-max) |",
            "|---|---:|---|---|",
        ]
        for row in result["rows"]:
            per_round = ", ".join(f"{s:.3f}" for s in row["seconds_per_step"])
            ratios = row["speedup_vs_before"]
            lines.append(
                f"| {row['variant']} | {row['seconds_per_step_median']:.3f} | {per_round} | "
                f"**{row['speedup_vs_before_median']:.2f}x** ({min(ratios):.2f}-{max(ratios):.2f}) |"
            )
        lines.append("")
    path.write_text("\n".join(lines))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--recipes", nargs="+", default=["beauty", "sports"], help="names under training/configs, or YAML paths"
    )
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=8, help="timed steps per window")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--output", default=str(REPO_ROOT / "benchmarks" / "results" / "train_step"))
    args = parser.parse_args(argv)
    threads_before = torch.get_num_threads()  # restored: callers (tests) share this process's thread pool
    torch.set_num_threads(args.threads)
    load_start = os.getloadavg()[0]
    try:
        results = [bench_recipe(name, args) for name in args.recipes]
        threads = torch.get_num_threads()
    finally:
        torch.set_num_threads(threads_before)
    payload = {
        "command": "python benchmarks/train_step.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "commit": git_commit(),
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "torch": torch.__version__,
        "threads": threads,
        "cpu": cpu_name(),
        "load_start": load_start,
        "load_end": os.getloadavg()[0],
        "rounds": args.rounds,
        "steps": args.steps,
        "warmup": args.warmup,
        "results": results,
    }
    output = Path(args.output)
    output.parent.mkdir(parents=True, exist_ok=True)
    output.with_suffix(".json").write_text(json.dumps(payload, indent=2) + "\n")
    write_markdown(payload, output.with_suffix(".md"))
    print(f"wrote {output.with_suffix('.md')} and {output.with_suffix('.json')}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
