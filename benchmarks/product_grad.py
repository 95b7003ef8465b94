"""dA of a layer whose input is a product (``fused.RECOMPUTE_PRODUCT_INPUT``): ``triton_lora.product_grad``.

At the down projection of the default model (T tokens × 8192 inputs, r = 16, bf16) this times
(``do_bench`` median, L2 flushed):

* ``kept``: ``Gᵀ x`` on the kept input x, one cuBLAS GEMM writing float32 (the path without the option);
* ``torch``: ``Gᵀ (a * b)``, the product formed again by torch, then that GEMM (the path off the GPU kernel);
* ``product_grad`` at each configuration (BLOCK_M, BLOCK_N, warps, stages, ROWS), reading a and b once.

Every configuration is first checked against float64 (rel. err ≤ 1e-3). The bandwidth counts the bytes
each path must read: x once (kept), a and b once (product_grad).

    PYTHONPATH=src python benchmarks/product_grad.py --out out/product_grad.json
"""

from __future__ import annotations

import logging

import torch
from kernel_bench import bench_ms, environment, per_step_parser, rel_err, start

from lorakit.adapters import triton_lora
from lorakit.utils import atomic_write_json

logger = logging.getLogger("product_grad")
RANK, WIDTH = 16, 8192
CONFIGS = [
    triton_lora.PRODUCT_GRAD_CONFIG,
    (64, 128, 4, 3, 512),
    (64, 128, 4, 3, 2048),
    (64, 128, 4, 4, 1024),
    (128, 128, 8, 3, 1024),
    (64, 256, 8, 3, 1024),
    (32, 128, 4, 4, 1024),
    (128, 64, 4, 3, 1024),
]


def main() -> None:
    args = per_step_parser(__doc__, "out/product_grad.json").parse_args()
    start("product_grad.py", "a CUDA GPU with Triton", torch.cuda.is_available() and triton_lora.AVAILABLE)
    a, b = (torch.randn(args.tokens, WIDTH, device="cuda", dtype=torch.bfloat16) for _ in "ab")
    g = torch.randn(args.tokens, RANK, device="cuda", dtype=torch.bfloat16)
    x = a * b
    want = g.double().t() @ x.double()
    row = {
        "kept_ms": bench_ms(lambda: torch.mm(g.t(), x, out_dtype=torch.float32), 200),
        "torch_ms": bench_ms(lambda: torch.mm(g.t(), a * b, out_dtype=torch.float32), 200),
    }
    for config in CONFIGS:
        error = rel_err(triton_lora.product_grad(g, a, b, config), want)
        if error > 1e-3:
            raise SystemExit(f"product_grad {config}: rel. err {error:.2e} against float64")
        row["x".join(map(str, config)) + "_ms"] = bench_ms(
            lambda c=config: triton_lora.product_grad(g, a, b, c), 200
        )
    x_bytes = 2 * x.numel()
    best = min((k for k in row if k not in ("kept_ms", "torch_ms")), key=row.get)
    logger.info(
        "kept x %.1f µs (%.2f TB/s); torch product + GEMM %.1f µs; product_grad: %s; best %s at %.2f TB/s",
        row["kept_ms"] * 1e3, x_bytes / row["kept_ms"] / 1e9, row["torch_ms"] * 1e3,
        ", ".join(f"{k[:-3]} {v * 1e3:.1f}" for k, v in row.items() if k not in ("kept_ms", "torch_ms")),
        best[:-3], 2 * x_bytes / row[best] / 1e9,
    )  # fmt: skip
    per_step = {k: args.layers * v for k, v in row.items()}
    logger.info("per step (ms): %s", {k: round(v, 2) for k, v in per_step.items()})
    atomic_write_json(args.out, {"env": environment(vars(args)), "shape": row, "per_step_ms": per_step})


if __name__ == "__main__":
    main()
