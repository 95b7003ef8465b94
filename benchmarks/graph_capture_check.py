"""The one-launch merge under CUDA-graph capture: off while capturing, and the captured group replays right.

Builds three bf16 siblings with float32 factors on the GPU, runs the grouped Function twice in eager (the
one-launch merge applies), then captures it in a CUDA graph: there the one-launch merge must not apply
(``fused._one_launch_applies`` is False, no table launch), and the replayed outputs must match a float32
reference (bf16 rel. err ≤ 1e-2). Exits non-zero otherwise. Needs a CUDA GPU with Triton.

    PYTHONPATH=src python benchmarks/graph_capture_check.py
"""

from __future__ import annotations

import torch

from lorakit.adapters import fused, grouped, triton_lora


def main() -> None:
    if not (torch.cuda.is_available() and triton_lora.AVAILABLE):
        raise SystemExit("graph_capture_check.py needs a CUDA GPU with Triton")
    outs, width, rank = (256, 64, 64), 256, 16
    weights = [torch.randn(o, width, device="cuda", dtype=torch.bfloat16) for o in outs]
    factors_a = [torch.randn(rank, width, device="cuda").requires_grad_() for _ in outs]
    factors_b = [torch.randn(o, rank, device="cuda").requires_grad_() for o in outs]
    tensors = (*weights, *factors_a, *factors_b)
    args = (weights, [None] * 3, factors_a, factors_b, [2.0] * 3)
    x = torch.randn(512, width, device="cuda", dtype=torch.bfloat16)
    in_eager = fused._one_launch_applies(False, tensors)
    launches = []
    launch = triton_lora.merge_lora_weights
    triton_lora.merge_lora_weights = lambda *a: launches.append(1) or launch(*a)
    side = torch.cuda.Stream()
    with torch.cuda.stream(side), torch.no_grad():
        for _ in range(2):  # warm-up outside the capture, as torch.cuda.graph asks
            grouped.lora_linear_group(x, *args)
        torch.cuda.synchronize()
        warm = len(launches)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            while_capturing = fused._one_launch_applies(False, tensors)
            ys = grouped.lora_linear_group(x, *args)
        graph.replay()
        torch.cuda.synchronize()
        trios = zip(weights, factors_a, factors_b, strict=True)
        want = [x.float() @ (w.float() + 2.0 * b @ a).t() for w, a, b in trios]
        error = max(float((y.float() - r).norm() / r.norm()) for y, r in zip(ys, want, strict=True))
    captured = len(launches) - warm
    print(
        f"one-launch merge in eager: {in_eager} ({warm} launches); while capturing: {while_capturing} "
        f"({captured} launches); replay rel. err {error:.2e}"
    )
    if not (in_eager and warm == 2 and not while_capturing and captured == 0 and error <= 1e-2):
        raise SystemExit("FAILED")


if __name__ == "__main__":
    main()
