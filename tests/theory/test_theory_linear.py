"""Linear lemma of Zeng & Lee: closed-form adapters reach σ_{RL+1}(E) and nothing beats it."""

import math

import pytest
import torch

from lorakit.theory.linear import NonSingularityError, adapted_product, construct_linear, linear_threshold


def _well_conditioned(D: int, g: torch.Generator) -> torch.Tensor:
    """Random U diag(s) Vᵀ with s ~ U(0.5, 1.5): products of plain Gaussian layers get so ill-conditioned
    that round-off (eps x cond) alone exceeds the 1e-10 target for L = 6."""
    U, _ = torch.linalg.qr(torch.randn(D, D, generator=g, dtype=torch.float64))
    V, _ = torch.linalg.qr(torch.randn(D, D, generator=g, dtype=torch.float64))
    return U @ torch.diag(0.5 + torch.rand(D, generator=g, dtype=torch.float64)) @ V.mT


def _random(D: int, L: int, seed: int) -> tuple[list[torch.Tensor], torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    frozen = [_well_conditioned(D, g) for _ in range(L)]
    return frozen, torch.randn(D, D, generator=g, dtype=torch.float64) / math.sqrt(D)


@pytest.mark.parametrize("D", [8, 12, 16])
@pytest.mark.parametrize("L", [2, 3, 4, 6])
def test_every_rank_reaches_the_optimal_error(D: int, L: int) -> None:
    frozen, target = _random(D, L, seed=100 * D + L)
    threshold = math.ceil(D / L)
    assert linear_threshold(frozen, target) == threshold
    for rank in range(1, threshold + 1):
        built = construct_linear(frozen, target, rank)
        residual = adapted_product(frozen, built.deltas) - target
        spectral = float(torch.linalg.matrix_norm(residual, ord=2))
        S = built.singular_values
        if rank < threshold:
            expected = float(S[rank * L])
            assert spectral == pytest.approx(expected, rel=1e-8)
            assert float(torch.linalg.matrix_norm(residual)) == pytest.approx(built.frobenius_error, rel=1e-8)
        else:
            assert spectral <= 1e-10 * float(S[0])
        assert built.spectral_error == pytest.approx(float(S[rank * L]) if rank * L < D else 0.0)
        for delta in built.deltas:
            assert int(torch.linalg.matrix_rank(delta)) <= rank


def test_random_adapters_respect_the_lower_bound() -> None:
    D, L = 12, 3
    frozen, target = _random(D, L, seed=7)
    g = torch.Generator().manual_seed(8)
    for rank in (1, 2, 3):
        bound = construct_linear(frozen, target, rank).spectral_error
        for _ in range(20):
            deltas = [
                torch.randn(D, rank, generator=g, dtype=torch.float64)
                @ torch.randn(rank, D, generator=g, dtype=torch.float64)
                for _ in range(L)
            ]
            error = float(torch.linalg.matrix_norm(adapted_product(frozen, deltas) - target, ord=2))
            assert error >= bound * (1 - 1e-12)


def test_singular_frozen_layer_is_named() -> None:
    frozen, target = _random(6, 3, seed=1)
    frozen[2] = frozen[2].clone()
    frozen[2][:, 0] = 0.0  # W_3 singular: P_1 = W_3 W_2 and P_2 = W_3 cannot be inverted
    with pytest.raises(NonSingularityError, match=r"W_3.*condition number"):
        construct_linear(frozen, target, 1)


def test_roundoff_is_reported_for_ill_conditioned_products() -> None:
    # Six plain Gaussian layers: every inverse passes the cond check, yet round-off piles up; we say so.
    g = torch.Generator().manual_seed(806)
    frozen = [torch.randn(8, 8, generator=g, dtype=torch.float64) / math.sqrt(8) for _ in range(6)]
    target = torch.randn(8, 8, generator=g, dtype=torch.float64) / math.sqrt(8)
    with pytest.warns(RuntimeWarning, match="round-off"):
        built = construct_linear(frozen, target, 2)
    assert built.condition_numbers


def test_shape_errors_name_the_layer() -> None:
    frozen, target = _random(4, 2, seed=2)
    frozen[1] = torch.zeros(4, 5, dtype=torch.float64)
    with pytest.raises(ValueError, match=r"frozen\[1\]"):
        construct_linear(frozen, target, 1)
