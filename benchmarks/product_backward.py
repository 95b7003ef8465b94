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

With ``--silu`` the same for ``x = silu(a) * b`` (``fused.lora_gated_linear``, a the gate before its
activation): ``kept`` is then torch's SiLU and multiplication backward with the GEMM, ``compiled`` the same
under ``torch.compile`` (one fused Inductor kernel for both input gradients, as a compiled model without the
gated route runs it), and each configuration is checked against float64 (input gradients rel. err ≤ 1e-2,
dA ≤ 2e-3).

    PYTHONPATH=src python benchmarks/product_backward.py --out out/product_backward.json
    PYTHONPATH=src python benchmarks/product_backward.py --silu --out out/product_backward_silu.json
"""

from __future__ import annotations

import logging

import torch
import torch.nn.functional as F
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
SILU_CONFIGS = [
    triton_lora.PRODUCT_BACKWARD_SILU_CONFIG,  # (64, 128, 8, 3, 1024)
    (128, 128, 8, 3, 1024),
    (64, 128, 4, 3, 1024),
    (32, 128, 4, 3, 1024),
    (64, 64, 4, 3, 1024),
    (32, 256, 8, 3, 1024),
    (64, 128, 8, 2, 1024),
]


def time_configs(configs: list, dx, a, b, g, silu: bool, check) -> dict:
    """``{config_ms: time}`` of ``product_backward`` at each configuration, after ``check(config, outputs)``
    (which exits on a wrong result)."""
    row = {}
    for config in configs:
        check(config, triton_lora.product_backward(dx, a, b, g, config, silu))
        row["x".join(map(str, config)) + "_ms"] = bench_ms(
            lambda c=config: triton_lora.product_backward(dx, a, b, g, c, silu), 200
        )
    return row


def silu_main(a, b, dx, g) -> dict:
    """Times and checks of ``x = silu(a) * b`` (``--silu``)."""
    a64, b64, dx64 = a.double(), b.double(), dx.double()
    sig = torch.sigmoid(a64)
    wants = (dx64 * b64 * sig * (1 + a64 * (1 - sig)), dx64 * a64 * sig, g.double().t() @ (a64 * sig * b64))
    x = F.silu(a) * b

    def kept() -> tuple:
        act = F.silu(a)
        grads = torch.ops.aten.silu_backward(dx * b, a), dx * act
        return *grads, torch.mm(g.t(), x, out_dtype=torch.float32)

    input_grads = torch.compile(lambda: (torch.ops.aten.silu_backward(dx * b, a), dx * F.silu(a)))

    def compiled() -> tuple:
        return *input_grads(), torch.mm(g.t(), x, out_dtype=torch.float32)

    def check(config, got) -> None:
        errors = [rel_err(t, want) for t, want in zip(got, wants, strict=True)]
        if max(errors[:2]) > 1e-2 or errors[2] > 2e-3:
            raise SystemExit(f"product_backward {config} (silu): rel. errors {errors} against float64")

    row = {"kept_ms": bench_ms(kept, 200), "compiled_ms": bench_ms(compiled, 200)}
    return row | time_configs(SILU_CONFIGS, dx, a, b, g, True, check)


def plain_main(a, b, dx, g) -> dict:
    """Times and checks of ``x = a * b``."""
    x = a * b
    want = g.double().t() @ x.double()

    def kept() -> tuple:
        return dx * b, dx * a, torch.mm(g.t(), x, out_dtype=torch.float32)

    def from_factors() -> tuple:
        return dx * b, dx * a, torch.mm(g.t(), a * b, out_dtype=torch.float32)

    def check(config, got) -> None:
        d_a, d_b, d_lora = got
        if not (torch.equal(d_a, dx * b) and torch.equal(d_b, dx * a)):
            raise SystemExit(f"product_backward {config}: input gradients differ from torch's")
        if rel_err(d_lora, want) > 1e-3:
            raise SystemExit(
                f"product_backward {config}: dA rel. err {rel_err(d_lora, want):.2e} against float64"
            )

    row = {"kept_ms": bench_ms(kept, 200), "torch_ms": bench_ms(from_factors, 200)}
    return row | time_configs(CONFIGS, dx, a, b, g, False, check)


def main() -> None:
    parser = per_step_parser(__doc__, "out/product_backward.json")
    parser.add_argument("--silu", action="store_true", help="x = silu(a) * b (the gated route)")
    args = parser.parse_args()
    start(
        "product_backward.py", "a CUDA GPU with Triton", torch.cuda.is_available() and triton_lora.AVAILABLE
    )
    a, b, dx = (torch.randn(args.tokens, WIDTH, device="cuda", dtype=torch.bfloat16) for _ in "abd")
    g = torch.randn(args.tokens, RANK, device="cuda", dtype=torch.bfloat16)
    row = silu_main(a, b, dx, g) if args.silu else plain_main(a, b, dx, g)
    others = ("kept_ms", "torch_ms", "compiled_ms")
    best = min((k for k in row if k not in others), key=row.get)
    logger.info(
        "%s; product_backward: %s; best %s at %.2f TB/s",
        ", ".join(f"{k[:-3]} {row[k] * 1e3:.1f} µs" for k in others if k in row),
        ", ".join(f"{k[:-3]} {v * 1e3:.1f}" for k, v in row.items() if k not in others),
        best[:-3], 5 * 2 * a.numel() / row[best] / 1e9,
    )  # fmt: skip
    per_step = {k: args.layers * v for k, v in row.items()}
    logger.info("per step (ms): %s", {k: round(v, 2) for k, v in per_step.items()})
    atomic_write_json(
        args.out, {"env": environment(vars(args)), "silu": args.silu, "shape": row, "per_step_ms": per_step}
    )


if __name__ == "__main__":
    main()
