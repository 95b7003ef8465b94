"""Subspace similarity (Hu et al. φ, CCA, principal angles), ΔW comparison and ΔW spectra."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from lorakit.analysis.adapter_io import Adapter, AdapterLayer
from lorakit.analysis.similarity import (
    compare_deltas,
    compare_subspaces,
    pairwise_similarity,
    phi,
    phi_grid,
    principal_angles,
    random_baseline_cca2,
)
from lorakit.analysis.spectrum import delta_spectrum, lowrank_svd, rank_for_energy


def _orthonormal(d: int, k: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.linalg.qr(torch.randn(d, k, generator=g, dtype=torch.float64))[0]


def _random_invertible(k: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(k, k, generator=g, dtype=torch.float64) + 3 * torch.eye(k, dtype=torch.float64)


def test_identical_subspace_gives_one_for_all_metrics() -> None:
    B = _orthonormal(40, 5, 0) @ _random_invertible(5, 1)
    cmp = compare_subspaces(B, B.clone(), side="col")
    assert cmp.cca2 == pytest.approx(1.0, abs=1e-12)
    assert cmp.cca == pytest.approx(1.0, abs=1e-12)
    assert max(cmp.angles_deg) < 1e-6
    assert cmp.identical


def test_orthogonal_subspaces_give_zero() -> None:
    Q = _orthonormal(30, 8, 2)
    B1, B2 = Q[:, :4] * 2.0, Q[:, 4:] @ _random_invertible(4, 3)
    cmp = compare_subspaces(B1, B2)
    assert cmp.cca2 == pytest.approx(0.0, abs=1e-12)
    assert cmp.cca == pytest.approx(0.0, abs=1e-12)
    assert cmp.angles_deg == pytest.approx([90.0] * 4)
    assert not cmp.identical


def test_invariance_to_rotation_within_subspace_and_scaling() -> None:
    d, r = 50, 6
    A1 = torch.randn(r, d, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    A2 = torch.randn(r, d, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    reference = compare_subspaces(A1, A2, side="row")
    assert 0.05 < reference.cca2 < 0.5  # generic subspaces: neither 0 nor 1
    rotation = torch.linalg.qr(
        torch.randn(r, r, generator=torch.Generator().manual_seed(6), dtype=torch.float64)
    )[0]
    gauge = _random_invertible(r, 7)  # B A = (B G⁻¹)(G A): the row space of A must not change
    for transformed in (rotation @ A2, 1e-3 * A2, 42.0 * gauge @ A2):
        other = compare_subspaces(A1, transformed, side="row")
        assert other.cca2 == pytest.approx(reference.cca2, abs=1e-10)
        assert other.cca == pytest.approx(reference.cca, abs=1e-10)
        assert other.angles_deg == pytest.approx(reference.angles_deg, abs=1e-7)


def test_known_principal_angles_for_constructed_pair() -> None:
    d, angles = 12, [0.0, 0.3, 1.1]
    basis = _orthonormal(d, 6, 8)
    e, f = basis[:, :3], basis[:, 3:]
    Q1 = e
    Q2 = torch.stack([math.cos(a) * e[:, i] + math.sin(a) * f[:, i] for i, a in enumerate(angles)], dim=1)
    got = principal_angles(Q1 @ _random_invertible(3, 9), Q2 * 5.0, side="col")
    assert got.tolist() == pytest.approx(angles, abs=1e-9)
    cmp = compare_subspaces(Q1, Q2)
    assert cmp.cca == pytest.approx(np.mean(np.cos(angles)), abs=1e-12)
    assert cmp.cca2 == pytest.approx(np.mean(np.cos(angles) ** 2), abs=1e-12)
    scipy_linalg = pytest.importorskip("scipy.linalg")
    expected = np.sort(scipy_linalg.subspace_angles(Q1.numpy(), Q2.numpy()))
    assert got.numpy() == pytest.approx(expected, abs=1e-7)


def test_tiny_angle_is_resolved_below_sqrt_eps() -> None:
    e = _orthonormal(10, 2, 10)
    tiny = 1e-10
    Q2 = (math.cos(tiny) * e[:, 0] + math.sin(tiny) * e[:, 1])[:, None]
    assert principal_angles(e[:, :1], Q2).item() == pytest.approx(tiny, rel=1e-4)


def test_phi_different_ranks_and_grid() -> None:
    d = 64
    Q = _orthonormal(d, 8, 11)
    small, large = Q[:, :2], Q  # the rank-2 space sits inside the rank-8 one
    assert phi(small, large) == pytest.approx(1.0, abs=1e-12)
    assert phi(large, small) == pytest.approx(1.0, abs=1e-12)
    grid = phi_grid(large @ torch.diag(torch.arange(8, 0, -1, dtype=torch.float64)), small)
    assert grid.shape == (8, 2)
    assert grid[-1, -1] == pytest.approx(1.0, abs=1e-12)
    assert np.all((grid >= -1e-12) & (grid <= 1 + 1e-12))
    # top-1 of a diagonal-scaled basis is its first column, orthogonal to nothing in ``small``'s span
    assert phi(
        large @ torch.diag(torch.arange(8, 0, -1, dtype=torch.float64)), small, i=1, j=2
    ) == pytest.approx(1.0)


def test_random_baseline_matches_random_subspaces() -> None:
    d, r = 200, 8
    values = [
        compare_subspaces(_orthonormal(d, r, 2 * s), _orthonormal(d, r, 2 * s + 1)).cca2 for s in range(20)
    ]
    assert random_baseline_cca2(d, r, r) == pytest.approx(r / d)
    assert np.mean(values) == pytest.approx(r / d, rel=0.2)


def test_rank_deficient_factor_uses_numerical_rank() -> None:
    Q = _orthonormal(20, 3, 12)
    B = torch.cat([Q[:, :2], Q[:, :1] + Q[:, 1:2]], dim=1).float()  # rank 2 stored in float32
    cmp = compare_subspaces(B, Q[:, :2].float())
    assert (cmp.rank1, cmp.rank2) == (2, 2)
    assert cmp.cca2 == pytest.approx(1.0, abs=1e-6)
    zero = compare_subspaces(torch.zeros(20, 3), Q)
    assert zero.rank1 == 0 and math.isnan(zero.cca2)


def test_delta_comparison_and_gauge_invariance() -> None:
    g = torch.Generator().manual_seed(13)
    B = torch.randn(30, 4, generator=g, dtype=torch.float64)
    A = torch.randn(4, 20, generator=g, dtype=torch.float64)
    G = _random_invertible(4, 14)
    same = compare_deltas(B, A, B @ torch.linalg.inv(G), G @ A, 2.0, 0.5)
    assert same.cosine == pytest.approx(1.0, abs=1e-10)
    assert same.col.cca2 == pytest.approx(1.0, abs=1e-10) and same.row.cca2 == pytest.approx(1.0, abs=1e-10)
    opposite = compare_deltas(B, A, -B, A)
    assert opposite.cosine == pytest.approx(-1.0, abs=1e-12)
    B2 = torch.randn(30, 4, generator=g, dtype=torch.float64)
    other = compare_deltas(B, A, B2, A)
    dense = torch.nn.functional.cosine_similarity((B @ A).flatten(), (B2 @ A).flatten(), dim=0).item()
    assert other.cosine == pytest.approx(dense, abs=1e-12)
    assert other.row.cca2 == pytest.approx(1.0, abs=1e-10)  # same A: same row space


def test_spectrum_matches_dense_svd() -> None:
    g = torch.Generator().manual_seed(15)
    B = torch.randn(40, 6, generator=g, dtype=torch.float64)
    A = torch.randn(6, 25, generator=g, dtype=torch.float64)
    U, S, V = lowrank_svd(B, A, 0.7)
    dense = 0.7 * B @ A
    assert S.tolist() == pytest.approx(torch.linalg.svdvals(dense)[:6].tolist(), rel=1e-10)
    assert torch.allclose(U @ torch.diag(S) @ V.T, dense, atol=1e-10)
    # rank-2 update with known singular values 3 and 1: energy 9/10 → rank 1 keeps exactly 90%
    Q_out, Q_in = _orthonormal(40, 2, 16), _orthonormal(25, 2, 17)
    stats = delta_spectrum(Q_out @ torch.diag(torch.tensor([3.0, 1.0], dtype=torch.float64)), Q_in.T)
    assert stats.singular_values == pytest.approx([3.0, 1.0])
    assert (stats.rank, stats.rank_90, stats.rank_99) == (2, 1, 2)
    assert stats.stable_rank == pytest.approx(10 / 9)
    p = np.array([0.75, 0.25])
    assert stats.effective_rank == pytest.approx(float(np.exp(-(p * np.log(p)).sum())))
    assert rank_for_energy(torch.tensor([1.0, 1.0, 1.0, 1.0]), 1.0) == 4
    assert rank_for_energy(torch.zeros(3), 0.9) == 0


def _adapter(label: str, layers: dict[str, tuple[torch.Tensor, torch.Tensor]]) -> Adapter:
    return Adapter(
        path=__import__("pathlib").Path(label),
        label=label,
        config={},
        layers={n: AdapterLayer(name=n, A=A, B=B, scaling=1.0) for n, (A, B) in layers.items()},
    )


def test_pairwise_similarity_groups_and_flags_identical_frozen_factor() -> None:
    g = torch.Generator().manual_seed(18)
    A0 = {m: torch.randn(4, 32, generator=g) for m in ("l0.query", "l0.value")}
    runs = []
    for name in ("t1", "t2", "t3"):
        runs.append(_adapter(name, {m: (A0[m], torch.randn(24, 4, generator=g)) for m in A0}))
    result = pairwise_similarity(runs)
    assert set(result.groups) == {"query", "value", "all"}
    a = result.matrix("A", "cca2")
    assert a.shape == (3, 3) and np.allclose(a, 1.0)
    assert np.allclose(result.identical["all"]["A"], 1.0)  # frozen shared A: trivially 1, and flagged
    b = result.matrix("B", "cca2", "query")
    assert np.allclose(np.diag(b), 1.0) and result.off_diagonal_mean("B", "cca2") < 0.5
    assert result.baselines["all"]["B"]["cca2"] == pytest.approx(4 / 24)
    assert result.baselines["all"]["A"]["cca2"] == pytest.approx(4 / 32)
