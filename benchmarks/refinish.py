"""Re-run the end of a finished training run with the current code: prior calibration on validation, the test,
metrics.json and the model card, from the run's own best model, log and last checkpoint's state.

For when the evaluation code changes after runs have finished (e.g. fp32 evaluation): the trained weights and
the epoch chosen on validation stay as they were; only what `seqrec_hf.train.finish` computes is redone.

    python benchmarks/refinish.py outputs/quality/beauty/default/seed42 [more run folders ...]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from accelerate import Accelerator
from accelerate.state import AcceleratorState

from seqrec_hf import ItemTokenizer
from seqrec_hf.train import STATE_FILE, TrainingRecipe, finish, latest_checkpoint, prepare_data


def refinish(run_dir: str | Path) -> dict:
    run_dir = Path(run_dir)
    metrics = json.loads((run_dir / "metrics.json").read_text())
    known = set(TrainingRecipe.__dataclass_fields__)
    recipe = TrainingRecipe(**{k: v for k, v in metrics["recipe"].items() if k in known})
    recipe.output_dir = str(run_dir)
    checkpoint = latest_checkpoint(run_dir)
    if checkpoint is None:
        raise FileNotFoundError(f"{run_dir}: no complete checkpoint to read the training state from")
    state = json.loads((checkpoint / STATE_FILE).read_text())
    tokenizer = ItemTokenizer.from_pretrained(run_dir / "best_model")  # the run's own vocabulary
    splits, tokenizer, _ = prepare_data(recipe, tokenizer)
    AcceleratorState._reset_state()  # one Accelerator per run, as train() does
    return finish(Accelerator(cpu=True), recipe, tokenizer, splits, state)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", nargs="+", help="finished training output folders")
    args = parser.parse_args(argv)
    for run in args.runs:
        result = refinish(run)
        print(f"{run}: test NDCG@10 {result['test']['NDCG@10']:.4f} HR@10 {result['test']['HR@10']:.4f}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
