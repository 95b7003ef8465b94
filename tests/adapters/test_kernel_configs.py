"""``triton_lora._fit_config``: the kernels' block sizes for a LoRA rank and a GPU's shared memory.

The kernels hold rank-wide tiles, so a configuration tuned at rank 16 on an H100 can need more shared memory
than a GPU has at a larger rank (an H100 refused the G/dB kernel's rank-16 blocks at rank 64) or on a GPU
with less. No GPU is needed to check the arithmetic; the GPU benchmark (benchmarks/rank_check.py) runs
every kernel at each rank.
"""

from __future__ import annotations

import pytest

pytest.importorskip("triton", reason="Triton is not installed (the kernels are GPU-only; pip install triton)")

from lorakit.adapters import triton_lora as tk

pytestmark = pytest.mark.skipif(not tk.AVAILABLE, reason="triton_lora did not load its kernels")

H100, A100, SM89 = 232448, 166912, 101376  # opt-in shared memory per block, bytes
ROWS = ((128, 128, 8, 4), (64, 128, 4, 4), (128, 128, 8, 4, 0), (256, 64, 8, 3, 512), (256, 128, 8, 3, 2048))
PRODUCT = (tk.PRODUCT_BACKWARD_CONFIG, tk.PRODUCT_BACKWARD_SILU_CONFIG)


def _fitted(block_r: int, limit: int):
    for config in ROWS:
        yield (
            config,
            tk._fit_config(config, block_r, limit, tk._rows_shared_memory, 256 * 32),
            tk._rows_shared_memory,
        )
    for config in PRODUCT:
        yield (
            config,
            tk._fit_config(config, block_r, limit, tk._product_shared_memory, 128 * 128),
            tk._product_shared_memory,
        )


def test_the_tuned_configurations_stand_at_rank_16_on_an_h100() -> None:
    for config, fitted, _ in _fitted(16, H100):
        assert fitted == config


@pytest.mark.parametrize("limit", [H100, A100, SM89])
@pytest.mark.parametrize("rank", [1, 16, 17, 32, 64, 100, 128])
def test_fitted_configurations_fit_the_gpu_and_keep_their_chunks_whole(rank: int, limit: int) -> None:
    block_r = tk._block_r(rank)
    tuned = block_r <= 16 and limit >= H100  # run at these ranks on an H100: kept as tuned
    for config, (block_m, block_n, warps, stages, *rest), estimate in _fitted(block_r, limit):
        needs = estimate(block_m, block_n, block_r, stages) * (1 if tuned else tk._ESTIMATE_MARGIN)
        assert needs <= limit, (config, rank)
        assert warps == config[2] and block_m <= config[0] and block_n <= config[1] and stages >= 1
        if estimate is tk._rows_shared_memory:
            assert block_m * block_r <= 256 * 32, (config, rank)
            assert not rest or rest[0] % block_n == 0, (config, rank)  # the group kernel's CHUNK
        else:
            assert rest[0] % block_m == 0, (config, rank)  # the product kernel's ROWS


def test_the_estimate_with_its_margin_bounds_what_triton_asked_for_on_an_h100() -> None:
    # "Required: ..." from Triton on an H100 for the G/dB kernel: at (256, 128, 8, 3) and BLOCK_R 64 with a
    # contiguous s·B, and at (64, 128, 4, 4) and BLOCK_R 128 with a strided one
    for (block_m, block_n, block_r, stages), asked in (
        ((256, 128, 64, 3), 262144),
        ((64, 128, 128, 4), 245760),
    ):
        assert tk._rows_shared_memory(block_m, block_n, block_r, stages) * tk._ESTIMATE_MARGIN >= asked
    fitted = tk._fit_config((256, 128, 8, 3, 2048), 64, H100, tk._rows_shared_memory, 256 * 32)
    assert fitted == (128, 128, 8, 3, 2048)


def test_ranks_above_the_largest_go_to_torch_ops() -> None:
    assert tk.supports_rank(tk.MAX_RANK) and not tk.supports_rank(tk.MAX_RANK + 1)
    assert tk.supports_grad_pass_rank(tk.GRAD_PASS_MAX_RANK)
    assert not tk.supports_grad_pass_rank(tk.GRAD_PASS_MAX_RANK + 1)


@pytest.mark.parametrize("limit", [H100, A100, SM89, 65536])
def test_merge_blocks_fit_and_keep_the_row_tiles_the_group_tables_were_built_for(limit: int) -> None:
    for rank in (1, 16, 32, 64, 128):
        block_r = tk._block_r(rank)
        block_m, block_n, warps = tk._fit_config(
            (32, 128, 4, 1), block_r, limit, tk._merge_shared_memory, 1 << 30
        )[:3]
        margin = 1 if block_r <= 16 and limit >= H100 else tk._ESTIMATE_MARGIN
        assert tk._merge_shared_memory(block_m, block_n, block_r, 1) * margin <= limit, (rank, limit)
        assert (block_m, warps) == (32, 4) and block_n >= 32, (rank, limit)
