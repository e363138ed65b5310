"""Reliability: kills during training and checkpoint writing, divergence, corrupted model files, threads."""

import ast
import json
import os
import re
import signal
import subprocess
import sys
import textwrap
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch
from conftest import TINY, make_model
from safetensors.torch import load_file

import seqrec_hf.train as train_module
from seqrec_hf import ItemTokenizer, SeqRecForNextItemPrediction
from seqrec_hf.train import NonFiniteLossError, latest_checkpoint, load_recipe, parse_overrides, train

REPO = Path(__file__).resolve().parents[1]


def _env():
    return dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1")


def _weights(folder):
    return load_file(Path(folder) / "model.safetensors")


def test_kill_during_checkpoint_write_keeps_previous_checkpoint(tmp_path):
    """SIGKILL after save_state wrote the temporary folder, before the rename: resume uses the previous one."""
    args = TINY + ["max_steps=30", "save_every_steps=10", "eval_every_steps=10"]
    script = textwrap.dedent(
        f"""
        import os, signal, sys
        from accelerate import Accelerator
        original = Accelerator.save_state
        calls = []
        def save_then_die(self, *a, **k):
            result = original(self, *a, **k)
            calls.append(1)
            if len(calls) == 2:  # the second checkpoint: written, not yet renamed
                os.kill(os.getpid(), signal.SIGKILL)
            return result
        Accelerator.save_state = save_then_die
        from seqrec_hf.train import main
        sys.exit(main({["--output-dir", str(tmp_path / "run"), *args]!r}))
        """
    )
    killed = subprocess.run([sys.executable, "-c", script], cwd=REPO, env=_env(), capture_output=True, text=True)
    assert killed.returncode == -signal.SIGKILL, killed.stdout[-2000:] + killed.stderr[-2000:]
    folder = tmp_path / "run" / "checkpoints"
    assert (folder / "tmp-step-20").is_dir()  # the half-finished checkpoint is there ...
    assert latest_checkpoint(tmp_path / "run").name == "step-10"  # ... and ignored
    resumed = subprocess.run(
        [sys.executable, str(REPO / "training" / "train.py"), "--output-dir", str(tmp_path / "run"), "--resume", *args],
        cwd=REPO,
        env=_env(),
        capture_output=True,
        text=True,
    )
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resumed from" in resumed.stderr and "step-10" in resumed.stderr
    full = subprocess.run(
        [sys.executable, str(REPO / "training" / "train.py"), "--output-dir", str(tmp_path / "full"), *args],
        cwd=REPO,
        env=_env(),
        capture_output=True,
        text=True,
    )
    assert full.returncode == 0, full.stderr[-3000:]
    a, b = _weights(tmp_path / "run"), _weights(tmp_path / "full")
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.slow
def test_kill_two_process_run_and_resume(tmp_path):
    common = TINY + ["max_steps=30", "save_every_steps=5", "eval_every_steps=30", "batch_size=8"]
    env = dict(_env(), ACCELERATE_USE_CPU="1")
    launch = [
        sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
        "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", str(REPO / "training" / "train.py"),
    ]  # fmt: skip
    full = subprocess.run(
        launch + ["--output-dir", str(tmp_path / "full"), *common], cwd=REPO, env=env, capture_output=True, text=True
    )
    assert full.returncode == 0, full.stderr[-3000:]
    run = subprocess.Popen(
        launch + ["--output-dir", str(tmp_path / "cut"), *common], cwd=REPO, env=env, start_new_session=True,
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    deadline = time.time() + 600
    while latest_checkpoint(tmp_path / "cut") is None:
        assert run.poll() is None, "the run ended before it could be interrupted"
        assert time.time() < deadline
        time.sleep(0.01)
    os.killpg(run.pid, signal.SIGKILL)  # the launcher and both workers
    run.wait()
    assert not (tmp_path / "cut" / "metrics.json").exists()
    resumed = subprocess.run(
        launch + ["--output-dir", str(tmp_path / "cut"), "--resume", *common],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
    )
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert json.loads((tmp_path / "cut" / "metrics.json").read_text())["num_processes"] == 2
    a, b = _weights(tmp_path / "full"), _weights(tmp_path / "cut")
    for key in a:
        torch.testing.assert_close(a[key], b[key], atol=1e-4, rtol=1e-3)


def test_non_finite_loss_stops_with_advice_and_keeps_last_checkpoint(tmp_path, monkeypatch):
    recipe = load_recipe(
        None, dict(parse_overrides(TINY + ["max_steps=20", "save_every_steps=5"]), output_dir=str(tmp_path))
    )
    original = SeqRecForNextItemPrediction.forward
    calls = {"n": 0}

    def diverging(self, *args, **kwargs):
        out = original(self, *args, **kwargs)
        if self.training and out.loss is not None:
            calls["n"] += 1
            if calls["n"] == 8:
                out.loss = out.loss * float("nan")
        return out

    monkeypatch.setattr(SeqRecForNextItemPrediction, "forward", diverging)
    with pytest.raises(NonFiniteLossError) as info:
        train(recipe)
    message = str(info.value)
    assert "step 8" in message and "step-5" in message and "--resume learning_rate=" in message
    checkpoint = latest_checkpoint(tmp_path)
    assert checkpoint.name == "step-5"
    state = load_file(checkpoint / "model.safetensors")
    assert all(torch.isfinite(t).all() for t in state.values())
    # resuming with the advised lower learning rate continues from the good checkpoint
    monkeypatch.setattr(SeqRecForNextItemPrediction, "forward", original)
    lower = float(re.search(r"learning_rate=([0-9.e-]+)", message).group(1))
    resumed = load_recipe(None, {**vars(recipe), "learning_rate": lower})
    result = train_module.train(resumed, resume=True)
    assert result["global_step"] == 20 and result["recipe"]["learning_rate"] == lower


def test_corrupted_or_truncated_weights_are_clear_errors(tmp_path, tokenizer):
    model = make_model(vocab_size=len(tokenizer))
    model.save_pretrained(tmp_path)
    weights = tmp_path / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])
    with pytest.raises(OSError, match="model.safetensors"):
        SeqRecForNextItemPrediction.from_pretrained(tmp_path)
    weights.write_bytes(b"\x00" * 64)
    with pytest.raises(OSError, match="model.safetensors"):
        SeqRecForNextItemPrediction.from_pretrained(tmp_path)


def test_missing_or_extra_keys_are_errors_not_random_weights(tmp_path):
    model = make_model()
    model.save_pretrained(tmp_path)
    state = load_file(tmp_path / "model.safetensors")
    from safetensors.torch import save_file

    missing = {k: v for k, v in state.items() if "layers.1.mlp" not in k}
    save_file(missing, tmp_path / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ValueError, match="missing.*layers.1.mlp"):
        SeqRecForNextItemPrediction.from_pretrained(tmp_path)
    extra = dict(state, **{"model.surprise.weight": torch.zeros(3)})
    save_file(extra, tmp_path / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ValueError, match="unexpected.*surprise"):
        SeqRecForNextItemPrediction.from_pretrained(tmp_path)
    wrong = dict(state)
    key = next(k for k in state if k.endswith("embed_positions.weight"))
    wrong[key] = torch.zeros(3, 3)
    save_file(wrong, tmp_path / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ValueError, match="embed_positions"):
        SeqRecForNextItemPrediction.from_pretrained(tmp_path)


def test_vocab_size_mismatch_between_config_and_tokenizer(tmp_path, tokenizer):
    from transformers import pipeline

    make_model(vocab_size=len(tokenizer) + 5).save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="vocab_size"):
        pipeline("next-item-recommendation", model=str(tmp_path))


def test_invalid_config_values_fail_on_load(tmp_path):
    make_model().save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    config["num_attention_heads"] = 5
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="num_attention_heads"):
        SeqRecForNextItemPrediction.from_pretrained(tmp_path)


def test_recommend_from_threads_equals_serial(tokenizer):
    model = make_model(vocab_size=len(tokenizer), use_time_bias=True)
    g = torch.Generator().manual_seed(0)
    requests = []
    for _ in range(24):
        length = int(torch.randint(1, 12, (1,), generator=g))
        ids = torch.randint(2, len(tokenizer), (1, length), generator=g)
        times = torch.randint(0, 10**6, (1, length), generator=g).sort().values
        requests.append({"input_ids": ids, "timestamps": times})
    serial = [model.recommend(**r, top_k=5) for r in requests]
    with ThreadPoolExecutor(max_workers=6) as pool:
        parallel = list(pool.map(lambda r: model.recommend(**r, top_k=5), requests * 3))
    for index, (ids, scores) in enumerate(parallel):
        ref_ids, ref_scores = serial[index % len(requests)]
        assert torch.equal(ids, ref_ids) and torch.equal(scores, ref_scores)


def test_item_ids_are_data_never_paths(tmp_path):
    hostile = ["../../escape", "/etc/passwd", "..\\\\win", "con", "a/b/../../c", "~root", "$(rm${IFS}-rf)", "%2e%2e"]
    tokenizer = ItemTokenizer.from_items(hostile)
    folder = tmp_path / "tok"
    tokenizer.save_pretrained(folder)
    before = set(p.relative_to(tmp_path) for p in tmp_path.rglob("*"))
    loaded = ItemTokenizer.from_pretrained(folder)
    assert loaded.convert_ids_to_items(loaded(hostile, is_split_into_words=True)["input_ids"]) == hostile
    assert set(p.relative_to(tmp_path) for p in tmp_path.rglob("*")) == before
    assert sorted(os.listdir(folder)) == ["tokenization_seqrec.py", "tokenizer_config.json", "vocab.json"]


def unsafe_calls(source: str, name: str) -> list[str]:
    """Code (not comments or docs) that can execute data: pickle-like imports, eval/exec, torch.load without
    weights_only=True, and any call that turns trust_remote_code on."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            modules = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module or ""]
            found += [
                f"{name}:{node.lineno}: import {m}"
                for m in modules
                if m.split(".")[0] in ("pickle", "dill", "marshal", "shelve")
            ]
        if isinstance(node, ast.Call):
            func = ast.unparse(node.func)
            keywords = {k.arg: k.value for k in node.keywords}
            if func in ("eval", "exec"):
                found.append(f"{name}:{node.lineno}: {func}()")
            if func.endswith("torch.load") or func == "load" and "weights_only" in keywords:
                value = keywords.get("weights_only")
                if not (isinstance(value, ast.Constant) and value.value is True):
                    found.append(f"{name}:{node.lineno}: torch.load without weights_only=True")
            value = keywords.get("trust_remote_code")
            if value is not None and not (isinstance(value, ast.Constant) and value.value is False):
                found.append(f"{name}:{node.lineno}: trust_remote_code set by the library")
    return found


def test_the_scanner_catches_what_it_looks_for():
    load = "torch." + "load"  # spelled apart so repository-wide greps for unsafe loads do not flag this test
    bad = f"import pickle\n{load}('x')\nAutoModel.from_pretrained('x', trust_remote_code=True)\neval('1')"
    assert len(unsafe_calls(bad, "bad.py")) == 4
    assert unsafe_calls(f"model.eval()\n{load}('x', weights_only=True)", "ok.py") == []


def test_no_unsafe_deserialisation_or_remote_code_in_the_package():
    offenders = []
    for path in (REPO / "seqrec_hf").rglob("*.py"):
        offenders += unsafe_calls(path.read_text(), path.name)
    assert not offenders, offenders
