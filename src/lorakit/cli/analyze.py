"""``lorakit analyze``: subspace similarity across saved adapters, and the singular spectrum of each ΔW.

* ``lorakit analyze similarity RUN1 RUN2 [...]`` — pairwise similarity matrices of A (row spaces),
  B (column spaces) and ΔW, per layer type and averaged, as heatmaps (PNG) and JSON
  (:mod:`lorakit.analysis.similarity`).
* ``lorakit analyze spectrum RUN`` — singular values, effective rank and the rank keeping 90/99% of
  ``‖ΔW‖_F²`` for every adapted module (:mod:`lorakit.analysis.spectrum`).

A RUN is an adapter folder (``adapter_config.json`` + ``adapter_model.safetensors``, PEFT or lorakit) or
a run folder holding one in ``adapter/``.
"""

from __future__ import annotations

import argparse
import logging
import math
from pathlib import Path
from typing import Any

import numpy as np

from lorakit.analysis.adapter_io import Adapter, load_adapter_factors
from lorakit.analysis.similarity import (
    DELTA_METRICS,
    FACTOR_METRICS,
    PairwiseSimilarity,
    layer_type,
    pairwise_similarity,
    plot_pairwise,
)
from lorakit.analysis.spectrum import ENERGY_LEVELS, SpectrumStats, delta_spectrum
from lorakit.cli import ExampleFormatter, LorakitError
from lorakit.utils import atomic_save_figure, atomic_write_json

logger = logging.getLogger(__name__)


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "analyze",
        help="analyse saved adapters: A/B/ΔW subspace similarity across runs, ΔW spectra",
        description="Analyse saved LoRA adapters (PEFT or lorakit folders) without loading a model.",
        epilog="example: lorakit analyze similarity runs/sst2 runs/rte --out runs/sim",
        formatter_class=ExampleFormatter,
    )
    commands = parser.add_subparsers(dest="analysis", metavar="ANALYSIS", required=True)

    sim = commands.add_parser(
        "similarity",
        help="pairwise A/B/ΔW subspace similarity across runs (heatmaps + JSON)",
        description=(
            "For every pair of runs and every module they both adapt: similarity of the row spaces of A, "
            "the column spaces of B (mean squared canonical correlation = Hu et al.'s φ at full rank, or "
            "mean CCA), and of ΔW = sBA (cosine). Averaged per layer type and overall; the random baseline "
            "(r/d for squared CCA) is reported beside each. A factor frozen at the same init in two runs is "
            "bit-identical: its similarity is trivially 1 and is flagged."
        ),
        epilog=(
            "example: lorakit analyze similarity runs/sst2/seed0 runs/rte/seed0 runs/cola/seed0 \\\n"
            "             --labels sst2 rte cola --out runs/similarity"
        ),
        formatter_class=ExampleFormatter,
    )
    sim.add_argument("runs", nargs="+", metavar="RUN", help="adapter or run folders (at least two)")
    sim.add_argument("--labels", nargs="+", help="display names, one per RUN (default: folder names)")
    sim.add_argument(
        "--metric",
        choices=FACTOR_METRICS,
        default="cca2",
        help="A/B metric shown in the heatmap (default cca2)",
    )
    sim.add_argument(
        "--delta-metric",
        choices=DELTA_METRICS,
        default="cosine",
        help="ΔW metric in the heatmap (default cosine)",
    )
    sim.add_argument("--out", type=Path, default=Path("runs/similarity"), help="output folder")
    sim.set_defaults(func=run_similarity)

    spec = commands.add_parser(
        "spectrum",
        help="singular values, effective rank and 90/99%%-energy rank of each ΔW",
        description=(
            "Per adapted module: singular values of ΔW = sBA, effective rank (Roy & Vetterli), stable rank "
            "and the smallest rank keeping 90% / 99% of ‖ΔW‖_F² — the rank a rank advisor should aim for."
        ),
        epilog="example: lorakit analyze spectrum runs/sst2 --out runs/sst2/spectrum",
        formatter_class=ExampleFormatter,
    )
    spec.add_argument("run", metavar="RUN", help="adapter or run folder")
    spec.add_argument("--out", type=Path, help="output folder (default: RUN/analysis)")
    spec.set_defaults(func=run_spectrum)


def _load(run: str, label: str | None = None) -> Adapter:
    try:
        return load_adapter_factors(run, label=label)
    except (FileNotFoundError, ValueError) as error:
        raise LorakitError(str(error)) from error


def _unique_labels(labels: list[str]) -> list[str]:
    counts: dict[str, int] = {}
    out = []
    for label in labels:
        counts[label] = counts.get(label, 0) + 1
        out.append(label if labels.count(label) == 1 else f"{label}#{counts[label]}")
    return out


def similarity_summary(result: PairwiseSimilarity, metric: str, delta_metric: str) -> list[dict[str, Any]]:
    """One row per layer group: mean off-diagonal A, B, ΔW similarity and the random baselines."""
    rows = []
    for group in [g for g in result.groups if g != "all"] + ["all"]:
        rows.append(
            {
                "group": group,
                "modules": len(result.groups[group]),
                "A": result.off_diagonal_mean("A", metric, group),
                "B": result.off_diagonal_mean("B", metric, group),
                "delta": result.off_diagonal_mean("delta", delta_metric, group),
                "baseline_A": result.baselines[group]["A"][metric],
                "baseline_B": result.baselines[group]["B"][metric],
                "identical_A": _off_diagonal(result.identical[group]["A"]),
                "identical_B": _off_diagonal(result.identical[group]["B"]),
            }
        )
    return rows


def _off_diagonal(matrix: list[list[float]]) -> float:
    m = np.asarray(matrix, dtype=np.float64)
    mask = ~np.eye(len(m), dtype=bool)
    return float(m[mask].mean()) if mask.any() else math.nan


def run_similarity(args: argparse.Namespace) -> int:
    if len(args.runs) < 2:
        raise LorakitError("analyze similarity needs at least two RUN folders")
    if args.labels is not None and len(args.labels) != len(args.runs):
        raise LorakitError(f"--labels: got {len(args.labels)} labels for {len(args.runs)} runs")
    labels = args.labels or [None] * len(args.runs)
    adapters = [_load(run, label) for run, label in zip(args.runs, labels, strict=True)]
    for adapter, label in zip(adapters, _unique_labels([a.label for a in adapters]), strict=True):
        adapter.label = label
    try:
        result = pairwise_similarity(adapters)
    except ValueError as error:
        raise LorakitError(str(error)) from error
    out: Path = args.out
    summary = similarity_summary(result, args.metric, args.delta_metric)
    payload = {
        "runs": [str(a.path) for a in adapters],
        "frozen_factors": {a.label: sorted(a.frozen) for a in adapters},
        "metric": args.metric,
        "delta_metric": args.delta_metric,
        "summary": summary,
        **result.to_dict(),
    }
    atomic_write_json(out / "similarity.json", payload)
    plot_pairwise(result, out / "similarity.png", metric=args.metric, delta_metric=args.delta_metric)
    print(f"{'layer type':<14}{'modules':>8}{'A':>8}{'B':>8}{'ΔW':>8}{'rand A':>8}{'rand B':>8}")
    for row in summary:
        print(
            f"{row['group']:<14}{row['modules']:>8}{row['A']:>8.3f}{row['B']:>8.3f}{row['delta']:>8.3f}"
            f"{row['baseline_A']:>8.3f}{row['baseline_B']:>8.3f}"
        )
    if any(row["identical_A"] > 0 or row["identical_B"] > 0 for row in summary):
        print(
            "note: some factors are bit-identical across runs (frozen at the same init): "
            "their similarity 1 is trivial"
        )
    print(
        f"A/B: {args.metric}, ΔW: {args.delta_metric}; "
        f"wrote {out / 'similarity.json'} and {out / 'similarity.png'}"
    )
    return 0


def spectrum_report(adapter: Adapter) -> dict[str, Any]:
    """Per-module :class:`SpectrumStats` of an adapter and a per-layer-type summary."""
    layers: dict[str, SpectrumStats] = {
        name: delta_spectrum(layer.B, layer.A, layer.scaling) for name, layer in adapter.layers.items()
    }
    by_type: dict[str, list[SpectrumStats]] = {}
    for name, stats in layers.items():
        by_type.setdefault(layer_type(name), []).append(stats)
    by_type["all"] = list(layers.values())
    summary = {
        group: {
            "modules": len(items),
            "r": max(adapter.layers[n].r for n in layers if group == "all" or layer_type(n) == group),
            "mean_effective_rank": float(np.mean([s.effective_rank for s in items])),
            "mean_stable_rank": float(np.mean([s.stable_rank for s in items])),
            "mean_rank_90": float(np.mean([s.rank_90 for s in items])),
            "max_rank_90": max(s.rank_90 for s in items),
            "mean_rank_99": float(np.mean([s.rank_99 for s in items])),
            "max_rank_99": max(s.rank_99 for s in items),
        }
        for group, items in by_type.items()
    }
    return {
        "run": str(adapter.path),
        "energy_levels": list(ENERGY_LEVELS),
        "summary": summary,
        "layers": {
            name: {"r": adapter.layers[name].r, "scaling": adapter.layers[name].scaling, **stats.to_dict()}
            for name, stats in layers.items()
        },
    }


def plot_spectrum(report: dict[str, Any], path: Path) -> None:
    """Normalised singular values per module (left) and effective / 90% / 99% ranks per module (right)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    layers = report["layers"]
    types = sorted({layer_type(name) for name in layers})
    colours = {t: plt.get_cmap("tab10")(i % 10) for i, t in enumerate(types)}
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    for name, stats in layers.items():
        s = np.asarray(stats["singular_values"])
        if s.size and s[0] > 0:
            left.semilogy(
                np.arange(1, s.size + 1), s / s[0], color=colours[layer_type(name)], alpha=0.5, lw=1
            )
    for t in types:
        left.plot([], [], color=colours[t], label=t)
    left.set_xlabel("index i")
    left.set_ylabel("σ_i / σ_1")
    left.set_title("singular values of ΔW (normalised)")
    left.legend(fontsize=7)
    x = np.arange(len(layers))
    for key, marker in (("effective_rank", "o"), ("rank_90", "s"), ("rank_99", "^")):
        right.plot(x, [stats[key] for stats in layers.values()], marker, label=key, ms=4)
    right.set_xticks(x, list(layers), rotation=90, fontsize=5)
    right.set_ylabel("rank")
    right.set_title("effective rank and rank for 90% / 99% of ‖ΔW‖_F²")
    right.legend(fontsize=7)
    fig.tight_layout()
    atomic_save_figure(fig, path)


def run_spectrum(args: argparse.Namespace) -> int:
    adapter = _load(args.run)
    out: Path = args.out if args.out is not None else Path(args.run) / "analysis"
    report = spectrum_report(adapter)
    atomic_write_json(out / "spectrum.json", report)
    plot_spectrum(report, out / "spectrum.png")
    print(f"{'layer type':<14}{'modules':>8}{'r':>5}{'eff. rank':>10}{'rank90':>8}{'rank99':>8}{'max99':>7}")
    for group, row in report["summary"].items():
        print(
            f"{group:<14}{row['modules']:>8}{row['r']:>5}{row['mean_effective_rank']:>10.2f}"
            f"{row['mean_rank_90']:>8.2f}{row['mean_rank_99']:>8.2f}{row['max_rank_99']:>7}"
        )
    print(f"wrote {out / 'spectrum.json'} and {out / 'spectrum.png'}")
    return 0
