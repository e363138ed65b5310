"""The training curve of a run: training loss and validation NDCG@10 over optimizer steps, as a PNG.

Reads the `train_log.jsonl` that training writes (lines `{"step", "loss", ...}` and
`{"step", "validation": {...}}`). matplotlib is an optional extra (`pip install "seqrec-hf[plot]"`): without
it `plot_training_curve` logs why and returns None, and the model card simply shows no curve.

    python -m seqrec_hf.plotting outputs/run      # (re)draw outputs/run/training_curve.png
"""

from __future__ import annotations

import json
import logging
import os
import sys
from pathlib import Path

logger = logging.getLogger(__name__)

PLOT_FILE = "training_curve.png"
VALIDATION_METRIC = "NDCG@10"


def read_training_log(log_path: str | os.PathLike) -> tuple[list[tuple[int, float]], list[tuple[int, float]]]:
    """(step, loss) and (step, validation NDCG@10) pairs of a train_log.jsonl, in step order.

    A resumed run may log a step twice: the last record of a step wins.
    """
    losses: dict[int, float] = {}
    scores: dict[int, float] = {}
    with open(log_path, encoding="utf-8") as log:
        for number, line in enumerate(log, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as err:
                raise ValueError(f"{log_path}:{number}: not a JSON line ({err})") from None
            step = record.get("step")
            if not isinstance(step, int):
                continue
            if isinstance(record.get("loss"), (int, float)):
                losses[step] = float(record["loss"])
            validation = record.get("validation")
            if isinstance(validation, dict) and isinstance(validation.get(VALIDATION_METRIC), (int, float)):
                scores[step] = float(validation[VALIDATION_METRIC])
    return sorted(losses.items()), sorted(scores.items())


def plot_training_curve(
    log_path: str | os.PathLike, output_path: str | os.PathLike | None = None, title: str | None = None
) -> Path | None:
    """Draw loss (left axis) and validation NDCG@10 (right axis) against steps into a PNG; returns its path.

    `output_path` defaults to `training_curve.png` beside the log. Returns None, writing nothing, when
    matplotlib is not installed or the log holds neither losses nor validation results.
    """
    log_path = Path(log_path)
    output_path = Path(output_path) if output_path is not None else log_path.with_name(PLOT_FILE)
    try:
        # The object-oriented API with an explicit Agg canvas: no pyplot global state, no display needed.
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        logger.info("matplotlib is not installed (pip install 'seqrec-hf[plot]'): no training curve drawn")
        return None
    losses, scores = read_training_log(log_path)
    if not losses and not scores:
        logger.info("%s holds no loss or validation record: no training curve drawn", log_path)
        return None

    figure = Figure(figsize=(7.0, 4.0), dpi=100)
    FigureCanvasAgg(figure)
    loss_axis = figure.add_subplot(1, 1, 1)
    loss_axis.set_xlabel("optimizer step")
    handles = []
    if losses:
        steps, values = zip(*losses)
        marker = "o" if len(steps) < 30 else None
        handles += loss_axis.plot(steps, values, color="tab:blue", marker=marker, markersize=3)
        handles[-1].set_label("training loss")
    loss_axis.set_ylabel("training loss", color="tab:blue")
    score_axis = loss_axis.twinx()
    if scores:
        steps, values = zip(*scores)
        handles += score_axis.plot(steps, values, color="tab:orange", marker="o")
        handles[-1].set_label(f"validation {VALIDATION_METRIC}")
    score_axis.set_ylabel(f"validation {VALIDATION_METRIC} (full ranking)", color="tab:orange")
    loss_axis.grid(alpha=0.3)
    loss_axis.legend(handles=handles, loc="center right")
    loss_axis.set_title(title or "Training curve")
    figure.tight_layout()
    output_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = output_path.with_name(output_path.name + ".tmp")
    figure.savefig(tmp, format="png")
    os.replace(tmp, output_path)
    return output_path


def main(argv: list[str] | None = None) -> int:
    """`python -m seqrec_hf.plotting RUN_DIR`: (re)draw RUN_DIR/training_curve.png from its train_log.jsonl."""
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1:
        print("usage: python -m seqrec_hf.plotting RUN_DIR", file=sys.stderr)
        return 2
    path = plot_training_curve(Path(argv[0]) / "train_log.jsonl")
    if path is None:
        print("no plot written: matplotlib missing or the log is empty", file=sys.stderr)
        return 1
    print(path)
    return 0


__all__ = ["PLOT_FILE", "plot_training_curve", "read_training_log"]


if __name__ == "__main__":
    sys.exit(main())
