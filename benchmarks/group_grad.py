"""The one-launch G/dB pass of a sibling group (``triton_lora.lora_grad_pass_group``): block configurations.

For each group of one decoder layer of the default model (q/k/v, o, gate/up, down; T tokens, r = 16, bf16)
this times the backward's ``G_i = dY_i · s_iB_i`` and ``dB_i = dY_iᵀ u_i`` for the group (``do_bench``
median, L2 flushed):

* ``cublas``: two GEMMs per sibling, as the library runs with ``fused.GRAD_PASS_IN_EAGER`` off;
* one launch of the group kernel at each configuration (BLOCK_M, BLOCK_N, warps, stages, CHUNK), with G
  and dB (A and B trained) and with dB only (A frozen). CHUNK > 0 splits each member's columns into
  chunks of that many, each its own program (partial G rows summed in float32); 0 keeps one per member;
* the default configuration with G only (``g``), to see what dB's part costs;
* ``read``: a floor, torch summing every dY_i (one read).

``--timer kernels`` sums the GPU time of the kernels themselves from the profiler instead (no L2 flush):
``do_bench`` times the host too where a launch takes longer than its kernel, as at q/k/v, o and down.

Configurations that do not fit in shared memory are skipped. Every other one's G and dB are first checked
against float64 (bf16 rel. err ≤ 1e-2); the run stops at the first that disagrees. The bandwidth counts one
read of every dY_i. Totals are per step of the 16-layer model.

    PYTHONPATH=src python benchmarks/group_grad.py --out out/group_grad.json
"""

from __future__ import annotations

import itertools
import logging
import math

import torch
from kernel_bench import PROJECTIONS, bench_ms, environment, kernel_ms, per_step_parser, rel_err, start

from lorakit.adapters import triton_lora

try:
    from triton.runtime.errors import OutOfResources
except ImportError:  # no Triton: main() stops before any launch
    OutOfResources = RuntimeError
from lorakit.utils import atomic_write_json

logger = logging.getLogger("group_grad")
RANK = 16
GROUPS = {"q/k/v": ("q", "k", "v"), "o": ("o",), "gate/up": ("gate", "up"), "down": ("down",)}
#: (BLOCK_M, BLOCK_N, warps, stages, CHUNK): tiles near the fastest of the earlier grids (H100), and tiles of
#: 256 rows (half the float32 atomic adds into dB of 128), each with every member in one chunk (CHUNK 0, one
#: program per row block and member) and split into column chunks (more programs than row blocks alone give)
CONFIGS = [
    (*tile, chunk)
    for tile in (
        (64, 128, 8, 4),
        (128, 128, 8, 4),
        (128, 64, 4, 4),
        (256, 64, 8, 3),
        (256, 64, 8, 4),
        (256, 32, 4, 4),
        (256, 128, 8, 3),
    )
    for chunk in (0, 256, 512, 1024, 2048)
    if chunk % tile[1] == 0
]


def measure(names: tuple[str, ...], tokens: int, timer) -> dict:
    outs = [PROJECTIONS[n][1] for n in names]
    grads = [torch.randn(tokens, o, device="cuda", dtype=torch.bfloat16) for o in outs]
    b_s = [torch.randn(o, RANK, device="cuda", dtype=torch.bfloat16) * 0.1 for o in outs]
    u = torch.randn(tokens, RANK * len(outs), device="cuda", dtype=torch.bfloat16)
    ranks = (RANK,) * len(outs)
    u_parts = u.split(RANK, dim=1)
    want_g = torch.cat([g.double() @ b.double() for g, b in zip(grads, b_s, strict=True)], dim=1)
    want_db = [g.double().t() @ p.double() for g, p in zip(grads, u_parts, strict=True)]
    # timed calls take these in turn (over 200 MiB in all), so no call finds its dY in L2 from the one before
    sets = max(1, math.ceil(200 / (2 * tokens * sum(outs) / 2**20)))
    copies = [grads] + [[g.clone() for g in grads] for _ in range(sets - 1)]
    turn = itertools.count()

    def fresh() -> list[torch.Tensor]:
        return copies[next(turn) % len(copies)]

    def cublas(with_g: bool) -> list[torch.Tensor]:
        dys = fresh()
        out = [torch.ops.aten.mm.dtype(g.t(), p, torch.float32) for g, p in zip(dys, u_parts, strict=True)]
        return out + [g @ b for g, b in zip(dys, b_s, strict=True)] if with_g else out

    row = {f"cublas_{kind}_ms": timer(lambda w=w: cublas(w)) for kind, w in (("g_db", True), ("db", False))}
    row["read_ms"] = timer(lambda: [g.sum() for g in fresh()])
    g_only, _ = triton_lora.lora_grad_pass_group(grads, b_s, None, ranks)
    if rel_err(g_only, want_g) > 1e-2:
        raise SystemExit(f"{'/'.join(names)} G only: rel. err {rel_err(g_only, want_g):.2e} against float64")
    row["default_g_ms"] = timer(lambda: triton_lora.lora_grad_pass_group(fresh(), b_s, None, ranks))
    for config in CONFIGS:
        label = "x".join(map(str, config))
        for with_g in (True, False):
            try:
                g_cat, d_b = triton_lora.lora_grad_pass_group(
                    grads, b_s if with_g else None, u, ranks, config
                )
            except OutOfResources:  # too large a tile for the SM's shared memory: not a candidate
                continue
            errors = [rel_err(d, w) for d, w in zip(d_b, want_db, strict=True)]
            if with_g:
                errors.append(rel_err(g_cat, want_g))
            if max(errors) > 1e-2:
                error = f"rel. err {max(errors):.2e} against float64"
                raise SystemExit(f"{'/'.join(names)} config {config}: {error}")
            left = b_s if with_g else None
            ms = timer(lambda c=config, b=left: triton_lora.lora_grad_pass_group(fresh(), b, u, ranks, c))
            row[f"{label}_{'g_db' if with_g else 'db'}_ms"] = ms
    nbytes = 2 * tokens * sum(outs)
    logger.info(
        "%-8s read floor %.1f µs (%.2f TB/s); G only at the default %.1f µs",
        "/".join(names), row["read_ms"] * 1e3, nbytes / row["read_ms"] / 1e9, row["default_g_ms"] * 1e3,
    )  # fmt: skip
    for kind in ("g_db", "db"):
        fitted = triton_lora._group_grad_config(
            tuple(outs), kind == "g_db", triton_lora._block_r(RANK), torch.cuda.current_device()
        )
        default = "x".join(map(str, fitted))
        mine = {k[: -len(f"_{kind}_ms")]: v for k, v in row.items() if k.endswith(f"_{kind}_ms")}
        reference = mine.pop("cublas")
        best = min(mine, key=mine.get)
        logger.info(
            "%-8s %-4s cuBLAS %.1f µs; default %s %.1f µs; best %s %.1f µs (%.2f TB/s)",
            "/".join(names), kind, reference * 1e3, default, mine[default] * 1e3, best, mine[best] * 1e3,
            nbytes / mine[best] / 1e9,
        )  # fmt: skip
    return row


def main() -> None:
    parser = per_step_parser(__doc__, "out/group_grad.json")
    parser.add_argument(
        "--timer", choices=("do_bench", "kernels"), default="do_bench", help="what is timed (see above)"
    )
    args = parser.parse_args()
    timer = (lambda fn: bench_ms(fn, 200)) if args.timer == "do_bench" else kernel_ms
    start("group_grad.py", "a CUDA GPU with Triton", torch.cuda.is_available() and triton_lora.AVAILABLE)
    rows = {label: measure(names, args.tokens, timer) for label, names in GROUPS.items()}
    totals = {k: args.layers * sum(r[k] for r in rows.values()) for k in next(iter(rows.values()))}
    for kind in ("g_db", "db"):
        mine = {
            k: v
            for k, v in totals.items()
            if k.endswith(f"_{kind}_ms") and not k.startswith(("cublas", "default"))
        }
        best = min(mine, key=mine.get)
        logger.info(
            "per step, %s (ms): cuBLAS %.2f; best single configuration %s %.2f",
            kind, totals[f"cublas_{kind}_ms"], best, mine[best],
        )  # fmt: skip
    atomic_write_json(args.out, {"env": environment(vars(args)), "groups": rows, "per_step_ms": totals})


if __name__ == "__main__":
    main()
