"""The backward of ``x = a * b`` followed by a LoRA layer (``fused.RECOMPUTE_PRODUCT_INPUT``):
``triton_lora.product_backward``.

At the down projection of the default model (T tokens × 8192 inputs, r = 16, bf16) this times
(``do_bench`` median, L2 flushed):

* ``kept``: what runs where the layer keeps x: torch's multiplication backward (``dx * b``, ``dx * a``)
  and dA = Gᵀ x by one cuBLAS GEMM writing float32;
* ``torch``: the same from the factors, the product formed again by torch (the path off the GPU kernel);
* ``product_backward`` at each configuration (BLOCK_M, BLOCK_N, warps, stages, ROWS): one pass over dx,
  a and b for both input gradients and dA.

Every configuration is first checked: the input gradients bit for bit against torch's, dA against float64
(rel. err ≤ 1e-3). The bandwidth counts the kernel's bytes: three reads and two writes of T × 8192.

    PYTHONPATH=src python benchmarks/product_backward.py --out out/product_backward.json
"""

from __future__ import annotations

import logging

import torch
from kernel_bench import bench_ms, environment, per_step_parser, rel_err, start

from lorakit.adapters import triton_lora
from lorakit.utils import atomic_write_json

logger = logging.getLogger("product_backward")
RANK, WIDTH = 16, 8192
CONFIGS = [
    triton_lora.PRODUCT_BACKWARD_CONFIG,
    (64, 128, 4, 3, 1024),
    (64, 128, 4, 3, 512),
    (64, 128, 4, 3, 2048),
    (32, 128, 4, 3, 1024),
    (64, 64, 4, 3, 1024),
    (64, 256, 8, 3, 1024),
    (32, 256, 4, 3, 1024),
]


def main() -> None:
    args = per_step_parser(__doc__, "out/product_backward.json").parse_args()
    start(
        "product_backward.py", "a CUDA GPU with Triton", torch.cuda.is_available() and triton_lora.AVAILABLE
    )
    a, b, dx = (torch.randn(args.tokens, WIDTH, device="cuda", dtype=torch.bfloat16) for _ in "abd")
    g = torch.randn(args.tokens, RANK, device="cuda", dtype=torch.bfloat16)
    x = a * b
    want = g.double().t() @ x.double()

    def kept() -> tuple:
        return dx * b, dx * a, torch.mm(g.t(), x, out_dtype=torch.float32)

    def from_factors() -> tuple:
        return dx * b, dx * a, torch.mm(g.t(), a * b, out_dtype=torch.float32)

    row = {"kept_ms": bench_ms(kept, 200), "torch_ms": bench_ms(from_factors, 200)}
    for config in CONFIGS:
        d_a, d_b, d_lora = triton_lora.product_backward(dx, a, b, g, config)
        if not (torch.equal(d_a, dx * b) and torch.equal(d_b, dx * a)):
            raise SystemExit(f"product_backward {config}: input gradients differ from torch's")
        if rel_err(d_lora, want) > 1e-3:
            raise SystemExit(
                f"product_backward {config}: dA rel. err {rel_err(d_lora, want):.2e} against float64"
            )
        row["x".join(map(str, config)) + "_ms"] = bench_ms(
            lambda c=config: triton_lora.product_backward(dx, a, b, g, c), 200
        )
    others = ("kept_ms", "torch_ms")
    best = min((k for k in row if k not in others), key=row.get)
    logger.info(
        "kept x: muls + GEMM %.1f µs; torch from the factors %.1f µs; product_backward: %s; best %s at "
        "%.2f TB/s",
        row["kept_ms"] * 1e3, row["torch_ms"] * 1e3,
        ", ".join(f"{k[:-3]} {v * 1e3:.1f}" for k, v in row.items() if k not in others),
        best[:-3], 5 * 2 * x.numel() / row[best] / 1e9,
    )  # fmt: skip
    per_step = {k: args.layers * v for k, v in row.items()}
    logger.info("per step (ms): %s", {k: round(v, 2) for k, v in per_step.items()})
    atomic_write_json(args.out, {"env": environment(vars(args)), "shape": row, "per_step_ms": per_step})


if __name__ == "__main__":
    main()
