"""The folded LoRA GEMM against what it replaces, per projection shape of the throughput model (H100).

The fused path's ``"merged"`` strategy (``lorakit.adapters.fused``) builds ``W = W0 + s·B A`` with the
Triton merge kernel and runs cuBLAS on it, in forward (``y = x Wᵀ``) and again for the input gradient
(``dX = dY W``). The ``"folded"`` strategy runs one Triton GEMM with the LoRA slice in its reduction
(``lorakit.adapters.triton_gemm``: ``y = x W0ᵀ + u Bᵀ``, ``dX = dY W0 + G A``) and builds no merged weight.
For each base GEMM of the default model (T tokens, r = 16) this times, with ``triton.testing.do_bench``
(L2 flushed, median):

* ``cublas``: the base GEMM alone (the floor neither strategy can beat without beating cuBLAS);
* ``merged``: the merge kernel plus cuBLAS on the merged weight, as the merged strategy runs it;
* ``folded``: the folded kernel at each block configuration of ``CONFIGS``, and at the library's choice
  (``triton_gemm.config_for``).

Each folded configuration is first checked against the float64 product (bf16 rel. err ≤ 1e-2); one that
disagrees is not timed and the run fails. The totals are per step of the 16-layer model; ``auto`` is what
``strategy="auto"`` runs with ``fused.FOLDED_GEMM`` set (merged where the projection is too narrow). Timings
of one configuration repeated within 2–5% per GEMM on the H100. Needs a Hopper GPU.

    PYTHONPATH=src python benchmarks/folded_gemm.py --out out/folded_gemm.json
"""

from __future__ import annotations

import logging
from functools import partial

import torch
from kernel_bench import bench_ms, distinct_shapes, environment, per_step_parser, rel_err, start

from lorakit.adapters import fused, triton_gemm
from lorakit.adapters.triton_gemm import GemmConfig
from lorakit.utils import atomic_write_json

logger = logging.getLogger("folded_gemm")
REP_MS = 100
RANK = 16
SCALE = 2.0
#: launch configurations tried at every shape
CONFIGS = [
    GemmConfig(128, 256, stages=3),
    GemmConfig(128, 256, stages=4, split_store=True),
    GemmConfig(128, 256, stages=3, flatten=True),
    GemmConfig(128, 256, stages=4, flatten=True, split_store=True),
    GemmConfig(128, 256, stages=3, flatten=True, warp_specialize=True),
    GemmConfig(256, 128, stages=3),
    GemmConfig(256, 128, stages=4, split_store=True),
    GemmConfig(256, 128, stages=4, flatten=True, split_store=True),
    GemmConfig(128, 128, stages=4),
    GemmConfig(128, 128, warps=4, stages=4, flatten=True),
    GemmConfig(128, 128, stages=5, flatten=True, split_store=True),
    GemmConfig(64, 256, warps=4, stages=4),
    GemmConfig(128, 64, warps=4, stages=4),
]
TOLERANCE = 1e-2


def cases(tokens: int, in_f: int, out_f: int) -> dict:
    """The forward and input-gradient GEMM of one projection: operands, reference and the two baselines."""
    dev, dt = "cuda", torch.bfloat16
    w = torch.randn(out_f, in_f, device=dev, dtype=dt) / in_f**0.5
    lora_a = torch.randn(RANK, in_f, device=dev) / in_f**0.5
    lora_b = torch.randn(out_f, RANK, device=dev) * 0.1
    x = torch.randn(tokens, in_f, device=dev, dtype=dt)
    g = torch.randn(tokens, out_f, device=dev, dtype=dt)
    u = x @ (lora_a * SCALE).to(dt).t()
    gb = g @ (lora_b * SCALE).to(dt)
    b_c, a_c = lora_b.to(dt), lora_a.to(dt)

    def merged_weight() -> torch.Tensor:
        return fused._merge(w, lora_a, lora_b, SCALE, False)[0]

    return {
        "forward": {
            "operands": (x, w, u, b_c, False, False),
            "reference": x.double() @ w.double().t() + u.double() @ b_c.double().t(),
            "cublas": lambda: x @ w.t(),
            "merged": lambda: x @ merged_weight().t(),
        },
        "input_grad": {
            "operands": (g, w, gb, a_c, True, True),
            "reference": g.double() @ w.double() + gb.double() @ a_c.double(),
            "cublas": lambda: g @ w,
            "merged": lambda: g @ merged_weight(),
        },
    }


def measure(tokens: int, in_f: int, out_f: int) -> dict:
    row = {}
    for name, case in cases(tokens, in_f, out_f).items():
        a, b, u, v, b_kn, v_rn = case["operands"]
        merged_err = rel_err(case["merged"](), case["reference"])
        result = {
            "cublas_ms": bench_ms(case["cublas"], REP_MS),
            "merged_ms": bench_ms(case["merged"], REP_MS),
            "merged_rel_err": merged_err,
            "configs": [],
        }
        library = triton_gemm.config_for(b_kn)
        for config in [None, *(c for c in CONFIGS if c != library)]:  # None: the library's, timed once
            label = (config or library)._asdict()
            try:
                err = rel_err(triton_gemm.launch(a, b, u, v, None, b_kn, v_rn, config), case["reference"])
            except Exception as exc:  # e.g. Triton's OutOfResources: the config cannot run here
                logger.info("%5d→%-5d %-10s %s: %s", in_f, out_f, name, label, repr(exc)[:300])
                result["configs"].append(
                    {"config": label, "default": config is None, "error": repr(exc)[:200]}
                )
                continue
            if not err <= TOLERANCE:  # NaN fails too
                raise SystemExit(
                    f"{in_f}→{out_f} {name} {label}: folded GEMM rel. err {err:.2e} > {TOLERANCE}"
                )
            ms = bench_ms(partial(triton_gemm.launch, a, b, u, v, None, b_kn, v_rn, config), REP_MS)
            result["configs"].append({"config": label, "default": config is None, "ms": ms, "rel_err": err})
        timed = [c for c in result["configs"] if "ms" in c]
        if not timed:
            raise SystemExit(f"{in_f}→{out_f} {name}: no configuration of the folded GEMM ran")
        best = min(timed, key=lambda c: c["ms"])
        default = next((c for c in timed if c["default"]), None)
        if default is None:
            raise SystemExit(f"{in_f}→{out_f} {name}: the library's configuration {library} did not run")
        result.update(
            best_config=best["config"],
            best_ms=best["ms"],
            default_ms=default["ms"],
            best_over_cublas=best["ms"] / result["cublas_ms"],
            best_over_merged=best["ms"] / result["merged_ms"],
        )
        logger.info(
            "%5d→%-5d %-10s cuBLAS %.4f  merged %.4f  folded best %.4f %s (× %.3f cuBLAS, × %.3f merged)"
            "  default %.4f",
            in_f, out_f, name, result["cublas_ms"], result["merged_ms"], best["ms"], best["config"],
            result["best_over_cublas"], result["best_over_merged"], default["ms"],
        )  # fmt: skip
        row[name] = result
    return row


def main() -> None:
    args = per_step_parser(__doc__, "out/folded_gemm.json").parse_args()
    start("folded_gemm.py", "a CUDA GPU and Triton", torch.cuda.is_available() and triton_gemm.AVAILABLE)
    rows = {}
    # "auto": what strategy="auto" runs with fused.FOLDED_GEMM set (merged where FOLDED_MIN_FEATURES excludes)
    totals = dict.fromkeys(("cublas", "merged", "folded_best", "folded_library", "auto"), 0.0)
    for name, ((in_f, out_f), count) in distinct_shapes().items():
        rows[name] = measure(args.tokens, in_f, out_f)
        for case in rows[name].values():
            for key, field in (("cublas", "cublas_ms"), ("merged", "merged_ms")):
                totals[key] += case[field] * count * args.layers
            totals["folded_best"] += case["best_ms"] * count * args.layers
            totals["folded_library"] += case["default_ms"] * count * args.layers
            folds = min(in_f, out_f) >= fused.FOLDED_MIN_FEATURES
            totals["auto"] += (case["default_ms"] if folds else case["merged_ms"]) * count * args.layers
    logger.info("per step of %d layers (ms): %s", args.layers, {k: round(v, 2) for k, v in totals.items()})
    atomic_write_json(args.out, {"env": environment(vars(args)), "projections": rows, "per_step_ms": totals})


if __name__ == "__main__":
    main()
