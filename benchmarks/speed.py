"""Speed benchmark: training tokens/s, evaluation users/s, recommend() latency, a 1M-item catalog, and RecTools'
SASRec side by side in the same run. One command:

    .venv/bin/python benchmarks/speed.py                 # everything (7-12 min on 2 cores); writes
                                                          # benchmarks/results/speed.{md,json}
    .venv/bin/python benchmarks/speed.py --only train --datasets beauty --no-peer --rounds 3   # a subset

Protocol (../shared/docs/benchmarks.md, "Speed protocol"; details in docs/performance.md):
- Training: non-padding target positions per second, Beauty (d=64, 2 layers, len 50, batch 256, full CE) and
  ML-1M-half (len 200, batch 128), ours in fp32 and bf16 autocast. Our side is the library itself: data through
  `load_sequences` / `leave_one_out_split` / `SeqRecCollator`, the step of `seqrec_hf.train` (forward with
  labels, backward, grad clipping, AdamW). After warm-up, windows of a few batches are timed, data loading
  included; the peer's windows are interleaved with ours (ours, peer, ours, peer, ...), so load from other
  work on the machine hits both sides alike, and ratios are taken round by round (median reported).
- Peer: RecTools SASRec (full softmax loss, same data rows, length, width, depth, heads, dropout and batch)
  runs in its own virtualenv as a subprocess of this script (`--peer-python`), driven through its own
  `fit()` (Lightning); a callback pauses it between windows.
- Evaluation: full-ranking users/s over every Beauty test user: ours `evaluate(model_score_fn(model), ...)`
  (exact ranks of the target, history excluded, plus top-10 coverage), RecTools `recommend(k=10,
  filter_viewed=True)`; both score the whole catalog.
- Serving: `recommend()` latency p50/p99 for 1 and 256 users, on the Beauty catalog and on a synthetic
  catalog of 1,000,000 items (random embeddings), plus the `torch.export` program; peak RSS of the phase.
- Large catalog: one epoch of synthetic short sequences over 1,000,000 items with chunked full cross-entropy,
  in a fresh process, with its peak RSS.
Absolute times on a shared machine are noise; ratios measured in one run are the figures that count.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from datetime import datetime, timezone
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_PEER_PYTHON = "/tmp/rtenv/bin/python"
MALLOC_VARS = (
    "MALLOC_MMAP_THRESHOLD_",
    "MALLOC_MMAP_MAX_",
    "MALLOC_TRIM_THRESHOLD_",
    "MALLOC_ARENA_MAX",
    "MALLOC_TOP_PAD_",
)

# name -> file under the data dir, load_sequences options, max length, batch size, dropout (the recipes')
DATASETS = {
    "beauty": ("amazon-yelp-s3rec-seq/Beauty.txt", {"format": "sequences"}, 50, 256, 0.5),
    "ml1m-half": (
        "ml-1m-partial/ratings.first487650.dat.gz",
        {"format": "movielens", "drop_last_user": True},
        200,
        128,
        0.2,
    ),
}
# SASRec's (and RecTools') feed-forward layer is as wide as the model: the same here, for the same model size.
MODEL_SIZE = {"hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2, "intermediate_size": 64}
RECIPE_FFN = 256  # our recipes' feed-forward width, timed as an extra run


# --------------------------------------------------------------------------------------------------------
# Shared by both interpreters (ours and the peer's): nothing here imports seqrec_hf.
# --------------------------------------------------------------------------------------------------------


def peak_rss_mb() -> float:
    """Peak resident set size of this process so far (MB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


class RssSampler:
    """Samples this process's RSS every few ms in a thread: the peak of one phase, not of the whole run."""

    def __init__(self, interval: float = 0.005):
        self.interval = interval
        self.peak_mb = 0.0
        self._stop = threading.Event()
        self._page = os.sysconf("SC_PAGE_SIZE")

    def _rss_mb(self) -> float:
        with open("/proc/self/statm") as handle:
            return int(handle.read().split()[1]) * self._page / 2**20

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak_mb = max(self.peak_mb, self._rss_mb())
            time.sleep(self.interval)

    def __enter__(self) -> RssSampler:
        self.start_mb = self.peak_mb = self._rss_mb()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.peak_mb = max(self.peak_mb, self._rss_mb())


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    index = min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))
    return ordered[index]


# --------------------------------------------------------------------------------------------------------
# The peer: RecTools SASRec, run inside RecTools' own virtualenv (`--peer-worker`).
# Commands arrive as JSON lines on stdin; replies are JSON lines on stdout prefixed with "@@ ".
# --------------------------------------------------------------------------------------------------------


def _peer_reply(payload: dict) -> None:
    sys.stdout.write("@@ " + json.dumps(payload) + "\n")
    sys.stdout.flush()


def _peer_command() -> dict:
    line = sys.stdin.readline()
    if not line:
        raise SystemExit(0)
    return json.loads(line)


def _peer_dataset(path: str):
    import pandas as pd
    from rectools import Columns
    from rectools.dataset import Dataset

    frame = pd.read_csv(path, dtype={"user": str, "item": str, "order": "int64"})
    interactions = pd.DataFrame(
        {
            Columns.User: frame["user"],
            Columns.Item: frame["item"],
            Columns.Weight: 1.0,
            # our order within each user, as seconds: RecTools sorts by it (stably), so sequences are identical
            Columns.Datetime: pd.to_datetime(frame["order"], unit="s"),
        }
    )
    return Dataset.construct(interactions), frame["user"].unique()


def peer_worker() -> int:
    import rectools
    import torch
    from pytorch_lightning import Callback, Trainer
    from rectools.models import SASRecModel

    state: dict = {}

    class Windows(Callback):
        """Times windows of `window` batches (data loading included); waits for "go" before each one."""

        def __init__(self, warmup: int, window: int, windows: int):
            self.warmup, self.window, self.windows = warmup, window, windows
            self.batches = self.targets = self.done = 0
            self.start = 0.0

        def _wait(self) -> None:
            command = _peer_command()
            if command.get("cmd") != "go":
                raise RuntimeError(f"expected 'go', got {command}")
            self.start = time.perf_counter()

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            self.batches += 1
            if self.batches <= self.warmup:
                if self.batches == self.warmup:
                    _peer_reply({"event": "ready", "rss_mb": peak_rss_mb()})
                    self._wait()
                    self.batches = self.targets = 0
                    self.warmup = -1  # from now on every batch is timed
                return
            self.targets += int((batch["y"] != 0).sum())  # non-padding targets (0 is RecTools' padding id)
            if self.batches == self.window:
                seconds = time.perf_counter() - self.start
                self.done += 1
                _peer_reply({"event": "window", "seconds": seconds, "targets": self.targets, "batches": self.batches})
                self.batches = self.targets = 0
                if self.done < self.windows:
                    self._wait()

    _peer_reply({"event": "hello", "rectools": rectools.__version__, "torch": torch.__version__})
    while True:
        command = _peer_command()
        name = command["cmd"]
        if name == "quit":
            return 0
        if name == "train":
            torch.set_num_threads(command["threads"])
            torch.manual_seed(0)
            dataset, _ = _peer_dataset(command["train_file"])
            callback = Windows(command["warmup"], command["window"], command["windows"])
            steps = command["warmup"] + command["window"] * command["windows"]

            def get_trainer(steps=steps, callback=callback):
                return Trainer(
                    max_steps=steps,
                    max_epochs=10_000,
                    enable_progress_bar=False,
                    enable_model_summary=False,
                    logger=False,
                    enable_checkpointing=False,
                    accelerator="cpu",
                    devices=1,
                    callbacks=[callback],
                )

            model = SASRecModel(
                n_blocks=command["layers"],
                n_heads=command["heads"],
                n_factors=command["hidden"],
                dropout_rate=command["dropout"],
                session_max_len=command["max_length"],
                batch_size=command["batch_size"],
                loss="softmax",
                lr=1e-3,
                dataloader_num_workers=0,
                recommend_batch_size=256,
                recommend_torch_device="cpu",
                get_trainer_func=get_trainer,
            )
            model.fit(dataset)
            state["model"] = model
            _peer_reply({"event": "trained", "rss_mb": peak_rss_mb()})
        elif name == "eval":
            dataset, users = _peer_dataset(command["history_file"])
            start = time.perf_counter()
            reco = state["model"].recommend(users, dataset, k=command["k"], filter_viewed=True)
            seconds = time.perf_counter() - start
            _peer_reply({"event": "eval", "seconds": seconds, "users": int(len(users)), "rows": int(len(reco))})
        else:
            raise RuntimeError(f"unknown command {command}")


class Peer:
    """Parent-side handle on the peer worker process."""

    def __init__(self, python: str, log_path: Path):
        self.log_path = log_path
        self.log = open(log_path, "w")  # noqa: SIM115 (closed in close())
        self.proc = subprocess.Popen(
            [python, str(Path(__file__).resolve()), "--peer-worker"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self.log,
            text=True,
            cwd=tempfile.gettempdir(),  # never import the repository's modules by accident
        )
        self.info = self.receive("hello")

    def send(self, payload: dict) -> None:
        self.proc.stdin.write(json.dumps(payload) + "\n")
        self.proc.stdin.flush()

    def receive(self, event: str) -> dict:
        for line in self.proc.stdout:
            if line.startswith("@@ "):
                reply = json.loads(line[3:])
                if reply["event"] != event:
                    raise RuntimeError(f"peer: expected {event}, got {reply}")
                return reply
        self.log.flush()
        tail = self.log_path.read_text()[-3000:]
        raise RuntimeError(f"the peer worker stopped (exit {self.proc.wait()}); end of its log:\n{tail}")

    def close(self) -> None:
        if self.proc.poll() is None:
            self.send({"cmd": "quit"})
            self.proc.wait(timeout=60)
        self.log.close()


# --------------------------------------------------------------------------------------------------------
# Our side: everything through the library.
# --------------------------------------------------------------------------------------------------------


def load_data(data_dir: Path, name: str) -> dict:
    """Splits, tokenizer and training rows, as `seqrec_hf.train.prepare_data` makes them (leave-one-out)."""
    from seqrec_hf import ItemTokenizer
    from seqrec_hf.data import leave_one_out_split, load_sequences

    relative, options, max_length, batch_size, dropout = DATASETS[name]
    path = data_dir / relative
    if not path.exists():
        raise SystemExit(f"{path} not found: set SEQREC_DATA_DIR or --data-dir to the research data folder")
    sequences = load_sequences(path, **options)
    splits = leave_one_out_split(sequences)
    tokenizer = ItemTokenizer.from_items(item for history in sequences["item_ids"] for item in history)
    train_rows = splits["train"].filter(lambda row: len(row["item_ids"]) >= 2)
    return {
        "name": name,
        "splits": splits,
        "tokenizer": tokenizer,
        "train_rows": train_rows,
        "max_length": max_length,
        "batch_size": batch_size,
        "dropout": dropout,
        "users": len(sequences),
        "items": len(tokenizer) - tokenizer.num_special_tokens,
    }


def write_interactions(rows, path: Path, max_events: int | None = None) -> None:
    """user,item,order csv of sequence rows (the most recent `max_events` of each), for the peer."""
    with open(path, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["user", "item", "order"])
        for row in rows:
            items = row["item_ids"][-max_events:] if max_events else row["item_ids"]
            for order, item in enumerate(items):
                writer.writerow([row["user_id"], item, order])


def build_model(data: dict, use_time_bias: bool = False, **overrides):
    from seqrec_hf import SeqRecConfig, SeqRecForNextItemPrediction

    config = SeqRecConfig(
        vocab_size=len(data["tokenizer"]),
        hidden_dropout_prob=data["dropout"],
        attention_dropout=data["dropout"],
        max_position_embeddings=data["max_length"],
        use_time_bias=use_time_bias,
        **{**MODEL_SIZE, **overrides},
    )
    return SeqRecForNextItemPrediction(config)


class OurTrainer:
    """The training step of `seqrec_hf.train` (AdamW, grad clipping 1.0), timed in windows of batches."""

    def __init__(
        self, data: dict, precision: str, use_time_bias: bool = False, seed: int = 0, compile: bool = False, **overrides
    ):
        import torch

        from seqrec_hf.data import SeqRecCollator

        torch.manual_seed(seed)
        self.torch = torch
        self.model = build_model(data, use_time_bias=use_time_bias, **overrides).train()
        rows = data["train_rows"]
        if not use_time_bias and "timestamps" in rows.column_names:
            rows = rows.remove_columns("timestamps")
        rows = rows.remove_columns([c for c in rows.column_names if c not in ("item_ids", "timestamps")])
        self.loader = torch.utils.data.DataLoader(
            rows,
            batch_size=data["batch_size"],
            shuffle=True,
            collate_fn=SeqRecCollator(data["tokenizer"], max_length=data["max_length"]),
            generator=torch.Generator().manual_seed(seed),
        )
        self.batches = iter(self.loader)
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=1e-3, betas=(0.9, 0.98))
        self.bf16 = precision == "bf16"
        # torch.compile (inductor: C++ kernels for the CPU); the graph breaks at the data-dependent gather of
        # the real positions, so the Transformer and the loss compile as separate graphs
        self.forward = torch.compile(self.model) if compile else self.model

    def _next_batch(self):
        try:
            return next(self.batches)
        except StopIteration:
            self.batches = iter(self.loader)
            return next(self.batches)

    def step(self) -> int:
        torch = self.torch
        batch = self._next_batch()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=self.bf16):
            loss = self.forward(**batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), 1.0)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        # real target positions, counted as seqrec_hf.train counts them
        return int(((batch["labels"][:, 1:] >= 0) & batch["attention_mask"][:, :-1].bool()).sum())

    def window(self, batches: int) -> dict:
        start = time.perf_counter()
        targets = sum(self.step() for _ in range(batches))
        return {"seconds": time.perf_counter() - start, "targets": targets, "batches": batches}


def summarize_windows(windows: list[dict]) -> dict:
    rates = [w["targets"] / w["seconds"] for w in windows]
    return {
        "tokens_per_s_median": statistics.median(rates),
        "tokens_per_s_windows": [round(r, 1) for r in rates],
        "batches_per_window": windows[0]["batches"] if windows else 0,
        "windows": len(windows),
    }


def paired_ratio(ours: list[dict], peer: list[dict]) -> dict:
    ratios = [(o["targets"] / o["seconds"]) / (p["targets"] / p["seconds"]) for o, p in zip(ours, peer)]
    return {"median": statistics.median(ratios), "min": min(ratios), "max": max(ratios), "rounds": len(ratios)}


def bench_training(data: dict, args, peer: Peer | None, tmp: Path) -> dict:
    import torch

    runs = {
        "ours fp32": OurTrainer(data, "fp32"),
        "ours bf16": OurTrainer(data, "bf16"),
        f"ours fp32, FFN {RECIPE_FFN}": OurTrainer(data, "fp32", intermediate_size=RECIPE_FFN),
    }
    if args.compile:
        runs["ours fp32, torch.compile"] = OurTrainer(data, "fp32", compile=True)
    if "timestamps" in data["train_rows"].column_names:
        runs["ours fp32, time-aware"] = OurTrainer(data, "fp32", use_time_bias=True)
    windows: dict[str, list[dict]] = {name: [] for name in runs}
    result: dict = {
        "dataset": data["name"],
        "max_length": data["max_length"],
        "batch_size": data["batch_size"],
        "dropout": data["dropout"],
        **MODEL_SIZE,
        "train_rows": len(data["train_rows"]),
        "real_targets_per_epoch": sum(min(len(r), data["max_length"]) - 1 for r in data["train_rows"]["item_ids"]),
    }
    with RssSampler() as rss:
        for name, trainer in runs.items():  # warm-up: first batches allocate, fill caches, pick kernels
            # a compiled model recompiles for the first few shapes (then marks them dynamic): more warm-up
            for _ in range(args.warmup + (6 if "compile" in name else 0)):
                trainer.step()
        if peer is not None:
            train_file = tmp / f"{data['name']}-train.csv"
            # the peer keeps the last max_length + 1 events of each row, as our collator keeps the last max_length
            write_interactions(data["train_rows"], train_file)
            peer.send(
                {
                    "cmd": "train",
                    "train_file": str(train_file),
                    "threads": torch.get_num_threads(),
                    "warmup": args.warmup,
                    "window": args.window,
                    "windows": args.rounds,
                    "layers": MODEL_SIZE["num_hidden_layers"],
                    "heads": MODEL_SIZE["num_attention_heads"],
                    "hidden": MODEL_SIZE["hidden_size"],
                    "dropout": data["dropout"],
                    "max_length": data["max_length"],
                    "batch_size": data["batch_size"],
                }
            )
            peer.receive("ready")
            windows["RecTools SASRec"] = []
        for round_index in range(args.rounds):
            # ABBA order (ours then the peer, then the peer first): a load swing does not favour one side
            if peer is not None and round_index % 2 == 1:
                peer.send({"cmd": "go"})
                windows["RecTools SASRec"].append(peer.receive("window"))
            for name, trainer in runs.items():
                windows[name].append(trainer.window(args.window))
            if peer is not None and round_index % 2 == 0:
                peer.send({"cmd": "go"})
                windows["RecTools SASRec"].append(peer.receive("window"))
            line = "  ".join(f"{n}: {w[-1]['targets'] / w[-1]['seconds']:.0f}" for n, w in windows.items())
            print(f"  [{data['name']} train round {round_index + 1}/{args.rounds}] tokens/s  {line}", flush=True)
        if peer is not None:
            result["peer_rss_mb"] = peer.receive("trained")["rss_mb"]
    result["ours_phase_peak_rss_mb"] = rss.peak_mb
    result["runs"] = {name: summarize_windows(w) for name, w in windows.items()}
    if peer is not None:
        result["ratios_vs_rectools"] = {
            name: paired_ratio(windows[name], windows["RecTools SASRec"]) for name in runs if name != "RecTools SASRec"
        }
    result["_models"] = {name: trainer.model for name, trainer in runs.items()}
    return result


def bench_evaluation(data: dict, model, args, peer: Peer | None, tmp: Path) -> dict:
    from seqrec_hf.evaluation import evaluate, model_score_fn

    test = data["splits"]["test"]
    if "timestamps" in test.column_names and not model.config.use_time_bias:
        test = test.remove_columns([c for c in ("timestamps", "target_timestamp") if c in test.column_names])
    result: dict = {"dataset": data["name"], "users": len(test), "rounds": args.eval_rounds}
    ours, theirs = [], []
    if peer is not None:
        history_file = tmp / f"{data['name']}-test-history.csv"
        write_interactions(test, history_file)
    with RssSampler() as rss:
        for round_index in range(args.eval_rounds):

            def run_ours():
                start = time.perf_counter()
                evaluate(
                    model_score_fn(model), test, data["tokenizer"], max_length=data["max_length"], show_progress=False
                )
                ours.append(len(test) / (time.perf_counter() - start))

            def run_peer():
                peer.send({"cmd": "eval", "history_file": str(history_file), "k": 10})
                reply = peer.receive("eval")
                theirs.append(reply["users"] / reply["seconds"])

            order = [run_ours] if peer is None else [run_ours, run_peer][:: 1 if round_index % 2 == 0 else -1]
            for run in order:  # ABBA, as for training
                run()
            line = f"ours {ours[-1]:.0f}" + (f"  RecTools {theirs[-1]:.0f}" if peer is not None else "")
            print(f"  [{data['name']} eval round {round_index + 1}/{args.eval_rounds}] users/s  {line}", flush=True)
    result["ours_users_per_s"] = statistics.median(ours)
    result["ours_users_per_s_rounds"] = [round(x, 1) for x in ours]
    result["ours_phase_peak_rss_mb"] = rss.peak_mb
    if peer is not None:
        result["rectools_users_per_s"] = statistics.median(theirs)
        result["rectools_users_per_s_rounds"] = [round(x, 1) for x in theirs]
        result["ratio_vs_rectools"] = statistics.median(o / t for o, t in zip(ours, theirs))
    return result


def time_calls(call, inputs: list[dict], warmup: int = 3) -> dict:
    for batch in inputs[:warmup]:
        call(batch)
    times = []
    for batch in inputs:
        start = time.perf_counter()
        call(batch)
        times.append((time.perf_counter() - start) * 1000)
    return {
        "p50_ms": percentile(times, 50),
        "p99_ms": percentile(times, 99),
        "mean_ms": statistics.fmean(times),
        "calls": len(times),
    }


def bench_recommend(model, tokenizer, histories: list[list[str]], args, label: str, export: bool) -> dict:
    import random

    import torch

    model.eval()
    rng = random.Random(0)
    max_length = model.config.max_position_embeddings

    def batches(size: int, count: int) -> list[dict]:
        out = []
        for _ in range(count):
            chosen = [histories[rng.randrange(len(histories))] for _ in range(size)]
            out.append(dict(tokenizer(chosen, max_length=max_length, return_tensors="pt")))
        return out

    def recommend(batch):
        return model.recommend(**batch, top_k=10)

    result: dict = {"catalog_items": model.config.vocab_size - model.config.num_special_tokens, "top_k": 10}
    with RssSampler() as rss, torch.inference_mode():
        result["1 user"] = time_calls(recommend, batches(1, args.single_calls))
        result["256 users"] = time_calls(recommend, batches(256, args.batch_calls))
    result["phase_peak_rss_mb"] = rss.peak_mb
    result["rss_before_mb"] = rss.start_mb
    if export:
        from seqrec_hf.export import export_for_serving

        example = batches(4, 1)[0]
        program = export_for_serving(model, **example, top_k=10)
        check = batches(8, 1)[0]
        same = torch.equal(program(**check)[0], model.recommend(**check, top_k=10)[0])
        with torch.inference_mode():
            result["torch.export, 1 user"] = time_calls(lambda b: program(**b), batches(1, args.single_calls))
            result["torch.export, 256 users"] = time_calls(lambda b: program(**b), batches(256, args.batch_calls))
        result["torch.export_matches_eager"] = same
    print(
        f"  [recommend {label}] 1 user p50 {result['1 user']['p50_ms']:.2f} ms p99 {result['1 user']['p99_ms']:.2f}"
        f" ms; 256 users p50 {result['256 users']['p50_ms']:.1f} ms; peak RSS {rss.peak_mb:.0f} MB",
        flush=True,
    )
    return result


def synthetic_catalog_model(num_items: int, max_length: int):
    """A model over `num_items` synthetic items (random embeddings: latency does not depend on training)."""
    import torch

    from seqrec_hf import ItemTokenizer, SeqRecConfig, SeqRecForNextItemPrediction

    torch.manual_seed(0)
    tokenizer = ItemTokenizer.from_items(str(i) for i in range(num_items))
    config = SeqRecConfig(vocab_size=len(tokenizer), max_position_embeddings=max_length, **MODEL_SIZE)
    return SeqRecForNextItemPrediction(config), tokenizer


def synthetic_histories(num_items: int, count: int, low: int, high: int, seed: int = 0) -> list[list[str]]:
    """Histories of `low`-`high` events; item popularity is skewed (Zipf-like) as in real catalogs."""
    import torch

    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(low, high + 1, (count,), generator=g)
    # inverse-CDF of a power law: a few items are frequent, most of the catalog is rare (and still seen)
    draws = (torch.rand(int(lengths.sum()), generator=g) ** 3 * num_items).long().clamp(max=num_items - 1)
    histories, offset = [], 0
    for length in lengths.tolist():
        histories.append([str(i) for i in draws[offset : offset + length].tolist()])
        offset += length
    return histories


def large_train_worker(args) -> int:
    """One epoch over synthetic sequences and a 1M-item catalog, in a fresh process (clean peak RSS)."""
    import torch

    from seqrec_hf.data import SeqRecCollator

    torch.set_num_threads(args.threads)
    model, tokenizer = synthetic_catalog_model(args.large_items, 50)
    model.config.loss_chunk_size = args.large_loss_chunk
    model.train()
    histories = synthetic_histories(args.large_items, args.large_users, args.large_min_len, args.large_max_len)
    rows = [{"item_ids": h} for h in histories]
    loader = torch.utils.data.DataLoader(
        rows,
        batch_size=args.large_batch,
        shuffle=True,
        collate_fn=SeqRecCollator(tokenizer, max_length=50),
        generator=torch.Generator().manual_seed(0),
    )
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, betas=(0.9, 0.98))
    bf16 = args.large_precision == "bf16"
    rss_start = peak_rss_mb()
    targets, losses = 0, []
    start = time.perf_counter()
    for batch in loader:
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            loss = model(**batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        targets += int(((batch["labels"][:, 1:] >= 0) & batch["attention_mask"][:, :-1].bool()).sum())
        losses.append(float(loss))
    seconds = time.perf_counter() - start
    weights_mb = sum(p.numel() * p.element_size() for p in model.parameters()) / 2**20
    print(
        "@@ "
        + json.dumps(
            {
                "catalog_items": args.large_items,
                "sequences": args.large_users,
                "lengths": [args.large_min_len, args.large_max_len],
                "batch_size": args.large_batch,
                "loss_chunk_size": args.large_loss_chunk,
                "precision": args.large_precision,
                "batches": len(loader),
                "targets": targets,
                "epoch_seconds": seconds,
                "tokens_per_s": targets / seconds,
                "first_loss": losses[0],
                "last_loss": losses[-1],
                "weights_mb": weights_mb,
                "rss_after_setup_mb": rss_start,
                "peak_rss_mb": peak_rss_mb(),
                "malloc_env": {k: os.environ[k] for k in MALLOC_VARS if k in os.environ},
            }
        ),
        flush=True,
    )
    return 0


def bench_large_training(args) -> dict:
    command = [
        sys.executable,
        str(Path(__file__).resolve()),
        "--large-train-worker",
        "--threads",
        str(args.threads),
        "--large-items",
        str(args.large_items),
        "--large-users",
        str(args.large_users),
        "--large-min-len",
        str(args.large_min_len),
        "--large-max-len",
        str(args.large_max_len),
        "--large-batch",
        str(args.large_batch),
        "--large-loss-chunk",
        str(args.large_loss_chunk),
        "--large-precision",
        args.large_precision,
    ]
    result = subprocess.run(command, capture_output=True, text=True, cwd=REPO_ROOT)
    if result.returncode != 0:
        raise RuntimeError(f"the 1M-item training run failed (exit {result.returncode}):\n{result.stderr[-3000:]}")
    line = next(x for x in result.stdout.splitlines() if x.startswith("@@ "))
    report = json.loads(line[3:])
    print(
        f"  [1M-item epoch] {report['epoch_seconds']:.0f} s, {report['tokens_per_s']:.0f} tokens/s, "
        f"peak RSS {report['peak_rss_mb']:.0f} MB",
        flush=True,
    )
    return report


# --------------------------------------------------------------------------------------------------------
# Report
# --------------------------------------------------------------------------------------------------------


def markdown(report: dict) -> str:
    env = report["environment"]
    lines = [
        "# Speed: training, evaluation, serving, 1M-item catalog (RecTools SASRec side by side)",
        "",
        f"Command: `{report['command']}`  ",
        f"Commit: `{report['git_commit']}`  ",
        f"Date: {report['date']}; Python {env['python']}, torch {env['torch']}, {env['torch_threads']} torch "
        f"threads, {env['cpu']} ({env['cpu_count']} cores), load average {env['load_average_start']} at the "
        f"start, {env['load_average_end']} at the end; malloc settings: {env['malloc_env'] or 'glibc defaults'}  ",
        f"Peer: {report.get('peer') or 'not run'}  ",
        f"Wall time of the run: {report['wall_seconds'] / 60:.1f} min; peak RSS of the main process "
        f"{report['peak_rss_mb']:.0f} MB",
        "",
        "The machine is shared: absolute rates swing with other work, so our windows and the peer's are "
        "interleaved and ratios are taken round by round (median over rounds). Protocol and caveats: "
        "docs/performance.md.",
        "",
    ]
    training = report.get("training", [])
    if training:
        lines += [
            "## Training throughput (non-padding target positions per second)",
            "",
            "| dataset | len | batch | run | tokens/s (median) | per window | ours / RecTools (min-max) |",
            "|---|---:|---:|---|---:|---|---|",
        ]
        for block in training:
            ratios = block.get("ratios_vs_rectools", {})
            for name, run in block["runs"].items():
                ratio = ratios.get(name)
                ratio_text = f"**{ratio['median']:.2f}x** ({ratio['min']:.2f}-{ratio['max']:.2f})" if ratio else ""
                per_window = ", ".join(f"{x:.0f}" for x in run["tokens_per_s_windows"])
                lines.append(
                    f"| {block['dataset']} | {block['max_length']} | {block['batch_size']} | {name} | "
                    f"{run['tokens_per_s_median']:.0f} | {per_window} | {ratio_text} |"
                )
        lines += [
            "",
            "Windows of "
            + ", ".join(f"{b['dataset']}: {next(iter(b['runs'].values()))['batches_per_window']}" for b in training)
            + " batches after warm-up, data loading included. Same model on both sides: d=64, 2 layers, 2 heads, "
            "feed-forward width 64 (SASRec's and RecTools'), full cross-entropy over the whole catalog. "
            f"'FFN {RECIPE_FFN}' = our recipes' feed-forward width (more work); time-aware = HSTU time bias "
            "(RecTools' SASRec has none).",
            "",
        ]
    evaluation = report.get("evaluation")
    if evaluation:
        lines += [
            "## Full-ranking evaluation (every test user)",
            "",
            "| dataset | users | ours users/s | RecTools users/s | ours / RecTools |",
            "|---|---:|---:|---:|---:|",
        ]
        peer_rate = evaluation.get("rectools_users_per_s")
        ratio = evaluation.get("ratio_vs_rectools")
        lines.append(
            f"| {evaluation['dataset']} | {evaluation['users']} | {evaluation['ours_users_per_s']:.0f} | "
            f"{'' if peer_rate is None else f'{peer_rate:.0f}'} | {'' if ratio is None else f'**{ratio:.2f}x**'} |"
        )
        lines += [
            "",
            "Ours: `evaluate(model_score_fn(model), test, ...)` (exact pessimistic rank of the target among all "
            "items, full history excluded, HR/NDCG/MRR and Coverage@10). RecTools: `recommend(users, dataset, "
            "k=10, filter_viewed=True)` on the same histories. Median over "
            f"{evaluation['rounds']} interleaved round(s).",
            "",
        ]
    serving = report.get("serving", {})
    if serving:
        lines += [
            "## Serving: `recommend()` latency (top-10, history excluded)",
            "",
            "| catalog | path | users per call | p50 ms | p99 ms | calls | RSS MB: phase start -> peak |",
            "|---|---|---:|---:|---:|---:|---:|",
        ]
        for label, block in serving.items():
            for key in ("1 user", "256 users", "torch.export, 1 user", "torch.export, 256 users"):
                if key not in block:
                    continue
                path = "torch.export program" if key.startswith("torch.export") else "recommend()"
                users = 1 if key.endswith("1 user") else 256
                stats = block[key]
                lines.append(
                    f"| {label} ({block['catalog_items']:,} items) | {path} | {users} | {stats['p50_ms']:.2f} | "
                    f"{stats['p99_ms']:.2f} | {stats['calls']} | {block['rss_before_mb']:.0f} -> "
                    f"{block['phase_peak_rss_mb']:.0f} |"
                )
        lines += [
            "",
            "The whole process is measured (data sets, tokenizers and the other models included): the growth "
            "within a phase is what serving costs. The torch.export program returns the same items as "
            "`recommend()` (checked on a batch of 8 users in the run).",
            "",
        ]
    large = report.get("large_training")
    if large:
        lines += [
            "## Training with a 1,000,000-item catalog (chunked full cross-entropy)",
            "",
            f"One epoch of {large['sequences']:,} synthetic sequences of {large['lengths'][0]}-{large['lengths'][1]} "
            f"events (Zipf-like popularity), batch {large['batch_size']}, loss chunk {large['loss_chunk_size']} "
            f"positions, {large['precision']}: **{large['epoch_seconds']:.0f} s** for {large['targets']:,} targets "
            f"({large['tokens_per_s']:.0f} tokens/s), loss {large['first_loss']:.2f} -> {large['last_loss']:.2f}, "
            f"**peak RSS {large['peak_rss_mb']:,.0f} MB** (weights {large['weights_mb']:.0f} MB; "
            f"peak {large['rss_after_setup_mb']:.0f} MB before training: tokenizer, model, data), in a fresh process; "
            "malloc settings: "
            f"{large['malloc_env'] or 'glibc defaults'}.",
            "",
        ]
    return "\n".join(lines)


def environment() -> dict:
    import torch
    from baselines import cpu_name  # benchmarks/baselines.py

    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "cpu": cpu_name(),
        "cpu_count": os.cpu_count(),
        "malloc_env": {k: os.environ[k] for k in MALLOC_VARS if k in os.environ},
        "load_average_start": round(os.getloadavg()[0], 2),
    }


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    default_data = Path(os.environ.get("SEQREC_DATA_DIR", REPO_ROOT.parent / "shared" / "data"))
    parser.add_argument("--data-dir", type=Path, default=default_data)
    parser.add_argument("--output-dir", type=Path, default=REPO_ROOT / "benchmarks" / "results")
    parser.add_argument(
        "--only",
        default="train,eval,serve,large",
        help="comma-separated phases: train, eval (Beauty; needs train), serve, large",
    )
    parser.add_argument("--datasets", default="beauty,ml1m-half", help="training datasets: beauty, ml1m-half")
    parser.add_argument("--threads", type=int, default=os.cpu_count(), help="torch threads, both sides")
    parser.add_argument("--rounds", type=int, default=5, help="timed training windows per run")
    parser.add_argument("--window", type=int, default=4, help="batches per timed training window")
    parser.add_argument("--warmup", type=int, default=2, help="untimed training batches first")
    parser.add_argument("--eval-rounds", type=int, default=4, help="full evaluations per side")
    parser.add_argument("--single-calls", type=int, default=200, help="timed 1-user recommend() calls")
    parser.add_argument("--batch-calls", type=int, default=10, help="timed 256-user recommend() calls")
    parser.add_argument("--serve-items", type=int, default=1_000_000, help="synthetic catalog for serving")
    parser.add_argument("--no-peer", action="store_true", help="skip RecTools")
    parser.add_argument("--compile", action="store_true", help="also time a torch.compile'd model (training)")
    parser.add_argument("--peer-python", default=os.environ.get("RECTOOLS_PYTHON", DEFAULT_PEER_PYTHON))
    parser.add_argument("--large-items", type=int, default=1_000_000)
    parser.add_argument("--large-users", type=int, default=5_000)
    parser.add_argument("--large-min-len", type=int, default=2, help="shortest synthetic sequence")
    parser.add_argument("--large-max-len", type=int, default=4, help="longest synthetic sequence")
    parser.add_argument("--large-batch", type=int, default=256)
    parser.add_argument("--large-loss-chunk", type=int, default=256, help="positions per loss chunk")
    parser.add_argument("--large-precision", choices=("fp32", "bf16"), default="bf16")
    parser.add_argument("--peer-worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--large-train-worker", action="store_true", help=argparse.SUPPRESS)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.peer_worker:
        return peer_worker()
    sys.path.insert(0, str(REPO_ROOT))  # run from a checkout without `pip install -e .`
    import torch

    torch.set_num_threads(args.threads)
    if args.large_train_worker:
        return large_train_worker(args)

    from baselines import git_commit

    phases = set(args.only.split(","))
    started = time.perf_counter()
    report: dict = {
        "command": " ".join(["python benchmarks/speed.py", *(sys.argv[1:] if argv is None else argv)]),
        "git_commit": git_commit(),
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "environment": environment(),
        "settings": {k: v for k, v in vars(args).items() if k not in ("peer_worker", "large_train_worker")},
    }
    report["settings"]["data_dir"] = str(args.data_dir)
    report["settings"]["output_dir"] = str(args.output_dir)
    peer = None
    with tempfile.TemporaryDirectory(prefix="seqrec-speed-") as tmp_dir:
        tmp = Path(tmp_dir)
        if not args.no_peer and phases & {"train", "eval"}:
            if not Path(args.peer_python).exists():
                raise SystemExit(
                    f"RecTools' python {args.peer_python} not found: make a venv with `pip install rectools[torch]` "
                    "and pass --peer-python (or RECTOOLS_PYTHON), or run with --no-peer"
                )
            peer = Peer(args.peer_python, tmp / "peer.log")
            report["peer"] = f"RecTools {peer.info['rectools']} SASRec (torch {peer.info['torch']})"
        try:
            beauty_model = beauty_data = None
            if "train" in phases:
                report["training"] = []
                for name in args.datasets.split(","):
                    print(f"training throughput: {name}", flush=True)
                    data = load_data(args.data_dir, name)
                    block = bench_training(data, args, peer, tmp)
                    models = block.pop("_models")
                    report["training"].append(block)
                    if name == "beauty":
                        beauty_model, beauty_data = models["ours fp32"], data
                        if "eval" in phases:
                            print("evaluation: beauty", flush=True)
                            report["evaluation"] = bench_evaluation(data, beauty_model, args, peer, tmp)
        finally:
            if peer is not None:
                peer.close()
    if "serve" in phases:
        print("serving latency", flush=True)
        if beauty_model is None:
            beauty_data = load_data(args.data_dir, "beauty")
            beauty_model = build_model(beauty_data)
        histories = [row[-50:] for row in beauty_data["splits"]["test"]["item_ids"]]
        report["serving"] = {
            "Beauty": bench_recommend(beauty_model, beauty_data["tokenizer"], histories, args, "Beauty", True)
        }
        del beauty_model
        model, tokenizer = synthetic_catalog_model(args.serve_items, 50)
        histories = synthetic_histories(args.serve_items, 2000, 5, 50, seed=1)
        label = f"synthetic {args.serve_items:,}"
        report["serving"]["synthetic"] = bench_recommend(model, tokenizer, histories, args, label, False)
        del model
    if "large" in phases:
        print("1M-item training epoch", flush=True)
        report["large_training"] = bench_large_training(args)
    report["environment"]["load_average_end"] = round(os.getloadavg()[0], 2)
    report["wall_seconds"] = time.perf_counter() - started
    report["peak_rss_mb"] = peak_rss_mb()
    args.output_dir.mkdir(parents=True, exist_ok=True)
    (args.output_dir / "speed.json").write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    (args.output_dir / "speed.md").write_text(markdown(report), encoding="utf-8")
    print(f"wrote {args.output_dir / 'speed.md'} and speed.json ({report['wall_seconds'] / 60:.1f} min)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
