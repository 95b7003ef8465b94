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
