"""Each training loss against a direct reference computation."""

import math

import pytest
import torch
import torch.nn.functional as F

from seqrec_hf.modeling_seqrec import gbce_beta, next_item_loss

NUM_SPECIAL = 2


def setup(vocab=30, batch=3, length=6, dim=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(batch, length, dim, generator=g, dtype=torch.float64)
    weight = torch.randn(vocab, dim, generator=g, dtype=torch.float64)
    labels = torch.randint(NUM_SPECIAL, vocab, (batch, length), generator=g)
    mask = torch.ones(batch, length, dtype=torch.long)
    mask[0, :2] = 0
    labels[0, :2] = -100
    return hidden, weight, labels, mask


def real_positions(hidden, labels, mask):
    targets = labels[:, 1:]
    keep = (targets >= NUM_SPECIAL) & mask[:, :-1].bool()
    return hidden[:, :-1][keep], targets[keep]


@pytest.mark.parametrize("chunk", [1000, 2])
def test_sampled_softmax_matches_reference(chunk):
    hidden, weight, labels, mask = setup()
    vocab, num_items, m = weight.shape[0], weight.shape[0] - NUM_SPECIAL, 7
    torch.manual_seed(123)
    loss = next_item_loss(hidden, labels, mask, weight, NUM_SPECIAL, chunk, "sampled_softmax", m, True)
    torch.manual_seed(123)
    uniform = torch.randint(NUM_SPECIAL, vocab, (m,))  # the same draws, by the documented sampler
    h, targets = real_positions(hidden, labels, mask)
    batch_counts = {int(t): int((targets == t).sum()) for t in targets}
    u = m / num_items  # expected uniform draws of one item
    losses = []
    for row in range(len(targets)):
        pos_item = int(targets[row])
        pos = float(h[row] @ weight[pos_item])  # the positive keeps its exact score
        logits = [pos]
        for item in uniform.tolist():  # each uniform draw weighted by 1 / expected count
            if item != pos_item:
                logits.append(float(h[row] @ weight[item]) - math.log(u + batch_counts.get(item, 0)))
        for item, count in batch_counts.items():  # each distinct batch item weighted by count / expected
            if item != pos_item:
                logits.append(float(h[row] @ weight[item]) - math.log((u + count) / count))
        losses.append(torch.logsumexp(torch.tensor(logits), 0).item() - pos)
    assert loss.item() == pytest.approx(sum(losses) / len(losses), rel=1e-6)


def test_sampled_softmax_with_many_uniform_negatives_estimates_full_softmax():
    """logQ correction makes the sampled loss an estimate of the full cross-entropy."""
    hidden, weight, labels, mask = setup(vocab=40)
    full = next_item_loss(hidden, labels, mask, weight, NUM_SPECIAL, 1000, "full_ce")
    torch.manual_seed(0)
    sampled = next_item_loss(hidden, labels, mask, weight, NUM_SPECIAL, 1000, "sampled_softmax", 200_000, False)
    assert sampled.item() == pytest.approx(full.item(), rel=0.01)
    biased = next_item_loss(hidden * 0 + hidden, labels, mask, weight, NUM_SPECIAL, 1000, "sampled_softmax", 20, False)
    assert biased.item() < full.item()  # few negatives: the estimate is lower, as expected of sampled softmax


@pytest.mark.parametrize("chunk", [1000, 3])
def test_gbce_matches_reference(chunk):
    hidden, weight, labels, mask = setup()
    vocab, k, t = weight.shape[0], 5, 0.75
    torch.manual_seed(7)
    loss = next_item_loss(hidden, labels, mask, weight, NUM_SPECIAL, chunk, "gbce", k, gbce_t=t)
    torch.manual_seed(7)
    negatives = torch.randint(NUM_SPECIAL, vocab, (k,)).tolist()
    alpha = k / (vocab - NUM_SPECIAL - 1)
    beta = alpha * (t * (1 - 1 / alpha) + 1 / alpha)
    h, targets = real_positions(hidden, labels, mask)
    total = 0.0
    for row in range(len(targets)):
        pos = float(h[row] @ weight[int(targets[row])])
        total += -beta * math.log(1 / (1 + math.exp(-pos)))
        for item in negatives:
            if item != int(targets[row]):
                total += -math.log(1 - 1 / (1 + math.exp(-float(h[row] @ weight[item]))))
    assert loss.item() == pytest.approx(total / len(targets), rel=1e-6)


def test_gbce_beta_limits():
    assert gbce_beta(10, 1001, 0.0) == pytest.approx(1.0)  # t=0: plain BCE
    assert gbce_beta(10, 1001, 1.0) == pytest.approx(10 / 1000)  # t=1: beta = alpha, fully calibrated


def test_full_ce_matches_reference():
    hidden, weight, labels, mask = setup()
    loss = next_item_loss(hidden, labels, mask, weight, NUM_SPECIAL, 2, "full_ce")
    h, targets = real_positions(hidden, labels, mask)
    logits = h @ weight.t()
    logits[:, :NUM_SPECIAL] = float("-inf")
    assert loss.item() == pytest.approx(F.cross_entropy(logits, targets).item(), rel=1e-6)


@pytest.mark.parametrize("loss_type", ["sampled_softmax", "gbce"])
def test_sampled_losses_train_a_model(loss_type):
    from conftest import make_model

    model = make_model(vocab_size=12, loss_type=loss_type, num_negatives=4)
    model.train()
    batch = torch.tensor([[2, 3, 4, 5, 6, 7, 8, 9, 10, 11]] * 4)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    for _ in range(40):
        loss = model(input_ids=batch, labels=batch).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.eval()
    top, _ = model.recommend(batch[:1, :5], top_k=1)  # after 2..6 comes 7
    assert top.item() == 7
