"""GPU-only Triton kernel for the fused LoRA path: the merged weight ``W0 + s · L R`` in one pass.

The ``"merged"`` strategy of :mod:`lorakit.adapters.fused` rebuilds ``W = W0 + s · B A`` (Hu et al. 2021's
``ΔW = s · B A``) once in forward and once in backward. cuBLAS runs that rank-r ``addmm`` at about 40% of
memory bandwidth and needs the factors cast to bf16 first (extra launches); this kernel reads ``W0`` once,
the float32 masters ``A``/``B`` directly (the product is formed in float32, then added and rounded once),
and writes ``W`` once.

Importing this module never fails: without Triton (or without CUDA) :data:`AVAILABLE` is False and
:func:`merge_lora_weight` is None, and callers fall back to torch ops. The kernel is registered with
``torch.library.triton_op`` so ``torch.compile`` traces it without a graph break.
"""

from __future__ import annotations

import torch

try:
    import triton
    import triton.language as tl
    from torch.library import triton_op, wrap_triton
except ImportError:  # CPU-only installs: the fused path uses torch.addmm instead.
    triton = None

AVAILABLE = False
merge_lora_weight = None

if triton is not None:

    @triton.jit
    def _merge_kernel(
        w_ptr, left_ptr, right_ptr, out_ptr, left_out_ptr, right_out_ptr,
        M, N, R, scaling,
        s_wm, s_wn, s_lm, s_lk, s_rk, s_rn, s_om, s_on,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr, IEEE: tl.constexpr,
    ):  # fmt: skip
        """out[m, n] = w[m, n] + scaling · Σ_k left[m, k] · right[k, n] (float32 product, one rounding).

        Also writes scaling · left (M×R) and scaling · right (R×N), contiguous, in out's dtype: the first
        column of tiles writes its rows of left, the first row of tiles its columns of right.
        """
        pid_m = tl.program_id(0)
        pid_n = tl.program_id(1)
        rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        rk = tl.arange(0, BLOCK_R)
        m_ok = rm < M
        n_ok = rn < N
        k_ok = rk < R
        left = tl.load(
            left_ptr + rm[:, None] * s_lm + rk[None, :] * s_lk, mask=m_ok[:, None] & k_ok[None, :], other=0.0
        )
        right = tl.load(
            right_ptr + rk[:, None] * s_rk + rn[None, :] * s_rn, mask=k_ok[:, None] & n_ok[None, :], other=0.0
        )
        if IEEE:
            delta = tl.dot(left.to(tl.float32), right.to(tl.float32), input_precision="ieee")
        else:
            delta = tl.dot(left.to(tl.float32), right.to(tl.float32), input_precision="tf32")
        tile = m_ok[:, None] & n_ok[None, :]
        w = tl.load(w_ptr + rm[:, None] * s_wm + rn[None, :] * s_wn, mask=tile, other=0.0)
        out = w.to(tl.float32) + scaling * delta
        tl.store(
            out_ptr + rm[:, None] * s_om + rn[None, :] * s_on, out.to(out_ptr.dtype.element_ty), mask=tile
        )
        if pid_n == 0:
            tl.store(
                left_out_ptr + rm[:, None] * R + rk[None, :],
                (scaling * left.to(tl.float32)).to(out_ptr.dtype.element_ty),
                mask=m_ok[:, None] & k_ok[None, :],
            )
        if pid_m == 0:
            tl.store(
                right_out_ptr + rk[:, None] * N + rn[None, :],
                (scaling * right.to(tl.float32)).to(out_ptr.dtype.element_ty),
                mask=k_ok[:, None] & n_ok[None, :],
            )

    def _launch(
        kernel, weight: torch.Tensor, left: torch.Tensor, right: torch.Tensor, scaling: float
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        M, N = weight.shape
        R = left.shape[1]
        out = torch.empty(weight.shape, dtype=weight.dtype, device=weight.device)
        left_out = torch.empty((M, R), dtype=weight.dtype, device=weight.device)
        right_out = torch.empty((R, N), dtype=weight.dtype, device=weight.device)
        block_r = max(16, triton.next_power_of_2(R))
        block_m, block_n = (64, 128) if block_r <= 32 else (32, 128)
        grid = (triton.cdiv(M, block_m), triton.cdiv(N, block_n))
        kernel[grid](
            weight, left, right, out, left_out, right_out, M, N, R, scaling,
            weight.stride(0), weight.stride(1), left.stride(0), left.stride(1),
            right.stride(0), right.stride(1), out.stride(0), out.stride(1),
            BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_R=block_r,
            # tf32 rounds the rank-r product to ~1e-3 of ΔW, far below a bf16/fp16 ulp of W; fp32 weights
            # keep full precision.
            IEEE=weight.dtype == torch.float32, num_warps=4,
        )  # fmt: skip
        return out, left_out, right_out

    @triton_op("lorakit::merge_lora_weight", mutates_args={})
    def _merge_op(
        weight: torch.Tensor, left: torch.Tensor, right: torch.Tensor, scaling: float
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return _launch(wrap_triton(_merge_kernel), weight, left, right, scaling)

    def _merge_lora_weight(
        weight: torch.Tensor, left: torch.Tensor, right: torch.Tensor, scaling: float
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(weight + s · left @ right, s · left, s · right)`` in weight's dtype (s = scaling).

        left (M, r), right (r, N), any strides; the scaled factors come back contiguous, ready for the
        rank-r GEMMs, so no separate cast kernels are launched for them. Under ``torch.compile`` this is the
        registered op; in eager the kernel is launched directly (the op's dispatch costs CPU time per call,
        and eager LoRA steps are bound by CPU launch time).
        """
        if torch.compiler.is_compiling():
            return _merge_op(weight, left, right, scaling)
        return _launch(_merge_kernel, weight, left, right, scaling)

    merge_lora_weight = _merge_lora_weight
    AVAILABLE = True
