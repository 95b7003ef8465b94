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
variant (work an adapter adds to, or removes from, the frozen model's own ops). Each kernel also goes
into a class by its name (``gemm``, ``attention``, ``lorakit`` for this library's Triton kernels,
``inductor`` for the kernels ``torch.compile`` generates, ``other``), and the script times ten unprofiled
steps, so the kernels' sum can be set against the wall step of the same process.

With ``--compile`` the model runs under ``torch.compile(model)``: the compiled graph leaves no lorakit
Function on the host, so every kernel outside the optimizer counts as ``model`` there, and the classes
show what the adapters add. Needs a CUDA GPU.

    PYTHONPATH=src python benchmarks/step_breakdown.py --variants no-adapter,lorakit --out out/breakdown.json
    PYTHONPATH=src python benchmarks/step_breakdown.py --compile --variants no-adapter,lorakit
"""

from __future__ import annotations

import logging
import statistics
from collections import defaultdict
from dataclasses import asdict

import torch
from throughput import Spec, prepare_variant, timed, variants_parser, write_report

logger = logging.getLogger("step_breakdown")
STEPS = 2
LORA_MARKERS = ("_LoraLinearFunction", "_LoraGroupFunction")
WALL_STEPS = 10
# kernel classes by name; the first class with a matching fragment wins
KERNEL_CLASSES = (
    ("lorakit", ("_merge_kernel", "_group_merge_kernel", "_rows_kernel", "_group_grad_kernel",
                 "_product_backward_kernel", "_lora_gemm_kernel")),
    ("attention", ("flash", "fmha", "attention", "sdpa")),
    ("gemm", ("gemm", "nvjet", "cutlass", "xmma", "sm90_", "sm80_", "cublas")),
    ("inductor", ("triton_",)),
)  # fmt: skip


def kernel_class(name: str) -> str:
    """The class of a GPU kernel by its name (:data:`KERNEL_CLASSES`), else ``other``."""
    lowered = name.lower()
    for label, fragments in KERNEL_CLASSES:
        if any(fragment.lower() in lowered for fragment in fragments):
            return label
    return "other"


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


def breakdown(variant: str, spec: Spec, device: str, compiled: bool = False, warmup: int = 5) -> dict:
    """Per-part and per-class milliseconds per step, every (part, op, shapes, kernel) row with its time and
    calls, and the median wall step of :data:`WALL_STEPS` unprofiled steps."""
    torch._dynamo.reset()
    model, _, step, _ = prepare_variant(variant, spec, device, compiled)
    for _ in range(warmup):
        step()
    wall_ms = statistics.median(timed(step, WALL_STEPS)) * 1e3
    torch.cuda.synchronize()
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA], record_shapes=True) as prof:
        for _ in range(STEPS):
            step()
        torch.cuda.synchronize()
    rows: dict[tuple, list[float]] = defaultdict(lambda: [0.0, 0])
    parts: dict[str, float] = defaultdict(float)
    classes: dict[str, float] = defaultdict(float)
    for event in prof.events():
        for kernel in event.kernels:
            part = _part(event)
            key = (part, event.name, str(event.input_shapes)[:120], kernel.name[:90])
            ms = kernel.duration / 1e3 / STEPS  # µs over the steps -> ms per step
            rows[key][0] += ms
            rows[key][1] += 1
            parts[part] += ms
            classes[kernel_class(kernel.name)] += ms
    table = sorted(
        (
            {"part": p, "op": op, "shapes": shapes, "kernel": k, "ms_per_step": t, "calls": int(c)}
            for (p, op, shapes, k), (t, c) in rows.items()
        ),
        key=lambda row: -row["ms_per_step"],
    )
    del step, model
    torch.cuda.empty_cache()
    return {
        "variant": variant,
        "compiled": compiled,
        "wall_ms_per_step": wall_ms,
        "parts_ms_per_step": dict(parts),
        "classes_ms_per_step": dict(classes),
        "rows": table,
    }


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
        classes = ", ".join(f"{k} {v:.2f}" for k, v in sorted(result["classes_ms_per_step"].items()))
        total = sum(result["parts_ms_per_step"].values())
        mode = "compiled" if result["compiled"] else "eager"
        lines += [
            f"\n### {result['variant']} ({mode}): {total:.2f} ms of kernels per step ({parts}); by class: "
            f"{classes}; wall {result['wall_ms_per_step']:.2f} ms per step",
            "",
        ]
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
    parser.add_argument("--compile", action="store_true", help="run the model under torch.compile(model)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    if not torch.cuda.is_available():
        raise SystemExit("step_breakdown.py needs a CUDA GPU")
    spec = Spec(layers=args.layers)
    results = []
    for variant in args.variants.split(","):
        results.append(breakdown(variant, spec, "cuda", args.compile))
        if len(results) > 1:
            results[-1]["changed_vs_first"] = changed_model_rows(results[0], results[-1])
        logger.info(
            "%s: %s, wall %.2f ms",
            variant,
            results[-1]["classes_ms_per_step"],
            results[-1]["wall_ms_per_step"],
        )
    text = render(results)
    write_report(args.out, {"spec": asdict(spec), "results": results}, text)
    print(text)


if __name__ == "__main__":
    main()
