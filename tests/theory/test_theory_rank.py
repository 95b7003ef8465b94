"""Rank thresholds: headline, uniform and best consecutive partitions."""

import math

import pytest
import torch

from lorakit.theory.models import FNN
from lorakit.theory.rank import (
    best_partition,
    group_ranks,
    headline_rank,
    numerical_rank,
    required_rank,
    residual_rank,
    uniform_partition,
    uniform_rank,
)


def test_headline_and_uniform() -> None:
    assert headline_rank(16, 1, 2) == 8
    assert headline_rank(16, 2, 4) == 8
    assert headline_rank(16, 2, 5) == 7  # ceil(32/5); the uniform partition needs ceil(16/2) = 8
    assert uniform_rank(16, 2, 5) == 8
    assert uniform_partition(5, 2) == [2, 3]
    with pytest.raises(ValueError, match="target depth"):
        uniform_partition(2, 3)


def test_required_rank_for_random_fnn() -> None:
    g = torch.Generator().manual_seed(0)
    target, frozen = FNN.random(10, 2, g), FNN.random(10, 4, g)
    assert required_rank(frozen, target) == 5
    assert group_ranks(frozen, target, [2, 2]) == [10, 10]
    assert required_rank(frozen, target, partition=[1, 3]) == 10
    with pytest.raises(ValueError, match="partition"):
        required_rank(frozen, target, partition=[2, 3])


def test_best_partition_uses_frozen_layers_close_to_the_target() -> None:
    D = 12
    g = torch.Generator().manual_seed(1)
    frozen = FNN.random(D, 6, g)
    # Target layer 1 equals frozen layer 1 up to a rank-1 change; target layer 2 is far from the rest.
    u, v = (
        torch.randn(D, 1, generator=g, dtype=torch.float64),
        torch.randn(1, D, generator=g, dtype=torch.float64),
    )
    near = frozen.weights[0] + u @ v
    far = torch.randn(D, D, generator=g, dtype=torch.float64)
    target = FNN([near, far], [torch.zeros(D, dtype=torch.float64)] * 2)
    assert required_rank(frozen, target) == math.ceil(D / 3)
    sizes, rank = best_partition(frozen, target)
    assert sizes == [1, 5] and rank == math.ceil(D / 5)
    assert required_rank(frozen, target, partition="best") == rank


def test_numerical_rank() -> None:
    a = torch.randn(8, 3, dtype=torch.float64) @ torch.randn(3, 8, dtype=torch.float64)
    assert numerical_rank(a) == 3
    assert numerical_rank(torch.zeros(4, 4)) == 0


@pytest.mark.parametrize(
    ("dtype", "scale"), [(torch.float32, 0.1), (torch.float64, 1e-6), (torch.float64, 0.1)]
)
def test_group_rank_ignores_the_round_off_of_its_operands(dtype: torch.dtype, scale: float) -> None:
    """A target = frozen product + a rank-2 change: rank 2, whether the target is stored in float32 (its
    rounding is full-rank noise at 1e-8 of the weights) or the change is 1e-6 of them (float64 cancellation
    noise in W̄ - ∏W would then be ~1e-10 of E's norm, far above eps · ‖E‖)."""
    g = torch.Generator().manual_seed(3)
    D = 16
    frozen = FNN.random(D, 2, g, dtype=dtype)
    exact_product = frozen.weights[1].double() @ frozen.weights[0].double()
    change = torch.randn(D, 2, generator=g, dtype=torch.float64) @ torch.randn(
        2, D, generator=g, dtype=torch.float64
    )
    target = FNN([(exact_product + scale * change).to(dtype)], [torch.zeros(D, dtype=dtype)])
    assert group_ranks(frozen, target, [2]) == [2]
    assert required_rank(frozen, target) == 1 == required_rank(frozen, target, partition="best")
    assert residual_rank(target.weights[0], frozen.weights) == 2
    # an explicit rtol is relative to the operands' scale: a loose one drops the change, zero keeps noise
    assert residual_rank(target.weights[0], frozen.weights, rtol=1.0) == 0
    if dtype == torch.float32:
        assert residual_rank(target.weights[0], frozen.weights, rtol=0.0) == D


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_a_real_change_stays_visible_above_low_precision_rounding(dtype: torch.dtype) -> None:
    """A rank-4 change of 20% of the weights at D = 128 stored in bf16/fp16: ``D · eps`` relative to the
    weights would be ≥ 1 and hide it; the rounding-noise floor keeps it and drops the rounding itself."""
    g = torch.Generator().manual_seed(4)
    D = 128
    frozen = torch.randn(D, D, generator=g, dtype=torch.float64) / D**0.5
    change = torch.randn(D, 4, generator=g, dtype=torch.float64) @ torch.randn(
        4, D, generator=g, dtype=torch.float64
    )
    change *= 0.2 * float(torch.linalg.matrix_norm(frozen, 2)) / float(torch.linalg.matrix_norm(change, 2))
    target = (frozen + change).to(dtype)
    assert residual_rank(target, [frozen.to(dtype)]) == 4
    assert residual_rank(target, [frozen.to(dtype)], rtol=0.0) == D  # the rounding noise is there
