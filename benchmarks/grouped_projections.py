"""Sibling projections as one group (``lorakit.adapters.grouped``) against one Function per projection.

For the q/k/v and the gate/up siblings of one decoder layer of the default model (T tokens, r = 16, bf16),
this times a forward plus backward (upstream gradients given, ``x`` requiring grad, so autograd sums the
siblings' input gradients as in a model) of:

* ``no_adapter``: the frozen base linears alone;
* ``separate``: ``fused.lora_linear`` per sibling (``strategy="auto"``: merged), as the library runs today;
* ``grouped``: ``grouped.lora_linear_group`` (one pass over x for every u and every dA, dX summed in the
  GEMMs' epilogue).

Each in eager and compiled (``torch.compile`` of the forward, ``fullgraph=True``; the backward is the
compiled graph's), for both factors trained and for frozen A. Two times per step: ``gpu`` is the sum of
the GPU kernels' durations (``torch.profiler``, mean of ``ITERS`` steps), the work a GPU-bound model step
pays; ``wall`` is the time per step of ``ITERS`` steps queued back to back, which a lone layer's host
time bounds here (in a 16-layer step the host runs ahead of the GPU). The grouped outputs and gradients
are first checked against the separate ones (bf16 rel. err ≤ 1e-2); the run fails if they disagree.
Totals are per step of the 16-layer model. Needs a CUDA GPU.

    PYTHONPATH=src python benchmarks/grouped_projections.py --out out/grouped.json
"""

from __future__ import annotations

import logging

import torch
import torch.nn.functional as F
from kernel_bench import PROJECTIONS, environment, per_step_parser, rel_err, start

from lorakit.adapters import fused, grouped
from lorakit.utils import atomic_write_json

logger = logging.getLogger("grouped_projections")
ITERS = 20
RANK = 16
SCALE = 2.0
TOLERANCE = 1e-2
VARIANTS = ("no_adapter", "separate", "grouped")
GROUPS = {"q/k/v": ("q", "k", "v"), "gate/up": ("gate", "up")}


def operands(tokens: int, names: tuple[str, ...], train_a: bool) -> dict:
    dev, dt = "cuda", torch.bfloat16
    in_f = PROJECTIONS[names[0]][0]
    outs = [PROJECTIONS[n][1] for n in names]
    return {
        "x": torch.randn(tokens, in_f, device=dev, dtype=dt, requires_grad=True),
        "weights": [torch.randn(o, in_f, device=dev, dtype=dt) / in_f**0.5 for o in outs],
        "A": [(torch.randn(RANK, in_f, device=dev) / in_f**0.5).requires_grad_(train_a) for _ in outs],
        "B": [(torch.randn(o, RANK, device=dev) * 0.1).requires_grad_() for o in outs],
        "grads": [torch.randn(tokens, o, device=dev, dtype=dt) for o in outs],
    }


def forwards(ops: dict) -> dict:
    n = len(ops["weights"])

    def no_adapter(x):
        return [F.linear(x, w) for w in ops["weights"]]

    def separate(x):
        return [
            fused.lora_linear(x, ops["weights"][i], None, ops["A"][i], ops["B"][i], SCALE) for i in range(n)
        ]

    def grouped_(x):
        return grouped.lora_linear_group(x, ops["weights"], [None] * n, ops["A"], ops["B"], [SCALE] * n)

    return {"no_adapter": no_adapter, "separate": separate, "grouped": grouped_}


def step(forward, ops: dict) -> list[torch.Tensor]:
    """Forward and backward; returns the outputs and the gradients of x and the trainable factors."""
    leaves = [ops["x"], *(t for t in ops["A"] + ops["B"] if t.requires_grad)]
    for t in leaves:
        t.grad = None
    outputs = forward(ops["x"])
    torch.autograd.backward(outputs, ops["grads"])
    return [o.detach() for o in outputs] + [t.grad for t in leaves]


def gpu_and_wall_ms(fn) -> tuple[float, float]:
    """(sum of GPU kernel time per call, wall time per call) over ``ITERS`` calls after a warm-up."""
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    start_event, end_event = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start_event.record()
    for _ in range(ITERS):
        fn()
    end_event.record()
    torch.cuda.synchronize()
    wall = start_event.elapsed_time(end_event) / ITERS
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        for _ in range(ITERS):
            fn()
        torch.cuda.synchronize()
    kernel_us = sum(e.self_device_time_total for e in prof.key_averages())
    return kernel_us / 1000 / ITERS, wall


def measure(tokens: int, names: tuple[str, ...], train_a: bool) -> dict:
    ops = operands(tokens, names, train_a)
    plain = forwards(ops)
    want = step(plain["separate"], ops)
    got = step(plain["grouped"], ops)
    errors = [rel_err(g, w) for g, w in zip(got, want, strict=True)]
    if not max(errors) <= TOLERANCE:
        raise SystemExit(f"{'/'.join(names)} train_a={train_a}: grouped vs separate rel. errs {errors}")
    row = {"max_rel_err": max(errors)}
    for mode in ("eager", "compiled"):
        for name, forward in plain.items():
            if mode == "compiled":
                torch._dynamo.reset()
                forward = torch.compile(forward, fullgraph=True)
                step(forward, ops)  # compile outside the timing
            gpu, wall = gpu_and_wall_ms(lambda f=forward: step(f, ops))
            row[f"{mode}_{name}_gpu_ms"], row[f"{mode}_{name}_wall_ms"] = gpu, wall
        logger.info(
            "%-8s train %-2s %-8s gpu (wall) ms: no adapter %.3f (%.3f)  separate %.3f (%.3f)  "
            "grouped %.3f (%.3f)", "/".join(names), "AB" if train_a else "B", mode,
            *(row[f"{mode}_{k}_{t}_ms"] for k in VARIANTS for t in ("gpu", "wall")),
        )  # fmt: skip
    return row


def main() -> None:
    args = per_step_parser(__doc__, "out/grouped.json").parse_args()
    start("grouped_projections.py", "a CUDA GPU", torch.cuda.is_available())
    rows, totals = {}, {}
    for train_a in (True, False):
        train = "AB" if train_a else "B"
        for label, names in GROUPS.items():
            rows[f"{label} train {train}"] = row = measure(args.tokens, names, train_a)
            for key, ms in row.items():
                if key.endswith("_ms"):
                    total_key = f"train {train} {key}"
                    totals[total_key] = totals.get(total_key, 0.0) + ms * args.layers
    logger.info("per step of %d layers (ms): %s", args.layers, {k: round(v, 2) for k, v in totals.items()})
    atomic_write_json(args.out, {"env": environment(vars(args)), "groups": rows, "per_step_ms": totals})


if __name__ == "__main__":
    main()
