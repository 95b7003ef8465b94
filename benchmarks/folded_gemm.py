"""The folded LoRA GEMM against what it replaces, per projection shape of the throughput model (H100).

The fused path's ``"merged"`` strategy (``lorakit.adapters.fused``) builds ``W = W0 + s·B A`` with the
Triton merge kernel and runs cuBLAS on it, and reads the activations a second time for the rank-r products:
forward ``y = x Wᵀ`` and ``u = x (sA)ᵀ``; backward ``dX = dY W`` and, in one Triton pass over dY,
``G = dY (sB)`` with ``dB = dYᵀ u`` (as under ``torch.compile``). The ``"folded"`` strategy runs one Triton
GEMM per pass (``lorakit.adapters.triton_gemm``) that takes the rank-r product from the same tiles of x or
dY as the base GEMM and adds it as r more steps of the reduction: forward ``y = x W0ᵀ + u Bᵀ``, u kept;
backward ``dX = dY W0 + G A``, G kept and dB summed in the same pass. No merged weight and no second read of
x or dY. (``dA = Gᵀ x`` is the same in both and not timed.) For each base GEMM of the default model
(T tokens, r = 16) this times, with ``triton.testing.do_bench`` (L2 flushed, median):

* ``cublas``: the base GEMM alone (the floor of either strategy without a GEMM faster than cuBLAS);
* ``merged``: the merge kernel, cuBLAS on the merged weight and the rank-r pass, as the merged strategy;
* ``folded``: the folded kernel at each block configuration of ``CONFIGS``, and at the library's choice
  (``triton_gemm.config_for``).

Each folded configuration is first checked against float64 (rel. err ≤ 1e-2 for the output and the kept
rank-r product, 1e-4 for dB); one that disagrees is not timed and the run fails. The totals are per step of
the 16-layer model; ``auto`` is what ``strategy="auto"`` runs with ``fused.FOLDED_GEMM`` set (merged where
the projection is too narrow). Needs a Hopper GPU.

    PYTHONPATH=src python benchmarks/folded_gemm.py --out out/folded_gemm.json
"""

from __future__ import annotations

import itertools
import logging
from functools import partial

import torch
from kernel_bench import bench_ms, distinct_shapes, environment, per_step_parser, start

from lorakit.adapters import fused, triton_gemm, triton_lora
from lorakit.adapters.triton_gemm import GemmConfig
from lorakit.utils import atomic_write_json

logger = logging.getLogger("folded_gemm")
REP_MS = 100
RANK = 16
SCALE = 2.0
#: launch configurations tried at every shape
CONFIGS = [
    GemmConfig(128, 256, stages=3, flatten=True),
    GemmConfig(128, 256, stages=3),
    GemmConfig(128, 256, stages=3, warp_specialize=True),
    GemmConfig(128, 256, stages=3, flatten=True, warp_specialize=True),
    GemmConfig(64, 256, warps=4, stages=4),
    GemmConfig(128, 128, warps=4, stages=4, flatten=True),
]
#: where the rank-r product p comes from (0: given, computed by cuBLAS or the G/dB pass before the launch;
#: 1: every tile; 2: the tiles of column block 0, which the others wait for) and who adds dB (1: spread over
#: the column blocks; 2: column block 0)
VARIANTS = {"forward": [(0, 0), (1, 0), (2, 0)], "input_grad": [(0, 0), (1, 1), (2, 1), (2, 2)]}
TOLERANCE = {"c": 1e-2, "p": 1e-2, "dw": 1e-4}


def _rel(got: torch.Tensor, want: torch.Tensor) -> float:
    return float((got.double() - want).norm() / want.norm())


def cases(tokens: int, in_f: int, out_f: int) -> dict:
    """The forward and input-gradient pass of one projection: kernel operands, float64 references of what
    the kernel returns, and the two baselines."""
    dev, dt = "cuda", torch.bfloat16
    w = torch.randn(out_f, in_f, device=dev, dtype=dt) / in_f**0.5
    lora_a = torch.randn(RANK, in_f, device=dev) / in_f**0.5
    lora_b = torch.randn(out_f, RANK, device=dev) * 0.1
    x = torch.randn(tokens, in_f, device=dev, dtype=dt)
    g = torch.randn(tokens, out_f, device=dev, dtype=dt)
    a_s, b_s = (lora_a * SCALE).to(dt), (lora_b * SCALE).to(dt)
    a_c, b_c = lora_a.to(dt), lora_b.to(dt)
    u = x @ a_s.t()
    u64, gb64 = x.double() @ a_s.double().t(), g.double() @ b_s.double()

    def merged_weight() -> torch.Tensor:
        return fused._merge(w, lora_a, lora_b, SCALE, False)[0]

    def merged_forward() -> tuple[torch.Tensor, torch.Tensor]:
        return x @ merged_weight().t(), x @ a_s.t()

    def merged_input_grad() -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
        return g @ merged_weight(), triton_lora.lora_grad_pass(g, b_s, u)

    return {
        "forward": {  # a, b, down, up, b_kn, factors_kn, store_p, w
            "operands": (x, w, a_s, b_c, False, False, True, None),
            "reference": {
                "c": x.double() @ w.double().t() + u64.to(dt).double() @ b_c.double().t(),
                "p": u64,
            },
            "cublas": lambda: x @ w.t(),
            "merged": merged_forward,
            "merged_out": lambda: merged_forward()[0],
            "rank_pass": lambda: (x @ a_s.t(), None),
        },
        "input_grad": {
            "operands": (g, w, b_s, a_c, True, True, True, u),
            "reference": {
                "c": g.double() @ w.double() + gb64.to(dt).double() @ a_c.double(),
                "p": gb64,
                "dw": g.double().t() @ u.double(),
            },
            "cublas": lambda: g @ w,
            "merged": merged_input_grad,
            "merged_out": lambda: merged_input_grad()[0],
            "rank_pass": lambda: triton_lora.lora_grad_pass(g, b_s, u),
        },
    }


def _check(outputs: tuple, reference: dict) -> dict[str, float]:
    """Rel. error of each returned tensor against its float64 reference; exits on any over tolerance."""
    errors = {
        key: _rel(got, reference[key])
        for key, got in zip(("c", "p", "dw"), outputs, strict=True)
        if got is not None
    }
    bad = {key: err for key, err in errors.items() if not err <= TOLERANCE[key]}  # NaN fails too
    return {"errors": errors, "bad": bad}


def _run_variant(case: dict, p_source: int, dw_mode: int, config: GemmConfig) -> tuple:
    """The folded GEMM's ``(c, p, dB or None)`` with p from ``p_source`` (see :data:`VARIANTS`)."""
    a, b, down, up, b_kn, factors_kn, store_p, w = case["operands"]
    if p_source:
        c, p, dw = triton_gemm.launch(
            a, b, down, up, None, b_kn, factors_kn, store_p, w, config, p_source, dw_mode
        )
        return c, p, dw if w is not None else None
    p, dw = case["rank_pass"]()  # the folded path of 3dc4890: p (and dB) from a pass of their own first
    return triton_gemm.launch(a, b, down, up, None, b_kn, factors_kn, False, None, config, 0, 0, p)[0], p, dw


def measure(tokens: int, in_f: int, out_f: int) -> dict:
    row = {}
    for name, case in cases(tokens, in_f, out_f).items():
        result = {
            "cublas_ms": bench_ms(case["cublas"], REP_MS),
            "merged_ms": bench_ms(case["merged"], REP_MS),
            "merged_rel_err": _rel(case["merged_out"](), case["reference"]["c"]),
            "configs": [],
        }
        for (p_source, dw_mode), config in itertools.product(VARIANTS[name], CONFIGS):
            label = {**config._asdict(), "p_source": p_source, "dw_mode": dw_mode}

            run = partial(_run_variant, case, p_source, dw_mode, config)
            try:
                c, p, dw = run()
            except Exception as exc:  # e.g. Triton's OutOfResources: the config cannot run here
                logger.info("%5d→%-5d %-10s %s: %s", in_f, out_f, name, label, repr(exc)[:300])
                result["configs"].append({"config": label, "error": repr(exc)[:200]})
                continue
            check = _check((c, p, dw), case["reference"])
            if check["bad"]:  # not timed, and reported
                logger.error(
                    "%5d→%-5d %-10s %s: rel. err %s too large", in_f, out_f, name, label, check["bad"]
                )
                result["configs"].append({"config": label, "error": f"rel. err {check['bad']} too large"})
                continue
            ms = bench_ms(run, REP_MS)
            result["configs"].append({"config": label, "ms": ms, "rel_err": check["errors"]})
            logger.info("%5d→%-5d %-10s %.4f ms %s", in_f, out_f, name, ms, label)
        timed = [c for c in result["configs"] if "ms" in c]
        if not timed:
            raise SystemExit(f"{in_f}→{out_f} {name}: no configuration of the folded GEMM ran")
        best = min(timed, key=lambda c: c["ms"])
        result.update(
            best_config=best["config"],
            best_ms=best["ms"],
            best_over_cublas=best["ms"] / result["cublas_ms"],
            best_over_merged=best["ms"] / result["merged_ms"],
        )
        logger.info(
            "%5d→%-5d %-10s cuBLAS %.4f  merged %.4f  folded best %.4f %s (× %.3f cuBLAS, × %.3f merged)",
            in_f, out_f, name, result["cublas_ms"], result["merged_ms"], best["ms"], best["config"],
            result["best_over_cublas"], result["best_over_merged"],
        )  # fmt: skip
        row[name] = result
    return row


def main() -> None:
    args = per_step_parser(__doc__, "out/folded_gemm.json").parse_args()
    start("folded_gemm.py", "a CUDA GPU and Triton", torch.cuda.is_available() and triton_gemm.AVAILABLE)
    rows = {}
    # "auto": what strategy="auto" runs with fused.FOLDED_GEMM set (merged where FOLDED_MIN_FEATURES excludes)
    totals = dict.fromkeys(("cublas", "merged", "folded_best", "auto"), 0.0)
    for name, ((in_f, out_f), count) in distinct_shapes().items():
        rows[name] = measure(args.tokens, in_f, out_f)
        for case in rows[name].values():
            for key, field in (("cublas", "cublas_ms"), ("merged", "merged_ms")):
                totals[key] += case[field] * count * args.layers
            totals["folded_best"] += case["best_ms"] * count * args.layers
            folds = min(in_f, out_f) >= fused.FOLDED_MIN_FEATURES
            totals["auto"] += (case["best_ms"] if folds else case["merged_ms"]) * count * args.layers
    logger.info("per step of %d layers (ms): %s", args.layers, {k: round(v, 2) for k, v in totals.items()})
    atomic_write_json(args.out, {"env": environment(vars(args)), "projections": rows, "per_step_ms": totals})


if __name__ == "__main__":
    main()
