"""Learning-rate sweeps over (η_A, η_B) (× rank × seeds), as in LoRA+ (Hayou, Ghosh & Yu, ICML 2024),
Figures 3–4, and the Figure-6 statistic used to pick the default ratio λ = η_B/η_A.

The engine is generic: a *cell* is a dict of hyper-parameters and a *cell function* ``fn(cell, **context)``
returns a dict of metrics. :func:`run_sweep` runs every pending cell

- ``backend="local"``: in a process pool (``spawn`` start, ``workers`` processes; with ``gpus`` each
  worker is pinned to one device through ``CUDA_VISIBLE_DEVICES``), or in this process when
  ``workers == 1``;
- ``backend="ray"``: as Ray tasks (``ray.init(address=ray_address)``); Ray does the scheduling, retries and
  GPU placement (``gpus_per_cell``). lorakit builds no scheduler of its own.

Resumable: each finished cell is written atomically to ``OUT/cells/<cell id>.json`` by the driver as soon
as it completes, so after a crash or Ctrl-C a rerun skips every recorded cell. A cell whose function
raised is recorded with ``status="failed"`` and runs again on the next call; a diverged training run is a
result (``status="diverged"``, metric NaN) and is not rerun. A rerun whose function or context (the
settings shared by every cell, e.g. the base fine-tuning config) differs from the one recorded in
``OUT/sweep_config.json`` stops with an error naming the differing settings, so that results of two
settings are never mixed (adding cells to the grid is fine).

Direction: the reports rank by ``metric``; for the generic ``"metric"`` key, which a cell function fills
with its task's main metric and names in ``main_metric`` (``finetune_cell`` does), the direction is that
metric's (:func:`lorakit.train.metrics.higher_is_better`: lower is better for a loss or perplexity).

Outputs (:func:`write_reports`): ``cells.csv`` (one row per cell), ``grid.csv`` (mean/std over seeds per
(η_A, η_B, rank)), one heatmap PNG + JSON per rank and per plotted quantity with the η_A = η_B diagonal
dashed, the best cell boxed and the cells within 1% of the best dotted, and ``sweep.json`` with the best
cell and the top-k ratio statistic

    λ̂ = median{ η_B/η_A : (η_A, η_B) among the k best cells }          (LoRA+ Fig. 6: k = 4, λ̂ ≈ 2⁴).
"""

from __future__ import annotations

import importlib
import itertools
import json
import logging
import math
import multiprocessing
import os
import re
import time
import traceback
import zlib
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from lorakit.train.metrics import higher_is_better
from lorakit.utils import (
    atomic_save_figure,
    atomic_write_csv,
    atomic_write_json,
    read_json,
    read_jsonl,
)

logger = logging.getLogger(__name__)

__all__ = [
    "BACKENDS",
    "CellFunction",
    "SweepResult",
    "aggregate",
    "cell_id",
    "compared_metric",
    "expand_grid",
    "finetune_cell",
    "finetune_context",
    "load_cells",
    "plot_heatmap",
    "run_sweep",
    "synthetic_cell",
    "top_k_ratio",
    "write_reports",
]

BACKENDS = ("local", "ray")
CELLS_DIR = "cells"
CONFIG_FILE = "sweep_config.json"
GROUP_KEYS = ("eta_a", "eta_b", "rank")
CellFunction = Callable[..., Mapping[str, Any]]


# ------------------------------------------------------------------------------------------------ grid


def expand_grid(axes: Mapping[str, Sequence[Any]]) -> list[dict[str, Any]]:
    """The Cartesian product of ``axes`` (name → values) as a list of cells, the last axis varying fastest.

    >>> expand_grid({"eta_a": [1e-4, 1e-3], "eta_b": [1e-3]})
    [{'eta_a': 0.0001, 'eta_b': 0.001}, {'eta_a': 0.001, 'eta_b': 0.001}]
    """
    if not axes:
        raise ValueError("expand_grid: give at least one axis (e.g. {'eta_a': [...], 'eta_b': [...]})")
    for name, values in axes.items():
        if isinstance(values, (str, bytes)) or not isinstance(values, Sequence) or len(values) == 0:
            raise ValueError(f"expand_grid: axis {name!r} needs a non-empty list of values, got {values!r}")
        if len(set(map(_format_value, values))) != len(values):
            raise ValueError(f"expand_grid: axis {name!r} repeats a value: {list(values)!r}")
    names = list(axes)
    return [dict(zip(names, combo, strict=True)) for combo in itertools.product(*(axes[n] for n in names))]


def _format_value(value: Any) -> str:
    if isinstance(value, float):
        return format(value, ".6g")
    return str(value)


def cell_id(cell: Mapping[str, Any]) -> str:
    """A stable, folder-safe name of a cell, e.g. ``eta_a=0.0001,eta_b=0.002,rank=8,seed=0``."""
    text = ",".join(f"{key}={_format_value(cell[key])}" for key in cell)
    return re.sub(r"[^A-Za-z0-9_.=,+-]+", "-", text)


# ------------------------------------------------------------------------------------------ cell store


def _cell_path(out: Path, cid: str) -> Path:
    return out / CELLS_DIR / f"{cid}.json"


def load_cells(out: str | os.PathLike) -> list[dict[str, Any]]:
    """Every recorded cell of a sweep folder (``{"id", "cell", "status", "metrics", "seconds", ...}``)."""
    folder = Path(out) / CELLS_DIR
    records = []
    for path in sorted(folder.glob("*.json")):
        records.append(read_json(path))
    return records


def _record(out: Path, cid: str, cell: Mapping[str, Any], outcome: dict[str, Any]) -> dict[str, Any]:
    record = {"id": cid, "cell": dict(cell), **outcome}
    atomic_write_json(_cell_path(out, cid), record)
    return record


# --------------------------------------------------------------------------------------------- workers


def _resolve(fn: str | CellFunction) -> CellFunction:
    """``"package.module:function"`` → the function (strings travel to Ray/pool workers by name)."""
    if callable(fn):
        return fn
    module_name, sep, attr = str(fn).partition(":")
    if not sep:
        raise ValueError(f"cell function {fn!r}: expected 'package.module:function'")
    try:
        target: Any = importlib.import_module(module_name)
        for part in attr.split("."):
            target = getattr(target, part)
    except (ImportError, AttributeError) as error:
        raise ValueError(f"cell function {fn!r}: cannot import it ({error})") from error
    if not callable(target):
        raise ValueError(f"cell function {fn!r}: not callable")
    return target


def _execute(fn: str | CellFunction, cell: dict[str, Any], context: dict[str, Any]) -> dict[str, Any]:
    """Run one cell; never raises for an ordinary error (it becomes ``status="failed"``)."""
    start = time.perf_counter()
    try:
        metrics = dict(_resolve(fn)(dict(cell), **context))
        status = str(metrics.pop("status", "finished"))
        error = metrics.pop("error", None)
    except Exception as exc:  # a failing cell must not stop the sweep; it is recorded and rerun later
        metrics, status = {}, "failed"
        error = f"{type(exc).__name__}: {exc}\n{traceback.format_exc(limit=6)}"
    return {
        "status": status,
        "metrics": _jsonable(metrics),
        "error": error,
        "seconds": round(time.perf_counter() - start, 3),
        "pid": os.getpid(),
    }


def _jsonable(metrics: dict[str, Any]) -> dict[str, Any]:
    out = {}
    for key, value in metrics.items():
        if isinstance(value, (np.floating, np.integer)):
            value = value.item()
        out[str(key)] = value if isinstance(value, (int, float, str, bool, type(None))) else str(value)
    return out


def _pin_device(queue: Any) -> None:
    """Pool initializer: take one device id from ``queue`` and hide the others from this worker."""
    os.environ["CUDA_VISIBLE_DEVICES"] = str(queue.get())


# ------------------------------------------------------------------------------------------------- run


@dataclass
class SweepResult:
    """What :func:`run_sweep` did: every record (old and new), and how many cells ran now or were skipped."""

    out: str
    records: list[dict[str, Any]]
    ran: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    failed: list[str] = field(default_factory=list)
    report: dict[str, Any] = field(default_factory=dict)


def run_sweep(
    fn: str | CellFunction,
    cells: Sequence[Mapping[str, Any]],
    out: str | os.PathLike,
    *,
    context: Mapping[str, Any] | None = None,
    backend: str = "local",
    workers: int = 1,
    gpus: Sequence[int | str] = (),
    ray_address: str | None = None,
    cpus_per_cell: float = 1.0,
    gpus_per_cell: float = 0.0,
    metric: str = "metric",
    top_k: int = 4,
    report: bool = True,
) -> SweepResult:
    """Run every cell not already recorded in ``out`` and write the reports.

    ``fn`` is a function or, for the process pool and Ray, preferably ``"module:function"``; it is called as
    ``fn(cell, **context)`` and returns a metrics dict (optionally with ``status``, and ``main_metric``: the
    name of the metric its ``"metric"`` value is). ``metric`` names the metric the heatmap and the top-k
    statistic rank by; its direction is that of the metric it stands for (:func:`compared_metric`).

    ``context`` must hold what the cells need as the workers see it: for Ray, absolute paths (see
    :func:`finetune_context`). If ``out`` already records finished cells, ``fn`` and ``context`` must be the
    ones recorded in ``out/sweep_config.json``; otherwise a ``ValueError`` names the differing settings.
    """
    if backend not in BACKENDS:
        raise ValueError(f"sweep backend: expected one of {BACKENDS}, got {backend!r}")
    if isinstance(workers, bool) or not isinstance(workers, int) or workers < 1:
        raise ValueError(f"sweep workers: expected a positive integer, got {workers!r}")
    out = Path(out)
    context = dict(context or {})
    ids = [cell_id(c) for c in cells]
    if len(set(ids)) != len(ids):
        raise ValueError("sweep: two cells have the same hyper-parameters (ids must be unique)")
    done = {r["id"] for r in load_cells(out) if r.get("status") != "failed"}
    config = {"cells": [dict(c) for c in cells], "context": context, "fn": _fn_name(fn), "metric": metric}
    if done:
        _check_same_settings(out, config, len(done))
    pending = [(cid, dict(c)) for cid, c in zip(ids, cells, strict=True) if cid not in done]
    result = SweepResult(str(out), [], skipped=[cid for cid in ids if cid in done])
    atomic_write_json(out / CONFIG_FILE, config)
    if result.skipped:
        logger.info(
            "sweep: %d of %d cells already recorded in %s; skipping them", len(result.skipped), len(ids), out
        )

    def finish(cid: str, cell: dict[str, Any], outcome: dict[str, Any]) -> None:
        _record(out, cid, cell, outcome)
        (result.failed if outcome["status"] == "failed" else result.ran).append(cid)
        if outcome["status"] == "failed":
            logger.warning("sweep: cell %s failed: %s", cid, (outcome["error"] or "").splitlines()[0])
        else:
            logger.info("sweep: cell %s %s in %.1fs", cid, outcome["status"], outcome["seconds"])

    if pending:
        if backend == "ray":
            _run_ray(fn, pending, context, finish, ray_address, cpus_per_cell, gpus_per_cell)
        elif workers == 1 and not gpus:
            for cid, cell in pending:
                finish(cid, cell, _execute(fn, cell, context))
        else:
            _run_pool(fn, pending, context, finish, workers, gpus)
    result.records = [r for r in load_cells(out) if r["id"] in set(ids)]
    if report:
        result.report = write_reports(out, result.records, metric=metric, top_k=top_k)
    return result


def _fn_name(fn: str | CellFunction) -> str:
    return fn if isinstance(fn, str) else f"{fn.__module__}:{fn.__qualname__}"


# Settings of finetune_cell's base config that it overrides in every cell: a change in them changes no result.
_NO_EFFECT_SETTINGS = frozenset({"base.out", "base.resume", "base.progress"})
# Settings holding a path: a relative one recorded by an older sweep equals its absolute form.
_PATH_SETTINGS = frozenset({"data", "eval_data", "model", "runs", "data_root"})
_ABSENT = object()


def _check_same_settings(out: Path, config: Mapping[str, Any], recorded: int) -> None:
    """Raise ``ValueError`` if ``fn`` or the context differ from those the recorded cells ran with."""
    path = out / CONFIG_FILE
    if not path.exists():
        logger.warning(
            "sweep: %s has recorded cells but no %s; cannot check their settings", out, CONFIG_FILE
        )
        return
    saved = read_json(path)
    given = json.loads(json.dumps({"fn": config["fn"], **config["context"]}, default=str))
    before = _flatten({"fn": saved.get("fn"), **(saved.get("context") or {})})
    after = _flatten(given)
    differ = []
    for key in sorted(set(before) | set(after)):
        if key in _NO_EFFECT_SETTINGS:
            continue
        old, new = before.get(key, _ABSENT), after.get(key, _ABSENT)
        if not _same_setting(key, old, new):
            differ.append(f"  {key}: saved {_show(old)}, given {_show(new)}")
    if differ:
        raise ValueError(
            f"sweep {out}: {recorded} recorded cell(s) ran with other settings than these "
            f"({path} holds the saved ones):\n" + "\n".join(differ) + "\n"
            "Results of different settings are not mixed in one sweep folder: use a new output folder "
            "(--out) for the new settings, or rerun with the saved settings to resume this sweep. "
            "Nothing was changed or deleted."
        )


def _flatten(data: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in data.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping) and value:
            flat.update(_flatten(value, f"{name}."))
        else:
            flat[name] = value
    return flat


def _same_setting(key: str, old: Any, new: Any) -> bool:
    if old is not _ABSENT and new is not _ABSENT and old == new:
        return True
    if old is _ABSENT or new is _ABSENT:
        # A setting one side lacks (a field another lorakit version added) matches an unset one.
        return all(v is _ABSENT or v is None or v is False for v in (old, new))
    if key.rsplit(".", 1)[-1] in _PATH_SETTINGS and isinstance(old, str) and isinstance(new, str):
        return _absolute(old) == _absolute(new)
    return False


def _show(value: Any) -> str:
    return "(not set)" if value is _ABSENT else json.dumps(value, default=str)


def _absolute(path: str) -> str:
    return os.path.abspath(os.path.expanduser(path))


def _run_pool(
    fn: str | CellFunction,
    pending: list[tuple[str, dict[str, Any]]],
    context: dict[str, Any],
    finish: Callable[[str, dict[str, Any], dict[str, Any]], None],
    workers: int,
    gpus: Sequence[int | str],
) -> None:
    """A ``spawn`` process pool (no fork: torch and CUDA are not fork-safe); records cells as they finish."""
    ctx = multiprocessing.get_context("spawn")
    initializer, initargs = None, ()
    if gpus:
        queue = ctx.Manager().Queue()
        for i in range(workers):
            queue.put(gpus[i % len(gpus)])
        initializer, initargs = _pin_device, (queue,)
    executor = ProcessPoolExecutor(workers, mp_context=ctx, initializer=initializer, initargs=initargs)
    futures = {executor.submit(_execute, fn, cell, context): (cid, cell) for cid, cell in pending}
    try:
        remaining = set(futures)
        while remaining:
            finished, remaining = wait(remaining, return_when=FIRST_COMPLETED)
            for future in finished:
                cid, cell = futures[future]
                finish(cid, cell, future.result())
    except BaseException:
        # Ctrl-C or a broken pool: what finished is on disk; drop the queue and let the rerun resume.
        executor.shutdown(wait=False, cancel_futures=True)
        raise
    executor.shutdown(wait=True)


def _run_ray(
    fn: str | CellFunction,
    pending: list[tuple[str, dict[str, Any]]],
    context: dict[str, Any],
    finish: Callable[[str, dict[str, Any], dict[str, Any]], None],
    address: str | None,
    cpus_per_cell: float,
    gpus_per_cell: float,
) -> None:
    """One Ray task per cell; Ray places them (CPUs/GPUs per cell) and the driver records each result."""
    try:
        import ray
    except ImportError as error:
        raise ValueError(
            "sweep --backend ray needs Ray: pip install 'lorakit[ray]' (or pip install 'ray[default]')"
        ) from error
    if not ray.is_initialized():
        ray.init(address=address, log_to_driver=False)
    remote = ray.remote(num_cpus=cpus_per_cell, num_gpus=gpus_per_cell)(_execute)
    refs = {remote.remote(fn, cell, context): (cid, cell) for cid, cell in pending}
    remaining = list(refs)
    try:
        while remaining:
            ready, remaining = ray.wait(remaining, num_returns=1)
            for ref in ready:
                cid, cell = refs[ref]
                finish(cid, cell, ray.get(ref))
    except BaseException:
        for ref in remaining:
            ray.cancel(ref, force=True)
        raise


# --------------------------------------------------------------------------------------------- reports


def aggregate(records: Sequence[Mapping[str, Any]], metric: str) -> list[dict[str, Any]]:
    """Mean and sample std (ddof = 1) of ``metric`` over the seeds of each (η_A, η_B, rank) group.

    Failed or non-finite cells are left out of the mean and counted in ``n_bad``.
    """
    groups: dict[tuple, list[Mapping[str, Any]]] = {}
    for record in records:
        key = tuple(record["cell"].get(k) for k in GROUP_KEYS)
        groups.setdefault(key, []).append(record)
    rows = []
    for key, members in groups.items():
        values = [_value(m, metric) for m in members]
        good = [v for v in values if v is not None and math.isfinite(v)]
        losses = [_value(m, "train_loss") for m in members]
        good_loss = [v for v in losses if v is not None and math.isfinite(v)]
        rows.append(
            {
                **dict(zip(GROUP_KEYS, key, strict=True)),
                "n": len(good),
                "n_bad": len(values) - len(good),
                "mean": float(np.mean(good)) if good else math.nan,
                "std": float(np.std(good, ddof=1)) if len(good) > 1 else (0.0 if good else math.nan),
                "train_loss": float(np.mean(good_loss)) if good_loss else math.nan,
            }
        )
    return rows


def _value(record: Mapping[str, Any], metric: str) -> float | None:
    if record.get("status") == "failed":
        return None
    value = record.get("metrics", {}).get(metric)
    try:
        return None if value is None else float(value)
    except (TypeError, ValueError):
        return None


def best_row(rows: Sequence[Mapping[str, Any]], key: str, higher: bool) -> Mapping[str, Any] | None:
    """The row with the best finite ``key`` (argmax if ``higher`` else argmin), or None."""
    finite = [r for r in rows if math.isfinite(r[key])]
    if not finite:
        return None
    return max(finite, key=lambda r: r[key]) if higher else min(finite, key=lambda r: r[key])


def near_best(value: float, best: float, higher: bool, tolerance: float = 0.01) -> bool:
    """Within ``tolerance`` (relative, 1% by default) of the best value, on the good side of the margin."""
    if not (math.isfinite(value) and math.isfinite(best)):
        return False
    margin = tolerance * abs(best)
    return value >= best - margin if higher else value <= best + margin


def top_k_ratio(
    rows: Sequence[Mapping[str, Any]], k: int = 4, key: str = "mean", higher: bool = True
) -> dict:
    """LoRA+ Fig. 6 statistic: the median of η_B/η_A over the ``k`` best (η_A, η_B) cells, and its log₂."""
    finite = [r for r in rows if math.isfinite(r[key]) and r.get("eta_a") and r.get("eta_b")]
    ranked = sorted(finite, key=lambda r: r[key], reverse=higher)[: max(1, k)]
    ratios = [float(r["eta_b"]) / float(r["eta_a"]) for r in ranked]
    median = float(np.median(ratios)) if ratios else math.nan
    return {
        "k": len(ratios),
        "cells": [{"eta_a": r["eta_a"], "eta_b": r["eta_b"], key: r[key]} for r in ranked],
        "ratios": ratios,
        "median_ratio": median,
        "median_log2_ratio": math.log2(median) if ratios and median > 0 else math.nan,
    }


def compared_metric(records: Sequence[Mapping[str, Any]], metric: str = "metric") -> tuple[str, bool]:
    """``(name, higher_is_better)`` of the metric that ``metric`` ranks by: for the generic ``"metric"``,
    the ``main_metric`` the cells recorded (e.g. ``"loss"`` for a causal LM, ``"accuracy"``; several names
    are joined with "/"), else ``metric`` itself. Main metrics that go opposite ways raise ``ValueError``.
    """
    if metric != "metric":
        return metric, higher_is_better(metric)
    names = sorted(
        {
            str(r["metrics"]["main_metric"])
            for r in records
            if r.get("status") != "failed" and (r.get("metrics") or {}).get("main_metric")
        }
    )
    if not names:
        return metric, higher_is_better(metric)
    directions = {higher_is_better(n) for n in names}
    if len(directions) > 1:
        raise ValueError(
            f"sweep: the cells' main metrics {names} are not all better in the same direction; "
            "rank by one of the recorded eval_<name> metrics instead (metric='eval_<name>')"
        )
    return "/".join(names), directions.pop()


def write_reports(
    out: str | os.PathLike, records: Sequence[Mapping[str, Any]], metric: str = "metric", top_k: int = 4
) -> dict[str, Any]:
    """Write ``cells.csv``, ``grid.csv``, the heatmaps and ``sweep.json``; returns the ``sweep.json`` data.

    Cells are ranked by ``metric`` in the direction :func:`compared_metric` gives (``sweep.json`` records
    the name as ``main_metric`` and the direction as ``higher_is_better``).
    """
    out = Path(out)
    main, higher = compared_metric(records, metric)
    label = metric if main == metric else f"{metric} ({main})"
    _write_cells_csv(out / "cells.csv", records)
    rows = aggregate(records, metric)
    _write_rows_csv(out / "grid.csv", rows)
    summary: dict[str, Any] = {
        "metric": metric,
        "main_metric": main,
        "higher_is_better": higher,
        "cells": len(records),
        "ranks": {},
    }
    has_grid = rows and all(r["eta_a"] is not None and r["eta_b"] is not None for r in rows)
    for rank in sorted({r["rank"] for r in rows}, key=lambda v: (v is None, v)):
        part = [r for r in rows if r["rank"] == rank]
        best = best_row(part, "mean", higher)
        tag = "" if rank is None else f"_r{rank}"
        entry: dict[str, Any] = {
            "best": dict(best) if best else None,
            "within_1pct": [
                {"eta_a": r["eta_a"], "eta_b": r["eta_b"], "mean": r["mean"]}
                for r in part
                if best and near_best(r["mean"], best["mean"], higher)
            ],
            "top_k": top_k_ratio(part, top_k, "mean", higher) if has_grid else None,
        }
        if has_grid:
            entry["heatmap"] = plot_heatmap(
                part, "mean", out / f"heatmap_{_safe(metric)}{tag}.png", label, higher
            )
            if any(math.isfinite(r["train_loss"]) for r in part):
                entry["heatmap_train_loss"] = plot_heatmap(
                    part, "train_loss", out / f"heatmap_train_loss{tag}.png", "train loss", False
                )
        summary["ranks"][str(rank)] = entry
    if has_grid:
        summary["top_k_all_ranks"] = top_k_ratio(rows, top_k, "mean", higher)
    atomic_write_json(out / "sweep.json", summary)
    return summary


def _safe(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", text)


def _write_cells_csv(path: Path, records: Sequence[Mapping[str, Any]]) -> None:
    axes = list(dict.fromkeys(k for r in records for k in r["cell"]))
    metrics = list(dict.fromkeys(k for r in records for k in r.get("metrics", {})))
    atomic_write_csv(
        path,
        ["id", *axes, "status", *metrics, "seconds"],
        (
            [r["id"], *(r["cell"].get(a, "") for a in axes), r["status"]]
            + [r.get("metrics", {}).get(m, "") for m in metrics]
            + [r.get("seconds", "")]
            for r in records
        ),
    )


def _write_rows_csv(path: Path, rows: Sequence[Mapping[str, Any]]) -> None:
    columns = [*GROUP_KEYS, "n", "n_bad", "mean", "std", "train_loss"]
    atomic_write_csv(path, columns, ([row[c] for c in columns] for row in rows))


def plot_heatmap(
    rows: Sequence[Mapping[str, Any]],
    key: str,
    path: str | os.PathLike,
    label: str,
    higher: bool,
    tolerance: float = 0.01,
) -> dict[str, Any]:
    """Heatmap of ``key`` over η_A (rows) × η_B (columns): the η_A = η_B diagonal dashed (interpolated in
    log space, so it shows even where the two grids differ), the best cell boxed, the cells within
    ``tolerance`` of the best dotted. Writes the PNG and a JSON of the matrix beside it."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    eta_a = sorted({float(r["eta_a"]) for r in rows})
    eta_b = sorted({float(r["eta_b"]) for r in rows})
    grid = np.full((len(eta_a), len(eta_b)), np.nan)
    for r in rows:
        grid[eta_a.index(float(r["eta_a"])), eta_b.index(float(r["eta_b"]))] = r[key]
    best = best_row(rows, key, higher)
    fig, ax = plt.subplots(figsize=(1.2 + 0.75 * len(eta_b), 1.0 + 0.6 * len(eta_a)))
    shown = np.ma.masked_invalid(grid)
    image = ax.imshow(shown, origin="lower", cmap="viridis" if higher else "viridis_r", aspect="auto")
    fig.colorbar(image, ax=ax, label=label)
    near = []
    for i, j in itertools.product(range(len(eta_a)), range(len(eta_b))):
        value = grid[i, j]
        text = "nan" if not math.isfinite(value) else f"{value:.3g}"
        bright = math.isfinite(value) and image.norm(value) > 0.6
        ax.text(j, i, text, ha="center", va="center", fontsize=7, color="k" if bright else "w")
        if best is not None and near_best(value, float(best[key]), higher, tolerance):
            near.append((eta_a[i], eta_b[j]))
            ax.plot(j + 0.32, i + 0.3, "o", color="white", markersize=4, markeredgecolor="k")
    if best is not None:
        bi, bj = eta_a.index(float(best["eta_a"])), eta_b.index(float(best["eta_b"]))
        ax.add_patch(plt.Rectangle((bj - 0.5, bi - 0.5), 1, 1, fill=False, edgecolor="red", linewidth=2.5))
    diagonal = _diagonal(eta_a, eta_b)
    if diagonal is not None:
        ax.plot(diagonal[1], diagonal[0], "--", color="white", linewidth=1.2, label="η_A = η_B")
        ax.legend(loc="upper left", fontsize=7, framealpha=0.5)
    ax.set_xticks(range(len(eta_b)), [f"{v:.0e}" for v in eta_b], rotation=45, fontsize=7)
    ax.set_yticks(range(len(eta_a)), [f"{v:.0e}" for v in eta_a], fontsize=7)
    ax.set_xlabel("η_B (learning rate of B)")
    ax.set_ylabel("η_A (learning rate of A)")
    ax.set_title(f"{label}: best boxed, ○ within {tolerance:.0%} of best", fontsize=9)
    fig.tight_layout()
    numbers = {
        "quantity": label,
        "higher_is_better": higher,
        "eta_a": eta_a,
        "eta_b": eta_b,
        "values": [[None if not math.isfinite(v) else float(v) for v in row] for row in grid],
        "best": None if best is None else {"eta_a": best["eta_a"], "eta_b": best["eta_b"], key: best[key]},
        "within_tolerance": [{"eta_a": a, "eta_b": b} for a, b in near],
        "tolerance": tolerance,
    }
    path = Path(path)
    atomic_save_figure(fig, path)
    atomic_write_json(path.with_suffix(".json"), numbers)
    return {"png": str(path), "json": str(path.with_suffix(".json")), **numbers}


def _diagonal(eta_a: Sequence[float], eta_b: Sequence[float]) -> tuple[np.ndarray, np.ndarray] | None:
    """Fractional (row, column) positions of η_A = η_B over the overlap of the two log-spaced grids."""
    la, lb = np.log(eta_a), np.log(eta_b)
    low, high = max(la[0], lb[0]), min(la[-1], lb[-1])
    if low > high or len(la) < 2 or len(lb) < 2:
        return None
    points = np.linspace(low, high, 50)
    return np.interp(points, la, np.arange(len(la))), np.interp(points, lb, np.arange(len(lb)))


# ------------------------------------------------------------------------------------------ cell functions


def synthetic_cell(
    cell: Mapping[str, Any], optimum_ratio: float = 16.0, noise: float = 0.0
) -> dict[str, Any]:
    """A closed-form stand-in for a training run (for tests and for checking a Ray cluster in seconds).

    metric = exp(−(log₁₀ η_B/η_A − log₁₀ λ*)² − (log₁₀ η_A + 3.5)²/4) (+ seeded noise),
    train_loss = 1 − metric: peaked at η_B/η_A = λ* (``optimum_ratio``) and η_A = 10^-3.5.
    """
    eta_a, eta_b = float(cell["eta_a"]), float(cell["eta_b"])
    if eta_a <= 0 or eta_b <= 0:
        raise ValueError(f"synthetic_cell: learning rates must be positive, got {cell!r}")
    value = math.exp(
        -((math.log10(eta_b / eta_a) - math.log10(optimum_ratio)) ** 2) - (math.log10(eta_a) + 3.5) ** 2 / 4
    )
    if noise:
        rng = np.random.default_rng(zlib.crc32(cell_id(cell).encode()))
        value += noise * float(rng.standard_normal())
    return {"metric": value, "train_loss": 1.0 - value}


def finetune_context(base: Any, out: str | os.PathLike, method: str = "lora") -> dict[str, Any]:
    """The ``context`` of a :func:`finetune_cell` sweep writing to ``out``, with every path absolute.

    ``base`` is a ``FinetuneConfig`` or its ``to_dict()``. ``data``, ``eval_data`` and ``model`` are resolved
    against this (the driver's) working directory when they name a local path, as ``config.json`` stores
    them (:func:`lorakit.train.run.with_local_paths`), and the run folders go to ``<out>/runs`` as an
    absolute path, so a Ray or pool worker with another working directory reads the same files and writes
    where the driver records.
    """
    from lorakit.train.run import with_local_paths

    config = with_local_paths(base.to_dict() if hasattr(base, "to_dict") else base)
    return {"base": config, "runs": _absolute(os.fspath(Path(out) / "runs")), "method": method}


def finetune_cell(
    cell: Mapping[str, Any],
    base: Mapping[str, Any],
    runs: str,
    method: str = "lora",
    data_root: str | None = None,
) -> dict[str, Any]:
    """One cell as a :func:`lorakit.train.finetune` run in ``runs/<cell id>``.

    ``base`` is a ``FinetuneConfig.to_dict()``; the worker resolves relative paths in it and ``runs`` against
    its own working directory, so build the context with :func:`finetune_context` (absolute paths) when the
    cells run elsewhere (Ray). ``data_root``: the folder a relative ``data`` cell key is joined to (e.g. a
    ``data`` axis of task names). Cell keys: ``eta_a`` → ``method.lr`` and ``eta_b`` →
    ``method.ratio = η_B/η_A`` (η_B = ratio·η_A, as LoRA+ parametrises it; without them the preset's rates
    apply), ``rank``, ``method`` (preset name or ``NAME:key=value``), ``seed``, ``data`` (joined to
    ``data_root`` when relative); any other key must be a ``FinetuneConfig`` field. Returns the main eval
    metric as ``metric``, every final eval metric as ``eval_<name>``, the train loss of the last logged
    window as ``train_loss``, throughput and memory. A diverged run returns ``status="diverged"`` and NaN
    metrics (a result, not an error).
    """
    from dataclasses import fields, replace

    from lorakit.train.methods import parse_method
    from lorakit.train.run import FinetuneConfig, RunFolder, finetune
    from lorakit.train.trainer import TrainingDivergedError

    config = FinetuneConfig.from_dict(dict(base))
    spec = parse_method(str(cell.get("method", method)), config.method)
    if "rank" in cell:
        spec = replace(spec, rank=int(cell["rank"]))
    if "eta_a" in cell:
        eta_a = float(cell["eta_a"])
        eta_b = float(cell.get("eta_b", eta_a * spec.effective_ratio))
        spec = replace(spec, lr=eta_a, ratio=eta_b / eta_a)
    known = {f.name for f in fields(FinetuneConfig)}
    extra = {k: v for k, v in cell.items() if k not in ("eta_a", "eta_b", "rank", "method")}
    unknown = sorted(set(extra) - known)
    if unknown:
        raise ValueError(
            f"finetune_cell: cell key {unknown[0]!r} is neither a sweep axis nor a FinetuneConfig field"
        )
    if "data" in extra and data_root and not Path(str(extra["data"])).is_absolute():
        extra["data"] = str(Path(data_root) / str(extra["data"]))
    run_dir = Path(runs) / cell_id(cell)
    config = replace(config, **extra, method=spec, out=str(run_dir), progress=False, resume=False)
    try:
        summary = finetune(config)  # resets the peak memory counter: each cell reports its own
        status = summary.status
    except TrainingDivergedError:
        summary = RunFolder(run_dir).read_summary()  # written before the error was raised
        status = "diverged"
    final = summary.final_metrics or {}
    ok = status == "finished"
    result: dict[str, Any] = {
        "status": status,
        "metric": float(final.get(summary.main_metric, math.nan)) if ok else math.nan,
        "main_metric": summary.main_metric,
        "train_loss": _last_train_loss(run_dir) if ok else math.nan,
        "samples_per_s": summary.train_samples_per_s,
        "peak_memory_mb": summary.peak_memory_mb,
        "trainable_params": summary.trainable_params,
        "steps": summary.steps,
        "run_dir": str(run_dir),
    }
    result.update({f"eval_{k}": float(v) for k, v in final.items()})
    return result


def _last_train_loss(run_dir: Path) -> float:
    path = run_dir / "metrics.jsonl"
    loss = math.nan
    if path.exists():
        for _, record in read_jsonl(path):
            if record.get("type") == "train" and "loss" in record:
                loss = float(record["loss"])
    return loss
