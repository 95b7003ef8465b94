"""LoRA+ for ``transformers.Trainer`` users, in one line.

Either pass ready-made optimizers::

    trainer = Trainer(model=model, args=args, optimizers=loraplus_optimizers(model, args, ratio=16))

or use the drop-in subclass::

    trainer = LoraPlusTrainer(model=model, args=args, train_dataset=ds, loraplus_ratio=16)

Both build the groups of :func:`lorakit.optim.param_groups` with ``args.learning_rate`` as η_A and
``args.weight_decay``, and the optimizer class and kwargs that ``args.optim`` selects (AdamW by default).
The Trainer's scheduler scales every group's rate by the same factor, so η_B / η_A stays ``ratio``.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from transformers import Trainer, TrainingArguments

from lorakit.optim import param_groups


def _build(
    model: nn.Module, args: TrainingArguments, ratio: float, embedding_lr: float | None, one_d_lr: str
):
    optimizer_cls, optimizer_kwargs = Trainer.get_optimizer_cls_and_kwargs(args, model)
    groups = param_groups(model, args.learning_rate, ratio, embedding_lr, args.weight_decay, one_d_lr)
    return optimizer_cls(groups, **optimizer_kwargs)


def loraplus_optimizers(
    model: nn.Module,
    args: TrainingArguments,
    ratio: float = 16.0,
    embedding_lr: float | None = None,
    one_d_lr: str = "a",
) -> tuple[torch.optim.Optimizer, None]:
    """``(optimizer, None)`` for ``Trainer(optimizers=...)``; the Trainer then creates its scheduler."""
    return _build(model, args, ratio, embedding_lr, one_d_lr), None


class LoraPlusTrainer(Trainer):
    """``transformers.Trainer`` whose optimizer uses LoRA+ groups (η_B = ``loraplus_ratio`` · η_A)."""

    def __init__(
        self,
        *args: Any,
        loraplus_ratio: float = 16.0,
        loraplus_embedding_lr: float | None = None,
        loraplus_one_d_lr: str = "a",
        **kwargs: Any,
    ) -> None:
        self.loraplus_ratio = loraplus_ratio
        self.loraplus_embedding_lr = loraplus_embedding_lr
        self.loraplus_one_d_lr = loraplus_one_d_lr
        super().__init__(*args, **kwargs)

    def create_optimizer(self, model: nn.Module | None = None) -> torch.optim.Optimizer:
        if self.optimizer is None:
            self.optimizer = _build(
                self.model if model is None else model,
                self.args,
                self.loraplus_ratio,
                self.loraplus_embedding_lr,
                self.loraplus_one_d_lr,
            )
        return self.optimizer
