"""Closed-form LoRA adapters for a product of frozen linear layers (Zeng & Lee, ICLR 2024, Lemma 1).

Setting: frozen square matrices ``W_1 .. W_L`` (D x D), a target ``W̄`` and one LoRA rank R shared by all
layers. With the discrepancy ``E = W̄ - W_L ... W_1`` the best achievable spectral error is

    min_{rank(ΔW_l) <= R} || prod_l (W_l + ΔW_l) - W̄ ||_2 = σ_{RL+1}(E),

(Frobenius: ``sqrt(sum_{i > RL} σ_i(E)^2)``), so the target is represented exactly iff
``R >= ceil(rank(E) / L)``. The lower bound holds for *any* adapters (telescoping shows the change of the
product has rank <= RL; Eckart-Young does the rest). The construction reaching it splits the right
singular vectors of E into blocks of R and inserts them layer by layer through the adapted partial
products:

    ΔW_l = P_l^{-1} E V_l V_lᵀ Q_l^{-1},   P_l = W_L ... W_{l+1},   Q_l = (W_{l-1}+ΔW_{l-1}) ... (W_1+ΔW_1),

i.e. ``B_l = P_l^{-1} E V_l`` (D x R) and ``A_l = V_lᵀ Q_l^{-1}`` (R x D), with the invariant
``Q_{l+1} = W_l ... W_1 + P_l^{-1} E Σ_{j<=l} V_j V_jᵀ`` so that the adapted product equals
``W_L ... W_1 + LR_{RL}(E)``. It needs ``P_l`` and ``Q_l`` to be invertible (the paper's non-singularity
assumption, which holds with probability one for continuous random weights).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

#: Condition number above which an inverted matrix is treated as singular (float64 keeps ~16 digits).
DEFAULT_MAX_COND = 1e12
#: Relative deviation (in units of ||E||_2) of the achieved error from the optimum that triggers a warning.
ROUNDOFF_WARNING = 1e-6


class NonSingularityError(ValueError):
    """The non-singularity assumption fails: a matrix the construction inverts is (nearly) singular."""


@dataclass
class LinearConstruction:
    """Result of :func:`construct_linear`: ``ΔW_l = B[l] @ A[l]`` (0-based l, layer 1 first).

    ``singular_values`` are those of the discrepancy E; ``spectral_error`` = σ_{RL+1}(E) and
    ``frobenius_error`` = sqrt(Σ_{i>RL} σ_i(E)²) are the predicted (and optimal) errors of the adapted
    product against the target.
    """

    B: list[Tensor]
    A: list[Tensor]
    singular_values: Tensor
    spectral_error: float
    frobenius_error: float
    rank: int
    discrepancy: Tensor
    achieved_spectral_error: float = 0.0
    condition_numbers: dict[str, float] | None = None

    @property
    def deltas(self) -> list[Tensor]:
        """The weight updates ``ΔW_l = B_l A_l``."""
        return [b @ a for b, a in zip(self.B, self.A, strict=True)]


def _as_matrices(frozen: Sequence[Tensor], target: Tensor, dtype: torch.dtype) -> tuple[list[Tensor], Tensor]:
    if len(frozen) == 0:
        raise ValueError("frozen: expected at least one frozen matrix, got an empty list")
    target = torch.as_tensor(target).to(dtype)
    if target.ndim != 2 or target.shape[0] != target.shape[1]:
        raise ValueError(f"target: expected a square D x D matrix, got shape {tuple(target.shape)}")
    mats = []
    for index, weight in enumerate(frozen, start=1):
        weight = torch.as_tensor(weight).to(dtype)
        if weight.shape != target.shape:
            raise ValueError(
                f"frozen[{index - 1}] (layer {index}): expected shape {tuple(target.shape)} like the target, "
                f"got {tuple(weight.shape)}"
            )
        mats.append(weight)
    return mats, target


def product(mats: Sequence[Tensor]) -> Tensor:
    """``W_L ... W_1`` for ``mats = [W_1, ..., W_L]`` (the identity for an empty list is not defined here)."""
    out = mats[0]
    for weight in mats[1:]:
        out = weight @ out
    return out


def check_invertible(matrix: Tensor, what: str, max_cond: float = DEFAULT_MAX_COND) -> float:
    """2-norm condition number of ``matrix``; raise :class:`NonSingularityError` above ``max_cond``."""
    cond = float(torch.linalg.cond(matrix))
    if not math.isfinite(cond) or cond > max_cond:
        raise NonSingularityError(
            f"{what} is singular or ill-conditioned (condition number {cond:.3g} > {max_cond:.3g}): the "
            "non-singularity assumption of Zeng & Lee's construction fails; perturb the frozen weights or "
            "raise max_cond"
        )
    return cond


def optimal_errors(singular_values: Tensor, num_directions: int) -> tuple[float, float]:
    """(spectral, Frobenius) error of the best rank-k approximation: σ_{k+1}, sqrt(Σ_{i>k} σ_i²)."""
    tail = singular_values[num_directions:]
    spectral = float(tail[0]) if tail.numel() else 0.0
    return spectral, float(torch.linalg.vector_norm(tail))


def construct_linear(
    frozen: Sequence[Tensor],
    target: Tensor,
    rank: int,
    *,
    dtype: torch.dtype = torch.float64,
    max_cond: float = DEFAULT_MAX_COND,
) -> LinearConstruction:
    """Rank-``rank`` adapters making ``prod_l (W_l + B_l A_l) = W_L...W_1 + LR_{rank·L}(W̄ - W_L...W_1)``.

    ``frozen = [W_1, ..., W_L]`` in forward order (W_1 acts first). Zeng & Lee (ICLR 2024), Lemma 1 and
    the construction in their proof. Raises :class:`NonSingularityError` naming the layer and the condition
    number when a partial product to invert is (nearly) singular.
    """
    if int(rank) != rank or rank < 0:
        raise ValueError(f"rank: expected a non-negative integer, got {rank!r}")
    mats, target = _as_matrices(frozen, target, dtype)
    depth, width = len(mats), target.shape[0]
    E = target - product(mats)
    U, S, Vh = torch.linalg.svd(E)
    V = Vh.mT
    # P_l = W_L ... W_{l+1}; suffix[l] for 0-based l is the product of the layers after it.
    suffix: list[Tensor] = [torch.eye(width, dtype=dtype)] * depth
    for l in range(depth - 2, -1, -1):
        suffix[l] = suffix[l + 1] @ mats[l + 1]
    B_list, A_list = [], []
    conditions: dict[str, float] = {}
    Q = torch.eye(width, dtype=dtype)
    for l in range(depth):
        lo, hi = min(l * rank, width), min((l + 1) * rank, width)
        V_l = V[:, lo:hi]
        if hi > lo:
            # E V_l = U_l S_l: use it directly (cheaper and exact up to round-off).
            EV = U[:, lo:hi] * S[lo:hi]
            if l < depth - 1:
                check_invertible(
                    suffix[l], f"frozen product W_{depth}...W_{l + 2} (after layer {l + 1})", max_cond
                )
                B_l = torch.linalg.solve(suffix[l], EV)
            else:
                B_l = EV
            if l > 0:
                what = f"adapted partial product before layer {l + 1}"
                conditions[what] = check_invertible(Q, what, max_cond)
                A_l = torch.linalg.solve(Q.mT, V_l).mT
            else:
                A_l = V_l.mT.clone()
        else:
            B_l = torch.zeros(width, 0, dtype=dtype)
            A_l = torch.zeros(0, width, dtype=dtype)
        # Pad to the requested rank so every layer's factors have the same (D x R, R x D) shapes.
        pad = rank - B_l.shape[1]
        if pad > 0:
            B_l = torch.cat([B_l, torch.zeros(width, pad, dtype=dtype)], dim=1)
            A_l = torch.cat([A_l, torch.zeros(pad, width, dtype=dtype)], dim=0)
        B_list.append(B_l)
        A_list.append(A_l)
        Q = (mats[l] + B_l @ A_l) @ Q
    spectral, frobenius = optimal_errors(S, rank * depth)
    achieved = float(torch.linalg.matrix_norm(Q - target, ord=2))
    scale = float(S[0]) if S.numel() and float(S[0]) > 0 else 1.0
    if abs(achieved - spectral) > ROUNDOFF_WARNING * scale:
        # Round-off grows like eps * cond(P_l) * cond(Q_l): products of many random layers get there.
        worst = max(conditions, key=conditions.get) if conditions else "none"
        warnings.warn(
            f"construct_linear: achieved spectral error {achieved:.3g} differs from the optimum "
            f"{spectral:.3g} by more than {ROUNDOFF_WARNING:g} x ||E||_2 because of round-off; "
            f"worst-conditioned inverse: {worst} "
            f"(condition number {conditions.get(worst, math.nan):.3g})",
            RuntimeWarning,
            stacklevel=2,
        )
    return LinearConstruction(B_list, A_list, S, spectral, frobenius, int(rank), E, achieved, conditions)


def adapted_product(frozen: Sequence[Tensor], deltas: Sequence[Tensor]) -> Tensor:
    """``prod_l (W_l + ΔW_l)`` in forward order."""
    if len(frozen) != len(deltas):
        raise ValueError(f"deltas: expected {len(frozen)} updates (one per frozen layer), got {len(deltas)}")
    return product([w + d for w, d in zip(frozen, deltas, strict=True)])


def linear_threshold(frozen: Sequence[Tensor], target: Tensor, rtol: float | None = None) -> int:
    """Smallest R with exact representation: ``ceil(rank(E) / L)``, E's numerical rank taken against the
    round-off of the weights (:func:`lorakit.theory.rank.residual_rank`)."""
    from lorakit.theory.rank import residual_rank

    _as_matrices(frozen, target, torch.float64)  # validates the shapes
    return math.ceil(residual_rank(target, frozen, rtol=rtol) / len(frozen))


def gaussian_mse(singular_values: Tensor, num_directions: int, width: int | None = None) -> float:
    """Expected MSE (mean over D outputs) for x ~ N(0, I) after removing k directions: (1/D) Σ_{i>k} σ_i²."""
    width = width or singular_values.numel()
    return float((singular_values[num_directions:] ** 2).sum()) / width
