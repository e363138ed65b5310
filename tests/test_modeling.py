"""Model behaviour: causality, padding, attention backends, time bias, loss and recommend()."""

import pytest
import torch
import torch.nn.functional as F
from conftest import make_model

from seqrec_hf import SeqRecForNextItemPrediction, SeqRecModel
from seqrec_hf.modeling_seqrec import causal_window_mean, time_gap_buckets


def random_batch(batch=3, length=10, vocab=40, seed=1, times=False):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(2, vocab, (batch, length), generator=g)
    mask = torch.ones_like(ids)
    out = {"input_ids": ids, "attention_mask": mask}
    if times:
        gaps = torch.randint(1, 10**6, (batch, length), generator=g)
        out["timestamps"] = gaps.cumsum(-1) + 1_600_000_000
    return out


@pytest.mark.parametrize("use_time_bias", [False, True])
def test_causality(use_time_bias):
    model = make_model(use_time_bias=use_time_bias)
    batch = random_batch(times=use_time_bias)
    t = 4
    changed = {k: v.clone() for k, v in batch.items()}
    changed["input_ids"][:, t + 1 :] = torch.randint(2, 40, changed["input_ids"][:, t + 1 :].shape)
    a = model(**batch).logits
    b = model(**changed).logits
    torch.testing.assert_close(a[:, : t + 1], b[:, : t + 1])
    assert not torch.allclose(a[:, t + 1 :], b[:, t + 1 :])  # the check can fail: later outputs do change


@pytest.mark.parametrize("use_time_bias", [False, True])
def test_left_padding_invariance(use_time_bias):
    model = make_model(use_time_bias=use_time_bias)
    batch = random_batch(batch=2, length=6, times=use_time_bias)
    pad = 5
    padded = {
        "input_ids": F.pad(batch["input_ids"], (pad, 0), value=0),
        "attention_mask": F.pad(batch["attention_mask"], (pad, 0), value=0),
    }
    if use_time_bias:
        padded["timestamps"] = F.pad(batch["timestamps"], (pad, 0), value=123)
    a = model(**batch).logits
    b = model(**padded).logits[:, pad:]
    torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    ids_a, scores_a = model.recommend(**batch, top_k=5)
    ids_b, scores_b = model.recommend(**padded, top_k=5)
    assert torch.equal(ids_a, ids_b)
    torch.testing.assert_close(scores_a, scores_b, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("use_time_bias", [False, True])
def test_eager_and_sdpa_agree(use_time_bias):
    batch = random_batch(times=use_time_bias)
    batch["attention_mask"][0, :3] = 0  # some padding too
    batch["input_ids"][0, :3] = 0
    sdpa = make_model(use_time_bias=use_time_bias, attn_implementation="sdpa")
    eager = make_model(use_time_bias=use_time_bias, attn_implementation="eager")
    eager.load_state_dict(sdpa.state_dict())
    assert sdpa.config._attn_implementation == "sdpa" and eager.config._attn_implementation == "eager"
    if use_time_bias:  # make the bias non-trivial
        for m in (sdpa, eager):
            torch.manual_seed(3)
            for layer in m.model.layers:
                layer.time_bias.weight.data.normal_()
    torch.testing.assert_close(sdpa(**batch).logits, eager(**batch).logits, atol=1e-5, rtol=1e-5)


def test_time_bias_uses_timestamps_and_is_noop_when_off():
    batch = random_batch(times=True)
    shifted = dict(batch, timestamps=batch["timestamps"].clone())
    shifted["timestamps"][:, 5:] += 10**7  # a long gap in the middle of every history

    timed = make_model(use_time_bias=True)
    for layer in timed.model.layers:
        layer.time_bias.weight.data.normal_()
    assert not torch.allclose(timed(**batch).logits, timed(**shifted).logits)

    blind = make_model(use_time_bias=False)
    without = {k: v for k, v in batch.items() if k != "timestamps"}
    torch.testing.assert_close(blind(**batch).logits, blind(**without).logits)
    torch.testing.assert_close(blind(**batch).logits, blind(**shifted).logits)


def test_time_bias_starts_as_time_blind_twin():
    batch = random_batch(times=True)
    timed = make_model(use_time_bias=True, seed=5)
    blind = make_model(use_time_bias=False, seed=5)
    blind.load_state_dict(timed.state_dict(), strict=False)
    torch.testing.assert_close(timed(**batch).logits, blind(**batch).logits)


def test_time_gap_buckets_are_log_spaced():
    ts = torch.tensor([[0, 1, 3, 1027]])
    buckets = time_gap_buckets(ts, torch.tensor([1027 + 2**20]), num_buckets=32, base=2.0)
    # query at position 0 is the time of event 1 (t=1): gaps to keys 0..3 are 1, 0, 2, 1026 -> buckets 0,0,1,10
    assert buckets[0, 0].tolist() == [0, 0, 1, 10]
    # last query is the request time: gap to event 0 is 1027 + 2**20 -> floor(log2) = 20
    assert buckets[0, 3, 0].item() == 20
    assert buckets.max() < 32


def test_timestamps_required_when_time_bias_on():
    model = make_model(use_time_bias=True)
    with pytest.raises(ValueError, match="timestamps"):
        model(**random_batch())


def position_model(attn_implementation="sdpa", **overrides):
    """Relative position bias + embedding LayerNorm, with a non-trivial (random) bias table."""
    model = make_model(
        use_position_bias=True, embedding_norm=True, attn_implementation=attn_implementation, **overrides
    )
    torch.manual_seed(11)
    for layer in model.model.layers:
        layer.position_bias.weight.data.normal_()
    return model


def test_position_bias_matters_and_starts_as_twin():
    batch = random_batch()
    with_bias = position_model()
    zeroed = make_model(use_position_bias=True, embedding_norm=True)
    plain = make_model(embedding_norm=True)
    # zero at init: identical to the model without the bias
    plain.load_state_dict(zeroed.state_dict(), strict=False)
    torch.testing.assert_close(zeroed(**batch).logits, plain(**batch).logits)
    assert not torch.allclose(with_bias(**batch).logits, zeroed(**batch).logits)
    # the bias depends on distance: reversing the history changes the last output
    reversed_batch = dict(batch, input_ids=batch["input_ids"].flip(-1))
    assert not torch.allclose(with_bias(**batch).logits[:, -1], with_bias(**reversed_batch).logits[:, -1])


def test_embedding_norm_normalises_the_input():
    model = make_model(embedding_norm=True, num_hidden_layers=1)
    captured = {}
    model.model.embed_dropout.register_forward_hook(lambda mod, args, out: captured.setdefault("x", out))
    model(**random_batch())
    x = captured["x"]
    torch.testing.assert_close(x.mean(-1), torch.zeros_like(x.mean(-1)), atol=1e-5, rtol=0)
    torch.testing.assert_close(x.std(-1, unbiased=False), torch.ones_like(x.mean(-1)), atol=1e-2, rtol=0)


@pytest.mark.parametrize("window", [0, 1, 3, 50])
def test_causal_window_mean_matches_a_direct_loop(window):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 7, 4, generator=g)
    valid = torch.ones(2, 7, dtype=torch.bool)
    valid[1, :3] = False  # left padding: never averaged
    out = causal_window_mean(x, valid, window)
    for b in range(2):
        real = [t for t in range(7) if valid[b, t]]
        for i, t in enumerate(real):
            last = real[: i + 1] if window == 0 else real[max(0, i + 1 - window) : i + 1]
            torch.testing.assert_close(out[b, t], x[b, last].mean(0))


def filter_model(attn_implementation="sdpa", **overrides):
    """Post-norm blocks with the low-pass branch, its gains made non-trivial."""
    model = make_model(
        norm_style="post", filter_mix=0.6, filter_window=3, embedding_norm=True,
        attn_implementation=attn_implementation, **overrides,
    )  # fmt: skip
    torch.manual_seed(12)
    for layer in model.model.layers:
        layer.low_pass.sqrt_beta.data.uniform_(0.2, 1.5)
    return model


def no_position_model(attn_implementation="sdpa", **overrides):
    """Post-norm + filter blocks without absolute position embeddings."""
    return filter_model(attn_implementation, position_embedding_type="none", **overrides)


@pytest.mark.parametrize(
    "build", [position_model, filter_model, no_position_model], ids=["position-bias", "post-norm+filter", "no-pos"]
)
def test_architecture_options_are_causal_padding_invariant_and_backend_independent(build):
    model = build()
    batch = random_batch(batch=2, length=6)
    changed = {k: v.clone() for k, v in batch.items()}
    changed["input_ids"][:, 4:] = torch.randint(2, 40, changed["input_ids"][:, 4:].shape)
    a, b = model(**batch).logits, model(**changed).logits
    torch.testing.assert_close(a[:, :4], b[:, :4])
    assert not torch.allclose(a[:, 4:], b[:, 4:])

    pad = 4
    padded = {k: F.pad(v, (pad, 0), value=0) for k, v in batch.items()}
    torch.testing.assert_close(model(**batch).logits, model(**padded).logits[:, pad:], atol=1e-5, rtol=1e-5)

    eager = build(attn_implementation="eager")
    torch.testing.assert_close(model(**padded).logits, eager(**padded).logits, atol=1e-5, rtol=1e-5)


def test_filter_branch_and_norm_style_change_the_output():
    batch = random_batch()
    base = make_model(norm_style="post", seed=4)
    filtered = make_model(norm_style="post", filter_mix=0.5, filter_window=2, seed=4)
    filtered.load_state_dict(base.state_dict(), strict=False)
    assert not torch.allclose(base(**batch).logits, filtered(**batch).logits)
    pre = make_model(seed=4)
    pre.load_state_dict(base.state_dict())  # same weights, other normalisation order
    assert not torch.allclose(base(**batch).logits, pre(**batch).logits)
    # beta = 1 at init: the filter is the identity, so the branch passes its input through
    layer = filtered.model.layers[0]
    x = torch.randn(2, 5, 32)
    torch.testing.assert_close(layer.low_pass(x, torch.ones(2, 5, dtype=torch.bool)), x)


def test_bad_norm_style_and_filter_fields_are_named():
    from seqrec_hf import SeqRecConfig

    with pytest.raises(ValueError, match="norm_style"):
        SeqRecConfig(norm_style="sandwich")
    with pytest.raises(ValueError, match="filter_mix"):
        SeqRecConfig(filter_mix=1.5)
    with pytest.raises(ValueError, match="filter_window"):
        SeqRecConfig(filter_window=-1)
    with pytest.raises(ValueError, match="position_embedding_type"):
        SeqRecConfig(position_embedding_type="rotary")


def test_without_position_embeddings_only_the_positions_are_dropped():
    with_pos = make_model(norm_style="post", seed=5)
    without = make_model(norm_style="post", position_embedding_type="none", seed=5)
    names = set(with_pos.state_dict()) - set(without.state_dict())
    assert names == {"model.embed_positions.weight"}
    without.load_state_dict({k: v for k, v in with_pos.state_dict().items() if k not in names})
    batch = random_batch()
    assert not torch.allclose(with_pos(**batch).logits, without(**batch).logits)
    with torch.no_grad():
        with_pos.model.embed_positions.weight.zero_()  # zero positions == no positions
    torch.testing.assert_close(with_pos(**batch).logits, without(**batch).logits)


@pytest.mark.parametrize("unpad", [False, True])
def test_item_dropout_replaces_inputs_in_training_only(unpad):
    model = make_model(item_dropout=0.5, seed=2, unpad_training=unpad)
    seen = []
    model.model.embed_items.register_forward_hook(lambda mod, args, out: seen.append(args[0].clone()))
    batch = random_batch(batch=4, length=12)
    batch["attention_mask"][:, :2] = 0
    batch["input_ids"][:, :2] = 0
    evaluated = model(**batch).logits
    assert torch.equal(seen[-1], batch["input_ids"])  # eval mode: untouched
    model.train()
    torch.manual_seed(0)
    labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
    loss = model(**batch, labels=labels).loss
    ids = seen[-1]
    if unpad:  # training embeds the real events only, (N,); back to (B, T) with the padding ids
        assert ids.shape == (int(batch["attention_mask"].sum()),)
        ids = batch["input_ids"].masked_scatter(batch["attention_mask"].bool(), ids)
    replaced = ids != batch["input_ids"]
    assert (ids[replaced] == model.config.unk_token_id).all()
    assert not replaced[:, :2].any()  # padding is never replaced
    assert 0.3 < replaced[:, 2:].float().mean() < 0.7
    assert torch.isfinite(loss)
    model.eval()
    torch.testing.assert_close(model(**batch).logits, evaluated)


def reference_loss(model, batch, labels, exclude_history=False, smoothing=0.0):
    """Direct computation: logits everywhere, shift, drop -100/special targets, CE without special columns.

    With `exclude_history`, position t's softmax also leaves out the items at positions <= t, except its target.
    With `smoothing` eps, each row's loss is (1 - eps) * NLL + eps * mean NLL over the row's candidates.
    """
    logits = model(**batch).logits[:, :-1].float().clone()
    ids = batch["input_ids"]
    for b in range(ids.shape[0] if exclude_history else 0):
        for t in range(ids.shape[1] - 1):
            target = labels[b, t + 1]
            keep_target = logits[b, t, target].clone() if target >= 0 else None
            logits[b, t, ids[b, : t + 1]] = float("-inf")
            if keep_target is not None:
                logits[b, t, target] = keep_target
    targets = labels[:, 1:]
    keep = (targets >= model.config.num_special_tokens) & batch["attention_mask"][:, :-1].bool()
    logits = logits[keep]
    logits[:, : model.config.num_special_tokens] = float("-inf")
    nll = F.cross_entropy(logits, targets[keep], reduction="none")
    log_probs = torch.log_softmax(logits, dim=1)
    finite = torch.isfinite(log_probs)
    uniform = -(log_probs.masked_fill(~finite, 0.0).sum(1) / finite.sum(1))
    return ((1.0 - smoothing) * nll + smoothing * uniform).mean()


@pytest.mark.parametrize("exclude_history", [False, True])
def test_label_smoothing_matches_reference(exclude_history):
    smoothing = 0.2
    model = make_model(loss_chunk_size=3, loss_exclude_history=exclude_history, label_smoothing=smoothing)
    batch = random_batch(batch=3, length=8, vocab=12)
    batch["input_ids"][1, :4] = 0
    batch["attention_mask"][1, :4] = 0
    labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
    out = model(**batch, labels=labels)
    expected = reference_loss(model, batch, labels, exclude_history=exclude_history, smoothing=smoothing)
    torch.testing.assert_close(out.loss, expected)
    plain = reference_loss(model, batch, labels, exclude_history=exclude_history)
    assert not torch.allclose(out.loss, plain)
    if not exclude_history:  # torch's own label smoothing over the non-special columns agrees
        special = model.config.num_special_tokens
        logits = model(**batch).logits[:, :-1]
        keep = (labels[:, 1:] >= special) & batch["attention_mask"][:, :-1].bool()
        torch_loss = F.cross_entropy(
            logits[keep][:, special:], labels[:, 1:][keep] - special, label_smoothing=smoothing
        )
        torch.testing.assert_close(out.loss, torch_loss)
    out.loss.backward()
    grad = model.model.embed_items.weight.grad.clone()
    model.zero_grad()
    reference_loss(model, batch, labels, exclude_history=exclude_history, smoothing=smoothing).backward()
    torch.testing.assert_close(grad, model.model.embed_items.weight.grad)


def window_reference(model, batch, labels, window, decay, exclude_history):
    """Loop over every (sequence, position): soft target over the next `window` events, history masked."""
    logits = model(**batch).logits.float()
    special, ids = model.config.num_special_tokens, batch["input_ids"]
    losses = []
    for b in range(ids.shape[0]):
        for t in range(ids.shape[1] - 1):
            if not batch["attention_mask"][b, t] or labels[b, t + 1] < special:
                continue
            future = [(j, int(labels[b, t + j])) for j in range(1, window + 1) if t + j < ids.shape[1]]
            future = [(j, item) for j, item in future if item >= special]
            row = logits[b, t].clone()
            row[:special] = float("-inf")
            if exclude_history:
                kept = {item: row[item].clone() for _, item in future}
                row[ids[b, : t + 1]] = float("-inf")
                for item, value in kept.items():
                    row[item] = value
            log_probs = torch.log_softmax(row, dim=0)
            total = sum(decay ** (j - 1) for j, _ in future)
            losses.append(-sum(decay ** (j - 1) / total * log_probs[item] for j, item in future))
    return torch.stack(losses).mean()


@pytest.mark.parametrize("exclude_history", [False, True])
def test_target_window_matches_reference(exclude_history):
    model = make_model(loss_chunk_size=4, loss_exclude_history=exclude_history, target_window=3)
    batch = random_batch(batch=3, length=8, vocab=12)
    batch["input_ids"][1, :4] = 0
    batch["attention_mask"][1, :4] = 0
    labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
    labels[2, 5] = -100  # an ignored target inside a window: skipped, the others renormalised
    out = model(**batch, labels=labels)
    expected = window_reference(model, batch, labels, 3, 0.5, exclude_history)
    torch.testing.assert_close(out.loss, expected)
    assert not torch.allclose(out.loss, window_reference(model, batch, labels, 1, 0.5, exclude_history))
    if not exclude_history:  # torch's cross-entropy with probability targets agrees
        special = model.config.num_special_tokens
        logits = model(**batch).logits[:, :-1]
        keep = (labels[:, 1:] >= special) & batch["attention_mask"][:, :-1].bool()
        soft = torch.zeros(*logits.shape[:2], logits.shape[-1] - special)
        for b, t in keep.nonzero().tolist():
            for j in range(1, 4):
                if t + j < labels.shape[1] and labels[b, t + j] >= special:
                    soft[b, t, labels[b, t + j] - special] += 0.5 ** (j - 1)
        soft = soft[keep] / soft[keep].sum(1, keepdim=True)
        torch.testing.assert_close(out.loss, F.cross_entropy(logits[keep][:, special:], soft))
    out.loss.backward()
    grad = model.model.embed_items.weight.grad.clone()
    model.zero_grad()
    window_reference(model, batch, labels, 3, 0.5, exclude_history).backward()
    torch.testing.assert_close(grad, model.model.embed_items.weight.grad)


def recency_reference(model, batch, labels, half_life, exclude_history, smoothing):
    """Loop over every (sequence, position): per-position CE (smoothed), weighted 0.5^(d / h), d = the real
    targets after it in its sequence; the weighted mean."""
    logits = model(**batch).logits.float()
    special, ids = model.config.num_special_tokens, batch["input_ids"]
    losses, weights = [], []
    for b in range(ids.shape[0]):
        kept = [t for t in range(ids.shape[1] - 1) if batch["attention_mask"][b, t] and labels[b, t + 1] >= special]
        for i, t in enumerate(kept):
            target = int(labels[b, t + 1])
            row = logits[b, t].clone()
            row[:special] = float("-inf")
            if exclude_history:
                value = row[target].clone()
                row[ids[b, : t + 1]] = float("-inf")
                row[target] = value
            log_probs = torch.log_softmax(row, dim=0)
            finite = torch.isfinite(log_probs)
            uniform = -log_probs[finite].mean()
            losses.append((1.0 - smoothing) * -log_probs[target] + smoothing * uniform)
            weights.append(0.5 ** ((len(kept) - 1 - i) / half_life))
    weights = torch.tensor(weights)
    return (torch.stack(losses) * weights).sum() / weights.sum()


@pytest.mark.parametrize("exclude_history,smoothing", [(False, 0.0), (True, 0.0), (False, 0.2), (True, 0.2)])
def test_recency_weighted_loss_matches_reference(exclude_history, smoothing):
    model = make_model(
        loss_chunk_size=4,
        loss_exclude_history=exclude_history,
        label_smoothing=smoothing,
        loss_recency_half_life=2.0,
    )
    batch = random_batch(batch=3, length=8, vocab=12)
    batch["input_ids"][1, :4] = 0
    batch["attention_mask"][1, :4] = 0
    labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
    labels[2, 5] = -100  # an ignored target: not counted among the ones after it
    out = model(**batch, labels=labels)
    expected = recency_reference(model, batch, labels, 2.0, exclude_history, smoothing)
    torch.testing.assert_close(out.loss, expected)
    assert not torch.allclose(out.loss, recency_reference(model, batch, labels, 1e9, exclude_history, smoothing))
    out.loss.backward()
    grad = model.model.embed_items.weight.grad.clone()
    model.zero_grad()
    recency_reference(model, batch, labels, 2.0, exclude_history, smoothing).backward()
    torch.testing.assert_close(grad, model.model.embed_items.weight.grad)


def test_recency_half_life_is_checked():
    from seqrec_hf import SeqRecConfig

    with pytest.raises(ValueError, match="loss_recency_half_life"):
        SeqRecConfig(loss_recency_half_life=-1.0)
    with pytest.raises(ValueError, match="loss_recency_half_life"):
        SeqRecConfig(loss_recency_half_life=4.0, loss_type="gbce")
    model = make_model(loss_recency_half_life=4.0)
    batch = random_batch(batch=2, length=6)
    with pytest.raises(ValueError, match="recency_half_life"):  # one label per row (prefix rows)
        model(**batch, labels=batch["input_ids"][:, -1])


def test_target_window_of_one_is_the_next_item_loss():
    batch = random_batch(batch=2, length=6)
    labels = batch["input_ids"].clone()
    plain = make_model(seed=3)(**batch, labels=labels).loss
    torch.testing.assert_close(
        make_model(seed=3, target_window=1, target_window_decay=0.9)(**batch, labels=labels).loss, plain
    )


def test_target_window_fields_are_checked():
    from seqrec_hf import SeqRecConfig

    with pytest.raises(ValueError, match="target_window"):
        SeqRecConfig(target_window=3, loss_type="gbce")
    with pytest.raises(ValueError, match="target_window_decay"):
        SeqRecConfig(target_window_decay=0.0)
    with pytest.raises(ValueError, match="target_window"):
        SeqRecConfig(target_window=0)


def test_label_smoothing_needs_full_ce():
    from seqrec_hf import SeqRecConfig

    with pytest.raises(ValueError, match="label_smoothing"):
        SeqRecConfig(label_smoothing=0.1, loss_type="sampled_softmax")
    with pytest.raises(ValueError, match="label_smoothing"):
        SeqRecConfig(label_smoothing=1.0)


@pytest.mark.parametrize("chunk", [4096, 3])
def test_loss_matches_reference_on_real_positions_only(chunk):
    model = make_model(loss_chunk_size=chunk)
    batch = random_batch(batch=3, length=8)
    batch["input_ids"][1, :4] = 0
    batch["attention_mask"][1, :4] = 0
    labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
    out = model(**batch, labels=labels)
    assert out.logits is None  # training does not materialise [B, T, V]
    expected = reference_loss(model, batch, labels)
    torch.testing.assert_close(out.loss, expected)
    # gradients agree with the direct computation too (chunks are recomputed in backward)
    out.loss.backward()
    grad = model.model.embed_items.weight.grad.clone()
    model.zero_grad()
    reference_loss(model, batch, labels).backward()
    torch.testing.assert_close(grad, model.model.embed_items.weight.grad)


@pytest.mark.parametrize("chunk", [4096, 3])
def test_loss_without_history_matches_reference(chunk):
    model = make_model(loss_chunk_size=chunk, loss_exclude_history=True)
    batch = random_batch(batch=3, length=8, vocab=12)  # small catalog: repeats (targets seen before) occur
    batch["input_ids"][1, :4] = 0
    batch["attention_mask"][1, :4] = 0
    labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
    ids = batch["input_ids"]
    assert any(ids[b, t + 1] in ids[b, : t + 1] for b in (0, 2) for t in range(7))  # a repeat is covered
    out = model(**batch, labels=labels)
    expected = reference_loss(model, batch, labels, exclude_history=True)
    torch.testing.assert_close(out.loss, expected)
    assert not torch.allclose(out.loss, reference_loss(model, batch, labels))  # it is a different loss
    out.loss.backward()
    grad = model.model.embed_items.weight.grad.clone()
    model.zero_grad()
    reference_loss(model, batch, labels, exclude_history=True).backward()
    torch.testing.assert_close(grad, model.model.embed_items.weight.grad)


def test_loss_exclude_history_needs_full_ce():
    from seqrec_hf import SeqRecConfig

    with pytest.raises(ValueError, match="loss_exclude_history"):
        SeqRecConfig(loss_exclude_history=True, loss_type="gbce")


def test_loss_ignores_padding_content():
    model = make_model()
    batch = random_batch(batch=2, length=8)
    batch["attention_mask"][:, :3] = 0
    labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
    other = {k: v.clone() for k, v in batch.items()}
    other["input_ids"][:, :3] = 7  # garbage under the padding mask
    torch.testing.assert_close(model(**batch, labels=labels).loss, model(**other, labels=labels).loss)


def test_output_layer_is_tied(model, tmp_path):
    assert model.item_head.weight.data_ptr() == model.model.embed_items.weight.data_ptr()
    model.save_pretrained(tmp_path)
    loaded = SeqRecForNextItemPrediction.from_pretrained(tmp_path)
    assert loaded.item_head.weight.data_ptr() == loaded.model.embed_items.weight.data_ptr()


def brute_force_top_k(model, batch, k, exclude_history=True, allowed=None):
    scores = model(**batch, logits_to_keep=1).logits[:, -1].float()
    scores[:, : model.config.num_special_tokens] = float("-inf")
    if exclude_history:
        for row in range(scores.shape[0]):
            hist = batch["input_ids"][row][batch["attention_mask"][row].bool()]
            scores[row, hist] = float("-inf")
    if allowed is not None:
        mask = torch.ones(scores.shape[1], dtype=torch.bool)
        mask[allowed] = False
        scores[:, mask] = float("-inf")
    return scores.topk(k, dim=-1)


@pytest.mark.parametrize("chunk", [7, 1000])
def test_recommend_matches_brute_force(chunk):
    model = make_model(vocab_size=60)
    batch = random_batch(batch=4, length=9, vocab=60)
    batch["attention_mask"][2, :5] = 0
    batch["input_ids"][2, :5] = 0
    ids, scores = model.recommend(**batch, top_k=8, chunk_size=chunk)
    ref_scores, ref_ids = brute_force_top_k(model, batch, 8)
    assert torch.equal(ids, ref_ids)
    torch.testing.assert_close(scores, ref_scores)
    for row in range(4):
        history = set(batch["input_ids"][row][batch["attention_mask"][row].bool()].tolist())
        assert not history & set(ids[row].tolist())
        assert (ids[row] >= model.config.num_special_tokens).all()


def test_recommend_with_history_and_allowed_items():
    model = make_model(vocab_size=30)
    batch = random_batch(batch=2, length=5, vocab=30)
    ids, _ = model.recommend(**batch, top_k=5, exclude_history=False)
    ref_scores, ref_ids = brute_force_top_k(model, batch, 5, exclude_history=False)
    assert torch.equal(ids, ref_ids)

    allowed = [3, 5, 7, 11, 13, 17]
    ids, scores = model.recommend(**batch, top_k=10, allowed_items=allowed, chunk_size=4)
    for row in range(2):
        got = [i for i in ids[row].tolist() if i >= 0]
        history = set(batch["input_ids"][row].tolist())
        assert set(got) == set(allowed) - history  # every allowed, non-history item, nothing else
        assert ids[row].tolist().count(-1) == 10 - len(got)  # unfilled slots are -1 / -inf
        assert torch.isneginf(scores[row][ids[row] == -1]).all()


def test_recommend_never_returns_special_tokens_even_when_they_score_best():
    model = make_model(vocab_size=20)
    with torch.no_grad():
        model.model.embed_items.weight[:2] *= 1000  # make [PAD]/[UNK] dominate every dot product
    batch = random_batch(batch=2, length=3, vocab=20)
    ids, _ = model.recommend(**batch, top_k=17)
    assert (ids[ids >= 0] >= 2).all()


def test_clear_errors_on_bad_inputs(model):
    with pytest.raises(ValueError, match="vocab_size"):
        model(input_ids=torch.tensor([[2, 3, 99]]))
    with pytest.raises(ValueError, match="max_position_embeddings"):
        model(input_ids=torch.randint(2, 40, (1, 20)))
    with pytest.raises(ValueError, match="2-D"):
        model(input_ids=torch.tensor([2, 3]))
    with pytest.raises(ValueError, match="top_k"):
        model.recommend(torch.tensor([[2, 3]]), top_k=0)


def test_bare_model_hidden_states(model):
    bare = SeqRecModel(model.config).eval()
    out = bare(**random_batch(), output_hidden_states=True)
    assert out.last_hidden_state.shape == (3, 10, 32)
    assert len(out.hidden_states) == model.config.num_hidden_layers + 1


def test_training_step_reduces_loss():
    model = make_model(vocab_size=12)
    model.train()
    batch = {"input_ids": torch.tensor([[2, 3, 4, 5, 6, 7, 8, 9, 10, 11]] * 4)}
    labels = batch["input_ids"]
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    first = None
    for _ in range(30):
        loss = model(**batch, labels=labels).loss
        first = first if first is not None else loss.item()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert loss.item() < first / 4


@pytest.mark.parametrize(
    "features", [{"use_time_gap_embedding": True}, {"use_time_gap_embedding": True, "use_time_bias": True}]
)
def test_time_gap_embedding_is_causal_padding_invariant_and_uses_the_request_time(features):
    model = make_model(**features)
    with torch.no_grad():
        model.model.embed_time_gaps.weight.normal_()
    batch = random_batch(times=True)
    t = 4
    changed = {k: v.clone() for k, v in batch.items()}
    changed["input_ids"][:, t + 1 :] = torch.randint(2, 40, changed["input_ids"][:, t + 1 :].shape)
    torch.testing.assert_close(model(**batch).logits[:, : t + 1], model(**changed).logits[:, : t + 1])
    # the gap to the predicted event matters: a later request time changes the last position's scores only
    soon = model(**batch, query_timestamps=batch["timestamps"][:, -1] + 60).logits
    later = model(**batch, query_timestamps=batch["timestamps"][:, -1] + 30 * 86400).logits
    torch.testing.assert_close(soon[:, :-1], later[:, :-1])
    assert not torch.allclose(soon[:, -1], later[:, -1])
    padded = {
        "input_ids": F.pad(batch["input_ids"], (3, 0), value=0),
        "attention_mask": F.pad(batch["attention_mask"], (3, 0), value=0),
        "timestamps": F.pad(batch["timestamps"], (3, 0), value=5),
    }
    torch.testing.assert_close(model(**batch).logits, model(**padded).logits[:, 3:], atol=1e-5, rtol=1e-5)


def test_time_gap_embedding_starts_at_zero_and_needs_timestamps():
    model = make_model(use_time_gap_embedding=True)
    assert torch.count_nonzero(model.model.embed_time_gaps.weight) == 0
    with pytest.raises(ValueError, match="timestamps"):
        model(**random_batch())
