"""`seqrec-hf` command line: one subcommand per task, all built on the library's own functions.

Adding a subcommand: write `add_<name>_parser(subparsers)` that creates the subparser, declares its
arguments and sets `func=<function taking the parsed args and returning an exit code>`, then append it to
`SUBCOMMANDS`. Commands import heavy modules inside their function so `seqrec-hf --help` stays fast.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from .data import FORMATS

if TYPE_CHECKING:
    import datasets

logger = logging.getLogger("seqrec_hf.cli")


def add_data_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of `seqrec_hf.data.load_sequences`, shared by every subcommand that reads interactions."""
    group = parser.add_argument_group("data")
    group.add_argument("--data", required=True, help="interaction file (optionally .gz) or MovieLens folder")
    group.add_argument("--format", default="auto", choices=FORMATS, help="input format (default: guess)")
    group.add_argument("--user-col", help="user id column (csv/tsv/parquet/jsonl)")
    group.add_argument("--item-col", help="item id column (csv/tsv/parquet/jsonl)")
    group.add_argument("--time-col", help="timestamp column (csv/tsv/parquet/jsonl)")
    group.add_argument("--rating-col", help="rating column (csv/tsv/parquet/jsonl)")
    group.add_argument("--min-rating", type=float, help="keep only events rated at least this")
    group.add_argument("--k-core", type=int, help="iteratively keep users and items with >= k events")
    group.add_argument(
        "--drop-consecutive-repeats", action="store_true", help="collapse runs of the same item in a history"
    )
    group.add_argument(
        "--drop-last-user",
        action="store_true",
        help="drop the user of the file's last line (files truncated mid-user, e.g. ml-1m-partial)",
    )
    group.add_argument("--max-users", type=int, help="keep only the first N users (quick runs)")


def load_data_from_args(args: argparse.Namespace) -> datasets.Dataset:
    """`load_sequences` called with the options declared by `add_data_arguments`."""
    from .data import load_sequences

    return load_sequences(
        args.data,
        format=args.format,
        user_col=args.user_col,
        item_col=args.item_col,
        time_col=args.time_col,
        rating_col=args.rating_col,
        min_rating=args.min_rating,
        k_core=args.k_core,
        drop_consecutive_repeats=args.drop_consecutive_repeats,
        drop_last_user=args.drop_last_user,
        max_users=args.max_users,
    )


# --------------------------------------------------------------------------------------------------------
# evaluate
# --------------------------------------------------------------------------------------------------------


def add_evaluate_parser(subparsers: argparse._SubParsersAction) -> None:
    """`seqrec-hf evaluate`: a model or a baseline on a leave-one-out split of a data file."""
    parser = subparsers.add_parser(
        "evaluate",
        help="full-ranking HR/NDCG/MRR of a model or a baseline on a leave-one-out split",
        description="Leave-one-out split, full ranking over the catalog, history excluded, pessimistic ties "
        "(docs/data_and_evaluation.md).",
    )
    scorer = parser.add_mutually_exclusive_group(required=True)
    scorer.add_argument("--model", help="folder of a saved SeqRec model and its tokenizer")
    scorer.add_argument("--baseline", choices=("popularity", "markov"), help="evaluate a baseline instead")
    add_data_arguments(parser)
    parser.add_argument("--split", default="test", choices=("test", "validation"))
    parser.add_argument("--max-length", type=int, help="history length read by the model (default: its max)")
    parser.add_argument("--batch-size", type=int, default=256, help="users scored at once")
    parser.add_argument("--device", help="torch device for --model (default: cuda if available, else cpu)")
    parser.add_argument("--json", dest="json_path", help="write the metrics to this JSON file")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.set_defaults(func=run_evaluate)


def _load_model(path: str, device: str | None):
    """Tokenizer and model saved by `save_pretrained` (imported lazily: heavy, and optional for baselines)."""
    import torch

    from .modeling_seqrec import SeqRecForNextItemPrediction
    from .tokenization_seqrec import ItemTokenizer

    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    tokenizer = ItemTokenizer.from_pretrained(path)
    model = SeqRecForNextItemPrediction.from_pretrained(path).to(device)
    return tokenizer, model


def run_evaluate(args: argparse.Namespace) -> int:
    """Load, split, score every user against the full catalog, print the table (and write JSON)."""
    from .data import build_item_vocab, leave_one_out_split
    from .evaluation import evaluate, format_metrics_table, model_score_fn

    sequences = load_data_from_args(args)
    examples = leave_one_out_split(sequences)[args.split]
    max_length = args.max_length
    if args.baseline:
        from .baselines import fit_baseline

        # The catalog is every item of the data set, targets included: baselines rank all of them.
        tokenizer = build_item_vocab(sequences["item_ids"])
        score_fn = fit_baseline(args.baseline, tokenizer, examples["item_ids"])
    else:
        tokenizer, model = _load_model(args.model, args.device)
        score_fn = model_score_fn(model)
        if max_length is None:
            max_length = model.config.max_position_embeddings
    metrics = evaluate(
        score_fn,
        examples,
        tokenizer,
        batch_size=args.batch_size,
        max_length=max_length,
        show_progress=not args.no_progress,
    )
    scorer = f"baseline {args.baseline}" if args.baseline else f"model {args.model}"
    print(format_metrics_table(metrics, title=f"{scorer} on {args.data} ({args.split} split)"))
    if args.json_path:
        record = dict(metrics)
        record.update(
            {
                "scorer": args.baseline or "model",
                "model": args.model,
                "data": str(args.data),
                "format": args.format,
                "split": args.split,
                "max_length": max_length,
            }
        )
        out = Path(args.json_path)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")
    return 0


# --------------------------------------------------------------------------------------------------------
# train / finetune: the argument parsers live with their implementations (one implementation each)
# --------------------------------------------------------------------------------------------------------


def _delegate(module: str, help_text: str, name: str):
    """A subcommand that hands its raw arguments to `seqrec_hf.<module>.main` (also run as a script)."""

    def add_parser(subparsers: argparse._SubParsersAction) -> None:
        parser = subparsers.add_parser(name, help=help_text, add_help=False, prefix_chars="\0")
        parser.add_argument("rest", nargs=argparse.REMAINDER)
        parser.set_defaults(func=lambda args: _run_module(module, args.rest))

    return add_parser


def _run_module(module: str, argv: list[str]) -> int:
    import importlib

    return importlib.import_module(f"seqrec_hf.{module}").main(argv)


# --------------------------------------------------------------------------------------------------------
# recommend
# --------------------------------------------------------------------------------------------------------


def add_recommend_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("recommend", help="top-k next items for one history, as raw item ids")
    parser.add_argument("--model", required=True, help="checkpoint folder or Hub repo id")
    parser.add_argument("--history", required=True, help="whitespace-separated raw item ids, oldest first")
    parser.add_argument("--timestamps", help="whitespace-separated unix seconds, one per history item")
    parser.add_argument("--query-timestamp", type=int, help="time of the request (default: the last event's)")
    parser.add_argument("--top-k", type=int, default=10)
    parser.add_argument("--include-history", action="store_true", help="allow items of the history")
    parser.add_argument("--json", dest="as_json", action="store_true", help="print JSON instead of a table")
    parser.set_defaults(func=run_recommend)


def run_recommend(args: argparse.Namespace) -> int:
    from transformers import pipeline

    from . import NextItemRecommendationPipeline  # noqa: F401  (registers the task)

    request: dict = {"items": args.history.split()}
    if args.timestamps:
        try:
            request["timestamps"] = [int(t) for t in args.timestamps.split()]
        except ValueError:
            raise ValueError(f"--timestamps must be integers (unix seconds), got {args.timestamps!r}") from None
    if args.query_timestamp is not None:
        request["query_timestamp"] = args.query_timestamp
    rec = pipeline("next-item-recommendation", model=args.model)
    results = rec(request, top_k=args.top_k, exclude_history=not args.include_history)
    if args.as_json:
        print(json.dumps(results))
    else:
        for rank, row in enumerate(results, 1):
            print(f"{rank:>3}  {row['item']}  {row['score']:.4f}")
    return 0


# --------------------------------------------------------------------------------------------------------
# demo and card
# --------------------------------------------------------------------------------------------------------


def add_demo_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("demo", help="train and compare models on built-in synthetic data")
    parser.add_argument("--output-dir", default="outputs/demo")
    parser.add_argument("--scale", type=float, default=1.0, help="shrink users, items and epochs (< 1: faster)")
    parser.set_defaults(func=run_demo)


def run_demo(args: argparse.Namespace) -> int:
    from .demo import run_demo as demo

    demo(args.output_dir, args.scale)
    return 0


def add_card_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("card", help="(re)write the model card README.md of a checkpoint folder")
    parser.add_argument("folder", help="checkpoint folder with metrics.json")
    parser.add_argument("--model-name", help="title of the card (default: the folder name)")
    parser.add_argument("--repo-id", help="Hub repo id used in the how-to-use snippet")
    parser.set_defaults(func=run_card)


def run_card(args: argparse.Namespace) -> int:
    from .modelcard import write_model_card

    kwargs = {k: v for k, v in (("model_name", args.model_name), ("repo_id", args.repo_id)) if v}
    print(write_model_card(args.folder, **kwargs))
    return 0


# --------------------------------------------------------------------------------------------------------
# push
# --------------------------------------------------------------------------------------------------------


def add_push_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "push",
        help="upload a checkpoint folder (weights, config, tokenizer, code, card, metrics) to the Hub",
        description="One commit with everything needed to load the model (also with trust_remote_code=True) "
        "and judge it; training leftovers (checkpoints/, best_model/) stay local. The token comes from HF_TOKEN "
        "or `hf auth login` (docs/hub.md).",
    )
    parser.add_argument("folder", help="checkpoint folder (a training output_dir, or save_pretrained output)")
    parser.add_argument("--repo-id", required=True, help="Hub repository, ORG/NAME (created if missing)")
    parser.add_argument("--private", action="store_true", help="create the repository as private")
    parser.add_argument("--revision", help="branch to push to (created from main if missing)")
    parser.add_argument("--commit-message", help="commit message (default: 'Upload <folder> with seqrec-hf')")
    parser.add_argument(
        "--keep-card", action="store_true", help="upload README.md as it is (default: re-render it for the repo)"
    )
    parser.set_defaults(func=run_push)


def run_push(args: argparse.Namespace) -> int:
    from .hub import HubPushError, push_checkpoint

    try:
        info = push_checkpoint(
            args.folder,
            args.repo_id,
            private=args.private,
            revision=args.revision,
            commit_message=args.commit_message,
            update_card=not args.keep_card,
        )
    except HubPushError as err:
        print(f"seqrec-hf push: error: {err}", file=sys.stderr)
        return 1
    print(f"pushed {args.folder} to {args.repo_id}" + (f"@{args.revision}" if args.revision else ""))
    print(f"commit {info.oid}: {info.commit_url}")
    return 0


# --------------------------------------------------------------------------------------------------------
# Entry point
# --------------------------------------------------------------------------------------------------------

SUBCOMMANDS: list[Callable[[argparse._SubParsersAction], None]] = [
    _delegate("train", "train from scratch with Accelerate (see training/configs)", "train"),
    _delegate("finetune", "fine-tune a checkpoint on new data with the HF Trainer", "finetune"),
    add_evaluate_parser,
    add_recommend_parser,
    add_demo_parser,
    add_card_parser,
    add_push_parser,
]


def build_parser() -> argparse.ArgumentParser:
    """The `seqrec-hf` parser with every registered subcommand."""
    parser = argparse.ArgumentParser(prog="seqrec-hf", description="Sequential recommendation, Hugging Face style.")
    parser.add_argument("-v", "--verbose", action="store_true", help="log progress details")
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for add_parser in SUBCOMMANDS:
        add_parser(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run `seqrec-hf`; returns the exit code.

    Bad input (`DataFormatError`, a missing file, an invalid option value) prints a one-line error and
    returns 2; `--verbose` shows the traceback instead.
    """
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(message)s")
    try:
        return args.func(args)
    except (ValueError, FileNotFoundError) as err:  # DataFormatError is a ValueError
        if args.verbose:
            raise
        print(f"seqrec-hf {args.command}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
