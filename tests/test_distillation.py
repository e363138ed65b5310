"""Distillation: soft targets in the full-CE loss, the teacher ensemble's targets, and a run that uses them."""

import json

import datasets
import pytest
import torch
import torch.nn.functional as F
from conftest import TINY, make_model
from test_modeling import random_batch

from seqrec_hf import ItemTokenizer
from seqrec_hf.train import TeacherEnsemble, load_recipe, parse_overrides, train


def soft_batch(model, batch_size=3, length=8, k=4, seed=3):
    batch = random_batch(batch=batch_size, length=length, vocab=model.config.vocab_size)
    batch["input_ids"][1, :3] = 0
    batch["attention_mask"][1, :3] = 0
    labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(2, model.config.vocab_size, (batch_size, length, k), generator=g)
    ids[..., 1] = ids[..., 0]  # a repeated item: its weights add up
    weights = torch.rand(batch_size, length, k, generator=g)
    return batch, labels, ids, weights / weights.sum(-1, keepdim=True)


@pytest.mark.parametrize("chunk", [2, 4096])
def test_soft_targets_match_torch_cross_entropy(chunk):
    model = make_model(loss_chunk_size=chunk)
    batch, labels, ids, weights = soft_batch(model)
    out = model(**batch, labels=labels, target_ids=ids, target_weights=weights)
    special = model.config.num_special_tokens
    logits = model(**batch).logits[:, :-1]
    keep = (labels[:, 1:] >= special) & batch["attention_mask"][:, :-1].bool()
    dense = torch.zeros(*logits.shape).scatter_add_(-1, ids[:, :-1], weights[:, :-1])[keep][:, special:]
    expected = F.cross_entropy(logits[keep][:, special:], dense)
    torch.testing.assert_close(out.loss, expected)
    assert not torch.allclose(out.loss, model(**batch, labels=labels).loss)  # the soft targets were used
    out.loss.backward()
    grad = model.model.embed_items.weight.grad.clone()
    model.zero_grad()
    expected.backward()
    torch.testing.assert_close(grad, model.model.embed_items.weight.grad)


def test_soft_targets_are_checked():
    model = make_model(loss_type="gbce")
    batch, labels, ids, weights = soft_batch(model)
    with pytest.raises(ValueError, match="soft_targets need loss_type='full_ce'"):
        model.train()(**batch, labels=labels, target_ids=ids, target_weights=weights)


def save_teacher(folder, seed, tokenizer):
    model = make_model(vocab_size=len(tokenizer), seed=seed, transition_prior_lags=1)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return model


def test_teacher_ensemble_mixes_the_next_item_with_the_teachers_top_items(tmp_path):
    tokenizer = ItemTokenizer.from_items([f"i{n}" for n in range(38)])
    teachers = [save_teacher(tmp_path / f"t{seed}", seed, tokenizer) for seed in (0, 1)]
    recipe = load_recipe(None, parse_overrides(
        [f"distill_from={tmp_path / 't0'},{tmp_path / 't1'}", "distill_weight=0.4", "distill_top_k=5",
         "distill_temperature=2.0"]
    ))  # fmt: skip
    ensemble = TeacherEnsemble(recipe, tokenizer, torch.device("cpu"))
    batch = random_batch(batch=3, length=8, vocab=len(tokenizer))
    batch["labels"] = batch["input_ids"].clone()
    out = ensemble(batch)
    assert out["target_ids"].shape == out["target_weights"].shape == (3, 8, 6)
    torch.testing.assert_close(out["target_weights"].sum(-1), torch.ones(3, 8))
    # the last position predicts nothing (no next event): its row is the (ignored) one-hot padding target
    torch.testing.assert_close(out["target_weights"][:, -1, 0], torch.ones(3))
    assert torch.equal(out["target_ids"][:, :-1, 0], batch["labels"][:, 1:])  # column 0: the true next item
    torch.testing.assert_close(out["target_weights"][:, :-1, 0], torch.full((3, 7), 0.6))
    # reference: the mean of the networks' log-softmax at temperature 2 (no prior), its top 5 renormalised
    mean = 0
    for teacher in teachers:
        with torch.no_grad():
            hidden = teacher.model(batch["input_ids"], attention_mask=batch["attention_mask"]).last_hidden_state
            logits = teacher.score_users(hidden) @ teacher.score_table(teacher.item_head.weight).t()
        logits[..., :2] = float("-inf")
        for b in range(3):
            for t in range(8):
                logits[b, t, batch["input_ids"][b, : t + 1]] = float("-inf")  # the history is no candidate
        mean = mean + torch.log_softmax(logits / 2.0, -1) / 2
    top = torch.softmax(mean, -1).topk(5, dim=-1)
    assert torch.equal(out["target_ids"][:, :-1, 1:], top.indices[:, :-1])
    for b in range(3):
        for t in range(7):
            assert not set(out["target_ids"][b, t, 1:].tolist()) & set(batch["input_ids"][b, : t + 1].tolist())
    expected = 0.4 * top.values / top.values.sum(-1, keepdim=True)
    torch.testing.assert_close(out["target_weights"][:, :-1, 1:], expected[:, :-1])


def test_teachers_must_share_the_vocabulary(tmp_path):
    save_teacher(tmp_path / "t", 0, ItemTokenizer.from_items([f"i{n}" for n in range(38)]))
    recipe = load_recipe(None, parse_overrides([f"distill_from={tmp_path / 't'}"]))
    with pytest.raises(ValueError, match="another item vocabulary"):
        TeacherEnsemble(recipe, ItemTokenizer.from_items([f"j{n}" for n in range(38)]), torch.device("cpu"))
    with pytest.raises(FileNotFoundError, match="not a saved model folder"):
        TeacherEnsemble(load_recipe(None, {"distill_from": str(tmp_path)}), None, torch.device("cpu"))
    with pytest.raises(ValueError, match="distill_from needs train_rows='sequences'"):
        load_recipe(None, parse_overrides([f"distill_from={tmp_path / 't'}", "train_rows=prefixes"]))
    with pytest.raises(ValueError, match="distill_weight must be in"):
        load_recipe(None, parse_overrides([f"distill_from={tmp_path / 't'}", "distill_weight=0"]))


def test_recipe_normalises_the_teacher_list():
    assert load_recipe(None, {"distill_from": " runs/a , runs/b,"}).distill_from == "runs/a,runs/b"
    with pytest.raises(ValueError, match="no teacher folder given"):
        load_recipe(None, {"distill_from": " , "})


def test_training_distils_a_finished_run(tmp_path):
    common = TINY + ["max_steps=12", "eval_every_steps=6"]
    train(load_recipe(None, parse_overrides(common + [f"output_dir={tmp_path / 'teacher'}"])))
    overrides = common + [f"output_dir={tmp_path / 'student'}", f"distill_from={tmp_path / 'teacher'}"]
    metrics = train(load_recipe(None, parse_overrides(overrides)))
    assert metrics["recipe"]["distill_from"] == str(tmp_path / "teacher")
    assert 0.0 <= metrics["test"]["NDCG@10"] <= 1.0
    plain = json.loads((tmp_path / "teacher" / "metrics.json").read_text())
    student_log = (tmp_path / "student" / "train_log.jsonl").read_text().splitlines()
    teacher_log = (tmp_path / "teacher" / "train_log.jsonl").read_text().splitlines()
    first = [json.loads(line)["loss"] for line in (student_log[0], teacher_log[0])]
    assert first[0] != pytest.approx(first[1])  # same seed and data: only the soft targets differ
    assert plain["recipe"]["distill_from"] is None


def test_precomputed_targets_match_the_teachers_on_any_batch(tmp_path):
    """Training reads the teachers' targets from a cache built once per row; a shuffled batch (other rows
    beside it, so other padding) must get exactly what the teachers give it on the fly."""
    from seqrec_hf.data import SeqRecCollator

    tokenizer = ItemTokenizer.from_items([f"i{n}" for n in range(38)])
    for seed in (0, 1):
        save_teacher(tmp_path / f"t{seed}", seed, tokenizer)
    teachers = f"distill_from={tmp_path / 't0'},{tmp_path / 't1'}"
    recipe = load_recipe(None, parse_overrides([teachers, "distill_top_k=5"]))
    g = torch.Generator().manual_seed(0)
    histories = [[f"i{n}" for n in torch.randint(0, 38, (int(length),), generator=g)] for length in
                 torch.randint(4, 14, (23,), generator=g)]  # fmt: skip
    histories[3][2] = "unknown-item"  # an [UNK] target: no entry, and the rows after it must still line up
    rows = datasets.Dataset.from_dict({"item_ids": histories, "row_index": list(range(len(histories)))})
    collator = SeqRecCollator(tokenizer, max_length=10)  # longer rows are truncated the same way in both
    ensemble = TeacherEnsemble(recipe, tokenizer, torch.device("cpu"))
    ensemble.precompute(rows, collator, batch_size=4, show_progress=False)
    for order in ([5, 3, 17, 0, 22], [3], list(range(22, -1, -2))):
        batch = collator([rows[i] for i in order])
        cached = ensemble(batch)
        direct = ensemble({k: v for k, v in batch.items() if k != "row_index"})
        assert "row_index" not in cached
        assert torch.equal(cached["target_ids"], direct["target_ids"])
        torch.testing.assert_close(cached["target_weights"], direct["target_weights"])
    wrong = collator([rows[i] for i in (1, 2)])
    wrong["row_index"] = torch.tensor([2, 1])  # the cache is found by row: another row's targets differ
    assert not torch.equal(ensemble(wrong)["target_ids"], ensemble(collator([rows[1], rows[2]]))["target_ids"])


def prior_teacher(folder, seed, tokenizer, histories, weights):
    """A saved teacher with a stacked prior (2 lags + recent popularity) whose counts are NOT the training
    histories' (as a teacher saved with counts on its test inputs) and whose fitted weights are `weights`."""
    from seqrec_hf.train import count_transition_prior

    model = make_model(vocab_size=len(tokenizer), seed=seed, transition_prior_lags=2, transition_prior_size=16,
                       transition_prior_recent_window=2)  # fmt: skip
    recipe = load_recipe(None, {"transition_prior_lags": 2, "transition_prior_size": 16,
                                "transition_prior_recent_window": 2})  # fmt: skip
    count_transition_prior(model, recipe, tokenizer, [list(reversed(h)) for h in histories])  # other counts
    with torch.no_grad():
        model.transition_prior.weight.copy_(torch.tensor(weights))
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return model


def test_teachers_with_their_prior_match_a_direct_computation(tmp_path):
    """distill_prior: each teacher scores as it serves (network + its fitted prior), the prior counted on the
    student's training histories with the count of the transition being predicted left out; the targets are
    the top items of the mean of the teachers' log-softmax."""
    from seqrec_hf.data import SeqRecCollator

    tokenizer = ItemTokenizer.from_items([f"i{n}" for n in range(30)])
    g = torch.Generator().manual_seed(1)
    items = [[f"i{n}" for n in torch.randint(0, 12, (9,), generator=g)] for _ in range(40)]  # dense counts
    histories = [tokenizer.convert_items_to_ids(h) for h in items]
    weights = ([1.0, 0.5, 0.25], [2.0, 0.0, 0.75])
    teachers = [prior_teacher(tmp_path / f"t{i}", i, tokenizer, histories, w) for i, w in enumerate(weights)]
    overrides = [f"distill_from={tmp_path / 't0'},{tmp_path / 't1'}", "distill_top_k=6", "distill_prior=true",
                 "distill_temperature=2.0", "transition_prior_lags=2", "transition_prior_size=16",
                 "transition_prior_recent_window=2"]  # fmt: skip
    recipe = load_recipe(None, parse_overrides(overrides))
    split = datasets.Dataset.from_dict({"item_ids": items})
    ensemble = TeacherEnsemble(recipe, tokenizer, torch.device("cpu"), split)
    batch = SeqRecCollator(tokenizer)(list(split.select(range(4))))
    out = ensemble(batch)
    # reference, from scratch: counts of "a, then b `lag` events later" and of the last 2 events of each history
    vocab = len(tokenizer)
    counts = torch.zeros(2, vocab, vocab)
    recent = torch.zeros(vocab)
    for history in histories:
        for lag in (1, 2):
            for a, b in zip(history, history[lag:]):
                counts[lag - 1, a, b] += 1
        for item in history[-2:]:
            recent[item] += 1
    ids = batch["input_ids"]
    mean = 0
    for teacher, w in zip(teachers, weights):
        with torch.no_grad():
            hidden = teacher.model(ids, attention_mask=batch["attention_mask"]).last_hidden_state
            logits = teacher.score_users(hidden) @ teacher.score_table(teacher.item_head.weight).t()
        for b in range(4):
            for t in range(ids.shape[1] - 1):
                target = int(ids[b, t + 1])
                for lag in (1, 2):
                    if t - lag + 1 < 0:
                        continue
                    row = counts[lag - 1, ids[b, t - lag + 1]].clone()
                    row[target] -= 1  # this very transition is not evidence
                    logits[b, t] += w[lag - 1] * torch.log1p(row)
                logits[b, t] += w[2] * torch.log1p(recent)
                logits[b, t, ids[b, : t + 1]] = float("-inf")
        logits[..., :2] = float("-inf")
        mean = mean + torch.log_softmax(logits / 2.0, -1) / 2
    top = torch.softmax(mean, -1).topk(6, dim=-1)
    assert torch.equal(out["target_ids"][:, :-1, 1:], top.indices[:, :-1])
    expected = 0.5 * top.values / top.values.sum(-1, keepdim=True)
    torch.testing.assert_close(out["target_weights"][:, :-1, 1:], expected[:, :-1])
    plain = TeacherEnsemble(load_recipe(None, parse_overrides(overrides[:-5] + overrides[-3:])), tokenizer,
                            torch.device("cpu"))  # fmt: skip
    assert not torch.equal(plain(batch)["target_ids"], out["target_ids"])  # the prior changed the targets


def test_teachers_with_their_prior_are_checked(tmp_path):
    tokenizer = ItemTokenizer.from_items([f"i{n}" for n in range(30)])
    prior_teacher(tmp_path / "t", 0, tokenizer, [[2, 3, 4]], [1.0, 1.0, 0.5])
    split = datasets.Dataset.from_dict({"item_ids": [["i1", "i2", "i3"]]})
    common = [f"distill_from={tmp_path / 't'}", "distill_prior=true", "transition_prior_size=16"]
    recipe = load_recipe(None, parse_overrides(common + ["transition_prior_lags=1"]))
    with pytest.raises(ValueError, match="transition_prior_lags=2 \\(this run: 1\\)"):
        TeacherEnsemble(recipe, tokenizer, torch.device("cpu"), split)
    recipe = load_recipe(
        None, parse_overrides(common + ["transition_prior_lags=2", "transition_prior_recent_window=2"])
    )
    with pytest.raises(ValueError, match="counted on the training split"):
        TeacherEnsemble(recipe, tokenizer, torch.device("cpu"))
    with pytest.raises(ValueError, match="distill_prior needs distill_from"):
        load_recipe(None, parse_overrides(["distill_prior=true"]))
    with pytest.raises(ValueError, match="distill_prior needs transition_prior_lags > 0"):
        load_recipe(None, parse_overrides(common[:2] + ["transition_prior_lags=0"]))
