"""The Triton kernels of ``lorakit.adapters.triton_lora`` and ``triton_gemm``, run by the CPU interpreter.

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


def _interpret(code: str) -> None:
    """Run ``code`` in a fresh Python with ``TRITON_INTERPRET=1``; it must exit cleanly."""
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout + done.stderr


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
    _interpret(CHECK)


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
    _interpret(FUNCTION_CHECK)


GEMM_CHECK = textwrap.dedent(
    """
    import torch
    from lorakit.adapters import triton_gemm as tg
    from lorakit.adapters.triton_gemm import GemmConfig

    assert tg.AVAILABLE
    torch.manual_seed(0)
    worst, runs = {"c": 0.0, "p": 0.0, "dw": 0.0}, 0

    def rel(got, want):
        return float((got.double() - want).norm() / want.norm())

    def reference(a, b, down, up, bias, w, b_kn, factors_kn):
        b, down, up = b.double(), down.double(), up.double()
        p = a.double() @ (down if factors_kn else down.t())
        c = a.double() @ (b if b_kn else b.t()) + p.half().double() @ (up if factors_kn else up.t())
        if bias is not None:
            c += bias.double()
        return c, p, a.double().t() @ w.double()

    configs = [
        GemmConfig(32, 32, 32, group_m=2, warps=4, stages=2),
        GemmConfig(32, 64, 16, group_m=1, warps=4, stages=2, flatten=True, split_store=True),
        GemmConfig(16, 32, 16, warps=4, stages=2, warp_specialize=True),
        None,  # the library's choice per layout
    ]
    # ragged M and N, K not a multiple of the block, r = 8 (a zero-padded slice) and 16; more column blocks
    # than reduction steps (the last shape), so some column blocks add no part of aᵀ·w
    shapes = [(100, 72, 48, 16), (64, 96, 64, 8), (33, 128, 40, 16), (130, 160, 32, 8)]
    for (M, N, K, R), config in zip(shapes, configs):
        for b_kn in (False, True):
            for factors_kn in (False, True):
                for with_bias in (False, True):
                    a = torch.randn(M, K).half()
                    b = torch.randn(*((K, N) if b_kn else (N, K))).half()
                    down = torch.randn(*((K, R) if factors_kn else (R, K))).half()
                    up = torch.randn(*((R, N) if factors_kn else (N, R))).half()
                    bias = torch.randn(N).half() if with_bias else None
                    w = torch.randn(M, R).half()
                    assert tg.supports(a.dtype, K, N, R)
                    c, p, dw = tg.launch(a, b, down, up, bias, b_kn, factors_kn, True, w, config)
                    want = reference(a, b, down, up, bias, w, b_kn, factors_kn)
                    assert c.shape == (M, N) and c.dtype == torch.float16
                    assert p.shape == (M, R) and dw.shape == (K, R) and dw.dtype == torch.float32
                    for key, got, ref in zip(("c", "p", "dw"), (c, p, dw), want):
                        worst[key] = max(worst[key], rel(got, ref))
                    runs += 1
    # what is not asked for is not returned; operands that TMA cannot take as they are (a transposed view,
    # a start 2 bytes past alignment) are copied
    a = torch.randn(48, 100).half().t()
    w = torch.randn(72, 48).half()
    down_buf = torch.randn(16 * 48 + 1).half()
    down = down_buf[1:].view(16, 48)
    up = torch.randn(72, 16).half()
    c, p, dw = tg.lora_gemm(a, w, down, up, b_kn=False, factors_kn=False)
    assert p is None and dw is None
    want = reference(a, w, down, up, None, torch.zeros(100, 16).half(), False, False)[0]
    worst["c"] = max(worst["c"], rel(c, want))
    # what the folded path cannot take
    assert not tg.supports(torch.float32, 64, 64, 16)
    assert not tg.supports(torch.float16, 64, 70, 16)  # a 140-byte output row
    assert not tg.supports(torch.float16, 64, 64, 4)  # an 8-byte p row
    assert not tg.supports(torch.float16, 64, 64, tg.MAX_RANK + 8)
    try:
        tg.launch(a, w, torch.randn(32, 48).half(), torch.randn(72, 32).half(), None, False, False)
    except ValueError as error:
        assert "MAX_RANK" in str(error)
    else:
        raise AssertionError("rank 32 > MAX_RANK was launched")
    print(worst, runs)
    assert runs == 32 and worst["c"] < 1e-3 and worst["p"] < 1e-3 and worst["dw"] < 1e-6, worst
    """
)


def test_folded_gemm_matches_float64_under_the_interpreter() -> None:
    """The folded LoRA GEMM (``c``, the rank-r projection ``p`` from the same pass, ``aᵀ·w`` by atomics) at
    ragged shapes, both layouts of each operand, bias, several block configurations (flattened loops, split
    store, warp specialization) and operands that must be copied before TMA takes them."""
    _interpret(GEMM_CHECK)


FOLDED_FUNCTION_CHECK = textwrap.dedent(
    """
    import torch
    from lorakit.adapters import fused, triton_gemm as tg

    calls = []
    launch = tg.lora_gemm

    def counted(*args, **kwargs):
        calls.append(kwargs)
        return launch(*args, **kwargs)

    tg.lora_gemm = counted
    fused._use_triton = lambda kernel, t: kernel in fused.TRITON_KERNELS  # CPU tensors: the interpreter
    torch.manual_seed(0)
    IN, OUT, R = 48, 40, 8
    worst, cases = 0.0, 0
    for transposed in (False, True):
        for train in ("AB", "A", "B"):
            for with_bias in (False, True):
                x = torch.randn(3, 5, IN).half()
                w = (torch.randn(*((IN, OUT) if transposed else (OUT, IN))) / IN**0.5).half()
                bias = torch.randn(OUT).half() if with_bias else None
                a, b = torch.randn(R, IN) / IN**0.5, torch.randn(OUT, R)
                g = torch.randn(3, 5, OUT).half()
                outs = []
                for fn, cast, kw in (
                    (fused.lora_linear, torch.float16, {"strategy": "folded"}),
                    (fused.reference_lora_linear, torch.float64, {}),
                ):
                    xs = x.to(cast).clone().requires_grad_(True)
                    factor = torch.float64 if cast == torch.float64 else torch.float32
                    a_ = a.to(factor).clone().requires_grad_("A" in train)
                    b_ = b.to(factor).clone().requires_grad_("B" in train)
                    bias_ = None if bias is None else bias.to(cast)
                    y = fn(xs, w.to(cast), bias_, a_, b_, 2.0, 0.0, False, transposed, **kw)
                    y.backward(g.to(cast))
                    assert (a_.grad is None) == ("A" not in train) and (b_.grad is None) == ("B" not in train)
                    grads = [t.grad for t in (a_, b_) if t.requires_grad]
                    outs.append([t.detach().double() for t in (y, xs.grad, *grads)])
                for got, want in zip(*outs):
                    worst = max(worst, float((got - want).norm() / want.norm()))
                cases += 1
    # forward and input gradient per case, each with the weight in the layout its GEMM needs; p is kept
    # where a gradient needs it (u for dB, G for dA), and dB comes from the input-gradient pass
    assert len(calls) == 2 * cases, len(calls)
    assert [c["b_kn"] for c in calls[:4]] == [False, True, False, True]  # nn.Linear weight (out, in)
    assert [c["b_kn"] for c in calls[-2:]] == [True, False]  # Conv1D weight (in, out)
    trains = [t for _ in (False, True) for t in ("AB", "A", "B") for _ in (False, True)]
    for train, forward, backward in zip(trains, calls[::2], calls[1::2]):
        assert forward["store_p"] == ("B" in train) and "w" not in forward
        assert backward["store_p"] == ("A" in train) and (backward["w"] is not None) == ("B" in train)
    print(worst, len(calls))
    assert worst < 1e-2, worst
    """
)


def test_fused_function_with_the_folded_gemm_matches_float64_under_the_interpreter() -> None:
    """``strategy="folded"`` end to end: outputs and gradients of x, A, B against the float64 reference for
    train = AB / A / B, Linear and Conv1D layouts, with and without bias; frozen factors get no gradient."""
    _interpret(FOLDED_FUNCTION_CHECK)
