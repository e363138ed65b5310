"""The fast paths give the same answers as the plain ones, and memory stays bounded by the chunk sizes.

- `torch.compile` (inductor, the CPU C++ backend) gives the eager loss and gradients.
- Training on real events only (`unpad_training`) gives the padded layout's hidden states, loss and gradients.
- The CPU loss chunks are cache-sized but never below `CPU_MIN_CHUNK` rows, and never above `loss_chunk_size`.
- The training loss never creates a [positions x catalog] tensor, forward or backward, and the peak memory of
  a process computing it does not grow with the number of positions.
- `recommend()` returns the same items and scores whatever its catalog chunk size (100k-item catalog), and
  never creates a [batch x catalog] tensor.
"""

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from conftest import REPO_ROOT, make_model
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from seqrec_hf.modeling_seqrec import (
    CPU_CACHE_LOGITS_PER_CHUNK,
    CPU_MIN_CHUNK,
    MAX_LOGITS_PER_CHUNK,
    Packing,
    loss_chunk_rows,
    next_item_loss,
)


class LargestTensor(TorchDispatchMode):
    """Records the largest tensor (in elements) that any aten op allocates while active, backward included.

    Views (slices of the item table, reshapes) share their input's memory and are not counted.
    """

    def __init__(self):
        super().__init__()
        self.numel = 0
        self.op = None

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func.is_view:
            return out
        for value in tree_flatten(out)[0]:
            if isinstance(value, torch.Tensor) and value.numel() > self.numel:
                self.numel, self.op = value.numel(), func
        return out


def training_batch(batch, length, vocab, seed=0, times=False):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(2, vocab, (batch, length), generator=g)
    mask = torch.ones_like(ids)
    mask[0, : length // 2] = 0  # some left padding
    ids = ids.masked_fill(mask == 0, 0)
    out = {"input_ids": ids, "attention_mask": mask, "labels": ids.masked_fill(mask == 0, -100)}
    if times:
        out["timestamps"] = torch.randint(1, 10**5, (batch, length), generator=g).cumsum(-1) + 1_600_000_000
    return out


@pytest.mark.slow
@pytest.mark.parametrize("use_time_bias", [False, True])
def test_compiled_model_matches_eager_loss_and_gradients(use_time_bias):
    # Inductor compiles C++ kernels for the CPU (gcc): the path `torch.compile(model)` users take.
    torch._dynamo.reset()
    model = make_model(vocab_size=300, loss_chunk_size=16, use_time_bias=use_time_bias, time_num_buckets=8).train()
    batch = training_batch(4, 12, 300, times=use_time_bias)
    loss = model(**batch).loss
    loss.backward()
    eager_grads = {name: p.grad.clone() for name, p in model.named_parameters()}
    model.zero_grad()

    compiled = torch.compile(model, backend="inductor")
    compiled_loss = compiled(**batch).loss
    compiled_loss.backward()
    torch.testing.assert_close(compiled_loss, loss, rtol=1e-5, atol=1e-6)
    for name, param in model.named_parameters():
        torch.testing.assert_close(param.grad, eager_grads[name], rtol=1e-4, atol=1e-6, msg=name)
    # a second batch of another shape reuses or recompiles, and still agrees
    other = training_batch(3, 9, 300, seed=1, times=use_time_bias)
    torch.testing.assert_close(compiled(**other).loss, model(**other).loss, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("num_positions", [1000, 4000])
def test_loss_never_creates_a_positions_by_catalog_tensor(num_positions):
    vocab, chunk = 3000, 128
    hidden = torch.randn(num_positions // 40, 41, 16, requires_grad=True)  # 40 targets per row
    weight = torch.randn(vocab, 16, requires_grad=True)
    labels = torch.randint(2, vocab, hidden.shape[:2])
    mask = torch.ones(hidden.shape[:2])
    with LargestTensor() as largest:
        loss = next_item_loss(hidden, labels, mask, weight, 2, chunk)
        loss.backward()
    assert largest.numel <= chunk * vocab, f"{largest.op} returned {largest.numel} elements > chunk x catalog"
    assert hidden.grad is not None and weight.grad is not None


def test_model_loss_is_bounded_by_the_chunk_size_through_the_whole_model():
    model = make_model(vocab_size=2000, max_position_embeddings=64, loss_chunk_size=100).train()
    batch = training_batch(16, 64, 2000)
    with LargestTensor() as largest:
        model(**batch).loss.backward()
    assert largest.numel <= 100 * 2000 < 16 * 63 * 2000


def test_bf16_autocast_loss_and_gradients_stay_close_to_fp32():
    # The benchmark's bf16 numbers are only worth having if bf16 trains the same model.
    torch.manual_seed(0)
    hidden = torch.randn(8, 33, 64, requires_grad=True)
    weight = (0.1 * torch.randn(5000, 64)).requires_grad_()
    labels = torch.randint(2, 5000, (8, 33))
    mask = torch.ones(8, 33)
    grads = []
    for bf16 in (False, True):
        hidden.grad = weight.grad = None
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            loss = next_item_loss(hidden, labels, mask, weight, 2, 100)
        loss.backward()
        assert loss.dtype == torch.float32
        grads.append((loss.detach(), hidden.grad.clone(), weight.grad.clone()))
    (loss32, h32, w32), (loss16, h16, w16) = grads
    torch.testing.assert_close(loss16, loss32, rtol=2e-2, atol=0)
    assert h16.dtype == w16.dtype == torch.float32
    for got, want in ((h16, h32), (w16, w32)):
        assert torch.nn.functional.cosine_similarity(got.flatten(), want.flatten(), dim=0) > 0.99


_PEAK_SCRIPT = textwrap.dedent(
    """
    import json, resource, sys, torch
    from seqrec_hf.modeling_seqrec import next_item_loss
    positions, vocab, chunk = (int(x) for x in sys.argv[1:])
    torch.manual_seed(0)
    hidden = torch.randn(positions // 64, 65, 32, requires_grad=True)
    weight = torch.randn(vocab, 32, requires_grad=True)
    labels = torch.randint(2, vocab, hidden.shape[:2])
    mask = torch.ones(hidden.shape[:2])
    next_item_loss(hidden[:2], labels[:2], mask[:2], weight, 2, chunk).backward()  # warm up the allocator
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    next_item_loss(hidden, labels, mask, weight, 2, chunk).backward()
    after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(json.dumps({"growth_bytes": (after - before) * 1024}))
    """
)


def _peak_growth(positions: int, vocab: int, chunk: int) -> int:
    # A fixed glibc mmap threshold returns every freed large block to the OS at once, so peak RSS is the peak
    # of live memory. With glibc's default (dynamic) threshold, freed logits chunks stay in the heap and RSS
    # grows with the number of chunks although no more memory is live: see docs/performance.md.
    env = {key: value for key, value in os.environ.items() if not key.startswith("MALLOC_")}
    env.update(OMP_NUM_THREADS="2", MALLOC_MMAP_THRESHOLD_=str(1 << 20))
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")]))
    result = subprocess.run(
        [sys.executable, "-c", _PEAK_SCRIPT, str(positions), str(vocab), str(chunk)],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=600,
        check=True,
        env=env,
    )
    return json.loads(result.stdout.strip().splitlines()[-1])["growth_bytes"]


@pytest.mark.slow
def test_peak_live_memory_of_the_loss_does_not_grow_with_positions():
    # Real process memory (peak RSS), not a model of it: 16x more positions must cost about the same peak.
    # Materialised logits would need positions x catalog x 4 bytes = 1.2 GB more at 16,384 positions.
    vocab, chunk = 20_000, 256
    small = _peak_growth(1024, vocab, chunk)
    large = _peak_growth(16_384, vocab, chunk)
    full_logits = (16_384 - 1024) * vocab * 4
    assert large - small < 0.1 * full_logits, (small, large, full_logits)
    assert large < 8 * chunk * vocab * 4, large  # a few chunk-sized buffers at most


def test_recommend_is_the_same_for_any_chunk_size_on_a_100k_catalog():
    model = make_model(vocab_size=100_002, hidden_size=32, max_position_embeddings=20)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(2, 100_002, (5, 20), generator=g)
    mask = torch.ones_like(ids)
    mask[1, :15] = 0
    ids = ids.masked_fill(mask == 0, 0)
    results = {}
    for chunk in (1_000, 7_919, 65_536, 100_002, 250_000):
        with LargestTensor() as largest:
            results[chunk] = model.recommend(ids, mask, top_k=50, chunk_size=chunk)
        activations = 5 * 20 * 128  # the Transformer's own (batch, length, 3 x hidden) tensors
        assert largest.numel <= max(5 * chunk, activations) or chunk >= 100_002  # O(batch x chunk), not catalog
    reference_ids, reference_scores = results[250_000]
    for chunk, (item_ids, scores) in results.items():
        assert torch.equal(item_ids, reference_ids), chunk
        torch.testing.assert_close(scores, reference_scores, msg=f"chunk {chunk}")

    # and they are the true top-50 of the full score matrix, history and special tokens excluded
    with torch.no_grad():
        full = model(ids, mask, logits_to_keep=1).logits[:, -1].float()
    full[:, :2] = float("-inf")
    full.scatter_(1, ids.masked_fill(mask == 0, 0), float("-inf"))
    brute_scores, brute_ids = full.topk(50, dim=-1)
    torch.testing.assert_close(reference_scores, brute_scores, rtol=1e-5, atol=1e-5)
    assert (reference_ids == brute_ids).float().mean() > 0.99  # float ties may order differently


@pytest.mark.parametrize(
    "overrides",
    [
        {},
        {"norm_style": "post", "filter_mix": 0.7, "filter_window": 3, "embedding_norm": True},
        {"use_time_bias": True, "use_time_gap_embedding": True, "position_embedding_type": "from_end"},
        {"item_graph_layers": 1, "item_graph_edges": 0},
        {"use_position_bias": True},
    ],
    ids=["pre-norm", "post-norm+filter", "time-aware", "item-graph", "position-bias"],
)
def test_unpadded_training_matches_the_padded_layout(overrides):
    """Dropout off, so both layouts compute the same function: outputs at real events, loss and every gradient."""
    times = overrides.get("use_time_bias", False)
    batch = training_batch(6, 12, 40, seed=3, times=times)
    batch["attention_mask"][1:4, :9] = 0  # short histories: most of the batch is padding
    batch["input_ids"] = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, 0)
    batch["labels"] = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
    valid = batch["attention_mask"].bool()
    results = {}
    for unpad in (False, True):
        model = make_model(seed=4, **overrides).train()
        model.config.unpad_training = unpad
        out = model(**batch)
        out.loss.backward()
        inputs = {k: v for k, v in batch.items() if k != "labels"}
        hidden = model.model(**inputs).last_hidden_state
        grads = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
        results[unpad] = (out.loss, hidden, grads)
    (loss_a, hidden_a, grads_a), (loss_b, hidden_b, grads_b) = results[False], results[True]
    torch.testing.assert_close(loss_b, loss_a)
    torch.testing.assert_close(hidden_b[valid], hidden_a[valid])
    assert (hidden_b[~valid] == 0).all()  # padding is never computed in the unpadded layout
    assert grads_a.keys() == grads_b.keys() and len(grads_a) > 5
    for name in grads_a:
        torch.testing.assert_close(grads_b[name], grads_a[name], msg=name)


def test_unpadded_training_is_used_only_where_it_applies():
    """Training with padding packs; evaluation, per-layer outputs and padding-free batches keep the layout."""
    model = make_model(seed=1)
    calls = []
    original = Packing.from_mask
    Packing.from_mask = classmethod(lambda cls, valid: calls.append(valid.shape) or original.__func__(cls, valid))
    try:
        batch = training_batch(3, 8, 40)
        inputs = {k: v for k, v in batch.items() if k != "labels"}
        model.eval()(**inputs)
        model.train()(**inputs, output_hidden_states=True)
        full = {k: v for k, v in inputs.items()}
        full["attention_mask"] = torch.ones_like(full["attention_mask"])
        model(**full)
        assert calls == []
        model(**inputs)
        assert calls == [(3, 8)]
    finally:
        Packing.from_mask = original


def test_packing_round_trip():
    valid = torch.tensor([[0, 0, 1, 1], [1, 1, 1, 1], [0, 0, 0, 1]], dtype=torch.bool)
    packing = Packing.from_mask(valid)
    padded = torch.arange(3 * 4 * 2, dtype=torch.float32).view(3, 4, 2)
    packed = packing.unpad(padded)
    assert packed.shape == (7, 2)
    torch.testing.assert_close(packed, padded[valid])
    restored = packing.pad(packed)
    torch.testing.assert_close(restored[valid], padded[valid])
    assert (restored[~valid] == 0).all()


def test_cpu_loss_chunks_are_cache_sized_within_the_bounds():
    assert loss_chunk_rows(4096, 18357, "cpu") == max(CPU_MIN_CHUNK, CPU_CACHE_LOGITS_PER_CHUNK // 18357)
    assert loss_chunk_rows(4096, 18357, "cpu") * 18357 <= CPU_CACHE_LOGITS_PER_CHUNK
    assert loss_chunk_rows(64, 18357, "cpu") == 64  # the config's bound still holds
    assert loss_chunk_rows(4096, 1_000_002, "cpu") == CPU_MIN_CHUNK  # large catalogs: matmuls keep their shape
    assert loss_chunk_rows(4096, 10**8, "cpu") == MAX_LOGITS_PER_CHUNK // 10**8  # the memory cap wins
    assert loss_chunk_rows(4096, 18357, "cuda") == 4096  # GPUs: few large kernels


@pytest.mark.parametrize("chunk", [7, 64, 100])  # 150 rows: every size gives several chunks
def test_loss_and_gradients_do_not_depend_on_the_chunk_size(chunk):
    torch.manual_seed(0)
    hidden = torch.randn(5, 30, 16)
    weight = torch.randn(500, 16)
    labels = torch.randint(2, 500, (5, 30))
    mask = torch.ones(5, 30)
    grads = []
    for size in (chunk, 10**6):
        h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
        loss = next_item_loss(h, labels, mask, w, 2, size)
        loss.backward()
        grads.append((loss.detach(), h.grad, w.grad))
    for a, b in zip(grads[0], grads[1]):
        torch.testing.assert_close(a, b)
