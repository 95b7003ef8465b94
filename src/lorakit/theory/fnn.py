"""Closed-form LoRA adapters and biases making a frozen ReLU FNN equal a shallower target FNN.

Zeng & Lee (ICLR 2024), Theorems 3-5: split the L frozen layers into L̄ consecutive groups (uniform:
M = floor(L / L̄) layers each, the last group takes the leftovers). In group i the linear construction
(:func:`lorakit.theory.linear.construct_linear`) makes the product of the adapted weights equal
``prod_{P_i} W_l + LR_{R|P_i|}(W̄_i - prod_{P_i} W_l)``. The ReLUs inside a group are bypassed: every layer
but the group's last gets a bias large enough that its pre-activations are positive on the input domain,
so the group is affine, ``z ↦ W̃_i z + c_i``. The group's last bias is then ``b̄_i - (W_last + ΔW_last) c``
so its pre-activation equals the target's, ``W̃_i z + b̄_i``, and the final ReLUs agree. At
``R >= max_i ceil(rank(W̄_i - prod_{P_i} W_l) / |P_i|)`` (always at ``ceil(D / M)``) the adapted network
equals the target on the domain.

The domain is a calibration sample plus a safety margin: each bypass bias lifts the smallest sample
pre-activation to ``margin`` times the sample's spread. Biases are propagated through the *actual* adapted
network, group boundaries included (the authors' code skips each group's last bias and ReLU, which breaks
exactness from L̄ = 2 on). Inputs that switch off a bypassed ReLU trigger a :class:`DomainWarning`.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from lorakit.theory.linear import DEFAULT_MAX_COND, construct_linear
from lorakit.theory.models import FNN
from lorakit.theory.rank import best_partition, group_ranks, uniform_partition


class DomainWarning(UserWarning):
    """Inputs lie outside the domain the construction was calibrated on, so exactness is not guaranteed."""


@dataclass
class FNNConstruction:
    """Adapters ``ΔW_l = B[l] @ A[l]``, the new biases and the adapted network of :func:`construct_fnn`."""

    model: FNN
    B: list[Tensor]
    A: list[Tensor]
    partition: list[int]
    group_ranks: list[int]
    bypass_layers: list[int]
    rank: int
    singular_values: list[Tensor]

    def bypass_violations(self, x: Tensor) -> dict[int, int]:
        """For each bypassed layer (0-based), how many inputs make some pre-activation negative there."""
        pre = self.model.pre_activations(x.to(self.model.weights[0].dtype))
        return {l: int((pre[l] < 0).any(dim=1).sum()) for l in self.bypass_layers}

    def check_domain(self, x: Tensor) -> bool:
        """Warn (:class:`DomainWarning`) and return False if ``x`` leaves the calibrated domain."""
        bad = {l: n for l, n in self.bypass_violations(x).items() if n}
        if bad:
            worst = max(bad, key=bad.get)
            warnings.warn(
                f"{bad[worst]} of {x.shape[0]} inputs leave the calibrated domain of the FNN construction: "
                f"they switch off a bypassed ReLU in layer {worst + 1} (layers affected: "
                f"{sorted(l + 1 for l in bad)}); the adapted network is not exact there. Calibrate on a "
                "sample "
                "covering these inputs or raise the margin.",
                DomainWarning,
                stacklevel=2,
            )
            return False
        return True

    def __call__(self, x: Tensor, check_domain: bool = True) -> Tensor:
        """The adapted network's output (real ReLUs everywhere); optionally warn outside the domain."""
        x = x.to(self.model.weights[0].dtype)
        if check_domain:
            self.check_domain(x)
        return self.model(x)


def resolve_partition(frozen: FNN, target: FNN, partition: str | Sequence[int]) -> list[int]:
    """Group sizes for ``"uniform"``, ``"best"`` or explicit sizes (validated)."""
    if partition == "uniform":
        return uniform_partition(frozen.depth, target.depth)
    if partition == "best":
        return best_partition(frozen.weights, target.weights)[0]
    if isinstance(partition, str):
        raise ValueError(f"partition: expected 'uniform', 'best' or a list of group sizes, got {partition!r}")
    group_ranks(frozen.weights, target.weights, partition)  # validates the sizes
    return [int(s) for s in partition]


def construct_fnn(
    frozen: FNN,
    target: FNN,
    rank: int,
    calibration: Tensor,
    *,
    margin: float = 1.0,
    partition: str | Sequence[int] = "uniform",
    dtype: torch.dtype = torch.float64,
    max_cond: float = DEFAULT_MAX_COND,
) -> FNNConstruction:
    """Rank-``rank`` LoRA adapters and biases for ``frozen`` (depth L) to represent ``target`` (depth L̄ <= L).

    ``calibration``: (n, D) sample of the input domain; every bypass pre-activation on it is lifted to at
    least ``margin`` x its spread over the sample. Exact (to round-off) on inputs that keep the bypassed
    ReLUs on when ``rank`` reaches :func:`lorakit.theory.rank.required_rank` for the same partition.
    """
    if frozen.width != target.width:
        raise ValueError(f"target: expected width {frozen.width} like the frozen FNN, got {target.width}")
    if frozen.last_relu != target.last_relu:
        raise ValueError(
            f"target: last_relu={target.last_relu} differs from the frozen FNN's "
            f"last_relu={frozen.last_relu}; "
            "both models must use the same output convention"
        )
    if not (frozen.relu and target.relu):
        raise ValueError(
            "frozen/target: construct_fnn expects ReLU networks; use construct_linear for linear ones"
        )
    if margin < 0:
        raise ValueError(f"margin: expected a non-negative safety margin, got {margin}")
    calibration = torch.as_tensor(calibration).to(dtype)
    if calibration.ndim != 2 or calibration.shape[1] != frozen.width or calibration.shape[0] < 1:
        raise ValueError(
            f"calibration: expected an (n, {frozen.width}) sample of inputs, "
            f"got shape {tuple(calibration.shape)}"
        )
    sizes = resolve_partition(frozen, target, partition)
    weights = [w.to(dtype) for w in frozen.weights]
    B_all, A_all, biases, bypass, spectra = [], [], [], [], []
    z, start = calibration, 0
    for i, size in enumerate(sizes):
        group = list(range(start, start + size))
        lin = construct_linear(
            weights[start : start + size], target.weights[i].to(dtype), rank, max_cond=max_cond
        )
        spectra.append(lin.singular_values)
        offset = torch.zeros(frozen.width, dtype=dtype)  # c: the group's affine offset so far
        for j, l in enumerate(group):
            adapted = weights[l] + lin.B[j] @ lin.A[j]
            B_all.append(lin.B[j])
            A_all.append(lin.A[j])
            pre = z @ adapted.mT
            if j < size - 1:
                low, high = pre.min(dim=0).values, pre.max(dim=0).values
                scale = (high - low) + 1e-6 * (pre.abs().max() + 1)
                bias = -low + margin * scale
                bypass.append(l)
            else:
                bias = target.biases[i].to(dtype) - adapted @ offset
            offset = adapted @ offset + bias
            biases.append(bias)
            pre = pre + bias
            z = torch.relu(pre) if frozen.applies_relu(l) else pre
        start += size
    model = FNN([w + b @ a for w, b, a in zip(weights, B_all, A_all, strict=True)], biases, frozen.last_relu)
    ranks = group_ranks(frozen.weights, target.weights, sizes)  # their own dtypes set the round-off
    return FNNConstruction(model, B_all, A_all, sizes, ranks, bypass, int(rank), spectra)
