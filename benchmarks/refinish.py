"""Re-run the end of a finished training run with the current code: prior calibration on validation, the test,
metrics.json and the model card, from the run's own best model, log and last checkpoint's state.

For when the evaluation code changes after runs have finished (e.g. fp32 evaluation): the trained weights and
the epoch chosen on validation stay as they were; only what `seqrec_hf.train.finish` computes is redone.

`--set` changes settings of the stacked transition prior (e.g. `transition_prior_recent_window=3`), which never
reach the network's training (the stacked prior's weights are frozen; the new terms start at weight 0): the
prior is counted again on the train split, the run's network weights are kept, and the recipe recorded in
metrics.json is the changed one, as if the run had been trained with it. `transition_prior_counts=inputs`
changes only where `finish` counts the prior for scoring (the test inputs); the best model is left as it is.

    python benchmarks/refinish.py outputs/quality/beauty/default/seed42 [more run folders ...]
    python benchmarks/refinish.py outputs/quality/beauty/default/seed42 --set transition_prior_recent_window=3
    python benchmarks/refinish.py outputs/quality/sports/fp32-inputs/seed43 --set transition_prior_counts=inputs
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.state import AcceleratorState

from seqrec_hf import ItemTokenizer, SeqRecForNextItemPrediction
from seqrec_hf.train import (
    STATE_FILE,
    TrainingRecipe,
    build_model,
    finish,
    latest_checkpoint,
    load_recipe,
    parse_overrides,
    prepare_data,
    recipe_of_run,
    save_pretrained_atomic,
)

# Settings that change the stacked prior only: the network trained with them is the one trained without.
PRIOR_SETTINGS = frozenset(
    {
        "transition_prior_lags",
        "transition_prior_size",
        "transition_prior_reverse",
        "transition_prior_recent_window",
        "transition_prior_counts",
    }
)


def refinish(run_dir: str | Path, overrides: dict | None = None) -> dict:
    run_dir = Path(run_dir)
    recipe = recipe_of_run(run_dir)
    recipe.output_dir = str(run_dir)
    checkpoint = latest_checkpoint(run_dir)
    if checkpoint is None:
        raise FileNotFoundError(f"{run_dir}: no complete checkpoint to read the training state from")
    state = json.loads((checkpoint / STATE_FILE).read_text())
    tokenizer = ItemTokenizer.from_pretrained(run_dir / "best_model")  # the run's own vocabulary
    if overrides:
        other = sorted(set(overrides) - PRIOR_SETTINGS)
        if other:
            raise ValueError(f"--set changes only the stacked prior ({', '.join(sorted(PRIOR_SETTINGS))}), not {other}")
        if recipe.transition_prior_in_loss:
            raise ValueError(f"{run_dir}: its prior was trained in the loss; changing it changes the network")
        changed = dataclasses.asdict(recipe) | overrides
        recipe = load_recipe(None, changed)  # checked and typed as a recipe file would be
    splits, tokenizer, _ = prepare_data(recipe, tokenizer)
    if set(overrides or ()) - {"transition_prior_counts"}:  # the tables change; where they are counted is finish()'s
        swap_prior(run_dir / "best_model", recipe, tokenizer, splits["train"])
    AcceleratorState._reset_state()  # one Accelerator per run, as train() does
    return finish(Accelerator(cpu=True), recipe, tokenizer, splits, state)


def swap_prior(best_dir: Path, recipe: TrainingRecipe, tokenizer, train_split) -> None:
    """Rewrite the best model with the recipe's prior (counted on the train split, initial weights) around
    the same network weights."""
    trained = SeqRecForNextItemPrediction.from_pretrained(best_dir).eval()
    model = build_model(recipe, tokenizer, train_split).eval()
    network = {k: v for k, v in trained.state_dict().items() if not k.startswith("transition_prior.")}
    missing, unexpected = model.load_state_dict(network, strict=False)
    if unexpected or any(not k.startswith("transition_prior.") for k in missing):
        raise ValueError(f"{best_dir}: the network does not match the recipe ({missing=}, {unexpected=})")
    with torch.no_grad():  # the same network must score as before, prior aside
        probe = torch.arange(2, min(len(tokenizer), 12))[None]
        before = trained.model(probe).last_hidden_state
        if not torch.equal(before, model.model(probe).last_hidden_state):
            raise RuntimeError(f"{best_dir}: the network changed while swapping its prior")
    save_pretrained_atomic(model, tokenizer, best_dir)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", nargs="+", help="finished training output folders")
    parser.add_argument("--set", nargs="+", default=[], metavar="KEY=VALUE", help="prior settings to change")
    args = parser.parse_args(argv)
    overrides = parse_overrides(args.set)
    for run in args.runs:
        result = refinish(run, overrides)
        print(f"{run}: test NDCG@10 {result['test']['NDCG@10']:.4f} HR@10 {result['test']['HR@10']:.4f}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
