"""Where a training step's GPU time goes: each kernel attributed to the op that launched it.

``throughput.py --profile`` ranks kernels by name, and names alone hide which op ran them (the same
elementwise kernel serves a norm's backward and an optimizer). This script profiles two steps of the
throughput model per variant (``torch.profiler`` with shapes), and charges each GPU kernel to the CPU op
that launched it and to one of three parts of the step:

* ``lora``: inside a lorakit Function, forward or backward (a PEFT adapter's ops count as ``model``: its
  modules leave no mark on the ops);
* ``optimizer``: inside ``optimizer.step``;
* ``model``: everything else (the frozen model's own forward and backward, the loss).

It writes, per variant, the milliseconds per step of each part and the largest (op, input shapes, kernel)
rows, and for each variant after the first, the rows of the ``model`` part that changed against the first
variant (work an adapter adds to, or removes from, the frozen model's own ops). Needs a CUDA GPU.

    PYTHONPATH=src python benchmarks/step_breakdown.py --variants no-adapter,lorakit --out out/breakdown.json
"""

from __future__ import annotations

import logging
from collections import defaultdict
from dataclasses import asdict

import torch
from throughput import Spec, prepare_variant, variants_parser, write_report

logger = logging.getLogger("step_breakdown")
STEPS = 2
LORA_MARKERS = ("_LoraLinearFunction", "_LoraGroupFunction")


def _part(event) -> str:
    """``lora``, ``optimizer`` or ``model``: the first marker found on the way up the op's parents."""
    node = event
    while node is not None:
        if "Optimizer.step" in node.name:
            return "optimizer"
        if any(marker in node.name for marker in LORA_MARKERS):
            return "lora"
        node = node.cpu_parent
    return "model"


def breakdown(variant: str, spec: Spec, device: str, warmup: int = 5) -> dict:
    """Per-part milliseconds per step, and every (part, op, shapes, kernel) row with its time and calls."""
    model, _, step, _ = prepare_variant(variant, spec, device)
    for _ in range(warmup):
        step()
    torch.cuda.synchronize()
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA], record_shapes=True) as prof:
        for _ in range(STEPS):
            step()
        torch.cuda.synchronize()
    rows: dict[tuple, list[float]] = defaultdict(lambda: [0.0, 0])
    parts: dict[str, float] = defaultdict(float)
    for event in prof.events():
        for kernel in event.kernels:
            part = _part(event)
            key = (part, event.name, str(event.input_shapes)[:120], kernel.name[:90])
            rows[key][0] += kernel.duration / 1e3 / STEPS  # µs over the steps -> ms per step
            rows[key][1] += 1
            parts[part] += kernel.duration / 1e3 / STEPS
    table = sorted(
        (
            {"part": p, "op": op, "shapes": shapes, "kernel": k, "ms_per_step": t, "calls": int(c)}
            for (p, op, shapes, k), (t, c) in rows.items()
        ),
        key=lambda row: -row["ms_per_step"],
    )
    del step, model
    torch.cuda.empty_cache()
    return {"variant": variant, "parts_ms_per_step": dict(parts), "rows": table}


def changed_model_rows(base: dict, other: dict, limit: int = 25) -> list[dict]:
    """The ``model`` rows whose time differs most between two variants (ms per step, other − base)."""

    def index(result: dict) -> dict:
        return {(r["op"], r["shapes"], r["kernel"]): r for r in result["rows"] if r["part"] == "model"}

    a, b = index(base), index(other)
    diffs = []
    for key in a.keys() | b.keys():
        ta = a[key]["ms_per_step"] if key in a else 0.0
        tb = b[key]["ms_per_step"] if key in b else 0.0
        diffs.append(
            {"op": key[0], "shapes": key[1], "kernel": key[2], "base": ta, "other": tb, "diff": tb - ta}
        )
    return sorted(diffs, key=lambda d: -abs(d["diff"]))[:limit]


def render(results: list[dict]) -> str:
    lines = []
    for result in results:
        parts = ", ".join(f"{k} {v:.2f}" for k, v in sorted(result["parts_ms_per_step"].items()))
        total = sum(result["parts_ms_per_step"].values())
        lines += [f"\n### {result['variant']}: {total:.2f} ms of kernels per step ({parts})", ""]
        lines += ["| part | op | input shapes | kernel | ms/step | calls |", "|---|---|---|---|---|---|"]
        for row in result["rows"][:30]:
            lines.append(
                f"| {row['part']} | {row['op']} | {row['shapes']} | {row['kernel'][:60]} | "
                f"{row['ms_per_step']:.3f} | {row['calls']} |"
            )
        if "changed_vs_first" in result:
            lines += ["", f"Model rows changed against {results[0]['variant']} (ms/step):", ""]
            lines += ["| op | input shapes | kernel | base | this | diff |", "|---|---|---|---|---|---|"]
            for d in result["changed_vs_first"]:
                times = f"{d['base']:.3f} | {d['other']:.3f} | {d['diff']:+.3f}"
                lines.append(f"| {d['op']} | {d['shapes']} | {d['kernel'][:60]} | {times} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = variants_parser(__doc__.split("\n\n")[0], "out/breakdown.json", "no-adapter,lorakit")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    if not torch.cuda.is_available():
        raise SystemExit("step_breakdown.py needs a CUDA GPU")
    spec = Spec(layers=args.layers)
    results = []
    for variant in args.variants.split(","):
        results.append(breakdown(variant, spec, "cuda"))
        if len(results) > 1:
            results[-1]["changed_vs_first"] = changed_model_rows(results[0], results[-1])
        logger.info("%s: %s", variant, results[-1]["parts_ms_per_step"])
    text = render(results)
    write_report(args.out, {"spec": asdict(spec), "results": results}, text)
    print(text)


if __name__ == "__main__":
    main()
