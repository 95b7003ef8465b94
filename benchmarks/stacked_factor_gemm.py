"""Would the rank-r products ride inside the base GEMMs as extra columns? GPU time per projection group.

The merged strategy (``lorakit.adapters.fused``, grouped siblings: ``lorakit.adapters.grouped``) runs, per
adapted projection with ``W' = W0 + s·B A``:

* backward: ``dX = Σ_i dY_i W'_i`` (one GEMM per sibling, β = 1 after the first) and, separately,
  ``G_i = dY_i · s B_i`` (a skinny GEMM that reads the T×out_i ``dY_i`` again), then ``dA = G_catᵀ x``;
* forward: ``y_i = x W'_iᵀ`` and ``u = x · [s A_1; …]ᵀ`` (a skinny GEMM that reads ``x`` again).

Both skinny GEMMs could come out of the base GEMMs as extra output columns. Backward: the merge writes
``s B_i`` beside ``W'_i``, in the i-th of Σr extra columns (zeros in the other siblings' columns), so
``dY_i · [W'_i | 0 … sB_i … 0]`` summed over i is ``[dX | G_1 … G_n]`` (T × (in + Σr)); ``dX`` is then a
strided view. Forward: ``x · [W'_i; s A_i]ᵀ`` gives ``[y_i | u_i]``; ``y_i`` is strided, and ``u_i`` must be
copied out where ``y_i`` is not kept anyway (else the saved ``u_i`` keeps the whole T × out_i buffer alive).

For each group of one decoder layer of the default model (T tokens, r = 16, bf16) this sums the GPU kernel
time (``torch.profiler``) of the separate and the stacked form, stacked with the extra columns as they are
and padded to a multiple of 64, after checking that both give the same dX, G, y and u. It also times the
first consumer of a strided ``dX`` (an elementwise multiply) against a contiguous one. Totals are per step
of the 16-layer model. Needs a CUDA GPU.

    PYTHONPATH=src python benchmarks/stacked_factor_gemm.py --out out/stacked_factor.json
"""

from __future__ import annotations

import logging

import torch
from grouped_projections import gpu_and_wall_ms
from kernel_bench import PROJECTIONS, environment, per_step_parser, rel_err, start

from lorakit.utils import atomic_write_json

logger = logging.getLogger("stacked_factor_gemm")
RANK = 16
TOLERANCE = 1e-2
GROUPS = {"q/k/v": ("q", "k", "v"), "o": ("o",), "gate/up": ("gate", "up"), "down": ("down",)}


def _pad(width: int, multiple: int) -> int:
    return -(-width // multiple) * multiple


def backward_cases(tokens: int, names: tuple[str, ...]) -> tuple[dict, list]:
    dev, dt = "cuda", torch.bfloat16
    in_f = PROJECTIONS[names[0]][0]
    outs = [PROJECTIONS[n][1] for n in names]
    x = torch.randn(tokens, in_f, device=dev, dtype=dt)
    weights = [torch.randn(o, in_f, device=dev, dtype=dt) / in_f**0.5 for o in outs]
    b_s = [torch.randn(o, RANK, device=dev, dtype=dt) * 0.1 for o in outs]
    grads = [torch.randn(tokens, o, device=dev, dtype=dt) for o in outs]
    n = len(names)

    def stacked_weights(width: int) -> list[torch.Tensor]:
        stacks = []
        for i, (w, b) in enumerate(zip(weights, b_s, strict=True)):
            s = torch.zeros(w.shape[0], in_f + width, device=dev, dtype=dt)
            s[:, :in_f] = w
            s[:, in_f + i * RANK : in_f + (i + 1) * RANK] = b
            stacks.append(s)
        return stacks

    def separate():
        dx = grads[0] @ weights[0]
        for g, w in zip(grads[1:], weights[1:], strict=True):
            dx.addmm_(g, w)
        gs = [g @ b for g, b in zip(grads, b_s, strict=True)]
        g_cat = torch.cat(gs, dim=1) if n > 1 else gs[0]
        return dx, g_cat, g_cat.t() @ x

    def stacked(stacks):
        def run():
            buf = grads[0] @ stacks[0]
            for g, s in zip(grads[1:], stacks[1:], strict=True):
                buf.addmm_(g, s)
            g_cat = buf[:, in_f : in_f + n * RANK]
            return buf[:, :in_f], g_cat, g_cat.t() @ x

        return run

    cases = {
        "separate": separate,
        "stacked": stacked(stacked_weights(n * RANK)),
        "stacked_pad64": stacked(stacked_weights(_pad(n * RANK, 64))),
    }
    return cases, [x, weights, grads]


def forward_cases(tokens: int, names: tuple[str, ...]) -> dict:
    dev, dt = "cuda", torch.bfloat16
    in_f = PROJECTIONS[names[0]][0]
    outs = [PROJECTIONS[n][1] for n in names]
    x = torch.randn(tokens, in_f, device=dev, dtype=dt)
    weights = [torch.randn(o, in_f, device=dev, dtype=dt) / in_f**0.5 for o in outs]
    a_s = [torch.randn(RANK, in_f, device=dev, dtype=dt) / in_f**0.5 for _ in outs]
    a_cat = torch.cat(a_s)

    def separate():
        return [x @ w.t() for w in weights], x @ a_cat.t()

    def stacked(width: int):
        stacks = []
        for w, a in zip(weights, a_s, strict=True):
            s = torch.zeros(w.shape[0] + width, in_f, device=dev, dtype=dt)
            s[: w.shape[0]], s[w.shape[0] : w.shape[0] + RANK] = w, a
            stacks.append(s)

        def run():
            bufs = [x @ s.t() for s in stacks]
            ys = [b[:, :o] for b, o in zip(bufs, outs, strict=True)]
            # a lone projection's y is consumed and freed: copy its u out so it does not pin the buffer
            us = [b[:, o : o + RANK] for b, o in zip(bufs, outs, strict=True)]
            u = us[0].contiguous() if len(us) == 1 else torch.cat(us, dim=1)
            return ys, u

        return run

    return {"separate": separate, "stacked": stacked(RANK), "stacked_pad64": stacked(64)}


def _check(label: str, cases: dict, flatten) -> float:
    want = flatten(cases["separate"]())
    worst = 0.0
    for name, fn in cases.items():
        errors = [rel_err(g, w) for g, w in zip(flatten(fn()), want, strict=True)]
        if not max(errors) <= TOLERANCE:
            raise SystemExit(f"{label} {name}: disagrees with separate, rel. errs {errors}")
        worst = max(worst, *errors)
    return worst


def consumer_ms(tokens: int, in_f: int, extra: int) -> dict[str, float]:
    """An elementwise multiply reading dX (T × in) contiguous, and as a view with row stride in + extra."""
    buf = torch.randn(tokens, in_f + extra, device="cuda", dtype=torch.bfloat16)
    contiguous = buf[:, :in_f].contiguous()
    scale = torch.randn(in_f, device="cuda", dtype=torch.bfloat16)
    return {
        "consumer_contiguous_gpu_ms": gpu_and_wall_ms(lambda: contiguous * scale)[0],
        "consumer_strided_gpu_ms": gpu_and_wall_ms(lambda: buf[:, :in_f] * scale)[0],
    }


def main() -> None:
    args = per_step_parser(__doc__, "out/stacked_factor.json").parse_args()
    start("stacked_factor_gemm.py", "a CUDA GPU", torch.cuda.is_available())
    rows, totals = {}, {}
    for label, names in GROUPS.items():
        row = rows[label] = {}
        bwd, _ = backward_cases(args.tokens, names)
        row["backward_max_rel_err"] = _check(f"{label} backward", bwd, lambda out: list(out))
        fwd = forward_cases(args.tokens, names)
        row["forward_max_rel_err"] = _check(f"{label} forward", fwd, lambda out: [*out[0], out[1]])
        for direction, cases in (("backward", bwd), ("forward", fwd)):
            for name, fn in cases.items():
                row[f"{direction}_{name}_gpu_ms"] = gpu_and_wall_ms(fn)[0]
        row.update(consumer_ms(args.tokens, PROJECTIONS[names[0]][0], len(names) * RANK))
        logger.info("%-8s %s", label, {k: round(v, 4) for k, v in row.items()})
        for key, ms in row.items():
            if key.endswith("_ms"):
                totals[key] = totals.get(key, 0.0) + ms * args.layers
    logger.info("per step of %d layers (ms): %s", args.layers, {k: round(v, 2) for k, v in totals.items()})
    atomic_write_json(args.out, {"env": environment(vars(args)), "groups": rows, "per_step_ms": totals})


if __name__ == "__main__":
    main()
