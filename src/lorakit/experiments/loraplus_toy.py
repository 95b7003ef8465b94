"""LoRA+ toy (Hayou et al., ICML 2024, Fig. 2 / App. C.1.1) and a width-scaling study of eta_B / eta_A.

Model (paper eq. 3): ``f(x) = W_out · relu(B A relu(W_in x))`` with ``W_in`` (n×d) ~ N(0, 1),
``W_out`` (1×n) ~ N(0, 1/n), ``A`` (r×n) ~ N(0, 1/n), ``B`` (n×r) ~ N(0, 1); only A and B are trained.
Both factors start non-zero on purpose: with ``BA = 0`` every ReLU of the adapted layer sits at 0, where
torch's ReLU' is 0, so no gradient would flow (NOTES.md C.3). Data: ``x ~ N(0, I_d)``,
``y = sin(mean(x))``, a fixed training set (full batch) and a test set. Loss: mean squared error
``mean_i (f(x_i) - y_i)^2`` (the paper does not state its normalisation).

Many (eta_A, eta_B) pairs are trained at once: the configurations are a leading batch dimension of A
and B, and gradients are written out by hand (cheaper than autograd over thousands of tiny models).
A configuration whose loss becomes non-finite or explodes is marked diverged (loss ``inf``) and frozen.

Experiments run by ``lorakit reproduce loraplus``:

1. **Fig. 2 grid** (plain full-batch GD, n=100): train/test loss heatmaps at t=10 and t=T (T≈200)
   with the eta_A = eta_B line and the cells within 1% of the best loss marked.
2. **Ratio suggestion check**: ``lorakit.analysis.diagnostics.suggest_ratio`` is fed the δ terms, the
   first-order loss terms and the curvature terms (⟨Δθ, H Δθ⟩ per factor, top Hessian-block eigenvalues)
   measured on a run at the best equal-rate cell, and each criterion's λ is compared with the band of
   λ = eta_B/eta_A among the near-best (within 1%) cells of the grid.
3. **Width scaling**: the same toy for n ∈ {64, …, 2048} with Adam (as in Theorem 1) and with GD; the
   best eta_B/eta_A per width and seed, a log-log fit of its growth in n with a bootstrap interval over
   seeds, and δ¹, δ² against width for a shared rate and for eta_A ∝ 1/n (Theorem 1 / NOTES.md C.7).
"""

from __future__ import annotations

import argparse
import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from lorakit.experiments import add_size_arguments
from lorakit.utils import atomic_save_figure, atomic_write_json

logger = logging.getLogger(__name__)

#: a configuration is declared diverged when its train loss exceeds this multiple of the initial loss
DIVERGENCE_FACTOR = 1e3
#: max elements of one (configs × samples × width) activation tensor; configurations are chunked to fit
_CHUNK_ELEMENTS = 6_000_000


@dataclass
class ToyProblem:
    """One draw of the toy: frozen weights, shared initial adapters, fixed train and test sets."""

    W_in: torch.Tensor  # (n, d)
    W_out: torch.Tensor  # (n,)
    A0: torch.Tensor  # (r, n)
    B0: torch.Tensor  # (n, r)
    x_train: torch.Tensor  # (N, d)
    y_train: torch.Tensor  # (N,)
    x_test: torch.Tensor
    y_test: torch.Tensor

    @property
    def width(self) -> int:
        return self.W_in.shape[0]

    @property
    def rank(self) -> int:
        return self.A0.shape[0]


def make_problem(
    width: int = 100, d: int = 5, rank: int = 4, n_train: int = 1000, n_test: int = 100, seed: int = 0
) -> ToyProblem:
    """Draw the weights, initial adapters and data of App. C.1.1 (float32, from one seeded generator)."""
    if min(width, d, rank, n_train, n_test) < 1:
        raise ValueError(
            f"loraplus_toy: sizes must be >= 1, got n={width} d={d} r={rank} N={n_train}/{n_test}"
        )
    g = torch.Generator().manual_seed(seed)
    W_in = torch.randn(width, d, generator=g)
    W_out = torch.randn(width, generator=g) / math.sqrt(width)
    A0 = torch.randn(rank, width, generator=g) / math.sqrt(width)
    B0 = torch.randn(width, rank, generator=g)
    x_train = torch.randn(n_train, d, generator=g)
    x_test = torch.randn(n_test, d, generator=g)
    return ToyProblem(
        W_in, W_out, A0, B0, x_train, torch.sin(x_train.mean(1)), x_test, torch.sin(x_test.mean(1))
    )


@dataclass
class GridResult:
    """Losses (configs × recorded steps) and mean δ RMS per configuration for one problem."""

    record_steps: list[int]
    train_loss: np.ndarray  # (G, len(record_steps)); inf where diverged
    test_loss: np.ndarray
    delta_steps: list[int]
    deltas: np.ndarray  # (3, G, len(delta_steps)): RMS δ¹, δ², δ³ per step (nan once diverged)
    loss_terms: np.ndarray | None = None  # (2, G, len(delta_steps)): ⟨∇_A L, ΔA⟩, ⟨∇_B L, ΔB⟩ per step
    curvature: np.ndarray | None = None  # (2, G, len(delta_steps)): ⟨ΔA, H_AA ΔA⟩, ⟨ΔB, H_BB ΔB⟩ per step
    sharpness: np.ndarray | None = None  # (2, G, len(delta_steps)): λ_max(H_AA), λ_max(H_BB) per step

    def mean_deltas(self) -> np.ndarray:
        """(3, G) mean over the measured steps (nan for diverged configurations)."""
        if not self.delta_steps:
            return np.full(self.deltas.shape[:2], np.nan)
        return self.deltas.mean(axis=2)


def _forward(h: torch.Tensor, A: torch.Tensor, B: torch.Tensor, W_out: torch.Tensor):
    z = torch.einsum("Nn,grn->gNr", h, A)
    u = torch.einsum("gNr,gnr->gNn", z, B)
    f = torch.relu(u) @ W_out
    return z, u, f


#: power iterations per measured step for λ_max(H_AA), λ_max(H_BB), warm-started from the previous step
_POWER_ITERATIONS = 20


def _curvature_terms(
    h: torch.Tensor,
    z: torch.Tensor,
    B: torch.Tensor,
    w: torch.Tensor,
    dA: torch.Tensor,
    dB: torch.Tensor,
    vectors: list[torch.Tensor],
) -> tuple[torch.Tensor, torch.Tensor]:
    """``⟨ΔA, H_AA ΔA⟩, ⟨ΔB, H_BB ΔB⟩`` (each (g,)) and λ_max(H_AA), λ_max(H_BB) for the MSE toy.

    With the other factor fixed, the pre-activation u = B A h is linear in each factor and f = W_out·relu(u)
    is piecewise linear, so (almost everywhere, as autograd sees it) each Hessian block is a Gauss-Newton
    matrix: ``H_AA = (2/N) Σ_i J_iᵀ J_i`` with ``J_i V = c_iᵀ V h_i``, ``c_i = Bᵀ w_i``; ``H_BB`` likewise
    with ``J_i V = w_iᵀ V z_i``; ``w_i = W_out ⊙ 1[u_i > 0]`` (``w``: (g, N, n)), ``z_i = A h_i``. λ_max by
    power iteration on ``vectors`` ([V_A, V_B], updated in place to the current top-eigenvector estimates).
    """
    N = h.shape[0]
    c = torch.einsum("gNn,gnr->gNr", w, B)

    def jac_a(V: torch.Tensor) -> torch.Tensor:
        return torch.einsum("gNr,gNr->gN", c, torch.einsum("Nn,grn->gNr", h, V))

    def jac_b(V: torch.Tensor) -> torch.Tensor:
        return torch.einsum("gNn,gNn->gN", w, torch.einsum("gNr,gnr->gNn", z, V))

    def hvp_a(V: torch.Tensor) -> torch.Tensor:
        return (2.0 / N) * torch.einsum("gN,gNr,Nn->grn", jac_a(V), c, h)

    def hvp_b(V: torch.Tensor) -> torch.Tensor:
        return (2.0 / N) * torch.einsum("gN,gNn,gNr->gnr", jac_b(V), w, z)

    curv = torch.stack([(2.0 / N) * jac_a(dA).pow(2).sum(1), (2.0 / N) * jac_b(dB).pow(2).sum(1)])
    top = []
    for k, hvp in enumerate((hvp_a, hvp_b)):
        v = vectors[k]
        for _ in range(_POWER_ITERATIONS):
            hv = hvp(v)
            v = hv / hv.flatten(1).norm(dim=1).clamp_min(1e-30).view(-1, 1, 1)
        vectors[k] = v
        top.append((v * hvp(v)).sum((1, 2)))
    return curv, torch.stack(top)


def train_configs(
    problem: ToyProblem,
    eta_A: np.ndarray | torch.Tensor,
    eta_B: np.ndarray | torch.Tensor,
    steps: int,
    optimizer: str = "gd",
    record_steps: list[int] | None = None,
    delta_steps: list[int] | None = None,
    delta_rows: int = 256,
    progress: tqdm | None = None,
    curvature: bool = False,
) -> GridResult:
    """Train one (A, B) pair per learning-rate pair ``(eta_A[i], eta_B[i])`` from the shared init.

    ``optimizer``: ``"gd"`` (plain full-batch gradient descent, as in the paper's toy) or ``"adam"``
    (torch defaults: betas (0.9, 0.999), eps 1e-8). Losses are recorded after the steps in
    ``record_steps`` (1-based; default: the last). δ terms (LoRA+ §4) of step t are measured on the first
    ``delta_rows`` training inputs for every t in ``delta_steps`` (default: every step after the first)
    and averaged: δ¹ = B_{t-1}(A_t - A_{t-1})h, δ² = (B_t - B_{t-1})A_{t-1}h, δ³ = ΔB ΔA h, RMS over
    rows and units, where h = relu(W_in x) is the adapted layer's input. On the same steps the first-order
    loss terms ⟨dZ̄, δ¹⟩ = ⟨∇_A L, ΔA⟩ and ⟨dZ̄, δ²⟩ = ⟨∇_B L, ΔB⟩ (LoRA+ App. B) are taken with the full
    training batch (``loss_terms``). With ``curvature``, also (full batch, same steps) the curvatures
    ⟨ΔA, H_AA ΔA⟩, ⟨ΔB, H_BB ΔB⟩ along each factor's step and the top eigenvalues λ_max(H_AA), λ_max(H_BB)
    of the loss Hessian blocks at the pre-step state (:func:`_curvature_terms`; ``curvature``,
    ``sharpness``), the inputs of the ``"curvature"`` and ``"sharpness"`` criteria of
    ``lorakit.analysis.diagnostics.suggest_ratio``.
    """
    if optimizer not in ("gd", "adam"):
        raise ValueError(f"loraplus_toy: optimizer must be 'gd' or 'adam', got {optimizer!r}")
    eta_A = torch.as_tensor(np.asarray(eta_A, dtype=np.float64), dtype=torch.float32).reshape(-1)
    eta_B = torch.as_tensor(np.asarray(eta_B, dtype=np.float64), dtype=torch.float32).reshape(-1)
    if eta_A.shape != eta_B.shape:
        raise ValueError(
            f"loraplus_toy: eta_A and eta_B must have the same length ({len(eta_A)} vs {len(eta_B)})"
        )
    record = sorted(set(record_steps or [steps]))
    if record[0] < 1 or record[-1] > steps:
        raise ValueError(f"loraplus_toy: record_steps must lie in [1, {steps}], got {record}")
    measured = sorted(set(range(2, steps + 1) if delta_steps is None else delta_steps))
    if measured and (measured[0] < 1 or measured[-1] > steps):
        raise ValueError(f"loraplus_toy: delta_steps must lie in [1, {steps}], got {measured}")
    G = len(eta_A)
    chunk = max(1, _CHUNK_ELEMENTS // (problem.x_train.shape[0] * problem.width))
    out = {k: np.full((G, len(record)), np.inf) for k in ("train", "test")}
    deltas = np.full((3, G, len(measured)), np.nan)
    loss_terms = np.full((2, G, len(measured)), np.nan)
    curv = np.full((2, G, len(measured)), np.nan) if curvature else None
    sharp = np.full((2, G, len(measured)), np.nan) if curvature else None
    h_train = torch.relu(problem.x_train @ problem.W_in.T)
    h_test = torch.relu(problem.x_test @ problem.W_in.T)
    h_delta = h_train[:delta_rows]
    W_out = problem.W_out
    N = h_train.shape[0]
    for lo in range(0, G, chunk):
        hi = min(G, lo + chunk)
        g = hi - lo
        lr_A = eta_A[lo:hi].view(g, 1, 1)
        lr_B = eta_B[lo:hi].view(g, 1, 1)
        A = problem.A0.expand(g, -1, -1).clone()
        B = problem.B0.expand(g, -1, -1).clone()
        if optimizer == "adam":
            mA, vA, mB, vB = (torch.zeros_like(t) for t in (A, A, B, B))
        alive = torch.ones(g, dtype=torch.bool)
        vectors = [torch.ones_like(A), torch.ones_like(B)]  # power-iteration starts
        initial = None
        for t in range(1, steps + 1):
            z, u, f = _forward(h_train, A, B, W_out)
            resid = f - problem.y_train
            loss = resid.pow(2).mean(1)
            if initial is None:
                initial = loss.clone()
            # dL/du for L = mean (f - y)^2, through relu and W_out
            du = (2.0 / N) * resid.unsqueeze(-1) * W_out * (u > 0)
            gB = torch.einsum("gNn,gNr->gnr", du, z)
            gA = torch.einsum("gNr,Nm->grm", torch.einsum("gNn,gnr->gNr", du, B), h_train)
            if optimizer == "adam":
                for m, v, grad in ((mA, vA, gA), (mB, vB, gB)):
                    m.mul_(0.9).add_(grad, alpha=0.1)
                    v.mul_(0.999).addcmul_(grad, grad, value=0.001)
                stepA = (mA / (1 - 0.9**t)) / ((vA / (1 - 0.999**t)).sqrt() + 1e-8)
                stepB = (mB / (1 - 0.9**t)) / ((vB / (1 - 0.999**t)).sqrt() + 1e-8)
            else:
                stepA, stepB = gA, gB
            keep = alive.view(g, 1, 1)
            dA = torch.where(keep, -lr_A * stepA, 0.0)
            dB = torch.where(keep, -lr_B * stepB, 0.0)
            if t in measured:
                zA = torch.einsum("Nn,grn->gNr", h_delta, A)
                zdA = torch.einsum("Nn,grn->gNr", h_delta, dA)
                d1 = torch.einsum("gNr,gnr->gNn", zdA, B)
                d2 = torch.einsum("gNr,gnr->gNn", zA, dB)
                d3 = torch.einsum("gNr,gnr->gNn", zdA, dB)
                col = measured.index(t)
                for i, d in enumerate((d1, d2, d3)):
                    deltas[i, lo:hi, col] = d.pow(2).mean((1, 2)).sqrt().double().numpy()
                for i, (grad, change) in enumerate(((gA, dA), (gB, dB))):
                    loss_terms[i, lo:hi, col] = (grad.double() * change.double()).sum((1, 2)).numpy()
                if curvature:
                    w = W_out * (u > 0)
                    quad, top = _curvature_terms(h_train, z, B, w, dA, dB, vectors)
                    curv[:, lo:hi, col] = quad.double().numpy()
                    sharp[:, lo:hi, col] = top.double().numpy()
            A = A + dA
            B = B + dB
            # loss after step t (the loss the parameters of step t give)
            bad = ~torch.isfinite(A).flatten(1).all(1) | ~torch.isfinite(B).flatten(1).all(1)
            if t in record or bad.any():
                _, _, f_tr = _forward(h_train, A, B, W_out)
                train_loss = (f_tr - problem.y_train).pow(2).mean(1)
                bad |= ~torch.isfinite(train_loss) | (train_loss > DIVERGENCE_FACTOR * initial)
            if bad.any():
                alive &= ~bad
                for state in (A, B, *((mA, vA, mB, vB) if optimizer == "adam" else ())):
                    state[bad] = 0.0
            if t in record:
                _, _, f_te = _forward(h_test, A, B, W_out)
                test_loss = (f_te - problem.y_test).pow(2).mean(1)
                col = record.index(t)
                ok = alive.numpy()
                out["train"][lo:hi, col] = np.where(ok, train_loss.double().numpy(), np.inf)
                out["test"][lo:hi, col] = np.where(ok, test_loss.double().numpy(), np.inf)
        dead = np.flatnonzero(~alive.numpy()) + lo
        deltas[:, dead, :] = np.nan
        loss_terms[:, dead, :] = np.nan
        for extra in (curv, sharp):
            if extra is not None:
                extra[:, dead, :] = np.nan
        if progress is not None:
            progress.update(g)
    return GridResult(record, out["train"], out["test"], measured, deltas, loss_terms, curv, sharp)


# -- experiment configuration ------------------------------------------------------------------------


@dataclass
class ToyConfig:
    """Sizes of the reproduction; :func:`quick_config` and :func:`full_config` give the CLI presets."""

    # Fig. 2 grid (plain GD, n = fig2_width)
    fig2_width: int = 100
    fig2_etas: tuple[float, ...] = tuple(np.logspace(-4, 1, 11))
    fig2_steps: int = 200
    fig2_early: int = 10
    fig2_seeds: int = 3
    n_train: int = 1000
    n_test: int = 100
    tolerance: float = 0.01
    # ratio check: λ scan at the best eta_A (points per decade, ± decades), iterations of suggest_ratio
    ratio_scan_per_decade: int = 8
    ratio_scan_decades: float = 1.5
    ratio_iterations: int = 3
    # width study
    widths: tuple[int, ...] = (64, 128, 256, 512, 1024, 2048)
    width_seeds: int = 3
    width_n_train: int = 64
    width_steps: int = 30
    # eta_A grid = eta_A_scale[opt] * 10**k / n, k in width_log_etas; eta_B = lam * eta_A
    width_log_etas: tuple[float, ...] = (-1.0, -0.5, 0.0, 0.5, 1.0)
    width_ratios: tuple[float, ...] = tuple(4.0 ** np.arange(-3, 7))
    bootstrap: int = 1000
    # δ against width (Adam): shared eta = delta_eta, or eta_A = delta_eta * widths[0] / n, eta_B = delta_eta
    delta_eta: float = 5e-3
    delta_steps: int = 10
    optimizers: tuple[str, ...] = ("adam", "gd")


#: criterion of the headline ratio suggestion (the documented default of ``suggest_ratio``)
RATIO_CRITERION = "loss"
#: centre of the eta_A grid times n, per optimizer (best eta_A * n is about 1 for Adam, 3 for GD here)
ETA_A_SCALE = {"adam": 1.0, "gd": 3.0}


def quick_config() -> ToyConfig:
    """``--quick``: the paper's toy sizes and 3 seeds on a half-decade Fig. 2 grid over [1e-4, 1] (every
    eta_A >= 0.1 diverges, so the paper's upper decade only adds diverged cells); a small width study.
    About 2 CPU minutes on one thread."""
    return ToyConfig(fig2_etas=tuple(np.logspace(-4, 0, 9)))


def full_config() -> ToyConfig:
    """``--full``: the paper's 1/9-decade grid over [1e-4, 10] (it contains the caption's 2.78, 1.29e-4 and
    2.15e-2), 3 seeds; a finer and longer width study with 5 seeds."""
    return ToyConfig(
        fig2_etas=tuple(np.logspace(-4, 1, 46)),
        width_seeds=5,
        width_n_train=256,
        width_steps=100,
        width_log_etas=tuple(np.arange(-1.5, 1.51, 0.25)),
        width_ratios=tuple(2.0 ** np.arange(-6, 14)),
    )


def _best_cell(loss: np.ndarray) -> tuple[int, float]:
    index = int(np.argmin(loss))
    return index, float(loss[index])


def _near_best(loss: np.ndarray, tolerance: float) -> np.ndarray:
    best = float(np.min(loss))
    return np.isfinite(loss) & (loss <= best * (1.0 + tolerance))


def run_fig2(config: ToyConfig, progress: bool = True) -> dict[str, Any]:
    """Fig. 2: GD over the (eta_A, eta_B) grid; losses averaged over seeds at t=early and t=steps."""
    etas = np.asarray(config.fig2_etas, dtype=np.float64)
    EA, EB = np.meshgrid(etas, etas, indexing="ij")  # EA[i, j] = etas[i], EB[i, j] = etas[j]
    record = [config.fig2_early, config.fig2_steps]
    train, test = [], []
    total = EA.size * config.fig2_seeds
    with tqdm(total=total, desc="fig2 grid", disable=not progress, unit="cfg") as bar:
        for seed in range(config.fig2_seeds):
            problem = make_problem(config.fig2_width, n_train=config.n_train, n_test=config.n_test, seed=seed)
            result = train_configs(
                problem, EA.ravel(), EB.ravel(), config.fig2_steps, "gd", record, delta_steps=[], progress=bar
            )
            train.append(result.train_loss)
            test.append(result.test_loss)
    # a configuration that diverged for any seed counts as diverged (mean = inf)
    mean_train, mean_test = np.mean(train, axis=0), np.mean(test, axis=0)
    out: dict[str, Any] = {
        "width": config.fig2_width,
        "steps": record,
        "seeds": config.fig2_seeds,
        "eta_grid": etas.tolist(),
        "optimizer": "gd (full batch)",
        "loss": "mean squared error",
        "tolerance": config.tolerance,
        "panels": {},
    }
    for metric, values in (("train", mean_train), ("test", mean_test)):
        for col, t in enumerate(record):
            loss = values[:, col]
            index, best = _best_cell(loss)
            i, j = np.unravel_index(index, EA.shape)
            near = _near_best(loss, config.tolerance)
            diag = np.where(EA.ravel() == EB.ravel(), loss, np.inf)
            k, best_equal = _best_cell(diag)
            ratios = (EB.ravel() / EA.ravel())[near]
            out["panels"][f"{metric}@{t}"] = {
                "loss_grid": loss.reshape(EA.shape).tolist(),
                "best": {
                    "eta_A": float(etas[i]),
                    "eta_B": float(etas[j]),
                    "index": [int(i), int(j)],
                    "loss": best,
                    "ratio": float(etas[j] / etas[i]),
                },
                "best_equal": {"eta": float(EA.ravel()[k]), "loss": best_equal},
                "near_best": np.argwhere(near.reshape(EA.shape)).tolist(),
                "near_best_ratio_band": [float(ratios.min()), float(ratios.max())],
                "near_best_cells_with_eta_B_gt_eta_A": int(np.sum(EB.ravel()[near] > EA.ravel()[near])),
                "near_best_cells_with_eta_B_lt_eta_A": int(np.sum(EB.ravel()[near] < EA.ravel()[near])),
            }
    return out


def _records(result: GridResult, index: int, lr_a: float, lr_b: float, name: str) -> list[dict[str, Any]]:
    """Diagnostics-format records (``lorakit.analysis.diagnostics``) of configuration ``index``."""
    records = []
    for col, t in enumerate(result.delta_steps):
        d1, d2, d3 = (float(result.deltas[i, index, col]) for i in range(3))
        l1, l2 = (float(result.loss_terms[i, index, col]) for i in range(2))
        if all(math.isfinite(v) for v in (d1, d2, l1, l2)):
            layer = {"delta1": d1, "delta2": d2, "delta3": d3, "loss1": l1, "loss2": l2}
            for key, values in (("curv", result.curvature), ("sharp", result.sharpness)):
                if values is not None:
                    layer[f"{key}1"], layer[f"{key}2"] = (float(values[i, index, col]) for i in range(2))
            records.append({"step": t, "layers": {name: {**layer, "lr_A": lr_a, "lr_B": lr_b}}})
    return records


def _measure(
    config: ToyConfig, eta_a: float, eta_b: float, curvature: bool = False
) -> list[dict[str, Any]] | None:
    """GD runs at (eta_a, eta_b) as records: one layer name per seed; None if a seed diverged. With
    ``curvature`` the records carry ``curv1``/``curv2`` and ``sharp1``/``sharp2`` too."""
    records: list[dict[str, Any]] = []
    for seed in range(config.fig2_seeds):
        problem = make_problem(config.fig2_width, n_train=config.n_train, n_test=config.n_test, seed=seed)
        steps = list(range(1, config.fig2_steps + 1))
        result = train_configs(
            problem,
            [eta_a],
            [eta_b],
            config.fig2_steps,
            "gd",
            [config.fig2_steps],
            steps,
            curvature=curvature,
        )
        if not np.isfinite(result.train_loss[0, 0]):
            return None
        records.extend(_records(result, 0, eta_a, eta_b, f"seed{seed}"))
    return records


def _suggestions(records: list[dict[str, Any]], max_step: int | None) -> dict[str, Any]:
    """Pooled (median over seeds and steps) and per-seed λ for every criterion, steps 1..max_step.

    ``ratio`` uses every step; ``ratio_default_skip`` drops the first 10% of them, as ``suggest_ratio``
    and ``lorakit diagnose`` do by default (the early transient moves the median).
    """
    from lorakit.analysis.diagnostics import CRITERIA, suggest_ratio

    out = {}
    for criterion in CRITERIA:
        got = suggest_ratio(records, skip_fraction=0.0, criterion=criterion, max_step=max_step)
        skipped = suggest_ratio(records, criterion=criterion, max_step=max_step)
        out[criterion] = {
            "ratio": got.ratio,
            "ratio_default_skip": skipped.ratio,
            "per_seed": got.per_layer,
            "samples": got.samples,
        }
    return out


def _ratio_band(config: ToyConfig, fig2: dict[str, Any], t: int) -> dict[str, Any]:
    """λ band within ``tolerance`` of the best seed-mean train loss at step t.

    Grid cells within tolerance (any eta_A) count with ± half a grid step; a finer scan of λ at the best
    cell's eta_A (``ratio_scan_per_decade`` points per decade over ± ``ratio_scan_decades``, all seeds)
    counts with ± half a scan step. The best loss is the lower of the grid's and the scan's. ``band`` is the
    hull of these intervals; ``points`` lists the λ values inside (the hull need not be contiguous).
    """
    panel = fig2["panels"][f"train@{t}"]
    etas = np.asarray(fig2["eta_grid"])
    grid = np.asarray(panel["loss_grid"])
    eta_a, lam_best = panel["best"]["eta_A"], panel["best"]["ratio"]
    k = np.arange(
        -config.ratio_scan_decades * config.ratio_scan_per_decade,
        0.5 + config.ratio_scan_decades * config.ratio_scan_per_decade,
    )
    lams = lam_best * 10.0 ** (k / config.ratio_scan_per_decade)
    scan = []
    for seed in range(config.fig2_seeds):
        problem = make_problem(config.fig2_width, n_train=config.n_train, n_test=config.n_test, seed=seed)
        result = train_configs(problem, np.full(len(lams), eta_a), eta_a * lams, t, "gd", [t], delta_steps=[])
        scan.append(result.train_loss[:, 0])
    scan_loss = np.mean(scan, axis=0)
    best = min(float(np.min(scan_loss)), panel["best"]["loss"])
    limit = best * (1.0 + config.tolerance)
    grid_half = math.sqrt(etas[1] / etas[0]) if len(etas) > 1 else 1.0
    scan_half = 10.0 ** (0.5 / config.ratio_scan_per_decade)
    EA, EB = np.meshgrid(etas, etas, indexing="ij")
    near_grid = (EB / EA)[np.isfinite(grid) & (grid <= limit)]
    near_scan = lams[np.isfinite(scan_loss) & (scan_loss <= limit)]
    intervals = [(v / grid_half, v * grid_half) for v in near_grid] + [
        (v / scan_half, v * scan_half) for v in near_scan
    ]
    return {
        "step": t,
        "eta_A": eta_a,
        "best_loss": best,
        "scan_ratios": lams.tolist(),
        "scan_loss": scan_loss.tolist(),
        "points_grid": sorted(float(v) for v in near_grid),
        "points_scan": sorted(float(v) for v in near_scan),
        "band": [min(lo for lo, _ in intervals), max(hi for _, hi in intervals)],
    }


def run_ratio_check(config: ToyConfig, fig2: dict[str, Any], progress: bool = True) -> dict[str, Any]:
    """Check ``suggest_ratio`` on the Fig. 2 toy against the near-best λ band, at t = early and t = T.

    δ¹, δ², the first-order loss terms and the curvature terms (⟨Δθ, H Δθ⟩ along each factor's step and the
    top Hessian-block eigenvalues) are measured on GD runs at the best equal-rate cell of the final
    train-loss panel (the point a user who tuned plain LoRA starts from), for every seed. Suggestions use
    steps 1..t for the panel at t, per criterion of ``suggest_ratio`` (``feature``, ``loss``, ``curvature``,
    ``sharpness``), pooled over seeds and per seed; ``criteria_at_T`` summarises them at t = T. The
    headline criterion ``RATIO_CRITERION`` (``suggest_ratio``'s default) is also iterated
    ``ratio_iterations`` times: run at (eta, λ_k·eta), suggest λ_{k+1}. The headline ``suggested_ratio`` /
    ``band`` / ``inside_band`` are its one-shot suggestion and the band at t = T.
    """
    from lorakit.analysis.diagnostics import suggest_ratio

    eta = fig2["panels"][f"train@{config.fig2_steps}"]["best_equal"]["eta"]
    steps = [config.fig2_early, config.fig2_steps]
    with tqdm(
        total=len(steps) + 1 + config.ratio_iterations, desc="ratio check", disable=not progress
    ) as bar:
        records = _measure(config, eta, eta, curvature=True)
        bar.update(1)
        by_step = {}
        for t in steps:
            band = _ratio_band(config, fig2, t)
            found = _suggestions(records, t) if records is not None else {}
            for value in found.values():
                value["inside_band"] = bool(band["band"][0] <= value["ratio"] <= band["band"][1])
            by_step[str(t)] = {"band": band, "suggestions": found}
            bar.update(1)
        iterates: list[float | None] = [1.0]
        current = records
        for _ in range(config.ratio_iterations):
            if current is None:
                iterates.append(None)  # the run at the previous λ diverged
                break
            iterates.append(suggest_ratio(current, skip_fraction=0.0, criterion=RATIO_CRITERION).ratio)
            current = _measure(config, eta, eta * iterates[-1])
            bar.update(1)
    final = by_step[str(config.fig2_steps)]
    headline = final["suggestions"].get(RATIO_CRITERION, {}).get("ratio")
    band = final["band"]["band"]
    return {
        "run_at_equal_eta": eta,
        "criterion": RATIO_CRITERION,
        "suggested_ratio": headline,
        "band": band,
        "inside_band": headline is not None and bool(band[0] <= headline <= band[1]),
        "criteria_at_T": {
            name: {"ratio": found["ratio"], "inside_band": found["inside_band"]}
            for name, found in final["suggestions"].items()
        },
        "iterated": iterates,
        "iterated_inside_band": [None if v is None else bool(band[0] <= v <= band[1]) for v in iterates[1:]],
        "by_step": by_step,
        "measuring_run_diverged": records is None,
        "assumption": "feature/loss: first-order balance of two terms linear in eta_A and eta_B (GD: exact "
        "for one step at a fixed state), blind to curvature; curvature: ratio of the per-factor rates "
        "minimising the local quadratic model along each factor's step (block-diagonal Hessian, one step "
        "ahead); sharpness: ratio of the per-factor GD stability edges 2/lambda_max(H_AA), "
        "2/lambda_max(H_BB)",
    }


def _width_grid(config: ToyConfig, optimizer: str, width: int) -> tuple[np.ndarray, np.ndarray]:
    eta_a = ETA_A_SCALE[optimizer] * 10.0 ** np.asarray(config.width_log_etas) / width
    EA, LAM = np.meshgrid(eta_a, np.asarray(config.width_ratios), indexing="ij")
    return EA, LAM


def _fit_slope(widths: np.ndarray, ratios: np.ndarray) -> float:
    return float(np.polyfit(np.log(widths), np.log(ratios), 1)[0])


def run_width(config: ToyConfig, progress: bool = True) -> dict[str, Any]:
    """Best eta_B/eta_A per width (train loss at t=width_steps, fixed training set), per optimizer."""
    widths = np.asarray(config.widths)
    out: dict[str, Any] = {
        "widths": widths.tolist(),
        "steps": config.width_steps,
        "n_train": config.width_n_train,
        "seeds": config.width_seeds,
        "ratios": list(config.width_ratios),
        "optimizers": {},
    }
    rng = np.random.default_rng(0)
    for optimizer in config.optimizers:
        losses = np.empty(
            (len(widths), config.width_seeds, len(config.width_log_etas), len(config.width_ratios))
        )
        total = len(widths) * config.width_seeds * losses.shape[2] * losses.shape[3]
        with tqdm(total=total, desc=f"width study ({optimizer})", disable=not progress, unit="cfg") as bar:
            for w, width in enumerate(widths):
                EA, LAM = _width_grid(config, optimizer, int(width))
                for seed in range(config.width_seeds):
                    problem = make_problem(int(width), n_train=config.width_n_train, n_test=16, seed=seed)
                    result = train_configs(
                        problem,
                        EA.ravel(),
                        (EA * LAM).ravel(),
                        config.width_steps,
                        optimizer,
                        [config.width_steps],
                        delta_steps=[],
                        progress=bar,
                    )
                    losses[w, seed] = result.train_loss[:, 0].reshape(EA.shape)
        lam = np.asarray(config.width_ratios)

        def best_ratios(
            seed_index: np.ndarray, losses: np.ndarray = losses, lam: np.ndarray = lam
        ) -> np.ndarray:
            mean = losses[:, seed_index].mean(axis=1).reshape(len(widths), -1)
            return lam[np.argmin(mean, axis=1) % len(lam)]

        all_seeds = np.arange(config.width_seeds)
        best = best_ratios(all_seeds)
        per_seed = np.stack([best_ratios(np.array([s])) for s in all_seeds], axis=1)
        slope = _fit_slope(widths, best)
        boot = np.array(
            [
                _fit_slope(widths, best_ratios(rng.integers(0, config.width_seeds, config.width_seeds)))
                for _ in range(config.bootstrap)
            ]
        )
        mean_loss = losses.mean(axis=1)
        best_eta_a = []
        edge = []
        for w, width in enumerate(widths):
            EA, _ = _width_grid(config, optimizer, int(width))
            i, j = np.unravel_index(np.argmin(mean_loss[w]), mean_loss[w].shape)
            best_eta_a.append(float(EA[i, 0]))
            edge.append(bool(i in (0, EA.shape[0] - 1) or j in (0, len(lam) - 1)))
        equal = mean_loss[:, :, list(lam).index(1.0)].min(axis=1) if 1.0 in lam else None
        out["optimizers"][optimizer] = {
            "best_ratio": best.tolist(),
            "best_ratio_per_seed": per_seed.tolist(),
            "best_eta_A": best_eta_a,
            "best_eta_A_times_n": (np.asarray(best_eta_a) * widths).tolist(),
            "best_on_grid_edge": edge,
            "best_loss": mean_loss.reshape(len(widths), -1).min(axis=1).tolist(),
            "best_equal_rate_loss": equal.tolist() if equal is not None else None,
            "loss_grid": mean_loss.tolist(),
            "exponent": slope,
            "exponent_bootstrap_95": [float(np.percentile(boot, 2.5)), float(np.percentile(boot, 97.5))],
            "bootstrap_resamples": config.bootstrap,
        }
    return out


def run_delta_width(config: ToyConfig, progress: bool = True) -> dict[str, Any]:
    """δ¹, δ² (mean over steps 2..T, averaged over seeds) against width under Adam, for a shared rate and
    for eta_A = eta * n_0 / n (n_0 the smallest width), eta_B = eta; plus suggest_ratio at the shared rate."""
    from lorakit.analysis.diagnostics import suggest_ratio

    widths = list(config.widths)
    eta = config.delta_eta
    settings = {"shared": lambda n: (eta, eta), "eta_A_inv_n": lambda n: (eta * widths[0] / n, eta)}
    out: dict[str, Any] = {
        "widths": widths,
        "eta": eta,
        "steps": config.delta_steps,
        "optimizer": "adam",
        "settings": {},
    }
    for name, rates in settings.items():
        rows = {"delta1": [], "delta2": [], "delta3": [], "suggested_ratio": []}
        for width in tqdm(widths, desc=f"deltas vs width ({name})", disable=not progress):
            lr_a, lr_b = rates(width)
            per_seed = []
            records = []
            for seed in range(config.width_seeds):
                problem = make_problem(width, n_train=config.width_n_train, n_test=16, seed=seed)
                result = train_configs(problem, [lr_a], [lr_b], config.delta_steps, "adam")
                per_seed.append(result.mean_deltas()[:, 0])
                for col, t in enumerate(result.delta_steps):
                    records.append(
                        {
                            "step": t,
                            "layers": {
                                f"seed{seed}": {
                                    "delta1": float(result.deltas[0, 0, col]),
                                    "delta2": float(result.deltas[1, 0, col]),
                                    "lr_A": lr_a,
                                    "lr_B": lr_b,
                                }
                            },
                        }
                    )
            mean = np.nanmean(per_seed, axis=0)
            for i, key in enumerate(("delta1", "delta2", "delta3")):
                rows[key].append(float(mean[i]))
            rows["suggested_ratio"].append(suggest_ratio(records, criterion="feature").ratio)
        out["settings"][name] = rows
    return out


# -- figures ------------------------------------------------------------------------------------------


def plot_fig2(fig2: dict[str, Any], path: Path, ratio: dict[str, Any] | None = None) -> None:
    """2×2 heatmaps of log10 loss (train/test × early/final), eta_A on x, eta_B on y; with ``ratio`` (the
    output of :func:`run_ratio_check`) the suggested λ is drawn as eta_B = λ·eta_A on the train panels and the
    suggestion, band and hit/miss are stated in the title."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    etas = np.asarray(fig2["eta_grid"])
    log_eta = np.log10(etas)
    fig, axes = plt.subplots(2, 2, figsize=(11, 9), constrained_layout=True)
    for ax, (key, panel) in zip(
        axes.ravel(), sorted(fig2["panels"].items(), key=lambda kv: kv[0]), strict=True
    ):
        loss = np.asarray(panel["loss_grid"])  # [i = eta_A, j = eta_B]
        shown = np.log10(np.where(np.isfinite(loss), loss, np.nan)).T  # rows = eta_B
        mesh = ax.pcolormesh(log_eta, log_eta, shown, shading="nearest", cmap="viridis")
        fig.colorbar(mesh, ax=ax, label="log10 loss (white: diverged)")
        ax.plot(log_eta, log_eta, "--", color="orange", label="eta_A = eta_B")
        near = np.asarray(panel["near_best"]).reshape(-1, 2)
        ax.scatter(log_eta[near[:, 0]], log_eta[near[:, 1]], s=14, color="red", label="within 1% of best")
        i, j = panel["best"]["index"]
        ax.scatter([log_eta[i]], [log_eta[j]], marker="*", s=120, color="white", edgecolor="k", label="best")
        ax.set_xlabel("log10 eta_A  (A: r x n, input factor)")
        ax.set_ylabel("log10 eta_B  (B: n x r, output factor)")
        best = panel["best"]
        ax.set_title(f"{key}: best (eta_A, eta_B) = ({best['eta_A']:.3g}, {best['eta_B']:.3g})")
        if ratio is not None and key.startswith("train@"):
            entry = ratio["by_step"].get(key.split("@")[1], {})
            found = entry.get("suggestions", {}).get(ratio["criterion"])
            if found is not None:
                ax.plot(log_eta, log_eta + math.log10(found["ratio"]), ":", color="red", label="suggested λ")
                ax.set_ylim(log_eta[0] - 0.25, log_eta[-1] + 0.25)
        ax.legend(loc="lower left", fontsize=7)
    title = f"LoRA+ toy (Fig. 2), n={fig2['width']}, GD, mean of {fig2['seeds']} seeds"
    if ratio is not None and ratio["suggested_ratio"] is not None:
        lo, hi = ratio["band"]
        verdict = "inside" if ratio["inside_band"] else "MISSES"
        title += (
            f"\nsuggested λ = {ratio['suggested_ratio']:.3g} ({ratio['criterion']} criterion) {verdict} the "
            f"1%-of-best band [{lo:.3g}, {hi:.3g}] at t={fig2['steps'][-1]}"
        )
        others = [
            f"{name} {found['ratio']:.3g} ({'in' if found['inside_band'] else 'out'})"
            for name, found in ratio.get("criteria_at_T", {}).items()
            if name != ratio["criterion"]
        ]
        if others:
            title += "; other criteria: " + ", ".join(others)
    fig.suptitle(title)
    atomic_save_figure(fig, path)


def plot_width(width: dict[str, Any], deltas: dict[str, Any], path: Path) -> None:
    """Left: best eta_B/eta_A vs n (log-log) with fits; right: δ¹, δ² vs n for the two rate settings."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    widths = np.asarray(width["widths"], dtype=float)
    fig, (left, right) = plt.subplots(1, 2, figsize=(13, 5), constrained_layout=True)
    for k, (name, res) in enumerate(width["optimizers"].items()):
        color = f"C{k}"
        per_seed = np.asarray(res["best_ratio_per_seed"])
        for s in range(per_seed.shape[1]):
            jitter = widths * (1 + 0.04 * (s - per_seed.shape[1] / 2))
            left.scatter(jitter, per_seed[:, s], s=10, color=color, alpha=0.35)
        left.plot(widths, res["best_ratio"], "o-", color=color, label=f"{name}: best ratio (seed-mean loss)")
        coef = np.polyfit(np.log(widths), np.log(res["best_ratio"]), 1)
        lo, hi = res["exponent_bootstrap_95"]
        left.plot(
            widths,
            np.exp(np.polyval(coef, np.log(widths))),
            ":",
            color=color,
            label=f"{name} fit: n^{coef[0]:.2f} (95% boot. [{lo:.2f}, {hi:.2f}])",
        )
    ref = np.asarray(width["optimizers"][next(iter(width["optimizers"]))]["best_ratio"])[0]
    left.plot(widths, ref * widths / widths[0], "k--", alpha=0.5, label="Theorem 1: Θ(n)")
    left.set_xscale("log", base=2)
    left.set_yscale("log", base=2)
    left.set_xlabel("width n")
    left.set_ylabel("best eta_B / eta_A")
    left.set_title(f"best ratio vs n (train loss at t={width['steps']}, fixed {width['n_train']} samples)")
    left.legend(fontsize=7)
    styles = {"shared": "-", "eta_A_inv_n": "--"}
    for name, rows in deltas["settings"].items():
        label = "eta_A = eta_B" if name == "shared" else "eta_A ∝ 1/n, eta_B fixed"
        right.plot(
            deltas["widths"], rows["delta1"], styles[name], color="C0", marker="o", label=f"δ¹ ({label})"
        )
        right.plot(
            deltas["widths"], rows["delta2"], styles[name], color="C1", marker="s", label=f"δ² ({label})"
        )
    right.set_xscale("log", base=2)
    right.set_yscale("log")
    right.set_xlabel("width n")
    right.set_ylabel("RMS per step (mean of steps 2..T)")
    right.set_title(f"Adam, eta = {deltas['eta']:g}: δ¹ (through A) and δ² (through B)")
    right.legend(fontsize=7)
    atomic_save_figure(fig, path)


# -- CLI entry ------------------------------------------------------------------------------------------


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of ``lorakit reproduce loraplus``."""
    add_size_arguments(parser, "loraplus", "small grids, CPU minutes", "the paper-size grid (slow on CPU)")
    parser.add_argument("--no-progress", action="store_true", help="hide progress bars")


def reproduce(config: ToyConfig, out_dir: str | Path, progress: bool = True) -> dict[str, Any]:
    """Run every part, write ``loraplus_toy.json``, ``fig2_heatmaps.png`` and ``width_scaling.png``."""
    out_dir = Path(out_dir)
    start = time.perf_counter()
    fig2 = run_fig2(config, progress)
    ratio = run_ratio_check(config, fig2, progress)
    width = run_width(config, progress)
    deltas = run_delta_width(config, progress)
    results = {
        "paper": "Hayou, Ghosh, Yu, LoRA+ (ICML 2024), Fig. 2 / App. C.1.1 and Theorem 1",
        "config": {k: list(v) if isinstance(v, tuple) else v for k, v in vars(config).items()},
        "fig2": fig2,
        "ratio_suggestion_check": ratio,
        "width_scaling": width,
        "deltas_vs_width": deltas,
        "wall_seconds": time.perf_counter() - start,
    }
    plot_fig2(fig2, out_dir / "fig2_heatmaps.png", ratio)
    plot_width(width, deltas, out_dir / "width_scaling.png")
    atomic_write_json(out_dir / "loraplus_toy.json", results)
    return results


def run(args: argparse.Namespace) -> int:
    """``lorakit reproduce loraplus``."""
    config = full_config() if args.full else quick_config()
    # one thread: the models are tiny, and extra threads on a busy machine slow small matmuls down a lot
    torch.set_num_threads(1)
    results = reproduce(config, args.out, progress=not args.no_progress)
    fig2 = results["fig2"]["panels"][f"test@{config.fig2_steps}"]["best"]
    logger.info(
        "Fig. 2 best test cell at t=%d: eta_A=%.3g eta_B=%.3g",
        config.fig2_steps,
        fig2["eta_A"],
        fig2["eta_B"],
    )
    for name, res in results["width_scaling"]["optimizers"].items():
        logger.info(
            "%s: best ratio exponent %.2f (95%% bootstrap %s)",
            name,
            res["exponent"],
            res["exponent_bootstrap_95"],
        )
    logger.info("wrote %s in %.0f s", Path(args.out) / "loraplus_toy.json", results["wall_seconds"])
    return 0
