"""Shared fixtures: small tokenizers and models, and the location of the research datasets."""

from __future__ import annotations

import atexit
import os
import shutil
import tempfile
from pathlib import Path

import pytest
import torch

import seqrec_hf  # noqa: F401  (registers the Auto classes and the pipeline)
from seqrec_hf import ItemTokenizer, SeqRecConfig, SeqRecForNextItemPrediction

REPO_ROOT = Path(__file__).resolve().parents[1]

# Inductor's kernel cache defaults to a /tmp folder shared by every process of the user: a run killed while it
# wrote a kernel leaves a truncated .so there ("file too short") that fails later runs. Each session gets its own.
if "TORCHINDUCTOR_CACHE_DIR" not in os.environ:
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = tempfile.mkdtemp(prefix="seqrec-inductor-")
    atexit.register(shutil.rmtree, os.environ["TORCHINDUCTOR_CACHE_DIR"], ignore_errors=True)
DATA_DIR = Path(os.environ.get("SEQREC_DATA_DIR", REPO_ROOT.parent / "shared" / "data"))


# A recipe small enough for a training run of a few seconds (key=value overrides of TrainingRecipe).
TINY = [
    "data_path=synthetic",
    "synthetic_num_users=300",
    "synthetic_num_items=200",
    "batch_size=16",
    "hidden_size=32",
    "intermediate_size=64",
    "warmup_steps=5",
    "logging_steps=5",
]


def data_path(relative: str) -> Path:
    """Path of a research dataset under SEQREC_DATA_DIR; skips the test with the reason when it is absent."""
    path = DATA_DIR / relative
    if not path.exists():
        pytest.skip(f"dataset {relative} not found under SEQREC_DATA_DIR={DATA_DIR} (research data is not shipped)")
    return path


def make_model(vocab_size: int = 40, seed: int = 0, **overrides) -> SeqRecForNextItemPrediction:
    """A small deterministic model in eval mode (dropout off so outputs are comparable)."""
    torch.manual_seed(seed)
    kwargs = dict(
        vocab_size=vocab_size,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=16,
        hidden_dropout_prob=0.0,
        attention_dropout=0.0,
    )
    kwargs.update(overrides)
    return SeqRecForNextItemPrediction(SeqRecConfig(**kwargs)).eval()


@pytest.fixture
def tokenizer() -> ItemTokenizer:
    return ItemTokenizer.from_items([f"i{i}" for i in range(38)])  # 40 ids with [PAD] and [UNK]


@pytest.fixture
def model() -> SeqRecForNextItemPrediction:
    return make_model()
