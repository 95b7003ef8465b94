"""Shared pieces of the per-shape GPU kernel benchmarks (``rank_r_kernels.py``, ``folded_u_gemm.py``,
``stream_overlap.py``, ``triton_gemm_headroom.py``, ``folded_gemm.py``, ``grouped_projections.py``): the
projection shapes of the default model of ``throughput.py`` (Llama, hidden 2048, MLP 8192, 32 heads / 8 KV
heads), a ``do_bench`` timer, a float64 relative error, a GPU warm-up, the environment record, and the
command line and start-up of the scripts that total per step."""

from __future__ import annotations

import argparse
import logging
import subprocess
from collections.abc import Callable
from pathlib import Path

import torch

#: (in, out) of each adapted projection of one decoder layer
PROJECTIONS = {
    "q": (2048, 2048),
    "k": (2048, 512),
    "v": (2048, 512),
    "o": (2048, 2048),
    "gate": (2048, 8192),
    "up": (2048, 8192),
    "down": (8192, 2048),
}


def distinct_shapes() -> dict[str, tuple[tuple[int, int], int]]:
    """Each distinct (in, out) once, named after its projections (e.g. "q/o"), with its count per layer."""
    names: dict[tuple[int, int], list[str]] = {}
    for name, shape in PROJECTIONS.items():
        names.setdefault(shape, []).append(name)
    return {"/".join(group): (shape, len(group)) for shape, group in names.items()}


def bench_ms(fn: Callable[[], object], rep: int) -> float:
    """Median ms per call of ``fn`` over about ``rep`` ms (``triton.testing.do_bench``, L2 flushed)."""
    from triton.testing import do_bench

    return float(do_bench(fn, rep=rep, return_mode="median"))


def kernel_ms(fn: Callable[[], object], calls: int = 50) -> float:
    """GPU time of ``fn``'s kernels per call (ms), summed from the profiler's device events over ``calls``
    back-to-back calls. Unlike :func:`bench_ms`, host time between launches does not count, so kernels
    shorter than their launch can be compared (L2 is not flushed)."""
    from torch.profiler import ProfilerActivity, profile

    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(calls):
            fn()
        torch.cuda.synchronize()
    device_us = sum(e.self_device_time_total for e in prof.key_averages() if e.self_device_time_total > 0)
    return device_us / calls / 1e3


def rel_err(got: torch.Tensor, want: torch.Tensor) -> float:
    """``‖got − want‖ / ‖want‖`` in float64."""
    want = want.double()
    return float((got.double() - want).norm() / want.norm())


def steady_clocks(rep: int = 100) -> None:
    """Run a large GEMM first: without it, the first shape's timings came out up to 2× slow."""
    warm = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    bench_ms(lambda: warm @ warm, rep)


def per_step_parser(description: str, out: str) -> argparse.ArgumentParser:
    """``--tokens``, ``--layers`` and ``--out`` (default ``out``), with ``description`` as the help text."""
    parser = argparse.ArgumentParser(
        description=description, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--tokens", type=int, default=8192, help="rows T of the activations (8192)")
    parser.add_argument("--layers", type=int, default=16, help="decoder layers, for the per-step totals")
    parser.add_argument("--out", type=Path, default=Path(out), help="JSON path")
    return parser


def start(script: str, needs: str, ready: bool) -> None:
    """Log to the console; exit with "``script`` needs ``needs``" unless ``ready``; warm the GPU up."""
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if not ready:
        raise SystemExit(f"{script} needs {needs}")
    steady_clocks()


def environment(settings: dict) -> dict:
    """GPU, torch and Triton versions, the git commit (None outside a checkout) and the script's settings."""
    import triton

    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True)
    return {
        "gpu": torch.cuda.get_device_name(),
        "torch": torch.__version__,
        "triton": triton.__version__,
        "commit": commit.stdout.strip() or None,
        "settings": settings,
    }
