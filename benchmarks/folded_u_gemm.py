"""Would folding ``u = x·(sA)ᵀ`` into the base GEMM pay? cuBLAS timings per projection shape.

The merged strategy (``lorakit.adapters.fused``) runs the base GEMM ``y = x·W'ᵀ`` (``W' = W0 + s·B A``) and a
second, skinny GEMM ``u = x·(sA)ᵀ`` that reads the T×in input ``x`` again. Both could come from one GEMM over
the stacked weight ``[W'; sA]`` ((out + r) × in; the merge kernel could write ``sA`` under ``W'`` at no extra
cost), whose T×(out + r) output holds ``y`` in its first ``out`` columns and ``u`` in the last ``r``. Then
``y`` is a strided view, row stride out + r: a consumer that needs it contiguous pays a copy.

For each (in, out) of the default throughput model at T tokens, this times (CUDA events, best of 3 runs of
``--iters`` calls): ``base`` (the base GEMM alone), ``separate`` (base + the u GEMM, as now), ``stacked`` (one
GEMM over ``[W'; sA]``) and ``stacked+copy`` (the same, then ``y`` made contiguous); it checks that the
stacked GEMM's ``y`` equals the base GEMM's. Totals are per step of the 16-layer model (forward only).

    PYTHONPATH=src python benchmarks/folded_u_gemm.py --out out/folded_u.json
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

import torch
import torch.nn.functional as F
from kernel_bench import PROJECTIONS

from lorakit.utils import atomic_write_json

logger = logging.getLogger("folded_u_gemm")

VARIANTS = ("base", "separate", "stacked", "stacked+copy")


def time_us(fn, iters: int) -> float:
    """Best of three runs of ``iters`` calls, µs per call, after five warm-up calls."""
    for _ in range(5):
        fn()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    best = float("inf")
    for _ in range(3):
        start.record()
        for _ in range(iters):
            fn()
        end.record()
        torch.cuda.synchronize()
        best = min(best, start.elapsed_time(end) * 1000.0 / iters)
    return best


def measure(in_f: int, out_f: int, tokens: int, rank: int, iters: int) -> dict[str, float]:
    x = torch.randn(tokens, in_f, device="cuda", dtype=torch.bfloat16)
    weight = torch.randn(out_f, in_f, device="cuda", dtype=torch.bfloat16) / in_f**0.5
    a_s = torch.randn(rank, in_f, device="cuda", dtype=torch.bfloat16) / in_f**0.5
    stacked = torch.cat([weight, a_s]).contiguous()
    y, y_stacked = F.linear(x, weight), F.linear(x, stacked)[:, :out_f]
    error = ((y.float() - y_stacked.float()).abs().max() / y.float().abs().max()).item()
    if error > 1e-2:
        raise RuntimeError(
            f"stacked GEMM disagrees with the base GEMM at (in, out) = ({in_f}, {out_f}): {error:.2e}"
        )
    fns = {
        "base": lambda: F.linear(x, weight),
        "separate": lambda: (F.linear(x, weight), x @ a_s.t()),
        "stacked": lambda: F.linear(x, stacked),
        "stacked+copy": lambda: F.linear(x, stacked)[:, :out_f].contiguous(),
    }
    return {"rel_err": error, **{name: time_us(fn, iters) for name, fn in fns.items()}}


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--tokens", type=int, default=8192, help="rows T of x (8192)")
    parser.add_argument("--rank", type=int, default=16, help="LoRA rank r (16)")
    parser.add_argument("--layers", type=int, default=16, help="layers the per-step totals count (16)")
    parser.add_argument("--iters", type=int, default=50, help="calls per timed run (50)")
    parser.add_argument("--out", type=Path, default=Path("out/folded_u.json"), help="JSON results path")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if not torch.cuda.is_available():
        parser.error("needs a CUDA GPU")
    rows = {}
    for name, (in_f, out_f) in PROJECTIONS.items():
        rows[name] = row = measure(in_f, out_f, args.tokens, args.rank, args.iters)
        logger.info(
            "%-5s (in %5d, out %5d): %s µs; u costs %.1f, stacking %.1f",
            name,
            in_f,
            out_f,
            ", ".join(f"{v} {row[v]:.1f}" for v in VARIANTS),
            row["separate"] - row["base"],
            row["stacked"] - row["base"],
        )
    totals = {v: args.layers * sum(row[v] for row in rows.values()) / 1000.0 for v in VARIANTS}
    # Per projection, the cheaper of separate and stacked: what a shape rule could get.
    totals["best_of_both"] = (
        args.layers * sum(min(r["separate"], r["stacked"]) for r in rows.values()) / 1000.0
    )
    logger.info(
        "per step (%d layers, forward), ms: %s", args.layers, {k: round(v, 2) for k, v in totals.items()}
    )
    result = {
        "gpu": torch.cuda.get_device_name(),
        "torch": torch.__version__,
        "tokens": args.tokens,
        "rank": args.rank,
        "layers": args.layers,
        "projections_us": rows,
        "per_step_ms": totals,
    }
    atomic_write_json(args.out, result)
    logger.info("wrote %s", args.out)


if __name__ == "__main__":
    main()
