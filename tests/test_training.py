"""Training with Accelerate: recipes, resume after a kill, bf16 on CPU, 2 processes; Trainer fine-tuning."""

import json
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import TINY
from safetensors.torch import load_file

from seqrec_hf.train import TrainingRecipe, cpu_has_native_bf16, latest_checkpoint, load_recipe, parse_overrides, train

REPO = Path(__file__).resolve().parents[1]


def run_train(args, **kwargs):
    env = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1")
    return subprocess.Popen(
        [sys.executable, str(REPO / "training" / "train.py"), *args],
        cwd=REPO,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        **kwargs,
    )


@pytest.mark.parametrize("recipe", sorted((REPO / "training" / "configs").glob("*.yaml")), ids=lambda p: p.name)
def test_recipes_load_and_validate(recipe):
    loaded = load_recipe(recipe)
    assert isinstance(loaded, TrainingRecipe)
    config = loaded.model_config(vocab_size=100)  # model hyper-parameters are valid together
    # every model setting of the recipe reaches the model config
    assert config.max_position_embeddings == loaded.max_length
    for name in ("hidden_size", "hidden_dropout_prob", "embedding_norm", "norm_style", "filter_mix", "loss_type"):
        assert getattr(config, name) == getattr(loaded, name), name


def test_recipe_errors_name_the_field(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("hidden_size: 64\nlearning_rte: 0.1\n")
    with pytest.raises(ValueError, match="learning_rte"):
        load_recipe(bad)
    with pytest.raises(ValueError, match="mixed_precision"):
        load_recipe(None, {"mixed_precision": "fp8"})
    # an unquoted `no` is YAML's false: it must still mean "no mixed precision", in a file and as key=value
    unquoted = tmp_path / "no.yaml"
    unquoted.write_text("mixed_precision: no\n")
    assert load_recipe(unquoted).mixed_precision == "no"
    assert load_recipe(None, parse_overrides(["mixed_precision=no"])).mixed_precision == "no"
    assert load_recipe(None, parse_overrides(["use_time_bias=off"])).use_time_bias is False
    with pytest.raises(ValueError, match="key=value"):
        parse_overrides(["oops"])
    recipe = load_recipe(None, parse_overrides(["learning_rate=3e-4", "use_time_bias=true", "batch_size=32"]))
    assert recipe.learning_rate == 3e-4 and recipe.use_time_bias is True and recipe.batch_size == 32
    with pytest.raises(ValueError, match="batch_size"):
        load_recipe(None, {"batch_size": "many"})


@pytest.mark.slow
def test_resume_after_kill_is_bit_identical(tmp_path):
    args = TINY + ["max_steps=40", "save_every_steps=5", "eval_every_steps=20", "use_time_bias=true", "ema_decay=0.9"]
    full = run_train(["--output-dir", str(tmp_path / "full"), *args])
    out, _ = full.communicate(timeout=600)
    assert full.returncode == 0, out[-3000:]

    interrupted = run_train(["--output-dir", str(tmp_path / "cut"), *args])
    deadline = time.time() + 300
    while latest_checkpoint(tmp_path / "cut") is None or latest_checkpoint(tmp_path / "cut").name != "step-10":
        assert interrupted.poll() is None, "the run ended before it could be interrupted"
        assert time.time() < deadline
        time.sleep(0.01)
    interrupted.send_signal(signal.SIGKILL)
    interrupted.communicate()
    assert not (tmp_path / "cut" / "metrics.json").exists()  # it really was cut short
    cut_at = int(latest_checkpoint(tmp_path / "cut").name[5:])
    assert cut_at < 40

    resumed = run_train(["--output-dir", str(tmp_path / "cut"), "--resume", *args])
    out, _ = resumed.communicate(timeout=600)
    assert resumed.returncode == 0, out[-3000:]
    assert "resumed from" in out
    a = load_file(tmp_path / "full" / "model.safetensors")
    b = load_file(tmp_path / "cut" / "model.safetensors")
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key
    metrics_a = json.loads((tmp_path / "full" / "metrics.json").read_text())
    metrics_b = json.loads((tmp_path / "cut" / "metrics.json").read_text())
    assert metrics_a["test"] == metrics_b["test"]


def test_cpu_bf16_detection():
    # torch's answer must agree with the CPU flags the kernel reports (Linux), whatever this machine has
    if not Path("/proc/cpuinfo").is_file():
        pytest.skip("no /proc/cpuinfo to compare with")
    flags = next(line.split(":", 1)[1].split() for line in open("/proc/cpuinfo") if line.startswith("flags"))
    assert cpu_has_native_bf16() is ("avx512_bf16" in flags or "amx_bf16" in flags)


def test_bf16_cpu_training_and_outputs(tmp_path, monkeypatch, caplog):
    # the warning for emulated bf16 must fire where the CPU lacks it (forced here, whatever this machine has)
    monkeypatch.setattr("seqrec_hf.train.cpu_has_native_bf16", lambda *a: False)
    overrides = parse_overrides(TINY + ["max_steps=12", "eval_every_steps=6", "mixed_precision=bf16"])
    recipe = load_recipe(None, dict(overrides, output_dir=str(tmp_path)))
    with caplog.at_level(logging.WARNING, logger="seqrec_hf.train"):
        result = train(recipe)
    assert any("bf16 is emulated" in r.getMessage() for r in caplog.records)
    assert result["mixed_precision"] == "bf16"
    assert result["global_step"] == 12
    for name in ("model.safetensors", "config.json", "vocab.json", "metrics.json", "README.md", "train_log.jsonl"):
        assert (tmp_path / name).is_file(), name
    log = [json.loads(line) for line in (tmp_path / "train_log.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in log if "loss" in r]
    assert all(torch.isfinite(torch.tensor(losses))) and losses[-1] < losses[0]
    assert any("validation" in r for r in log)
    assert 0.0 <= result["test"]["NDCG@10"] <= 1.0 and result["tokens_per_second"] > 0
    card = (tmp_path / "README.md").read_text()
    assert "NDCG@10" in card and "model-index" in card


def test_accelerate_launch_starts_two_gloo_processes_and_matches_one(tmp_path):
    common = TINY + ["max_steps=30", "eval_every_steps=30", "hidden_dropout_prob=0", "attention_dropout=0"]
    common += ["transition_prior_lags=1", "ema_decay=0.9"]  # a frozen (stacked) prior must not break DDP
    one = run_train(["--output-dir", str(tmp_path / "one"), *common, "batch_size=16"])
    out_one, _ = one.communicate(timeout=600)
    assert one.returncode == 0, out_one[-3000:]
    env = dict(os.environ, ACCELERATE_USE_CPU="1", OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    launch = [
        sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
        "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
        str(REPO / "training" / "train.py"), "--output-dir", str(tmp_path / "two"), *common, "batch_size=8",
    ]  # fmt: skip
    two = subprocess.run(launch, cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    assert two.returncode == 0, (two.stdout + two.stderr)[-3000:]
    metrics = json.loads((tmp_path / "two" / "metrics.json").read_text())
    assert metrics["num_processes"] == 2  # really two processes, not one
    curve = {}
    for name in ("one", "two"):
        log = [json.loads(line) for line in (tmp_path / name / "train_log.jsonl").read_text().splitlines()]
        curve[name] = [r["loss"] for r in log if "loss" in r]
    assert len(curve["one"]) == len(curve["two"]) >= 5
    for a, b in zip(curve["one"], curve["two"]):
        assert abs(a - b) / a < 0.03, (curve["one"], curve["two"])
    assert curve["two"][-1] < curve["two"][0]
