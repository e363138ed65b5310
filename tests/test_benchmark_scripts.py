"""benchmarks/quality.py and benchmarks/ablations.py end to end on a tiny synthetic recipe."""

from __future__ import annotations

import json
import math
import statistics
import sys

import pytest
import torch
from conftest import REPO_ROOT, TINY
from huggingface_hub import ModelCard

from seqrec_hf import SeqRecConfig

sys.path.insert(0, str(REPO_ROOT / "benchmarks"))
import ablations  # noqa: E402
import quality  # noqa: E402
import train_step  # noqa: E402


@pytest.fixture
def recipe(tmp_path):
    path = tmp_path / "tiny.yaml"
    path.write_text("\n".join(pair.replace("=", ": ", 1) for pair in TINY) + "\nnum_epochs: 2\n")
    return path


@pytest.fixture
def results_dir(tmp_path, monkeypatch):
    out = tmp_path / "results"
    monkeypatch.setattr(quality, "RESULTS", out)
    monkeypatch.setattr(ablations, "RESULTS", out)
    monkeypatch.setattr(quality, "CARDS", tmp_path / "cards")
    (tmp_path / "cards").mkdir()
    return out


def test_quality_runs_seeds_and_variants_and_summarises_them(recipe, results_dir, tmp_path):
    argv = ["--recipe", str(recipe), "--name", "tiny", "--seeds", "1", "2", "--output-root", str(tmp_path / "runs"),
            "--variant", "small", "--variant", "wider", "hidden_size=48", "--set", "num_epochs=1"]  # fmt: skip
    assert quality.main(argv) == 0
    results = json.loads((results_dir / "quality.json").read_text())
    assert set(results) == {"tiny/small", "tiny/wider"}
    for key, entry in results.items():
        runs = entry["runs"]
        assert len(runs) == 2 and entry["seeds"] == [1, 2]
        ndcg = [r["test"]["NDCG@10"] for r in runs]
        assert entry["summary"]["NDCG@10"]["mean"] == pytest.approx(statistics.fmean(ndcg))
        assert entry["summary"]["NDCG@10"]["std"] == pytest.approx(statistics.stdev(ndcg))
        # each run is its own training output, with its own seed and the variant's overrides
        variant = key.split("/")[1]
        for seed in (1, 2):
            metrics = json.loads((tmp_path / "runs" / "tiny" / variant / f"seed{seed}" / "metrics.json").read_text())
            assert metrics["recipe"]["seed"] == seed
            assert metrics["recipe"]["num_epochs"] == 1
            assert metrics["recipe"]["hidden_size"] == (48 if variant == "wider" else 32)
            assert metrics["test"]["NDCG@10"] in ndcg
    table = (results_dir / "quality.md").read_text()
    assert "| small | 2 |" in table and "| wider | 2 |" in table
    mean = results["tiny/small"]["summary"]["NDCG@10"]["mean"]
    assert f"{mean:.4f}" in table

    # the card of the best seed (on validation), with the spread over seeds
    assert quality.main(["--name", "tiny", "--cards-only"]) == 0
    runs = results["tiny/wider"]["runs"]
    best_seed = [1, 2][max(range(2), key=lambda i: runs[i]["validation"]["NDCG@10"])]
    card = ModelCard.load(tmp_path / "cards" / "tiny-wider.md")
    assert f"This checkpoint is seed {best_seed} of [1, 2]" in card.text
    assert f"{results['tiny/wider']['summary']['NDCG@10']['mean']:.4f}" in card.text
    assert card.data.to_dict()["model-index"]
    assert (tmp_path / "cards" / "tiny-small.png").is_file()


def test_quality_reports_the_prior_ablations_of_the_same_runs(recipe, results_dir, tmp_path):
    argv = ["--recipe", str(recipe), "--name", "tiny", "--seeds", "1", "--output-root", str(tmp_path / "runs"),
            "--variant", "inputs", "transition_prior_lags=1", "transition_prior_counts=inputs",
            "--set", "num_epochs=1"]  # fmt: skip
    assert quality.main(argv) == 0
    (run,) = json.loads((results_dir / "quality.json").read_text())["tiny/inputs"]["runs"]
    table = (results_dir / "quality.md").read_text()
    for key, label in (("test", "inputs"), ("test_prior_train_counts", "inputs: its prior counted on the train split"),
                       ("test_network_only", "inputs: its network alone (no prior)")):  # fmt: skip
        assert f"| {label} | 1 | {run[key]['HR@5']:.4f} ± 0.0000 |" in table, label


def test_ablations_train_variants_and_collect_existing_runs(recipe, results_dir, tmp_path):
    root = tmp_path / "abl"
    argv = ["--recipe", str(recipe), "--name", "tiny", "--epochs", "2", "--output-root", str(root),
            "--variant", "base", "--variant", "norm", "embedding_norm=true"]  # fmt: skip
    assert ablations.main(argv) == 0
    config = json.loads((root / "tiny" / "norm" / "config.json").read_text())
    assert config["embedding_norm"] is True
    curve = ablations.validation_curve(root / "tiny" / "norm")
    assert [row["epoch"] for row in curve] == [0, 1]

    assert ablations.main(["--name", "tiny", "--collect", f"again={root / 'tiny' / 'base'}", "made by hand"]) == 0
    results = json.loads((results_dir / "ablations.json").read_text())
    assert set(results) == {"tiny/base", "tiny/norm", "tiny/again"}
    assert results["tiny/again"]["curve"] == results["tiny/base"]["curve"]
    table = (results_dir / "ablations.md").read_text()
    best = max(row["NDCG@10"] for row in curve)
    assert "| norm | " in table and f"{best:.4f}" in table and "made by hand" in table

    with pytest.raises(FileNotFoundError, match="nowhere"):
        ablations.validation_curve(tmp_path / "nowhere")


def test_quality_reuse_collects_seeds_trained_separately(recipe, results_dir, tmp_path, monkeypatch):
    common = [
        "--recipe",
        str(recipe),
        "--name",
        "tiny",
        "--output-root",
        str(tmp_path / "runs"),
        "--set",
        "num_epochs=1",
    ]
    assert quality.main(common + ["--seeds", "1"]) == 0
    assert quality.main(common + ["--seeds", "2"]) == 0
    separate = [json.loads((tmp_path / "runs" / "tiny" / "default" / f"seed{s}" / "metrics.json").read_text())
                for s in (1, 2)]  # fmt: skip

    def no_training(recipe):
        raise AssertionError("--reuse must not train a seed that has finished")

    monkeypatch.setattr(quality, "train", no_training)
    assert quality.main(common + ["--seeds", "1", "2", "--reuse"]) == 0
    entry = json.loads((results_dir / "quality.json").read_text())["tiny/default"]
    assert entry["seeds"] == [1, 2]
    assert [r["test"] for r in entry["runs"]] == [m["test"] for m in separate]

    with pytest.raises(ValueError, match="hidden_size: 32 there, 48 here"):
        quality.main(common + ["--seeds", "1", "--reuse", "--set", "hidden_size=48"])

    # a run recorded before a recipe field existed counts as trained with that field's default
    path = tmp_path / "runs" / "tiny" / "default" / "seed1" / "metrics.json"
    older = json.loads(path.read_text())
    del older["recipe"]["label_smoothing"]
    path.write_text(json.dumps(older))
    assert quality.main(common + ["--seeds", "1", "--reuse"]) == 0
    with pytest.raises(ValueError, match="label_smoothing: None there, 0.1 here"):
        quality.main(common + ["--seeds", "1", "--reuse", "--set", "label_smoothing=0.1"])


def test_gpu_benchmark_runs_on_cpu_and_counts_flops(tmp_path):
    import gpu

    config = SeqRecConfig(vocab_size=102, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                          intermediate_size=64, max_position_embeddings=8)  # fmt: skip
    # 6 x block params (2 x (4*16*16 + 2*16*64) = 6144) + 12 x 2 x 16 x 8 (attention) + 6 x 16 x (10 + 1) (loss)
    assert gpu.model_flops_per_token(config, length=8, candidates=10) == 6 * 6144 + 3072 + 1056
    argv = ["--device", "cpu", "--hidden-size", "16", "--layers", "1", "--heads", "2", "--length", "8",
            "--items", "200", "--negatives", "16", "--batch", "4", "--steps", "2", "--matmul-size", "128",
            "--output", str(tmp_path)]  # fmt: skip
    assert gpu.main(argv) == 0
    result = json.loads((tmp_path / "gpu.json").read_text())
    assert result["tokens_per_second"] > 0 and result["mfu"] > 0
    assert all(math.isfinite(v) for v in result["loss_first_last"])
    assert result["config"]["items"] == 200 and "gpu.py --device cpu" in result["command"]
    assert "| tokens/s |" in (tmp_path / "gpu.md").read_text()


def test_shifted_script_tabulates_runs_and_stacks_a_prior(recipe, results_dir, tmp_path, monkeypatch):
    import shifted

    from seqrec_hf.train import load_recipe, parse_overrides, train

    monkeypatch.setattr(shifted, "RESULTS", results_dir)
    runs = {}
    for name, extra in (("a", []), ("b", ["seed=5", "transition_prior_lags=1"])):
        overrides = parse_overrides(TINY + ["max_steps=12", "eval_every_steps=4", "drop_last_events=1"] + extra)
        overrides.update(log_test_metrics=True, output_dir=str(tmp_path / name))
        train(load_recipe(None, overrides))
        runs[name] = str(tmp_path / name)
    argv = ["--collect", f"a={runs['a']}", "train a", "--posthoc-prior", f"a+prior={runs['a']}", "train a",
            "--lags", "1", "--ensemble", "ab", runs["a"], runs["b"],
            "--prior-scales", f"b={runs['b']}", "train b", "--scales", "0", "1"]  # fmt: skip
    assert shifted.main(argv) == 0
    results = json.loads((results_dir / "shifted.json").read_text())
    log = [json.loads(line) for line in (tmp_path / "a" / "train_log.jsonl").read_text().splitlines()]
    evals = [r for r in log if "validation" in r]
    best = max(evals, key=lambda r: r["validation"]["NDCG@10"])
    assert results["a"]["result"]["test"] == best["test"]["NDCG@10"]  # the test at the selected epoch
    assert results["a"]["result"]["epoch"] == best["epoch"] + 1
    stacked = results["a+prior"]["result"]
    assert stacked["validation"] >= results["a"]["result"]["validation"] - 1e-9  # weight 0 is on the grid
    assert len(stacked["weights"]) == 1
    assert 0 <= results["ab"]["result"]["test"] <= 1
    assert "| a+prior |" in (results_dir / "shifted.md").read_text()
    metrics_b = json.loads((tmp_path / "b" / "metrics.json").read_text())
    fitted = results["b x1.0"]["result"]  # the fitted weights as they are: the calibration's own validation
    assert fitted["validation"] == pytest.approx(metrics_b["transition_prior_calibration"]["metric"])
    assert fitted["weights"] == metrics_b["transition_prior_calibration"]["weights"]
    assert results["b x0.0"]["result"]["weights"] == [0.0]
    assert results["b x0.0"]["result"]["test"] == pytest.approx(metrics_b["test_network_only"]["NDCG@10"])
    real = tmp_path / "real"
    train(load_recipe(None, dict(parse_overrides(TINY + ["max_steps=4", "eval_every_steps=4"]), output_dir=str(real))))
    with pytest.raises(ValueError, match="test curve"):
        shifted.selected_epoch(real)


def test_refinish_redoes_the_end_of_a_finished_run(tmp_path):
    import refinish

    from seqrec_hf.train import load_recipe, parse_overrides, train

    overrides = parse_overrides(TINY + ["max_steps=8", "eval_every_steps=4", "transition_prior_lags=1"])
    result = train(load_recipe(None, dict(overrides, output_dir=str(tmp_path))))
    path = tmp_path / "metrics.json"
    stale = json.loads(path.read_text())
    stale["test"] = {"NDCG@10": -1.0}
    path.write_text(json.dumps(stale))
    assert refinish.main([str(tmp_path)]) == 0
    redone = json.loads(path.read_text())
    assert redone["test"] == result["test"]  # same weights, same code: the same numbers again
    assert redone["transition_prior_calibration"]["weights"] == result["transition_prior_calibration"]["weights"]
    assert redone["best_step"] == result["best_step"]
    assert refinish.refinish(tmp_path)["test"] == result["test"]  # the API's default: no overrides


def test_refinish_set_adds_recent_popularity_around_the_same_network(tmp_path):
    import refinish

    from seqrec_hf import SeqRecForNextItemPrediction
    from seqrec_hf.train import load_recipe, parse_overrides, train

    overrides = parse_overrides(TINY + ["max_steps=8", "eval_every_steps=4", "transition_prior_lags=1"])
    train(load_recipe(None, dict(overrides, output_dir=str(tmp_path))))
    before = SeqRecForNextItemPrediction.from_pretrained(tmp_path / "best_model").state_dict()
    assert refinish.main([str(tmp_path), "--set", "transition_prior_recent_window=2"]) == 0
    after = SeqRecForNextItemPrediction.from_pretrained(tmp_path).state_dict()
    for key, value in before.items():
        if not key.startswith("transition_prior."):
            assert torch.equal(after[key], value), key  # the network is the one trained
    assert after["transition_prior.recent"].sum() > 0
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert metrics["recipe"]["transition_prior_recent_window"] == 2
    assert len(metrics["transition_prior_calibration"]["weights"]) == 2
    assert "recent popularity" in (tmp_path / "README.md").read_text()
    with pytest.raises(ValueError, match="changes only the stacked prior"):
        refinish.refinish(tmp_path, {"hidden_size": 8})


def test_recent_popularity_leaves_training_unchanged(tmp_path):
    """The recent-popularity weight starts at 0: a run with it trains, validates and selects exactly as one
    without it, so adding it to finished runs with `refinish.py --set` is the same as training with it."""
    from seqrec_hf import SeqRecForNextItemPrediction
    from seqrec_hf.train import load_recipe, parse_overrides, train

    logs, models = [], []
    for window in (0, 2):
        out = tmp_path / f"w{window}"
        extra = ["max_steps=8", "eval_every_steps=4", "transition_prior_lags=1"]
        extra.append(f"transition_prior_recent_window={window}")
        train(load_recipe(None, dict(parse_overrides(TINY + extra), output_dir=str(out))))
        rows = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]
        logs.append([r["validation"] for r in rows if "validation" in r])
        models.append(SeqRecForNextItemPrediction.from_pretrained(out / "best_model").state_dict())
    assert logs[0] == logs[1] and len(logs[0]) == 2
    for key, value in models[0].items():
        if key != "transition_prior.weight":
            assert torch.equal(models[1][key], value), key


def test_train_step_benchmark_times_every_variant_and_restores_the_chunk_cap(recipe, tmp_path):
    from seqrec_hf import modeling_seqrec

    cap, threads = modeling_seqrec.CPU_CACHE_LOGITS_PER_CHUNK, torch.get_num_threads()
    out = tmp_path / "train_step"
    argv = ["--recipes", str(recipe), "--rounds", "2", "--steps", "2", "--warmup", "1", "--output", str(out),
            "--threads", str(threads + 1)]  # fmt: skip
    assert train_step.main(argv) == 0
    assert modeling_seqrec.CPU_CACHE_LOGITS_PER_CHUNK == cap
    assert torch.get_num_threads() == threads  # later tests compare scores bit-exactly across processes
    payload = json.loads(out.with_suffix(".json").read_text())
    (result,) = payload["results"]
    assert [row["variant"] for row in result["rows"]] == list(train_step.VARIANTS)
    for row in result["rows"]:
        assert len(row["seconds_per_step"]) == 2 and all(s > 0 for s in row["seconds_per_step"])
    assert result["rows"][0]["speedup_vs_before"] == [1.0, 1.0]
    assert 0 < result["real_events_per_batch"] <= result["padded_positions_per_batch"]
    assert result["training_rows"] > 0 and result["teacher_precompute_seconds"] > 0
    assert "both (current default)" in out.with_suffix(".md").read_text()


def test_ensemble_of_one_run_scores_as_the_run_and_averages_log_probabilities(tmp_path):
    import ensemble

    from seqrec_hf.train import load_recipe, parse_overrides, train

    runs = []
    for seed in (1, 2):
        overrides = parse_overrides(TINY + ["max_steps=8", "eval_every_steps=4", "transition_prior_lags=1"])
        overrides |= {"seed": seed, "transition_prior_counts": "inputs", "output_dir": str(tmp_path / f"seed{seed}")}
        runs.append((tmp_path / f"seed{seed}", train(load_recipe(None, overrides))))
    alone = ensemble.ensemble_metrics([runs[0][0]], ["validation", "test"])
    for split in ("validation", "test"):  # the served model, its prior counted where finish() counts it
        assert alone[split]["NDCG@10"] == pytest.approx(runs[0][1][split]["NDCG@10"], abs=1e-9)
        assert alone[split]["HR@10"] == pytest.approx(runs[0][1][split]["HR@10"], abs=1e-9)

    models = [ensemble.load_run(folder)[2] for folder, _ in runs]
    ids = torch.tensor([[0, 5, 7, 9], [3, 4, 5, 6]])
    batch = {"input_ids": ids, "attention_mask": torch.tensor([[0, 1, 1, 1]] * 2)}
    with torch.no_grad():
        each = [torch.log_softmax(m(**batch).logits[:, -1].float(), -1) for m in models]
    mean = ensemble.ensemble_score_fn(models)(batch)  # the function the script imports
    assert torch.allclose(mean, (each[0] + each[1]) / 2, atol=1e-6)
    assert not torch.allclose(each[0], each[1])  # two seeds: two different members

    assert ensemble.main([str(folder) for folder, _ in runs] + ["--json", str(tmp_path / "e.json")]) == 0
    written = json.loads((tmp_path / "e.json").read_text())
    assert set(written) >= {"validation", "test", "runs", "command", "commit"} and 0 <= written["test"]["NDCG@10"] <= 1
    assert written["command"].startswith("python benchmarks/ensemble.py ") and "--json" not in written["command"]
    with pytest.raises(FileNotFoundError, match="metrics.json"):
        ensemble.ensemble_metrics([tmp_path], ["test"])
