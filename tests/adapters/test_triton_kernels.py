"""The Triton kernels of ``lorakit.adapters.triton_lora``, run by Triton's CPU interpreter.

CI has no GPU; ``TRITON_INTERPRET=1`` executes the same kernel code on CPU tensors (numpy underneath), so
indexing, masking at ragged edges, strides and the atomic accumulation are checked here. The GPU
benchmark checks the compiled kernels again before timing them. The flag is read when Triton decorates a
kernel, so the check runs in a fresh interpreter.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest

pytest.importorskip("triton", reason="Triton is not installed (the kernels are GPU-only; pip install triton)")

CHECK = textwrap.dedent(
    """
    import torch
    from lorakit.adapters import triton_lora as tk

    assert tk.AVAILABLE
    torch.manual_seed(0)
    worst = {}
    for M, N, R in [(200, 130, 16), (64, 256, 8), (129, 70, 4), (300, 2100, 16)]:
        w, left, right = torch.randn(M, N), torch.randn(M, R), torch.randn(R, N)
        merged, left_s, right_s = tk.merge_lora_weight(w, left, right, 0.5)
        ref = w.double() + 0.5 * left.double() @ right.double()
        worst["merge"] = max(worst.get("merge", 0), float((merged - ref).abs().max() / ref.abs().max()))
        assert torch.equal(left_s, left * 0.5) and torch.equal(right_s, right * 0.5)
        # the rank-r factors as views with non-unit strides, as the Conv1D path passes them
        g, b_s, u = torch.randn(M, N), torch.randn(R, N).t(), torch.randn(M, R)
        gb, d_b = tk.lora_grad_pass(g, b_s, u)
        assert gb.dtype == g.dtype and d_b.dtype == torch.float32
        assert gb.shape == (M, R) and d_b.shape == (N, R)
        refs = {"G": (gb, g.double() @ b_s.double()), "dB": (d_b, g.double().t() @ u.double())}
        for name, (got, want) in refs.items():
            worst[name] = max(worst.get(name, 0), float((got - want).abs().max() / want.abs().max()))
        rows, cols = tk.rows_pass(g, b_s, None, 32, 64)
        assert cols is None
        torch.testing.assert_close(rows, gb, rtol=1e-5, atol=1e-4)
    print(worst)
    assert max(worst.values()) < 1e-5, worst
    """
)


def test_kernels_match_float64_under_the_interpreter() -> None:
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    done = subprocess.run([sys.executable, "-c", CHECK], env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout + done.stderr


FUNCTION_CHECK = textwrap.dedent(
    """
    import torch
    from lorakit.adapters import fused, triton_lora as tk

    assert tk.AVAILABLE
    calls = {"merge": 0, "grad": 0}

    def counted(name, kernel):
        def run(*args):
            calls[name] += 1
            return kernel(*args)
        return run

    tk.merge_lora_weight = counted("merge", tk.merge_lora_weight)
    tk.lora_grad_pass = counted("grad", tk.lora_grad_pass)
    fused._use_triton = lambda kernel, t: kernel in fused.TRITON_KERNELS  # CPU tensors: the interpreter
    fused.GRAD_PASS_IN_EAGER = True
    torch.manual_seed(0)
    worst = 0.0
    IN, OUT, R = 48, 40, 8
    for transposed in (False, True):
        x = torch.randn(3, 5, IN).half()
        w = (torch.randn(*((IN, OUT) if transposed else (OUT, IN))) / IN**0.5).half()
        a, b = torch.randn(R, IN) / IN**0.5, torch.randn(OUT, R)
        g = torch.randn(3, 5, OUT).half()
        outs = []
        for fn, cast, kw in (
            (fused.lora_linear, torch.float16, {"strategy": "merged"}),
            (fused.reference_lora_linear, torch.float64, {}),
        ):
            xs = x.to(cast).clone().requires_grad_(True)
            factor = torch.float64 if cast == torch.float64 else torch.float32
            a_, b_ = (t.to(factor).clone().requires_grad_(True) for t in (a, b))
            y = fn(xs, w.to(cast), None, a_, b_, 2.0, 0.0, False, transposed, **kw)
            y.backward(g.to(cast))
            outs.append([t.detach().double() for t in (y, xs.grad, a_.grad, b_.grad)])
        for got, want in zip(*outs):
            worst = max(worst, float((got - want).norm() / want.norm()))
    print(worst, calls)
    assert calls == {"merge": 4, "grad": 2}, calls  # forward + backward merge, one G/dB pass, per case
    assert worst < 1e-2, worst
    """
)


def test_fused_function_with_triton_kernels_matches_float64_under_the_interpreter() -> None:
    """The Function's Triton branches (merge kernel, one-pass G/dB with ``GRAD_PASS_IN_EAGER``) on fp16,
    Linear and Conv1D layouts, against the float64 reference."""
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    done = subprocess.run(
        [sys.executable, "-c", FUNCTION_CHECK], env=env, capture_output=True, text=True, timeout=600
    )
    assert done.returncode == 0, done.stdout + done.stderr
