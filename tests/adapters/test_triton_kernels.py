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


#: Defines ``fused_vs_float64(strategy, transposed, train, with_bias)``: the worst rel. error of lorakit's
#: fp16 fused path against the float64 reference over y and every gradient, with CPU tensors routed to the
#: Triton kernels (the interpreter). Prepended to the Function checks below.
FUSED_VS_FLOAT64 = textwrap.dedent(
    """
    import torch
    from lorakit.adapters import fused

    fused._use_triton = lambda kernel, t: kernel in fused.TRITON_KERNELS  # CPU tensors: the interpreter
    IN, OUT, R = 48, 40, 8

    def fused_vs_float64(strategy, transposed, train="AB", with_bias=False):
        x = torch.randn(3, 5, IN).half()
        w = (torch.randn(*((IN, OUT) if transposed else (OUT, IN))) / IN**0.5).half()
        bias = torch.randn(OUT).half() if with_bias else None
        a, b = torch.randn(R, IN) / IN**0.5, torch.randn(OUT, R)
        g = torch.randn(3, 5, OUT).half()
        outs = []
        for fn, cast, kw in (
            (fused.lora_linear, torch.float16, {"strategy": strategy}),
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
        return max(float((got - want).norm() / want.norm()) for got, want in zip(*outs))
    """
)


FUNCTION_CHECK = FUSED_VS_FLOAT64 + textwrap.dedent(
    """
    from lorakit.adapters import triton_lora as tk

    assert tk.AVAILABLE
    calls = {"merge": 0, "table merge": 0, "grad": 0}

    def counted(name, kernel):
        def run(*args):
            calls[name] += 1
            return kernel(*args)
        return run

    tk.merge_lora_weight = counted("merge", tk.merge_lora_weight)
    tk.merge_lora_weights = counted("table merge", tk.merge_lora_weights)
    tk.lora_grad_pass = counted("grad", tk.lora_grad_pass)
    fused.GRAD_PASS_IN_EAGER = True
    fused.UNMERGED_INPUT_GRAD = False  # backward rebuilds the merged weight, whatever the token count
    torch.manual_seed(0)
    worst = max(fused_vs_float64("merged", transposed) for transposed in (False, True))
    print(worst, calls)
    # forward + backward merge (Linear: the table launch; Conv1D: the per-weight one), one G/dB pass, per case
    assert calls == {"merge": 2, "table merge": 2, "grad": 2}, calls
    fused.ONE_LAUNCH_MERGE = False  # the per-weight launch for Linear too
    worst = max(worst, fused_vs_float64("merged", False))
    assert calls == {"merge": 4, "table merge": 2, "grad": 3}, calls
    # 15 tokens < 2·out: backward's dX = (G·sB) A + G W0, so the forward's merge is the only one
    fused.UNMERGED_INPUT_GRAD = True
    worst = max(worst, *(fused_vs_float64("merged", transposed) for transposed in (False, True)))
    assert calls == {"merge": 6, "table merge": 2, "grad": 5}, calls
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
    worst, runs = 0.0, 0
    configs = [
        GemmConfig(32, 32, 32, group_m=2, warps=4, stages=2),
        GemmConfig(32, 64, 16, group_m=1, warps=4, stages=2, flatten=True, split_store=True),
        GemmConfig(16, 32, 16, warps=4, stages=2, warp_specialize=True),
        None,  # the library's choice per layout
    ]
    # ragged M and N, K not a multiple of the block, r = 8 (a zero-padded slice) and 16
    shapes = [(100, 72, 48, 16), (64, 96, 64, 8), (33, 128, 40, 16), (130, 40, 80, 8)]
    for (M, N, K, R), config in zip(shapes, configs):
        for b_kn in (False, True):
            for v_rn in (False, True):
                for with_bias in (False, True):
                    a = torch.randn(M, K).half()
                    b = torch.randn(*((K, N) if b_kn else (N, K))).half()
                    u = torch.randn(M, R).half()
                    v = torch.randn(*((R, N) if v_rn else (N, R))).half()
                    bias = torch.randn(N).half() if with_bias else None
                    assert tg.supports(a.dtype, K, N, R)
                    c = tg.launch(a, b, u, v, bias, b_kn, v_rn, config)
                    want = a.double() @ (b.double() if b_kn else b.double().t())
                    want += u.double() @ (v.double() if v_rn else v.double().t())
                    if bias is not None:
                        want += bias.double()
                    assert c.shape == (M, N) and c.dtype == torch.float16
                    worst = max(worst, float((c.double() - want).norm() / want.norm()))
                    runs += 1
    # operands that TMA cannot take as they are: a transposed view and a start 2 bytes past alignment
    a = torch.randn(48, 100).half().t()
    w = torch.randn(72, 48).half()
    u_buf = torch.randn(100 * 16 + 1).half()
    u = u_buf[1:].view(100, 16)
    v = torch.randn(72, 16).half()
    c = tg.lora_gemm(a, w, u, v, b_kn=False, v_rn=False)
    want = a.double() @ w.double().t() + u.double() @ v.double().t()
    worst = max(worst, float((c.double() - want).norm() / want.norm()))
    # what the folded path cannot take
    assert not tg.supports(torch.float32, 64, 64, 16)
    assert not tg.supports(torch.float16, 64, 70, 16)  # a 140-byte output row
    assert not tg.supports(torch.float16, 64, 64, 4)  # an 8-byte u row
    assert not tg.supports(torch.float16, 64, 64, tg.MAX_RANK + 8)
    try:
        tg.launch(a, w, torch.randn(100, 32).half(), torch.randn(72, 32).half(), None, False, False)
    except ValueError as error:
        assert "MAX_RANK" in str(error)
    else:
        raise AssertionError("rank 32 > MAX_RANK was launched")
    print(worst, runs)
    assert runs == 32 and worst < 1e-3, worst
    """
)


def test_folded_gemm_matches_float64_under_the_interpreter() -> None:
    """The folded LoRA GEMM at ragged shapes, both layouts of each operand, bias, several block
    configurations (flattened loops, split store) and operands that must be copied before TMA takes them."""
    _interpret(GEMM_CHECK)


FOLDED_FUNCTION_CHECK = FUSED_VS_FLOAT64 + textwrap.dedent(
    """
    from lorakit.adapters import triton_gemm as tg

    calls = []
    launch = tg.lora_gemm

    def counted(*args, **kwargs):
        calls.append(kwargs)
        return launch(*args, **kwargs)

    tg.lora_gemm = counted
    torch.manual_seed(0)
    worst, cases = 0.0, 0
    for transposed in (False, True):
        for train in ("AB", "A", "B"):
            for with_bias in (False, True):
                worst = max(worst, fused_vs_float64("folded", transposed, train, with_bias))
                cases += 1
    # forward and input gradient per case, each with the weight in the layout its GEMM needs
    assert len(calls) == 2 * cases, len(calls)
    assert [c["b_kn"] for c in calls[:4]] == [False, True, False, True]  # nn.Linear weight (out, in)
    assert [c["b_kn"] for c in calls[-2:]] == [True, False]  # Conv1D weight (in, out)
    print(worst, len(calls))
    assert worst < 1e-2, worst
    """
)


def test_fused_function_with_the_folded_gemm_matches_float64_under_the_interpreter() -> None:
    """``strategy="folded"`` end to end: outputs and gradients of x, A, B against the float64 reference for
    train = AB / A / B, Linear and Conv1D layouts, with and without bias; frozen factors get no gradient."""
    _interpret(FOLDED_FUNCTION_CHECK)


#: An attention-like block whose q/k/v read one input and whose o reads another (``Attention``), for the
#: checks below that count kernel launches in an injected model.
ATTENTION = textwrap.dedent(
    """
    import lorakit
    from torch import nn

    class Attention(nn.Module):
        def __init__(self):
            super().__init__()
            self.q, self.k, self.v, self.o = (nn.Linear(32, 32) for _ in range(4))

        def forward(self, x):
            return self.o(torch.tanh(self.q(x)) * self.k(x) + self.v(x))
    """
)

#: Defines ``grouped_vs_float64(x, ws, rights, lefts, grads, scalings, train_a, train_b)``: the worst rel.
#: error of the fp16 grouped Function (three siblings, no biases, factors trainable as flagged) against the
#: float64 reference per sibling, over the outputs, dX and every factor's gradient. Prepended to the group
#: checks below.
GROUPED_VS_FLOAT64 = textwrap.dedent(
    """
    import torch
    from lorakit.adapters import fused, grouped

    def grouped_vs_float64(x, ws, rights, lefts, grads, scalings, train_a, train_b):
        outs = []
        for group, dtype in ((True, torch.float16), (False, torch.float64)):
            xs = x.to(dtype).requires_grad_(True)
            factor = torch.float64 if dtype == torch.float64 else torch.float32
            a_ = [r.to(factor, copy=True).requires_grad_(bool(t)) for r, t in zip(rights, train_a)]
            b_ = [l.to(factor, copy=True).requires_grad_(bool(t)) for l, t in zip(lefts, train_b)]
            w_ = [w.to(dtype) for w in ws]
            biases = [None] * len(ws)
            if group:
                ys = grouped.lora_linear_group(xs, w_, biases, a_, b_, scalings)
            else:
                ys = [fused.reference_lora_linear(xs, *one) for one in zip(w_, biases, a_, b_, scalings)]
            torch.autograd.backward(ys, [g.to(dtype) for g in grads])
            outs.append([*ys, xs.grad, *(t.grad for t in a_ + b_)])
        worst = 0.0
        for got, want in zip(*outs):
            assert (got is None) == (want is None)
            if want is not None:
                worst = max(worst, float((got.double() - want.detach()).norm() / want.detach().norm()))
        return worst
    """
)

GROUP_MERGE_CHECK = GROUPED_VS_FLOAT64 + (
    textwrap.dedent(
        """
    import torch
    from lorakit.adapters import fused, grouped
    from lorakit.adapters import triton_lora as tk

    assert tk.AVAILABLE
    torch.manual_seed(0)
    # one launch for siblings of different heights and ranks equals one merge kernel per sibling
    rows, ranks, n_cols = (70, 33, 129), (8, 4, 16), 100
    ws = [torch.randn(m, n_cols).half() for m in rows]
    lefts = [torch.randn(m, r) for m, r in zip(rows, ranks)]
    rights = [torch.randn(r, n_cols) for r in ranks]
    merged, a_rows, b_scaled = tk.merge_lora_weights(ws, lefts, rights, [0.5, 2.0, 1.5], True)
    start = 0
    for k, s in enumerate((0.5, 2.0, 1.5)):
        one, left_s, right_s = tk.merge_lora_weight(ws[k], lefts[k], rights[k], s)
        assert torch.equal(merged[k], one) and torch.equal(b_scaled[k], left_s), k
        assert torch.equal(a_rows[start : start + ranks[k]], right_s), k
        start += ranks[k]
    assert tk.merge_lora_weights(ws, lefts, rights, [0.5, 2.0, 1.5], False)[2] is None
    assert len(tk._GROUP_TABLES) == 1  # the second call found its tables

    # the grouped Function on the kernel (fp16, every sibling mix of trainable factors) against float64
    fused._use_triton = lambda kernel, t: kernel in fused.TRITON_KERNELS
    launches = []
    real = tk.merge_lora_weights
    tk.merge_lora_weights = lambda *args: launches.append(1) or real(*args)
    worst = 0.0
    mixes = (((1, 1, 1), (1, 1, 1)), ((1, 0, 1), (0, 1, 1)), ((0, 0, 0), (1, 1, 1)))
    # 24 tokens < 2·Σout: backward's dX skips the merged weights unless UNMERGED_INPUT_GRAD is off
    for unmerged, (train_a, train_b) in [(u, mix) for u in (False, True) for mix in mixes]:
        fused.UNMERGED_INPUT_GRAD = unmerged
        x = torch.randn(4, 6, n_cols)
        grads = [torch.randn(4, 6, m) for m in rows]
        a_in, b_in = [r / n_cols**0.5 for r in rights], [l * 0.1 for l in lefts]
        error = grouped_vs_float64(x, ws, a_in, b_in, grads, [0.5, 2.0, 1.5], train_a, train_b)
        worst = max(worst, error)
    print(worst, len(launches))
    # once per group call in forward, and in backward unless dX is unmerged (every sibling trains A)
    assert len(launches) == 6 + 5, launches
    assert worst < 1e-2, worst
    fused.UNMERGED_INPUT_GRAD = False

    # in a model: q/k/v read one input (one launch for the three), o reads another (a launch of its own)
    """
    )
    + ATTENTION
    + textwrap.dedent(
        """
    for train in ("AB", "B"):  # with train="B", A is a frozen buffer
        torch.manual_seed(0)
        model = Attention()
        lorakit.inject(model, lorakit.LoraConfig(r=4, targets=["q", "k", "v", "o"], train=train))
        with torch.no_grad():
            for _, layer in lorakit.lora_layers(model):
                layer.lora_B.normal_()
        sizes = []
        tk.merge_lora_weights = lambda *args: sizes.append(len(args[0])) or real(*args)
        x = torch.randn(2, 64, 32, requires_grad=True)  # 128 tokens: the merged strategy applies
        for _ in range(3):
            model(x).square().sum().backward()
        assert sizes == [1] * 8 + [3, 1, 1, 3] * 2, (train, sizes)  # the first forward probes: one by one
    """
    )
)


def test_group_merge_kernel_and_grouped_function_under_the_interpreter() -> None:
    """One merge launch for a sibling group: equal to a launch per sibling, and the grouped Function on it
    (mixes of trainable factors) against float64."""
    _interpret(GROUP_MERGE_CHECK)


GROUP_GRAD_CHECK = GROUPED_VS_FLOAT64 + (
    textwrap.dedent(
        """
    import torch
    from lorakit.adapters import fused, grouped
    from lorakit.adapters import triton_lora as tk

    assert tk.AVAILABLE
    torch.manual_seed(0)
    # the group kernel against float64: members of different widths and ranks, rows not a multiple of BLOCK_M
    tokens, widths, ranks = 70, (64, 16, 48), (8, 4, 16)
    grads = [torch.randn(tokens, n).half() for n in widths]
    b_s = [torch.randn(n, r).half() for n, r in zip(widths, ranks)]
    u = torch.randn(tokens, sum(ranks)).half()
    # the default configuration, and one that splits members into chunks of 16 and 32 columns (partial G rows
    # summed in float32, the last chunk of a row block to arrive storing them)
    for with_g, with_db, config in [
        (g, d, c) for g, d in ((True, True), (True, False), (False, True)) for c in (None, (16, 16, 4, 1, 32))
    ]:
        left = b_s if with_g else None
        g_cat, d_bs = tk.lora_grad_pass_group(grads, left, u if with_db else None, ranks, config)
        assert (g_cat is None) != with_g and (d_bs is None) != with_db
        col = 0
        for k, (g, b, r) in enumerate(zip(grads, b_s, ranks)):
            if with_g:
                want = g.double() @ b.double()
                got = g_cat[:, col : col + r].double()
                assert float((got - want).abs().max() / want.abs().max()) < 2e-3, k
            if with_db:
                want = g.double().t() @ u[:, col : col + r].double()
                assert d_bs[k].dtype == torch.float32 and d_bs[k].shape == (g.shape[1], r)
                assert float((d_bs[k].double() - want).abs().max() / want.abs().max()) < 1e-5, k
            col += r

    # its table holds shapes only: fresh gradients (new addresses, as every step brings) reuse it
    tables = len(tk._GROUP_TABLES)
    tk.lora_grad_pass_group([g.clone() for g in grads], [b.clone() for b in b_s], u.clone(), ranks)
    assert len(tk._GROUP_TABLES) == tables
    try:  # more members than the kernel has pointer arguments for: a clear error
        tk.lora_grad_pass_group(grads * 2, b_s * 2, torch.cat([u, u], dim=1), ranks * 2)
        raise AssertionError("six members were accepted")
    except ValueError as error:
        assert "1 to 4 members, got 6" in str(error), error

    # the grouped Function with the kernel on, against float64 (uniform and mixed trainable factors)
    fused._use_triton = lambda kernel, t: kernel in fused.TRITON_KERNELS
    fused.GRAD_PASS_IN_EAGER = True
    launches = []
    real = tk.lora_grad_pass_group
    tk.lora_grad_pass_group = lambda *args: launches.append(len(args[0])) or real(*args)
    n_cols, scalings = 32, [0.5, 2.0, 1.5]
    worst = 0.0
    mixes = (((1, 1, 1), (1, 1, 1)), ((0, 0, 0), (1, 1, 1)), ((1, 1, 1), (0, 0, 0)), ((1, 0, 1), (0, 1, 1)))
    # 24 tokens < 2·Σout: dX skips the merged weights (then every sibling wants G) unless switched off
    for unmerged, (train_a, train_b) in [(u, mix) for u in (False, True) for mix in mixes]:
        fused.UNMERGED_INPUT_GRAD = unmerged
        launches.clear()
        x = torch.randn(4, 6, n_cols)
        gs = [torch.randn(4, 6, m) for m in widths]
        rights = [torch.randn(r, n_cols) / n_cols**0.5 for r in ranks]
        lefts = [torch.randn(m, r) * 0.1 for m, r in zip(widths, ranks)]
        ws = [torch.randn(m, n_cols) for m in widths]
        worst = max(worst, grouped_vs_float64(x, ws, rights, lefts, gs, scalings, train_a, train_b))
        mixed = len(set(train_a)) > 1
        assert (set(launches) == {1}) if mixed else launches == [3], (train_a, train_b, launches)
    print(worst)
    assert worst < 1e-2, worst

    # in a model: q/k/v's upstream gradients in one launch, o's in a launch of its own (n = 1)
    """
    )
    + ATTENTION
    + textwrap.dedent(
        """
    for train in ("AB", "B"):  # with train="B", A is a frozen buffer: dB only
        torch.manual_seed(0)
        model = Attention().half()
        lorakit.inject(model, lorakit.LoraConfig(r=4, targets=["q", "k", "v", "o"], train=train))
        with torch.no_grad():
            for _, layer in lorakit.lora_layers(model):
                layer.lora_B.normal_()
        launches.clear()
        x = torch.randn(2, 64, 32).half().requires_grad_(True)  # 128 tokens: the merged strategy applies
        for _ in range(3):
            model(x).float().square().sum().backward()
        # the first forward probes (one by one); then o, and q/k/v as one
        assert launches == [1, 1, 1, 1] + [1, 3] * 2, (train, launches)
    """
    )
)


def test_group_grad_kernel_and_grouped_function_under_the_interpreter() -> None:
    """One launch for a sibling group's G_i and dB_i (``fused.GRAD_PASS_IN_EAGER``): against float64 at the
    kernel, in the grouped Function for uniform and mixed trainable factors, and in an injected model."""
    _interpret(GROUP_GRAD_CHECK)


PRODUCT_BACKWARD_CHECK = textwrap.dedent(
    """
    import torch
    from lorakit.adapters import fused
    from lorakit.adapters import triton_lora as tk

    assert tk.AVAILABLE
    torch.manual_seed(0)
    # ragged rows and columns; row chunks of one block and of several; one chunk for every row; no dA
    for tokens, n_cols, rank, config, with_g in [
        (70, 100, 8, (16, 32, 4, 1, 32), True),
        (64, 48, 16, (16, 16, 4, 1, 16), True),
        (33, 40, 4, None, True),
        (33, 40, 4, None, False),
    ]:
        a, b, dx = (torch.randn(tokens, n_cols).half() for _ in range(3))
        g = torch.randn(tokens, rank).half() if with_g else None
        d_a, d_b, d_lora = tk.product_backward(dx, a, b, g, config)
        # the input gradients round as torch's half multiplication does
        assert torch.equal(d_a, dx * b) and torch.equal(d_b, dx * a), (tokens, n_cols, config)
        if not with_g:
            assert d_lora is None
            continue
        want = g.double().t() @ (a * b).double()  # the product rounded as the forward rounded it
        assert d_lora.dtype == torch.float32 and d_lora.shape == (rank, n_cols)
        error = float((d_lora.double() - want).abs().max() / want.abs().max())
        assert error < 1e-5, (tokens, n_cols, rank, config, error)

    # a gated block's backward goes through the kernel, with the same gradients as with x kept
    fused._use_triton = lambda kernel, t: kernel in fused.TRITON_KERNELS
    launches = []
    real = tk.product_backward
    tk.product_backward = lambda *args: launches.append(1) or real(*args)
    w_gate, w_up = torch.randn(32, 24).half() / 5, torch.randn(32, 24).half() / 5
    w_down = torch.randn(24, 32).half() / 6
    a0, b0 = torch.randn(4, 32) / 6, torch.randn(24, 4)
    x0 = torch.randn(40, 24).half()
    grads = {}
    for recompute in (False, True):
        fused.RECOMPUTE_PRODUCT_INPUT = recompute
        x = x0.clone().requires_grad_(True)
        lora_a, lora_b = a0.clone().requires_grad_(True), b0.clone().requires_grad_(True)
        h = torch.nn.functional.silu(x @ w_gate.t()) * (x @ w_up.t())
        y = fused.lora_linear(h, w_down, None, lora_a, lora_b, 2.0, strategy="addmm")
        y.float().square().sum().backward()
        grads[recompute] = (x.grad, lora_a.grad, lora_b.grad)
    assert launches == [1]
    (dx, d_lora_a, d_lora_b), (dx_kept, d_lora_a_kept, d_lora_b_kept) = grads[True], grads[False]
    assert torch.equal(dx, dx_kept) and torch.equal(d_lora_b, d_lora_b_kept)
    # dA: float32 sums over the kernel's tiles against the half GEMM of the kept x
    assert float((d_lora_a - d_lora_a_kept).norm() / d_lora_a_kept.norm()) < 2e-3

    # the gated form: a is the gate before its SiLU, x = silu(a) * b, formed in float32 and rounded once
    def rel(got, want):
        return float((got.double() - want).abs().max() / want.abs().max())

    for tokens, n_cols, rank, config in [(70, 100, 8, (16, 32, 4, 1, 32)), (33, 40, 4, None)]:
        a, b, dx = (torch.randn(tokens, n_cols).half() for _ in range(3))
        g = torch.randn(tokens, rank).half()
        d_a, d_b, d_lora = real(dx, a, b, g, config, True)
        a64, b64, dx64 = a.double(), b.double(), dx.double()
        sig = torch.sigmoid(a64)
        assert rel(d_a, dx64 * b64 * sig * (1 + a64 * (1 - sig))) < 1e-3, (tokens, config)
        assert rel(d_b, dx64 * a64 * sig) < 1e-3, (tokens, config)
        assert rel(d_lora, g.double().t() @ (a64 * sig * b64)) < 2e-3, (tokens, config)

    # lora_gated_linear's backward goes through the kernel, with torch's gradients
    launches.clear()
    grads = {}
    for kernel in (False, True):
        fused._use_triton = lambda name, t, on=kernel: on and name in fused.TRITON_KERNELS
        x = x0.clone().requires_grad_(True)
        lora_a, lora_b = a0.clone().requires_grad_(True), b0.clone().requires_grad_(True)
        y = fused.lora_gated_linear(x @ w_gate.t(), x @ w_up.t(), w_down, None, lora_a, lora_b, 2.0)
        y.float().square().sum().backward()
        grads[kernel] = (x.grad, lora_a.grad, lora_b.grad)
    assert launches == [1]
    for got, want in zip(grads[True], grads[False], strict=True):
        assert rel(got, want.double()) < 5e-3
    """
)


def test_product_backward_kernel_under_the_interpreter() -> None:
    """The backward of x = a * b and a LoRA layer's dA in one pass (``fused.RECOMPUTE_PRODUCT_INPUT``): the
    input gradients bit for bit against torch, dA against float64, and a gated block's gradients equal to
    those with x kept; the gated form ``silu(a) * b`` against float64 and through ``lora_gated_linear``."""
    _interpret(PRODUCT_BACKWARD_CHECK)


RANK_CHECK = FUSED_VS_FLOAT64.replace(
    "IN, OUT, R = 48, 40, 8",
    "from lorakit.adapters import triton_lora as tk\nIN, OUT, R = 48, 40, tk.MAX_RANK + 1",
) + (
    textwrap.dedent(
        """
    from lorakit.adapters import triton_lora as tk

    def rel(got, want):
        return float((got.double() - want).abs().max() / want.abs().max())

    # every kernel at ranks whose tiles need smaller blocks (_fit_config), up to the largest it takes
    torch.manual_seed(0)
    for rank in (64, tk.MAX_RANK):
        w, left, right = torch.randn(40, 36).half(), torch.randn(40, rank), torch.randn(rank, 36)
        merged = tk.merge_lora_weight(w, left, right, 0.5)[0]
        assert rel(merged, w.double() + 0.5 * left.double() @ right.double()) < 2e-3, rank
        pair = ([w, w[:8].clone()], [left, left[:8].clone()], [right, right], [0.5, 0.5])
        grouped = tk.merge_lora_weights(*pair, True)
        assert torch.equal(grouped[0][0], merged) and torch.equal(grouped[0][1], merged[:8]), rank
        g, b_s, u = torch.randn(70, 48).half(), torch.randn(48, rank).half(), torch.randn(70, rank).half()
        gb, d_b = tk.lora_grad_pass(g, b_s, u)
        assert rel(gb, g.double() @ b_s.double()) < 2e-3, rank
        assert rel(d_b, g.double().t() @ u.double()) < 1e-5, rank
        members = ([g, g[:, :16].clone()], [b_s, b_s[:16].clone()], torch.cat([u, u], 1), (rank, rank))
        gb_group, d_bs = tk.lora_grad_pass_group(*members)
        assert torch.equal(gb_group[:, :rank], gb), rank
        assert rel(d_bs[1], g[:, :16].double().t() @ u.double()) < 1e-5, rank
        a, b, dx = (torch.randn(70, 40).half() for _ in range(3))
        for silu in (False, True):
            d_lora = tk.product_backward(dx, a, b, u, None, silu)[2]
            x = (torch.nn.functional.silu(a.double()) if silu else a.double()) * b.double()
            assert rel(d_lora, u.double().t() @ x) < 2e-3, (rank, silu)

    # above MAX_RANK the fused path runs torch ops: no kernel is called, and the results are the same
    calls = []
    kernels = ("merge_lora_weight", "merge_lora_weights", "lora_grad_pass", "lora_grad_pass_group")
    for name in (*kernels, "product_backward"):
        setattr(tk, name, lambda *args, name=name: calls.append(name))
    fused.GRAD_PASS_IN_EAGER = True
    cases = [(transposed, train) for transposed in (False, True) for train in ("AB", "B")]
    worst = max(fused_vs_float64("merged", transposed, train) for transposed, train in cases)
    assert calls == [] and worst < 1e-2, (calls, worst)
    """
    )
)


def test_kernels_at_large_ranks_and_torch_ops_above_the_largest_under_the_interpreter() -> None:
    """Each kernel at ranks 64 and ``MAX_RANK`` (smaller blocks) against float64; above ``MAX_RANK`` the fused
    path calls no kernel and still matches float64."""
    _interpret(RANK_CHECK)
