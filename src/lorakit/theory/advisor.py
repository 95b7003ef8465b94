"""Rank advisor: how much LoRA rank does a real fine-tune need? (after Zeng & Lee, ICLR 2024).

For every adapted weight the update ``ΔW = W_tuned - W_base`` (or ``ΔW = s·B·A`` read from a LoRA adapter)
is decomposed by SVD and the smallest rank r is reported with

    Frobenius:  ||ΔW - LR_r(ΔW)||_F / ||ΔW||_F = sqrt(Σ_{i>r} σ_i²) / sqrt(Σ_i σ_i²) <= tol,
    spectral:   ||ΔW - LR_r(ΔW)||_2 / ||ΔW||_2 = σ_{r+1} / σ_1 <= tol

(Eckart-Young: no rank-r update does better). For a stack of G consecutive layers of the same type
(square weights) it also reports the Zeng-Lee distributed bound ``ceil(rank_tol(E) / G)`` with
``E = prod_l W_tuned,l - prod_l W_base,l``: the per-layer rank that would suffice if the group's change were
spread over its layers. That bound is a theorem only for weights that compose directly (W_{l+1} acting on
W_l's output, the paper's linear/FNN setting); same-type weights of consecutive transformer blocks have
attention, residuals and other layers between them, so for them it is a heuristic, and it can fall below a
single layer's own rank.

``numerical_rank`` counts the singular values of ΔW above round-off. For ``W_tuned - W_base`` that floor is
set by the operands, not by ΔW: the storage rounding of the tuned weight (:func:`rounding_noise`).

Weights are read from safetensors files (a file, or every ``*.safetensors`` in a folder) or, for a name that
is not a local path, from the hub through ``transformers``. Adapters (a folder with ``adapter_config.json``
and ``adapter_model.safetensors``, PEFT/lorakit layout) are read directly with safetensors; nothing is
unpickled.
"""

from __future__ import annotations

import logging
import math
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor

from lorakit.theory.rank import rounding_noise

logger = logging.getLogger(__name__)

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"


def frobenius_rank(singular_values: Tensor, tol: float) -> int:
    """Smallest r with ``sqrt(Σ_{i>r} σ_i²) <= tol · sqrt(Σ σ_i²)`` (0 for a zero matrix)."""
    energy = singular_values.double() ** 2
    total = float(energy.sum())
    if total == 0.0:
        return 0
    # tail[r] = Σ_{i>r} σ_i² for r = 0..n.
    tail = torch.cat([energy.flip(0).cumsum(0).flip(0), energy.new_zeros(1)])
    return int(torch.nonzero(tail <= (tol**2) * total)[0])


def spectral_rank(singular_values: Tensor, tol: float) -> int:
    """Smallest r with ``σ_{r+1} <= tol · σ_1`` (σ_{n+1} = 0)."""
    s = singular_values.double()
    if s.numel() == 0 or float(s[0]) == 0.0:
        return 0
    return int((s > tol * s[0]).sum())


@dataclass
class WeightReport:
    """Spectrum summary of one weight update."""

    name: str
    layer_type: str
    layer_index: int | None
    shape: tuple[int, int]
    rank_frobenius: int
    rank_spectral: int
    numerical_rank: int
    norm_frobenius: float
    singular_values: list[float] = field(repr=False)

    def as_dict(self) -> dict:
        return {**self.__dict__, "shape": list(self.shape)}


def layer_type(name: str) -> str:
    """The module's own name (last dotted component, ``.weight`` stripped), e.g. ``q_proj``."""
    parts = [p for p in name.removesuffix(".weight").split(".") if p]
    return parts[-1] if parts else name


def layer_index(name: str) -> int | None:
    """The first integer component of the module path (the block index), if any."""
    for part in name.split("."):
        if part.isdigit():
            return int(part)
    return None


def report_for(
    name: str, singular_values: Tensor, shape: tuple[int, int], tol: float, noise: float = 0.0
) -> WeightReport:
    """Ranks of one update from its singular values. ``numerical_rank`` counts those above both the
    LAPACK rule ``max(shape) · eps(float32) · σ_1`` and ``noise`` (e.g. :func:`rounding_noise` of the
    weights ΔW was taken from)."""
    s = singular_values.double()
    eps_rank = 0
    if s.numel() and s[0] > 0:
        floor = max(max(shape) * torch.finfo(torch.float32).eps * float(s[0]), noise)
        eps_rank = int((s > floor).sum())
    return WeightReport(
        name=name,
        layer_type=layer_type(name),
        layer_index=layer_index(name),
        shape=(int(shape[0]), int(shape[1])),
        rank_frobenius=frobenius_rank(s, tol),
        rank_spectral=spectral_rank(s, tol),
        numerical_rank=eps_rank,
        norm_frobenius=float(torch.linalg.vector_norm(s)),
        singular_values=[float(v) for v in s[:512]],
    )


# ----------------------------------------------------------------------------------------------- loading
def is_adapter(path: str | Path) -> bool:
    """A PEFT/lorakit adapter folder: ``adapter_config.json`` + ``adapter_model.safetensors``."""
    path = Path(path)
    return path.is_dir() and (path / ADAPTER_CONFIG).is_file() and (path / ADAPTER_WEIGHTS).is_file()


def load_state_dict(source: str | Path) -> dict[str, Tensor]:
    """Tensors of a safetensors file, of every ``*.safetensors`` in a folder, or of a hub model."""
    from safetensors.torch import load_file

    path = Path(source)
    if path.is_file():
        if path.suffix != ".safetensors":
            raise ValueError(f"{path}: expected a .safetensors file (pickled checkpoints are not read)")
        return load_file(str(path))
    if path.is_dir():
        files = sorted(path.glob("*.safetensors"))
        if not files:
            raise FileNotFoundError(
                f"{path}: no *.safetensors files in this folder (pickled .bin checkpoints are not read; "
                "convert "
                "them with transformers' save_pretrained(..., safe_serialization=True))"
            )
        state: dict[str, Tensor] = {}
        for file in files:
            state.update(load_file(str(file)))
        return state
    if str(source).startswith((".", "/", "~")) or path.suffix == ".safetensors":
        raise FileNotFoundError(f"{source}: no such file or folder")
    return _load_from_hub(str(source))


def _load_from_hub(name: str) -> dict[str, Tensor]:
    try:
        from transformers import AutoModel
    except ImportError as error:
        raise FileNotFoundError(
            f"{name}: not a local file or folder, and transformers is not installed to fetch it from the hub"
        ) from error
    logger.info("loading %s through transformers", name)
    model = AutoModel.from_pretrained(name)
    return {k: v.detach() for k, v in model.state_dict().items()}


def adapter_deltas(path: str | Path) -> dict[str, Tensor]:
    """``{module: ΔW}`` of a LoRA adapter folder, ``ΔW = s · B · A`` (float64), read by
    :func:`lorakit.analysis.adapter_io.load_adapter_factors` (PEFT's rank/alpha patterns and rsLoRA).

    Embedding adapters and ``fan_in_fan_out`` (GPT-2 Conv1D) give ΔW transposed, as in PEFT, so that
    ΔW has the base weight's shape.
    """
    from lorakit.analysis.adapter_io import load_adapter_factors

    adapter = load_adapter_factors(path)
    transposed = bool(adapter.config.get("fan_in_fan_out"))
    return {
        name: layer.delta_weight().mT if transposed or layer.kind == "embedding" else layer.delta_weight()
        for name, layer in adapter.layers.items()
    }


def _match_key(keys: Iterable[str], module: str) -> str | None:
    keys = list(keys)
    wanted = f"{module}.weight"
    if wanted in keys:
        return wanted
    # Tolerate a different top-level prefix (e.g. "bert." vs none, "model." vs none).
    candidates = [k for k in keys if k.endswith("." + wanted) or wanted.endswith("." + k)]
    return candidates[0] if len(candidates) == 1 else None


# ----------------------------------------------------------------------------------------------- analysis
@dataclass
class AdvisorResult:
    """Per-weight reports, per-type and overall summaries, and distributed (stack) bounds."""

    tol: float
    weights: list[WeightReport]
    by_type: dict[str, dict]
    overall: dict
    stacks: list[dict]

    def as_dict(self) -> dict:
        return {
            "tol": self.tol,
            "overall": self.overall,
            "by_type": self.by_type,
            "stacks": self.stacks,
            "weights": [w.as_dict() for w in self.weights],
        }


def _summarise(reports: list[WeightReport]) -> dict:
    frob = sorted(r.rank_frobenius for r in reports)
    spec = sorted(r.rank_spectral for r in reports)
    return {
        "count": len(reports),
        "rank_frobenius_median": _median(frob),
        "rank_frobenius_max": max(frob),
        "rank_spectral_median": _median(spec),
        "rank_spectral_max": max(spec),
        "numerical_rank_max": max(r.numerical_rank for r in reports),
    }


def _median(values: list[int]) -> float:
    n = len(values)
    return float(values[n // 2]) if n % 2 else (values[n // 2 - 1] + values[n // 2]) / 2


def stack_bounds(
    base: dict[str, Tensor], tuned: dict[str, Tensor], names: list[str], group_size: int, tol: float
) -> list[dict]:
    """Zeng-Lee distributed bound for consecutive same-type square layers, in groups of ``group_size``."""
    if group_size < 2:
        return []
    by_type: dict[str, list[tuple[int, str]]] = defaultdict(list)
    for name in names:
        index, weight = layer_index(name), base[name]
        if index is not None and weight.ndim == 2 and weight.shape[0] == weight.shape[1]:
            by_type[layer_type(name)].append((index, name))
    out = []
    for kind, items in sorted(by_type.items()):
        items.sort()
        for lo in range(0, len(items) - group_size + 1, group_size):
            group = items[lo : lo + group_size]
            if [i for i, _ in group] != list(range(group[0][0], group[0][0] + group_size)):
                continue  # not consecutive blocks
            base_prod = tuned_prod = None
            for _, name in group:
                b, t = base[name].double(), tuned[name].double()
                base_prod = b if base_prod is None else b @ base_prod
                tuned_prod = t if tuned_prod is None else t @ tuned_prod
            s = torch.linalg.svdvals(tuned_prod - base_prod)
            rank = frobenius_rank(s, tol)
            out.append(
                {
                    "layer_type": kind,
                    "layers": [i for i, _ in group],
                    "group_rank_frobenius": rank,
                    "distributed_rank": math.ceil(rank / group_size),
                }
            )
    return out


def advise(
    base: str | Path | dict[str, Tensor] | None,
    tuned: str | Path | dict[str, Tensor],
    tol: float = 0.1,
    group_size: int = 0,
    min_relative_change: float = 1e-8,
) -> AdvisorResult:
    """Analyse the update between ``base`` and ``tuned`` (a model or an adapter folder; see module docstring).

    Weights whose update is below ``min_relative_change`` x their norm are treated as not adapted. With an
    adapter, ``base`` is only needed for the stack bounds (``group_size >= 2``) and may be ``None``.
    """
    if not 0 < tol < 1:
        raise ValueError(f"tol: expected a relative error in (0, 1), got {tol}")
    base_state = None if base is None else (base if isinstance(base, dict) else load_state_dict(base))
    reports: list[WeightReport] = []
    stack_base: dict[str, Tensor] = {}
    stack_tuned: dict[str, Tensor] = {}
    if not isinstance(tuned, dict) and is_adapter(tuned):
        deltas = adapter_deltas(tuned)
        # Spectra from the factors are cheaper, but ΔW is already formed in float64 for modest sizes.
        for module, delta in deltas.items():
            reports.append(report_for(module, torch.linalg.svdvals(delta), tuple(delta.shape), tol))
            if base_state is not None and group_size >= 2:
                key = _match_key(base_state.keys(), module)
                if key is not None and base_state[key].shape == delta.shape:
                    stack_base[module] = base_state[key]
                    stack_tuned[module] = base_state[key].double() + delta
    else:
        if base_state is None:
            raise ValueError("base: a base model is required when the tuned model is not an adapter folder")
        tuned_state = tuned if isinstance(tuned, dict) else load_state_dict(tuned)
        for key, weight in sorted(tuned_state.items()):
            if weight.ndim != 2 or not weight.is_floating_point():
                continue
            module = key.removesuffix(".weight")
            base_key = _match_key(base_state.keys(), module)
            if base_key is None or base_state[base_key].shape != weight.shape:
                continue
            base_weight = base_state[base_key]
            delta = weight.double() - base_weight.double()
            norm = float(torch.linalg.vector_norm(base_weight.double()))
            if float(torch.linalg.vector_norm(delta)) <= min_relative_change * max(norm, 1e-30):
                continue
            eps = max(torch.finfo(weight.dtype).eps, torch.finfo(base_weight.dtype).eps)
            noise = rounding_noise(weight, eps)
            reports.append(report_for(module, torch.linalg.svdvals(delta), tuple(delta.shape), tol, noise))
            stack_base[module], stack_tuned[module] = base_state[base_key], weight
    if not reports:
        raise ValueError(
            "tuned: no adapted 2-D weight found (no LoRA factors, or no weight differs from the base)"
        )
    groups: dict[str, list[WeightReport]] = defaultdict(list)
    for report in reports:
        groups[report.layer_type].append(report)
    stacks = stack_bounds(stack_base, stack_tuned, sorted(stack_base), group_size, tol)
    return AdvisorResult(
        tol, reports, {k: _summarise(v) for k, v in sorted(groups.items())}, _summarise(reports), stacks
    )


def format_table(result: AdvisorResult) -> str:
    """Plain-text table: one row per layer type, then overall, then stack bounds."""
    head = (
        f"{'layer type':<24}{'#':>5}{'r_F med':>9}{'r_F max':>9}{'r_2 med':>9}{'r_2 max':>9}{'num.rank':>10}"
    )
    lines = [
        f"rank needed for relative error <= {result.tol:g} (F: Frobenius, 2: spectral)",
        head,
        "-" * len(head),
    ]
    rows = [*result.by_type.items(), ("overall", result.overall)]
    for name, s in rows:
        lines.append(
            f"{name:<24}{s['count']:>5}{s['rank_frobenius_median']:>9g}{s['rank_frobenius_max']:>9}"
            f"{s['rank_spectral_median']:>9g}{s['rank_spectral_max']:>9}{s['numerical_rank_max']:>10}"
        )
    if result.stacks:
        lines.append("")
        lines.append(
            "Zeng-Lee distributed bound for stacks of consecutive layers: ceil(rank_F(E_group) / G); a "
            "heuristic here: the theorem needs weights that compose directly, and attention/residuals sit "
            "between blocks"
        )
        for st in result.stacks:
            lines.append(
                f"  {st['layer_type']:<20} layers {st['layers']}: group rank {st['group_rank_frobenius']}, "
                f"per-layer {st['distributed_rank']}"
            )
    return "\n".join(lines)


def plot(result: AdvisorResult, path: str | Path) -> None:
    """Required rank per weight (Frobenius and spectral) and normalised tail-energy curves per layer type."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from lorakit.utils import atomic_save_figure

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    types = list(result.by_type)
    colors = {t: plt.cm.tab10(i % 10) for i, t in enumerate(types)}
    xs = range(len(result.weights))
    ax1.bar(
        xs, [w.rank_frobenius for w in result.weights], color=[colors[w.layer_type] for w in result.weights]
    )
    ax1.plot(xs, [w.rank_spectral for w in result.weights], "k.", label="spectral")
    ax1.set_xlabel("adapted weight (file order)")
    ax1.set_ylabel(f"rank for rel. error <= {result.tol:g}")
    ax1.legend(fontsize=7)
    for w in result.weights:
        s = torch.tensor(w.singular_values, dtype=torch.float64)
        energy = s**2
        if float(energy.sum()) == 0:
            continue
        tail = (energy.flip(0).cumsum(0).flip(0) / energy.sum()).sqrt()
        ax2.plot(range(len(tail)), tail, color=colors[w.layer_type], alpha=0.5, lw=0.8)
    ax2.axhline(result.tol, color="red", ls=":", label="tol")
    ax2.set_yscale("log")
    ax2.set_xlabel("rank r")
    ax2.set_ylabel("relative Frobenius error of LR_r(ΔW)")
    handles = [plt.Line2D([], [], color=colors[t], label=t) for t in types]
    ax2.legend(handles=handles, fontsize=7)
    atomic_save_figure(fig, path)
