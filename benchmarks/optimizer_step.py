"""The optimizer's share of a LoRA step: AdamW over the throughput model's adapter factors.

``throughput.py`` steps ``torch.optim.AdamW`` over every trainable tensor (for lorakit: the float32 master
factors A and B of 7 projections × 16 layers, 224 tensors, 11.3M values; with frozen A, the 112 B's). This
times that step alone, for torch's implementations: ``foreach`` (the default on CUDA, several kernels per
group of tensors) and ``fused`` (one kernel per group), for float32 factors (lorakit) and bf16 ones
(PEFT with ``autocast_adapter_dtype=False``). Two times per step: GPU kernel time (``torch.profiler``) and
the wall time of a step with the GPU waiting (CUDA-synchronised). Needs a CUDA GPU.

    PYTHONPATH=src python benchmarks/optimizer_step.py --out out/optimizer_step.json
"""

from __future__ import annotations

import argparse
import logging
import statistics
import time
from dataclasses import asdict
from pathlib import Path

import torch
from throughput import Spec

from lorakit.utils import atomic_write_json

logger = logging.getLogger("optimizer_step")
ITERS = 30


def factor_shapes(spec: Spec, train_a: bool = True) -> list[tuple[int, int]]:
    """(rows, columns) of every trainable factor of the throughput model: A is r × in, B is out × r."""
    hidden, mlp, kv = spec.hidden, spec.intermediate, spec.hidden * spec.kv_heads // spec.heads
    # (in, out) of q, k, v, o, gate, up, down
    projections = [
        (hidden, hidden),
        (hidden, kv),
        (hidden, kv),
        (hidden, hidden),
        (hidden, mlp),
        (hidden, mlp),
    ]
    projections.append((mlp, hidden))
    shapes = []
    for _ in range(spec.layers):
        for in_f, out_f in projections:
            if train_a:
                shapes.append((spec.rank, in_f))
            shapes.append((out_f, spec.rank))
    return shapes


def time_step(shapes: list[tuple[int, int]], dtype: torch.dtype, impl: str) -> dict:
    params = [torch.nn.Parameter(torch.randn(s, device="cuda", dtype=dtype) * 0.01) for s in shapes]
    opt = torch.optim.AdamW(params, lr=1e-4, **{impl: True})

    def step() -> None:
        for p in params:
            p.grad = torch.randn_like(p) * 1e-3
        opt.step()

    for _ in range(3):  # optimizer state, warm caches
        step()
    torch.cuda.synchronize()
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(ITERS):
            opt.step()
        torch.cuda.synchronize()
    gpu_us = sum(e.self_device_time_total for e in prof.key_averages() if e.self_device_time_total > 0)
    walls = []
    for _ in range(ITERS):
        torch.cuda.synchronize()
        start = time.perf_counter()
        opt.step()
        torch.cuda.synchronize()
        walls.append(time.perf_counter() - start)
    return {
        "dtype": str(dtype),
        "impl": impl,
        "tensors": len(params),
        "values": sum(p.numel() for p in params),
        "gpu_ms": gpu_us / 1e3 / ITERS,
        "wall_ms": statistics.median(walls) * 1e3,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--out", type=Path, default=Path("out/optimizer_step.json"), help="JSON of the timings"
    )
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    if not torch.cuda.is_available():
        raise SystemExit("optimizer_step.py needs a CUDA GPU")
    spec = Spec()
    rows = []
    for train_a in (True, False):
        for dtype in (torch.float32, torch.bfloat16):
            for impl in ("foreach", "fused"):
                row = {
                    "train": "AB" if train_a else "B",
                    **time_step(factor_shapes(spec, train_a), dtype, impl),
                }
                logger.info("%s", row)
                rows.append(row)
    atomic_write_json(args.out, {"spec": asdict(spec), "rows": rows})
    print("| train | factors | AdamW | tensors | GPU ms/step | wall ms/step |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        times = f"{r['gpu_ms']:.3f} | {r['wall_ms']:.3f}"
        print(f"| {r['train']} | {r['dtype']} | {r['impl']} | {r['tensors']} | {times} |")


if __name__ == "__main__":
    main()
