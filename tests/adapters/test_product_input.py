"""A LoRA layer whose input is a product ``a * b`` takes a and b, keeps them instead of the product, and
gives them their gradients itself (CPU).

``fused.RECOMPUTE_PRODUCT_INPUT``: in a gated MLP, ``down_proj(act(gate) * up)``, autograd already keeps
``act(gate)`` and ``up`` for the multiplication's backward, so the down projection's input need not be kept
as well, and the layer's backward can do the multiplication's backward in the pass that forms its dA. The
gradients must not change, and the path must be taken only where ``a * b`` is exactly x and nobody asked
for x's own gradient.
"""

from __future__ import annotations

import gc
import weakref

import pytest
import torch
import torch.nn.functional as F

from conftest import adapted_tiny_llama, llama_lora_grads
from lorakit.adapters import fused
from lorakit.adapters.fused import lora_linear, reference_lora_linear

T, HIDDEN, INNER, R = 48, 12, 20, 4


@pytest.fixture
def product_passes(monkeypatch):
    """Counts the backward passes that went through the product's factors."""
    calls = []
    original = fused._product_backward

    def counting(*args):
        calls.append(args[1].shape)
        return original(*args)

    monkeypatch.setattr(fused, "_product_backward", counting)
    return calls


def gated_inputs(dtype: torch.dtype, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2, T // 2, HIDDEN, generator=g, dtype=dtype)
    w_gate, w_up = (torch.randn(INNER, HIDDEN, generator=g, dtype=dtype) / HIDDEN**0.5 for _ in range(2))
    w_down = torch.randn(HIDDEN, INNER, generator=g, dtype=dtype) / INNER**0.5
    factor = torch.float64 if dtype == torch.float64 else torch.float32
    lora_a = torch.randn(R, INNER, generator=g, dtype=factor) / INNER**0.5
    lora_b = torch.randn(HIDDEN, R, generator=g, dtype=factor)
    return x, w_gate, w_up, w_down, lora_a, lora_b


def gated_step(fn, inputs, train_a: bool = True, keep: list | None = None, **kwargs):
    """One forward and backward of ``down(silu(gate x) * up x)`` with ``fn`` as the down projection."""
    x, w_gate, w_up, w_down, lora_a, lora_b = inputs
    x, lora_a, lora_b = (t.clone().requires_grad_(True) for t in (x, lora_a, lora_b))
    lora_a.requires_grad_(train_a)
    h = F.silu(x @ w_gate.t()) * (x @ w_up.t())
    if keep is not None:
        keep.append(weakref.ref(h))
    y = fn(h, w_down, None, lora_a, lora_b, 2.0, **kwargs)
    del h
    gc.collect()
    alive = keep is not None and keep[-1]() is not None
    y.square().sum().backward()
    return [y.detach(), x.grad, lora_a.grad, lora_b.grad], alive


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("strategy", ["merged", "addmm"])
def test_product_input_is_not_kept_and_gradients_do_not_change(dtype, strategy, product_passes, monkeypatch):
    inputs = gated_inputs(dtype)
    want, _ = gated_step(reference_lora_linear, inputs)
    monkeypatch.setattr(fused, "RECOMPUTE_PRODUCT_INPUT", False)
    kept = []
    before, alive_before = gated_step(lora_linear, inputs, keep=kept, strategy=strategy)
    assert alive_before and not product_passes  # the layer kept its input x = a * b
    monkeypatch.setattr(fused, "RECOMPUTE_PRODUCT_INPUT", True)
    got, alive = gated_step(lora_linear, inputs, keep=kept, strategy=strategy)
    assert not alive, "the product was kept after forward"
    assert product_passes == [torch.Size([T, INNER])]
    for name, g, b, w in zip(("y", "dx", "dA", "dB"), got, before, want, strict=True):
        assert torch.equal(g, b), name  # the same product, formed again: bit for bit
        assert (g - w).norm() / w.norm() <= {torch.float64: 1e-10, torch.float32: 1e-5}[dtype], name


def _product_layer_ran(h: torch.Tensor, product_passes: list, **kwargs) -> bool:
    *_, w_down, lora_a, lora_b = gated_inputs(torch.float64)
    lora_a.requires_grad_(kwargs.pop("train_a", True))
    lora_b.requires_grad_(True)
    lora_linear(h, w_down, None, lora_a, lora_b, 2.0, **kwargs).sum().backward()
    return bool(product_passes)


@pytest.mark.parametrize(
    "case",
    [
        "broadcast",
        "promoted",
        "constant-operand",
        "dropout",
        "frozen-A",
        "saved-tensor-hooks",
        "sum",
        "hook-on-input",
        "retain-grad",
    ],
)
def test_factors_are_used_only_where_their_product_is_exactly_the_input(case, product_passes):
    g = torch.Generator().manual_seed(3)
    a = torch.randn(T, INNER, generator=g, dtype=torch.float64, requires_grad=True)
    b = torch.randn(T, INNER, generator=g, dtype=torch.float64, requires_grad=True)
    kwargs = {}
    if case == "broadcast":
        h = a * b[:1]
    elif case == "promoted":
        h = a * b.float()
    elif case == "constant-operand":  # autograd keeps only the operand that the other's gradient needs
        h = a * b.detach()
    elif case == "sum":
        h = a + b
    else:
        h = a * b
    if case == "hook-on-input":  # someone wants x's own gradient: the layer must give it one
        seen = []
        h.register_hook(seen.append)
        assert not _product_layer_ran(h, product_passes) and len(seen) == 1
        return
    if case == "retain-grad":
        h.retain_grad()
        assert not _product_layer_ran(h, product_passes) and h.grad is not None
        return
    if case == "dropout":
        kwargs = {"dropout_p": 0.5, "training": True}
    if case == "frozen-A":
        kwargs = {"train_a": False}
    if case == "saved-tensor-hooks":  # e.g. activation offloading: reading an operand would unpack it
        with torch.autograd.graph.saved_tensors_hooks(lambda t: t, lambda t: t):
            assert not _product_layer_ran(h, product_passes)
        return
    assert not _product_layer_ran(h.to(torch.float64), product_passes, **kwargs)


def test_the_plain_product_takes_the_path(product_passes):
    """The positive control of the test above: the same setup with a plain product does take it."""
    g = torch.Generator().manual_seed(3)
    a, b = (torch.randn(T, INNER, generator=g, dtype=torch.float64, requires_grad=True) for _ in range(2))
    assert _product_layer_ran(a * b, product_passes)


def test_llama_down_projection_keeps_no_input(product_passes, monkeypatch):
    """Through ``lorakit.inject`` on a transformers Llama: each decoder layer's down_proj takes the path,
    and every gradient equals the run that keeps the input."""
    grads = {}
    for recompute in (False, True):
        monkeypatch.setattr(fused, "RECOMPUTE_PRODUCT_INPUT", recompute)
        model = adapted_tiny_llama()
        grads[recompute] = llama_lora_grads(model)
    assert len(product_passes) == model.config.num_hidden_layers
    assert grads[True].keys() == grads[False].keys() and len(grads[True]) == 2 * 7 * 2
    for name, g in grads[True].items():
        assert torch.equal(g, grads[False][name]), name


def test_gated_block_compiles_fullgraph_and_matches_eager(product_passes):
    """Under ``torch.compile(fullgraph=True)`` the layer does not read the autograd graph (that would break
    the graph): the product is saved as before, and the compiled block matches eager."""
    inputs = gated_inputs(torch.float32)
    eager, _ = gated_step(lora_linear, inputs, strategy="merged")
    assert len(product_passes) == 1
    compiled = torch.compile(lora_linear, fullgraph=True, backend="aot_eager")
    got, _ = gated_step(compiled, inputs, strategy="merged")
    assert len(product_passes) == 1
    for name, g, w in zip(("y", "dx", "dA", "dB"), got, eager, strict=True):
        assert (g - w).norm() / w.norm() <= 1e-5, name


@pytest.mark.parametrize("reentrant", [True, False])
def test_under_activation_checkpointing(reentrant, product_passes):
    """A gated block under ``torch.utils.checkpoint``, as transformers' gradient checkpointing wraps a
    decoder layer. The reentrant kind runs the block again in backward with grad on, building a fresh
    multiplication node, so the path runs there; the non-reentrant kind packs saved tensors through hooks,
    so it stays off. Either way the gradients equal the plain run's."""
    from torch.utils.checkpoint import checkpoint

    x, w_gate, w_up, w_down, lora_a, lora_b = gated_inputs(torch.float64)

    def block(x, lora_a, lora_b):
        h = F.silu(x @ w_gate.t()) * (x @ w_up.t())
        return lora_linear(h, w_down, None, lora_a, lora_b, 2.0)

    grads = []
    for wrap in (False, True):
        leaves = [t.clone().requires_grad_(True) for t in (x, lora_a, lora_b)]
        out = checkpoint(block, *leaves, use_reentrant=reentrant) if wrap else block(*leaves)
        out.square().sum().backward()
        grads.append([t.grad for t in leaves])
    assert len(product_passes) == (2 if reentrant else 1)  # the plain run, then the checkpointed one's
    for name, g, w in zip(("dx", "dA", "dB"), grads[1], grads[0], strict=True):
        assert torch.equal(g, w), name


@pytest.mark.parametrize("query", ["missing", "other-signature"])
def test_a_torch_that_cannot_tell_about_saved_tensor_hooks_keeps_the_input(
    query, product_passes, monkeypatch
):
    """Where torch cannot say whether saved-tensor hooks are set, the path is not taken."""

    def other_signature() -> None:
        return None

    if query == "missing":
        monkeypatch.delattr(torch._C._autograd, "_top_saved_tensors_default_hooks")
    else:
        monkeypatch.setattr(torch._C._autograd, "_top_saved_tensors_default_hooks", other_signature)
    g = torch.Generator().manual_seed(3)
    a, b = (torch.randn(T, INNER, generator=g, dtype=torch.float64, requires_grad=True) for _ in range(2))
    assert not _product_layer_ran(a * b, product_passes)


def test_under_bf16_autocast(product_passes, monkeypatch):
    """A float32 gated block under bf16 autocast: the product is formed in bf16, the path runs, and every
    gradient equals the run that keeps the input."""
    x0, w_gate, w_up, w_down, a0, b0 = gated_inputs(torch.float32)
    grads = {}
    for recompute in (False, True):
        monkeypatch.setattr(fused, "RECOMPUTE_PRODUCT_INPUT", recompute)
        x, lora_a, lora_b = (t.clone().requires_grad_(True) for t in (x0, a0, b0))
        with torch.autocast("cpu", dtype=torch.bfloat16):
            h = F.silu(F.linear(x, w_gate)) * F.linear(x, w_up)
            y = lora_linear(h, w_down, None, lora_a, lora_b, 2.0)
        assert h.dtype == torch.bfloat16
        y.float().square().sum().backward()
        grads[recompute] = (x.grad, lora_a.grad, lora_b.grad)
    assert len(product_passes) == 1
    for name, got, want in zip(("dx", "dA", "dB"), grads[True], grads[False], strict=True):
        assert torch.equal(got, want), name


def test_a_product_used_elsewhere_too_gets_both_gradients(product_passes, monkeypatch):
    """x = a * b feeding the layer and another op: the layer gives a and b its share, the multiplication's
    backward the other op's share, and autograd adds them (float64, against the input kept)."""
    grads = {}
    for recompute in (False, True):
        monkeypatch.setattr(fused, "RECOMPUTE_PRODUCT_INPUT", recompute)
        g = torch.Generator().manual_seed(5)
        a, b = (torch.randn(T, INNER, generator=g, dtype=torch.float64, requires_grad=True) for _ in range(2))
        *_, w_down, lora_a, lora_b = gated_inputs(torch.float64)
        lora_a.requires_grad_(True)
        h = a * b
        loss = lora_linear(h, w_down, None, lora_a, lora_b, 2.0).square().sum() + h.sin().sum()
        loss.backward()
        grads[recompute] = (a.grad, b.grad, lora_a.grad)
    assert len(product_passes) == 1
    for name, got, want in zip(("da", "db", "dA"), grads[True], grads[False], strict=True):
        assert (got - want).norm() / want.norm() <= 1e-12, name
