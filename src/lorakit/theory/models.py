"""The synthetic models of Zeng & Lee (ICLR 2024): a square ReLU FNN and the simplified transformer (TFN).

Both are plain containers of tensors (float64 by default) so that constructions can be checked to machine
precision. Inputs use the paper's conventions: FNN inputs are rows ``x`` of shape (n, D); TFN inputs are
``X`` of shape (n, D, N) (D features x N tokens per sequence).

Initialisation follows the authors' code: FNN, FFN and output weights/biases ~ U(-1/sqrt(D), 1/sqrt(D))
(``nn.Linear``'s default), TFN attention matrices ~ N(0, 1) unscaled. Every draw uses an explicit
``torch.Generator``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace

import torch
from torch import Tensor


def _uniform(shape: tuple[int, ...], bound: float, generator: torch.Generator, dtype: torch.dtype) -> Tensor:
    return (torch.rand(shape, generator=generator, dtype=torch.float64) * 2 - 1).mul_(bound).to(dtype)


@dataclass
class FNN:
    """``z_0 = x``, ``z_l = ReLU(W_l z_{l-1} + b_l)``; the last ReLU is applied only if ``last_relu``.

    The authors' code applies the ReLU after every layer (``last_relu=True``, the default here); the
    theory only needs the frozen and target models to use the same convention.
    """

    weights: list[Tensor]
    biases: list[Tensor]
    last_relu: bool = True
    relu: bool = True  # False: a purely linear network (the paper's linear case, biases unused = 0)

    def __post_init__(self) -> None:
        if len(self.weights) != len(self.biases) or not self.weights:
            raise ValueError(
                f"FNN: expected the same positive number of weights and biases, got {len(self.weights)} "
                f"weights and {len(self.biases)} biases"
            )

    @property
    def depth(self) -> int:
        return len(self.weights)

    @property
    def width(self) -> int:
        return self.weights[0].shape[0]

    @classmethod
    def random(
        cls,
        width: int,
        depth: int,
        generator: torch.Generator,
        dtype: torch.dtype = torch.float64,
        last_relu: bool = True,
        relu: bool = True,
    ) -> FNN:
        """``nn.Linear``-style init: weights, biases ~ U(-1/sqrt(D), 1/sqrt(D)) (biases 0 if linear)."""
        bound = 1 / math.sqrt(width)
        weights, biases = [], []
        for _ in range(depth):
            weights.append(_uniform((width, width), bound, generator, dtype))
            bias = _uniform((width,), bound, generator, dtype)
            biases.append(bias if relu else torch.zeros_like(bias))
        return cls(weights, biases, last_relu, relu)

    def pre_activations(self, x: Tensor) -> list[Tensor]:
        """Pre-activations ``W_l z_{l-1} + b_l`` of every layer (rows = samples)."""
        out, z = [], x
        for l, (weight, bias) in enumerate(zip(self.weights, self.biases, strict=True)):
            pre = z @ weight.mT + bias
            out.append(pre)
            z = torch.relu(pre) if self.applies_relu(l) else pre
        return out

    def applies_relu(self, layer: int) -> bool:
        """Whether a ReLU follows layer ``layer`` (0-based)."""
        return self.relu and (layer < self.depth - 1 or self.last_relu)

    def __call__(self, x: Tensor) -> Tensor:
        pre = self.pre_activations(x)[-1]
        return torch.relu(pre) if self.applies_relu(self.depth - 1) else pre

    def adapted(self, deltas: list[Tensor], biases: list[Tensor] | None = None) -> FNN:
        """A copy with ``W_l + ΔW_l`` and (optionally) new biases."""
        return FNN(
            [w + d for w, d in zip(self.weights, deltas, strict=True)],
            list(self.biases if biases is None else biases),
            self.last_relu,
            self.relu,
        )


@dataclass
class TFN:
    """The simplified transformer of Zeng & Lee (no LayerNorm, no residuals, no 1/sqrt(D) scaling).

    ``Attn_l(Z) = Σ_h W_O^h W_V^h Z softmax((W_K^h Z)ᵀ W_Q^h Z)`` with the softmax over keys (column-wise),
    ``Z_l = W_{2,l} ReLU(W_{1,l} Attn_l(Z_{l-1}) + b_{1,l} 1ᵀ) + b_{2,l} 1ᵀ``, output ``W_o Z_L``.
    Shapes: ``Wq, Wk, Wv, Wo`` (L, H, D, D); ``W1, W2`` (L, D, D); ``b1, b2`` (L, D); ``Wout`` (D, D).
    """

    Wq: Tensor
    Wk: Tensor
    Wv: Tensor
    Wo: Tensor
    W1: Tensor
    b1: Tensor
    W2: Tensor
    b2: Tensor
    Wout: Tensor
    extra: dict = field(default_factory=dict)

    @property
    def depth(self) -> int:
        return self.Wq.shape[0]

    @property
    def heads(self) -> int:
        return self.Wq.shape[1]

    @property
    def width(self) -> int:
        return self.Wq.shape[-1]

    @classmethod
    def random(
        cls,
        width: int,
        depth: int,
        heads: int,
        generator: torch.Generator,
        dtype: torch.dtype = torch.float64,
    ) -> TFN:
        """Attention ~ N(0, 1) (``torch.randn``), FFN and output layers ~ U(-1/sqrt(D), 1/sqrt(D))."""
        shape = (depth, heads, width, width)
        attn = [torch.randn(shape, generator=generator, dtype=torch.float64).to(dtype) for _ in range(4)]
        bound = 1 / math.sqrt(width)
        W1 = _uniform((depth, width, width), bound, generator, dtype)
        b1 = _uniform((depth, width), bound, generator, dtype)
        W2 = _uniform((depth, width, width), bound, generator, dtype)
        b2 = _uniform((depth, width), bound, generator, dtype)
        Wout = _uniform((width, width), bound, generator, dtype)
        return cls(*attn, W1, b1, W2, b2, Wout)

    def block(self, Z: Tensor, l: int) -> Tensor:
        """Block ``l`` (0-based) applied to ``Z`` of shape (n, D, N)."""
        attn = torch.zeros_like(Z)
        for h in range(self.heads):
            scores = (self.Wk[l, h] @ Z).mT @ (self.Wq[l, h] @ Z)  # (n, N keys, N queries)
            attn = attn + (self.Wo[l, h] @ self.Wv[l, h]) @ Z @ torch.softmax(scores, dim=-2)
        hidden = torch.relu(self.W1[l] @ attn + self.b1[l][:, None])
        return self.W2[l] @ hidden + self.b2[l][:, None]

    def __call__(self, X: Tensor) -> Tensor:
        Z = X
        for l in range(self.depth):
            Z = self.block(Z, l)
        return self.Wout @ Z

    def replace(self, **changes: Tensor) -> TFN:
        """A copy with some tensors replaced."""
        return replace(self, **changes)
