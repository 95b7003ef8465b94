"""Where an eager training step's host (CPU) time goes: whole steps of a tiny model, under ``cProfile``.

``host_overhead.py`` times one adapted projection; this runs whole training steps of the throughput model
at a width where every GPU kernel is shorter than its launch (default: 16 layers at hidden 128, 1 × 1024
tokens), so a step's wall time is the host's time. Per variant it reports the median step time over
``--steps`` steps, then profiles ``--profiled`` more with ``cProfile`` (backward in the calling thread) and
lists the functions with the most time of their own (``tottime``) and in total (``cumtime``). The token
count is chosen so that each kind of projection runs the same code as at hidden 2048 with 8192 tokens:
merged q/k/v, o and down in backward, gate/up without the merged weight (``fused._merge_for_input_grad``).

    PYTHONPATH=src python3 benchmarks/host_profile.py --variants no-adapter,lorakit --out out/host.json
"""

from __future__ import annotations

import argparse
import cProfile
import io
import logging
import pstats
import statistics
import time
from dataclasses import asdict
from pathlib import Path

import torch
from throughput import Spec, prepare_variant, write_report

logger = logging.getLogger("host_profile")


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def profile_variant(variant: str, spec: Spec, device: str, steps: int, profiled: int, rows: int) -> dict:
    """Median step ms, and the top ``rows`` functions by own and by total time over ``profiled`` steps."""
    _, _, step, _ = prepare_variant(variant, spec, device)
    for _ in range(5):
        step()
    _sync(device)
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        step()
        _sync(device)
        times.append((time.perf_counter() - start) * 1e3)
    profiler = cProfile.Profile()
    # On CUDA the autograd engine runs backward in a thread of its own, which cProfile does not see; here it
    # runs in this thread.
    with torch.autograd.set_multithreading_enabled(False):
        profiler.enable()
        for _ in range(profiled):
            step()
        _sync(device)
        profiler.disable()
    table = {}
    for key in ("tottime", "cumtime"):
        text = io.StringIO()
        pstats.Stats(profiler, stream=text).sort_stats(key).print_stats(rows)
        table[key] = text.getvalue()
    return {
        "variant": variant,
        "step_ms": statistics.median(times),
        "step_ms_runs": times,
        "profiled_steps": profiled,
        "profiled_s": pstats.Stats(profiler).total_tt,
        "top": table,
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--variants", default="no-adapter,peft-bf16,lorakit", help="throughput.py variants")
    parser.add_argument("--layers", type=int, default=16, help="decoder layers")
    parser.add_argument("--hidden", type=int, default=128, help="model width")
    parser.add_argument("--intermediate", type=int, default=512, help="MLP width")
    parser.add_argument("--tokens", type=int, default=1024, help="tokens per step (one sequence)")
    parser.add_argument("--steps", type=int, default=20, help="timed steps per variant")
    parser.add_argument("--profiled", type=int, default=5, help="steps under cProfile per variant")
    parser.add_argument("--rows", type=int, default=30, help="functions listed per ranking")
    parser.add_argument("--device", default="cuda", help="cuda (cpu only to try the script)")
    parser.add_argument(
        "--out", type=Path, default=Path("out/host_profile.json"), help="JSON path (.md beside)"
    )
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    spec = Spec(
        layers=args.layers, hidden=args.hidden, intermediate=args.intermediate, heads=4, kv_heads=2,
        vocab=1000, batch=1, seq=args.tokens,
    )  # fmt: skip
    results = []
    for variant in args.variants.split(","):
        result = profile_variant(variant, spec, args.device, args.steps, args.profiled, args.rows)
        logger.info("%s: %.1f ms per step (host-bound)", variant, result["step_ms"])
        results.append(result)
    lines = [
        f"Host time per eager step, {args.layers} layers at hidden {args.hidden}, {args.tokens} tokens\n"
    ]
    for result in results:
        lines.append(f"\n### {result['variant']}: {result['step_ms']:.1f} ms per step\n")
        for key in ("tottime", "cumtime"):
            lines.append(f"\n```\n{result['top'][key]}\n```\n")
    write_report(args.out, {"spec": asdict(spec), "results": results}, "".join(lines))


if __name__ == "__main__":
    main()
