"""Subspace similarity of learned LoRA factors and updates, within and across adapters.

Asymmetry question (Zhu et al., ICML 2024, Fig. 1; NOTES.md B.5): does B carry the task and A the
initialisation? We compare, layer by layer,

* the **row space of A** (A is r×in, so its row space lives in ℝ^in) and the **column space of B**
  (B is out×r, in ℝ^out). Both are invariant to the factorisation's gauge ``B A = (B G⁻¹)(G A)``, to
  scaling, and to rotations inside the subspace;
* the update **ΔW = s·B A** itself: cosine ``⟨ΔW₁, ΔW₂⟩_F / (‖ΔW₁‖_F ‖ΔW₂‖_F)`` and the similarity of its
  column and row spaces.

Metrics, for orthonormal bases ``Q₁`` (d×k₁), ``Q₂`` (d×k₂) of the two subspaces:

* **canonical correlations** ``ρ_1 ≥ … ≥ ρ_m`` (m = min(k₁, k₂)) are the singular values of ``Q₁ᵀQ₂``;
  the **principal angles** are ``θ_i = arccos ρ_i`` (computed with the sine formula for small angles,
  Björck & Golub 1973, Knyazev & Argentati 2002, so near-identical subspaces give angles near 0 rather
  than √eps);
* **mean CCA** ``(1/m) Σ ρ_i`` (Kornblith et al. 2019, as reported by Zhu et al.);
* **mean squared CCA** ``‖Q₁ᵀQ₂‖_F² / m``, which is Hu et al.'s (LoRA, 2021, §7.2) normalised subspace
  similarity φ(M₁, M₂, i, j) = ‖U_{M₁,i}ᵀ U_{M₂,j}‖_F² / min(i, j) at i = k₁, j = k₂. :func:`phi` gives φ
  for any top-i / top-j singular directions.

Random baseline: for a uniformly random k₂-dimensional subspace of ℝ^d, ``E‖Q₁ᵀQ₂‖_F² = k₁k₂/d``, so the
expected squared-CCA similarity is ``max(k₁, k₂)/d`` (``r/d`` at equal ranks). The mean-CCA baseline
has no simple closed form and is estimated by Monte Carlo (:func:`random_baseline_cca`).

A factor that was frozen at the same initialisation in both runs is bit-identical and its similarity is
trivially 1; comparisons flag this (``identical=True``) so it is not read as evidence.
"""

from __future__ import annotations

import functools
import itertools
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import torch

from lorakit.analysis.spectrum import lowrank_svd, numerical_rank

if TYPE_CHECKING:
    from lorakit.analysis.adapter_io import Adapter, AdapterLayer

Side = Literal["col", "row"]
FACTORS: tuple[str, ...] = ("A", "B", "delta")
#: scalar metrics reported for A and B, and for ΔW
FACTOR_METRICS: tuple[str, ...] = ("cca2", "cca")
DELTA_METRICS: tuple[str, ...] = ("cosine", "col_cca2", "row_cca2")


def _eps_of(matrix: torch.Tensor) -> float:
    return torch.finfo(matrix.dtype).eps if matrix.dtype.is_floating_point else torch.finfo(torch.float64).eps


def thin_svd(M: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Thin SVD ``M = U diag(S) Vᵀ`` of a float64 matrix, via a QR of the long side first.

    LoRA factors are tall and skinny (r ≪ d): QR then an r×r SVD is cheaper, and it avoids LAPACK's
    multi-threaded SVD on a d×r panel, which was measured ~100× slower than one thread on a busy 2-core box.
    """
    if M.shape[0] >= M.shape[1]:
        Q, R = torch.linalg.qr(M)
        U, S, Vh = torch.linalg.svd(R)
        return Q @ U, S, Vh.T
    Q, R = torch.linalg.qr(M.T)
    U, S, Vh = torch.linalg.svd(R)
    return Vh.T, S, Q @ U


def singular_basis(
    matrix: torch.Tensor, side: Side = "col", k: int | None = None, eps: float | None = None
) -> torch.Tensor:
    """Orthonormal basis (float64, d×k) of the top-k singular directions of ``matrix``.

    ``side="col"``: left singular vectors (column space, d = rows); ``side="row"``: right singular
    vectors (row space, d = columns). ``k=None`` keeps the numerical rank, with the tolerance of
    :func:`lorakit.analysis.spectrum.numerical_rank` at the epsilon ``eps`` (default: that of the
    matrix's own dtype).
    """
    if matrix.ndim != 2:
        raise ValueError(f"expected a 2-D matrix, got shape {tuple(matrix.shape)}")
    if side not in ("col", "row"):
        raise ValueError(f"side must be 'col' or 'row', got {side!r}")
    eps = _eps_of(matrix) if eps is None else eps
    M = matrix.detach().to(torch.float64)
    if not torch.isfinite(M).all():
        raise ValueError("matrix contains NaN or inf")
    U, S, V = thin_svd(M)
    vectors = U if side == "col" else V
    available = numerical_rank(S, tuple(M.shape), eps)
    if k is None:
        k = available
    elif not 0 <= k <= S.numel():
        raise ValueError(f"asked for the top {k} singular directions of a {tuple(M.shape)} matrix")
    return vectors[:, :k]


def _check_bases(Q1: torch.Tensor, Q2: torch.Tensor) -> None:
    if Q1.ndim != 2 or Q2.ndim != 2 or Q1.shape[0] != Q2.shape[0]:
        raise ValueError(
            f"subspaces must live in the same ambient space, got bases {tuple(Q1.shape)} and "
            f"{tuple(Q2.shape)}"
        )


def canonical_correlations(Q1: torch.Tensor, Q2: torch.Tensor) -> torch.Tensor:
    """Cosines of the principal angles (descending) between ``span(Q1)`` and ``span(Q2)`` (orthonormal)."""
    _check_bases(Q1, Q2)
    if Q1.shape[1] == 0 or Q2.shape[1] == 0:
        return torch.zeros(0, dtype=torch.float64)
    return torch.linalg.svdvals(Q1.T @ Q2).clamp(0.0, 1.0)[: min(Q1.shape[1], Q2.shape[1])]


def principal_angles_between(Q1: torch.Tensor, Q2: torch.Tensor) -> torch.Tensor:
    """Principal angles in radians, ascending, between ``span(Q1)`` and ``span(Q2)`` (orthonormal bases).

    Cosine formula ``arccos σ_i(Q₁ᵀQ₂)`` for large angles, sine formula ``arcsin σ(Q₂ − Q₁Q₁ᵀQ₂)`` where
    ``cos² ≥ 1/2`` (accurate near 0), as in Knyazev & Argentati (2002).
    """
    cos = canonical_correlations(Q1, Q2)
    m = cos.numel()
    if m == 0:
        return cos
    big, small = (Q1, Q2) if Q1.shape[1] >= Q2.shape[1] else (Q2, Q1)
    residual = small - big @ (big.T @ small)
    sin_ascending = thin_svd(residual)[1].clamp(0.0, 1.0).flip(0)[:m]
    return torch.where(cos**2 >= 0.5, torch.arcsin(sin_ascending), torch.arccos(cos))


def principal_angles(M1: torch.Tensor, M2: torch.Tensor, side: Side = "col") -> torch.Tensor:
    """Principal angles (radians, ascending) between the column (or row) spaces of two matrices."""
    return principal_angles_between(singular_basis(M1, side), singular_basis(M2, side))


def phi(
    M1: torch.Tensor, M2: torch.Tensor, i: int | None = None, j: int | None = None, side: Side = "col"
) -> float:
    """Hu et al. (2021) normalised subspace similarity ``‖U_{M₁,i}ᵀ U_{M₂,j}‖_F² / min(i, j)`` ∈ [0, 1].

    ``U_{M,i}`` are the top-i left (``side="col"``) or right (``side="row"``) singular vectors; i and j
    default to the numerical ranks. Returns NaN if either subspace is empty (e.g. B = 0).
    """
    Q1 = singular_basis(M1, side, i)
    Q2 = singular_basis(M2, side, j)
    return squared_cca(Q1, Q2)


def phi_grid(M1: torch.Tensor, M2: torch.Tensor, side: Side = "col") -> np.ndarray:
    """φ(M₁, M₂, i, j) for every i ≤ rank(M₁), j ≤ rank(M₂): the grid of Hu et al.'s Fig. 3 (float64)."""
    Q1 = singular_basis(M1, side)
    Q2 = singular_basis(M2, side)
    overlap = (Q1.T @ Q2) ** 2
    cumulative = overlap.cumsum(0).cumsum(1).numpy()
    i = np.arange(1, Q1.shape[1] + 1)[:, None]
    j = np.arange(1, Q2.shape[1] + 1)[None, :]
    return cumulative / np.minimum(i, j)


def squared_cca(Q1: torch.Tensor, Q2: torch.Tensor) -> float:
    """Mean squared canonical correlation ``‖Q₁ᵀQ₂‖_F² / min(k₁, k₂)`` of two orthonormal bases."""
    _check_bases(Q1, Q2)
    m = min(Q1.shape[1], Q2.shape[1])
    if m == 0:
        return math.nan
    return float(min(1.0, float(((Q1.T @ Q2) ** 2).sum()) / m))


def mean_cca(Q1: torch.Tensor, Q2: torch.Tensor) -> float:
    """Mean canonical correlation ``(1/m) Σ cos θ_i`` of two orthonormal bases (NaN if one is empty)."""
    cos = canonical_correlations(Q1, Q2)
    return float(cos.mean()) if cos.numel() else math.nan


def random_baseline_cca2(d: int, k1: int, k2: int) -> float:
    """Expected squared-CCA similarity of uniformly random subspaces: ``max(k₁, k₂) / d``."""
    if d <= 0 or k1 <= 0 or k2 <= 0:
        return math.nan
    return min(1.0, max(k1, k2) / d)


@functools.lru_cache(maxsize=256)
def random_baseline_cca(d: int, k1: int, k2: int, draws: int = 32, seed: int = 0) -> float:
    """Monte-Carlo estimate of the mean-CCA similarity of Haar-random k₁- and k₂-dim subspaces of ℝ^d."""
    if d <= 0 or k1 <= 0 or k2 <= 0:
        return math.nan
    if max(k1, k2) >= d:
        return 1.0
    generator = torch.Generator().manual_seed(seed)
    values = []
    for _ in range(draws):
        Q1 = torch.linalg.qr(torch.randn(d, k1, generator=generator, dtype=torch.float64))[0]
        Q2 = torch.linalg.qr(torch.randn(d, k2, generator=generator, dtype=torch.float64))[0]
        values.append(mean_cca(Q1, Q2))
    return float(np.mean(values))


@dataclass(frozen=True)
class SubspaceComparison:
    """Similarity of two subspaces of ℝ^dim (see the module docstring for the metrics)."""

    dim: int
    rank1: int
    rank2: int
    cca2: float
    cca: float
    angles_deg: list[float]
    baseline_cca2: float
    baseline_cca: float
    identical: bool = False

    def value(self, metric: str) -> float:
        if metric not in FACTOR_METRICS:
            raise ValueError(f"unknown subspace metric {metric!r}; expected one of {FACTOR_METRICS}")
        return getattr(self, metric)


def compare_bases(Q1: torch.Tensor, Q2: torch.Tensor, identical: bool = False) -> SubspaceComparison:
    """:class:`SubspaceComparison` of two orthonormal bases of subspaces of the same space."""
    _check_bases(Q1, Q2)
    d, k1, k2 = Q1.shape[0], Q1.shape[1], Q2.shape[1]
    angles = principal_angles_between(Q1, Q2)
    return SubspaceComparison(
        dim=d,
        rank1=k1,
        rank2=k2,
        cca2=squared_cca(Q1, Q2),
        cca=mean_cca(Q1, Q2),
        angles_deg=[math.degrees(float(a)) for a in angles],
        baseline_cca2=random_baseline_cca2(d, k1, k2),
        baseline_cca=random_baseline_cca(d, k1, k2),
        identical=identical,
    )


def compare_subspaces(M1: torch.Tensor, M2: torch.Tensor, side: Side = "col") -> SubspaceComparison:
    """Compare the column (``"col"``) or row (``"row"``) spaces of two matrices, of any ranks."""
    if M1.ndim != 2 or M2.ndim != 2:
        raise ValueError(f"expected 2-D matrices, got shapes {tuple(M1.shape)} and {tuple(M2.shape)}")
    axis = 0 if side == "col" else 1
    if M1.shape[axis] != M2.shape[axis]:
        raise ValueError(
            f"{side} spaces live in different dimensions: shapes {tuple(M1.shape)} and {tuple(M2.shape)}"
        )
    identical = M1.shape == M2.shape and torch.equal(M1.detach().cpu(), M2.detach().cpu())
    return compare_bases(singular_basis(M1, side), singular_basis(M2, side), identical=identical)


@dataclass(frozen=True)
class DeltaComparison:
    """Similarity of two updates ``ΔW₁``, ``ΔW₂`` given in factored form."""

    cosine: float
    norm1: float
    norm2: float
    col: SubspaceComparison
    row: SubspaceComparison

    def value(self, metric: str) -> float:
        if metric == "cosine":
            return self.cosine
        if metric == "col_cca2":
            return self.col.cca2
        if metric == "row_cca2":
            return self.row.cca2
        raise ValueError(f"unknown ΔW metric {metric!r}; expected one of {DELTA_METRICS}")


def compare_deltas(
    B1: torch.Tensor, A1: torch.Tensor, B2: torch.Tensor, A2: torch.Tensor, s1: float = 1.0, s2: float = 1.0
) -> DeltaComparison:
    """Compare ``ΔW₁ = s₁B₁A₁`` and ``ΔW₂ = s₂B₂A₂`` without forming them; ranks may differ.

    ``⟨B₁A₁, B₂A₂⟩_F = tr((B₁ᵀB₂)(A₂A₁ᵀ))``; the column/row spaces come from :func:`lowrank_svd`.
    """
    if B1.shape[0] != B2.shape[0] or A1.shape[1] != A2.shape[1]:
        raise ValueError(f"ΔW shapes differ: {(B1.shape[0], A1.shape[1])} vs {(B2.shape[0], A2.shape[1])}")
    U1, S1, V1 = lowrank_svd(B1, A1, s1)
    U2, S2, V2 = lowrank_svd(B2, A2, s2)
    eps = max(_eps_of(t) for t in (B1, A1, B2, A2))
    shape = (B1.shape[0], A1.shape[1])
    k1, k2 = numerical_rank(S1, shape, eps), numerical_rank(S2, shape, eps)
    inner = float(s1 * s2 * torch.trace((B1.double().T @ B2.double()) @ (A2.double() @ A1.double().T)))
    n1, n2 = float(torch.linalg.vector_norm(S1)), float(torch.linalg.vector_norm(S2))
    cosine = inner / (n1 * n2) if n1 > 0 and n2 > 0 else math.nan
    return DeltaComparison(
        cosine=max(-1.0, min(1.0, cosine)) if math.isfinite(cosine) else cosine,
        norm1=n1,
        norm2=n2,
        col=compare_bases(U1[:, :k1], U2[:, :k2]),
        row=compare_bases(V1[:, :k1], V2[:, :k2]),
    )


@dataclass(frozen=True)
class LayerComparison:
    """A (row space), B (column space) and ΔW similarity of one adapted module in two adapters."""

    module: str
    A: SubspaceComparison
    B: SubspaceComparison
    delta: DeltaComparison

    def value(self, factor: str, metric: str) -> float:
        if factor == "delta":
            return self.delta.value(metric)
        if factor not in ("A", "B"):
            raise ValueError(f"unknown factor {factor!r}; expected one of {FACTORS}")
        return getattr(self, factor).value(metric)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def compare_layers(layer1: AdapterLayer, layer2: AdapterLayer) -> LayerComparison:
    """:class:`LayerComparison` of the same module in two adapters (ranks may differ)."""
    if layer1.A.shape[1] != layer2.A.shape[1] or layer1.B.shape[0] != layer2.B.shape[0]:
        raise ValueError(
            f"module {layer1.name}: shapes differ between adapters: A {tuple(layer1.A.shape)} vs "
            f"{tuple(layer2.A.shape)}, B {tuple(layer1.B.shape)} vs {tuple(layer2.B.shape)}"
        )
    return LayerComparison(
        module=layer1.name,
        A=compare_subspaces(layer1.A, layer2.A, side="row"),
        B=compare_subspaces(layer1.B, layer2.B, side="col"),
        delta=compare_deltas(layer1.B, layer1.A, layer2.B, layer2.A, layer1.scaling, layer2.scaling),
    )


def compare_adapters(adapter1: Adapter, adapter2: Adapter) -> dict[str, LayerComparison]:
    """Per-module comparison over the modules both adapters adapt (error if they share none)."""
    common = [name for name in adapter1.layers if name in adapter2.layers]
    if not common:
        raise ValueError(
            f"adapters {adapter1.label!r} and {adapter2.label!r} adapt no module in common "
            f"(first modules: {list(adapter1.layers)[:3]} vs {list(adapter2.layers)[:3]})"
        )
    return {name: compare_layers(adapter1.layers[name], adapter2.layers[name]) for name in common}


@dataclass
class PairwiseSimilarity:
    """N×N similarity matrices across runs, per layer type and averaged (``"all"``).

    ``matrices[group][factor][metric]`` is an N×N list (diagonal 1), the mean over the group's modules;
    ``baselines[group][factor]`` the mean random baseline of that metric (None for ΔW cosine, whose
    random baseline is ≈ 0); ``identical[group][factor]`` the fraction of modules whose factor is
    bit-identical between the two runs (frozen at the same init: similarity trivially 1).
    """

    labels: list[str]
    modules: list[str]
    groups: dict[str, list[str]]
    matrices: dict[str, dict[str, dict[str, list[list[float]]]]] = field(default_factory=dict)
    baselines: dict[str, dict[str, dict[str, float | None]]] = field(default_factory=dict)
    identical: dict[str, dict[str, list[list[float]]]] = field(default_factory=dict)
    per_layer: dict[str, dict[str, dict[str, list[list[float]]]]] = field(default_factory=dict)

    def matrix(self, factor: str, metric: str, group: str = "all") -> np.ndarray:
        return np.asarray(self.matrices[group][factor][metric], dtype=np.float64)

    def off_diagonal_mean(self, factor: str, metric: str, group: str = "all") -> float:
        m = self.matrix(factor, metric, group)
        mask = ~np.eye(len(m), dtype=bool)
        return float(np.nanmean(m[mask])) if mask.any() else math.nan

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def layer_type(module: str) -> str:
    """The layer type of a module path: its last component (``...attention.self.query`` → ``query``)."""
    return module.rsplit(".", 1)[-1]


def _metrics_for(factor: str) -> tuple[str, ...]:
    return DELTA_METRICS if factor == "delta" else FACTOR_METRICS


def pairwise_similarity(adapters: Sequence[Adapter]) -> PairwiseSimilarity:
    """Compare every pair of adapters on their common modules; aggregate per layer type and overall."""
    if len(adapters) < 2:
        raise ValueError(f"need at least two adapters to compare, got {len(adapters)}")
    labels = [adapter.label for adapter in adapters]
    modules = [name for name in adapters[0].layers if all(name in a.layers for a in adapters[1:])]
    if not modules:
        raise ValueError(f"the adapters {labels} adapt no module in common")
    groups: dict[str, list[str]] = {}
    for name in modules:
        groups.setdefault(layer_type(name), []).append(name)
    groups["all"] = list(modules)
    n = len(adapters)
    # values[module][factor][metric] is an n×n array; identical flags likewise per factor
    values = {m: {f: {k: np.eye(n) for k in _metrics_for(f)} for f in FACTORS} for m in modules}
    same = {m: {f: np.eye(n) for f in ("A", "B")} for m in modules}
    bases = {m: {"A": [], "B": []} for m in modules}
    for i, j in itertools.combinations(range(n), 2):
        for name in modules:
            comparison = compare_layers(adapters[i].layers[name], adapters[j].layers[name])
            for factor in FACTORS:
                for metric in _metrics_for(factor):
                    values[name][factor][metric][i, j] = values[name][factor][metric][j, i] = (
                        comparison.value(factor, metric)
                    )
            for factor in ("A", "B"):
                sub: SubspaceComparison = getattr(comparison, factor)
                same[name][factor][i, j] = same[name][factor][j, i] = float(sub.identical)
                bases[name][factor].append((sub.baseline_cca2, sub.baseline_cca))
    result = PairwiseSimilarity(labels=labels, modules=modules, groups=groups)
    for name in modules:
        result.per_layer[name] = {
            f: {k: values[name][f][k].tolist() for k in _metrics_for(f)} for f in FACTORS
        }
    for group, members in groups.items():
        result.matrices[group] = {
            f: {
                k: np.nanmean(np.stack([values[m][f][k] for m in members]), axis=0).tolist()
                for k in _metrics_for(f)
            }
            for f in FACTORS
        }
        result.identical[group] = {
            f: np.mean(np.stack([same[m][f] for m in members]), axis=0).tolist() for f in ("A", "B")
        }
        result.baselines[group] = {
            f: {
                "cca2": float(np.nanmean([b[0] for m in members for b in bases[m][f]])),
                "cca": float(np.nanmean([b[1] for m in members for b in bases[m][f]])),
            }
            for f in ("A", "B")
        }
        result.baselines[group]["delta"] = {"cosine": None}
    return result


def annotate_cells(ax: Any, matrix: np.ndarray, fontsize: int = 8) -> None:
    """Write each value of a heatmap into its cell (dark text on light cells)."""
    for i in range(matrix.shape[0]):
        for j in range(matrix.shape[1]):
            color = "k" if matrix[i, j] > 0.6 else "w"
            ax.text(j, i, f"{matrix[i, j]:.2f}", ha="center", va="center", fontsize=fontsize, color=color)


def plot_pairwise(
    result: PairwiseSimilarity, path: str | Path, metric: str = "cca2", delta_metric: str = "cosine"
) -> None:
    """Heatmaps: one row per layer group (types, then ``all``), columns A, B, ΔW; PNG written atomically."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from lorakit.utils import atomic_save_figure

    groups = [g for g in result.groups if g != "all"] + ["all"]
    n = len(result.labels)
    size = max(2.6, 0.45 * n + 1.6)
    fig, axes = plt.subplots(len(groups), 3, figsize=(3 * size, size * len(groups)), squeeze=False)
    for row, group in enumerate(groups):
        for col, factor in enumerate(FACTORS):
            ax = axes[row][col]
            chosen = delta_metric if factor == "delta" else metric
            m = result.matrix(factor, chosen, group)
            vmin = -1.0 if chosen == "cosine" else 0.0
            image = ax.imshow(m, vmin=vmin, vmax=1.0, cmap="viridis")
            title = f"{group} · {'ΔW' if factor == 'delta' else factor} · {chosen}"
            if factor != "delta":
                title += f"\nrandom ≈ {result.baselines[group][factor][chosen]:.3f}"
                if np.any(np.asarray(result.identical[group][factor]) - np.eye(n) > 0):
                    title += " (some identical: frozen)"
            ax.set_title(title, fontsize=8)
            ax.set_xticks(range(n), result.labels, rotation=60, ha="right", fontsize=7)
            ax.set_yticks(range(n), result.labels, fontsize=7)
            if n <= 8:
                annotate_cells(ax, m, fontsize=6)
            fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04)
    fig.tight_layout()
    atomic_save_figure(fig, path)
