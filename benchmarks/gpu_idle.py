"""Where a training step leaves the GPU idle, and what the host was doing then.

``step_breakdown.py`` sums the GPU's kernel time; a step's wall time is that plus the time the GPU waits for
the host. This script profiles two steps of the throughput model per variant (``torch.profiler``, CPU and
CUDA, each step started from an idle GPU as ``throughput.py`` times it) and reads the Chrome trace: every
gap of at least ``--min-gap`` µs between GPU activities is charged to the host op that launched the kernel
ending the gap (the innermost CPU op around its launch call), to the phase it was in (forward, backward,
optimizer) and to its context (the autograd node in backward, a lorakit Function in forward). Needs a CUDA
GPU.

    PYTHONPATH=src python benchmarks/gpu_idle.py --variants no-adapter,lorakit --out out/idle.json
    PYTHONPATH=src python benchmarks/gpu_idle.py --compile --variants no-adapter,lorakit
"""

from __future__ import annotations

import bisect
import json
import logging
import tempfile
from collections import defaultdict
from dataclasses import asdict
from pathlib import Path

import torch
from throughput import Spec, prepare_variant, variants_parser, write_report

logger = logging.getLogger("gpu_idle")
STEPS = 2
PHASES = ("forward", "backward", "optimizer")
GPU_CATEGORIES = ("kernel", "gpu_memcpy", "gpu_memset")
CONTEXT_MARKERS = ("autograd::engine::evaluate_function: ", "_LoraLinearFunction", "_LoraGroupFunction")


def _complete(events: list[dict], categories: tuple[str, ...]) -> list[dict]:
    return [e for e in events if e.get("ph") == "X" and e.get("cat") in categories]


def idle_report(events: list[dict], min_gap_us: float, steps: int) -> dict:
    """Idle GPU time per step, by phase, by launching op and by context, from Chrome-trace ``events``."""
    gpu = sorted(_complete(events, GPU_CATEGORIES), key=lambda e: e["ts"])
    launches = {
        e["args"]["correlation"]: e
        for e in _complete(events, ("cuda_runtime", "cuda_driver"))
        if "correlation" in e.get("args", {})
    }
    ops_by_thread: dict[object, list[dict]] = defaultdict(list)
    for e in _complete(events, ("cpu_op",)):
        ops_by_thread[e["tid"]].append(e)
    # the phase markers are on the calling thread; backward's ops run on the autograd engine's device thread
    phases = [e for e in _complete(events, ("user_annotation",)) if e["name"] in PHASES]
    starts = {}
    for tid, ops in ops_by_thread.items():
        ops.sort(key=lambda e: e["ts"])
        starts[tid] = [e["ts"] for e in ops]

    def around(tid: object, t: float) -> list[dict]:
        """The ops of thread ``tid`` running at ``t``, innermost first."""
        ops, found = ops_by_thread.get(tid, []), []
        for i in range(bisect.bisect_right(starts.get(tid, []), t) - 1, -1, -1):
            if ops[i]["ts"] + ops[i]["dur"] >= t:
                found.append(ops[i])
        return found

    totals = {"idle_us": 0.0, "busy_us": 0.0, "gaps": 0}
    by_phase: dict[str, float] = defaultdict(float)
    by_op: dict[str, list[float]] = defaultdict(lambda: [0.0, 0])
    by_context: dict[str, list[float]] = defaultdict(lambda: [0.0, 0])
    end = None
    for event in gpu:
        start, stop = event["ts"], event["ts"] + event["dur"]
        if end is not None and start - end >= min_gap_us:
            gap = start - end
            launch = launches.get(event.get("args", {}).get("correlation"))
            running = around(launch["tid"], launch["ts"]) if launch else []
            names = [op["name"] for op in running]
            op = names[0] if names else "(no host op)"
            t = launch["ts"] if launch else start
            phase = next((p["name"] for p in phases if p["ts"] <= t <= p["ts"] + p["dur"]), "(between steps)")
            context = next((n for n in names if n.startswith(CONTEXT_MARKERS)), "(model)")
            totals["idle_us"] += gap
            totals["gaps"] += 1
            by_phase[phase] += gap
            by_op[op][0] += gap
            by_op[op][1] += 1
            by_context[context][0] += gap
            by_context[context][1] += 1
        totals["busy_us"] += max(0.0, stop - max(start, end if end is not None else start))
        end = stop if end is None else max(end, stop)

    def ranked(table: dict[str, list[float]]) -> list[dict]:
        rows = [{"name": k, "ms_per_step": v[0] / 1e3 / steps, "gaps": int(v[1])} for k, v in table.items()]
        return sorted(rows, key=lambda r: -r["ms_per_step"])

    return {
        "idle_ms_per_step": totals["idle_us"] / 1e3 / steps,
        "busy_ms_per_step": totals["busy_us"] / 1e3 / steps,
        "gaps_per_step": totals["gaps"] / steps,
        "by_phase_ms_per_step": {k: v / 1e3 / steps for k, v in sorted(by_phase.items())},
        "by_op": ranked(by_op),
        "by_context": ranked(by_context),
    }


def profile_variant(
    variant: str, spec: Spec, min_gap_us: float, compiled: bool = False, warmup: int = 5
) -> dict:
    """Two profiled steps of ``variant`` (under ``torch.compile(model)`` if ``compiled``), each from an idle
    GPU, and :func:`idle_report` of their trace."""
    torch._dynamo.reset()
    model, ids, _, opt = prepare_variant(variant, spec, "cuda")
    forward = torch.compile(model) if compiled else model

    def step() -> None:
        with torch.profiler.record_function("forward"):
            loss = forward(input_ids=ids, labels=ids).loss
        with torch.profiler.record_function("backward"):
            loss.backward()
        if opt is not None:
            with torch.profiler.record_function("optimizer"):
                opt.step()
                opt.zero_grad(set_to_none=True)

    for _ in range(warmup):
        step()
    torch.cuda.synchronize()
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(STEPS):
            step()
            torch.cuda.synchronize()
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "trace.json"
        prof.export_chrome_trace(str(path))
        events = json.loads(path.read_text())["traceEvents"]
    return {"variant": variant, **idle_report(events, min_gap_us, STEPS)}


def render(results: list[dict], rows: int = 12) -> str:
    lines = []
    for r in results:
        phases = ", ".join(f"{k} {v:.2f}" for k, v in r["by_phase_ms_per_step"].items())
        lines += [
            f"\n### {r['variant']}: GPU busy {r['busy_ms_per_step']:.2f} ms, idle "
            f"{r['idle_ms_per_step']:.2f} ms per step ({r['gaps_per_step']:.0f} gaps; by phase: {phases})",
            "",
            "| launching host op | idle ms/step | gaps | | context | idle ms/step | gaps |",
            "|---|---|---|---|---|---|---|",
        ]
        for i in range(min(rows, max(len(r["by_op"]), len(r["by_context"])))):
            op = r["by_op"][i] if i < len(r["by_op"]) else None
            ctx = r["by_context"][i] if i < len(r["by_context"]) else None
            left = f"{op['name'][:60]} | {op['ms_per_step']:.3f} | {op['gaps']}" if op else " | | "
            right = f"{ctx['name'][:70]} | {ctx['ms_per_step']:.3f} | {ctx['gaps']}" if ctx else " | | "
            lines.append(f"| {left} | | {right} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = variants_parser(__doc__.split("\n\n")[0], "out/idle.json", "no-adapter,lorakit")
    parser.add_argument("--min-gap", type=float, default=2.0, help="shortest idle gap counted (µs)")
    parser.add_argument("--compile", action="store_true", help="run the model under torch.compile(model)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    if not torch.cuda.is_available():
        raise SystemExit("gpu_idle.py needs a CUDA GPU")
    spec = Spec(layers=args.layers)
    results = []
    for variant in args.variants.split(","):
        results.append(profile_variant(variant, spec, args.min_gap, args.compile))
        torch.cuda.empty_cache()  # the variant's model is gone with profile_variant's frame
        logger.info(
            "%s: idle %.2f ms per step %s", variant, results[-1]["idle_ms_per_step"],
            results[-1]["by_phase_ms_per_step"],
        )  # fmt: skip
    text = render(results)
    write_report(args.out, {"spec": asdict(spec), "min_gap_us": args.min_gap, "results": results}, text)
    print(text)


if __name__ == "__main__":
    main()
