"""Singular spectrum of a LoRA update ``ΔW = s · B A`` without forming ΔW.

With thin QR factorisations ``B = Q_B R_B`` and ``Aᵀ = Q_A R_A`` (``B`` is out×r, ``A`` is r×in),

    ΔW = s · Q_B (R_B R_Aᵀ) Q_Aᵀ,

so the SVD of the small r×r core ``s · R_B R_Aᵀ = U Σ Vᵀ`` gives the thin SVD of ΔW:
left vectors ``Q_B U``, singular values ``Σ``, right vectors ``Q_A V``. This costs O((in+out)·r²) instead
of O(in·out·r) and never materialises an embedding-sized ΔW.

Summary statistics (:func:`spectrum_stats`) for the bridge to the expressive-power rank advisor
(Zeng & Lee, ICLR 2024, NOTES.md A.2: the best rank-k approximation error of a target is governed by the
tail singular values):

* ``effective_rank`` — Roy & Vetterli (2007): ``exp(H(p))`` with ``p_i = σ_i / Σ_j σ_j``;
* ``stable_rank`` — ``‖ΔW‖_F² / ‖ΔW‖_2²``;
* ``rank_90`` / ``rank_99`` — the smallest k whose truncated SVD keeps at least 90% / 99% of the energy
  ``‖ΔW‖_F² = Σ σ_i²`` (Eckart–Young: the relative residual is then ``√(1 − q)``, i.e. ≤ 0.32 / 0.1).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

import torch

#: energy fractions for which the needed rank is reported
ENERGY_LEVELS: tuple[float, ...] = (0.9, 0.99)


def numerical_rank(singular_values: torch.Tensor, shape: tuple[int, ...], eps: float) -> int:
    """Count singular values above ``σ_max · max(shape) · eps`` (the LAPACK / ``matrix_rank`` rule).

    ``eps`` should be the machine epsilon of the dtype the matrix was *stored* in (float32 for saved
    adapters), not of the float64 used to analyse it, or float32 round-off would count as rank.
    """
    if singular_values.numel() == 0:
        return 0
    top = float(singular_values.max())
    if not math.isfinite(top):
        raise ValueError("singular values are not finite: the matrix contains NaN or inf")
    if top <= 0.0:
        return 0
    return int((singular_values > top * max(shape) * eps).sum())


def lowrank_svd(
    B: torch.Tensor, A: torch.Tensor, scaling: float = 1.0
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Thin SVD ``(U, S, V)`` of ``scaling · B @ A`` in float64, with ``ΔW = U diag(S) Vᵀ``.

    ``B`` is (out, r), ``A`` is (r, in); returns ``U`` (out, r), ``S`` (r,) descending, ``V`` (in, r).
    """
    if B.ndim != 2 or A.ndim != 2 or B.shape[1] != A.shape[0]:
        raise ValueError(
            f"expected B (out, r) and A (r, in) with matching r, got B {tuple(B.shape)} and "
            f"A {tuple(A.shape)}"
        )
    B64 = B.detach().to(torch.float64)
    A64 = A.detach().to(torch.float64)
    Q_B, R_B = torch.linalg.qr(B64)  # (out, k), (k, r) with k = min(out, r)
    Q_A, R_A = torch.linalg.qr(A64.T)  # (in, k'), (k', r)
    core = float(scaling) * (R_B @ R_A.T)
    U, S, Vh = torch.linalg.svd(core, full_matrices=False)
    return Q_B @ U, S, Q_A @ Vh.T


def delta_singular_values(B: torch.Tensor, A: torch.Tensor, scaling: float = 1.0) -> torch.Tensor:
    """Singular values (float64, descending) of ``scaling · B @ A``."""
    return lowrank_svd(B, A, scaling)[1]


@dataclass(frozen=True)
class SpectrumStats:
    """Spectral summary of one ΔW; see the module docstring for the definitions."""

    singular_values: list[float]
    frobenius_norm: float
    spectral_norm: float
    rank: int
    effective_rank: float
    stable_rank: float
    rank_90: int
    rank_99: int

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def rank_for_energy(singular_values: torch.Tensor, fraction: float) -> int:
    """Smallest k with ``Σ_{i≤k} σ_i² ≥ fraction · Σ_i σ_i²`` (0 for a zero matrix)."""
    if not 0.0 < fraction <= 1.0:
        raise ValueError(f"fraction must be in (0, 1], got {fraction}")
    energy = singular_values.to(torch.float64) ** 2
    total = float(energy.sum())
    if total <= 0.0:
        return 0
    cumulative = torch.cumsum(energy, 0) / total
    # a relative slack of 1e-12 so that fraction=1 is reached despite round-off in the cumulative sum
    return int((cumulative < fraction - 1e-12).sum()) + 1


def effective_rank(singular_values: torch.Tensor) -> float:
    """Roy & Vetterli (2007) effective rank ``exp(-Σ p_i log p_i)``, ``p_i = σ_i / Σ σ_j`` (0 if ΔW = 0)."""
    s = singular_values.to(torch.float64)
    total = float(s.sum())
    if total <= 0.0:
        return 0.0
    p = s[s > 0] / total
    return float(torch.exp(-(p * torch.log(p)).sum()))


def spectrum_stats(singular_values: torch.Tensor, shape: tuple[int, int], eps: float) -> SpectrumStats:
    """All statistics of :class:`SpectrumStats` from the singular values of a matrix of ``shape``."""
    s = singular_values.to(torch.float64)
    frobenius = float(torch.sqrt((s**2).sum()))
    spectral = float(s.max()) if s.numel() else 0.0
    return SpectrumStats(
        singular_values=[float(v) for v in s],
        frobenius_norm=frobenius,
        spectral_norm=spectral,
        rank=numerical_rank(s, shape, eps),
        effective_rank=effective_rank(s),
        stable_rank=frobenius**2 / spectral**2 if spectral > 0 else 0.0,
        rank_90=rank_for_energy(s, ENERGY_LEVELS[0]),
        rank_99=rank_for_energy(s, ENERGY_LEVELS[1]),
    )


def delta_spectrum(B: torch.Tensor, A: torch.Tensor, scaling: float = 1.0) -> SpectrumStats:
    """:class:`SpectrumStats` of ``scaling · B @ A`` (B (out, r), A (r, in)).

    The numerical-rank tolerance uses the epsilon of the factors' own dtype (float32 when loaded
    from a saved adapter).
    """
    eps = max(torch.finfo(B.dtype).eps, torch.finfo(A.dtype).eps)
    return spectrum_stats(delta_singular_values(B, A, scaling), (B.shape[0], A.shape[1]), eps)
