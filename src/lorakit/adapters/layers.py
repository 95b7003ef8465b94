"""LoRA layers: a frozen base module plus a low-rank update ``s · B A``.

Convention (PEFT's, Hu et al. 2021, "LoRA: Low-Rank Adaptation of Large Language Models"):
``A ∈ R^{r×in}``, ``B ∈ R^{out×r}``, ``ΔW = s · B A`` and

    y = W0 x + b + s · B A dropout(x)

with ``s = α/r`` (or ``α/√r`` for rsLoRA). The factors are float32 master tensors even when the base
is bf16/fp16; the forward casts the r-sized factors to the activation dtype and never casts ``x`` up.

A factor is either an ``nn.Parameter`` (trainable) or a registered buffer (frozen). A frozen factor is
therefore invisible to ``model.parameters()``, optimizers and ``requires_grad_``: nothing can unfreeze
it by accident (PEFT's ``set_adapter`` re-enables grads on a hand-frozen ``lora_A``).

The factors stay float32 when the model is cast to bf16/fp16 after injection (``model.to(torch.bfloat16)``,
``model.half()``): a cast below float32 moves them to the new device only. ``.weight`` and ``.bias`` read
through to the base layer, for code that reads a layer's weight directly (weight tying, initialisers).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from lorakit.adapters import fused


class LoraLayer(nn.Module):
    """Base class: owns ``base_layer``, the factors ``lora_A``/``lora_B`` and the scale.

    Subclasses define ``features_of(base)`` (in, out), ``_base_weight_as_out_in()`` and the forward.
    """

    def __init__(
        self,
        base_layer: nn.Module,
        r: int,
        alpha: float,
        scaling: float,
        dropout: float = 0.0,
        train_a: bool = True,
        train_b: bool = True,
        kernel: str = "fused",
        save_merged_weight: bool = False,
    ) -> None:
        super().__init__()
        self.base_layer = base_layer
        self.r = r
        self.alpha = alpha
        self.scaling = scaling
        self.kernel = kernel
        self.save_merged_weight = save_merged_weight
        self.dropout_p = float(dropout)
        self.merged = False
        # set by inject when siblings under one parent may read one input (lorakit.adapters.grouped)
        self.sibling_group = None
        in_features, out_features = self.features_of(base_layer)
        device = base_layer.weight.device
        self._set_factor("lora_A", torch.zeros(r, in_features, device=device), train_a)
        self._set_factor("lora_B", torch.zeros(out_features, r, device=device), train_b)
        for parameter in base_layer.parameters():
            parameter.requires_grad_(False)

    @staticmethod
    def features_of(base_layer: nn.Module) -> tuple[int, int]:
        """(in, out) sizes of the low-rank update for ``base_layer``."""
        raise NotImplementedError

    def _base_weight_as_out_in(self) -> torch.Tensor:
        """The base weight viewed with LoRA's (out, in) orientation (a view, no copy)."""
        raise NotImplementedError

    def _set_factor(self, name: str, value: torch.Tensor, trainable: bool) -> None:
        if name in self._parameters:
            del self._parameters[name]
        if name in self._buffers:
            del self._buffers[name]
        if trainable:
            self.register_parameter(name, nn.Parameter(value))
        else:
            self.register_buffer(name, value.detach())

    @property
    def weight(self) -> torch.Tensor:
        """The base layer's weight (frozen; the adapter's update is not in it unless merged)."""
        return self.base_layer.weight

    @property
    def bias(self) -> torch.Tensor | None:
        """The base layer's bias, if any."""
        return getattr(self.base_layer, "bias", None)

    def _apply(self, fn, recurse: bool = True):
        # A dtype cast below float32 would round the master factors, and optimizer updates smaller than
        # their bf16 ulp would be lost; move the factors (and their grads) to the new device only.
        probe = fn(torch.empty(0, device=self.lora_A.device))
        if probe.dtype not in (torch.float16, torch.bfloat16):
            return super()._apply(fn, recurse)
        factors = [self.lora_A, self.lora_B]
        keep = {id(t) for t in factors} | {id(t.grad) for t in factors if t.grad is not None}

        def cast_others(tensor: torch.Tensor) -> torch.Tensor:
            return tensor.to(device=probe.device) if id(tensor) in keep else fn(tensor)

        return super()._apply(cast_others, recurse)

    @property
    def train_a(self) -> bool:
        return isinstance(self.lora_A, nn.Parameter)

    @property
    def train_b(self) -> bool:
        return isinstance(self.lora_B, nn.Parameter)

    def delta_weight(self) -> torch.Tensor:
        """``ΔW = s · B A`` in float32, shape (out, in)."""
        return self.scaling * (self.lora_B.detach().float() @ self.lora_A.detach().float())

    @torch.no_grad()
    def merge(self) -> None:
        """Fold ``ΔW`` into the base weight: afterwards the forward is the base module alone."""
        if not self.merged:
            weight = self._base_weight_as_out_in()
            weight.add_(self.delta_weight().to(weight.dtype))
            self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        """Subtract ``ΔW`` from the base weight again (exact up to the base dtype's rounding)."""
        if self.merged:
            weight = self._base_weight_as_out_in()
            weight.sub_(self.delta_weight().to(weight.dtype))
            self.merged = False

    def extra_repr(self) -> str:
        trained = ("A" if self.train_a else "") + ("B" if self.train_b else "")
        return (
            f"r={self.r}, alpha={self.alpha}, scaling={self.scaling:g}, dropout={self.dropout_p:g}, "
            f"train={trained or 'none'}, kernel={self.kernel}"
            + (", save_merged_weight=True" if self.save_merged_weight else "")
        )


class LoraLinear(LoraLayer):
    """LoRA on ``nn.Linear``: ``y = x W0ᵀ + b + s · (dropout(x) Aᵀ) Bᵀ``.

    With a ``sibling_group`` (set by ``inject``), siblings that read the same input run as one group
    (:mod:`lorakit.adapters.grouped`): the same function, fewer passes over the input.
    """

    transposed = False  # base weight stored (out, in)

    @staticmethod
    def features_of(base_layer: nn.Module) -> tuple[int, int]:
        return base_layer.in_features, base_layer.out_features

    def _base_weight_as_out_in(self) -> torch.Tensor:
        return self.base_layer.weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.merged:
            return self.base_layer(x)
        if self.sibling_group is not None:
            grouped = self.sibling_group.output(self, x)
            if grouped is not None:
                return grouped
        return _lora_linear(self, x)

    def forward_gated(self, gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
        """``self(F.silu(gate) * up)``, with this layer taking the two factors of its input
        (:func:`fused.lora_gated_linear`: x is not kept for backward) where the fused kernel runs."""
        if self.merged or self.kernel != "fused":
            return self(F.silu(gate) * up)
        return fused.lora_gated_linear(
            gate,
            up,
            self.base_layer.weight,
            self.base_layer.bias,
            self.lora_A,
            self.lora_B,
            self.scaling,
            self.dropout_p,
            self.training,
            self.transposed,
            save_merged_weight=self.save_merged_weight,
        )


class LoraConv1D(LoraLinear):
    """LoRA on GPT-2's ``Conv1D`` (weight stored transposed, (in, out)): ``y = x W0 + b + s · x Aᵀ Bᵀ``."""

    transposed = True

    @staticmethod
    def features_of(base_layer: nn.Module) -> tuple[int, int]:
        in_features, out_features = base_layer.weight.shape
        return in_features, out_features

    def _base_weight_as_out_in(self) -> torch.Tensor:
        return self.base_layer.weight.T


class LoraEmbedding(LoraLayer):
    """LoRA on ``nn.Embedding`` (PEFT's convention): ``A ∈ R^{r×V}`` is indexed, ``B ∈ R^{dim×r}``.

    ``y = E0[x] + s · A[:, x]ᵀ Bᵀ``; no dropout on token ids.
    """

    @staticmethod
    def features_of(base_layer: nn.Module) -> tuple[int, int]:
        return base_layer.num_embeddings, base_layer.embedding_dim

    def _base_weight_as_out_in(self) -> torch.Tensor:
        return self.base_layer.weight.T

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        result = self.base_layer(x)
        if self.merged:
            return result
        base = self.base_layer
        after_a = F.embedding(
            x,
            self.lora_A.T,
            base.padding_idx,
            base.max_norm,
            base.norm_type,
            base.scale_grad_by_freq,
            base.sparse,
        )
        return result + (after_a.to(result.dtype) @ self.lora_B.T.to(result.dtype)) * self.scaling


def _lora_linear(layer: LoraLinear, x: torch.Tensor) -> torch.Tensor:
    transposed = layer.transposed
    args = (
        x,
        layer.base_layer.weight,
        layer.base_layer.bias,
        layer.lora_A,
        layer.lora_B,
        layer.scaling,
        layer.dropout_p,
    )
    if layer.kernel == "fused":
        return fused.lora_linear(
            *args, layer.training, transposed, save_merged_weight=layer.save_merged_weight
        )
    return fused.reference_lora_linear(*args, layer.training, transposed)
