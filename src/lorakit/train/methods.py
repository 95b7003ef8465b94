"""Fine-tuning method presets: which parameters train, how adapters are initialised, and the LR ratio.

=========  =====================================================  ===========================================
preset     adapters (``LoraConfig``)                              optimizer
=========  =====================================================  ===========================================
lora       init="lora" (A Kaiming, B = 0), train A and B          one LR η for A and B (Hu et al., 2021)
loraplus   same as lora                                           η_B = λ·η_A, λ = 16 (Hayou et al. 2024)
asym       init="orthonormal-a": A frozen random orthonormal,     B̂·A_rand of Zhu et al. (ICML 2024),
           B = 0 and trained                                      "Asymmetry in low-rank adapters"
freeze-b   init="orthonormal-b": B frozen orthonormal, A trained  the opposite choice (the paper's baseline)
full       none: every parameter trains                           full fine-tuning baseline
head       none: only the task head (classifier) trains           linear-probe-like baseline
=========  =====================================================  ===========================================

For classification/regression models the freshly initialised head (``classifier``/``score``) is always
trained (``modules_to_save``). Zhu et al. note that training B alone with a random A reaches LoRA's quality
with half the trainable parameters, so ``asym`` at rank 2r matches ``lora`` at rank r in parameter count
(``equal_params=True`` in :func:`~lorakit.train.compare.compare`, via :meth:`MethodSpec.with_equal_params`,
doubles the rank of the one-factor methods).

Default learning rates (``Preset.lr`` = η_A; η_B = ratio·η_A). They are tuned for the default
``lorakit compare`` budget — MiniLM, embedded tweets (1,500 train / 500 eval, 3 classes), r = 8, α = 16,
query+value, batch 16, one epoch = 94 AdamW steps, linear decay, no warm-up — by a one-seed search on a
×2 log grid (``lorakit finetune --method M --lr ETA``, seed 0; eval accuracy on the 500 held-out tweets):

===========  =======  =======  =======  =======  =======  =======  =======
η_A          2.5e-4   5e-4     1e-3     2e-3     4e-3     8e-3     1.6e-2
===========  =======  =======  =======  =======  =======  =======  =======
lora         --       --       --       0.582    0.660    0.676    0.382
asym         --       --       --       --       0.590    0.626    0.530
loraplus     0.586    0.630    0.628    0.570    --       --       --
===========  =======  =======  =======  =======  =======  =======  =======

The previous defaults (η_A = 5e-4 for lora, 1e-3 for asym, 2,000 train tweets) gave 0.596 for both.
The search scored on the same 500 tweets that ``compare`` reports, so the default-task numbers of lora and
asym are best-of-grid, not held-out, estimates. ``loraplus`` keeps λ = 16 but not lora's η_A: at 8e-3 its
η_B would be 0.128, far past the 1.6e-2 at which lora already collapses (0.382), and the LoRA+ README
advises a lower η_A for LoRA+. Its η_A = 5e-4 puts η_B = 8e-3 at lora's tuned rate (at that setting and
2,000 train tweets it scored 0.708), and its search (λ = 16 throughout) keeps 5e-4. On this 94-step task
LoRA+ at its best η_A stays below plain LoRA at its best (0.630 vs 0.676, one seed). Such short-budget
rates are much larger than the papers' (≈2e-4–4e-4 for RoBERTa at batch 16 over 10–20 epochs): for runs of
thousands of steps pass a smaller ``--lr``.
``freeze-b``, ``full`` and ``head`` were not searched (``head`` 2e-3, ``full`` 5e-5 are common choices).
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass, replace
from typing import Any

import torch
from torch import nn

__all__ = ["HEAD_NAMES", "PRESETS", "MethodSpec", "Preset", "apply_method", "head_modules", "parse_method"]

HEAD_NAMES = ("pre_classifier", "classifier", "score", "qa_outputs")


@dataclass(frozen=True)
class Preset:
    """Defaults of one method: adapter init/trained factors (None: no adapters), LR ratio and LR."""

    init: str | None
    train: str | None
    ratio: float
    lr: float
    trains: str  # "adapters" | "all" | "head"
    description: str


PRESETS: dict[str, Preset] = {
    "lora": Preset("lora", "AB", 1.0, 8e-3, "adapters", "LoRA: A and B trained with one learning rate"),
    "loraplus": Preset("lora", "AB", 16.0, 5e-4, "adapters", "LoRA+: eta_B = ratio * eta_A (ratio 16)"),
    "asym": Preset(
        "orthonormal-a", "B", 1.0, 8e-3, "adapters", "asymmetric LoRA: A frozen orthonormal, B trained"
    ),
    "freeze-b": Preset("orthonormal-b", "A", 1.0, 1e-3, "adapters", "B frozen orthonormal, A trained"),
    "full": Preset(None, None, 1.0, 5e-5, "all", "full fine-tuning"),
    "head": Preset(None, None, 1.0, 2e-3, "head", "classifier head only"),
}

ONE_FACTOR = ("asym", "freeze-b")


@dataclass(frozen=True)
class MethodSpec:
    """A resolved method: preset name plus the values that override its defaults (None: preset default)."""

    method: str = "lora"
    rank: int = 8
    alpha: float | None = 16.0
    targets: tuple[str, ...] | str = ("query", "value")
    init: str | None = None
    ratio: float | None = None
    lr: float | None = None
    dropout: float = 0.0
    scaling: str = "standard"
    label: str | None = None

    def __post_init__(self) -> None:
        if self.method not in PRESETS:
            raise ValueError(f"method: expected one of {', '.join(PRESETS)}, got {self.method!r}")
        if isinstance(self.rank, bool) or not isinstance(self.rank, int) or self.rank < 1:
            raise ValueError(f"rank: expected a positive integer, got {self.rank!r}")
        if self.ratio is not None and not self.ratio > 0:
            raise ValueError(f"ratio: expected a positive number, got {self.ratio!r}")
        if self.lr is not None and not self.lr > 0:
            raise ValueError(f"lr: expected a positive number, got {self.lr!r}")
        if self.alpha is not None and not self.alpha > 0:
            raise ValueError(f"alpha: expected a positive number, got {self.alpha!r}")
        if isinstance(self.targets, list):
            object.__setattr__(self, "targets", tuple(self.targets))

    @property
    def preset(self) -> Preset:
        return PRESETS[self.method]

    @property
    def uses_adapters(self) -> bool:
        return self.preset.trains == "adapters"

    @property
    def effective_ratio(self) -> float:
        return float(self.ratio if self.ratio is not None else self.preset.ratio)

    @property
    def effective_lr(self) -> float:
        return float(self.lr if self.lr is not None else self.preset.lr)

    @property
    def effective_alpha(self) -> float:
        return float(self.alpha if self.alpha is not None else 2 * self.rank)

    @property
    def name(self) -> str:
        """Display name, e.g. ``loraplus`` or ``asym r=16``."""
        if self.label:
            return self.label
        return self.method if not self.uses_adapters or self.rank == 8 else f"{self.method} r={self.rank}"

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["targets"] = self.targets if isinstance(self.targets, str) else list(self.targets)
        data.update(effective_lr=self.effective_lr, effective_ratio=self.effective_ratio, name=self.name)
        return data

    def with_equal_params(self) -> MethodSpec:
        """The one-factor methods at doubled rank: same trainable-parameter count as ``lora`` at rank r."""
        if self.method not in ONE_FACTOR:
            return self
        return replace(self, rank=2 * self.rank, alpha=None if self.alpha is None else 2 * self.alpha)

    def lora_config(self, modules_to_save: list[str], seed: int) -> Any:
        """The ``lorakit.LoraConfig`` of this method (None for ``full``/``head``)."""
        from lorakit.config import LoraConfig

        if not self.uses_adapters:
            return None
        return LoraConfig(
            r=self.rank,
            alpha=self.effective_alpha,
            scaling=self.scaling,
            dropout=self.dropout,
            targets=self.targets if isinstance(self.targets, str) else list(self.targets),
            init=self.init or self.preset.init,
            train=self.preset.train,
            modules_to_save=modules_to_save,
            seed=seed,
        )


_SPEC_KEYS = {
    "r": "rank",
    "rank": "rank",
    "alpha": "alpha",
    "ratio": "ratio",
    "lr": "lr",
    "init": "init",
    "dropout": "dropout",
    "targets": "targets",
    "scaling": "scaling",
    "label": "label",
}


def parse_method(text: str, base: MethodSpec | None = None) -> MethodSpec:
    """Parse ``NAME[:key=value,...]`` (e.g. ``asym:r=16``, ``loraplus:ratio=8,lr=2e-4``) over ``base``.

    Keys: r/rank, alpha, ratio, lr, init, dropout, scaling, label, targets (``+``-separated or all-linear).
    """
    base = base or MethodSpec()
    name, _, options = text.strip().partition(":")
    if name not in PRESETS:
        raise ValueError(
            f"method {text!r}: expected one of {', '.join(PRESETS)} (optionally 'NAME:r=16,lr=1e-4')"
        )
    updates: dict[str, Any] = {"method": name}
    for item in filter(None, (o.strip() for o in options.split(","))):
        key, eq, value = item.partition("=")
        field_name = _SPEC_KEYS.get(key.strip())
        if not eq or field_name is None:
            raise ValueError(
                f"method {text!r}: expected key=value with key in {sorted(_SPEC_KEYS)}, got {item!r}"
            )
        try:
            if field_name == "rank":
                updates[field_name] = int(value)
            elif field_name in ("alpha", "ratio", "lr", "dropout"):
                updates[field_name] = float(value)
            elif field_name == "targets":
                updates[field_name] = value if value == "all-linear" else tuple(value.split("+"))
            else:
                updates[field_name] = value
        except ValueError as error:
            raise ValueError(f"method {text!r}: bad value for {key!r}: {value!r}") from error
    return replace(base, **updates)


def head_modules(model: nn.Module) -> list[str]:
    """Names of the task-head modules (``classifier``, ``score``, ...) directly under the model."""
    return [name for name, _ in model.named_children() if name in HEAD_NAMES]


def apply_method(model: nn.Module, spec: MethodSpec, task_type: str, seed: int) -> nn.Module:
    """Set up ``model`` for ``spec``: inject adapters or choose the trainable parameters (in place).

    The task head of a classification/regression model trains in every method; a causal LM's output
    layer is tied to the input embedding and left frozen except under ``full``.
    """
    from lorakit.adapters.inject import inject

    heads = head_modules(model) if task_type != "causal-lm" else []
    if task_type != "causal-lm" and not heads:
        raise ValueError(
            f"{type(model).__name__} has no task head named one of {HEAD_NAMES}; cannot train its classifier"
        )
    if spec.uses_adapters:
        inject(model, spec.lora_config(heads, seed))
        return model
    if spec.method == "full":
        for parameter in model.parameters():
            parameter.requires_grad_(True)
        return model
    if task_type == "causal-lm":
        raise ValueError(
            "method 'head' needs a classification/regression head; a causal LM has none to train"
        )
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    for name in heads:
        for parameter in model.get_submodule(name).parameters():
            parameter.requires_grad_(True)
    return model


def make_method_optimizer(
    model: nn.Module, spec: MethodSpec, weight_decay: float = 0.0
) -> torch.optim.Optimizer:
    """AdamW for ``spec``: adapter methods go through :func:`lorakit.optim.make_optimizer`
    (η_B = ratio·η_A)."""
    if spec.uses_adapters:
        from lorakit.optim import make_optimizer

        return make_optimizer(
            model, lr=spec.effective_lr, ratio=spec.effective_ratio, weight_decay=weight_decay
        )
    params = [p for p in model.parameters() if p.requires_grad]
    return torch.optim.AdamW(params, lr=spec.effective_lr, weight_decay=weight_decay)


def slug(text: str) -> str:
    """A folder-safe version of a method display name."""
    return re.sub(r"[^A-Za-z0-9.=-]+", "-", text).strip("-").replace("=", "")
