"""The fused LoRA Function against the plain PyTorch reference (CPU): outputs and gradients."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from lorakit.adapters import fused
from lorakit.adapters.fused import dropout_mask, lora_linear, reference_lora_linear

IN, OUT, R = 12, 10, 4
TOL = {torch.float64: 1e-10, torch.float32: 1e-5}


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def make_inputs(dtype: torch.dtype, train: str, transposed: bool, bias: bool, seed: int):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(3, 5, IN, generator=g, dtype=dtype)
    weight = torch.randn(*((IN, OUT) if transposed else (OUT, IN)), generator=g, dtype=dtype) / IN**0.5
    b = torch.randn(OUT, generator=g, dtype=dtype) if bias else None
    # Factors are float32 masters in lorakit; in the float64 check they are float64 so both paths are exact.
    factor_dtype = torch.float64 if dtype == torch.float64 else torch.float32
    lora_a = torch.randn(R, IN, generator=g, dtype=factor_dtype) / IN**0.5
    lora_b = torch.randn(OUT, R, generator=g, dtype=factor_dtype)
    lora_a.requires_grad_("A" in train)
    lora_b.requires_grad_("B" in train)
    x.requires_grad_(True)
    grad_out = torch.randn(3, 5, OUT, generator=g, dtype=dtype)
    return x, weight, b, lora_a, lora_b, grad_out


def run(fn, x, weight, b, lora_a, lora_b, grad_out, p, transposed, mask, **kwargs):
    xs, a_, b_ = (t.detach().clone().requires_grad_(t.requires_grad) for t in (x, lora_a, lora_b))
    y = fn(xs, weight, b, a_, b_, 2.0, p, p > 0, transposed, dropout_mask=mask, **kwargs)
    y.backward(grad_out)
    return y.detach(), xs.grad, a_.grad, b_.grad


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("train", ["AB", "B", "A"])
@pytest.mark.parametrize("transposed", [False, True], ids=["linear", "conv1d"])
@pytest.mark.parametrize(("p", "strategy"), [(0.0, "merged"), (0.0, "addmm"), (0.0, "auto"), (0.3, "auto")])
def test_fused_matches_reference(dtype, train, transposed, p, strategy):
    inputs = make_inputs(dtype, train, transposed, bias=not transposed, seed=len(train) + 7 * transposed)
    x = inputs[0]
    mask = dropout_mask(x, p) if p > 0 else None
    got = run(lora_linear, *inputs, p, transposed, mask, strategy=strategy)
    want = run(reference_lora_linear, *inputs, p, transposed, mask)
    if mask is not None:
        assert 0 < mask.sum() < mask.numel()
    for name, g, w in zip(("y", "dx", "dA", "dB"), got, want, strict=True):
        if w is None:
            assert g is None, f"{name}: frozen factor got a gradient"
            continue
        assert g.dtype == w.dtype, name
        assert rel_err(g, w) <= TOL[dtype], f"{name}: rel err {rel_err(g, w):.3g}"
    assert (got[2] is None) == ("A" not in train) and (got[3] is None) == ("B" not in train)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("train", ["AB", "B", "A"])
@pytest.mark.parametrize("transposed", [False, True], ids=["linear", "conv1d"])
def test_merged_strategy_input_grad_saved_rebuilt_or_unmerged(dtype, train, transposed, monkeypatch):
    """The merged strategy's backward: on the merged weight saved by forward, on one it rebuilds, or as
    dX = (G·sB) A + G W0 without it (15 tokens < 2·out = 20, A trained); one function all three ways.
    ``save_merged_weight`` keeps the weight only where backward would rebuild it."""
    inputs = make_inputs(dtype, train, transposed, bias=True, seed=3 + len(train))
    merges = []
    real_merge = fused._merge
    monkeypatch.setattr(fused, "_merge", lambda *args: merges.append(1) or real_merge(*args))
    monkeypatch.setattr(fused, "UNMERGED_INPUT_GRAD", False)  # every backward on the merged weight
    got = run(lora_linear, *inputs, 0.0, transposed, None, strategy="merged", save_merged_weight=True)
    assert len(merges) == 1, "backward rebuilt the merged weight although forward saved it"
    rebuilt = run(lora_linear, *inputs, 0.0, transposed, None, strategy="merged")
    assert len(merges) == 3, "without save_merged_weight, backward rebuilds the merged weight"
    monkeypatch.setattr(fused, "UNMERGED_INPUT_GRAD", True)
    unmerged = run(lora_linear, *inputs, 0.0, transposed, None, strategy="merged")
    # with A frozen no G = dY·sB is computed for dA, and backward rebuilds the merged weight after all
    assert len(merges) == (4 if "A" in train else 5), "with few tokens and A trained, dX needs no merge"
    saved_where_rebuilt = run(
        lora_linear, *inputs, 0.0, transposed, None, strategy="merged", save_merged_weight=True
    )
    assert len(merges) == (5 if "A" in train else 6), "backward rebuilt a merged weight that was saved"
    want = run(reference_lora_linear, *inputs, 0.0, transposed, None)
    outputs = zip(("y", "dx", "dA", "dB"), got, rebuilt, unmerged, saved_where_rebuilt, want, strict=True)
    for name, g, r, m, s, w in outputs:
        if w is None:
            assert g is None and m is None and s is None, f"{name}: frozen factor got a gradient"
            continue
        assert torch.equal(s, m if "A" in train else g), f"{name}: save_merged_weight changed the backward"
        assert torch.equal(g, r), f"{name}: saved and rebuilt merged weight give different results"
        assert rel_err(g, w) <= TOL[dtype], f"{name}: rel err {rel_err(g, w):.3g}"
        assert rel_err(m, w) <= TOL[dtype], f"{name} without the merged weight: rel err {rel_err(m, w):.3g}"


def test_input_grad_merges_only_where_that_moves_fewer_bytes(monkeypatch):
    # the 16-layer Llama of benchmarks/throughput.py at 8192 tokens: q/k/v (Σout 3072) merge, gate/up not
    assert fused._merge_for_input_grad(8192, 3072) and fused._merge_for_input_grad(8192, 4096)
    assert not fused._merge_for_input_grad(8192, 16384) and not fused._merge_for_input_grad(8191, 4096)
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)  # measured slower compiled
    assert fused._merge_for_input_grad(8192, 16384)
    monkeypatch.undo()
    monkeypatch.setattr(fused, "UNMERGED_INPUT_GRAD", False)
    assert fused._merge_for_input_grad(8192, 16384)


def test_same_seed_same_dropout_mask():
    x, weight, b, lora_a, lora_b, grad_out = make_inputs(torch.float64, "AB", False, True, seed=3)
    torch.manual_seed(11)
    got = run(lora_linear, x, weight, b, lora_a, lora_b, grad_out, 0.5, False, None)
    torch.manual_seed(11)
    want = run(reference_lora_linear, x, weight, b, lora_a, lora_b, grad_out, 0.5, False, None)
    for g, w in zip(got, want, strict=True):
        assert rel_err(g, w) <= 1e-10
    # Dropout really acts: without it the LoRA gradient differs.
    plain = run(lora_linear, x, weight, b, lora_a, lora_b, grad_out, 0.0, False, None)
    assert rel_err(plain[2], want[2]) > 1e-3


def test_eval_mode_ignores_dropout_and_no_grad_path():
    x, weight, b, lora_a, lora_b, _ = make_inputs(torch.float64, "AB", False, True, seed=5)
    ref = reference_lora_linear(x, weight, b, lora_a, lora_b, 2.0)
    got = lora_linear(x, weight, b, lora_a, lora_b, 2.0, dropout_p=0.5, training=False)
    assert rel_err(got, ref) <= 1e-10
    with torch.no_grad():
        got = lora_linear(x, weight, b, lora_a, lora_b, 2.0, strategy="merged")
    assert not got.requires_grad and rel_err(got, ref) <= 1e-10


def test_trainable_base_falls_back_to_autograd():
    x, weight, b, lora_a, lora_b, grad_out = make_inputs(torch.float64, "AB", False, True, seed=6)
    weight.requires_grad_(True)
    lora_linear(x, weight, b, lora_a, lora_b, 2.0).backward(grad_out)
    assert weight.grad is not None and lora_a.grad is not None


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"lora_A": torch.zeros(R, IN + 1)}, "lora_A"),
        ({"lora_B": torch.zeros(OUT, R + 1)}, "lora_B"),
        ({"bias": torch.zeros(OUT + 1)}, "bias"),
        ({"dropout_p": 1.0}, "dropout_p"),
        ({"strategy": "fast"}, "strategy"),
        ({"dropout_p": 0.2, "training": True, "strategy": "merged"}, "merged"),
        ({"dropout_p": 0.2, "training": True, "strategy": "folded"}, "folded.*cannot apply dropout"),
        ({"strategy": "folded"}, r"strategy='folded' needs Triton 3.4\+.*Hopper.*got torch.float32 on cpu"),
        (
            {"dropout_p": 0.2, "training": True, "dropout_mask": torch.ones(2, 2, dtype=torch.bool)},
            "dropout_mask",
        ),
    ],
)
def test_bad_input_raises(kwargs, match):
    args = {
        "x": torch.randn(2, IN),
        "weight": torch.randn(OUT, IN),
        "bias": None,
        "lora_A": torch.zeros(R, IN),
        "lora_B": torch.zeros(OUT, R),
        "scaling": 1.0,
    }
    args.update(kwargs)
    with pytest.raises(ValueError, match=match):
        lora_linear(**args)


class _Block(nn.Module):
    """Two chained LoRA linears with an activation, like an MLP with adapters."""

    def __init__(self) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.w1 = nn.Parameter(torch.randn(OUT, IN, generator=g), requires_grad=False)
        self.w2 = nn.Parameter(torch.randn(OUT, IN, generator=g), requires_grad=False)  # Conv1D layout
        self.a1 = nn.Parameter(torch.randn(R, IN, generator=g))
        self.b1 = nn.Parameter(torch.randn(OUT, R, generator=g))
        self.register_buffer("a2", torch.randn(R, OUT, generator=g))  # frozen A
        self.b2 = nn.Parameter(torch.randn(IN, R, generator=g))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu_(lora_linear(x, self.w1, None, self.a1, self.b1, 0.5, strategy="merged"))
        return lora_linear(h, self.w2, None, self.a2, self.b2, 0.5, transposed_weight=True, strategy="addmm")


@pytest.mark.parametrize("strategy", ["merged", "addmm"])
def test_output_can_be_modified_in_place(strategy):
    """An autograd.Function output that is a view could not be (e.g. ReLU(inplace=True) after the layer)."""
    x, weight, b, lora_a, lora_b, _ = make_inputs(torch.float64, "AB", False, bias=True, seed=3)
    grads = []
    for fn, kwargs in ((lora_linear, {"strategy": strategy}), (reference_lora_linear, {})):
        for t in (x, lora_a, lora_b):
            t.grad = None
        y = fn(x, weight, b, lora_a, lora_b, 2.0, **kwargs)
        torch.relu_(y).square().sum().backward()
        grads.append([t.grad.clone() for t in (x, lora_a, lora_b)])
    for got, want in zip(*grads, strict=True):
        assert rel_err(got, want) <= 1e-10


@pytest.mark.parametrize("lead", [(), (7,), (2, 3, 4)], ids=["1d", "2d", "4d"])
@pytest.mark.parametrize("strategy", ["merged", "addmm", "auto-dropout"])
@pytest.mark.parametrize("transposed", [False, True], ids=["linear", "conv1d"])
@pytest.mark.parametrize("bias", [False, True], ids=["nobias", "bias"])
def test_any_leading_shape_and_gradient_layout(lead, strategy, transposed, bias):
    """The Function keeps x's leading dimensions (no reshape on the forward path): 1-D to 4-D inputs, and
    upstream gradients that are expanded (stride 0, as from ``sum()``) or transposed, match the reference."""
    g = torch.Generator().manual_seed(11)
    x = torch.randn(*lead, IN, generator=g, dtype=torch.float64, requires_grad=True)
    w_shape = (IN, OUT) if transposed else (OUT, IN)
    weight = torch.randn(*w_shape, generator=g, dtype=torch.float64)
    b = torch.randn(OUT, generator=g, dtype=torch.float64) if bias else None
    lora_a = torch.randn(R, IN, generator=g, dtype=torch.float64, requires_grad=True)
    lora_b = torch.randn(OUT, R, generator=g, dtype=torch.float64, requires_grad=True)
    p = 0.3 if strategy == "auto-dropout" else 0.0
    mask = dropout_mask(x, p) if p else None
    kwargs = {"strategy": "auto" if p else strategy}
    outs = []
    for fn, extra in ((lora_linear, kwargs), (reference_lora_linear, {})):
        for t in (x, lora_a, lora_b):
            t.grad = None
        y = fn(x, weight, b, lora_a, lora_b, 2.0, p, p > 0, transposed, dropout_mask=mask, **extra)
        # sum() sends an expanded gradient; the transpose of a 2-D+ output a non-contiguous one.
        y_t = y.transpose(0, -1)
        loss = y.sum() + (y_t * torch.arange(y.numel(), dtype=y.dtype).view(y_t.shape)).sum()
        loss.backward()
        outs.append([y.detach(), x.grad.clone(), lora_a.grad.clone(), lora_b.grad.clone()])
    assert outs[0][0].shape == (*lead, OUT)
    for got, want in zip(*outs, strict=True):
        assert rel_err(got, want) <= 1e-10


def test_compile_fullgraph_matches_eager():
    block = _Block()
    x = torch.randn(4, 6, IN, requires_grad=True)
    eager_out = block(x)
    eager_out.square().sum().backward()
    eager = [x.grad.clone()] + [p.grad.clone() for p in (block.a1, block.b1, block.b2)]
    x.grad = None
    block.zero_grad()
    compiled = torch.compile(block, fullgraph=True, backend="aot_eager")
    out = compiled(x)
    out.square().sum().backward()
    assert rel_err(out, eager_out) <= 1e-5
    for g, w in zip([x.grad] + [p.grad for p in (block.a1, block.b1, block.b2)], eager, strict=True):
        assert rel_err(g, w) <= 1e-5


@pytest.mark.parametrize("layout", ["1d", "transposed", "expanded"])
def test_compiled_output_is_no_view_for_any_input_layout(layout):
    """Under ``torch.compile`` matmul's decomposition returns a view for 1-D or unfoldable N-D inputs; the
    layer must still return a non-view (the block applies ``relu_`` to it) and match eager."""
    base = torch.randn(6, 4, IN)
    x = {
        "1d": torch.randn(IN),
        "transposed": base.transpose(0, 1),
        "expanded": torch.randn(1, 4, IN).expand(3, 4, IN),
    }[layout].requires_grad_(True)
    block = _Block()
    eager_out = block(x)
    eager_out.square().sum().backward()
    eager = [x.grad.clone()] + [p.grad.clone() for p in (block.a1, block.b1, block.b2)]
    x.grad = None
    block.zero_grad()
    out = torch.compile(block, fullgraph=True, backend="aot_eager")(x)
    out.square().sum().backward()
    assert rel_err(out, eager_out) <= 1e-5
    for g, w in zip([x.grad] + [p.grad for p in (block.a1, block.b1, block.b2)], eager, strict=True):
        assert rel_err(g, w) <= 1e-5


@pytest.mark.parametrize("strategy", ["merged", "addmm"])
def test_rank_zero_is_the_base_layer(strategy):
    x = torch.randn(3, 5, IN, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(OUT, IN, dtype=torch.float64)
    lora_a = torch.zeros(0, IN, dtype=torch.float64, requires_grad=True)
    lora_b = torch.zeros(OUT, 0, dtype=torch.float64, requires_grad=True)
    y = lora_linear(x, weight, None, lora_a, lora_b, 2.0, strategy=strategy)
    y.sum().backward()
    assert rel_err(y, x @ weight.T) <= 1e-12
    assert lora_a.grad.shape == (0, IN) and lora_b.grad.shape == (OUT, 0)


def test_injected_layers_fused_equals_reference_kernel():
    """Through lorakit.inject: kernel="fused" (this module) and kernel="reference" give the same grads."""
    import lorakit

    grads = {}
    kernels = {"fused": {}, "fused-saved": {"save_merged_weight": True}, "reference": {"kernel": "reference"}}
    for kernel, options in kernels.items():
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(IN, OUT), nn.Tanh(), nn.Linear(OUT, IN)).double()
        cfg = lorakit.LoraConfig(r=R, alpha=8, targets=["0", "2"], init="gaussian-b", **options)
        lorakit.inject(model, cfg)
        assert model[0].save_merged_weight == (kernel == "fused-saved")
        # 64 tokens: enough that "auto" picks the merged strategy for these 12×10 weights
        x = torch.randn(64, IN, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
        model(x).square().sum().backward()
        grads[kernel] = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
    assert grads["fused"].keys() == grads["reference"].keys() and len(grads["fused"]) == 4
    for kernel in ("fused", "fused-saved"):
        for name, g in grads[kernel].items():
            assert rel_err(g, grads["reference"][name]) <= 1e-10, (kernel, name)


@pytest.mark.parametrize("strategy", ["merged", "addmm"])
def test_fused_under_bf16_autocast_matches_reference(strategy):
    torch.manual_seed(0)
    x = torch.randn(6, 16, requires_grad=True)
    weight = torch.randn(12, 16)
    bias = torch.randn(12)
    a = (torch.randn(4, 16) * 0.3).requires_grad_()
    b = (torch.randn(12, 4) * 0.3).requires_grad_()
    outputs = {}
    for name, fn in (("fused", lora_linear), ("reference", reference_lora_linear)):
        for t in (x, a, b):
            t.grad = None
        kwargs = {"strategy": strategy} if name == "fused" else {}
        with torch.autocast("cpu", dtype=torch.bfloat16):
            y = fn(x, weight, bias, a, b, 2.0, **kwargs)
        assert y.dtype == torch.bfloat16
        y.float().square().sum().backward()
        outputs[name] = (y.float(), x.grad.clone(), a.grad.clone(), b.grad.clone())
    for got, want in zip(outputs["fused"], outputs["reference"], strict=True):
        assert ((got - want).norm() / want.norm()).item() < 2e-2


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("1", {"merge", "grad", "gemm"}),
        ("", {"merge", "grad", "gemm"}),
        ("0", set()),
        ("merge", {"merge"}),
        (" grad, merge", {"merge", "grad"}),
        ("gemm", {"gemm"}),
    ],
)
def test_lorakit_triton_env_selects_kernels(value, expected):
    assert fused._triton_kernels_from_env(value) == expected


def test_lorakit_triton_env_rejects_unknown_kernel_names():
    with pytest.raises(ValueError, match=r"LORAKIT_TRITON='mrege'.*unknown kernel.*mrege.*merge"):
        fused._triton_kernels_from_env("mrege")


def test_auto_uses_the_folded_gemm_only_when_asked_and_where_it_applies(monkeypatch):
    """``FOLDED_GEMM`` lets "auto" replace merging by the folded GEMM, never for dropout, few tokens, narrow
    projections, float32 or a device without the kernel (CPU here: the merged strategy runs instead)."""
    x16 = torch.randn(4096, 1024, dtype=torch.float16)
    monkeypatch.setattr(fused, "_use_triton", lambda kernel, t: kernel in fused.TRITON_KERNELS)
    pick = fused._pick_strategy
    assert pick("auto", x16, 4096, 1024, 1024, 16, False) == "merged"  # off by default
    monkeypatch.setattr(fused, "FOLDED_GEMM", True)
    assert pick("auto", x16, 4096, 1024, 1024, 16, False) == "folded"
    assert pick("auto", x16, 4096, 1024, 1024, 16, True) == "addmm"  # dropout
    assert pick("auto", x16, 8, 1024, 1024, 16, False) == "addmm"  # decoding: few tokens
    assert pick("auto", x16, 4096, 1024, 512, 16, False) == "merged"  # narrow: below FOLDED_MIN_FEATURES
    assert pick("auto", x16, 4096, 1024, 1024, 4, False) == "merged"  # u rows of 8 bytes: no TMA
    assert pick("auto", x16, 4096, 1024, 1024, 32, False) == "merged"  # above MAX_RANK
    assert pick("auto", x16.float(), 4096, 1024, 1024, 16, False) == "merged"
    monkeypatch.setattr(fused, "TRITON_KERNELS", frozenset({"merge", "grad"}))
    assert pick("auto", x16, 4096, 1024, 1024, 16, False) == "merged"
    monkeypatch.undo()
    monkeypatch.setattr(fused, "FOLDED_GEMM", True)  # the real check: CPU tensors have no Triton kernel
    x = torch.randn(64, IN, requires_grad=True)
    a, b = torch.randn(R, IN, requires_grad=True), torch.randn(OUT, R, requires_grad=True)
    weight = torch.randn(OUT, IN)
    y = lora_linear(x, weight, None, a, b, 0.5)
    torch.testing.assert_close(y, reference_lora_linear(x, weight, None, a, b, 0.5))


def test_one_launch_merge_takes_aligned_contiguous_tensors_in_linear_layout():
    w = torch.nn.Parameter(torch.randn(4, 3), requires_grad=False)
    a, b = torch.nn.Parameter(torch.randn(2, 3)), torch.randn(4, 2)  # a frozen factor is a buffer
    assert fused._one_launch_applies(False, (w, a, b))
    assert not fused._one_launch_applies(True, (w, a, b))  # Conv1D layout
    strided = torch.nn.Parameter(torch.randn(3, 4).t(), requires_grad=False)
    assert not fused._one_launch_applies(False, (strided, a, b))
    assert not fused._one_launch_applies(False, (w, a, torch.nn.Parameter(b.double())))  # two factor dtypes
    shifted = torch.nn.Parameter(torch.randn(13)[1:].view(4, 3), requires_grad=False)  # 4 bytes past 16
    assert not fused._one_launch_applies(False, (shifted, a, b))
    # 2**31 weight elements would overflow the kernel's int32 offsets (meta tensors: no memory)
    factors = (torch.empty(4, 2**15, device="meta"), torch.empty(2**16, 4, device="meta"))
    assert not fused._one_launch_applies(False, (torch.empty(2**16, 2**15, device="meta"), *factors))
    assert fused._one_launch_applies(False, (torch.empty(2**15, 2**15, device="meta"), *factors))


def test_one_launch_merge_is_off_while_a_cuda_graph_is_captured(monkeypatch):
    w, a, b = torch.randn(4, 3), torch.randn(2, 3), torch.randn(4, 2)
    assert not fused._capturing(w)  # a CPU tensor is never captured
    monkeypatch.setattr(fused, "_capturing", lambda t: True)
    assert not fused._one_launch_applies(False, (w, a, b))
