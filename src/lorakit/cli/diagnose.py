"""``lorakit diagnose RUN``: LoRA+ efficiency table, suggested η_B/η_A and a δ¹/δ² plot for a run folder.

Reads ``RUN/diagnostics.jsonl`` written by :class:`lorakit.analysis.diagnostics.DeltaDiagnostics` (format in
that module's docstring), prints per layer and overall the median δ¹, δ², δ³ and δ¹/δ² over the measured
steps (first and last measured values of the ratio too), the suggested ratio under each criterion
(``loss``: balance −⟨dZ̄, δ¹⟩ and −⟨dZ̄, δ²⟩, the default; ``feature``: balance the RMS δ¹ and δ²;
``curvature``: ratio of the per-factor rates minimising the local quadratic model, when the run recorded
``curv1``/``curv2``; ``sharpness``: ratio of the GD stability edges, toy records only; alternatives whose
fields the file lacks are left out, the chosen one is reported as unavailable with the reason), and saves
``RUN/diagnostics.png`` (δ¹ solid, δ² dashed, per layer, log scale, against the step).
"""

from __future__ import annotations

import argparse
import statistics
from pathlib import Path
from typing import Any

from lorakit.analysis.diagnostics import (
    CRITERIA,
    has_fields,
    iter_layer_series,
    read_diagnostics,
    suggest_ratio,
)
from lorakit.cli import ExampleFormatter, LorakitError
from lorakit.utils import atomic_save_figure


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "diagnose",
        help="LoRA+ efficiency diagnostics of a run (δ¹/δ² table, suggested lr ratio, plot)",
        description="Summarise RUN/diagnostics.jsonl: per-layer δ¹ (change through A), δ² (change "
        "through B), their ratio, and the η_B/η_A that would balance them.",
        epilog="example: lorakit diagnose runs/exp1 --plot runs/exp1/deltas.png",
        formatter_class=ExampleFormatter,
    )
    parser.add_argument("run", help="run folder containing diagnostics.jsonl (or the file itself)")
    parser.add_argument("--plot", default=None, help="PNG path (default: RUN/diagnostics.png)")
    parser.add_argument("--lr-a", type=float, default=None, help="η_A if the file has no learning rates")
    parser.add_argument("--lr-b", type=float, default=None, help="η_B if the file has no learning rates")
    parser.add_argument("--skip-fraction", type=float, default=0.1, help="early measured steps ignored")
    parser.add_argument(
        "--criterion",
        choices=CRITERIA,
        default="loss",
        help="headline suggestion: balance first-order loss decreases (loss, default), RMS δ (feature), "
        "quadratic-model step ratio (curvature; needs curv1/curv2 in the file) or stability-edge ratio "
        "(sharpness; toy records only)",
    )
    parser.set_defaults(func=run_diagnose)


_CAVEATS = {
    "feature": "first-order, ignores curvature/stability",
    "loss": "first-order, ignores curvature/stability",
    "curvature": "one-step quadratic model per factor, ignores stability",
    "sharpness": "plain-GD stability edges per factor",
}


def _fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:.3g}"


def summary_rows(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Median δ terms and ratio per layer plus an ``(overall)`` row."""
    rows = []
    series = {
        key: {name: vals for name, _, vals in iter_layer_series(records, key)}
        for key in ("delta1", "delta2", "delta3", "ratio")
    }
    overall = [r["overall"] for r in records if "overall" in r]
    for name in series["delta1"]:
        ratios = series["ratio"].get(name, [])
        rows.append(
            {
                "layer": name,
                "steps": len(series["delta1"][name]),
                **{
                    k: statistics.median(series[k][name]) if series[k].get(name) else None
                    for k in ("delta1", "delta2", "delta3")
                },
                "ratio": statistics.median(ratios) if ratios else None,
                "ratio_first": ratios[0] if ratios else None,
                "ratio_last": ratios[-1] if ratios else None,
            }
        )
    if overall:
        ratios = [o["ratio"] for o in overall if o.get("ratio") is not None]
        rows.append(
            {
                "layer": "(overall)",
                "steps": len(overall),
                **{k: statistics.median(o[k] for o in overall) for k in ("delta1", "delta2", "delta3")},
                "ratio": statistics.median(ratios) if ratios else None,
                "ratio_first": ratios[0] if ratios else None,
                "ratio_last": ratios[-1] if ratios else None,
            }
        )
    return rows


def plot_deltas(records: list[dict[str, Any]], path: Path) -> None:
    """δ¹ (solid) and δ² (dashed) per layer against the step, log y."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5))
    d2 = {name: (steps, vals) for name, steps, vals in iter_layer_series(records, "delta2")}
    for k, (name, steps, vals) in enumerate(iter_layer_series(records, "delta1")):
        color = f"C{k % 10}"
        ax.plot(steps, vals, "-", color=color, label=f"{name} δ¹")
        if name in d2:
            ax.plot(*d2[name], "--", color=color, label=f"{name} δ²")
    if any(v > 0 for _, _, vals in iter_layer_series(records, "delta1") for v in vals):
        ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_ylabel("RMS feature change per step")
    ax.set_title("LoRA+ efficiency: δ¹ (through A, solid) vs δ² (through B, dashed)")
    ax.legend(fontsize=6, ncol=2)
    atomic_save_figure(fig, path)


def run_diagnose(args: argparse.Namespace) -> int:
    run = Path(args.run)
    if not run.exists():
        raise LorakitError(f"run folder {run} does not exist")
    records = read_diagnostics(run)
    rows = summary_rows(records)
    columns = ("δ¹", "δ²", "δ³", "δ¹/δ²", "first", "last")
    width = max([len("layer"), *(len(row["layer"]) for row in rows)])  # full names: they end in what differs
    header = f"{'layer':{width}s} {'steps':>5s} " + " ".join(f"{c:>9s}" for c in columns)
    print(header)
    print("-" * len(header))
    for row in rows:
        print(
            f"{row['layer']:{width}s} {row['steps']:5d} {_fmt(row['delta1']):>9s} {_fmt(row['delta2']):>9s} "
            f"{_fmt(row['delta3']):>9s} {_fmt(row['ratio']):>9s} {_fmt(row['ratio_first']):>9s} "
            f"{_fmt(row['ratio_last']):>9s}"
        )
    criterion = getattr(args, "criterion", "loss")
    for name in sorted(CRITERIA, key=lambda c: c != criterion):
        if name != criterion and not has_fields(records, name):
            continue
        try:
            suggestion = suggest_ratio(
                records, lr_A=args.lr_a, lr_B=args.lr_b, skip_fraction=args.skip_fraction, criterion=name
            )
        except ValueError as error:
            print(f"suggested ratio ({name}): unavailable ({error})")
            continue
        print(
            f"{'suggested' if name == criterion else 'alternative'} ({name} criterion): current η_B/η_A = "
            f"{suggestion.current_ratio:.3g} -> η_B/η_A = {suggestion.ratio:.3g} (median of "
            f"{suggestion.samples} layer-steps; {_CAVEATS[name]})"
        )
    plot = Path(args.plot) if args.plot else (run if run.is_dir() else run.parent) / "diagnostics.png"
    plot_deltas(records, plot)
    print(f"plot: {plot}")
    return 0
