"""LoRA+ optimizer groups (Hayou, Ghosh & Yu, "LoRA+: Efficient Low Rank Adaptation of Large Models",
ICML 2024).

LoRA+ sets the learning rate of B to ``η_B = λ · η_A`` (λ = ``ratio``, 2⁴ = 16 by default): with
Adam-type updates and width n, efficient feature learning needs ``η_B / η_A = Θ(n)`` (Theorem 1).
``ratio=1`` is plain LoRA.

Groups (trainable parameters only; frozen factors are buffers and appear in none):

| group | members | lr | weight decay |
|---|---|---|---|
| ``lora_A`` | A factors of Linear/Conv1D adapters | ``lr`` | ``weight_decay`` |
| ``lora_B`` | B factors of Linear/Conv1D adapters | ``ratio · lr`` | ``weight_decay`` |
| ``lora_embedding`` | both factors of Embedding adapters | ``embedding_lr`` (1e-6) | ``weight_decay`` |
| ``other`` | other ≥2-D trainables (e.g. a classifier in ``modules_to_save``) | ``lr`` | ``weight_decay`` |
| ``other_no_decay`` | 1-D trainables (biases, norms) | ``lr`` or ``ratio · lr`` | 0 |

Deviation from the official code (documented choice): the official ``create_loraplus_optimizer`` gives
every 1-D parameter the B rate. We default to ``one_d_lr="a"`` (η_A), because the LoRA+ argument is
about B's *width* scaling and a head's bias is not a LoRA factor; ``one_d_lr="b"`` reproduces the
official grouping. PEFT's helper drops a plain ``weight_decay`` argument; here it applies to every
group except 1-D parameters.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from lorakit.adapters.inject import lora_layers
from lorakit.adapters.layers import LoraEmbedding


def param_groups(
    model: nn.Module,
    lr: float,
    ratio: float = 16.0,
    embedding_lr: float | None = None,
    weight_decay: float = 0.0,
    one_d_lr: str = "a",
) -> list[dict[str, Any]]:
    """Parameter groups for LoRA+ (see the module table); empty groups are omitted."""
    if not (lr > 0 and math.isfinite(lr)):
        raise ValueError(f"param_groups: lr must be a positive finite number, got {lr!r}")
    if not (ratio > 0 and math.isfinite(ratio * lr)):
        raise ValueError(f"param_groups: ratio (η_B/η_A) must be positive and ratio·lr finite, got {ratio!r}")
    if embedding_lr is not None and not (embedding_lr >= 0 and math.isfinite(embedding_lr)):
        raise ValueError(f"param_groups: embedding_lr must be a finite number >= 0, got {embedding_lr!r}")
    if one_d_lr not in ("a", "b"):
        raise ValueError(f"param_groups: one_d_lr must be 'a' or 'b', got {one_d_lr!r}")
    embedding_lr = 1e-6 if embedding_lr is None else embedding_lr
    role: dict[int, str] = {}
    for _, layer in lora_layers(model):
        for factor_name in ("lora_A", "lora_B"):
            factor = getattr(layer, factor_name)
            if isinstance(factor, nn.Parameter):
                embedding = isinstance(layer, LoraEmbedding)
                role[id(factor)] = "lora_embedding" if embedding else factor_name
    members: dict[str, list[nn.Parameter]] = {
        "lora_A": [],
        "lora_B": [],
        "lora_embedding": [],
        "other": [],
        "other_no_decay": [],
    }
    for param in model.parameters():
        if not param.requires_grad:
            continue
        group = role.get(id(param)) or ("other" if param.ndim >= 2 else "other_no_decay")
        members[group].append(param)
    settings = {
        "lora_A": (lr, weight_decay),
        "lora_B": (ratio * lr, weight_decay),
        "lora_embedding": (embedding_lr, weight_decay),
        "other": (lr, weight_decay),
        "other_no_decay": (ratio * lr if one_d_lr == "b" else lr, 0.0),
    }
    return [
        {"name": name, "params": params, "lr": settings[name][0], "weight_decay": settings[name][1]}
        for name, params in members.items()
        if params
    ]


def make_optimizer(
    model: nn.Module,
    lr: float,
    ratio: float = 16.0,
    optimizer_cls: type[torch.optim.Optimizer] = torch.optim.AdamW,
    embedding_lr: float | None = None,
    weight_decay: float = 0.0,
    one_d_lr: str = "a",
    **optimizer_kwargs: Any,
) -> torch.optim.Optimizer:
    """An optimizer over :func:`param_groups` (AdamW by default); extra kwargs go to ``optimizer_cls``.

    Adam and AdamW over parameters that all live on CUDA get ``fused=True`` unless the caller chose
    ``fused`` or ``foreach``: torch's default there (foreach) launches several kernels per group of tensors,
    and a LoRA model has hundreds of small factors. Over the 224 factors of benchmarks/throughput.py's
    model the fused step took 1.5 ms against 5.0 ms on an H100 (benchmarks/optimizer_step.py).
    """
    groups = param_groups(model, lr, ratio, embedding_lr, weight_decay, one_d_lr)
    if not groups:
        raise ValueError(f"make_optimizer: {type(model).__name__} has no trainable parameters")
    params = [p for group in groups for p in group["params"]]
    if _fuses_by_default(optimizer_cls, params, optimizer_kwargs):
        optimizer_kwargs = {**optimizer_kwargs, "fused": True}
    return optimizer_cls(groups, lr=lr, **optimizer_kwargs)


def _fuses_by_default(
    optimizer_cls: type[torch.optim.Optimizer], params: list[torch.Tensor], kwargs: dict[str, Any]
) -> bool:
    """Whether :func:`make_optimizer` should ask ``optimizer_cls`` for its fused implementation: Adam or
    AdamW (torch's own classes), every parameter a floating-point CUDA tensor, and neither ``fused`` nor
    ``foreach`` chosen by the caller."""
    return (
        optimizer_cls in (torch.optim.Adam, torch.optim.AdamW)
        and not {"fused", "foreach"} & kwargs.keys()
        and bool(params)
        and all(p.is_cuda and p.is_floating_point() for p in params)
    )
