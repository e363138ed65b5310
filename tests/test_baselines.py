"""Popularity and Markov baselines, the `seqrec-hf evaluate` command, and the committed baseline numbers."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from conftest import REPO_ROOT, data_path

from seqrec_hf.baselines import MarkovBaseline, PopularityBaseline, fit_baseline
from seqrec_hf.cli import build_parser, main
from seqrec_hf.data import build_item_vocab, leave_one_out_split, load_sequences
from seqrec_hf.evaluation import evaluate

SEQUENCES = "u1 a b c x\nu2 b c a y\nu3 a b z\n"


@pytest.fixture
def splits(tmp_path):
    path = tmp_path / "seq.txt"
    path.write_text(SEQUENCES)
    ds = load_sequences(path, format="sequences")
    return ds, leave_one_out_split(ds)


def counts_by_item(baseline, vocab):
    return {item: baseline.counts[index].item() for item, index in vocab.items()}


def test_popularity_counts_only_the_inputs_of_the_split(splits):
    ds, split = splits
    vocab = build_item_vocab(ds["item_ids"])
    test = PopularityBaseline(vocab).fit(split["test"]["item_ids"])
    # test inputs: a b c | b c a | a b -> targets x, y, z are never counted
    assert counts_by_item(test, vocab) == {"a": 3, "b": 3, "c": 2, "x": 0, "y": 0, "z": 0}
    validation = PopularityBaseline(vocab).fit(split["validation"]["item_ids"])
    # validation inputs: a b | b c | a
    assert counts_by_item(validation, vocab) == {"a": 2, "b": 2, "c": 1, "x": 0, "y": 0, "z": 0}


def test_popularity_ranks_by_hand(splits):
    ds, split = splits
    vocab = build_item_vocab(ds["item_ids"])
    scorer = fit_baseline("popularity", vocab, split["test"]["item_ids"])
    metrics = evaluate(scorer, split["test"], vocab, show_progress=False)
    # u1: a b c excluded, x ties with y and z at 0 -> rank 3 (pessimistic); u2 likewise: 3;
    # u3: a b excluded, c (2) above, x and y tie with z -> rank 4.
    assert metrics["MRR"] == pytest.approx((1 / 3 + 1 / 3 + 1 / 4) / 3)
    assert metrics["NDCG@5"] == pytest.approx((2 / math.log2(4) + 1 / math.log2(5)) / 3)
    assert metrics["HR@5"] == 1.0 and metrics["num_users"] == 3


def test_markov_transitions_with_popularity_fallback():
    vocab = {"a": 2, "b": 3, "c": 4, "d": 5, "e": 6}
    markov = MarkovBaseline(vocab).fit([["a", "b", "c"], ["a", "c"], ["a", "b"], ["d", "d", "d"]])
    # popularity: a3 b2 c2 d3 e0; transitions a->b 2, a->c 1, b->c 1, d->d 2
    batch = {"input_ids": torch.tensor([[0, 2], [3, 4], [0, 6], [5, 1]])}  # last items a, c, e, [UNK]
    scores = markov(batch)
    assert scores.shape == (4, 7) and scores.dtype == torch.float64
    order = [sorted(vocab, key=lambda item, r=row: -scores[r, vocab[item]].item()) for row in range(4)]
    assert order[0][:2] == ["b", "c"]  # transitions first: a->b (2) before a->c (1)
    assert order[0][2:4] in (["a", "d"], ["d", "a"]) and order[0][4] == "e"  # then popularity
    assert scores[1].tolist() == scores[2].tolist() == scores[3].tolist()  # no successors: popularity only
    assert scores[1, 2:].tolist() == [3, 2, 2, 3, 0]
    assert (scores[:, :2] == 0).all()


def test_markov_beats_popularity_on_a_chain(tmp_path):
    path = tmp_path / "chain.txt"
    path.write_text("".join(f"u{u} " + " ".join(f"i{(u + k) % 20}" for k in range(6)) + "\n" for u in range(40)))
    ds = load_sequences(path, format="sequences")
    test = leave_one_out_split(ds)["test"]
    vocab = build_item_vocab(ds["item_ids"])
    markov = evaluate(fit_baseline("markov", vocab, test["item_ids"]), test, vocab, show_progress=False)
    popular = evaluate(fit_baseline("popularity", vocab, test["item_ids"]), test, vocab, show_progress=False)
    assert markov["HR@5"] == 1.0 and markov["MRR"] == 1.0  # i(k) is always followed by i(k+1)
    assert popular["MRR"] < 0.5


def test_cli_evaluate_baseline_writes_metric_names(tmp_path, capsys):
    data = tmp_path / "u.data"
    data.write_text("".join(f"{u}\t{(u * 7 + k) % 13}\t5\t{k}\n" for u in range(1, 30) for k in range(6)))
    out = tmp_path / "out" / "metrics.json"
    code = main(["evaluate", "--baseline", "markov", "--data", str(data), "--json", str(out), "--no-progress"])
    assert code == 0
    printed = capsys.readouterr().out
    record = json.loads(out.read_text())
    for name in ("HR@5", "HR@10", "HR@20", "NDCG@5", "NDCG@10", "NDCG@20", "MRR", "Coverage@10", "num_users"):
        assert name in record and name in printed
    ds = load_sequences(data)
    test = leave_one_out_split(ds)["test"]
    vocab = build_item_vocab(ds["item_ids"])
    direct = evaluate(fit_baseline("markov", vocab, test["item_ids"]), test, vocab, show_progress=False)
    assert record["NDCG@10"] == pytest.approx(direct["NDCG@10"]) and record["num_users"] == 29
    assert record["split"] == "test" and record["scorer"] == "markov"
    validation = ["evaluate", "--baseline", "popularity", "--data", str(data), "--split", "validation"]
    assert main([*validation, "--no-progress"]) == 0


def test_cli_reports_bad_input_without_traceback(tmp_path, capsys):
    data = tmp_path / "u.data"
    data.write_text("1\t2\t3\t4\n1\t2\n")
    assert main(["evaluate", "--baseline", "popularity", "--data", str(data), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert f"{data}:2: expected 4 tab-separated fields user item rating timestamp, got 2" in err
    assert "Traceback" not in err


def test_cli_needs_exactly_one_scorer():
    parser = build_parser()
    with pytest.raises(SystemExit):
        parser.parse_args(["evaluate", "--data", "x"])
    with pytest.raises(SystemExit):
        parser.parse_args(["evaluate", "--data", "x", "--model", "m", "--baseline", "markov"])
    args = parser.parse_args(["evaluate", "--data", "x", "--baseline", "markov"])
    assert args.func.__name__ == "run_evaluate" and args.split == "test"


def test_committed_ml100k_baseline_numbers_reproduce(tmp_path):
    """benchmarks/results/baselines.json must be what `seqrec-hf evaluate` computes (same data, protocol)."""
    results_file = Path(REPO_ROOT) / "benchmarks" / "results" / "baselines.json"
    if not results_file.exists():
        pytest.skip("benchmarks/results/baselines.json not generated yet (python benchmarks/baselines.py)")
    results = json.loads(results_file.read_text())["results"]
    committed = {(r["dataset"], r["baseline"], r["split"]): r["metrics"] for r in results}
    data = data_path("ml-100k/u.data")
    for name in ("popularity", "markov"):
        out = tmp_path / f"{name}.json"
        args = ["evaluate", "--baseline", name, "--data", str(data), "--max-length", "200", "--json", str(out)]
        assert main([*args, "--no-progress"]) == 0
        metrics = json.loads(out.read_text())
        expected = committed[("ML-100K", name, "test")]
        for metric in ("HR@5", "HR@10", "NDCG@10", "MRR", "Coverage@10"):
            assert metrics[metric] == pytest.approx(expected[metric], abs=1e-9), (name, metric)
