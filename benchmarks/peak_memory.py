"""What is alive at a training step's peak memory, and where it was allocated.

``throughput.py`` reports each variant's peak (``torch.cuda.max_memory_allocated``); this says what the peak
is made of. Per variant it runs the throughput model's step a few times, then records one more step with
the CUDA caching allocator's history (``torch.cuda.memory._record_memory_history``, Python stacks), replays
the trace to find the moment of the peak, and reports:

* what was allocated before the step (parameters trained and frozen, buffers, optimizer state) and is still
  alive at the peak;
* the step's own allocations alive at the peak, summed by where they were made (the innermost frame in
  lorakit, PEFT, transformers, liger or this folder's scripts; a compiled graph's file otherwise);
* the allocation that reached the peak, with its stack.

Memory is deterministic where timings are not, so two variants' breakdowns show what one keeps that the
other does not. Needs a CUDA GPU.

    PYTHONPATH=src python benchmarks/peak_memory.py --variants peft-bf16-frozenA,lorakit-frozenA
    PYTHONPATH=src python benchmarks/peak_memory.py --compile --variants peft-bf16-frozenA,lorakit-frozenA
"""

from __future__ import annotations

import gc
import logging
from collections import defaultdict
from dataclasses import asdict

import torch
from throughput import Spec, liger_scope, liger_suffix, prepare_variant, variants_parser, write_report

logger = logging.getLogger("peak_memory")
WARMUP = 3
MiB = 2**20
ORIGINS = ("/lorakit/", "/peft/", "/transformers/", "/liger_kernel/", "/benchmarks/", "torchinductor")


def owned_tensors(model: torch.nn.Module, optimizer: object) -> dict[int, tuple[str, int]]:
    """``{data_ptr: (kind, bytes)}`` for the tensors a step finds already allocated: parameters (trained or
    frozen), buffers and the optimizer's state."""
    owned: dict[int, tuple[str, int]] = {}

    def add(tensor: torch.Tensor, kind: str) -> None:
        # a tensor seen before (a tied weight) keeps its first kind; its storage's size is the same
        if tensor.is_cuda and tensor.numel() and tensor.data_ptr() not in owned:
            dtype = str(tensor.dtype).removeprefix("torch.")
            owned[tensor.data_ptr()] = (f"{kind} ({dtype})", tensor.untyped_storage().nbytes())

    for parameter in model.parameters():
        add(parameter, "parameter, trained" if parameter.requires_grad else "parameter, frozen")
    for buffer in model.buffers():
        add(buffer, "buffer")
    for state in getattr(optimizer, "state", {}).values():
        for value in state.values():
            if isinstance(value, torch.Tensor):
                add(value, "optimizer state")
    return owned


def origin(frames: list[dict]) -> str:
    """``file:line function`` of the innermost frame in code this report is about (see :data:`ORIGINS`)."""
    if not frames:
        return "no Python frame (the autograd engine's backward thread, or C++)"
    for frame in frames:
        name = frame.get("filename", "")
        if any(marker in name for marker in ORIGINS) and "peak_memory.py" not in name:
            short = name.split("/site-packages/")[-1].split("/src/")[-1]
            return f"{short}:{frame.get('line')} {frame.get('name')}"
    return "other (torch internals)"


def replay(trace: list[dict], owned: dict[int, tuple[str, int]], before: int) -> dict:
    """The peak of ``before`` plus the step's allocations over the allocator ``trace``, and what is alive
    then."""
    live: dict[int, tuple[int, list[dict]]] = {}  # addr -> (size, frames) of the step's own allocations
    freed_owned: set[int] = set()
    total, peak, peak_at, peak_live, peak_freed = before, before, -1, {}, set()
    for index, event in enumerate(trace):
        action, addr, size = event["action"], event["addr"], event["size"]
        if action == "alloc":
            live[addr] = (size, event.get("frames", []))
            total += size
        elif action == "free_requested":  # where torch.cuda.memory_allocated() drops
            if addr in live:
                total -= live.pop(addr)[0]
            else:
                total -= size  # a block allocated before the trace began
                freed_owned.add(addr)
        else:
            continue
        if total > peak:
            peak, peak_at, peak_live, peak_freed = total, index, dict(live), set(freed_owned)
    by_origin: dict[str, int] = defaultdict(int)
    for size, frames in peak_live.values():
        by_origin[origin(frames)] += size
    kept: dict[str, int] = defaultdict(int)
    for ptr, (kind, size) in owned.items():
        if ptr not in peak_freed:
            kept[kind] += size
    kept["other, allocated before the step"] = before - sum(kept.values())
    at_peak = trace[peak_at] if peak_at >= 0 else {}
    return {
        "peak_mib": peak / MiB,
        "before_step_mib": {k: v / MiB for k, v in sorted(kept.items(), key=lambda kv: -kv[1])},
        "step_allocations_mib": {k: v / MiB for k, v in sorted(by_origin.items(), key=lambda kv: -kv[1])},
        "step_allocations_total_mib": sum(by_origin.values()) / MiB,
        "peak_event": {
            "index": peak_at,
            "of": len(trace),
            "size_mib": at_peak.get("size", 0) / MiB,
            "stack": [
                f"{f.get('filename', '').split('/site-packages/')[-1]}:{f.get('line')} {f.get('name')}"
                for f in at_peak.get("frames", [])[:12]
            ],
        },
    }


def analyse(variant: str, spec: Spec, compiled: bool) -> dict:
    gc.collect()  # an earlier variant's model, kept by reference cycles, would count as allocated before
    torch.cuda.empty_cache()
    torch._dynamo.reset()
    with liger_scope(bool(liger_suffix(variant))):
        model, _, step, optimizer = prepare_variant(variant, spec, "cuda", compiled)
        for _ in range(WARMUP):
            step()
        torch.cuda.synchronize()
        owned = owned_tensors(model, optimizer)
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        torch.cuda.memory._record_memory_history(max_entries=5_000_000, stacks="python")
        step()
        torch.cuda.synchronize()
        snapshot = torch.cuda.memory._snapshot()
        torch.cuda.memory._record_memory_history(enabled=None)
        reported = torch.cuda.max_memory_allocated()
    trace = snapshot["device_traces"][torch.cuda.current_device()]
    result = replay(trace, owned, before)
    result.update(variant=variant, compiled=compiled, max_memory_allocated_mib=reported / MiB)
    return result


def render(results: list[dict], title: str) -> str:
    lines = [f"## {title}\n"]
    for r in results:
        lines.append(
            f"\n### {r['variant']}: peak {r['peak_mib']:.1f} MiB (max_memory_allocated "
            f"{r['max_memory_allocated_mib']:.1f})\n\nAllocated before the step, alive at the peak:\n\n"
            "| kind | MiB |\n|---|---|\n"
        )
        lines += [f"| {k} | {v:.1f} |\n" for k, v in r["before_step_mib"].items()]
        lines.append(
            f"\nThe step's allocations alive at the peak ({r['step_allocations_total_mib']:.1f} MiB), by "
            "where they were made:\n\n| origin | MiB |\n|---|---|\n"
        )
        lines += [f"| `{k}` | {v:.1f} |\n" for k, v in list(r["step_allocations_mib"].items())[:25]]
        event = r["peak_event"]
        lines.append(
            f"\nThe peak was reached at event {event['index']} of {event['of']}, by an allocation of "
            f"{event['size_mib']:.1f} MiB:\n\n```\n"
            + ("\n".join(event["stack"]) or "(no Python frame: the autograd engine's backward thread)")
            + "\n```\n"
        )
    return "".join(lines)


def main() -> None:
    parser = variants_parser(__doc__, "out/peak_memory.json", "peft-bf16-frozenA,lorakit-frozenA")
    parser.add_argument("--compile", action="store_true", help="torch.compile the model")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    if not torch.cuda.is_available():
        raise SystemExit("peak_memory.py needs a CUDA GPU")
    spec = Spec(layers=args.layers)
    results = []
    for variant in args.variants.split(","):
        result = analyse(variant, spec, args.compile)
        logger.info("%s: peak %.1f MiB", variant, result["peak_mib"])
        results.append(result)
    mode = "torch.compile" if args.compile else "eager"
    write_report(
        args.out,
        {"spec": asdict(spec), "compiled": args.compile, "results": results},
        render(results, f"What is alive at the peak ({mode})"),
    )


if __name__ == "__main__":
    main()
