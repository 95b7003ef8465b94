"""Host (CPU) time per adapted layer: what an eager LoRA step pays in Python and kernel launches.

Eager LoRA steps on an H100 are often bound by the host, not the GPU (benchmarks/RESULTS.md): the GPU
finishes each small kernel before the CPU has launched the next. This script isolates that cost. It runs
forward + backward of one adapted projection on tiny CUDA tensors (so every kernel is shorter than its
launch) many times without synchronising, and reports the wall time per call, which is then the host's
cost. It compares lorakit's fused path (merged and addmm strategies, with and without the Triton kernels,
with ``save_merged_weight``), lorakit's reference path, a PEFT bf16 layer and a frozen ``nn.Linear``, and
times single launches (the Triton merge kernel, ``torch.empty``, one cuBLAS ``mm``, and the table kernels
through Triton's own launch and directly, ``triton_lora.DIRECT_LAUNCH``).

Example (GPU; about 20 s):
    PYTHONPATH=src python3 benchmarks/host_overhead.py --out out/host_overhead.json
"""

from __future__ import annotations

import argparse
import json
import logging
import platform
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path

import torch

from lorakit.adapters import fused, triton_lora
from lorakit.utils import atomic_write_json

LOG = logging.getLogger("host_overhead")


def per_call_us(fn: Callable[[], object], calls: int, repeats: int) -> float:
    """Median over ``repeats`` of the wall time per call of ``calls`` back-to-back calls, in µs."""
    for _ in range(20):
        fn()
    torch.cuda.synchronize()
    samples = []
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(calls):
            fn()
        torch.cuda.synchronize()
        samples.append((time.perf_counter() - start) / calls * 1e6)
    return sorted(samples)[len(samples) // 2]


def layer_cases(tokens: int, width: int, rank: int) -> dict[str, Callable[[], object]]:
    """Forward + backward of one projection, each way; tensors are tiny so the host time dominates."""
    dev, dtype = "cuda", torch.bfloat16
    x = torch.randn(tokens, width, device=dev, dtype=dtype, requires_grad=True)
    w = torch.randn(width, width, device=dev, dtype=dtype) / width**0.5
    a = (torch.randn(rank, width, device=dev) / width**0.5).requires_grad_(True)
    b = (torch.randn(width, rank, device=dev) * 1e-3).requires_grad_(True)
    grad = torch.randn(tokens, width, device=dev, dtype=dtype)

    def fused_call(strategy: str, kernels: frozenset[str], saved: bool = False) -> Callable[[], object]:
        def call() -> None:
            fused.TRITON_KERNELS = kernels
            y = fused.lora_linear(x, w, None, a, b, 2.0, strategy=strategy, save_merged_weight=saved)
            y.backward(grad)

        return call

    def reference() -> None:
        fused.reference_lora_linear(x, w, None, a, b, 2.0).backward(grad)

    def plain() -> None:
        torch.nn.functional.linear(x, w).backward(grad)

    every = frozenset(fused.TRITON_KERNEL_NAMES)
    cases = {
        "frozen Linear (no adapter)": plain,
        "lorakit fused merged, Triton merge": fused_call("merged", every),
        "lorakit fused merged, torch ops": fused_call("merged", frozenset()),
        "lorakit fused merged + save_merged_weight, Triton merge": fused_call("merged", every, True),
        "lorakit fused addmm": fused_call("addmm", every),
        "lorakit reference (plain autograd)": reference,
    }
    try:
        from peft import LoraConfig, get_peft_model
    except ImportError:
        LOG.warning("peft not installed: no PEFT case")
        return cases
    model = torch.nn.Sequential(torch.nn.Linear(width, width, bias=False)).to(dev, dtype)
    model = get_peft_model(
        model, LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=["0"]), autocast_adapter_dtype=False
    )

    def peft_call() -> None:
        model(x).backward(grad)

    cases["PEFT bf16 adapters"] = peft_call
    return cases


def launch_cases(width: int, rank: int) -> dict[str, Callable[[], object]]:
    dev, dtype = "cuda", torch.bfloat16
    w = torch.randn(width, width, device=dev, dtype=dtype)
    a = torch.randn(rank, width, device=dev)
    b = torch.randn(width, rank, device=dev)
    x = torch.randn(64, width, device=dev, dtype=dtype)
    cases = {
        "torch.empty (out × in)": lambda: torch.empty((width, width), device=dev, dtype=dtype),
        "cuBLAS mm (64 × in × out)": lambda: x @ w,
        "cast + scale of a factor": lambda: (a * 2.0).to(dtype),
    }
    if triton_lora.AVAILABLE:
        cases["Triton merge kernel launch (with its 3 outputs)"] = lambda: triton_lora.merge_lora_weight(
            w, b, a, 2.0
        )
        g = torch.randn(64, width, device=dev, dtype=dtype)
        u = torch.randn(64, rank, device=dev, dtype=dtype)
        b_s = b.to(dtype)
        cases["Triton G/dB kernel launch"] = lambda: triton_lora.lora_grad_pass(g, b_s, u)
        for direct in (True, False):
            how = "direct launch" if direct else "Triton's launch"
            cases[f"table merge launch, one weight, with its outputs ({how})"] = partial(
                _table_call, direct, triton_lora.merge_lora_weights, [w], [b], [a], [2.0], True
            )
            cases[f"table G/dB launch, one member, with its outputs ({how})"] = partial(
                _table_call, direct, triton_lora.lora_grad_pass_group, [g], [b_s], u, (rank,)
            )
    return cases


def _table_call(direct: bool, fn: Callable, *args: object) -> object:
    """``fn(*args)`` with ``triton_lora.DIRECT_LAUNCH`` set to ``direct`` (restored after)."""
    before, triton_lora.DIRECT_LAUNCH = triton_lora.DIRECT_LAUNCH, direct
    try:
        return fn(*args)
    finally:
        triton_lora.DIRECT_LAUNCH = before


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--tokens", type=int, default=64, help="tokens per call (small: host-bound)")
    parser.add_argument("--width", type=int, default=256, help="in = out features of the projection")
    parser.add_argument("--rank", type=int, default=16, help="LoRA rank")
    parser.add_argument("--calls", type=int, default=500, help="back-to-back calls per sample")
    parser.add_argument("--repeats", type=int, default=7, help="samples (median reported)")
    parser.add_argument("--out", default="out/host_overhead.json", help="JSON results path")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if not torch.cuda.is_available():
        raise SystemExit("host_overhead.py needs a CUDA GPU: it measures the host cost of GPU launches")
    results = {"layer_fwd_bwd_us": {}, "single_launch_us": {}}
    for group, cases in (
        ("layer_fwd_bwd_us", layer_cases(args.tokens, args.width, args.rank)),
        ("single_launch_us", launch_cases(args.width, args.rank)),
    ):
        for name, fn in cases.items():
            results[group][name] = per_call_us(fn, args.calls, args.repeats)
            LOG.info("%-60s %8.1f µs", name, results[group][name])
    fused.TRITON_KERNELS = frozenset(fused.TRITON_KERNEL_NAMES)
    results["env"] = {
        "gpu": torch.cuda.get_device_name(),
        "cpu": platform.processor() or platform.machine(),
        "torch": torch.__version__,
        "settings": vars(args),
    }
    atomic_write_json(Path(args.out), results)
    LOG.info("%s", json.dumps(results["env"]))


if __name__ == "__main__":
    main()
