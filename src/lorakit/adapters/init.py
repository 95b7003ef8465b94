"""Initialisation schemes for the LoRA factors ``A ∈ R^{r×in}`` and ``B ∈ R^{out×r}``.

Each scheme is a function ``(A, B, W0, generator) -> None`` that fills ``A`` and ``B`` in place
(float32 master tensors); ``W0`` is the frozen weight as ``out×in`` (float32 copy), used only by
``svd-a``. Schemes draw only from ``generator`` so results are deterministic given the seed.

| name | A | B | source |
|---|---|---|---|
| ``lora`` | Kaiming-uniform (a=√5) | 0 | Hu et al. 2021; PEFT's default |
| ``gaussian-a`` | N(0, 1/in) | 0 | LoRA+ (Hayou et al. 2024) Init[1] |
| ``gaussian-b`` | 0 | N(0, 1) | LoRA+ Init[2] |
| ``orthonormal-a`` | r Haar-random orthonormal rows | 0 | Zhu et al. 2024, B̂₀A_rand (with ``train="B"``) |
| ``orthonormal-b`` | 0 | r Haar-random orthonormal columns | Zhu et al. 2024, B_randÂ₀ (with ``train="A"``) |
| ``svd-a`` | top-r right singular vectors of W0 | 0 | Zhu et al. rebuttal, Â_V |
| ``banded-a`` | orthonormal rows of a band matrix of width r | 0 | Zhu et al. rebuttal, Table 1.e |
| ``correlated-rows-a`` | rows = one shared row + 5% noise | 0 | Zhu et al. rebuttal, Table 1.e |
| ``correlated-cols-a`` | columns = one shared column + 5% noise | 0 | Zhu et al. rebuttal, Table 1.e |

Embedding adapters follow PEFT: ``lora`` gives A = 0, B ~ N(0, 1) there (A is r×num_embeddings and is
indexed, not multiplied, so the Linear fan-in rule does not apply).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

InitScheme = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Generator], None]


def haar_orthonormal_rows(rows: int, cols: int, generator: torch.Generator) -> torch.Tensor:
    """``rows × cols`` matrix with orthonormal rows, uniformly (Haar) distributed.

    QR of a Gaussian ``cols × rows`` matrix with the signs of R's diagonal folded into Q (Mezzadri 2007);
    without the sign fix Q is not uniformly distributed.
    """
    if rows > cols:
        raise ValueError(f"cannot draw {rows} orthonormal rows of length {cols}: the rank r must be ≤ {cols}")
    gaussian = torch.randn(cols, rows, generator=generator, dtype=torch.float64)
    q, r = torch.linalg.qr(gaussian)
    signs = torch.sign(torch.diagonal(r))
    signs[signs == 0] = 1.0
    return (q * signs).T.contiguous().float()


def _lora(A: torch.Tensor, B: torch.Tensor, W0: torch.Tensor, g: torch.Generator) -> None:
    # kaiming_uniform_(a=√5) on a fan_in=in tensor is U(-b, b) with b = √(6 / ((1 + a²)·in)) = 1/√in.
    bound = 1.0 / math.sqrt(A.shape[1])
    A.copy_(torch.rand(A.shape, generator=g) * (2 * bound) - bound)
    B.zero_()


def _gaussian_a(A: torch.Tensor, B: torch.Tensor, W0: torch.Tensor, g: torch.Generator) -> None:
    A.copy_(torch.randn(A.shape, generator=g) / math.sqrt(A.shape[1]))
    B.zero_()


def _gaussian_b(A: torch.Tensor, B: torch.Tensor, W0: torch.Tensor, g: torch.Generator) -> None:
    A.zero_()
    B.copy_(torch.randn(B.shape, generator=g))


def _orthonormal_a(A: torch.Tensor, B: torch.Tensor, W0: torch.Tensor, g: torch.Generator) -> None:
    A.copy_(haar_orthonormal_rows(A.shape[0], A.shape[1], g))
    B.zero_()


def _orthonormal_b(A: torch.Tensor, B: torch.Tensor, W0: torch.Tensor, g: torch.Generator) -> None:
    A.zero_()
    B.copy_(haar_orthonormal_rows(B.shape[1], B.shape[0], g).T)


def _svd_a(A: torch.Tensor, B: torch.Tensor, W0: torch.Tensor, g: torch.Generator) -> None:
    r = A.shape[0]
    if r > min(W0.shape):
        raise ValueError(f"svd-a needs r ≤ min(out, in) = {min(W0.shape)}, got r={r}")
    # Rows of Vh are the right singular vectors; the authors' code took columns of Vh by mistake.
    _, _, vh = torch.linalg.svd(W0.double(), full_matrices=False)
    A.copy_(vh[:r].float())
    B.zero_()


def _banded_a(A: torch.Tensor, B: torch.Tensor, W0: torch.Tensor, g: torch.Generator) -> None:
    r, n = A.shape
    # Row i is non-zero on columns [i·s, i·s + r) with stride s spreading the bands over the input,
    # then rows are orthonormalised (band structure kept: overlaps are only between neighbours).
    stride = max(1, (n - r) // max(1, r - 1)) if r > 1 else 0
    band = torch.zeros(r, n)
    for i in range(r):
        start = min(i * stride, n - r)
        band[i, start : start + r] = torch.randn(r, generator=g)
    q, _ = torch.linalg.qr(band.T.double())
    A.copy_(q.T.float())
    B.zero_()


def _correlated_rows_a(A: torch.Tensor, B: torch.Tensor, W0: torch.Tensor, g: torch.Generator) -> None:
    r, n = A.shape
    shared = torch.randn(1, n, generator=g)
    A.copy_((shared + 0.05 * torch.randn(r, n, generator=g)) / math.sqrt(n))
    B.zero_()


def _correlated_cols_a(A: torch.Tensor, B: torch.Tensor, W0: torch.Tensor, g: torch.Generator) -> None:
    r, n = A.shape
    shared = torch.randn(r, 1, generator=g)
    A.copy_((shared + 0.05 * torch.randn(r, n, generator=g)) / math.sqrt(n))
    B.zero_()


INIT_SCHEMES: dict[str, InitScheme] = {
    "lora": _lora,
    "gaussian-a": _gaussian_a,
    "gaussian-b": _gaussian_b,
    "orthonormal-a": _orthonormal_a,
    "orthonormal-b": _orthonormal_b,
    "svd-a": _svd_a,
    "banded-a": _banded_a,
    "correlated-rows-a": _correlated_rows_a,
    "correlated-cols-a": _correlated_cols_a,
}


def initialise(
    name: str, A: torch.Tensor, B: torch.Tensor, W0: torch.Tensor, generator: torch.Generator, embedding: bool
) -> None:
    """Fill ``A`` and ``B`` in place with scheme ``name`` (see the module table)."""
    if embedding and name == "lora":
        A.zero_()
        B.copy_(torch.randn(B.shape, generator=generator))
        return
    with torch.no_grad():
        INIT_SCHEMES[name](A, B, W0, generator)
