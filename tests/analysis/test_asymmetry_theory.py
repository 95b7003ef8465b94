"""Closed forms of the linear-regression asymmetry (Zhu et al.) against least squares and Monte Carlo."""

from __future__ import annotations

import math

import pytest
import torch

from lorakit.theory import asymmetry as th


def _problem(d_out: int = 7, d_in: int = 9, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    delta = torch.randn(d_out, d_in, generator=g, dtype=torch.float64)
    m = torch.randn(d_in, d_in, generator=g, dtype=torch.float64)
    sigma = m @ m.T / d_in + 0.1 * torch.eye(d_in, dtype=torch.float64)
    return delta, sigma, g


def test_closed_forms_equal_lstsq() -> None:
    delta, sigma, g = _problem()
    root = torch.linalg.cholesky(sigma)  # population least squares as a weighted lstsq: X-rows = root^T
    q = th.haar_orthonormal(3, 9, g)
    torch.testing.assert_close(q @ q.T, torch.eye(3, dtype=torch.float64))
    # frozen A: min_B ||(Δ - B Q) root||_F  <=>  lstsq(rootᵀ Qᵀ, rootᵀ Δᵀ)
    b_ls = torch.linalg.lstsq(root.T @ q.T, root.T @ delta.T, driver="gelsd").solution.T
    b_cf = th.frozen_a_solution(delta, sigma, q)
    assert torch.linalg.norm(b_cf - b_ls) / torch.linalg.norm(b_ls) <= 1e-10
    # frozen B: min_A ||(Δ - U A) root||_F  <=>  lstsq(U, Δ) column by column
    u = th.haar_orthonormal(7, 3, g)
    a_ls = torch.linalg.lstsq(u, delta, driver="gelsd").solution
    a_cf = th.frozen_b_solution(delta, sigma, u)
    assert torch.linalg.norm(a_cf - a_ls) / torch.linalg.norm(a_ls) <= 1e-10
    # the loss formulas equal the population loss of the solutions
    noise = 0.3
    assert th.frozen_a_loss(delta, sigma, q, noise) == pytest.approx(
        th.population_loss(delta, sigma, b_cf, q, noise), rel=1e-10
    )
    assert th.frozen_b_loss(delta, sigma, u, noise) == pytest.approx(
        th.population_loss(delta, sigma, u, a_cf, noise), rel=1e-10
    )
    # LoRA optimum lies below both one-sided losses
    assert th.lora_optimal_loss(delta, sigma, 3, noise) <= th.frozen_a_loss(delta, sigma, q, noise)


def test_monte_carlo_within_three_standard_errors() -> None:
    g = torch.Generator().manual_seed(1)
    d, r, noise = 12, 3, 0.01
    delta = torch.randn(d, d, generator=g, dtype=torch.float64) / math.sqrt(d)
    sigma = torch.diag(1.0 / torch.arange(1, d + 1, dtype=torch.float64))
    mc_b = th.monte_carlo_frozen_b(delta, sigma, r, noise, 400, g)
    assert abs(mc_b.mean - th.expected_frozen_b_loss(delta, sigma, r, noise)) <= 3 * mc_b.stderr
    iso = torch.eye(d, dtype=torch.float64) * 2.0
    mc_a = th.monte_carlo_frozen_a(delta, iso, r, noise, 400, g)
    assert abs(mc_a.mean - th.expected_frozen_a_loss(delta, iso, r, noise)) <= 3 * mc_a.stderr
    with pytest.raises(ValueError, match="isotropic"):
        th.expected_frozen_a_loss(delta, sigma, r, noise)
    # anisotropic Σ favours freezing A (Zhu et al.): clearly separated in this case
    mc_a_aniso = th.monte_carlo_frozen_a(delta, sigma, r, noise, 400, g)
    assert mc_a_aniso.mean + 3 * mc_a_aniso.stderr < mc_b.mean - 3 * mc_b.stderr
    # sampled data: a least-squares fit on many points approaches the closed form of the same factor
    q = th.haar_orthonormal(r, d, g)
    mse, se = th.sampled_one_sided_loss(delta, sigma, "A", q, noise, 20000, 4000, g)
    formula = th.frozen_a_loss(delta, sigma, q, noise)
    assert abs(mse - formula * (1 + r / (20000 - r - 1))) <= 3 * se


def test_bad_shapes_are_named() -> None:
    delta, sigma, g = _problem()
    with pytest.raises(ValueError, match="Sigma must be"):
        th.frozen_a_solution(delta, sigma[:3, :3], th.haar_orthonormal(2, 9, g))
    with pytest.raises(ValueError, match="rank must be"):
        th.expected_frozen_b_loss(delta, sigma, 0, 0.1)
