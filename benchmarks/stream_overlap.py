"""Can the rank-r LoRA kernels hide behind the base GEMM on a second CUDA stream? Timings per projection.

The fused path (``lorakit.adapters.fused``, merged strategy) runs, per adapted projection, a compute-bound
base GEMM and a few memory-bound rank-r kernels that do not depend on it:

* forward: merge ``W' = W0 + s·B A`` → ``y = x W'ᵀ`` (main) and ``u = x (sA)ᵀ`` (independent of ``y``);
* backward: merge → ``dX = dY W'`` (main) and ``G = dY sB``, ``dB = dYᵀ u``, ``dA = Gᵀ x`` (independent of
  ``dX``).

This script times each projection shape of the default throughput model (T tokens, bf16) two ways: serial
(everything on one stream, with the kernels the library uses under ``torch.compile``, launched eagerly) and
overlapped (the rank-r kernels on a side stream that waits for the merge, the base GEMM on the main stream,
then the main stream waits for the side one). It also times the parts alone, each with L2 flushed, for
``ideal = merge + max(GEMM, rank-r)``: a guide to how much of the rank-r time an overlap could hide, not a
strict bound. Overlapped results are checked against serial ones before timing. The small shapes are bound
by host launch time in this setting, so their per-call times are not GPU times. Needs a CUDA GPU and Triton.

    PYTHONPATH=src python benchmarks/stream_overlap.py --out out/stream_overlap.json
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import torch
from kernel_bench import bench_ms, distinct_shapes, environment, per_step_parser, start

from lorakit.adapters import triton_lora
from lorakit.utils import atomic_write_json

logger = logging.getLogger("stream_overlap")
REP_MS = 100  # do_bench time budget per measurement


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-30))


class Projection:
    """Tensors of one adapted projection and its forward/backward work, serial or on two streams."""

    def __init__(self, in_f: int, out_f: int, tokens: int, rank: int) -> None:
        dev, dt = "cuda", torch.bfloat16
        self.x = torch.randn(tokens, in_f, device=dev, dtype=dt)
        self.g = torch.randn(tokens, out_f, device=dev, dtype=dt)
        self.w = torch.randn(out_f, in_f, device=dev, dtype=dt) / in_f**0.5
        self.a = torch.randn(rank, in_f, device=dev) / in_f**0.5
        self.b = torch.randn(out_f, rank, device=dev) * 1e-2
        self.side = torch.cuda.Stream()
        _, _, a_s = self.merge()
        self.u = self.x @ a_s.t()

    def merge(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(W0 + s·B A, s·B, s·A) in bf16, as the fused path builds them."""
        return triton_lora.merge_lora_weight(self.w, self.b, self.a, 2.0)

    # Each rank-r part below allocates its outputs on the stream it runs on; the overlapped versions mark
    # them as used by the main stream before they return (what the caching allocator needs to be safe).
    def forward_rank_r(self, a_s: torch.Tensor) -> torch.Tensor:
        return self.x @ a_s.t()

    def backward_rank_r(self, b_s: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        gb, d_b = triton_lora.lora_grad_pass(self.g, b_s, self.u)
        return torch.ops.aten.mm.dtype(gb.t(), self.x, torch.float32), d_b

    def forward_serial(self):
        merged, _, a_s = self.merge()
        return self.x @ merged.t(), self.forward_rank_r(a_s)

    def backward_serial(self):
        merged, b_s, _ = self.merge()
        return self.g @ merged, *self.backward_rank_r(b_s)

    def _on_side(self, work: Callable[[], tuple[torch.Tensor, ...]], main_work: Callable[[], torch.Tensor]):
        main = torch.cuda.current_stream()
        self.side.wait_stream(main)
        with torch.cuda.stream(self.side):
            side_out = work()
        main_out = main_work()
        main.wait_stream(self.side)
        for t in side_out:
            t.record_stream(main)
        return main_out, *side_out

    def forward_overlapped(self):
        merged, _, a_s = self.merge()
        return self._on_side(lambda: (self.forward_rank_r(a_s),), lambda: self.x @ merged.t())

    def backward_overlapped(self):
        merged, b_s, _ = self.merge()
        return self._on_side(lambda: self.backward_rank_r(b_s), lambda: self.g @ merged)

    def parts(self) -> dict[str, Callable[[], object]]:
        merged, b_s, a_s = self.merge()
        return {
            "merge": self.merge,
            "forward_gemm": lambda: self.x @ merged.t(),
            "forward_rank_r": lambda: self.forward_rank_r(a_s),
            "backward_gemm": lambda: self.g @ merged,
            "backward_rank_r": lambda: self.backward_rank_r(b_s),
        }


def measure(in_f: int, out_f: int, tokens: int, rank: int) -> dict:
    proj = Projection(in_f, out_f, tokens, rank)
    for direction in ("forward", "backward"):
        serial = getattr(proj, f"{direction}_serial")()
        overlapped = getattr(proj, f"{direction}_overlapped")()
        torch.cuda.synchronize()
        errors = [_rel(o, s) for o, s in zip(overlapped, serial, strict=True)]
        if max(errors) > 1e-3:
            raise SystemExit(f"{direction} ({in_f}→{out_f}): overlapped differs from serial, {errors}")
    row = {"in": in_f, "out": out_f, "parts_ms": {k: bench_ms(fn, REP_MS) for k, fn in proj.parts().items()}}
    for direction in ("forward", "backward"):
        parts = row["parts_ms"]
        row[direction] = {
            "serial_ms": bench_ms(getattr(proj, f"{direction}_serial"), REP_MS),
            "overlapped_ms": bench_ms(getattr(proj, f"{direction}_overlapped"), REP_MS),
            "ideal_ms": parts["merge"] + max(parts[f"{direction}_gemm"], parts[f"{direction}_rank_r"]),
            "rank_r_ms": parts[f"{direction}_rank_r"],
        }
    return row


def main() -> None:
    parser = per_step_parser(__doc__, "out/stream_overlap.json")
    parser.add_argument("--rank", type=int, default=16, help="LoRA rank r (16)")
    args = parser.parse_args()
    start("stream_overlap.py", "a CUDA GPU and Triton", torch.cuda.is_available() and triton_lora.AVAILABLE)
    rows, totals = {}, {}
    for name, ((in_f, out_f), count) in distinct_shapes().items():
        row = rows[name] = measure(in_f, out_f, args.tokens, args.rank)
        for direction in ("forward", "backward"):
            for key, ms in row[direction].items():
                totals[f"{direction}_{key}"] = (
                    totals.get(f"{direction}_{key}", 0.0) + ms * count * args.layers
                )
            logger.info(
                "%-8s %-8s serial %.4f  overlapped %.4f  ideal %.4f  (rank-r alone %.4f) ms",
                name,
                direction,
                *(row[direction][k] for k in ("serial_ms", "overlapped_ms", "ideal_ms", "rank_r_ms")),
            )
    logger.info("per step of %d layers (ms): %s", args.layers, {k: round(v, 2) for k, v in totals.items()})
    atomic_write_json(args.out, {"env": environment(vars(args)), "projections": rows, "per_step_ms": totals})


if __name__ == "__main__":
    main()
