"""Closed forms for one-sided LoRA in linear regression (Zhu et al., "Asymmetry in LoRA", ICML 2024).

Setting (paper §4 and rebuttal; NOTES.md B.2): inputs ``X`` with ``E[X] = 0``, ``Cov X = Σ`` (d_in×d_in),
targets ``Y = W_t X + ε`` with isotropic noise of variance ``σ²`` per output, pretrained ``W_0`` and
``Δ = W_t − W_0`` (d_out×d_in). The adapted model predicts ``(W_0 + B A) X`` and its population loss is::

    L(A, B) = E‖Y − (W_0 + BA) X‖² = d_out σ² + Tr((Δ − BA) Σ (Δ − BA)ᵀ).

* Frozen ``A = Q`` (r×d_in, orthonormal rows), B trained: least squares on the features ``QX`` gives
  ``B* = Δ Σ Qᵀ (Q Σ Qᵀ)⁻¹`` and
  ``L_A(Q) = d_out σ² + Tr(ΔΣΔᵀ) − Tr(QΣΔᵀΔΣQᵀ (QΣQᵀ)⁻¹)``.
* Frozen ``B = U`` (d_out×r, orthonormal columns), A trained: ``A* = (UᵀU)⁻¹UᵀΔ`` (= ``UᵀΔ``) and
  ``L_B(U) = d_out σ² + Tr(ΔΣΔᵀ) − Tr(UᵀΔΣΔᵀU)``.
* Haar-random U: ``E_U[L_B] = d_out σ² + Tr(ΔΣΔᵀ)(1 − r/d_out)`` exactly (``E[UUᵀ] = (r/d_out) I``).
* Haar-random Q: no closed form for general Σ. Exact for ``Σ = c·I``: ``d_out σ² + Tr(ΔΣΔᵀ)(1 − r/d_in)``.
  The paper's large-``d/r`` approximation ``E[III_A] ≈ r ‖ΔΣ‖_F² / Tr Σ`` is provided but flagged: it is
  badly wrong (it can give a negative loss) for strongly anisotropic Σ; use :func:`monte_carlo_frozen_a`.
* Both factors trained (LoRA optimum): ``d_out σ² + Σ_{i>r} s_i²`` with ``s_i`` the singular values of
  ``Δ Σ^{1/2}`` (Eckart–Young in the Σ-metric).

All functions compute in float64 (inputs are converted).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

_DTYPE = torch.float64


def _f64(name: str, value: torch.Tensor, ndim: int = 2) -> torch.Tensor:
    tensor = torch.as_tensor(value).to(_DTYPE)
    if tensor.ndim != ndim:
        raise ValueError(
            f"lorakit.theory.asymmetry: {name} must be {ndim}-D, got shape {tuple(tensor.shape)}"
        )
    return tensor


def _check_shapes(delta: torch.Tensor, sigma: torch.Tensor) -> None:
    if sigma.shape != (delta.shape[1], delta.shape[1]):
        raise ValueError(
            f"lorakit.theory.asymmetry: Sigma must be (d_in, d_in) = {(delta.shape[1],) * 2} to match Delta "
            f"{tuple(delta.shape)}, got {tuple(sigma.shape)}"
        )


def haar_orthonormal(rows: int, cols: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """A Haar-distributed ``rows × cols`` matrix with orthonormal rows (rows ≤ cols) or columns (rows ≥ cols).

    QR of a Gaussian matrix with the signs of R's diagonal fixed, which makes Q exactly Haar (Mezzadri 2007).
    """
    tall = rows >= cols
    m, k = (rows, cols) if tall else (cols, rows)
    gauss = torch.randn(m, k, generator=generator, dtype=_DTYPE)
    q, r = torch.linalg.qr(gauss)
    q = q * torch.sign(torch.diagonal(r)).where(torch.diagonal(r) != 0, torch.ones((), dtype=_DTYPE))
    return q if tall else q.T


def frozen_a_solution(delta: torch.Tensor, sigma: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """Optimal B for frozen ``A = Q`` (r×d_in): ``B* = Δ Σ Qᵀ (Q Σ Qᵀ)⁻¹`` (d_out×r)."""
    delta, sigma, q = _f64("Delta", delta), _f64("Sigma", sigma), _f64("Q", q)
    _check_shapes(delta, sigma)
    if q.shape[1] != delta.shape[1]:
        raise ValueError(f"lorakit.theory.asymmetry: Q must be (r, {delta.shape[1]}), got {tuple(q.shape)}")
    gram = q @ sigma @ q.T
    # B* Gram = Δ Σ Qᵀ  ->  solve Gram Bᵀ = (Δ Σ Qᵀ)ᵀ (Gram is symmetric)
    return torch.linalg.solve(gram, (delta @ sigma @ q.T).T).T


def frozen_b_solution(delta: torch.Tensor, sigma: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """Optimal A for frozen ``B = U`` (d_out×r): ``A* = (UᵀU)⁻¹ Uᵀ Δ`` (= ``UᵀΔ`` for orthonormal U).

    Σ does not enter when it is positive definite (the loss is a Σ-weighted least squares whose minimiser
    projects Δ onto col(U) in every input direction); it is taken for symmetry and validated.
    """
    delta, sigma, u = _f64("Delta", delta), _f64("Sigma", sigma), _f64("U", u)
    _check_shapes(delta, sigma)
    if u.shape[0] != delta.shape[0]:
        raise ValueError(f"lorakit.theory.asymmetry: U must be ({delta.shape[0]}, r), got {tuple(u.shape)}")
    return torch.linalg.solve(u.T @ u, u.T @ delta)


def population_loss(
    delta: torch.Tensor, sigma: torch.Tensor, b: torch.Tensor, a: torch.Tensor, noise_var: float
) -> float:
    """``L(A, B) = d_out σ² + Tr((Δ − BA) Σ (Δ − BA)ᵀ)``."""
    delta, sigma = _f64("Delta", delta), _f64("Sigma", sigma)
    resid = delta - _f64("B", b) @ _f64("A", a)
    return float(delta.shape[0] * noise_var + torch.trace(resid @ sigma @ resid.T))


def frozen_a_loss(delta: torch.Tensor, sigma: torch.Tensor, q: torch.Tensor, noise_var: float) -> float:
    """``L_A(Q) = d_out σ² + Tr(ΔΣΔᵀ) − Tr(QΣΔᵀΔΣQᵀ (QΣQᵀ)⁻¹)`` (frozen A = Q, optimal B)."""
    delta, sigma, q = _f64("Delta", delta), _f64("Sigma", sigma), _f64("Q", q)
    _check_shapes(delta, sigma)
    m = q @ sigma @ delta.T @ delta @ sigma @ q.T
    gain = torch.trace(torch.linalg.solve(q @ sigma @ q.T, m))
    return float(delta.shape[0] * noise_var + torch.trace(delta @ sigma @ delta.T) - gain)


def frozen_b_loss(delta: torch.Tensor, sigma: torch.Tensor, u: torch.Tensor, noise_var: float) -> float:
    """``L_B(U) = d_out σ² + Tr(ΔΣΔᵀ) − Tr(P_U ΔΣΔᵀ)``, P_U the projector on col(U) (UUᵀ if orthonormal)."""
    delta, sigma, u = _f64("Delta", delta), _f64("Sigma", sigma), _f64("U", u)
    _check_shapes(delta, sigma)
    proj = u @ torch.linalg.solve(u.T @ u, u.T)
    cov = delta @ sigma @ delta.T
    return float(delta.shape[0] * noise_var + torch.trace(cov) - torch.trace(proj @ cov))


def expected_frozen_b_loss(delta: torch.Tensor, sigma: torch.Tensor, rank: int, noise_var: float) -> float:
    """Exact ``E_U[L_B] = d_out σ² + Tr(ΔΣΔᵀ)(1 − r/d_out)`` for Haar-random orthonormal U (d_out×r)."""
    delta, sigma = _f64("Delta", delta), _f64("Sigma", sigma)
    _check_shapes(delta, sigma)
    d_out = delta.shape[0]
    _check_rank(rank, d_out, "d_out")
    return float(d_out * noise_var + torch.trace(delta @ sigma @ delta.T) * (1.0 - rank / d_out))


def expected_frozen_a_loss(delta: torch.Tensor, sigma: torch.Tensor, rank: int, noise_var: float) -> float:
    """``E_Q[L_A]`` for Haar-random Q; exact only when Σ is a multiple of the identity.

    For ``Σ = c I`` the projector onto row(QΣ^{1/2}) = row(Q) has mean ``(r/d_in) I``, hence
    ``d_out σ² + Tr(ΔΣΔᵀ)(1 − r/d_in)``. Raises for anisotropic Σ: use :func:`monte_carlo_frozen_a`
    (or :func:`asymptotic_frozen_a_loss`, knowing its limits).
    """
    delta, sigma = _f64("Delta", delta), _f64("Sigma", sigma)
    _check_shapes(delta, sigma)
    d_in = delta.shape[1]
    _check_rank(rank, d_in, "d_in")
    c = torch.trace(sigma) / d_in
    if not torch.allclose(sigma, c * torch.eye(d_in, dtype=_DTYPE), rtol=1e-12, atol=1e-12 * float(c)):
        raise ValueError(
            "lorakit.theory.asymmetry.expected_frozen_a_loss: exact only for isotropic Sigma (c*I); "
            "use monte_carlo_frozen_a for an anisotropic Sigma"
        )
    return float(delta.shape[0] * noise_var + torch.trace(delta @ sigma @ delta.T) * (1.0 - rank / d_in))


def asymptotic_frozen_a_loss(delta: torch.Tensor, sigma: torch.Tensor, rank: int, noise_var: float) -> float:
    """Paper's large-``d_in/r`` approximation: ``d_out σ² + Tr(ΔΣΔᵀ) − r ‖ΔΣ‖_F² / Tr Σ``.

    Flagged (NOTES.md B.2): it uses ``E[Π] → rΣ/TrΣ``, which ignores the normalisation by ``(QΣQᵀ)⁻¹``;
    for strongly anisotropic Σ it can undershoot the noise floor or even go negative.
    """
    delta, sigma = _f64("Delta", delta), _f64("Sigma", sigma)
    _check_shapes(delta, sigma)
    _check_rank(rank, delta.shape[1], "d_in")
    cov = torch.trace(delta @ sigma @ delta.T)
    gain = rank * torch.linalg.matrix_norm(delta @ sigma) ** 2 / torch.trace(sigma)
    return float(delta.shape[0] * noise_var + cov - gain)


def lora_optimal_loss(delta: torch.Tensor, sigma: torch.Tensor, rank: int, noise_var: float) -> float:
    """Best loss with both factors trained: ``d_out σ² + Σ_{i>r} s_i(ΔΣ^{1/2})²``."""
    delta, sigma = _f64("Delta", delta), _f64("Sigma", sigma)
    _check_shapes(delta, sigma)
    evals, evecs = torch.linalg.eigh(sigma)
    root = evecs @ torch.diag(evals.clamp_min(0).sqrt()) @ evecs.T
    s = torch.linalg.svdvals(delta @ root)
    return float(delta.shape[0] * noise_var + (s[rank:] ** 2).sum())


def _check_rank(rank: int, dim: int, name: str) -> None:
    if not 1 <= rank <= dim:
        raise ValueError(f"lorakit.theory.asymmetry: rank must be in [1, {name}={dim}], got {rank}")


@dataclass
class MonteCarloEstimate:
    """Mean of ``samples`` Haar draws of a loss, with its standard error."""

    mean: float
    stderr: float
    samples: int


def _monte_carlo(fn, samples: int) -> MonteCarloEstimate:
    if samples < 2:
        raise ValueError(f"lorakit.theory.asymmetry: need at least 2 Monte-Carlo samples, got {samples}")
    values = torch.tensor([fn() for _ in range(samples)], dtype=_DTYPE)
    return MonteCarloEstimate(float(values.mean()), float(values.std() / math.sqrt(samples)), samples)


def monte_carlo_frozen_a(
    delta: torch.Tensor,
    sigma: torch.Tensor,
    rank: int,
    noise_var: float,
    samples: int,
    generator: torch.Generator,
) -> MonteCarloEstimate:
    """``E_Q[L_A(Q)]`` over Haar-random Q (r×d_in, orthonormal rows) by Monte Carlo."""
    d_in = _f64("Delta", delta).shape[1]
    _check_rank(rank, d_in, "d_in")
    return _monte_carlo(
        lambda: frozen_a_loss(delta, sigma, haar_orthonormal(rank, d_in, generator), noise_var), samples
    )


def monte_carlo_frozen_b(
    delta: torch.Tensor,
    sigma: torch.Tensor,
    rank: int,
    noise_var: float,
    samples: int,
    generator: torch.Generator,
) -> MonteCarloEstimate:
    """``E_U[L_B(U)]`` over Haar-random U (d_out×r, orthonormal columns) by Monte Carlo."""
    d_out = _f64("Delta", delta).shape[0]
    _check_rank(rank, d_out, "d_out")
    return _monte_carlo(
        lambda: frozen_b_loss(delta, sigma, haar_orthonormal(d_out, rank, generator), noise_var), samples
    )


def sampled_one_sided_loss(
    delta: torch.Tensor,
    sigma: torch.Tensor,
    frozen: str,
    factor: torch.Tensor,
    noise_var: float,
    n_train: int,
    n_test: int,
    generator: torch.Generator,
) -> tuple[float, float]:
    """Fit the trainable factor by least squares on ``n_train`` sampled points, evaluate on ``n_test``.

    Data: ``X ~ N(0, Σ)``, ``R = ΔX + ε`` (the residual target after ``W_0``). Returns the test MSE (summed
    over outputs, averaged over points) and its standard error. ``frozen`` is ``"A"`` (factor = Q) or ``"B"``
    (factor = U). This is the sampling check of the closed forms: with many training points it converges
    to ``frozen_a_loss`` / ``frozen_b_loss``.
    """
    delta, sigma, factor = _f64("Delta", delta), _f64("Sigma", sigma), _f64("factor", factor)
    _check_shapes(delta, sigma)
    chol = torch.linalg.cholesky(sigma)
    d_out, d_in = delta.shape

    def draw(count: int) -> tuple[torch.Tensor, torch.Tensor]:
        x = torch.randn(count, d_in, generator=generator, dtype=_DTYPE) @ chol.T
        y = x @ delta.T + math.sqrt(noise_var) * torch.randn(count, d_out, generator=generator, dtype=_DTYPE)
        return x, y

    x, y = draw(n_train)
    if frozen == "A":
        b = torch.linalg.lstsq(x @ factor.T, y).solution.T  # y ≈ (Qx) Bᵀ
        weight = b @ factor
    elif frozen == "B":
        # y ≈ U A x  ->  project y on col(U): Uᵀy ≈ A x (U orthonormal) is least squares in A
        a = torch.linalg.lstsq(x, y @ factor @ torch.linalg.inv(factor.T @ factor)).solution.T
        weight = factor @ a
    else:
        raise ValueError(f"lorakit.theory.asymmetry: frozen must be 'A' or 'B', got {frozen!r}")
    xt, yt = draw(n_test)
    per_point = (yt - xt @ weight.T).pow(2).sum(1)
    return float(per_point.mean()), float(per_point.std() / math.sqrt(n_test))
