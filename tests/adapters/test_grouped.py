"""Sibling groups (``lorakit.adapters.grouped``): the same function as one Function per layer (CPU)."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import lorakit
from lorakit.adapters import LoraLinear, fused, grouped
from lorakit.adapters.fused import reference_lora_linear

IN, OUTS, RANKS = 12, (10, 6, 6), (4, 2, 3)
TOL = {torch.float64: 1e-10, torch.float32: 1e-5}


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def siblings(dtype: torch.dtype, train: str, transposed: bool, seed: int) -> dict:
    g = torch.Generator().manual_seed(seed)
    factor_dtype = torch.float64 if dtype == torch.float64 else torch.float32
    shapes = [(IN, o) if transposed else (o, IN) for o in OUTS]
    return {
        "x": torch.randn(3, 5, IN, generator=g, dtype=dtype),
        "W": [torch.randn(s, generator=g, dtype=dtype) / IN**0.5 for s in shapes],
        "bias": [torch.randn(o, generator=g, dtype=dtype) if i != 1 else None for i, o in enumerate(OUTS)],
        "A": [(torch.randn(r, IN, generator=g, dtype=factor_dtype) / IN**0.5) for r in RANKS],
        "B": [torch.randn(o, r, generator=g, dtype=factor_dtype) for o, r in zip(OUTS, RANKS, strict=True)],
        "scalings": [2.0, 0.5, 1.5],
        "grads": [torch.randn(3, 5, o, generator=g, dtype=dtype) for o in OUTS],
        "train": train,
        "transposed": transposed,
    }


def run(case: dict, group: bool, used: tuple[int, ...] = (0, 1, 2)) -> list[torch.Tensor | None]:
    """Outputs, dX and the factors' gradients, backpropagating only the outputs in ``used``."""
    x = case["x"].clone().requires_grad_(True)
    factors_a = [a.clone().requires_grad_("A" in case["train"]) for a in case["A"]]
    factors_b = [b.clone().requires_grad_("B" in case["train"]) for b in case["B"]]
    args = (case["W"], case["bias"], factors_a, factors_b, case["scalings"])
    if group:
        ys = grouped.lora_linear_group(x, *args, case["transposed"])
    else:
        ys = [
            reference_lora_linear(x, w, b, a, b_, s, transposed_weight=case["transposed"])
            for w, b, a, b_, s in zip(*args, strict=True)
        ]
    torch.autograd.backward([ys[i] for i in used], [case["grads"][i] for i in used])
    return [y.detach() for y in ys] + [x.grad] + [t.grad for t in factors_a + factors_b]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("train", ["AB", "B", "A"])
@pytest.mark.parametrize("transposed", [False, True], ids=["linear", "conv1d"])
@pytest.mark.parametrize("unmerged_dx", [True, False], ids=["dx-unmerged", "dx-merged"])
def test_group_matches_reference_per_sibling(dtype, train, transposed, unmerged_dx, monkeypatch):
    # 15 tokens < 2·Σout = 44: backward's dX skips the merged weights unless that is switched off
    monkeypatch.setattr(fused, "UNMERGED_INPUT_GRAD", unmerged_dx)
    merges = []
    real = grouped._merge_siblings
    monkeypatch.setattr(grouped, "_merge_siblings", lambda *a, **k: merges.append(1) or real(*a, **k))
    case = siblings(dtype, train, transposed, seed=len(train) + 5 * transposed)
    got, want = run(case, group=True), run(case, group=False)
    for k, (g, w) in enumerate(zip(got, want, strict=True)):
        if w is None:
            assert g is None, f"output {k}: a frozen factor got a gradient"
            continue
        assert g.dtype == w.dtype and g.shape == w.shape, k
        assert rel_err(g, w) <= TOL[dtype], f"output {k}: rel err {rel_err(g, w):.3g}"
    unmerged_dx &= "A" in train  # with A frozen no G_i is computed for dA_i: backward merges after all
    assert len(merges) == (1 if unmerged_dx else 2), "backward merged the weights iff dX needs them"


@pytest.mark.parametrize("unmerged_dx", [True, False], ids=["dx-unmerged", "dx-merged"])
def test_unused_sibling_output_gets_no_gradient(unmerged_dx, monkeypatch):
    monkeypatch.setattr(fused, "UNMERGED_INPUT_GRAD", unmerged_dx)
    case = siblings(torch.float64, "AB", False, seed=3)
    got, want = run(case, group=True, used=(0, 2)), run(case, group=False, used=(0, 2))
    n = len(OUTS)
    a_grads, b_grads = got[n + 1 : 2 * n + 1], got[2 * n + 1 :]
    assert a_grads[1] is None and b_grads[1] is None  # sibling 1's output was not used
    for g, w in zip(got, want, strict=True):
        if g is not None:
            assert rel_err(g, w) <= 1e-10


def test_group_rejects_mismatched_siblings():
    case = siblings(torch.float32, "AB", False, seed=0)
    with pytest.raises(ValueError, match="sibling 2"):
        grouped.lora_linear_group(
            case["x"], case["W"], case["bias"], case["A"], [*case["B"][:2], case["B"][0]], case["scalings"]
        )
    with pytest.raises(ValueError, match="one weight, bias, A, B and scaling per sibling"):
        grouped.lora_linear_group(case["x"], case["W"], case["bias"], case["A"], case["B"], [1.0])


class _Attention(nn.Module):
    """q/k/v read one input; o, with as many input features, reads another (as in a transformer)."""

    def __init__(self, width: int = 16) -> None:
        super().__init__()
        self.q, self.k, self.v, self.o = (nn.Linear(width, width) for _ in range(4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        mixed = torch.tanh(self.q(x)) * self.k(x) + self.v(x)
        return self.o(mixed)


class _Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.attn = _Attention()
        self.norm = nn.LayerNorm(16)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.attn(self.norm(x)) + x


def adapted(group: bool, train: str = "AB", dropout: float = 0.0) -> nn.Module:
    torch.manual_seed(0)
    model = _Block().double()
    config = lorakit.LoraConfig(
        r=4, targets=["q", "k", "v", "o"], train=train, dropout=dropout, group_siblings=group
    )
    lorakit.inject(model, config)
    torch.manual_seed(1)
    with torch.no_grad():
        for _, layer in lorakit.lora_layers(model):
            layer.lora_B.normal_()
    return model


def steps(model: nn.Module, x: torch.Tensor, n: int = 3) -> list[list[torch.Tensor]]:
    results = []
    for _ in range(n):
        model.zero_grad(set_to_none=True)
        xs = x.clone().requires_grad_(True)
        out = model(xs)
        out.square().sum().backward()
        results.append([out.detach(), xs.grad] + [p.grad for p in model.parameters() if p.requires_grad])
    return results


@pytest.fixture
def count_group_calls(monkeypatch):
    calls = []
    original = grouped.lora_linear_group

    def counting(*args, **kwargs):
        calls.append(len(args[1]))
        return original(*args, **kwargs)

    monkeypatch.setattr(grouped, "lora_linear_group", counting)
    return calls


@pytest.mark.parametrize("train", ["AB", "B"])
def test_model_finds_the_siblings_that_share_an_input(train, count_group_calls):
    x = torch.randn(2, 32, 16, dtype=torch.float64)  # 64 tokens: the merged strategy applies
    want = steps(adapted(False, train), x)
    model = adapted(True, train)
    got = steps(model, x)
    group = model.attn.q.sibling_group
    assert group is model.attn.o.sibling_group  # o is a candidate: same parent, same input width
    assert group.sharing_sets == [(model.attn.q, model.attn.k, model.attn.v)]
    assert count_group_calls == [3, 3]  # step 1 probes; steps 2 and 3 run q/k/v as one group
    for step_got, step_want in zip(got, want, strict=True):
        for g, w in zip(step_got, step_want, strict=True):
            assert rel_err(g, w) <= 1e-10


class _Unshared(nn.Module):
    """Siblings that read one tensor on the first call only, then different ones (e.g. cross-attention)."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(16, 16), nn.Linear(16, 8)
        self.calls = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        other = x if self.calls == 1 else x * 2
        return self.a(x).sum(-1, keepdim=True) * self.b(other)


def test_siblings_that_stop_sharing_run_alone_and_stay_correct(count_group_calls):
    torch.manual_seed(0)
    reference = _Unshared().double()
    model = copy.deepcopy(reference)
    for m, group in ((reference, False), (model, True)):
        config = lorakit.LoraConfig(r=2, targets=["a", "b"], group_siblings=group)
        lorakit.inject(m, config)
        torch.manual_seed(1)
        with torch.no_grad():
            for _, layer in lorakit.lora_layers(m):
                layer.lora_B.normal_()
    x = torch.randn(64, 16, dtype=torch.float64)
    want, got = steps(reference, x), steps(model, x)
    assert count_group_calls == [2]  # step 2 grouped a and b on x; b then read 2x: grouping stopped
    assert model.a.sibling_group.sharing_sets == []
    for step_got, step_want in zip(got, want, strict=True):
        for g, w in zip(step_got, step_want, strict=True):
            assert rel_err(g, w) <= 1e-10


def test_input_modified_in_place_between_siblings_ends_grouping(count_group_calls):
    class InPlace(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.b = nn.Linear(16, 16), nn.Linear(16, 16)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            x = x * 1.0
            first = self.a(x)
            if getattr(self, "modify", False):
                x.mul_(3.0)  # b must see the modified input
            return first + self.b(x)

    torch.manual_seed(0)
    model = InPlace().double()
    lorakit.inject(model, lorakit.LoraConfig(r=2, targets=["a", "b"]))
    x = torch.randn(64, 16, dtype=torch.float64)
    with torch.no_grad():
        model(x)  # the probe: a and b read one tensor
        model.modify = True
        out = model(x)
        assert count_group_calls == [2]
        assert model.a.sibling_group.sharing_sets == []
        want = model.a(x) + model.b(x * 3.0)
    assert rel_err(out, want) <= 1e-12


def test_dropout_in_training_runs_siblings_alone(count_group_calls):
    model = adapted(True, dropout=0.2)
    x = torch.randn(2, 32, 16, dtype=torch.float64)
    steps(model, x)
    assert count_group_calls == []  # dropout is per layer; the merged strategy does not apply
    model.eval()
    with torch.no_grad():
        model(x)
    assert count_group_calls == [3]  # in eval dropout is off and q/k/v group


def test_compiled_model_runs_layers_alone_without_graph_breaks(count_group_calls):
    model, reference = adapted(True), adapted(False)
    x = torch.randn(2, 32, 16, dtype=torch.float64)
    want = steps(reference, x, n=2)
    got = steps(torch.compile(model, fullgraph=True, backend="aot_eager"), x, n=2)
    assert count_group_calls == []
    for step_got, step_want in zip(got, want, strict=True):
        for g, w in zip(step_got, step_want, strict=True):
            assert rel_err(g, w) <= 1e-10


def test_group_siblings_must_be_a_bool():
    with pytest.raises(ValueError, match="group_siblings"):
        lorakit.LoraConfig(group_siblings="yes")


def test_a_sibling_whose_weight_is_not_whole_runs_alone(count_group_calls):
    """FSDP leaves a sharded unit's weight empty outside its forward: the group must not read it."""
    model = adapted(True)
    x = torch.randn(2, 32, 16, dtype=torch.float64)
    steps(model, x, n=1)  # the probe
    whole = model.attn.k.base_layer.weight
    model.attn.k.base_layer.weight = nn.Parameter(whole.detach()[:0], requires_grad=False)
    with torch.no_grad():
        assert not grouped._merged_strategy_applies([model.attn.q, model.attn.k], x)
    model.attn.k.base_layer.weight = whole
    with torch.no_grad():
        model(x)
    assert count_group_calls == [3]


def test_groups_run_under_inference_mode(count_group_calls):
    model, reference = adapted(True), adapted(False)
    x = torch.randn(2, 32, 16, dtype=torch.float64)
    with torch.inference_mode():
        got = [model(x) for _ in range(3)]
        want = reference(x)
    assert count_group_calls == [3, 3]
    for out in got:
        assert rel_err(out, want) <= 1e-12


class _Checkpointed(nn.Module):
    def __init__(self, block: nn.Module, reentrant: bool) -> None:
        super().__init__()
        self.block, self.reentrant = block, reentrant

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.utils.checkpoint.checkpoint(self.block, x, use_reentrant=self.reentrant)


@pytest.mark.parametrize("reentrant", [False, True])
def test_activation_checkpointing_recomputes_what_the_forward_saved(reentrant, count_group_calls):
    """Non-reentrant checkpointing checks that recomputation saves the same tensors as the forward; the
    probe ending in between must not change that (groups stay off under saved-tensor hooks)."""
    model, reference = (_Checkpointed(adapted(g), reentrant) for g in (True, False))
    x = torch.randn(2, 32, 16, dtype=torch.float64)
    got, want = steps(model, x), steps(reference, x)
    assert (count_group_calls != []) == reentrant  # the reentrant forward runs under no_grad, no hooks
    for step_got, step_want in zip(got, want, strict=True):
        for g, w in zip(step_got, step_want, strict=True):
            assert rel_err(g, w) <= 1e-10


def test_a_shallow_copy_of_a_member_runs_alone(count_group_calls):
    """nn.DataParallel's replicas are shallow copies that share the group object but are not its members."""
    model = adapted(True)
    x = torch.randn(2, 32, 16, dtype=torch.float64)
    with torch.no_grad():
        model(x)  # the probe
        replica = copy.copy(model.attn.q)
        assert replica.sibling_group is model.attn.q.sibling_group
        assert rel_err(replica(x), model.attn.q(x)) <= 1e-12
    assert count_group_calls == [3]  # only the member's own call grouped


def test_layers_of_a_subclass_are_not_grouped():
    """A LoraLinear subclass may compute something else (a new variant): groups only take plain layers."""

    class Variant(LoraLinear):
        pass

    base = _Block()
    layers = [(f"attn.{n}", Variant(getattr(base.attn, n), r=2, alpha=4.0, scaling=2.0)) for n in "qkv"]
    assert grouped.group_siblings(layers) == []
    assert all(layer.sibling_group is None for _, layer in layers)
