"""How much time the issue's speed targets leave LoRA, against the least memory traffic LoRA needs.

Each speed target of ``throughput.py`` is a step-time budget: lorakit ≥ f × a reference's tokens/s means
lorakit's step may be at most ``t_ref / f``, that is ``t_ref / f − t_none`` ms more than the no-adapter
step. This script sets each budget (from a ``throughput.py`` JSON) beside the least time the LoRA terms can
take when they run as passes of their own beside cuBLAS's frozen GEMMs, whatever the kernels:

* forward: ``u = X·(sA)ᵀ`` reads each sibling group's input X once; ``y = X·W0ᵀ + u·Bᵀ`` needs, per
  projection, either the merged weight ``W0 + s·B A`` (read W0, write the merged copy) or a second pass
  over the T × out output (read and write it): the cheaper of the two;
* backward: ``G = dY·(sB)`` and ``dB = s·dYᵀ·u`` read each group's dY once; ``dA = s·Gᵀ·X`` (A trained)
  reads X again; the input gradient's LoRA term ``G·A`` needs the merged weight again (rebuilt, or kept
  from forward at the memory cost of a weight copy) or a pass over the T × in input gradient;
* AdamW over the float32 factors: 28 bytes per trained parameter (parameter, two moments: read and
  written; the gradient: read).

Bytes over bandwidth is a floor no kernel of this kind goes below. Three floors (:data:`FLOORS`): backward
rebuilding the merged weights; keeping them from forward (``save_merged_weight``); and also taking u as
extra output columns of the frozen forward GEMM (``x·[W'; sA]ᵀ``, so u reads no X of its own; measured
slower in benchmarks/RESULTS.md, "Folding u into the base GEMM", as its y is strided). G as extra columns of
the input-gradient GEMM saves no read, as dB still reads dY. Each floor is given with every pass from
HBM, and L2-ideal, where a re-read of an activation that fits the GPU's L2 cache is free (it only pays
for the part beyond the L2 size). Kernels that read X and dY inside the frozen GEMMs (the ``folded``
strategy, ``triton_gemm.py``) are not bound by these floors, but by their GEMM's speed against cuBLAS.

The script also counts the peak-memory target's state: the float32 factors and AdamW moments the issue
asks for, against PEFT-bf16's bf16 ones, beside every activation LoRA itself keeps (``u``, T × r per
projection).

Two steps, the first on the GPU that ran ``throughput.py``, the second anywhere:

    PYTHONPATH=src python3 benchmarks/lora_floor.py measure --out out/bandwidth.json
    PYTHONPATH=src python3 benchmarks/lora_floor.py budget --throughput out/eager.json out/compile.json \\
        --hardware out/bandwidth.json --out out/floor.json
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from kernel_bench import bench_ms
from throughput import write_report

from lorakit.utils import atomic_write_json

LOG = logging.getLogger("lora_floor")
MiB = 2**20
#: NVIDIA's figure for the H100 SXM5 80GB's HBM3 bandwidth; the budget step takes the measured one as well.
H100_SXM_TBPS = 3.35
#: the spec of throughput.py's model, for a JSON without one
DEFAULT_SPEC = {
    "layers": 16,
    "hidden": 2048,
    "intermediate": 8192,
    "heads": 32,
    "kv_heads": 8,
    "batch": 4,
    "seq": 2048,
    "rank": 16,
}
#: (variant, reference, factor, modes): lorakit's variant must reach factor × the reference's tokens/s
TARGETS = (
    ("lorakit", "no-adapter", 0.95, ("eager", "compile")),
    ("lorakit", "peft-bf16", 1.25, ("eager",)),
    ("lorakit", "peft-bf16", 1.18, ("compile",)),
    ("lorakit", "peft-default", 2.0, ("eager",)),
    ("lorakit-frozenA", "no-adapter", 0.97, ("eager", "compile")),
)


@dataclass(frozen=True)
class Group:
    """Adapted projections that read one input (q/k/v, gate/up) or a lone one: in features, and the out
    features of each projection."""

    name: str
    in_features: int
    out_features: tuple[int, ...]


def llama_groups(spec: dict) -> list[Group]:
    """The adapted projections of one Llama decoder layer, grouped by the input they read."""
    head_dim = spec["hidden"] // spec["heads"]
    kv = spec["kv_heads"] * head_dim
    hidden, inter = spec["hidden"], spec["intermediate"]
    return [
        Group("q/k/v", hidden, (spec["heads"] * head_dim, kv, kv)),
        Group("o", spec["heads"] * head_dim, (hidden,)),
        Group("gate/up", hidden, (inter, inter)),
        Group("down", inter, (hidden,)),
    ]


def factor_counts(spec: dict) -> tuple[int, int]:
    """(elements of every A, elements of every B) in the model."""
    rank, layers = spec["rank"], spec["layers"]
    groups = llama_groups(spec)
    a = layers * rank * sum(g.in_features * len(g.out_features) for g in groups)
    b = layers * rank * sum(sum(g.out_features) for g in groups)
    return a, b


def pass_bytes(spec: dict, train_a: bool, l2_bytes: int = 0, element: int = 2) -> dict[str, int]:
    """Least bytes per training step of each pass LoRA adds (module docstring), ``element`` bytes per
    activation and weight element. A re-read of an activation costs only its part beyond ``l2_bytes``."""
    tokens, rank = spec["batch"] * spec["seq"], spec["rank"]

    def reread(nbytes: int) -> int:
        return max(0, nbytes - l2_bytes)

    parts = dict.fromkeys(("u", "merge", "G and dB", "dA", "dX term, rebuilt", "AdamW"), 0)
    for group in llama_groups(spec):
        x = tokens * group.in_features * element
        rank_r = tokens * rank * len(group.out_features) * element  # u or G of every projection
        parts["u"] += reread(x) + rank_r
        parts["G and dB"] += reread(tokens * sum(group.out_features) * element) + rank_r
        if train_a:
            parts["dA"] += reread(x) + rank_r
        weights = 0
        for out in group.out_features:
            weight = 2 * out * group.in_features * element  # read W0, write the merged copy
            parts["merge"] += min(weight, 2 * tokens * out * element)  # or read and write y
            weights += weight
        parts["dX term, rebuilt"] += min(weights, 2 * x)  # or read and write the group's one dX
    parts = {name: value * spec["layers"] for name, value in parts.items()}
    a, b = factor_counts(spec)
    parts["AdamW"] = 28 * (b + (a if train_a else 0))
    return parts


#: floor → the passes it leaves out: backward rebuilding the merged weights (``rebuilt``), keeping them from
#: forward (``kept``), and also taking u as extra output columns of the frozen forward GEMM (``stacked``)
FLOORS = {"rebuilt": (), "kept": ("dX term, rebuilt",), "stacked": ("dX term, rebuilt", "u")}


def floor_ms(parts: dict[str, int], tbps: float, floor: str) -> float:
    """Milliseconds to move ``parts`` at ``tbps`` TB/s, less the passes :data:`FLOORS` leaves out."""
    return sum(v for k, v in parts.items() if k not in FLOORS[floor]) / (tbps * 1e12) * 1e3


def state_over_peft(spec: dict, train_a: bool) -> dict[str, float]:
    """MiB of float32 state over PEFT-bf16's bf16 state at the peak (factors and AdamW moments; gradients
    are freed before the next forward), and MiB of every activation LoRA keeps (``u``, T × r bf16 per
    projection), which PEFT keeps as well."""
    a, b = factor_counts(spec)
    extra = 2  # float32 over bf16, bytes per element
    trained = b + (a if train_a else 0)
    frozen = 0 if train_a else a
    projections = sum(len(g.out_features) for g in llama_groups(spec))
    u = spec["layers"] * projections * spec["batch"] * spec["seq"] * spec["rank"] * 2
    return {
        "trained factors": trained * extra / MiB,
        "AdamW moments": 2 * trained * extra / MiB,
        "frozen factors": frozen * extra / MiB,
        "total": 3 * trained * extra / MiB + frozen * extra / MiB,
        "LoRA's own activations (u)": u / MiB,
    }


# ------------------------------------------------------------------------------------------------ measure
def measure(out: Path) -> int:
    """Copy bandwidth (read + write of 1 GiB, :func:`kernel_bench.bench_ms`'s median) and L2 size of the
    current GPU."""
    if not torch.cuda.is_available():
        LOG.error("measure needs a CUDA GPU")
        return 2
    src = torch.empty(2**30, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    seconds = bench_ms(lambda: dst.copy_(src), 500) / 1e3
    props = torch.cuda.get_device_properties(0)
    result = {
        "gpu": props.name,
        "copy_tbps": 2 * src.numel() / seconds / 1e12,
        "l2_bytes": props.L2_cache_size,
        "torch": torch.__version__,
    }
    atomic_write_json(out, result)
    LOG.info("%s", result)
    return 0


# ------------------------------------------------------------------------------------------------- budget
def step_ms(runs: list[dict], variant: str, mode: str) -> float | None:
    """Median step of ``variant`` in ``mode`` (the first such row)."""
    row = next(
        (r for r in runs if r["variant"] == variant and r["mode"] == mode and not r.get("sweep")), None
    )
    return None if row is None else row["step_ms"]


def budgets(runs: list[dict], parts: dict, tbps: dict[str, float]) -> list[dict]:
    """One row per target whose no-adapter and reference runs are in ``runs``: the ms it allows LoRA over
    no-adapter, what LoRA took (None where it did not run), and, from ``parts`` (:func:`pass_bytes` by
    ``train_a`` and by ``(train_a, "l2")``), the floors of :func:`floor_ms` (each of :data:`FLOORS`, from
    HBM and L2-ideal, at each bandwidth of ``tbps``) as ``floor_{hbm|l2}_{floor}_{bandwidth}``."""
    rows = []
    for variant, reference, factor, modes in TARGETS:
        for mode in modes:
            none, ref, got = (step_ms(runs, v, mode) for v in ("no-adapter", reference, variant))
            if none is None or ref is None:
                continue
            train_a = variant == "lorakit"
            allowed = ref / factor - none
            row = {
                "mode": mode,
                "target": f"{variant} ≥ {factor:g} × {reference}",
                "allowed_ms": allowed,
                "taken_ms": None if got is None else got - none,
                "no_adapter_ms": none,
            }
            for label, bandwidth in tbps.items():
                for memory, floor_parts in (("hbm", parts[train_a]), ("l2", parts[(train_a, "l2")])):
                    for floor in FLOORS:
                        row[f"floor_{memory}_{floor}_{label}"] = floor_ms(floor_parts, bandwidth, floor)
            rows.append(row)
    return rows


def verdict(row: dict) -> str:
    """Where a target's budget stands against the HBM floors at the measured copy bandwidth."""
    allowed = row["allowed_ms"]
    if allowed <= 0:
        return "impossible: the budget is below the no-adapter step"
    if allowed < row["floor_hbm_stacked_measured"]:
        return (
            "below every floor: only LoRA's reads inside the frozen GEMMs' kernels, or from L2, could meet it"
        )
    if allowed < row["floor_hbm_kept_measured"]:
        return "only with u from the frozen GEMM and the merged weights kept, every pass at copy bandwidth"
    if allowed < row["floor_hbm_rebuilt_measured"]:
        return "only with the merged weights kept, every pass at copy bandwidth"
    return f"{allowed - row['floor_hbm_rebuilt_measured']:.2f} ms above the floor"


def render(report: dict) -> str:
    hw, nominal = report["hardware"], report["nominal_tbps"]
    lines = [
        f"GPU {hw['gpu']}: copy bandwidth {hw['copy_tbps']:.2f} TB/s measured, {nominal:.2f} TB/s nominal; "
        f"L2 {hw['l2_bytes'] / MiB:.0f} MiB. Floors in ms: merged weights rebuilt / kept / kept with u "
        "stacked (at the measured bandwidth, then at the nominal one); L2-ideal: kept, measured bandwidth.",
        "",
        "| mode | target | allowed ms | taken ms | floor, measured | floor, nominal | L2-ideal | verdict |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for row in report["budgets"]:
        taken = "–" if row["taken_ms"] is None else f"{row['taken_ms']:.2f}"
        floors = " | ".join(
            " / ".join(f"{row[f'floor_hbm_{floor}_{label}']:.2f}" for floor in FLOORS)
            for label in ("measured", "nominal")
        )
        lines.append(
            f"| {row['mode']} | {row['target']} | {row['allowed_ms']:.2f} | {taken} | {floors} "
            f"| {row['floor_l2_kept_measured']:.2f} | {verdict(row)} |"
        )
    lines += ["", "Bytes per step by pass (GB, every pass from HBM):", ""]
    lines += ["| pass | A trained | A frozen |", "|---|---|---|"]
    for name in report["pass_bytes"]["trained"]:
        trained, frozen = report["pass_bytes"]["trained"][name], report["pass_bytes"]["frozen"][name]
        lines.append(f"| {name} | {trained / 1e9:.2f} | {frozen / 1e9:.2f} |")
    lines += ["", "Float32 state over PEFT-bf16's bf16 state, MiB:", ""]
    lines += ["| | A trained | A frozen |", "|---|---|---|"]
    state = report["state_mib"]
    for name in state["trained"]:
        lines.append(f"| {name} | {state['trained'][name]:.1f} | {state['frozen'][name]:.1f} |")
    return "\n".join(lines) + "\n"


def plot(report: dict, path: Path) -> None:
    """Allowed, taken and floor ms per target (the HBM floors at the measured copy bandwidth)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from lorakit.utils import atomic_save_figure

    rows = report["budgets"]
    labels = [f"{r['mode']}\n{r['target'].replace(' ≥ ', chr(10) + '≥ ')}" for r in rows]
    series = {
        "allowed": [r["allowed_ms"] for r in rows],
        "taken": [r["taken_ms"] or 0.0 for r in rows],
        "floor, merged weights rebuilt": [r["floor_hbm_rebuilt_measured"] for r in rows],
        "floor, kept": [r["floor_hbm_kept_measured"] for r in rows],
        "floor, kept, u stacked": [r["floor_hbm_stacked_measured"] for r in rows],
    }
    fig, ax = plt.subplots(figsize=(max(8, 1.5 * len(rows)), 4.5))
    width = 0.8 / len(series)
    for i, (name, values) in enumerate(series.items()):
        ax.bar([x + i * width for x in range(len(rows))], values, width, label=name)
    ax.axhline(0, color="black", linewidth=0.8)
    ax.set_xticks([x + 0.4 - width / 2 for x in range(len(rows))], labels, fontsize=7)
    ax.set_ylabel("ms per step over no-adapter")
    ax.set_title(f"LoRA's time budget per target ({report['hardware']['gpu']})")
    top = max(max(values) for values in series.values())
    ax.set_ylim(top=1.35 * top)  # room for the legend above the bars
    ax.legend(fontsize=8, ncol=3, loc="upper left")
    atomic_save_figure(fig, path)


def read_inputs(throughput: Sequence[Path], hardware: Path) -> tuple[list[dict], dict, dict]:
    """(the timed runs of every ``throughput`` JSON, the ``hardware`` JSON, their one model spec); a file
    that is not what it should be raises ``ValueError`` naming it."""
    runs = []
    for path in throughput:
        report = json.loads(path.read_text(encoding="utf-8"))
        if not isinstance(report, dict) or not isinstance(report.get("runs"), list):
            raise ValueError(f"{path}: not a throughput.py JSON (expected an object with a 'runs' list)")
        runs += [run for run in report["runs"] if not run.get("sweep")]
    specs = {json.dumps(run["spec"], sort_keys=True) for run in runs}
    if len(specs) > 1:
        raise ValueError(
            f"{', '.join(map(str, throughput))}: runs of {len(specs)} model specs; give one spec"
        )
    hw = json.loads(hardware.read_text(encoding="utf-8"))
    missing = [key for key in ("gpu", "copy_tbps", "l2_bytes") if key not in hw]
    if missing:
        raise ValueError(f"{hardware}: missing {', '.join(missing)} (write it with 'lora_floor.py measure')")
    return runs, hw, {**DEFAULT_SPEC, **(runs[0]["spec"] if runs else {})}


def budget(throughput: Sequence[Path], hardware: Path, nominal_tbps: float, out: Path) -> int:
    runs, hw, spec = read_inputs(throughput, hardware)
    parts = {train_a: pass_bytes(spec, train_a) for train_a in (True, False)} | {
        (train_a, "l2"): pass_bytes(spec, train_a, hw["l2_bytes"]) for train_a in (True, False)
    }
    report = {
        "spec": spec,
        "hardware": hw,
        "nominal_tbps": nominal_tbps,
        "throughput": [str(p) for p in throughput],
        "budgets": budgets(runs, parts, {"nominal": nominal_tbps, "measured": hw["copy_tbps"]}),
        "pass_bytes": {"trained": parts[True], "frozen": parts[False]},
        "state_mib": {"trained": state_over_peft(spec, True), "frozen": state_over_peft(spec, False)},
    }
    text = render(report)
    write_report(out, report, text)
    plot(report, out.with_suffix(".png"))
    sys.stdout.write(text)
    return 0


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    commands = parser.add_subparsers(dest="command", required=True)
    measured = commands.add_parser("measure", help="copy bandwidth and L2 size of this GPU")
    measured.add_argument("--out", type=Path, default=Path("out/bandwidth.json"), help="JSON to write")
    budgeted = commands.add_parser("budget", help="each target's time budget against the floors")
    budgeted.add_argument("--throughput", type=Path, nargs="+", required=True, help="throughput.py JSON(s)")
    budgeted.add_argument("--hardware", type=Path, required=True, help="JSON written by 'measure'")
    budgeted.add_argument("--nominal-tbps", type=float, default=H100_SXM_TBPS, help="the GPU's rated TB/s")
    budgeted.add_argument("--out", type=Path, default=Path("out/floor.json"), help="JSON (.md, .png beside)")
    args = parser.parse_args(argv)
    if args.command == "measure":
        return measure(args.out)
    try:
        return budget(args.throughput, args.hardware, args.nominal_tbps, args.out)
    except (OSError, ValueError) as error:  # json.JSONDecodeError is a ValueError
        LOG.error("%s", error)
        return 2


if __name__ == "__main__":
    sys.exit(main())
