"""Closed-form LoRA adapters for the simplified transformer (Zeng & Lee, ICLR 2024, Theorem 7).

Frozen and target :class:`~lorakit.theory.models.TFN` share depth L, width D and H heads. Adapted: W_Q, W_K,
W_V, W_O of every head and block, the last block's second FFN matrix W_{2,L}, the output layer W_o, and all
FFN biases. Every adapted matrix sits in a product of two, so the linear lemma with two layers applies
and rank ``ceil(D/2)`` represents the target exactly for every input (no bounded domain needed). Mismatched
frozen FFN matrices are absorbed with ``C_l = W̄_{2,l} W_{2,l}^{-1}`` (C_0 = I), ``b_{2,l} = W_{2,l}
W̄_{2,l}^{-1} b̄_{2,l}`` so that ``Z̄_l = C_l Z_l`` for l < L, and per head of block l:

    (W_K + ΔW_K)ᵀ (W_Q + ΔW_Q) = C_{l-1}ᵀ W̄_Kᵀ W̄_Q C_{l-1}        (W_Q acts first),
    (W_O + ΔW_O)  (W_V + ΔW_V) = W_{1,l}^{-1} W̄_{1,l} W̄_O W̄_V C_{l-1},   b_{1,l} = b̄_{1,l};

last block: ``(W_o + ΔW_o)(W_{2,L} + ΔW_{2,L}) = W̄_o W̄_{2,L}`` and
``b_{2,L} = (W_o + ΔW_o)^{-1} W̄_o b̄_{2,L}``.
Below ``ceil(D/2)`` each pair gets the best rank-2R correction of its discrepancy.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from lorakit.theory.linear import DEFAULT_MAX_COND, check_invertible, construct_linear
from lorakit.theory.models import TFN


@dataclass
class TFNConstruction:
    """The adapted transformer and the LoRA factors ``{name: (B, A)}`` (``ΔW = B @ A``) of each matrix."""

    model: TFN
    factors: dict[str, tuple[Tensor, Tensor]]
    rank: int

    def __call__(self, X: Tensor) -> Tensor:
        return self.model(X.to(self.model.Wq.dtype))


def _check_compatible(frozen: TFN, target: TFN) -> None:
    for name in ("depth", "heads", "width"):
        if getattr(frozen, name) != getattr(target, name):
            raise ValueError(
                f"target: expected the same {name} as the frozen TFN ({getattr(frozen, name)}), "
                f"got {getattr(target, name)}"
            )


def construct_tfn(
    frozen: TFN,
    target: TFN,
    rank: int,
    *,
    dtype: torch.dtype = torch.float64,
    max_cond: float = DEFAULT_MAX_COND,
) -> TFNConstruction:
    """Rank-``rank`` adapters and biases making ``frozen`` equal ``target``; exact for rank >= ceil(D/2)."""
    _check_compatible(frozen, target)
    f = {k: getattr(frozen, k).to(dtype) for k in ("Wq", "Wk", "Wv", "Wo", "W1", "b1", "W2", "b2", "Wout")}
    t = {k: getattr(target, k).to(dtype) for k in ("Wq", "Wk", "Wv", "Wo", "W1", "b1", "W2", "b2", "Wout")}
    L, H, D = frozen.depth, frozen.heads, frozen.width
    new = {k: v.clone() for k, v in f.items()}
    factors: dict[str, tuple[Tensor, Tensor]] = {}
    C = torch.eye(D, dtype=dtype)
    for l in range(L):
        check_invertible(f["W1"][l], f"frozen W_1 of block {l + 1}", max_cond)
        W1_inv_W1bar = torch.linalg.solve(f["W1"][l], t["W1"][l])
        for h in range(H):
            # Softmax pair: W_Q acts first, W_Kᵀ second.
            qk_target = C.mT @ t["Wk"][l, h].mT @ t["Wq"][l, h] @ C
            lin = construct_linear([f["Wq"][l, h], f["Wk"][l, h].mT], qk_target, rank, max_cond=max_cond)
            (Bq, Bk), (Aq, Ak) = lin.B, lin.A
            new["Wq"][l, h] = f["Wq"][l, h] + Bq @ Aq
            new["Wk"][l, h] = f["Wk"][l, h] + (Bk @ Ak).mT  # ΔW_K = (ΔW_Kᵀ)ᵀ = Akᵀ Bkᵀ
            factors[f"block{l + 1}.head{h + 1}.W_Q"] = (Bq, Aq)
            factors[f"block{l + 1}.head{h + 1}.W_K"] = (Ak.mT, Bk.mT)
            # Value pair: W_V acts first, W_O second.
            ov_target = W1_inv_W1bar @ t["Wo"][l, h] @ t["Wv"][l, h] @ C
            lin = construct_linear([f["Wv"][l, h], f["Wo"][l, h]], ov_target, rank, max_cond=max_cond)
            (Bv, Bo), (Av, Ao) = lin.B, lin.A
            new["Wv"][l, h] = f["Wv"][l, h] + Bv @ Av
            new["Wo"][l, h] = f["Wo"][l, h] + Bo @ Ao
            factors[f"block{l + 1}.head{h + 1}.W_V"] = (Bv, Av)
            factors[f"block{l + 1}.head{h + 1}.W_O"] = (Bo, Ao)
        new["b1"][l] = t["b1"][l]
        if l < L - 1:
            check_invertible(f["W2"][l], f"frozen W_2 of block {l + 1}", max_cond)
            check_invertible(t["W2"][l], f"target W_2 of block {l + 1}", max_cond)
            C = t["W2"][l] @ torch.linalg.inv(f["W2"][l])
            new["b2"][l] = f["W2"][l] @ torch.linalg.solve(t["W2"][l], t["b2"][l])
    lin = construct_linear([f["W2"][L - 1], f["Wout"]], t["Wout"] @ t["W2"][L - 1], rank, max_cond=max_cond)
    (B2, Bout), (A2, Aout) = lin.B, lin.A
    new["W2"][L - 1] = f["W2"][L - 1] + B2 @ A2
    new["Wout"] = f["Wout"] + Bout @ Aout
    factors[f"block{L}.W_2"] = (B2, A2)
    factors["W_out"] = (Bout, Aout)
    check_invertible(new["Wout"], "adapted output layer W_o + ΔW_o", max_cond)
    new["b2"][L - 1] = torch.linalg.solve(new["Wout"], t["Wout"] @ t["b2"][L - 1])
    return TFNConstruction(TFN(**new), factors, int(rank))
