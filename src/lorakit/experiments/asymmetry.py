"""Zhu et al. (ICML 2024) linear-regression asymmetry: frozen-A vs frozen-B, closed forms vs sampling.

``lorakit reproduce asymmetry`` writes ``asymmetry.json`` and two figures into ``--out``:

1. **Monte-Carlo check** over a grid of (d, r), square layers d_in = d_out = d, for an isotropic and an
   anisotropic input covariance (eigenvalues 1/k², random eigenbasis), ``Δ ~ N(0, 1/d)``, noise σ = 0.1:
   the mean over Haar draws of the exact conditional losses ``L_B(U)``/``L_A(Q)`` against
   ``E[L_B] = dσ² + Tr(ΔΣΔᵀ)(1 − r/d)`` (exact) and, for isotropic Σ, ``E[L_A]`` (exact there); and, per
   (d, r), a data-sampling check: least squares fitted on sampled (X, Y), evaluated on fresh samples,
   against the closed-form loss of the same frozen factor. Agreement is measured in standard errors.
2. **Loss vs r** (d = 64, anisotropic Σ): LoRA trained by full-batch gradient descent on the population
   loss, frozen-A and frozen-B (Monte-Carlo mean ± 2 s.e.), with the formulas overlaid (LoRA optimum by
   Eckart–Young, exact E[L_B], the paper's asymptotic E[L_A] flagged as approximate).
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
from lorakit.theory import asymmetry as theory
from lorakit.utils import atomic_save_figure, atomic_write_json

logger = logging.getLogger(__name__)


@dataclass
class AsymmetryConfig:
    """Sizes of the reproduction (``--quick`` defaults)."""

    dims: tuple[int, ...] = (16, 32, 64)
    ranks: tuple[int, ...] = (1, 2, 4, 8)
    noise_std: float = 0.1
    mc_samples: int = 200
    n_train: int = 2000
    n_test: int = 2000
    curve_dim: int = 64
    curve_ranks: tuple[int, ...] = (1, 2, 4, 8, 16, 32)
    gd_steps: int = 3000
    gd_lr: float = 0.2
    seed: int = 0


def full_config() -> AsymmetryConfig:
    """``--full``: larger grid, more Monte-Carlo draws, every rank of the curve."""
    return AsymmetryConfig(
        dims=(16, 32, 64, 128),
        ranks=(1, 2, 4, 8, 16),
        mc_samples=1000,
        n_train=10000,
        n_test=10000,
        curve_ranks=tuple(range(1, 33)),
        gd_steps=10000,
    )


def make_covariance(dim: int, kind: str, generator: torch.Generator) -> torch.Tensor:
    """``"iso"``: identity; ``"aniso"``: eigenvalues 1/k² (k = 1..d) in a Haar-random eigenbasis."""
    if kind == "iso":
        return torch.eye(dim, dtype=torch.float64)
    if kind != "aniso":
        raise ValueError(f"asymmetry: covariance kind must be 'iso' or 'aniso', got {kind!r}")
    basis = theory.haar_orthonormal(dim, dim, generator)
    evals = 1.0 / torch.arange(1, dim + 1, dtype=torch.float64) ** 2
    return basis @ torch.diag(evals) @ basis.T


def make_delta(dim: int, generator: torch.Generator) -> torch.Tensor:
    """``Δ = W_t − W_0`` with i.i.d. N(0, 1/d) entries."""
    return torch.randn(dim, dim, generator=generator, dtype=torch.float64) / math.sqrt(dim)


def train_lora_gd(
    delta: torch.Tensor, sigma: torch.Tensor, rank: int, noise_var: float, steps: int, lr: float, generator
) -> float:
    """Standard LoRA (B = 0, A Haar-orthonormal) trained by gradient descent on the population loss.

    ``∇_B L = −2 (Δ − BA) Σ Aᵀ``, ``∇_A L = −2 Bᵀ (Δ − BA) Σ``; ``lr`` is divided by ``λ_max(Σ)``.
    """
    d_out, d_in = delta.shape
    a = theory.haar_orthonormal(rank, d_in, generator)
    b = torch.zeros(d_out, rank, dtype=torch.float64)
    step = lr / float(torch.linalg.eigvalsh(sigma).max())
    for _ in range(steps):
        resid = (delta - b @ a) @ sigma
        grad_b = -2 * resid @ a.T
        grad_a = -2 * b.T @ resid
        b, a = b - step * grad_b, a - step * grad_a
    return theory.population_loss(delta, sigma, b, a, noise_var)


def run_monte_carlo(config: AsymmetryConfig, progress: bool = True) -> list[dict[str, Any]]:
    """Part 1: formulas vs Monte Carlo over (Σ kind, d, r)."""
    g = torch.Generator().manual_seed(config.seed)
    noise_var = config.noise_std**2
    rows = []
    cells = [(k, d, r) for k in ("iso", "aniso") for d in config.dims for r in config.ranks if r < d]
    for kind, dim, rank in tqdm(cells, desc="Monte-Carlo grid", disable=not progress):
        sigma = make_covariance(dim, kind, g)
        delta = make_delta(dim, g)
        mc_b = theory.monte_carlo_frozen_b(delta, sigma, rank, noise_var, config.mc_samples, g)
        mc_a = theory.monte_carlo_frozen_a(delta, sigma, rank, noise_var, config.mc_samples, g)
        exp_b = theory.expected_frozen_b_loss(delta, sigma, rank, noise_var)
        exp_a = theory.expected_frozen_a_loss(delta, sigma, rank, noise_var) if kind == "iso" else None
        # data sampling: one Haar factor each, least squares on samples vs the closed form
        q = theory.haar_orthonormal(rank, dim, g)
        u = theory.haar_orthonormal(dim, rank, g)
        sampled = {}
        for side, factor, formula in (
            ("A", q, theory.frozen_a_loss(delta, sigma, q, noise_var)),
            ("B", u, theory.frozen_b_loss(delta, sigma, u, noise_var)),
        ):
            mean, se = theory.sampled_one_sided_loss(
                delta, sigma, side, factor, noise_var, config.n_train, config.n_test, g
            )
            # expected excess of an OLS fit with Gaussian design: (residual variance) · p / (n − p − 1).
            # Frozen A: p = r features, residual = all of L_A (unexplained ΔX is independent of QX).
            # Frozen B: p = d features for the r projected outputs, whose residual is the noise only.
            n = config.n_train
            if side == "A":
                fit_excess = formula * rank / (n - rank - 1)
            else:
                fit_excess = rank * noise_var * dim / (n - dim - 1)
            sampled[side] = {
                "test_mse": mean,
                "stderr": se,
                "formula": formula,
                "expected_fit_excess": fit_excess,
                "z": (mean - formula - fit_excess) / se,
            }
        rows.append(
            {
                "sigma": kind,
                "d": dim,
                "r": rank,
                "no_adaptation": dim * noise_var + float(torch.trace(delta @ sigma @ delta.T)),
                "frozen_B_mc": mc_b.mean,
                "frozen_B_se": mc_b.stderr,
                "frozen_B_formula": exp_b,
                "frozen_B_z": (mc_b.mean - exp_b) / mc_b.stderr,
                "frozen_A_mc": mc_a.mean,
                "frozen_A_se": mc_a.stderr,
                "frozen_A_formula": exp_a,
                "frozen_A_z": (mc_a.mean - exp_a) / mc_a.stderr if exp_a is not None else None,
                "frozen_A_asymptotic": theory.asymptotic_frozen_a_loss(delta, sigma, rank, noise_var),
                "lora_optimum": theory.lora_optimal_loss(delta, sigma, rank, noise_var),
                "sampled": sampled,
            }
        )
    return rows


def run_curve(config: AsymmetryConfig, progress: bool = True) -> dict[str, Any]:
    """Part 2: loss vs r for LoRA (GD), frozen A, frozen B on one anisotropic problem."""
    g = torch.Generator().manual_seed(config.seed + 1)
    noise_var = config.noise_std**2
    dim = config.curve_dim
    sigma = make_covariance(dim, "aniso", g)
    delta = make_delta(dim, g)
    out: dict[str, Any] = {"d": dim, "sigma": "aniso (1/k^2)", "ranks": list(config.curve_ranks)}
    keys = ("lora_gd", "lora_optimum", "frozen_A_mc", "frozen_A_se", "frozen_A_asymptotic")
    keys += ("frozen_B_mc", "frozen_B_se", "frozen_B_formula")
    for key in keys:
        out[key] = []
    for rank in tqdm(config.curve_ranks, desc="loss vs r", disable=not progress):
        mc_a = theory.monte_carlo_frozen_a(delta, sigma, rank, noise_var, config.mc_samples, g)
        mc_b = theory.monte_carlo_frozen_b(delta, sigma, rank, noise_var, config.mc_samples, g)
        out["lora_gd"].append(train_lora_gd(delta, sigma, rank, noise_var, config.gd_steps, config.gd_lr, g))
        out["lora_optimum"].append(theory.lora_optimal_loss(delta, sigma, rank, noise_var))
        out["frozen_A_mc"].append(mc_a.mean)
        out["frozen_A_se"].append(mc_a.stderr)
        out["frozen_A_asymptotic"].append(theory.asymptotic_frozen_a_loss(delta, sigma, rank, noise_var))
        out["frozen_B_mc"].append(mc_b.mean)
        out["frozen_B_se"].append(mc_b.stderr)
        out["frozen_B_formula"].append(theory.expected_frozen_b_loss(delta, sigma, rank, noise_var))
    out["no_adaptation"] = dim * noise_var + float(torch.trace(delta @ sigma @ delta.T))
    out["noise_floor"] = dim * noise_var
    return out


def plot_curve(curve: dict[str, Any], path: Path) -> None:
    """Loss vs r with the formulas overlaid."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ranks = np.asarray(curve["ranks"])
    fig, ax = plt.subplots(figsize=(7, 5))
    for key, label, color in (
        ("frozen_A_mc", "frozen A (train B), MC", "C0"),
        ("frozen_B_mc", "frozen B (train A), MC", "C1"),
    ):
        se = np.asarray(curve[key.replace("_mc", "_se")])
        ax.errorbar(
            ranks, curve[key], yerr=2 * se, fmt="o", color=color, capsize=3, label=f"{label} ± 2 s.e."
        )
    ax.plot(ranks, curve["frozen_B_formula"], "-", color="C1", label="E[L_B] = dσ² + Tr(ΔΣΔᵀ)(1 − r/d)")
    asym = np.asarray(curve["frozen_A_asymptotic"])
    ax.plot(ranks, np.where(asym > 0, asym, np.nan), ":", color="C0", label="E[L_A] asymptotic (approximate)")
    ax.plot(ranks, curve["lora_gd"], "s", color="C2", label="LoRA, gradient descent")
    ax.plot(ranks, curve["lora_optimum"], "-", color="C2", label="LoRA optimum (Eckart–Young)")
    ax.axhline(curve["no_adaptation"], color="grey", ls="--", label="no adaptation")
    ax.axhline(curve["noise_floor"], color="k", ls="--", lw=0.8, label="noise floor dσ²")
    ax.set_yscale("log")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("rank r")
    ax.set_ylabel("population loss")
    ax.set_title(f"Linear regression, d={curve['d']}, Σ eigenvalues 1/k²")
    ax.legend(fontsize=7)
    atomic_save_figure(fig, path)


def plot_monte_carlo(rows: list[dict[str, Any]], path: Path) -> None:
    """Monte-Carlo mean vs formula (z-scores) for every grid cell."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4))
    labels = [f"{row['sigma']} d={row['d']} r={row['r']}" for row in rows]
    x = np.arange(len(rows))
    ax.scatter(x, [row["frozen_B_z"] for row in rows], label="frozen B: MC vs exact E[L_B]")
    iso = [(i, row["frozen_A_z"]) for i, row in enumerate(rows) if row["frozen_A_z"] is not None]
    ax.scatter([i for i, _ in iso], [z for _, z in iso], marker="s", label="frozen A (Σ=I): MC vs exact")
    ax.scatter(x, [row["sampled"]["A"]["z"] for row in rows], marker="^", s=12, label="sampled fit, frozen A")
    ax.scatter(x, [row["sampled"]["B"]["z"] for row in rows], marker="v", s=12, label="sampled fit, frozen B")
    ax.axhspan(-3, 3, color="grey", alpha=0.15, label="±3 s.e.")
    ax.set_xticks(x, labels, rotation=90, fontsize=6)
    ax.set_ylabel("(estimate − formula) / s.e.")
    ax.legend(fontsize=7)
    fig.tight_layout()
    atomic_save_figure(fig, path)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of ``lorakit reproduce asymmetry``."""
    add_size_arguments(parser, "asymmetry", "small grid, CPU seconds", "larger grid and more draws")
    parser.add_argument("--no-progress", action="store_true", help="hide progress bars")


def reproduce(config: AsymmetryConfig, out_dir: str | Path, progress: bool = True) -> dict[str, Any]:
    """Run both parts and write ``asymmetry.json``, ``loss_vs_rank.png``, ``monte_carlo_check.png``."""
    out_dir = Path(out_dir)
    start = time.perf_counter()
    rows = run_monte_carlo(config, progress)
    curve = run_curve(config, progress)
    z_values = [abs(row["frozen_B_z"]) for row in rows] + [
        abs(r["frozen_A_z"]) for r in rows if r["frozen_A_z"]
    ]
    aniso = [row for row in rows if row["sigma"] == "aniso"]
    results = {
        "paper": "Zhu et al., Asymmetry in Low-Rank Adapters of Foundation Models (ICML 2024), linear case",
        "config": {k: list(v) if isinstance(v, tuple) else v for k, v in vars(config).items()},
        "monte_carlo": rows,
        "max_abs_z_formula": max(z_values),
        "frozen_A_below_frozen_B_aniso": sum(row["frozen_A_mc"] < row["frozen_B_mc"] for row in aniso),
        "aniso_cells": len(aniso),
        "loss_vs_rank": curve,
        "wall_seconds": time.perf_counter() - start,
    }
    plot_curve(curve, out_dir / "loss_vs_rank.png")
    plot_monte_carlo(rows, out_dir / "monte_carlo_check.png")
    atomic_write_json(out_dir / "asymmetry.json", results)
    return results


def run(args: argparse.Namespace) -> int:
    """``lorakit reproduce asymmetry``."""
    config = full_config() if args.full else AsymmetryConfig()
    results = reproduce(config, args.out, progress=not args.no_progress)
    logger.info(
        "max |z| formula vs Monte Carlo: %.2f; frozen A < frozen B in %d/%d anisotropic cells; %.0f s",
        results["max_abs_z_formula"],
        results["frozen_A_below_frozen_B_aniso"],
        results["aniso_cells"],
        results["wall_seconds"],
    )
    return 0
