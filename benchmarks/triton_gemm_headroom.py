"""How close does a Triton GEMM come to cuBLAS at the base GEMM shapes of the throughput model?

Closing the last gap of the fused LoRA path (benchmarks/RESULTS.md) needs the rank-r terms folded into the
base GEMMs themselves: a GEMM kernel of our own (e.g. Triton) with an extra K = r slice and a LoRA epilogue.
That only pays if such a kernel runs the base GEMM about as fast as cuBLAS. This script measures the
headroom with what torch already ships: for each forward (``y = x Wᵀ``) and input-gradient (``dX = dY W``)
GEMM of the default throughput model, it times cuBLAS against the fastest of Inductor's Triton matmul
templates (``torch.compile(mode="max-autotune-no-cudagraphs")`` with only the Triton backend), checks that
both give the same product, and reports Triton's time as a multiple of cuBLAS's. Needs a CUDA GPU.

    PYTHONPATH=src python benchmarks/triton_gemm_headroom.py --out out/triton_gemm.json
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

import torch

from lorakit.utils import atomic_write_json

logger = logging.getLogger("triton_gemm_headroom")

#: (in, out) and count per decoder layer of the default throughput model (benchmarks/throughput.py)
PROJECTIONS = {
    "q/o": ((2048, 2048), 2),
    "k/v": ((2048, 512), 2),
    "gate/up": ((2048, 8192), 2),
    "down": ((8192, 2048), 1),
}


def bench_ms(fn) -> float:
    from triton.testing import do_bench

    return float(do_bench(fn, rep=200, return_mode="median"))


def forward_gemm(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    return x @ w.t()


def input_grad_gemm(g: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    return g @ w


def triton_only(fn):
    """``fn`` compiled so that Inductor autotunes its matmul over Triton templates only (no cuBLAS)."""
    import torch._inductor.config as inductor_config

    inductor_config.max_autotune_gemm_backends = "TRITON"
    torch._dynamo.reset()
    return torch.compile(fn, mode="max-autotune-no-cudagraphs", dynamic=False)


def measure(tokens: int, in_f: int, out_f: int) -> dict:
    dev, dt = "cuda", torch.bfloat16
    w = torch.randn(out_f, in_f, device=dev, dtype=dt) / in_f**0.5
    cases = {
        "forward": (forward_gemm, torch.randn(tokens, in_f, device=dev, dtype=dt)),
        "input_grad": (input_grad_gemm, torch.randn(tokens, out_f, device=dev, dtype=dt)),
    }
    row = {}
    for name, (fn, act) in cases.items():
        compiled = triton_only(fn)
        ref, got = fn(act, w), compiled(act, w)
        rel = float((got.float() - ref.float()).norm() / ref.float().norm())
        if rel > 1e-2:
            raise SystemExit(f"{name} {in_f}→{out_f}: Triton GEMM differs from cuBLAS (rel. err {rel:.2e})")
        cublas, triton = bench_ms(lambda fn=fn, a=act: fn(a, w)), bench_ms(lambda c=compiled, a=act: c(a, w))
        flops = 2 * tokens * in_f * out_f
        row[name] = {
            "cublas_ms": cublas,
            "triton_ms": triton,
            "triton_over_cublas": triton / cublas,
            "cublas_tflops": flops / cublas / 1e9,
            "rel_err": rel,
        }
        logger.info(
            "%5d→%-5d %-10s cuBLAS %.4f ms  Triton %.4f ms  (× %.3f)",
            in_f,
            out_f,
            name,
            cublas,
            triton,
            triton / cublas,
        )
    return row


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--tokens", type=int, default=8192, help="rows T of the activations (8192)")
    parser.add_argument("--layers", type=int, default=16, help="decoder layers, for the per-step totals")
    parser.add_argument("--out", type=Path, default=Path("out/triton_gemm.json"), help="JSON path")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if not torch.cuda.is_available():
        raise SystemExit("triton_gemm_headroom.py needs a CUDA GPU")
    warm = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    bench_ms(lambda: warm @ warm)  # steady clocks before the first shape
    rows, totals = {}, {"cublas_ms": 0.0, "triton_ms": 0.0}
    for name, ((in_f, out_f), count) in PROJECTIONS.items():
        rows[name] = measure(args.tokens, in_f, out_f)
        for case in rows[name].values():
            for key in totals:
                totals[key] += case[key] * count * args.layers
    totals["triton_over_cublas"] = totals["triton_ms"] / totals["cublas_ms"]
    logger.info(
        "base GEMMs per step of %d layers: %s", args.layers, {k: round(v, 3) for k, v in totals.items()}
    )
    env = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "settings": vars(args)}
    atomic_write_json(args.out, {"env": env, "projections": rows, "per_step": totals})


if __name__ == "__main__":
    main()
