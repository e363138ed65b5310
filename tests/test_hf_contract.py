"""The Hugging Face contract: safetensors round trips, Auto classes, remote code, the pipeline."""

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from conftest import make_model
from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, AutoTokenizer, pipeline

from seqrec_hf import (
    AutoModelForNextItemPrediction,
    ItemTokenizer,
    SeqRecConfig,
    SeqRecForNextItemPrediction,
    SeqRecModel,
)


@pytest.fixture
def checkpoint(tmp_path, tokenizer):
    model = make_model(vocab_size=len(tokenizer), use_time_bias=True)
    with torch.no_grad():  # non-zero time bias so a wrong load would show
        for layer in model.model.layers:
            layer.time_bias.weight.normal_()
    model.save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    return tmp_path, model


def encode(tokenizer):
    return tokenizer(["i1 i2 i3 i4", "i5 i6"], timestamps=[[10, 20, 4000, 5000], [1, 90000]], return_tensors="pt").data


def test_folder_holds_safetensors_code_and_auto_map(checkpoint):
    path, _ = checkpoint
    files = set(os.listdir(path))
    assert "model.safetensors" in files
    assert not {f for f in files if f.endswith((".bin", ".pt", ".pkl"))}
    assert {"modeling_seqrec.py", "configuration_seqrec.py", "tokenization_seqrec.py", "vocab.json"} <= files
    auto_map = json.loads((path / "config.json").read_text())["auto_map"]
    assert auto_map["AutoModel"] == "modeling_seqrec.SeqRecModel"
    assert auto_map["AutoModelForCausalLM"] == "modeling_seqrec.SeqRecForNextItemPrediction"
    tok_map = json.loads((path / "tokenizer_config.json").read_text())["auto_map"]
    assert tok_map["AutoTokenizer"][0] == "tokenization_seqrec.ItemTokenizer"


def test_round_trip_concrete_and_auto_classes(checkpoint, tokenizer):
    path, model = checkpoint
    inputs = encode(tokenizer)
    expected = model(**inputs).logits
    for cls in (SeqRecForNextItemPrediction, AutoModelForCausalLM, AutoModelForNextItemPrediction):
        loaded = cls.from_pretrained(path).eval()
        assert isinstance(loaded, SeqRecForNextItemPrediction)
        assert torch.equal(loaded(**inputs).logits, expected)
    bare = AutoModel.from_pretrained(path).eval()
    assert isinstance(bare, SeqRecModel)
    assert torch.equal(bare(**inputs).last_hidden_state, model(**inputs).last_hidden_state)
    assert isinstance(AutoConfig.from_pretrained(path), SeqRecConfig)
    assert isinstance(AutoTokenizer.from_pretrained(path), ItemTokenizer)


def test_trust_remote_code_without_the_package(checkpoint, tokenizer, tmp_path_factory):
    path, model = checkpoint
    inputs = encode(tokenizer)
    expected_ids, expected_scores = model.recommend(**inputs, top_k=5)
    script = textwrap.dedent(
        f"""
        import sys
        sys.modules["seqrec_hf"] = None  # the package cannot be imported in this process
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer
        try:
            import seqrec_hf  # noqa
            raise SystemExit("seqrec_hf unexpectedly importable")
        except ImportError:
            pass
        model = AutoModelForCausalLM.from_pretrained({str(path)!r}, trust_remote_code=True).eval()
        tok = AutoTokenizer.from_pretrained({str(path)!r}, trust_remote_code=True)
        assert type(model).__module__.startswith("transformers_modules"), type(model).__module__
        enc = tok(["i1 i2 i3 i4", "i5 i6"], timestamps=[[10, 20, 4000, 5000], [1, 90000]], return_tensors="pt")
        ids, scores = model.recommend(**enc.data, top_k=5)
        print(ids.tolist()); print(scores.tolist())
        """
    )
    env = dict(os.environ, HF_HOME=str(tmp_path_factory.mktemp("hf_home")), HF_HUB_OFFLINE="1")
    cwd = tmp_path_factory.mktemp("elsewhere")
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, cwd=cwd)
    assert result.returncode == 0, result.stderr[-3000:]
    ids_line, scores_line = result.stdout.strip().splitlines()[-2:]
    assert json.loads(ids_line) == expected_ids.tolist()
    assert torch.equal(torch.tensor(json.loads(scores_line)), expected_scores)


def test_remote_code_is_not_used_unless_asked(checkpoint, tmp_path_factory):
    path, _ = checkpoint
    script = textwrap.dedent(
        f"""
        import sys
        sys.modules["seqrec_hf"] = None
        from transformers import AutoModelForCausalLM
        try:
            AutoModelForCausalLM.from_pretrained({str(path)!r})
        except Exception as err:
            print("REFUSED", type(err).__name__)
        else:
            print("LOADED")
        """
    )
    env = dict(os.environ, HF_HOME=str(tmp_path_factory.mktemp("hf_home")), HF_HUB_OFFLINE="1")
    result = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, env=env, stdin=subprocess.DEVNULL
    )
    assert "REFUSED" in result.stdout, result.stdout + result.stderr[-2000:]


def test_pipeline_returns_raw_ids_without_history(checkpoint, tokenizer):
    path, model = checkpoint
    rec = pipeline("next-item-recommendation", model=str(path))
    histories = ["i1 i2 i3 i4", "i5 i6"]
    times = [[10, 20, 4000, 5000], [1, 90000]]
    out = rec([{"items": h, "timestamps": t} for h, t in zip(histories, times)], top_k=4)
    ids, scores = model.recommend(**encode(tokenizer), top_k=4)
    for row, result in enumerate(out):
        assert [r["item"] for r in result] == tokenizer.convert_ids_to_items(ids[row])
        assert [r["score"] for r in result] == pytest.approx(scores[row].tolist())
        assert not set(histories[row].split()) & {r["item"] for r in result}
    single = rec({"items": ["i1", "i2"], "timestamps": [5, 6]}, top_k=2, allowed_items=["i7", "i8", "i1"])
    assert {r["item"] for r in single} == {"i7", "i8"}


def test_pipeline_time_blind_model_string_input(tmp_path, tokenizer):
    model = make_model(vocab_size=len(tokenizer))
    model.save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    rec = pipeline("next-item-recommendation", model=str(tmp_path))
    out = rec(["i1 i2 i3"], top_k=10)
    assert len(out) == 1 and len(out[0]) == 10
    assert all(isinstance(r["item"], str) and isinstance(r["score"], float) for r in out[0])
    scores = [r["score"] for r in out[0]]
    assert scores == sorted(scores, reverse=True)


def test_untied_output_layer_trains_saves_and_loads_separately(tmp_path, tokenizer):
    """tie_word_embeddings=False gives a separate output layer: its own parameter, its own gradient, saved and
    loaded under its own name (a wrong tie on load would score with the input embeddings)."""
    model = make_model(vocab_size=len(tokenizer), tie_word_embeddings=False)
    head, embed = model.item_head.weight, model.model.embed_items.weight
    assert head.data_ptr() != embed.data_ptr()
    inputs = encode(tokenizer)
    labels = inputs["input_ids"].roll(-1, dims=1)
    model(**inputs, labels=labels).loss.backward()
    assert head.grad is not None and embed.grad is not None and not torch.equal(head.grad, embed.grad)
    with torch.no_grad():
        head.normal_()
    model.eval()
    expected = model(**inputs).logits
    model.save_pretrained(tmp_path)
    loaded = SeqRecForNextItemPrediction.from_pretrained(tmp_path).eval()
    assert loaded.config.tie_word_embeddings is False
    assert not torch.equal(loaded.item_head.weight, loaded.model.embed_items.weight)
    assert torch.equal(loaded(**inputs).logits, expected)
