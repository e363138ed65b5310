"""End to end through the command line: a reduced `make demo`, recommend, evaluate, card, and a Trainer
fine-tune that grows the vocabulary."""

import json

import pytest
import torch
from transformers import pipeline

from seqrec_hf import ItemTokenizer, SeqRecForNextItemPrediction
from seqrec_hf.cli import main as cli
from seqrec_hf.finetune import finetune
from seqrec_hf.synthetic import write_synthetic_csv


@pytest.fixture(scope="module")
def demo_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo")
    assert cli(["demo", "--output-dir", str(out), "--scale", "0.2"]) == 0
    return out


def test_reduced_demo_compares_four_models_and_leaves_a_checkpoint(demo_dir):
    results = json.loads((demo_dir / "comparison.json").read_text())
    assert set(results) == {"popularity", "markov", "transformer (time-blind)", "transformer (time-aware)"}
    for metrics in results.values():
        assert 0.0 <= metrics["NDCG@10"] <= metrics["HR@10"] <= 1.0
    for model in ("transformer (time-blind)", "transformer (time-aware)"):
        assert results[model]["NDCG@10"] > results["popularity"]["NDCG@10"]
    checkpoint = demo_dir / "time_aware"
    assert (checkpoint / "model.safetensors").is_file() and (checkpoint / "README.md").is_file()
    model = SeqRecForNextItemPrediction.from_pretrained(checkpoint)
    assert model.config.use_time_bias


def test_recommend_cli_matches_pipeline(demo_dir, capsys):
    checkpoint = str(demo_dir / "time_aware")
    history, times = "i0001 i0002 i0003", "1700000000 1700000060 1700000120"
    assert (
        cli(["recommend", "--model", checkpoint, "--history", history, "--timestamps", times, "--top-k", "5", "--json"])
        == 0
    )
    printed = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    rec = pipeline("next-item-recommendation", model=checkpoint)
    expected = rec({"items": history.split(), "timestamps": [int(t) for t in times.split()]}, top_k=5)
    assert [r["item"] for r in printed] == [r["item"] for r in expected]
    assert not set(history.split()) & {r["item"] for r in printed}
    assert cli(["recommend", "--model", checkpoint, "--history", history, "--timestamps", "1 2"]) == 2


def test_evaluate_cli_reproduces_training_test_metrics(demo_dir, tmp_path):
    checkpoint = demo_dir / "time_aware"
    out = tmp_path / "eval.json"
    data = demo_dir / "data" / "interactions.csv"
    args = ["evaluate", "--model", str(checkpoint), "--data", str(data), "--format", "csv", "--json", str(out)]
    assert cli(args + ["--no-progress"]) == 0
    metrics = json.loads(out.read_text())
    trained = json.loads((checkpoint / "metrics.json").read_text())["test"]
    for name in ("HR@10", "NDCG@10", "MRR"):
        assert metrics[name] == pytest.approx(trained[name], abs=1e-6)


def test_card_cli_rewrites_the_card(demo_dir):
    checkpoint = demo_dir / "time_aware"
    (checkpoint / "README.md").unlink()
    assert cli(["card", str(checkpoint), "--repo-id", "org/demo"]) == 0
    text = (checkpoint / "README.md").read_text()
    assert "org/demo" in text and "NDCG@10" in text


def test_trainer_finetune_grows_the_vocabulary(demo_dir, tmp_path):
    checkpoint = demo_dir / "time_aware"
    base_tokenizer = ItemTokenizer.from_pretrained(checkpoint)
    new_data = write_synthetic_csv(tmp_path / "new.csv", num_users=200, num_items=400, seed=7)
    result = finetune(
        str(checkpoint), str(new_data), str(tmp_path / "ft"), data_format="csv", max_steps=6, batch_size=32
    )
    assert result["new_items"] > 0
    tuned_tokenizer = ItemTokenizer.from_pretrained(tmp_path / "ft")
    assert len(tuned_tokenizer) == len(base_tokenizer) + result["new_items"]
    tuned = SeqRecForNextItemPrediction.from_pretrained(tmp_path / "ft")
    assert tuned.config.vocab_size == len(tuned_tokenizer)
    assert tuned.item_head.weight.shape[0] == len(tuned_tokenizer)
    assert tuned.item_head.weight.data_ptr() == tuned.model.embed_items.weight.data_ptr()  # still tied
    for name in ("NDCG@10", "HR@10"):
        assert 0.0 <= result["validation"][name] <= 1.0 and 0.0 <= result["test"][name] <= 1.0
    # an item unseen by the base checkpoint is now a real id and can be recommended
    new_item = next(i for i in tuned_tokenizer.get_vocab() if i not in base_tokenizer.get_vocab())
    ids = tuned_tokenizer.convert_items_to_ids([new_item], strict=True)
    batch = tuned_tokenizer([[new_item]], timestamps=[[1_700_000_000]], return_tensors="pt")
    top, _ = tuned.recommend(**batch, top_k=3)
    assert ids[0] not in top[0].tolist() and torch.all(top >= 2)
