"""The one-launch merge of a sibling group (``triton_lora.merge_lora_weights``): block configurations.

For each group of one decoder layer of the default model (q/k/v, o, gate/up, down; r = 16, bf16 weights,
float32 factors) this times ``merge_lora_weights`` (``do_bench`` median, L2 flushed) at each block
configuration (BLOCK_M, BLOCK_N, warps), and the per-weight launch of ``merge_lora_weight`` per sibling for
comparison, after checking every configuration's merged weights against the per-weight kernel's (equal up
to the rounding of the tf32 product). ``copy`` is a floor for the same bytes: each weight copied into a new
tensor by torch. The bandwidth counts the weight read and the merged weight written. Totals are per step
of the 16-layer model (two merges per weight and step: forward and backward).

    PYTHONPATH=src python benchmarks/group_merge.py --out out/group_merge.json
"""

from __future__ import annotations

import logging

import torch
from kernel_bench import PROJECTIONS, bench_ms, environment, per_step_parser, rel_err, start

from lorakit.adapters import triton_lora
from lorakit.utils import atomic_write_json

logger = logging.getLogger("group_merge")
RANK = 16
GROUPS = {"q/k/v": ("q", "k", "v"), "o": ("o",), "gate/up": ("gate", "up"), "down": ("down",)}
CONFIGS = [(32, 128, 4), (64, 128, 4), (64, 128, 8), (32, 256, 4), (64, 256, 8), (128, 128, 8), (16, 256, 4)]


def measure(names: tuple[str, ...]) -> dict:
    in_f = PROJECTIONS[names[0]][0]
    outs = [PROJECTIONS[n][1] for n in names]
    weights = [torch.randn(o, in_f, device="cuda", dtype=torch.bfloat16) for o in outs]
    lefts = [torch.randn(o, RANK, device="cuda") for o in outs]
    rights = [torch.randn(RANK, in_f, device="cuda") / in_f**0.5 for _ in outs]
    scalings = [2.0] * len(outs)
    trios = list(zip(weights, lefts, rights, strict=True))
    want = [triton_lora.merge_lora_weight(w, left, right, 2.0)[0] for w, left, right in trios]
    row = {
        "per_weight_ms": bench_ms(lambda: [triton_lora.merge_lora_weight(*t, 2.0) for t in trios], 200),
        "copy_ms": bench_ms(lambda: [w.clone() for w in weights], 200),
    }
    nbytes = 2 * 2 * sum(w.numel() for w in weights)
    for config in CONFIGS:
        got = triton_lora.merge_lora_weights(weights, lefts, rights, scalings, True, config)[0]
        error = max(rel_err(g, w) for g, w in zip(got, want, strict=True))
        if error > 1e-2:
            raise SystemExit(
                f"{'/'.join(names)} config {config}: rel. err {error:.2e} against the per-weight kernel"
            )
        ms = bench_ms(
            lambda c=config: triton_lora.merge_lora_weights(weights, lefts, rights, scalings, True, c), 200
        )
        row["x".join(map(str, config)) + "_ms"] = ms
    others = ("per_weight_ms", "copy_ms")
    best = min((k for k in row if k not in others), key=row.get)
    logger.info(
        "%-8s per-weight %.1f µs; copy %.1f µs (%.2f TB/s); one launch: %s; best %s at %.2f TB/s",
        "/".join(names), row["per_weight_ms"] * 1e3, row["copy_ms"] * 1e3, nbytes / row["copy_ms"] / 1e9,
        ", ".join(f"{k[:-3]} {v * 1e3:.1f}" for k, v in row.items() if k not in others),
        best[:-3], nbytes / row[best] / 1e9,
    )  # fmt: skip
    return row


def main() -> None:
    args = per_step_parser(__doc__, "out/group_merge.json").parse_args()
    start("group_merge.py", "a CUDA GPU with Triton", torch.cuda.is_available() and triton_lora.AVAILABLE)
    rows = {label: measure(names) for label, names in GROUPS.items()}
    totals = {k: 2 * args.layers * sum(r[k] for r in rows.values()) for k in next(iter(rows.values()))}
    logger.info("per step, forward + backward (ms): %s", {k: round(v, 2) for k, v in totals.items()})
    atomic_write_json(args.out, {"env": environment(vars(args)), "groups": rows, "per_step_ms": totals})


if __name__ == "__main__":
    main()
