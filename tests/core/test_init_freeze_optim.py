"""Init schemes, frozen factors under training, and LoRA+ optimizer groups."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import lorakit
from lorakit import LoraConfig
from lorakit.adapters import INIT_SCHEMES, haar_orthonormal_rows


def _mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(32, 24), nn.ReLU(), nn.Linear(24, 16), nn.LayerNorm(16), nn.Linear(16, 3))


def _factors(model):
    return {name: (layer.lora_A.clone(), layer.lora_B.clone()) for name, layer in lorakit.lora_layers(model)}


@pytest.mark.parametrize("scheme", sorted(INIT_SCHEMES))
def test_every_scheme_is_deterministic_given_seed(scheme):
    config = LoraConfig(r=4, targets=["0", "2"], init=scheme, seed=11)
    first = _factors(lorakit.inject(_mlp(), config))
    second = _factors(lorakit.inject(_mlp(), config))
    other = _factors(lorakit.inject(_mlp(), LoraConfig(r=4, targets=["0", "2"], init=scheme, seed=12)))
    for name in first:
        assert all(torch.equal(a, b) for a, b in zip(first[name], second[name], strict=True))
    if scheme != "svd-a":  # the SVD of W0 has no randomness
        assert any(
            not torch.equal(first[n][0], other[n][0]) or not torch.equal(first[n][1], other[n][1])
            for n in first
        )


def test_init_does_not_depend_on_which_other_modules_are_adapted():
    alone = _factors(lorakit.inject(_mlp(), LoraConfig(r=4, targets=["2"], seed=5)))
    both = _factors(lorakit.inject(_mlp(), LoraConfig(r=4, targets=["0", "2"], seed=5)))
    assert torch.equal(alone["2"][0], both["2"][0])


def test_zero_factor_and_distributions():
    layers = dict(lorakit.lora_layers(lorakit.inject(_mlp(), LoraConfig(r=4, targets=["0"], init="lora"))))
    a, b = layers["0"].lora_A, layers["0"].lora_B
    assert torch.count_nonzero(b) == 0 and a.abs().max() <= 1 / math.sqrt(32)
    layers = dict(
        lorakit.lora_layers(lorakit.inject(_mlp(), LoraConfig(r=4, targets=["0"], init="gaussian-b")))
    )
    assert torch.count_nonzero(layers["0"].lora_A) == 0 and torch.count_nonzero(layers["0"].lora_B) > 0


@pytest.mark.parametrize(
    ("scheme", "factor"), [("orthonormal-a", "A"), ("orthonormal-b", "B"), ("banded-a", "A")]
)
def test_orthonormal_factors(scheme, factor):
    model = lorakit.inject(_mlp(), LoraConfig(r=8, targets=["0", "2"], init=scheme))
    for _, layer in lorakit.lora_layers(model):
        m = layer.lora_A if factor == "A" else layer.lora_B.T
        torch.testing.assert_close(m @ m.T, torch.eye(8), atol=1e-6, rtol=0)


def test_haar_rows_are_uniform_in_sign():
    # Without the sign fix, QR's first row has a positive first coordinate far more often than half.
    firsts = torch.stack(
        [haar_orthonormal_rows(1, 3, torch.Generator().manual_seed(s))[0, 0] for s in range(400)]
    )
    assert 0.4 < (firsts > 0).float().mean() < 0.6


def test_svd_a_uses_top_right_singular_vectors():
    model = _mlp()
    weight = model[0].weight.detach().double()
    lorakit.inject(model, LoraConfig(r=3, targets=["0"], init="svd-a"))
    a = dict(lorakit.lora_layers(model))["0"].lora_A.double()
    _, s, vh = torch.linalg.svd(weight)
    torch.testing.assert_close((a @ vh[:3].T).abs(), torch.eye(3, dtype=torch.float64), atol=1e-5, rtol=0)
    assert torch.linalg.matrix_norm(weight @ a.T) > 0.99 * s[:3].norm()


def test_correlated_ablations_are_ill_conditioned():
    for scheme in ("correlated-rows-a", "correlated-cols-a"):
        layer = dict(
            lorakit.lora_layers(lorakit.inject(_mlp(), LoraConfig(r=4, targets=["0"], init=scheme)))
        )["0"]
        singular = torch.linalg.svdvals(layer.lora_A)
        assert singular[0] / singular[-1] > 10, scheme


@pytest.mark.parametrize("train", ["A", "B"])
def test_frozen_factor_bit_identical_after_adamw_with_weight_decay(train):
    init = "orthonormal-a" if train == "B" else "orthonormal-b"
    model = lorakit.inject(
        _mlp(), LoraConfig(r=4, targets=["0", "2"], init=init, train=train, modules_to_save=["4"])
    )
    frozen_name = "lora_B" if train == "A" else "lora_A"
    before = {n: getattr(layer, frozen_name).clone() for n, layer in lorakit.lora_layers(model)}
    model.requires_grad_(True)  # a user's blanket unfreeze (base weights too) must not reach a frozen factor
    optimizer = lorakit.make_optimizer(model, lr=1e-2, ratio=16, weight_decay=0.1)
    x, y = torch.randn(64, 32), torch.randint(0, 3, (64,))
    for _ in range(20):
        optimizer.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        optimizer.step()
    for name, layer in lorakit.lora_layers(model):
        frozen = getattr(layer, frozen_name)
        assert torch.equal(frozen, before[name]) and frozen.grad is None and not frozen.requires_grad
        trained = getattr(layer, "lora_A" if train == "A" else "lora_B")
        assert trained.grad is not None and trained.abs().sum() > 0


def test_loraplus_groups_rates_and_weight_decay():
    model = nn.Sequential(nn.Embedding(10, 32), _mlp())
    lorakit.inject(model, LoraConfig(r=4, targets=["0", "1.0", "1.2"], modules_to_save=["1.3", "1.4"]))
    groups = {g["name"]: g for g in lorakit.param_groups(model, lr=1e-3, ratio=16, weight_decay=0.01)}
    assert set(groups) == {"lora_A", "lora_B", "lora_embedding", "other", "other_no_decay"}
    assert groups["lora_A"]["lr"] == 1e-3 and groups["lora_B"]["lr"] == pytest.approx(1.6e-2)
    assert groups["lora_embedding"]["lr"] == 1e-6 and len(groups["lora_embedding"]["params"]) == 2
    assert groups["other"]["lr"] == 1e-3 and [p.shape for p in groups["other"]["params"]] == [(3, 16)]
    assert all(groups[n]["weight_decay"] == 0.01 for n in ("lora_A", "lora_B", "lora_embedding", "other"))
    assert groups["other_no_decay"]["weight_decay"] == 0.0 and len(groups["other_no_decay"]["params"]) == 3
    official = {g["name"]: g for g in lorakit.param_groups(model, lr=1e-3, ratio=16, one_d_lr="b")}
    assert official["other_no_decay"]["lr"] == pytest.approx(1.6e-2)
    in_groups = {id(p) for g in groups.values() for p in g["params"]}
    assert in_groups == {id(p) for p in model.parameters() if p.requires_grad}


def test_frozen_factors_in_no_group_and_ratio_one_is_plain_lora():
    model = lorakit.inject(_mlp(), LoraConfig(r=4, targets=["0"], init="orthonormal-a", train="B"))
    groups = {g["name"]: g for g in lorakit.param_groups(model, lr=1e-3)}
    assert "lora_A" not in groups
    plain = lorakit.make_optimizer(model, lr=1e-3, ratio=1.0)
    assert {g["lr"] for g in plain.param_groups} == {1e-3}
    with pytest.raises(ValueError, match="ratio"):
        lorakit.param_groups(model, lr=1e-3, ratio=0)


class _FakeCudaParam:
    """Stands in for a CUDA parameter (CI has no GPU): only what the fused-by-default rule reads."""

    is_cuda = True

    def __init__(self, floating: bool = True) -> None:
        self.floating = floating

    def is_floating_point(self) -> bool:
        return self.floating


def test_make_optimizer_fuses_adam_on_cuda_only_unless_the_caller_chose():
    from lorakit.optim import _fuses_by_default

    cuda = [_FakeCudaParam(), _FakeCudaParam()]
    assert _fuses_by_default(torch.optim.AdamW, cuda, {})
    assert _fuses_by_default(torch.optim.Adam, cuda, {"betas": (0.9, 0.99)})
    assert not _fuses_by_default(torch.optim.AdamW, cuda, {"foreach": True})  # the caller's choice stands
    assert not _fuses_by_default(torch.optim.AdamW, cuda, {"fused": False})
    assert not _fuses_by_default(torch.optim.SGD, cuda, {})
    assert not _fuses_by_default(torch.optim.AdamW, [*cuda, torch.zeros(2)], {})  # one CPU tensor
    assert not _fuses_by_default(torch.optim.AdamW, [_FakeCudaParam(floating=False)], {})
    model = lorakit.inject(_mlp(), LoraConfig(r=4, targets=["0"]))
    assert not lorakit.make_optimizer(model, lr=1e-3).defaults["fused"]  # CPU: torch's default
