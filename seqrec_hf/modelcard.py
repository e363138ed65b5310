"""Model cards rendered from `metrics.json` through `huggingface_hub.ModelCard`.

The card is the honest summary of a checkpoint: what it is, what data and protocol produced its numbers,
how it compares with baselines, and snippets that run. Its YAML `model-index` holds every evaluation result
(dataset, split, protocol, metric, value) so the Hub can show them and `ModelCard.load` reads them back.

The markdown template is `seqrec_hf/model_card_template.md` (package data, so `pip install` users get it);
`model_cards/` keeps the rendered cards of released checkpoints. Regenerate a card with `seqrec-hf card DIR`.
"""

from __future__ import annotations

import json
import math
import os
import re
from pathlib import Path
from typing import Any

from huggingface_hub import EvalResult, ModelCard, ModelCardData

TEMPLATE_PATH = Path(__file__).with_name("model_card_template.md")
HEADLINE_METRICS = ("HR@5", "HR@10", "HR@20", "NDCG@5", "NDCG@10", "NDCG@20", "MRR", "Coverage@10")
# Ranking metrics that go into the model-index (counts such as num_users and Trainer extras such as eval_loss
# or runtime are not evaluation results).
RANKING_METRIC = re.compile(r"^(HR|NDCG|MRR|Recall|Precision|MAP|Coverage)(@\d+)?$")
PROTOCOL = {"ranking": "full", "history_excluded": True, "ties": "pessimistic"}
TASK_NAME = "Next-item recommendation (full ranking, history excluded)"
PLACEHOLDER_REPO = "path/to/checkpoint"
GENERIC_FOLDERS = {"", ".", "data", "raw", "processed", "datasets", "input", "inputs"}
EXAMPLE_TIMES = (1700000000, 1700003600, 1700007200)  # unix seconds, one hour apart


def dataset_name(recipe: dict[str, Any]) -> str:
    """A short name for the training data: 'synthetic', a MovieLens folder name, or the file's folder/stem."""
    path = str(recipe.get("data_path", "unknown"))
    if path == "synthetic":
        return "synthetic"
    data = Path(path)
    if data.suffix == "" and not data.name.endswith((".gz", ".bz2")):
        return data.name or path  # a folder (MovieLens) or a bare name
    parent = data.parent.name
    if parent.lower() not in GENERIC_FOLDERS:
        return parent
    stem = data.name.split(".")[0]
    return stem or path


def ranking_metrics(values: dict[str, Any] | None) -> dict[str, float]:
    """The ranking metrics of one split's results (HR@k, NDCG@k, MRR, Coverage@k), in their order."""
    return {
        name: float(value)
        for name, value in (values or {}).items()
        if RANKING_METRIC.match(name) and isinstance(value, (int, float)) and not isinstance(value, bool)
    }


def time_features(config: dict[str, Any]) -> list[str]:
    """What the model knows about time, one phrase per feature switched on in its config (or recipe)."""
    features = []
    if config.get("use_time_bias"):
        features.append("a learned attention bias per log-bucketed time gap between events (HSTU-style)")
    if config.get("use_time_gap_embedding"):
        features.append("an input embedding of the log-bucketed gap between each event and the request time")
    return features


def card_data(
    metrics: dict[str, Any], model_name: str, dataset: str | None = None, time_aware: bool | None = None
) -> ModelCardData:
    """YAML metadata: library, tags, dataset, metrics and a `model-index` entry per split and metric."""
    recipe = metrics.get("recipe") or {}
    dataset = dataset or dataset_name(recipe)
    split_protocol = recipe.get("split", "leave_one_out")
    results = []
    for split in ("test", "validation"):
        values = ranking_metrics(metrics.get(split))
        protocol = dict(PROTOCOL, num_users=int((metrics.get(split) or {}).get("num_users", 0)))
        for name, value in values.items():
            results.append(
                EvalResult(
                    task_type="next-item-recommendation",
                    task_name=TASK_NAME,
                    dataset_type=dataset,
                    dataset_name=dataset,
                    dataset_config=split_protocol,  # how targets were held out: leave_one_out or temporal
                    dataset_split=split,
                    dataset_args=protocol,
                    metric_type=name,
                    metric_name=name,
                    metric_value=value,
                )
            )
    tags = ["recommendation", "sequential-recommendation", "next-item-recommendation", "seqrec", "transformers"]
    if time_aware if time_aware is not None else bool(time_features(recipe)):
        tags.append("time-aware")
    if dataset == "synthetic":
        tags.append("synthetic-data")
    return ModelCardData(
        library_name="seqrec-hf",
        license="apache-2.0",
        tags=tags,
        datasets=[dataset],
        metrics=sorted({re.sub(r"@\d+$", "", r.metric_type) for r in results}) or None,
        model_name=model_name,
        eval_results=results or None,
    )


def _table(metrics: dict[str, Any]) -> str:
    rows = ["| model / split | " + " | ".join(HEADLINE_METRICS) + " |", "|---" * (len(HEADLINE_METRICS) + 1) + "|"]

    def cells(values: dict[str, Any]) -> str:
        return " | ".join(f"{values[m]:.4f}" if m in values else "-" for m in HEADLINE_METRICS)

    for split in ("validation", "test"):
        rows.append(f"| this model, {split} | {cells(metrics.get(split) or {})} |")
    for name, values in (metrics.get("baselines") or {}).items():
        rows.append(f"| baseline {name}, test | {cells(values)} |")
    return "\n".join(rows)


def _pipeline_snippet(repo_id: str, revision: str | None, items: list[str], timed: bool) -> str:
    revision_arg = f', revision="{revision}"' if revision else ""
    lines = [
        "from transformers import pipeline",
        "",
        "import seqrec_hf  # noqa: F401  (registers the model, the item tokenizer and the pipeline task)",
        "",
        f'rec = pipeline("next-item-recommendation", model="{repo_id}"{revision_arg})',
    ]
    if timed:
        lines += [
            "# a user's history, oldest first: raw item ids and when they happened (unix seconds)",
            "history = {",
            f'    "items": {json.dumps(items)},',
            f'    "timestamps": {json.dumps(list(EXAMPLE_TIMES[: len(items)]))},',
            f'    "query_timestamp": {EXAMPLE_TIMES[-1] + 3600},  # when the recommendation is asked for',
            "}",
        ]
    else:
        lines += ["history = " + json.dumps(" ".join(items)) + "  # raw item ids, oldest first"]
    lines += [
        "for row in rec(history, top_k=10):  # items of the history are excluded",
        '    print(row["item"], round(row["score"], 3))',
    ]
    return "\n".join(lines)


def _remote_code_snippet(repo_id: str, revision: str | None, items: list[str], timed: bool) -> str:
    load = f'"{repo_id}"' + (f', revision="{revision}"' if revision else "") + ", trust_remote_code=True"
    encode = f"tokenizer(\n    [{json.dumps(items)}],\n"
    if timed:
        times = list(EXAMPLE_TIMES[: len(items)])
        encode += f"    timestamps=[{times}],\n    query_timestamps=[{EXAMPLE_TIMES[-1] + 3600}],\n"
    return "\n".join(
        [
            "import torch",
            "from transformers import AutoModelForCausalLM, AutoTokenizer",
            "",
            f"tokenizer = AutoTokenizer.from_pretrained({load})",
            f"model = AutoModelForCausalLM.from_pretrained({load}).eval()",
            f'batch = {encode}    return_tensors="pt",\n)',
            "with torch.no_grad():",
            "    item_ids, scores = model.recommend(**batch, top_k=10)",
            "print(tokenizer.convert_ids_to_items(item_ids[0]))",
        ]
    )


def _data_description(recipe: dict[str, Any]) -> str:
    path = str(recipe.get("data_path", "unknown"))
    if path == "synthetic":
        keys = ("synthetic_num_users", "synthetic_num_items", "synthetic_seed")
        settings = ", ".join(f"{k.removeprefix('synthetic_')}={recipe[k]}" for k in keys if k in recipe)
        return f"`seqrec_hf.synthetic.generate_synthetic_interactions` ({settings})"
    filters = ", ".join(f"{k}={recipe[k]}" for k in ("min_rating", "k_core", "max_users") if recipe.get(k) is not None)
    return f"`{path}`" + (f" (filters: {filters})" if filters else "")


def _split_description(recipe: dict[str, Any]) -> str:
    if recipe.get("split") == "temporal":
        cutoff, validation = recipe.get("temporal_cutoff"), recipe.get("temporal_validation_cutoff")
        text = (
            f"global temporal split at `{cutoff}`: nothing at or after the cutoff is trained on; each test user's "
            "target is their first event at or after the cutoff, with their events before it as input"
        )
        if validation:
            text += f"; validation targets are first events in [`{validation}`, `{cutoff}`)"
        return text + ". Users without history before a cutoff (cold start) are not evaluated."
    return (
        "leave-one-out: each user's last item is the test target and the second-to-last the validation target; "
        "training sees every event before them. Users with fewer than 3 events are left out."
    )


def _loss_description(settings: dict[str, Any]) -> str:
    loss, negatives = settings.get("loss_type", "full_ce"), settings.get("num_negatives", "?")
    if loss == "sampled_softmax":
        return f"a sampled softmax over {negatives} negatives per position (logQ-corrected)"
    if loss == "gbce":
        return f"generalised binary cross-entropy (gBCE, gSASRec) with {negatives} negatives per position"
    return "full cross-entropy over the catalog (no sampled negatives)"


def render_model_card(
    metrics: dict[str, Any],
    model_name: str = "seqrec model",
    repo_id: str | None = None,
    revision: str | None = None,
    example_items: list[str] | None = None,
    config: dict[str, Any] | None = None,
    plot: str | None = None,
    dataset: str | None = None,
    num_parameters: int | None = None,
) -> str:
    """The card text (YAML header + markdown) of a checkpoint described by its metrics.json content.

    `example_items`: raw item ids of the checkpoint's vocabulary for the snippets; `config`: its config.json
    (architecture); `plot`: file name of the training curve in the checkpoint folder, shown if given;
    `dataset`: a name for the training data (default: derived from the recipe's data_path);
    `num_parameters`: when metrics.json does not record it.
    """
    recipe = metrics.get("recipe") or {}
    config = config or {}
    dataset = dataset or dataset_name(recipe)
    features = time_features({**recipe, **config})
    timed = bool(features)
    data = card_data(metrics, model_name, dataset, time_aware=timed)
    items = [str(item) for item in (example_items or ["<item id>", "<item id>", "<item id>"])][:3]
    repo = repo_id or PLACEHOLDER_REPO

    def setting(name: str, config_name: str | None = None) -> Any:
        return config.get(config_name or name, recipe.get(name, "?"))

    architecture = (
        f"{'post' if setting('norm_style') == 'post' else 'pre'}-norm blocks, "
        f"{setting('num_hidden_layers')} layers, hidden size {setting('hidden_size')}, "
        f"{setting('num_attention_heads')} attention heads, feed-forward size {setting('intermediate_size')}"
    )
    mix = setting("filter_mix")
    if isinstance(mix, (int, float)) and mix > 0:
        window = setting("filter_window")
        span = f"last {window} events" if window else "whole history"
        architecture += f", causal low-pass branch (weight {mix}, moving average over the {span})"
    if setting("position_embedding_type") == "none":
        architecture += ", no position embeddings"
    elif setting("position_embedding_type") == "from_end":
        architecture += ", positions counted back from the latest event"
    hops = setting("item_graph_layers")
    if isinstance(hops, int) and hops > 0:
        architecture += f", item vectors smoothed over the training transition graph ({hops} hop(s))"
    lags = setting("transition_prior_lags")
    if isinstance(lags, int) and lags > 0:
        calibration = metrics.get("transition_prior_calibration") or {}
        fitted = calibration.get("weights")
        how = f"weights {fitted} fitted on validation" if fitted else "learned weights"
        reverse = " and the current event's predecessors" if setting("transition_prior_reverse") else ""
        window = setting("transition_prior_recent_window")
        recent = (
            f" and recent popularity (each counted history's last {window} events)"
            if isinstance(window, int) and window > 0
            else ""
        )
        counted = (
            "counted on the input histories of the split scored: at test, the training split plus every user's"
            " validation item, and so in this checkpoint, which therefore must not be scored on the validation"
            " split again (`best_model/` keeps the training-split counts)"
            if setting("transition_prior_counts") == "inputs"
            else "counted on the training split"
        )
        architecture += (
            f", plus a count-based transition prior over the last {lags} events{reverse}{recent} ({how}; {counted})"
        )
    if recipe.get("ema_decay"):
        architecture += f"; the weights are an exponential moving average (decay {recipe['ema_decay']})"
    if recipe.get("distill_from"):
        teachers = len(str(recipe["distill_from"]).split(","))  # canonical "a,b,c" (TrainingRecipe)
        architecture += (
            f"; trained by distillation from {teachers} finished run(s) (target mass {recipe.get('distill_weight')}"
            f" on their top {recipe.get('distill_top_k')} items, temperature {recipe.get('distill_temperature')}"
            + (", networks with their stacked prior" if recipe.get("distill_prior") else ", networks alone")
            + ")"
        )
    hyper_names = (
        "max_length",
        "hidden_size",
        "num_hidden_layers",
        "num_attention_heads",
        "intermediate_size",
        "hidden_act",
        "hidden_dropout_prob",
        "attention_dropout",
        "embedding_norm",
        "position_embedding_type",
        "use_position_bias",
        "norm_style",
        "filter_mix",
        "filter_window",
        "item_dropout",
        "item_graph_layers",
        "transition_prior_lags",
        "transition_prior_size",
        "transition_prior_reverse",
        "transition_prior_recent_window",
        "transition_prior_counts",
        "score_norm",
        "tie_word_embeddings",
        "use_time_bias",
        "use_time_gap_embedding",
        "time_num_buckets",
        "loss_type",
        "loss_exclude_history",
        "num_negatives",
        "batch_size",
        "gradient_accumulation_steps",
        "learning_rate",
        "weight_decay",
        "adam_beta2",
        "warmup_steps",
        "lr_scheduler",
        "max_grad_norm",
        "ema_decay",
        "train_rows",
        "num_epochs",
        "max_steps",
        "early_stopping_patience",
        "sliding_window_stride",
        "distill_from",
        "seed",
    )
    hyper = "\n".join(f"- `{k}`: {recipe[k]}" for k in hyper_names if recipe.get(k) is not None)
    hyper = hyper or "- (not recorded)"
    test = metrics.get("test") or {}
    vocab_size = config.get("vocab_size")
    num_special = config.get("num_special_tokens", 2)
    seconds = metrics.get("train_seconds")
    num_parameters = metrics.get("num_parameters", num_parameters)
    card = ModelCard.from_template(
        data,
        template_str=TEMPLATE_PATH.read_text(encoding="utf-8"),
        model_name=model_name,
        dataset=dataset,
        synthetic=dataset == "synthetic",
        data_path=_data_description(recipe),
        architecture=architecture,
        num_parameters=f"{num_parameters:,}" if isinstance(num_parameters, int) else "an unrecorded number of",
        loss=_loss_description({**recipe, **config}),
        base_model=metrics.get("base_model"),
        new_items=metrics.get("new_items"),
        time_aware=("yes: " + "; ".join(features)) if timed else "no (item order only)",
        use_time=timed,
        max_length=setting("max_length", "max_position_embeddings"),
        num_items=vocab_size - num_special if isinstance(vocab_size, int) else "all",
        num_users=test.get("num_users", "?"),
        coverage=f"{test['Coverage@10']:.1%}" if "Coverage@10" in test else "an unrecorded share",
        best_step=metrics.get("best_step"),
        global_step=metrics.get("global_step", "?"),
        split_description=_split_description(recipe),
        hyperparameters=hyper,
        train_seconds=f"{seconds:.0f}" if isinstance(seconds, (int, float)) else None,
        num_processes=metrics.get("num_processes", 1),
        mixed_precision=metrics.get("mixed_precision", recipe.get("mixed_precision", "no")),
        tokens_per_second=f"{metrics.get('tokens_per_second') or 0.0:.0f}",
        results_table=_table(metrics),
        has_baselines=bool(metrics.get("baselines")),
        has_plot=plot is not None,
        plot=plot or "",
        pipeline_snippet=_pipeline_snippet(repo, revision, items, timed),
        remote_code_snippet=_remote_code_snippet(repo, revision, items, timed),
    )
    return str(card)


def example_items_from_vocab(folder: str | os.PathLike, count: int = 3) -> list[str] | None:
    """The first `count` item ids of a checkpoint's vocab.json (special tokens skipped), or None."""
    path = Path(folder) / "vocab.json"
    if not path.is_file():
        return None
    vocab = json.loads(path.read_text(encoding="utf-8"))
    items = [item for item, index in sorted(vocab.items(), key=lambda kv: kv[1]) if not item.startswith("[")]
    return items[:count] or None


def count_parameters(folder: str | os.PathLike) -> int | None:
    """Parameters stored in the folder's model.safetensors (read from its header: no tensor is loaded)."""
    path = Path(folder) / "model.safetensors"
    if not path.is_file():
        return None
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as weights:
        return sum(math.prod(weights.get_slice(name).get_shape()) for name in weights.keys())


def render_model_card_for_folder(
    folder: str | os.PathLike,
    metrics: dict[str, Any] | None = None,
    baselines: dict[str, dict[str, float]] | None = None,
    **kwargs: Any,
) -> str:
    """`render_model_card` with what the folder holds: metrics.json, config.json, vocab.json, the curve.

    `baselines` ({name: test metrics}, e.g. the demo's comparison.json rows) are added to the results table.
    """
    from .plotting import PLOT_FILE

    folder = Path(folder)
    if metrics is None:
        metrics_path = folder / "metrics.json"
        if not metrics_path.is_file():
            raise FileNotFoundError(f"{metrics_path}: no metrics.json to build the card from (train first)")
        metrics = json.loads(metrics_path.read_text(encoding="utf-8"))
    if baselines:
        metrics = dict(metrics, baselines={**(metrics.get("baselines") or {}), **baselines})
    config_path = folder / "config.json"
    if "config" not in kwargs and config_path.is_file():
        kwargs["config"] = json.loads(config_path.read_text(encoding="utf-8"))
    if "example_items" not in kwargs:
        kwargs["example_items"] = example_items_from_vocab(folder)
    if "num_parameters" not in metrics and "num_parameters" not in kwargs:
        kwargs["num_parameters"] = count_parameters(folder)
    if "plot" not in kwargs:
        plot = metrics.get("plot") or PLOT_FILE
        kwargs["plot"] = plot if (folder / plot).is_file() else None
    kwargs.setdefault("model_name", folder.resolve().name)
    return render_model_card(metrics, **kwargs)


def write_model_card(folder: str | os.PathLike, metrics: dict[str, Any] | None = None, **kwargs: Any) -> Path:
    """Write README.md (the card) into a checkpoint folder, from its metrics.json unless metrics are given.

    Keyword arguments go to `render_model_card_for_folder` / `render_model_card` (`model_name`, `repo_id`,
    `revision`, `dataset`, `baselines`, ...).
    """
    folder = Path(folder)
    text = render_model_card_for_folder(folder, metrics, **kwargs)
    path = folder / "README.md"
    tmp = folder / "README.md.tmp"
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)
    return path


def extract_python_snippets(card_text: str) -> list[str]:
    """The ```python code blocks of a card, in order (what the tests run)."""
    return [block.strip("\n") for block in re.findall(r"```python\n(.*?)```", card_text, flags=re.DOTALL)]


__all__ = [
    "card_data",
    "dataset_name",
    "extract_python_snippets",
    "render_model_card",
    "render_model_card_for_folder",
    "write_model_card",
]
