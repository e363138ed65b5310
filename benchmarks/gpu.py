"""Accelerator throughput: bf16 training tokens/s and model FLOPs utilisation (MFU) of a large config.

    python benchmarks/gpu.py                      # d=512, 8 layers, length 200, 1M items, sampled softmax
    python benchmarks/gpu.py --device cpu --hidden-size 32 --layers 1 --length 16 --items 1000 --batch 4 \\
        --steps 2 --output /tmp/gpu-smoke      # the same code path, small enough for a CPU

MFU = achieved model FLOP/s over the chip's *measured* bf16 matmul rate (a large square matmul timed here),
not a datasheet peak. Model FLOPs per target position, PaLM-style: 6 x (non-embedding parameters) for the
blocks, 12 x layers x d x length for attention scores and values, and 6 x d x (candidates + 1) for the sampled
softmax (forward + backward = 3 x forward; candidates = uniform negatives + distinct in-batch targets).
Synthetic ids (uniform), every position real: this measures the model and the loss, not data loading.
Writes <output>/gpu.md and gpu.json with the device name and command.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import torch

from seqrec_hf import SeqRecConfig, SeqRecForNextItemPrediction

HERE = Path(__file__).resolve().parent


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def matmul_rate(device: torch.device, size: int, repeats: int = 10) -> float:
    """Measured bf16 matmul FLOP/s of a (size x size) @ (size x size) product."""
    a = torch.randn(size, size, device=device, dtype=torch.bfloat16)
    b = torch.randn(size, size, device=device, dtype=torch.bfloat16)
    a @ b
    sync(device)
    start = time.perf_counter()
    for _ in range(repeats):
        a @ b
    sync(device)
    return 2 * size**3 * repeats / (time.perf_counter() - start)


def model_flops_per_token(config: SeqRecConfig, length: int, candidates: int) -> float:
    d, layers, ff = config.hidden_size, config.num_hidden_layers, config.intermediate_size
    block_params = layers * (4 * d * d + 2 * d * ff)  # qkv + output projection, feed-forward
    return 6 * block_params + 12 * layers * d * length + 6 * d * (candidates + 1)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--hidden-size", type=int, default=512)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--length", type=int, default=200)
    parser.add_argument("--items", type=int, default=1_000_000)
    parser.add_argument("--negatives", type=int, default=8192, help="uniform negatives per batch (+ in-batch)")
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--steps", type=int, default=20, help="timed steps (after 3 warm-up steps)")
    parser.add_argument("--matmul-size", type=int, default=None, help="default: 8192 on GPU, 1024 on CPU")
    parser.add_argument("--output", default=str(HERE / "results"))
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    torch.manual_seed(0)

    config = SeqRecConfig(
        vocab_size=args.items + 2,
        hidden_size=args.hidden_size,
        num_hidden_layers=args.layers,
        num_attention_heads=args.heads,
        intermediate_size=4 * args.hidden_size,
        max_position_embeddings=args.length,
        hidden_dropout_prob=0.1,
        attention_dropout=0.1,
        loss_type="sampled_softmax",
        num_negatives=args.negatives,
    )
    model = SeqRecForNextItemPrediction(config).to(device).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=device.type == "cuda")
    ids = torch.randint(2, config.vocab_size, (args.batch, args.length), device=device)

    def step() -> torch.Tensor:
        with torch.autocast(device.type, dtype=torch.bfloat16):
            loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss.detach()  # no host sync inside the timed loop

    for _ in range(3):
        first_loss = step()
    sync(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    start = time.perf_counter()
    for _ in range(args.steps):
        last_loss = step()
    sync(device)
    seconds = time.perf_counter() - start

    targets = args.batch * (args.length - 1) * args.steps
    tokens_per_second = targets / seconds
    candidates = args.negatives + ids[:, 1:].unique().numel()  # uniform + distinct in-batch targets
    flops = model_flops_per_token(config, args.length, candidates) * tokens_per_second
    peak = matmul_rate(device, args.matmul_size or (8192 if device.type == "cuda" else 1024))
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu"
    result = {
        "command": "python benchmarks/gpu.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "device": name,
        "torch": torch.__version__,
        "config": {"hidden_size": args.hidden_size, "layers": args.layers, "heads": args.heads,
                   "length": args.length, "items": args.items, "negatives": args.negatives, "batch": args.batch},
        "steps": args.steps,
        "seconds": seconds,
        "tokens_per_second": tokens_per_second,
        "model_tflops_per_second": flops / 1e12,
        "measured_bf16_matmul_tflops": peak / 1e12,
        "mfu": flops / peak,
        "loss_first_last": [float(first_loss), float(last_loss)],
        "peak_memory_gb": torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None,
    }  # fmt: skip
    out = Path(args.output)
    out.mkdir(parents=True, exist_ok=True)
    (out / "gpu.json").write_text(json.dumps(result, indent=2))
    memory = "-" if result["peak_memory_gb"] is None else f"{result['peak_memory_gb']:.1f}"
    (out / "gpu.md").write_text(
        "# Accelerator throughput (bf16 training, sampled softmax)\n\n"
        f"Command: `{result['command']}`  \nDevice: {name}, torch {torch.__version__}  \n"
        f"Config: {result['config']}\n\n"
        f"| tokens/s | model TFLOP/s | measured bf16 matmul TFLOP/s | MFU | peak memory GB |\n|---|---|---|---|---|\n"
        f"| {tokens_per_second:,.0f} | {flops / 1e12:.2f} | {peak / 1e12:.1f} | {flops / peak:.1%} | "
        f"{memory} |\n"
    )
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
