"""FNN and TFN constructions of Zeng & Lee: exact at the threshold rank (float64), non-zero below."""

import math

import pytest
import torch

from lorakit.theory.bounds import fnn_error_bound
from lorakit.theory.fnn import DomainWarning, construct_fnn
from lorakit.theory.models import FNN, TFN
from lorakit.theory.transformer import construct_tfn


def _pair(D: int, Lbar: int, L: int, seed: int, last_relu: bool = True) -> tuple[FNN, FNN]:
    g = torch.Generator().manual_seed(seed)
    target = FNN.random(D, Lbar, g, last_relu=last_relu)
    return FNN.random(D, L, g, last_relu=last_relu), target


def _relative_mse(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(((a - b) ** 2).mean() / b.var())


@pytest.mark.parametrize(("Lbar", "L"), [(1, 2), (2, 4), (1, 3), (2, 6)])
@pytest.mark.parametrize("D", [16, 12])
def test_fnn_exact_at_threshold(Lbar: int, L: int, D: int) -> None:
    frozen, target = _pair(D, Lbar, L, seed=D + 10 * L + Lbar)
    g = torch.Generator().manual_seed(99)
    calibration = torch.randn(1024, D, generator=g, dtype=torch.float64)
    x = torch.randn(2000, D, generator=g, dtype=torch.float64)
    threshold = math.ceil(D / (L // Lbar))
    built = construct_fnn(frozen, target, threshold, calibration)
    assert built.check_domain(x)
    assert _relative_mse(built(x), target(x)) <= 1e-12
    below = construct_fnn(frozen, target, threshold - 1, calibration)
    assert _relative_mse(below(x, check_domain=False), target(x)) > 1e-6
    # The bound is zero at the threshold and positive below it.
    assert fnn_error_bound(frozen, target, threshold)["mse"] == 0.0
    assert fnn_error_bound(frozen, target, threshold - 1)["mse"] > 0.0


def test_fnn_linear_last_layer_and_general_partition() -> None:
    frozen, target = _pair(8, 2, 5, seed=3, last_relu=False)
    x = torch.randn(500, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(4))
    built = construct_fnn(frozen, target, 4, x, partition=[2, 3])
    assert built.partition == [2, 3]
    assert _relative_mse(built(x), target(x)) <= 1e-12


def test_fnn_bound_holds_below_threshold() -> None:
    frozen, target = _pair(16, 2, 4, seed=5)
    g = torch.Generator().manual_seed(6)
    calibration = torch.randn(2048, 16, generator=g, dtype=torch.float64)
    x = torch.randn(2000, 16, generator=g, dtype=torch.float64)
    previous = math.inf
    for rank in (1, 4, 7):
        bound = fnn_error_bound(frozen, target, rank)["mse"]
        mse = float(
            (
                (construct_fnn(frozen, target, rank, calibration)(x, check_domain=False) - target(x)) ** 2
            ).mean()
        )
        assert mse <= bound
        assert bound <= previous
        previous = bound


def test_domain_warning_outside_calibration() -> None:
    frozen, target = _pair(16, 2, 4, seed=7)
    g = torch.Generator().manual_seed(8)
    built = construct_fnn(frozen, target, 8, torch.randn(256, 16, generator=g, dtype=torch.float64))
    far = 5 * torch.randn(2000, 16, generator=g, dtype=torch.float64)
    with pytest.warns(DomainWarning, match="calibrated domain"):
        out = built(far)
    assert _relative_mse(out, target(far)) > 1e-6


def test_authors_bias_bug_is_not_ported() -> None:
    """(L̄, L) = (2, 4), D = 16, R = 8: the authors' propagation gives MSE ~2e-4; ours is round-off."""
    frozen, target = _pair(16, 2, 4, seed=0)
    g = torch.Generator().manual_seed(1)
    calibration, x = (torch.randn(n, 16, generator=g, dtype=torch.float64) for n in (256, 5000))
    built = construct_fnn(frozen, target, 8, calibration)
    assert float(((built(x, check_domain=False) - target(x)) ** 2).mean()) < 1e-9


@pytest.mark.parametrize("depth", [1, 2])
def test_tfn_exact_at_half_width(depth: int) -> None:
    D = 8
    g = torch.Generator().manual_seed(depth)
    target, frozen = TFN.random(D, depth, 2, g), TFN.random(D, depth, 2, g)
    X = torch.randn(64, D, 10, generator=g, dtype=torch.float64)
    y = target(X)
    assert _relative_mse(construct_tfn(frozen, target, D // 2)(X), y) <= 1e-12
    assert _relative_mse(construct_tfn(frozen, target, D // 2 - 1)(X), y) > 1e-4
    for B, A in construct_tfn(frozen, target, 2).factors.values():
        assert B.shape == (D, 2) and A.shape == (2, D)


def test_tfn_shape_mismatch() -> None:
    g = torch.Generator().manual_seed(0)
    with pytest.raises(ValueError, match="heads"):
        construct_tfn(TFN.random(4, 1, 2, g), TFN.random(4, 1, 1, g), 2)
