"""``LoraConfig``: what to adapt and how, validated when it is built.

Every field is checked in ``__post_init__`` and a bad value raises ``ValueError`` naming the field and
what is expected, so a typo fails before a model is touched.
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

SCALINGS = ("standard", "rslora")
TRAINABLE_FACTORS = ("AB", "A", "B")
KERNELS = ("fused", "reference")


@dataclass
class LoraConfig:
    """Configuration of a LoRA injection.

    The adapted forward of a targeted layer is ``y = W0 x + s · B A dropout(x)`` with
    ``A ∈ R^{r×in}``, ``B ∈ R^{out×r}`` and ``s = alpha / r`` (``scaling="standard"``, Hu et al. 2021)
    or ``s = alpha / sqrt(r)`` (``scaling="rslora"``, Kalajdzievski 2023).

    Args:
        r: LoRA rank (≥ 1).
        alpha: numerator of the scale ``s``.
        scaling: ``"standard"`` (α/r) or ``"rslora"`` (α/√r).
        dropout: dropout probability on the LoRA path's input, in [0, 1).
        targets: which modules to adapt. ``"all-linear"`` (every Linear/Conv1D except the output head),
            or a name / list of names, each matched as: ``"re:<regex>"`` (full match of the module path),
            a glob with ``*?[`` (full match), or an exact path or dotted suffix (``"q_proj"`` matches
            ``model.layers.0.self_attn.q_proj``).
        exclude: names matched like ``targets`` that are never adapted.
        init: name of an init scheme from :mod:`lorakit.adapters.init` (``"lora"`` default).
        train: which factors are trainable: ``"AB"``, ``"A"`` or ``"B"``. A frozen factor is a buffer,
            never a parameter, so no optimizer or ``requires_grad_`` call can update it.
        rank_pattern / alpha_pattern: per-module overrides of ``r`` / ``alpha``, keys matched like
            ``targets``; the first matching key wins.
        modules_to_save: modules trained in full and saved with the adapter (e.g. ``["classifier"]``).
        seed: seed of the adapter initialisation; each module draws from a generator seeded by
            ``(seed, module path)``.
        kernel: ``"fused"`` (default: the fused autograd path of :mod:`lorakit.adapters.fused`) or
            ``"reference"`` (plain PyTorch ops).
        save_merged_weight: fused kernel only: keep each merged weight ``W0 + s·B A`` from forward for
            backward where backward would rebuild it. Trades a copy of those weights in memory (held until
            backward) for one pass fewer over them per step (H100, 16-layer Llama at hidden 2048, eager:
            +0.8 GiB peak; benchmarks/RESULTS.md).
        group_siblings: fused kernel only: adapted linears under one parent that read the same input
            tensor (q/k/v, gate/up) run as one group, with one pass over the input for all their rank-r
            products and their input gradients summed inside the GEMMs (:mod:`lorakit.adapters.grouped`).
            The same function either way; which layers share an input is found on the first forward. In
            eager only (not under ``torch.compile`` or non-reentrant activation checkpointing).
    """

    r: int = 8
    alpha: float = 16.0
    scaling: str = "standard"
    dropout: float = 0.0
    targets: str | Sequence[str] = "all-linear"
    exclude: Sequence[str] = ()
    init: str = "lora"
    train: str = "AB"
    rank_pattern: Mapping[str, int] = field(default_factory=dict)
    alpha_pattern: Mapping[str, float] = field(default_factory=dict)
    modules_to_save: Sequence[str] = ()
    seed: int = 0
    kernel: str = "fused"
    save_merged_weight: bool = False
    group_siblings: bool = True

    def __post_init__(self) -> None:
        from lorakit.adapters.init import INIT_SCHEMES

        _check_rank("r", self.r)
        _check_alpha("alpha", self.alpha)
        _check_choice("scaling", self.scaling, SCALINGS)
        _check_choice("train", self.train, TRAINABLE_FACTORS)
        _check_choice("kernel", self.kernel, KERNELS)
        _check_choice("init", self.init, tuple(INIT_SCHEMES))
        if not isinstance(self.dropout, (int, float)) or not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"LoraConfig.dropout: expected a probability in [0, 1), got {self.dropout!r}")
        for flag in ("save_merged_weight", "group_siblings"):
            if not isinstance(getattr(self, flag), bool):
                raise ValueError(f"LoraConfig.{flag}: expected True or False, got {getattr(self, flag)!r}")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int):
            raise ValueError(f"LoraConfig.seed: expected an integer, got {self.seed!r}")
        self.targets = _names("targets", self.targets, allow_all_linear=True)
        if not self.targets:
            raise ValueError(
                "LoraConfig.targets: expected at least one module name or 'all-linear', got none"
            )
        self.exclude = _names("exclude", self.exclude)
        self.modules_to_save = _names("modules_to_save", self.modules_to_save)
        self.rank_pattern = dict(self.rank_pattern)
        self.alpha_pattern = dict(self.alpha_pattern)
        for key, value in self.rank_pattern.items():
            _check_rank(f"rank_pattern[{key!r}]", value)
        for key, value in self.alpha_pattern.items():
            _check_alpha(f"alpha_pattern[{key!r}]", value)

    @property
    def train_a(self) -> bool:
        return "A" in self.train

    @property
    def train_b(self) -> bool:
        return "B" in self.train

    def scale(self, r: int, alpha: float) -> float:
        """The LoRA scale s for rank ``r`` and ``alpha``: α/r (standard) or α/√r (rsLoRA)."""
        return alpha / (math.sqrt(r) if self.scaling == "rslora" else r)

    def to_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        data["targets"] = self.targets if isinstance(self.targets, str) else list(self.targets)
        data["exclude"] = list(self.exclude)
        data["modules_to_save"] = list(self.modules_to_save)
        return data

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> LoraConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"LoraConfig: unknown field(s) {unknown}; known fields are {sorted(known)}")
        return cls(**data)


def _check_rank(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"LoraConfig.{name}: expected a positive integer rank, got {value!r}")


def _check_alpha(name: str, value: Any) -> None:
    if (
        isinstance(value, bool)
        or not isinstance(value, (int, float))
        or not math.isfinite(value)
        or value <= 0
    ):
        raise ValueError(f"LoraConfig.{name}: expected a positive finite number, got {value!r}")


def _check_choice(name: str, value: Any, choices: Sequence[str]) -> None:
    if value not in choices:
        raise ValueError(f"LoraConfig.{name}: expected one of {list(choices)}, got {value!r}")


def _names(name: str, value: Any, allow_all_linear: bool = False) -> str | tuple[str, ...]:
    if value is None and not allow_all_linear:  # PEFT configs write None for "no modules"
        return ()
    if isinstance(value, str):
        if allow_all_linear and value == "all-linear":
            return value
        value = [value]
    if not isinstance(value, Sequence) or not all(isinstance(v, str) and v for v in value):
        raise ValueError(
            f"LoraConfig.{name}: expected a module name or a list of non-empty names, got {value!r}"
        )
    if "all-linear" in value:
        raise ValueError(f"LoraConfig.{name}: 'all-linear' must be given alone, not inside a list")
    for entry in value:
        if entry.startswith("re:"):
            try:
                re.compile(entry[3:])
            except re.error as error:
                raise ValueError(
                    f"LoraConfig.{name}: {entry!r} is not a valid regular expression ({error})"
                ) from error
    return tuple(value)
