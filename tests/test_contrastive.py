"""The contrastive term (`contrastive_weight`): NT-Xent against a loop-by-loop reference, and what the model adds
to its training loss (nothing at evaluation)."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import make_model

from seqrec_hf import SeqRecConfig
from seqrec_hf.modeling_seqrec import contrastive_loss


def reference_nt_xent(a: torch.Tensor, b: torch.Tensor, temperature: float) -> float:
    vectors = [v / v.norm() for v in [*a, *b]]
    n = a.shape[0]
    total = 0.0
    for i, anchor in enumerate(vectors):
        partner = (i + n) % (2 * n)
        others = [float(anchor @ v) / temperature for j, v in enumerate(vectors) if j != i]
        positive = float(anchor @ vectors[partner]) / temperature
        total += -positive + math.log(sum(math.exp(s) for s in others))
    return total / (2 * n)


@pytest.mark.parametrize("temperature", [1.0, 0.3])
def test_contrastive_loss_matches_reference(temperature):
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(5, 4, generator=g), torch.randn(5, 4, generator=g)
    assert contrastive_loss(a, b, temperature).item() == pytest.approx(reference_nt_xent(a, b, temperature), rel=1e-5)
    assert contrastive_loss(a[:1], b[:1]).item() == 0.0  # no negatives, no term


def batch_with_padding():
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(2, 40, (4, 7), generator=g)
    mask = torch.ones_like(ids)
    ids[1, :5], mask[1, :5] = 0, 0  # two events: position -2 still predicts the last one
    ids[2, :6], mask[2, :6] = 0, 0  # one event: nothing to predict, left out of the term
    labels = ids.masked_fill(mask == 0, -100)
    return ids, mask, labels


def test_model_adds_weighted_term_in_training_only():
    ids, mask, labels = batch_with_padding()
    plain = make_model(seed=1)
    with_term = make_model(seed=1, contrastive_weight=0.5, contrastive_temperature=2.0)
    for model in (plain, with_term):
        model.train()  # dropout is 0 in make_model, so both passes agree and the term is exact
    base = plain(ids, attention_mask=mask, labels=labels)
    total = with_term(ids, attention_mask=mask, labels=labels)
    states = base.last_hidden_state[:, -2][torch.tensor([True, True, False, True])]
    expected = base.loss + 0.5 * reference_nt_xent(states.detach(), states.detach(), 2.0)
    assert total.loss.item() == pytest.approx(expected.item(), rel=1e-5)
    assert total.loss.item() > base.loss.item()
    with_term.eval()
    assert with_term(ids, attention_mask=mask, labels=labels).loss.item() == pytest.approx(base.loss.item(), rel=1e-6)


def test_term_uses_two_dropout_views_and_trains():
    ids, mask, labels = batch_with_padding()
    plain = make_model(seed=1, hidden_dropout_prob=0.3)
    with_term = make_model(seed=1, hidden_dropout_prob=0.3, contrastive_weight=1.0)
    plain.train(), with_term.train()
    torch.manual_seed(5)  # the same dropout draws for the first pass of both
    base = plain(ids, attention_mask=mask, labels=labels)
    torch.manual_seed(5)
    total = with_term(ids, attention_mask=mask, labels=labels)
    states = base.last_hidden_state[:, -2][torch.tensor([True, True, False, True])].detach()
    same_view = reference_nt_xent(states, states, 0.2)
    term = total.loss.item() - base.loss.item()
    assert term > 0 and term != pytest.approx(same_view, rel=1e-3)  # the second pass drew its own dropout
    total.loss.backward()
    assert with_term.model.embed_items.weight.grad.abs().sum() > 0


def test_prefix_rows_use_last_position():
    ids, mask, _ = batch_with_padding()
    targets = torch.tensor([5, 6, 7, 8])
    plain, with_term = make_model(seed=1), make_model(seed=1, contrastive_weight=1.0)
    plain.train(), with_term.train()
    base = plain(ids, attention_mask=mask, labels=targets)
    states = base.last_hidden_state[:, -1].detach()  # every row's last event is real
    expected = base.loss.item() + reference_nt_xent(states, states, 0.2)
    assert with_term(ids, attention_mask=mask, labels=targets).loss.item() == pytest.approx(expected, rel=1e-5)


@pytest.mark.parametrize(
    "field,value", [("contrastive_weight", -0.1), ("contrastive_temperature", 0.0), ("contrastive_weight", "a")]
)
def test_bad_settings_name_the_field(field, value):
    with pytest.raises(ValueError, match=field):
        SeqRecConfig(**{field: value})
