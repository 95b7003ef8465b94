"""Error of the FNN construction below the rank threshold (the shape of Zeng & Lee, ICLR 2024, Theorem 6).

Below the threshold, group i of the construction computes ``z ↦ ReLU(W̃_i z + b̄_i)`` with
``W̃_i = prod_{P_i} W_l + LR_{R|P_i|}(E_i)``, ``E_i = W̄_i - prod_{P_i} W_l``, so ``||W̃_i - W̄_i||_2 = ε_i :=
σ_{R|P_i|+1}(E_i)``. Because ReLU is 1-Lipschitz, with ``e_i = ||z_i - z̄_i||``,

    e_i <= ||W̃_i||_2 e_{i-1} + ε_i ||z̄_{i-1}||,   ||W̃_i||_2 <= ||W̄_i||_2 + ε_i,
    ||z̄_i|| <= ||W̄_i||_2 ||z̄_{i-1}|| + ||b̄_i||,

and taking root-mean-squares over x (Minkowski), with ``a_0 = sqrt(tr Σ)``, ``Σ = E[x xᵀ]``:

    sqrt(E ||f(x) - f̄(x)||²) <= Σ_i [ prod_{k>i} (||W̄_k||_2 + ε_k) ] ε_i a_{i-1},
    a_i = ||W̄_i||_2 a_{i-1} + ||b̄_i||.

This is a self-derived bound in the spirit of the paper's (spectral instead of Frobenius norms, a product
of per-layer factors instead of a power of their maximum, ``sqrt(tr Σ)`` for the input scale, RMS instead of
mean error); it is not uniformly sharper than the paper's, whose exact constants NOTES.md leaves open. It
holds for the construction on inputs where the bypassed ReLUs stay on (see :mod:`lorakit.theory.fnn`). It is
zero at the threshold and non-increasing in R. For L̄ = 1 and Σ = I it reads ``σ_{RL+1}(E) sqrt(D)``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from lorakit.theory.fnn import resolve_partition
from lorakit.theory.linear import product
from lorakit.theory.models import FNN


def group_tail_singular_values(
    frozen: FNN, target: FNN, rank: int, partition: str | Sequence[int] = "uniform"
) -> list[float]:
    """``ε_i = σ_{R|P_i|+1}(W̄_i - prod_{P_i} W_l)`` for each group (0 once R|P_i| >= D)."""
    sizes = resolve_partition(frozen, target, partition)
    eps, start = [], 0
    for i, size in enumerate(sizes):
        E = target.weights[i].double() - product([w.double() for w in frozen.weights[start : start + size]])
        S = torch.linalg.svdvals(E)
        k = rank * size
        eps.append(float(S[k]) if k < S.numel() else 0.0)
        start += size
    return eps


def fnn_error_bound(
    frozen: FNN,
    target: FNN,
    rank: int,
    *,
    input_trace: float | None = None,
    partition: str | Sequence[int] = "uniform",
) -> dict[str, float]:
    """Upper bound on the construction's error at ``rank``; see the module docstring for the formula.

    ``input_trace`` = tr E[x xᵀ] (default D, i.e. x ~ N(0, I_D)). Returns ``rms`` (bound on
    sqrt(E||f - f̄||²)) and ``mse`` (= rms² / D, comparable to the mean-over-outputs MSE).
    """
    width = frozen.width
    trace = float(width if input_trace is None else input_trace)
    if trace < 0:
        raise ValueError(f"input_trace: expected tr E[x xᵀ] >= 0, got {trace}")
    eps = group_tail_singular_values(frozen, target, rank, partition)
    norms = [float(torch.linalg.matrix_norm(w.double(), ord=2)) for w in target.weights]
    bias_norms = [float(torch.linalg.vector_norm(b.double())) for b in target.biases]
    activation = trace**0.5
    total = 0.0
    for i in range(target.depth):
        amplification = 1.0
        for k in range(i + 1, target.depth):
            amplification *= norms[k] + eps[k]
        total += amplification * eps[i] * activation
        activation = norms[i] * activation + bias_norms[i]
    return {"rms": total, "mse": total**2 / width, "group_tail_singular_values": eps}
