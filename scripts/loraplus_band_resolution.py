"""Is the near-best λ band of the LoRA+ GD toy a property of the toy, or of the grid that measures it?

``lorakit reproduce loraplus`` checks ``suggest_ratio`` against the band of λ = η_B/η_A whose seed-mean train
loss at t = 200 is within 1% of the best: a 1/8-decade λ scan at the best grid η_A (0.01) gives [4.87, 6.49].
This script trains the same toy (``lorakit.experiments.loraplus_toy``, same problem draws, full-batch GD) on
a finer grid, λ at ``--lam-per-decade`` points per decade times η_A at ``--eta-per-decade``, for each seed
separately, and reports:

* the band at the reproduction's resolution (every ``lam-per-decade/8``-th λ at η_A = 0.01, ± half a
  1/8-decade step) and at the fine resolution (± half a fine step), both from the mean over ``--band-seeds``
  seeds (the reproduction's 3);
* per seed: the best cell, its λ, and the fine-grid λ values within 1% of that seed's best;
* the fine band pooled over the first k seeds, for every k;
* the median over seeds of each λ's regret, min over η_A of the loss over the seed's best, minus 1;
* with ``--reproduction``, the same regrets at each ``suggest_ratio`` value of that reproduction.

Losses are saved per seed as they finish (rerun the same command to resume; ``--workers`` runs seeds in
parallel processes), then the summary is written as JSON with a PNG beside it.

    lorakit reproduce loraplus --out out/lp_quick
    python scripts/loraplus_band_resolution.py --workers 6 --reproduction out/lp_quick/loraplus_toy.json \
        --out out/band_resolution.json
"""

from __future__ import annotations

import argparse
import logging
import math
from concurrent.futures import ProcessPoolExecutor, as_completed
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from lorakit.experiments.loraplus_toy import make_problem, train_configs
from lorakit.utils import atomic_save_figure, atomic_write_json, read_json

logger = logging.getLogger("loraplus_band_resolution")

#: the reproduction's λ scan: 8 points per decade at the best grid η_A
COARSE_PER_DECADE = 8
COARSE_ETA_A = 0.01


def seed_losses(seed: int, etas: np.ndarray, lams: np.ndarray, steps: int) -> np.ndarray:
    """Train loss after ``steps`` GD steps, (len(etas), len(lams)); inf where the run diverged."""
    problem = make_problem(100, n_train=1000, n_test=100, seed=seed)
    eta_a, lam = (m.ravel() for m in np.meshgrid(etas, lams, indexing="ij"))
    result = train_configs(problem, eta_a, eta_a * lam, steps, "gd", [steps], delta_steps=[])
    return result.train_loss[:, 0].reshape(len(etas), len(lams))


def band(lams: np.ndarray, loss: np.ndarray, per_decade: float, tolerance: float) -> dict[str, Any]:
    """λ values of ``loss`` (λ-indexed, already minimised over η_A where that applies) within ``tolerance``
    of its best, and their hull widened by half a step, as the reproduction reports its band."""
    best = float(np.min(loss))
    near = lams[np.isfinite(loss) & (loss <= best * (1.0 + tolerance))]
    half = 10.0 ** (0.5 / per_decade)
    return {
        "best_loss": best,
        "best_ratio": float(lams[int(np.argmin(loss))]),
        "points": near.tolist(),
        "band": [float(near.min() / half), float(near.max() * half)] if len(near) else None,
    }


def summarise(etas: np.ndarray, lams: np.ndarray, losses: dict[int, np.ndarray], args) -> dict[str, Any]:
    seeds = sorted(losses)
    pooled = np.mean([losses[s] for s in seeds[: args.band_seeds]], axis=0)  # inf where any seed diverged
    # min over η_A of the mean over the first k seeds, k = 1..N (index k − 1)
    envelopes = [
        np.mean([losses[s] for s in seeds[:k]], axis=0).min(axis=0) for k in range(1, len(seeds) + 1)
    ]
    by_count = {
        str(k): band(lams, envelope, args.lam_per_decade, args.tolerance)
        for k, envelope in enumerate(envelopes, 1)
    }
    step = round(args.lam_per_decade / COARSE_PER_DECADE)
    row = int(np.argmin(np.abs(np.log10(etas / COARSE_ETA_A))))
    per_seed, regrets = {}, []
    for seed in seeds:
        envelope = losses[seed].min(axis=0)
        i, j = np.unravel_index(int(np.argmin(losses[seed])), losses[seed].shape)
        near = band(lams, envelope, args.lam_per_decade, args.tolerance)
        per_seed[str(seed)] = {
            "best_loss": float(losses[seed][i, j]),
            "best_eta_A": float(etas[i]),
            "best_ratio": float(lams[j]),
            "near_best_ratios": near["points"],
            "diverged_fraction": float(np.mean(~np.isfinite(losses[seed]))),
        }
        if np.isfinite(near["best_loss"]):
            regrets.append(envelope / near["best_loss"] - 1.0)
    return {
        "settings": {
            "seeds": seeds,
            "band_seeds": seeds[: args.band_seeds],
            "steps": args.steps,
            "tolerance": args.tolerance,
            "eta_A": etas.tolist(),
            "ratios": lams.tolist(),
        },
        "band_coarse": {
            "eta_A": float(etas[row]),
            "per_decade": COARSE_PER_DECADE,
            "scan_ratios": lams[::step].tolist(),
            "scan_loss": pooled[row, ::step].tolist(),
            **band(lams[::step], pooled[row, ::step], COARSE_PER_DECADE, args.tolerance),
        },
        "band_fine": by_count[str(args.band_seeds)],
        # the same fine band pooled over the first k seeds, k = 1..N: how much the target moves with k
        "band_fine_by_seed_count": by_count,
        "pooled_envelope": envelopes[args.band_seeds - 1].tolist(),
        "pooled_envelope_all_seeds": envelopes[-1].tolist(),
        "per_seed": per_seed,
        "median_regret": np.median(regrets, axis=0).tolist() if regrets else None,
        "seed_regrets": [r.tolist() for r in regrets],
    }


def score_suggestions(result: dict[str, Any], reproduction: dict[str, Any]) -> dict[str, Any]:
    """Regret of each ``suggest_ratio`` value of a reproduction at t = T (every step, and the default 10%
    skip) at the nearest scanned λ: on the pooled envelope, and the median over seeds. None outside the
    scanned range (more than half a step beyond its ends)."""
    lams = np.asarray(result["settings"]["ratios"])
    half_step = math.log10(lams[1] / lams[0]) / 2 if len(lams) > 1 else 0.0
    pooled = np.asarray(result["pooled_envelope"])
    per_seed = np.asarray(result["seed_regrets"])
    check = reproduction["ratio_suggestion_check"]
    steps = str(max(int(t) for t in check["by_step"]))
    scored = {}
    for criterion, found in check["by_step"][steps]["suggestions"].items():
        for suffix, key in (("", "ratio"), (" (default skip)", "ratio_default_skip")):
            ratio = found[key]
            distance = np.abs(np.log10(lams / ratio))
            j = int(np.argmin(distance))
            inside = bool(distance[j] <= half_step + 1e-12)
            scored[criterion + suffix] = {
                "ratio": ratio,
                "inside_band_by_seed_count": {
                    k: found_band["band"] is not None
                    and found_band["band"][0] <= ratio <= found_band["band"][1]
                    for k, found_band in result["band_fine_by_seed_count"].items()
                },
                "nearest_scanned": float(lams[j]) if inside else None,
                "pooled_regret": float(pooled[j] / pooled.min() - 1.0) if inside else None,
                "median_seed_regret": float(np.median(per_seed[:, j])) if inside and len(per_seed) else None,
            }
    return scored


def plot(result: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    lams = np.asarray(result["settings"]["ratios"])
    fig, (left, right) = plt.subplots(1, 2, figsize=(16, 4.8))
    for regret in result["seed_regrets"]:
        left.plot(lams, np.asarray(regret) * 100, color="0.7", lw=0.8)
    if result["median_regret"] is not None:
        left.plot(
            lams, np.asarray(result["median_regret"]) * 100, color="black", lw=2, label="median over seeds"
        )
    left.set_yscale("symlog", linthresh=1.0)
    left.set_ylim(bottom=0.0)
    left.set(
        xscale="log",
        xlabel="λ = η_B/η_A",
        ylabel="regret, % over the seed's best (min over η_A)",
        title="per seed (grey)",
    )
    left.legend()
    seeds = result["settings"]["band_seeds"]
    every = len(result["settings"]["seeds"])
    coarse = result["band_coarse"]
    lines = (
        (
            lams,
            result["pooled_envelope"],
            "o-",
            f"mean of seeds 0–{len(seeds) - 1}, min over η_A (fine grid)",
        ),
        (
            coarse["scan_ratios"],
            coarse["scan_loss"],
            "s--",
            f"same, 1/8-decade scan at η_A = {coarse['eta_A']:.3g}",
        ),
        (
            lams,
            result["pooled_envelope_all_seeds"],
            "^-",
            f"mean of seeds 0–{every - 1}, min over η_A (fine grid)",
        ),
    )
    for x, y, style, label in lines:
        right.plot(x, y, style, ms=3, label=label)
    bands = (
        ("tab:orange", coarse["band"], f"{len(seeds)} seeds, 1/8-decade scan"),
        ("tab:green", result["band_fine"]["band"], f"{len(seeds)} seeds, fine grid"),
        ("tab:purple", result["band_fine_by_seed_count"][str(every)]["band"], f"{every} seeds, fine grid"),
    )
    for colour, found, label in bands:
        if found is not None:
            right.axvspan(
                *found, color=colour, alpha=0.3, label=f"within 1%, {label}: {found[0]:.3g}–{found[1]:.3g}"
            )
    for name, found in result.get("suggestions", {}).items():
        if found["nearest_scanned"] is not None and "default skip" not in name:
            right.axvline(found["ratio"], color="red", ls=":", lw=1)
            right.annotate(name, (found["ratio"], 1.0), xycoords=("data", "axes fraction"), rotation=90,
                           va="top", ha="right", fontsize=7, color="red")  # fmt: skip
    right.set(
        xscale="log",
        yscale="log",
        xlabel="λ = η_B/η_A",
        ylabel=f"train loss at t = {result['settings']['steps']}",
    )
    right.set_title("seed-mean loss (inf where a seed diverged), within-1% bands")
    right.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.02, 1.0))
    atomic_save_figure(fig, path)


def _same_key(stored: dict[str, Any] | None, key: dict[str, Any]) -> bool:
    """The cached losses are for this grid: same steps, same axes up to rounding (another machine's numpy
    may round 10**x in the last bit)."""
    return (
        stored is not None
        and stored["steps"] == key["steps"]
        and all(
            len(stored[axis]) == len(key[axis]) and np.allclose(stored[axis], key[axis], rtol=1e-12, atol=0)
            for axis in ("eta_A", "ratios")
        )
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="out/band_resolution.json", help="JSON to write (PNG beside it)")
    parser.add_argument("--seeds", type=int, default=6, help="seeds 0..N-1 (default 6)")
    parser.add_argument("--band-seeds", type=int, default=3, help="seeds averaged for the band (default 3)")
    parser.add_argument("--steps", type=int, default=200, help="GD steps (default 200)")
    parser.add_argument("--eta-range", type=float, nargs=2, default=(-2.75, -1.25), help="log10 η_A range")
    parser.add_argument("--eta-per-decade", type=int, default=16, help="η_A points per decade (default 16)")
    parser.add_argument("--lam-range", type=float, nargs=2, default=(-0.5, 1.75), help="log10 λ range")
    parser.add_argument("--lam-per-decade", type=int, default=32, help="λ points per decade (default 32)")
    parser.add_argument("--tolerance", type=float, default=0.01, help="near-best tolerance (default 1%%)")
    parser.add_argument("--workers", type=int, default=1, help="processes, one seed each (default 1)")
    parser.add_argument("--threads", type=int, default=2, help="torch threads per process (default 2)")
    parser.add_argument(
        "--reproduction",
        type=Path,
        help="a loraplus_toy.json of 'lorakit reproduce loraplus': its suggest_ratio values are scored too",
    )
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if args.lam_per_decade % COARSE_PER_DECADE:
        parser.error(f"--lam-per-decade must be a multiple of {COARSE_PER_DECADE}")
    if not 1 <= args.band_seeds <= args.seeds:
        parser.error("--band-seeds must lie in [1, --seeds]")

    def axis(lo: float, hi: float, per_decade: int) -> np.ndarray:
        return 10.0 ** (np.arange(round((hi - lo) * per_decade) + 1) / per_decade + lo)

    etas = axis(*args.eta_range, args.eta_per_decade)
    lams = axis(*args.lam_range, args.lam_per_decade)
    if not np.any(np.isclose(etas, COARSE_ETA_A)):
        parser.error(f"--eta-range/--eta-per-decade must put a grid point at η_A = {COARSE_ETA_A}")
    out = Path(args.out)
    partial = out.with_suffix(".seeds.json")
    key = {"steps": args.steps, "eta_A": etas.tolist(), "ratios": lams.tolist()}
    cached = read_json(partial) if partial.exists() else {}
    stored = cached.get("losses", {}) if _same_key(cached.get("key"), key) else {}
    done = {int(s): np.asarray(v, dtype=float) for s, v in stored.items()}  # null -> nan
    todo = [seed for seed in range(args.seeds) if seed not in done]
    with ProcessPoolExecutor(
        args.workers, initializer=torch.set_num_threads, initargs=(args.threads,)
    ) as pool:
        futures = {pool.submit(seed_losses, seed, etas, lams, args.steps): seed for seed in todo}
        for future in tqdm(as_completed(futures), total=len(todo), desc="seeds"):
            done[futures[future]] = future.result()
            # a diverged run (inf) is stored as null: strict JSON
            rows = {
                str(s): [[x if math.isfinite(x) else None for x in r] for r in v.tolist()]
                for s, v in sorted(done.items())
            }
            atomic_write_json(partial, {"key": key, "losses": rows})
    losses = {s: np.where(np.isnan(v), math.inf, v) for s, v in done.items()}
    result = summarise(etas, lams, {s: losses[s] for s in range(args.seeds)}, args)
    if args.reproduction is not None:
        result["suggestions"] = score_suggestions(result, read_json(args.reproduction))
    atomic_write_json(out, result)
    plot(result, out.with_suffix(".png"))
    for name in ("band_coarse", "band_fine"):
        found = result[name]
        logger.info("%s: best λ %.3g, band %s", name, found["best_ratio"], found["band"])
    for k, found in result["band_fine_by_seed_count"].items():
        logger.info(
            "fine band over seeds 0..%d: points %s", int(k) - 1, [round(v, 3) for v in found["points"]]
        )
    for seed, found in result["per_seed"].items():
        logger.info("seed %s: best λ %.3g at η_A %.3g", seed, found["best_ratio"], found["best_eta_A"])
    for name, found in result.get("suggestions", {}).items():
        inside = [k for k, hit in found["inside_band_by_seed_count"].items() if hit]
        logger.info(
            "suggestion %s: λ %.3g, regret %s; inside the fine band pooled over k seeds for k in %s",
            name,
            found["ratio"],
            found["pooled_regret"],
            inside,
        )
    logger.info("wrote %s and %s", out, out.with_suffix(".png"))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
