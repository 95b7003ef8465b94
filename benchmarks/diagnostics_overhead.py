"""Step-time overhead of ``DeltaDiagnostics`` (LoRA+ δ¹/δ²/δ³, every k-th step) on a small random-init Llama.

A step is forward with the LM loss, backward and AdamW (``lorakit.make_optimizer``, λ = 16) on one fixed
random batch; LoRA r = 8 on every linear layer (``lorakit.inject``). Blocks of ``--every`` steps alternate
between plain training and training with ``DeltaDiagnostics(every=k)`` (hooks attached for the block, its
first step measured), so each diagnostics block holds exactly one measured step and a slow drift of the
machine hits both variants alike. The overhead is ``median block time with / without − 1``: the amortised
cost per step at that k, the issue's ≤ 5% target. ``--curvature`` adds a third variant that also passes
``after_step(loss_fn=...)`` (the curvature terms: four extra forward/backward passes per measured step).
Times are CUDA-synchronised on GPU. Nothing is downloaded (the model comes from a ``LlamaConfig``).

Example (CPU)::

    OMP_NUM_THREADS=1 python benchmarks/diagnostics_overhead.py --device cpu --out out/diag_overhead.json
"""

from __future__ import annotations

import argparse
import json
import logging
import platform
import statistics
import time
from collections.abc import Callable

import torch

import lorakit
from lorakit.analysis.diagnostics import DeltaDiagnostics
from lorakit.utils import atomic_write_json

logger = logging.getLogger("diagnostics_overhead")


def build(args: argparse.Namespace) -> tuple[torch.nn.Module, torch.optim.Optimizer, torch.Tensor]:
    """Random-init Llama with LoRA on all linear layers, its LoRA+ optimizer and one batch of token ids."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=args.vocab,
        hidden_size=args.hidden,
        intermediate_size=4 * args.hidden,
        num_hidden_layers=args.layers,
        num_attention_heads=args.heads,
        num_key_value_heads=args.heads,
        max_position_embeddings=args.seq,
    )
    model = LlamaForCausalLM(config)
    lorakit.inject(model, lorakit.LoraConfig(r=args.rank, alpha=2 * args.rank, targets="all-linear"))
    for _, layer in lorakit.lora_layers(model):  # non-zero B, so every GEMM and δ term is non-trivial
        torch.nn.init.normal_(layer.lora_B, std=1e-3)
    model.to(args.device).train()
    optimizer = lorakit.make_optimizer(model, lr=1e-4, ratio=16.0)
    ids = torch.randint(0, args.vocab, (args.batch, args.seq), device=args.device)
    return model, optimizer, ids


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--device",
        default="cuda" if torch.cuda.is_available() else "cpu",
        help="cuda (default if present) or cpu",
    )
    parser.add_argument("--every", type=int, default=10, help="diagnostics interval k (steps per block)")
    parser.add_argument("--blocks", type=int, default=8, help="timed blocks per variant (≥ 50 steps in all)")
    parser.add_argument("--warmup", type=int, default=5, help="untimed steps first")
    parser.add_argument("--curvature", action="store_true", help="also time after_step(loss_fn=...)")
    parser.add_argument("--layers", type=int, default=2, help="decoder layers (2)")
    parser.add_argument("--hidden", type=int, default=256, help="hidden size (256)")
    parser.add_argument("--heads", type=int, default=4, help="attention heads (4)")
    parser.add_argument("--vocab", type=int, default=2048, help="vocabulary size (2048)")
    parser.add_argument("--rank", type=int, default=8, help="LoRA rank r (8)")
    parser.add_argument("--batch", type=int, default=8, help="sequences per step (8)")
    parser.add_argument("--seq", type=int, default=128, help="tokens per sequence (128)")
    parser.add_argument("--out", default="out/diagnostics_overhead.json", help="JSON results path")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if args.every * args.blocks < 50:
        parser.error("--every × --blocks must be at least 50 timed steps per variant")

    model, optimizer, ids = build(args)
    cuda = torch.device(args.device).type == "cuda"

    def loss_fn() -> torch.Tensor:
        return model(input_ids=ids, labels=ids).loss

    def block(diag: DeltaDiagnostics | None, with_loss_fn: bool) -> float:
        if cuda:
            torch.cuda.synchronize()
        start = time.perf_counter()
        for _ in range(args.every):
            optimizer.zero_grad(set_to_none=True)
            loss_fn().backward()
            if diag is not None:
                diag.before_step()
            optimizer.step()
            if diag is not None:
                diag.after_step(loss_fn=loss_fn if with_loss_fn else None)
        if cuda:
            torch.cuda.synchronize()
        return time.perf_counter() - start

    variants: dict[str, Callable[[], float]] = {"plain": lambda: block(None, False)}

    def with_diagnostics(curvature: bool) -> float:
        diag = DeltaDiagnostics(model, every=args.every, optimizer=optimizer)
        try:
            return block(diag, curvature)
        finally:
            diag.detach()

    variants["diagnostics"] = lambda: with_diagnostics(False)
    if args.curvature:
        variants["diagnostics+curvature"] = lambda: with_diagnostics(True)
    for _ in range(args.warmup):
        block(None, False)
    for run in variants.values():  # one untimed block each (first measurement, allocator warm-up)
        run()
    times: dict[str, list[float]] = {name: [] for name in variants}
    for _ in range(args.blocks):
        for name, run in variants.items():
            times[name].append(run())

    plain = statistics.median(times["plain"])
    results = {
        "benchmark": "DeltaDiagnostics step-time overhead (LoRA+ δ terms)",
        "device": args.device,
        "device_name": torch.cuda.get_device_name() if cuda else platform.processor() or platform.machine(),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "config": vars(args),
        "steps_per_variant": args.every * args.blocks,
        "median_step_seconds": {name: statistics.median(t) / args.every for name, t in times.items()},
        "overhead_percent": {
            name: 100.0 * (statistics.median(t) / plain - 1.0) for name, t in times.items() if name != "plain"
        },
        "block_seconds": times,
    }
    for name in variants:
        overhead = results["overhead_percent"].get(name)
        print(
            f"{name:24s} {1e3 * results['median_step_seconds'][name]:9.2f} ms/step"
            + ("" if overhead is None else f"   overhead {overhead:+.1f}% at k={args.every}")
        )
    atomic_write_json(args.out, results)
    logger.info("wrote %s", args.out)
    print(json.dumps(results["overhead_percent"]))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
