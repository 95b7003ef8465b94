"""How close does a Triton GEMM come to cuBLAS at the base GEMM shapes of the throughput model?

Closing the last gap of the fused LoRA path (benchmarks/RESULTS.md) needs the rank-r terms folded into the
base GEMMs themselves: a GEMM kernel of our own (e.g. Triton) with an extra K = r slice and a LoRA epilogue.
That only pays if such a kernel runs the base GEMM nearly as fast as cuBLAS. This script measures the
headroom with what torch already ships: for each forward (``y = x Wᵀ``) and input-gradient (``dX = dY W``)
GEMM of the default throughput model, it times cuBLAS against the fastest of Inductor's Triton matmul
templates (``torch.compile(mode="max-autotune-no-cudagraphs")`` with ``max_autotune_gemm_backends="TRITON"``),
once with Inductor's default templates and once with its persistent TMA template enabled
(``triton.enable_persistent_tma_matmul``; Hopper). It refuses a run where Inductor fell back to cuBLAS,
records the chosen template's block sizes and keeps its generated code (beside ``--out``), checks that
both give the same product, and reports Triton's time as a multiple of cuBLAS's. Needs a CUDA GPU.

    PYTHONPATH=src python benchmarks/triton_gemm_headroom.py --out out/triton_gemm.json
"""

from __future__ import annotations

import logging
import re
from pathlib import Path

import torch
from kernel_bench import bench_ms, distinct_shapes, environment, per_step_parser, start

from lorakit.utils import atomic_write_json

logger = logging.getLogger("triton_gemm_headroom")
REP_MS = 200  # do_bench time budget per measurement

#: Inductor settings of each template set timed against cuBLAS
TEMPLATE_SETS = {
    "default": {"max_autotune_gemm_backends": "TRITON"},
    "persistent-tma": {"max_autotune_gemm_backends": "TRITON", "triton.enable_persistent_tma_matmul": True},
}
#: the template's settings in Inductor's generated code: "BLOCK_M : tl.constexpr = 128", "num_warps=8"
_SETTING = re.compile(
    r"\b(BLOCK_[MNK]|GROUP_M|NUM_SMS|num_stages|num_warps)\s*(?::\s*tl\.constexpr\s*)?=\s*(\d+)"
)


def forward_gemm(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    return x @ w.t()


def input_grad_gemm(g: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    return g @ w


def time_triton_only(
    fn, act: torch.Tensor, w: torch.Tensor, settings: dict
) -> tuple[float, torch.Tensor, dict]:
    """``fn`` compiled so that Inductor autotunes its matmul over Triton templates only, then timed.

    Returns the time per call (ms), the output and the chosen template's block sizes, stages and warps as
    read from the generated code. Raises if the generated code calls cuBLAS (``extern_kernels.mm``).
    """
    import torch._inductor.config as inductor_config
    from torch._inductor.utils import run_and_get_code

    torch._dynamo.reset()
    with inductor_config.patch({**settings, "fx_graph_cache": False}):  # generate the code, not a cache hit
        compiled = torch.compile(fn, mode="max-autotune-no-cudagraphs", dynamic=False)
        out, sources = run_and_get_code(compiled, act, w)
        code = "\n".join(sources)
        if "extern_kernels.mm" in code:
            raise SystemExit(f"{fn.__name__} {tuple(act.shape)}: Inductor picked cuBLAS under {settings}")
        ms = bench_ms(lambda: compiled(act, w), REP_MS)
    chosen: dict[str, int] = {}
    for name, value in _SETTING.findall(code):
        chosen.setdefault(name, int(value))
    return ms, out, chosen, code


def measure(tokens: int, in_f: int, out_f: int, code_dir: Path) -> dict:
    dev, dt = "cuda", torch.bfloat16
    w = torch.randn(out_f, in_f, device=dev, dtype=dt) / in_f**0.5
    cases = {
        "forward": (forward_gemm, torch.randn(tokens, in_f, device=dev, dtype=dt)),
        "input_grad": (input_grad_gemm, torch.randn(tokens, out_f, device=dev, dtype=dt)),
    }
    row = {}
    for name, (fn, act) in cases.items():
        ref = fn(act, w)
        cublas = bench_ms(lambda fn=fn, a=act: fn(a, w), REP_MS)
        row[name] = {"cublas_ms": cublas, "cublas_tflops": 2 * tokens * in_f * out_f / cublas / 1e9}
        for label, settings in TEMPLATE_SETS.items():
            ms, got, chosen, code = time_triton_only(fn, act, w, settings)
            code_dir.mkdir(parents=True, exist_ok=True)
            (code_dir / f"{in_f}x{out_f}_{name}_{label}.py").write_text(code)
            rel = float((got.float() - ref.float()).norm() / ref.float().norm())
            if rel > 1e-2:
                raise SystemExit(
                    f"{name} {in_f}→{out_f} {label}: Triton differs from cuBLAS (rel. err {rel:.2e})"
                )
            row[name][label] = {"ms": ms, "over_cublas": ms / cublas, "rel_err": rel, "template": chosen}
            logger.info(
                "%5d→%-5d %-10s %-14s cuBLAS %.4f ms  Triton %.4f ms (× %.3f) %s",
                in_f, out_f, name, label, cublas, ms, ms / cublas, chosen,
            )  # fmt: skip
    return row


def main() -> None:
    args = per_step_parser(__doc__, "out/triton_gemm.json").parse_args()
    start("triton_gemm_headroom.py", "a CUDA GPU", torch.cuda.is_available())
    rows = {}
    totals = {key: 0.0 for key in ("cublas", *TEMPLATE_SETS)}
    for name, ((in_f, out_f), count) in distinct_shapes().items():
        rows[name] = measure(args.tokens, in_f, out_f, args.out.with_name(args.out.stem + "_code"))
        for case in rows[name].values():
            totals["cublas"] += case["cublas_ms"] * count * args.layers
            for label in TEMPLATE_SETS:
                totals[label] += case[label]["ms"] * count * args.layers
    per_step = {"ms": totals, "over_cublas": {k: totals[k] / totals["cublas"] for k in TEMPLATE_SETS}}
    logger.info("base GEMMs per step of %d layers: %s", args.layers, per_step)
    atomic_write_json(args.out, {"env": environment(vars(args)), "projections": rows, "per_step": per_step})


if __name__ == "__main__":
    main()
