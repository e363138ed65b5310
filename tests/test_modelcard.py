"""Model cards: YAML metadata that parses back with `ModelCard.load`, the sections the issue asks for, snippets
that run, the training curve, and the cards kept in model_cards/."""

from __future__ import annotations

import contextlib
import io
import json
import runpy
from pathlib import Path

import pytest
from conftest import make_model
from huggingface_hub import ModelCard

from seqrec_hf import ItemTokenizer
from seqrec_hf.cli import main as cli
from seqrec_hf.hub import check_checkpoint_folder, files_to_push
from seqrec_hf.modelcard import (
    dataset_name,
    extract_python_snippets,
    ranking_metrics,
    render_model_card,
    write_model_card,
)
from seqrec_hf.plotting import plot_training_curve, read_training_log

REPO_ROOT = Path(__file__).resolve().parents[1]
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def fake_metrics(use_time_bias: bool = True, **extra) -> dict:
    def split(offset: float) -> dict:
        values = {f"HR@{k}": 0.1 + offset + k / 100 for k in (5, 10, 20)}
        values.update({f"NDCG@{k}": 0.05 + offset + k / 200 for k in (5, 10, 20)})
        values.update({"MRR": 0.04 + offset, "Coverage@10": 0.6, "num_users": 123, "num_unknown_targets": 0})
        return values

    metrics = {
        "validation": split(0.01),
        "test": split(0.0),
        "best_step": 40,
        "global_step": 60,
        "train_seconds": 12.5,
        "tokens_per_second": 1000.0,
        "num_parameters": 12345,
        "num_processes": 1,
        "mixed_precision": "no",
        "recipe": {
            "data_path": "synthetic",
            "split": "leave_one_out",
            "synthetic_num_users": 300,
            "synthetic_num_items": 200,
            "synthetic_seed": 0,
            "hidden_size": 32,
            "num_hidden_layers": 2,
            "learning_rate": 0.001,
            "use_time_bias": use_time_bias,
            "sliding_window_stride": None,
        },
    }
    metrics.update(extra)
    return metrics


@pytest.fixture
def checkpoint(tmp_path) -> Path:
    """A saved (untrained) model + tokenizer + metrics.json: everything a card is built from."""
    items = [f"B{i:04d}" for i in range(38)]
    tokenizer = ItemTokenizer.from_items(items)
    model = make_model(vocab_size=len(tokenizer), use_time_bias=True)
    model.save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    (tmp_path / "metrics.json").write_text(json.dumps(fake_metrics()))
    return tmp_path


def test_card_metadata_parses_back_with_every_metric(checkpoint):
    path = write_model_card(checkpoint, model_name="demo-model")
    card = ModelCard.load(path)
    data = card.data
    assert data.library_name == "seqrec-hf"
    assert {"recommendation", "sequential-recommendation", "time-aware", "synthetic-data"} <= set(data.tags)
    assert data.datasets == ["synthetic"]
    assert set(data.metrics) == {"HR", "NDCG", "MRR", "Coverage"}
    metrics = json.loads((checkpoint / "metrics.json").read_text())
    got = {(r.dataset_split, r.metric_type): r.metric_value for r in data.eval_results}
    want = {(s, n): v for s in ("test", "validation") for n, v in ranking_metrics(metrics[s]).items()}
    assert got == want and len(want) == 16  # every ranking metric, no counts (num_users) as "results"
    for result in data.eval_results:
        assert result.task_type == "next-item-recommendation"
        assert result.dataset_name == "synthetic" and result.dataset_config == "leave_one_out"
        assert result.dataset_args == {
            "ranking": "full",
            "history_excluded": True,
            "ties": "pessimistic",
            "num_users": 123,
        }
    assert data.model_name == "demo-model"


def test_card_sections_say_what_the_model_is_and_how_it_was_judged(checkpoint):
    text = write_model_card(checkpoint).read_text()
    for heading in (
        "## Model description",
        "## Intended use and limitations",
        "## Training data and evaluation protocol",
        "## Hyper-parameters",
        "## Evaluation results",
        "## How to use",
        "## Citation",
    ):
        assert heading in text
    assert "synthetic data" in text and "no real users" in text
    assert "Cold start" in text and "Popularity bias" in text and "60.0%" in text  # Coverage@10 of the test split
    assert "FULL ranking" in text and "history excluded" in text.replace("\n", " ").replace("  ", " ")
    assert "leave-one-out" in text
    assert "`learning_rate`: 0.001" in text and "sliding_window_stride" not in text  # None values left out
    assert "| this model, test | 0.1500 |" in text
    assert "No baseline results" in text


def test_card_shows_baselines_temporal_protocol_and_the_curve_when_present(checkpoint):
    metrics = fake_metrics(use_time_bias=False, baselines={"popularity": {"HR@10": 0.05, "NDCG@10": 0.02}})
    metrics["recipe"].update(data_path="/data/ml-1m/ratings.dat", split="temporal", temporal_cutoff="2003-01-01")
    text = render_model_card(metrics, model_name="m")
    assert "| baseline popularity, test | - | 0.0500 |" in text and "No baseline results" not in text
    assert "temporal split at `2003-01-01`" in text and "`/data/ml-1m/ratings.dat`" in text
    assert "ml-1m" in text and "training curve" not in text
    pipeline_snippet, remote_snippet = extract_python_snippets(text)
    assert "timestamps" not in pipeline_snippet  # a time-blind model takes item ids only
    assert 'model="path/to/checkpoint"' in pipeline_snippet  # no repo id: an obvious placeholder
    with_plot = render_model_card(metrics, model_name="m", plot="training_curve.png", repo_id="org/m", revision="v1")
    assert "![training curve](training_curve.png)" in with_plot
    assert 'model="org/m", revision="v1"' in with_plot


def test_dataset_names_from_data_paths():
    assert dataset_name({"data_path": "synthetic"}) == "synthetic"
    assert dataset_name({"data_path": "../shared/data/ml-100k/u.data"}) == "ml-100k"
    assert dataset_name({"data_path": "../shared/data/ml-1m"}) == "ml-1m"
    assert dataset_name({"data_path": "outputs/demo/data/interactions.csv"}) == "interactions"


def test_card_snippets_run_on_a_local_checkpoint(checkpoint):
    """Both snippets, with the folder as the model location (the Hub version is tested in test_hub.py)."""
    text = write_model_card(checkpoint, repo_id=str(checkpoint)).read_text()
    vocab = json.loads((checkpoint / "vocab.json").read_text())
    outputs = []
    for index, snippet in enumerate(extract_python_snippets(text)):
        assert '"B0000", "B0001", "B0002"' in snippet  # real item ids of this checkpoint
        script = checkpoint / f"snippet_{index}.py"
        script.write_text(snippet)
        printed = io.StringIO()
        with contextlib.redirect_stdout(printed):
            runpy.run_path(str(script), run_name="__main__")
        outputs.append(printed.getvalue().strip().splitlines())
    pipeline_lines, remote_lines = outputs
    assert len(pipeline_lines) == 10 and all(line.split()[0] in vocab for line in pipeline_lines)
    assert not {line.split()[0] for line in pipeline_lines} & {"B0000", "B0001", "B0002"}  # history excluded
    recommended = json.loads(remote_lines[-1].replace("'", '"'))
    assert recommended == [line.split()[0] for line in pipeline_lines]  # same model, same ranking


def test_card_command_rewrites_the_card(checkpoint, capsys):
    assert cli(["card", str(checkpoint), "--repo-id", "org/regenerated"]) == 0
    assert 'model="org/regenerated"' in (checkpoint / "README.md").read_text()
    (checkpoint / "metrics.json").unlink()
    assert cli(["card", str(checkpoint)]) == 2
    assert "no metrics.json" in capsys.readouterr().err


def test_training_curve_png(tmp_path):
    pytest.importorskip("matplotlib")
    log = tmp_path / "train_log.jsonl"
    lines = [{"step": s, "epoch": 0, "loss": 5.0 - s / 10, "lr": 1e-3, "tokens_per_second": 1.0} for s in (2, 4, 6)]
    lines += [{"step": s, "epoch": 0, "validation": {"NDCG@10": s / 100, "HR@10": s / 50}} for s in (3, 6)]
    lines.append({"step": 4, "epoch": 0, "loss": 4.2})  # a resumed run logs a step again: the last one wins
    log.write_text("\n".join(json.dumps(line) for line in lines) + "\n")
    losses, scores = read_training_log(log)
    assert losses == [(2, 4.8), (4, 4.2), (6, 4.4)] and scores == [(3, 0.03), (6, 0.06)]
    path = plot_training_curve(log)
    assert path == tmp_path / "training_curve.png" and path.read_bytes()[:8] == PNG_SIGNATURE
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    assert plot_training_curve(empty, tmp_path / "none.png") is None and not (tmp_path / "none.png").exists()
    (tmp_path / "bad.jsonl").write_text("{not json\n")
    with pytest.raises(ValueError, match="bad.jsonl:1"):
        read_training_log(tmp_path / "bad.jsonl")


def test_checkpoint_files_to_push_skip_training_leftovers(checkpoint):
    for leftover in ("checkpoints/step-10/model.safetensors", "best_model/model.safetensors", "model.tmpdir/x"):
        (checkpoint / leftover).parent.mkdir(parents=True, exist_ok=True)
        (checkpoint / leftover).write_text("x")
    (checkpoint / "README.md.tmp").write_text("x")
    (checkpoint / "__pycache__").mkdir()
    (checkpoint / "__pycache__" / "modeling_seqrec.cpython-311.pyc").write_text("x")
    pushed = files_to_push(checkpoint)
    assert {"model.safetensors", "config.json", "vocab.json", "tokenizer_config.json", "metrics.json"} <= set(pushed)
    assert {"modeling_seqrec.py", "configuration_seqrec.py", "tokenization_seqrec.py"} <= set(pushed)
    assert not [p for p in pushed if p.startswith(("checkpoints/", "best_model/", "model.tmpdir/", "__pycache__"))]
    assert "README.md.tmp" not in pushed
    (checkpoint / "vocab.json").unlink()
    with pytest.raises(FileNotFoundError, match="missing vocab.json"):
        check_checkpoint_folder(checkpoint)


def test_cards_kept_in_model_cards_parse():
    cards = sorted((REPO_ROOT / "model_cards").glob("*.md"))
    cards = [card for card in cards if card.name != "README.md"]
    assert cards, "model_cards/ should keep at least the demo's card"
    for path in cards:
        card = ModelCard.load(path)
        assert card.data.library_name == "seqrec-hf" and card.data.eval_results, path
        assert "## How to use" in card.text and "## Evaluation results" in card.text


def test_card_of_a_fine_tuned_checkpoint_keeps_only_ranking_results(checkpoint):
    """finetune.py writes fewer fields, and Trainer extras (eval_loss, runtime) that are not results."""
    metrics = {
        "validation": {"eval_loss": 3.2, "NDCG@10": 0.3, "HR@10": 0.5, "eval_runtime": 1.5, "epoch": 1.0},
        "test": {"NDCG@10": 0.28, "HR@10": 0.45, "num_users": 200},
        "base_model": "outputs/demo/time_aware",
        "new_items": 10,
        "recipe": {"data_path": "new.csv", "split": "leave_one_out", "learning_rate": 1e-4},
    }
    (checkpoint / "metrics.json").write_text(json.dumps(metrics))
    card = ModelCard.load(write_model_card(checkpoint))
    assert {(r.dataset_split, r.metric_type) for r in card.data.eval_results} == {
        ("test", "NDCG@10"),
        ("test", "HR@10"),
        ("validation", "NDCG@10"),
        ("validation", "HR@10"),
    }
    assert "Fine-tuned from `outputs/demo/time_aware` (10 new items" in card.text
    model = make_model(vocab_size=40, use_time_bias=True)
    assert f"{sum(p.numel() for p in model.parameters()):,} parameters" in card.text  # read from the weights
    assert "Training:" not in card.text  # not recorded: not invented


def test_card_architecture_line_follows_the_config():
    metrics = fake_metrics(use_time_bias=False)
    plain = render_model_card(metrics, model_name="m", config={"norm_style": "pre", "filter_mix": 0.0})
    assert "pre-norm blocks" in plain and "low-pass" not in plain
    config = {"norm_style": "post", "filter_mix": 0.7, "filter_window": 10}
    filtered = render_model_card(metrics, model_name="m", config=config)
    assert "post-norm blocks" in filtered
    assert "causal low-pass branch (weight 0.7, moving average over the last 10 events)" in filtered


def test_card_says_when_a_model_was_distilled():
    metrics = fake_metrics(use_time_bias=False)
    assert "distillation" not in render_model_card(metrics, model_name="m", config={})
    distill = dict(distill_from="runs/a, runs/b", distill_weight=0.5, distill_top_k=32, distill_temperature=1.0)
    metrics["recipe"].update(distill)
    card = render_model_card(metrics, model_name="m", config={})
    assert "trained by distillation from 2 finished run(s) (target mass 0.5 on their top 32 items" in card
    assert "- `distill_from`: runs/a, runs/b" in card
    assert "temperature 1.0, networks alone)" in card
    metrics["recipe"]["distill_prior"] = True
    card = render_model_card(metrics, model_name="m", config={})
    assert "temperature 1.0, networks with their stacked prior)" in card
