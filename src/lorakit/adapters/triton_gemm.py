"""GPU-only Triton GEMM with the LoRA term folded into its reduction: ``C = A·op(B) + U·op(V) (+ bias)``.

The fused LoRA path's ``"folded"`` strategy (:mod:`lorakit.adapters.fused`) runs each adapted projection's
GEMM as one kernel with an extra K = r slice, as Hu et al. (2021)'s ``y = x W0ᵀ + s · (x Aᵀ) Bᵀ`` allows:

* forward:        ``y  = x · W0ᵀ + u · Bᵀ``   with ``u = x · (sA)ᵀ`` (T×r, kept for ``dB`` anyway);
* input gradient: ``dX = dY · W0 + G · A``    with ``G = dY · (sB)`` (T×r, needed for ``dA`` anyway).

Each output tile adds the rank-r product to its float32 accumulator before the single store, so no merged
weight ``W0 + s·B A`` is built (the ``"merged"`` strategy reads and writes every adapted weight twice per
step for it) and no T×out or T×in activation is read or written a second time (the ``"addmm"`` strategy's
cost). The kernel is persistent (one program per SM walks the output tiles, grouped along M for L2 reuse) and
loads its tiles with Hopper's tensor memory accelerator (``tl.make_tensor_descriptor``), the design that came
within 0–4% of cuBLAS at the large projections in ``benchmarks/triton_gemm_headroom.py``.

Measured on an H100 (``benchmarks/folded_gemm.py``, benchmarks/RESULTS.md): 1.01–1.11 × cuBLAS's time for
the base GEMM alone at the large projections of a hidden-2048 Llama, which is about what the merged strategy
pays for its merge, and 1.29–1.38 × at 512 output features. Per compiled training step it tied with the merged
strategy; in eager it was slower (a Python launch per call on a host-bound step). Hence opt-in.

Importing never fails: without Triton :data:`AVAILABLE` is False. Under ``torch.compile`` the kernel is the
custom op ``lorakit::lora_gemm`` (opaque to Inductor, so the device-side descriptors need no support from it);
in eager it is launched directly.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs: the fused path uses the merged or addmm strategy.
    triton = None

AVAILABLE = False
#: The rank-r tiles of u and v take shared memory beside the pipeline's stages: at r = 24–32 the 128×256,
#: 3-stage configuration ran out of it on an H100 (Triton 3.6); r = 8 and 16 are the ranks measured.
MAX_RANK = 16
_HALF = (torch.bfloat16, torch.float16)


class GemmConfig(NamedTuple):
    """Block sizes and schedule of one launch: the output tile (block_m × block_n), the reduction step
    block_k, group_m row blocks per L2 group, warps, pipeline stages, and three Triton options: flatten the
    tile and reduction loops into one pipeline (``flatten``), warp specialization, and storing the output
    tile in two halves (``split_store``: half the shared memory for the epilogue, room for a stage more)."""

    block_m: int
    block_n: int
    block_k: int = 64
    group_m: int = 8
    warps: int = 8
    stages: int = 3
    flatten: bool = False
    warp_specialize: bool = False
    split_store: bool = False


#: per layout of the weight operand, the configuration closest to the fastest of benchmarks/folded_gemm.py's
#: grid at every projection of its model (H100, nn.Linear layouts): the forward's (N, K) weight within 0–7%,
#: the input gradient's (K, N) within 0–1%; the grid's timing noise was 0.2–4.6%
CONFIG_NK = GemmConfig(128, 256, stages=3, flatten=True)
CONFIG_KN = GemmConfig(128, 256, stages=3, flatten=True, warp_specialize=True)


def supports(dtype: torch.dtype, k: int, n: int, r: int) -> bool:
    """Whether :func:`lora_gemm` takes operands of ``dtype`` with reduction length ``k``, ``n`` output
    columns and rank ``r``: half precision, every row a multiple of 16 bytes (TMA descriptors need that),
    ``r ≤`` :data:`MAX_RANK`."""
    return dtype in _HALF and r <= MAX_RANK and all(d > 0 and (d * 2) % 16 == 0 for d in (k, n, r))


@torch.compiler.assume_constant_result
def _is_hopper_or_newer(index: int) -> bool:
    return torch.cuda.get_device_capability(index) >= (9, 0)


def supports_device(device: torch.device) -> bool:
    """Whether the kernel runs on ``device``: a Hopper or newer GPU (TMA), or the CPU for Triton's
    interpreter. (A constant under ``torch.compile``: no graph break, no guard on the device's kind.)"""
    if device.type != "cuda":
        return device.type == "cpu"
    return _is_hopper_or_newer(device.index if device.index is not None else torch.cuda.current_device())


def _tma_ready(t: torch.Tensor) -> torch.Tensor:
    """``t`` itself if it is a row-major matrix with a 16-byte aligned start and row stride, else a copy."""
    if t.stride(1) == 1 and (t.stride(0) * t.element_size()) % 16 == 0 and t.data_ptr() % 16 == 0:
        return t
    return t.clone(memory_format=torch.contiguous_format)


# tensor descriptors built on the device and the allocator they need: Triton 3.4 or newer
if triton is not None and hasattr(tl, "make_tensor_descriptor") and hasattr(triton, "set_allocator"):

    @triton.jit
    def _load_kn(desc, k, n, KN: tl.constexpr):
        """The (k, n) tile of a K×N operand stored K×N (``KN``) or N×K, as a K×N block."""
        if KN:  # noqa: SIM108 - a constexpr branch: Triton compiles only the side taken
            tile = desc.load([k, n])
        else:
            tile = desc.load([n, k]).T
        return tile

    @triton.jit
    def _lora_gemm_kernel(
        a_ptr, b_ptr, u_ptr, v_ptr, bias_ptr, c_ptr,
        M, N, K, R, s_am, s_b, s_um, s_v, s_cm,
        B_KN: tl.constexpr, V_RN: tl.constexpr, HAS_BIAS: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr,
        GROUP_M: tl.constexpr, NUM_SMS: tl.constexpr,
        FLATTEN: tl.constexpr, WARP_SPECIALIZE: tl.constexpr, SPLIT_STORE: tl.constexpr,
    ):  # fmt: skip
        """c[M, N] = a[M, K] · b + u[M, R] · v (+ bias[N]); b is K×N if B_KN else N×K (used transposed),
        v is R×N if V_RN else N×R. Every operand row-major; out-of-range tile elements load as zeros."""
        a_desc = tl.make_tensor_descriptor(a_ptr, [M, K], [s_am, 1], [BLOCK_M, BLOCK_K])
        u_desc = tl.make_tensor_descriptor(u_ptr, [M, R], [s_um, 1], [BLOCK_M, BLOCK_R])
        if SPLIT_STORE:
            c_desc = tl.make_tensor_descriptor(c_ptr, [M, N], [s_cm, 1], [BLOCK_M, BLOCK_N // 2])
        else:
            c_desc = tl.make_tensor_descriptor(c_ptr, [M, N], [s_cm, 1], [BLOCK_M, BLOCK_N])
        if B_KN:
            b_desc = tl.make_tensor_descriptor(b_ptr, [K, N], [s_b, 1], [BLOCK_K, BLOCK_N])
        else:
            b_desc = tl.make_tensor_descriptor(b_ptr, [N, K], [s_b, 1], [BLOCK_N, BLOCK_K])
        if V_RN:
            v_desc = tl.make_tensor_descriptor(v_ptr, [R, N], [s_v, 1], [BLOCK_R, BLOCK_N])
        else:
            v_desc = tl.make_tensor_descriptor(v_ptr, [N, R], [s_v, 1], [BLOCK_N, BLOCK_R])
        grid_m = tl.cdiv(M, BLOCK_M)
        grid_n = tl.cdiv(N, BLOCK_N)
        tiles_per_group = GROUP_M * grid_n
        for tile in tl.range(
            tl.program_id(0), grid_m * grid_n, NUM_SMS, flatten=FLATTEN, warp_specialize=WARP_SPECIALIZE
        ):
            # consecutive tiles walk down a group of GROUP_M row blocks, so the b tiles stay in L2
            group = tile // tiles_per_group
            group_rows = min(grid_m - group * GROUP_M, GROUP_M)
            pid_m = group * GROUP_M + (tile % tiles_per_group) % group_rows
            pid_n = (tile % tiles_per_group) // group_rows
            rm = pid_m * BLOCK_M
            rn = pid_n * BLOCK_N
            acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
            for k in range(0, K, BLOCK_K):
                acc = tl.dot(a_desc.load([rm, k]), _load_kn(b_desc, k, rn, B_KN), acc)
            # the LoRA slice of the reduction: r more columns of a, r more rows of b (zero-padded to BLOCK_R)
            acc = tl.dot(u_desc.load([rm, 0]), _load_kn(v_desc, 0, rn, V_RN), acc)
            if HAS_BIAS:
                cols = rn + tl.arange(0, BLOCK_N)
                acc += tl.load(bias_ptr + cols, mask=cols < N, other=0.0).to(tl.float32)[None, :]
            out = acc.to(c_ptr.dtype.element_ty)
            if SPLIT_STORE:
                left, right = tl.split(tl.permute(tl.reshape(out, (BLOCK_M, 2, BLOCK_N // 2)), (0, 2, 1)))
                c_desc.store([rm, rn], left)
                c_desc.store([rm, rn + BLOCK_N // 2], right)
            else:
                c_desc.store([rm, rn], out)

    def _scratch(size: int, alignment: int, stream) -> torch.Tensor:
        """Global memory Triton asks for to build the tensor descriptors on the device."""
        return torch.empty(size, dtype=torch.int8, device="cuda" if torch.cuda.is_available() else "cpu")

    _SM_COUNT: dict[int, int] = {}

    def _num_sms(device: torch.device) -> int:
        """Streaming multiprocessors of ``device``; checks once per GPU that it is a Hopper or newer."""
        if device.type != "cuda":
            return 4  # the CPU interpreter: a few programs, so the persistent loop is exercised
        index = device.index if device.index is not None else torch.cuda.current_device()
        if index not in _SM_COUNT:
            props = torch.cuda.get_device_properties(index)
            if not _is_hopper_or_newer(index):
                raise RuntimeError(
                    f"lora_gemm: the folded LoRA GEMM is built and measured for Hopper GPUs (TMA, "
                    f"compute capability 9.0+); {props.name} has {props.major}.{props.minor}. "
                    "Use the merged strategy."
                )
            _SM_COUNT[index] = props.multi_processor_count
        return _SM_COUNT[index]

    def launch(
        a: torch.Tensor,
        b: torch.Tensor,
        u: torch.Tensor,
        v: torch.Tensor,
        bias: torch.Tensor | None,
        b_kn: bool,
        v_rn: bool,
        config: GemmConfig | None = None,
    ) -> torch.Tensor:
        """Launch the kernel with ``config``, or :func:`config_for`'s choice, on ``a``'s GPU."""
        if a.is_cuda and a.device.index != torch.cuda.current_device():
            # Triton launches (and allocates its descriptor scratch) on the current device: a model split
            # over GPUs in one process runs layers on others
            with torch.cuda.device(a.device):
                return launch(a, b, u, v, bias, b_kn, v_rn, config)
        a, b, u, v = (_tma_ready(t) for t in (a, b, u, v))
        M, K = a.shape
        N = b.shape[1] if b_kn else b.shape[0]
        R = u.shape[1]
        if R > MAX_RANK:
            raise ValueError(f"lora_gemm: rank {R} > {MAX_RANK} (MAX_RANK) does not fit the kernel")
        cfg = config or config_for(b_kn)
        c = torch.empty((M, N), dtype=a.dtype, device=a.device)
        num_sms = _num_sms(a.device)
        tiles = triton.cdiv(M, cfg.block_m) * triton.cdiv(N, cfg.block_n)
        # per launch: the allocator is a context variable, and autograd runs backward in its own thread
        triton.set_allocator(_scratch)
        if bias is not None:
            bias = bias.contiguous()
        _lora_gemm_kernel[(min(num_sms, tiles),)](
            a, b, u, v, bias if bias is not None else c, c,
            M, N, K, R, a.stride(0), b.stride(0), u.stride(0), v.stride(0), c.stride(0),
            B_KN=b_kn, V_RN=v_rn, HAS_BIAS=bias is not None,
            BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k,
            BLOCK_R=max(16, triton.next_power_of_2(R)), GROUP_M=cfg.group_m, NUM_SMS=num_sms,
            FLATTEN=cfg.flatten, WARP_SPECIALIZE=cfg.warp_specialize, SPLIT_STORE=cfg.split_store,
            num_warps=cfg.warps, num_stages=cfg.stages,
        )  # fmt: skip
        return c

    @torch.library.custom_op("lorakit::lora_gemm", mutates_args=())
    def _lora_gemm_op(
        a: torch.Tensor,
        b: torch.Tensor,
        u: torch.Tensor,
        v: torch.Tensor,
        bias: torch.Tensor | None,
        b_kn: bool,
        v_rn: bool,
    ) -> torch.Tensor:
        return launch(a, b, u, v, bias, b_kn, v_rn)

    @_lora_gemm_op.register_fake
    def _(a, b, u, v, bias, b_kn, v_rn):
        return a.new_empty((a.shape[0], b.shape[1] if b_kn else b.shape[0]))

    AVAILABLE = True


def config_for(b_kn: bool) -> GemmConfig:
    """The launch configuration for a weight operand stored (K, N) (``b_kn``) or (N, K)."""
    return CONFIG_KN if b_kn else CONFIG_NK


def lora_gemm(
    a: torch.Tensor,
    b: torch.Tensor,
    u: torch.Tensor,
    v: torch.Tensor,
    bias: torch.Tensor | None = None,
    *,
    b_kn: bool,
    v_rn: bool,
) -> torch.Tensor:
    """``a · op(b) + u · op(v) (+ bias)`` in one GEMM, in ``a``'s dtype with float32 accumulation.

    Args:
        a: (M, K). b: (K, N) if ``b_kn`` else (N, K), used transposed (an ``nn.Linear`` weight).
        u: (M, r). v: (r, N) if ``v_rn`` else (N, r), used transposed. bias: (N,) or None.
        One half-precision dtype with K, N and r multiples of 8 (:func:`supports`); an operand that is not
        row-major with 16-byte aligned rows is copied first.

    Under ``torch.compile`` this is the custom op ``lorakit::lora_gemm``; in eager a direct launch (the op's
    dispatch costs host time per call).
    """
    if not AVAILABLE:
        raise RuntimeError("lora_gemm needs Triton (pip install triton) and a CUDA GPU")
    if torch.compiler.is_compiling():
        return _lora_gemm_op(a, b, u, v, bias, b_kn, v_rn)
    return launch(a, b, u, v, bias, b_kn, v_rn)
