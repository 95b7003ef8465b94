"""LoRA-rank thresholds for exact representation (Zeng & Lee, ICLR 2024, Theorems 3-5).

A frozen ReLU FNN with L layers represents a target FNN with L̄ <= L layers (same width D) once the layers
are split into L̄ consecutive groups P_1 .. P_L̄ and

    R >= max_i ceil( rank(W̄_i - prod_{l in P_i} W_l) / |P_i| ).

The uniform partition uses M = floor(L / L̄) layers per group (the last group takes the leftovers); since
every rank is <= D it needs at most ``ceil(D / M)``, the paper's headline "width x depth(f̄) / depth(f)"
(``ceil(D L̄ / L)``, which equals ``ceil(D / M)`` when L̄ divides L). A better partition puts more layers
where the frozen group is far from its target layer; :func:`best_partition` finds the consecutive
partition minimising the required rank by dynamic programming.

Ranks of ``W̄_i - prod W_l`` are numerical ranks taken against the round-off of the two operands
(:func:`residual_rank`), so a target stored in float32, or one that differs from the frozen product by a
small change, is not credited with rank for its rounding noise.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from functools import cache

import torch
from torch import Tensor

from lorakit.theory.linear import product


def numerical_rank(matrix: Tensor, rtol: float | None = None) -> int:
    """Number of singular values above ``rtol * σ_1`` (default ``max(shape) * eps`` of the dtype)."""
    matrix = torch.as_tensor(matrix)
    if not matrix.is_floating_point():
        matrix = matrix.to(torch.float64)
    S = torch.linalg.svdvals(matrix)
    if S.numel() == 0 or float(S[0]) == 0.0:
        return 0
    if rtol is None:
        rtol = max(matrix.shape) * torch.finfo(matrix.dtype).eps
    return int((rtol * S[0] < S).sum())


def rounding_noise(weight: Tensor, eps: float | None = None) -> float:
    """Spectral size of the storage round-off of ``weight``: ``eps · (largest row norm + largest column
    norm)``, ``eps`` that of its dtype by default.

    A matrix of independent errors of size up to eps·|w_ij| has a spectral norm of about its largest row norm
    plus its largest column norm (Latała 2005, "Some estimates of norms of random matrices"); singular values
    of a difference of stored weights below this cannot be told from their rounding.
    """
    w = torch.as_tensor(weight).detach().to(torch.float64)
    if eps is None:
        eps = torch.finfo(weight.dtype if weight.is_floating_point() else torch.float64).eps
    return eps * float(torch.linalg.vector_norm(w, dim=1).max() + torch.linalg.vector_norm(w, dim=0).max())


def residual_rank(target: Tensor, frozen: Sequence[Tensor], rtol: float | None = None) -> int:
    """Numerical rank of ``E = W̄ - W_L ... W_1`` (``frozen = [W_1, ..., W_L]``), computed in float64.

    E is a difference of two larger matrices, so its round-off is set by the operands, however small E is.
    By default a singular value of E counts when above the operands' :func:`rounding_noise` at the eps of
    the coarsest dtype the weights come in (float32 weights carry float32 rounding even when analysed in
    float64). An explicit ``rtol`` counts those above ``rtol · max(‖W̄‖₂, ‖∏W‖₂)`` instead.
    """
    tensors = [torch.as_tensor(target), *(torch.as_tensor(w) for w in frozen)]
    wanted = tensors[0].detach().to(torch.float64)
    frozen_product = product([w.detach().to(torch.float64) for w in tensors[1:]])
    if rtol is None:
        eps = max(torch.finfo(t.dtype if t.is_floating_point() else torch.float64).eps for t in tensors)
        floor = max(rounding_noise(m, eps) for m in (wanted, frozen_product))
    else:
        floor = rtol * max(float(torch.linalg.matrix_norm(m, ord=2)) for m in (wanted, frozen_product))
    singular_values = torch.linalg.svdvals(wanted - frozen_product)
    if singular_values.numel() == 0 or float(singular_values.max()) == 0.0:
        return 0
    return int((singular_values > floor).sum())


def headline_rank(width: int, target_depth: int, frozen_depth: int) -> int:
    """The abstract's threshold ``ceil(D · L̄ / L)`` (width x depth of target / depth of frozen model)."""
    _check_depths(target_depth, frozen_depth)
    return math.ceil(width * target_depth / frozen_depth)


def uniform_partition(frozen_depth: int, target_depth: int) -> list[int]:
    """Group sizes of the uniform partition: ``M = floor(L / L̄)`` each, the last group takes the rest."""
    _check_depths(target_depth, frozen_depth)
    size = frozen_depth // target_depth
    sizes = [size] * target_depth
    sizes[-1] += frozen_depth - size * target_depth
    return sizes


def uniform_rank(width: int, target_depth: int, frozen_depth: int) -> int:
    """Rank that always suffices with the uniform partition: ``ceil(D / floor(L / L̄))``."""
    _check_depths(target_depth, frozen_depth)
    return math.ceil(width / (frozen_depth // target_depth))


def _check_depths(target_depth: int, frozen_depth: int) -> None:
    if target_depth < 1 or frozen_depth < target_depth:
        raise ValueError(
            f"depths: expected 1 <= target depth <= frozen depth, got target {target_depth}, "
            f"frozen {frozen_depth}"
        )


def _weights(model: Sequence[Tensor] | object, what: str) -> list[Tensor]:
    weights = getattr(model, "weights", model)
    weights = list(weights() if callable(weights) else weights)
    if not weights:
        raise ValueError(f"{what}: expected a non-empty list of D x D weight matrices or an FNN")
    return [torch.as_tensor(w).detach() for w in weights]  # dtypes kept: residual_rank reads their eps


def _validate_partition(sizes: Sequence[int], frozen_depth: int, target_depth: int) -> list[int]:
    sizes = [int(s) for s in sizes]
    if len(sizes) != target_depth or any(s < 1 for s in sizes) or sum(sizes) != frozen_depth:
        raise ValueError(
            f"partition: expected {target_depth} positive group sizes summing to {frozen_depth} (consecutive "
            f"groups of frozen layers, one per target layer), got {sizes}"
        )
    return sizes


def group_ranks(
    frozen: Sequence[Tensor] | object,
    target: Sequence[Tensor] | object,
    partition: Sequence[int],
    rtol: float | None = None,
) -> list[int]:
    """``rank(W̄_i - prod_{l in P_i} W_l)`` per group of a consecutive partition (given by group sizes).

    Numerical ranks by :func:`residual_rank` (``rtol`` relative to the operands' spectral norm).
    """
    frozen_w, target_w = _weights(frozen, "frozen"), _weights(target, "target")
    sizes = _validate_partition(partition, len(frozen_w), len(target_w))
    ranks, start = [], 0
    for i, size in enumerate(sizes):
        ranks.append(residual_rank(target_w[i], frozen_w[start : start + size], rtol=rtol))
        start += size
    return ranks


def required_rank(
    frozen: Sequence[Tensor] | object,
    target: Sequence[Tensor] | object,
    partition: str | Sequence[int] = "uniform",
    rtol: float | None = None,
) -> int:
    """Sufficient LoRA rank ``max_i ceil(rank(W̄_i - prod_{P_i} W_l) / |P_i|)`` for exact representation.

    ``frozen``/``target``: lists of D x D weights in forward order, or FNNs (anything with ``.weights``).
    ``partition``: ``"uniform"``, ``"best"`` (see :func:`best_partition`) or explicit group sizes.
    """
    frozen_w, target_w = _weights(frozen, "frozen"), _weights(target, "target")
    if partition == "uniform":
        sizes = uniform_partition(len(frozen_w), len(target_w))
    elif partition == "best":
        return best_partition(frozen_w, target_w, rtol=rtol)[1]
    elif isinstance(partition, str):
        raise ValueError(f"partition: expected 'uniform', 'best' or a list of group sizes, got {partition!r}")
    else:
        sizes = list(partition)
    ranks = group_ranks(frozen_w, target_w, sizes, rtol=rtol)
    return max(math.ceil(r / s) for r, s in zip(ranks, sizes, strict=True))


def best_partition(
    frozen: Sequence[Tensor] | object, target: Sequence[Tensor] | object, rtol: float | None = None
) -> tuple[list[int], int]:
    """Consecutive partition minimising ``max_i ceil(rank_i / |P_i|)``; returns (group sizes, required rank).

    Dynamic program over (target layer i, first frozen layer of its group): O(L̄ L²) group ranks.
    """
    frozen_w, target_w = _weights(frozen, "frozen"), _weights(target, "target")
    L, Lbar = len(frozen_w), len(target_w)
    _check_depths(Lbar, L)

    @cache
    def cost(i: int, start: int, stop: int) -> int:
        return math.ceil(residual_rank(target_w[i], frozen_w[start:stop], rtol=rtol) / (stop - start))

    @cache
    def solve(i: int, start: int) -> tuple[int, tuple[int, ...]]:
        # Target layers i.. use frozen layers start..L-1; each remaining group needs >= 1 layer.
        if i == Lbar - 1:
            return cost(i, start, L), (L - start,)
        best: tuple[int, tuple[int, ...]] | None = None
        for stop in range(start + 1, L - (Lbar - 1 - i) + 1):
            rest, sizes = solve(i + 1, stop)
            value = max(cost(i, start, stop), rest)
            if best is None or value < best[0]:
                best = (value, (stop - start, *sizes))
        assert best is not None
        return best

    value, sizes = solve(0, 0)
    return list(sizes), value
