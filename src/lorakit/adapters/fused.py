"""Fused LoRA linear: one ``torch.autograd.Function`` for ``y = x W0ᵀ + b + s · (dropout(x) Aᵀ) Bᵀ``.

LoRA (Hu et al. 2021, "LoRA: Low-Rank Adaptation of Large Language Models") adds ``ΔW = s · B A`` to a
frozen weight ``W0``, with ``A ∈ R^{r×in}``, ``B ∈ R^{out×r}``. The FLOPs of the update are tiny (r ≪ in,
out); what costs time in an unfused implementation (PEFT's) is memory traffic over the T×in and T×out
activations: the LoRA path re-reads ``x``, writes a T×out product, scales it, adds it to the base output,
and in the backward pass reads ``dY`` twice more and re-writes ``dX``.

Gradients (``xd = dropout(x)``, ``G = dY``, ``u = s · xd Aᵀ`` of shape T×r):

    dX = G W0 + s · (G B) A ⊙ mask / (1 − p)
    dA = (G · sB)ᵀ xd
    dB = Gᵀ u

Three strategies compute exactly this function; ``lora_linear`` picks the one that moves fewer bytes:

* ``"merged"`` (no dropout, many tokens): build ``W = W0 + s · B A`` in the activation dtype (one Triton
  kernel on CUDA that also emits ``s·A`` and ``s·B`` cast for the rank-r GEMMs; a rank-r ``addmm``
  elsewhere; either reads and writes out×in once) and run the base GEMM on it, forward ``y = x Wᵀ + b``
  and backward ``dX = G W``. The LoRA term rides inside the base GEMM's fp32 accumulation: no extra pass
  over any T×out or T×in activation. By default ``W`` is rebuilt in backward instead of saved, since
  saving it costs a copy of every adapted weight in memory (in eager, with A trained and fewer tokens than
  2·out, backward skips it: ``dX = (G · sB) A + G W0``, see :func:`_merge_for_input_grad`);
  ``save_merged_weight=True`` makes that trade wherever backward would rebuild W, for one pass fewer over
  those weights per step and, in eager, one kernel launch fewer (H100, 16-layer Llama at hidden 2048:
  +0.8 GiB peak in eager; compiled, where every weight is kept, +1.6% for +1.8 GiB; benchmarks/RESULTS.md).
  Rounding ``W0 + ΔW`` once to bf16 perturbs the output by about one bf16 ulp of ``|y|``, the same order as
  rounding the base output and the LoRA term separately as the unfused path does.
* ``"addmm"`` (dropout, or few tokens as in decoding): the base GEMM, then ``y.addmm_(u, Bᵀ)``
  accumulated in place; in backward ``dX = G W0`` then ``dX.addmm_(G B, A)`` in place.
* ``"folded"`` (opt-in, Hopper GPUs, half precision): one Triton GEMM with the LoRA slice in its reduction,
  ``y = x W0ᵀ + u Bᵀ`` and ``dX = G W0 + (G sB) A`` (:mod:`lorakit.adapters.triton_gemm`): no merged weight
  and no extra pass over an activation. Asked for by name, or by ``"auto"`` with :data:`FOLDED_GEMM` set;
  on an H100 it tied with ``"merged"`` per compiled step, so ``"auto"`` does not pick it by default.

All save ``x`` only when ``A`` is trainable (in eager, where ``x = a * b`` is a product whose operands
autograd keeps anyway, as in a gated MLP's down projection, those operands instead:
:data:`RECOMPUTE_PRODUCT_INPUT`; under ``torch.compile``, a gated MLP's gate and up through
:func:`lora_gated_linear`) and ``u`` (T×r) only when ``B`` is trainable, compute ``dA``/``dB`` only
for trainable factors (on CUDA the GEMM writes them in float32 directly; under
``torch.compile`` with Triton one kernel reads ``G`` once for both ``G · sB`` and ``dB``), keep ``A``/``B``
as float32 masters and cast only these r-sized factors to ``x``'s dtype (never ``x`` up). The output is
returned as a non-view tensor, so in-place ops after the layer work. Everything is torch ops, the registered
Triton ops or the ``lorakit::lora_gemm`` custom op, so ``torch.compile`` traces the Function without graph
breaks.
:func:`reference_lora_linear` is the unfused math, used as the reference.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence

import torch
import torch.nn.functional as F

from lorakit.adapters import triton_gemm, triton_lora

TRITON_KERNEL_NAMES = ("merge", "grad", "gemm")


def _triton_kernels_from_env(value: str) -> frozenset[str]:
    """``LORAKIT_TRITON``: "1" (default, every kernel), "0" (none: torch ops), or names, e.g. "merge"."""
    if value.strip() in ("1", ""):
        return frozenset(TRITON_KERNEL_NAMES)
    names = frozenset(n.strip() for n in value.split(",") if n.strip() and n.strip() != "0")
    unknown = names - set(TRITON_KERNEL_NAMES)
    if unknown:
        raise ValueError(
            f"LORAKIT_TRITON={value!r}: unknown kernel(s) {sorted(unknown)}; "
            f"expected 1, 0 or a comma list of {TRITON_KERNEL_NAMES}"
        )
    return names


#: Triton kernels the fused path may use on CUDA: "merge" (the merged weight), "grad" (G and dB from one
#: read of dY) and "gemm" (the base GEMM with the LoRA slice folded in, the "folded" strategy). Set from
#: ``LORAKIT_TRITON``; assign a set here to change it in-process.
TRITON_KERNELS = _triton_kernels_from_env(os.environ.get("LORAKIT_TRITON", "1"))
#: Also read dY once for G and dB in eager (under ``torch.compile`` the one-pass kernel always runs): one
#: launch per sibling group (:func:`triton_lora.lora_grad_pass_group`, where :func:`_grad_group_applies`)
#: in place of two cuBLAS GEMMs per sibling. On H100s it took 1.3 ms of GPU time per step off a 16-layer
#: Llama step with A and B trained (none with A frozen), and the eager step was a median 3% faster over 7
#: same-process comparisons, +0.5% to +16.5% (benchmarks/RESULTS.md, "One G/dB launch per sibling group").
#: False: cuBLAS.
GRAD_PASS_IN_EAGER = True
#: Let ``strategy="auto"`` run the folded GEMM (one Triton GEMM per projection with the LoRA slice folded in)
#: where merging would be picked and the kernel applies. Off by default: on an H100 it was 0.95–1.02 × the
#: merged strategy's time per GEMM at the large projections, but not faster per compiled training step
#: (benchmarks/RESULTS.md, "Folded LoRA GEMM").
FOLDED_GEMM = False
#: Merge through :func:`triton_lora.merge_lora_weights` where it applies (:func:`_one_launch_applies`): one
#: launch per sibling group, and a launch with fewer arguments for a lone layer. False: the per-weight
#: launch of :func:`triton_lora.merge_lora_weight` everywhere.
ONE_LAUNCH_MERGE = True
#: Let the ``"merged"`` strategy's backward compute dX without the merged weight where that moves fewer
#: bytes (:func:`_merge_for_input_grad`). False: backward always rebuilds the merged weight.
UNMERGED_INPUT_GRAD = True
#: With A trained and no dropout, where a layer's input x is the product ``a * b`` of two tensors that
#: autograd keeps for that multiplication's own backward (``down_proj(act(gate_proj(h)) * up_proj(h))`` in
#: Llama-style gated MLPs), take a and b as inputs of the layer's Function and keep them instead of x
#: (:func:`_product_factors`): x, the widest activation of such a block, is then kept by nothing and freed
#: after forward. The layer's backward then gives a and b their gradients itself, in one pass with dA
#: (:func:`_product_backward`), and x none: the multiplication's own backward has nothing left to do.
#: Eager only; False: save x.
RECOMPUTE_PRODUCT_INPUT = True
STRATEGIES = ("auto", "merged", "addmm", "folded")
_MM_TO_FLOAT32 = hasattr(torch.ops.aten.mm, "dtype")  # mm with a float32 output (CUDA, torch >= 2.8)


def _mm_out_dtype_binding() -> bool:
    """Whether ``torch.mm`` takes ``out_dtype`` (the binding of ``aten::mm.dtype``): a direct call costs
    less host time than going through ``torch.ops``, and eager LoRA steps wait on the host."""
    if not _MM_TO_FLOAT32:
        return False
    meta = torch.empty((1, 1), dtype=torch.bfloat16, device="meta")
    try:
        return torch.mm(meta, meta, out_dtype=torch.float32).dtype == torch.float32
    except (TypeError, RuntimeError, NotImplementedError):
        return False


_MM_OUT_DTYPE = _mm_out_dtype_binding()
_UNSAFE_VIEW = torch.ops.aten._unsafe_view.default


def dropout_mask(x: torch.Tensor, p: float) -> torch.Tensor:
    """Boolean keep-mask of ``x``'s shape, each element kept with probability ``1 − p``.

    Shared by the fused and the reference path, so both draw the same mask from the same torch seed.
    """
    return torch.empty_like(x).bernoulli_(1.0 - p).bool()


def _apply_mask(x: torch.Tensor, mask: torch.Tensor, p: float) -> torch.Tensor:
    return torch.where(mask, x * (1.0 / (1.0 - p)), 0)


def _check_shapes(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    lora_A: torch.Tensor,
    lora_B: torch.Tensor,
    transposed_weight: bool,
) -> tuple[int, int]:
    if weight.dim() != 2:
        raise ValueError(f"lora_linear: weight must be 2-D, got shape {tuple(weight.shape)}")
    in_f, out_f = weight.shape if transposed_weight else weight.shape[::-1]
    layout = "(in, out) for transposed_weight=True" if transposed_weight else "(out, in)"
    if x.shape[-1] != in_f:
        raise ValueError(f"lora_linear: x has {x.shape[-1]} features, weight {layout} expects {in_f}")
    r = lora_A.shape[0]
    if lora_A.dim() != 2 or lora_A.shape[1] != in_f:
        raise ValueError(f"lora_linear: lora_A must be (r, in) = (r, {in_f}), got {tuple(lora_A.shape)}")
    if lora_B.dim() != 2 or tuple(lora_B.shape) != (out_f, r):
        raise ValueError(f"lora_linear: lora_B must be (out, r) = ({out_f}, {r}), got {tuple(lora_B.shape)}")
    if bias is not None and tuple(bias.shape) != (out_f,):
        raise ValueError(f"lora_linear: bias must be (out,) = ({out_f},), got {tuple(bias.shape)}")
    return in_f, out_f


def _use_triton(kernel: str, t: torch.Tensor) -> bool:
    return kernel in TRITON_KERNELS and triton_lora.AVAILABLE and t.is_cuda


def _use_grad_pass(g: torch.Tensor, rank: int) -> bool:
    """The one-pass G/dB kernel on strided operands (the launch with every stride as an argument): under
    ``torch.compile`` always, in eager with :data:`GRAD_PASS_IN_EAGER` where the table launch of
    :func:`_grad_group_applies` does not apply; ranks up to ``triton_lora.GRAD_PASS_MAX_RANK``."""
    return (
        g.dtype in (torch.bfloat16, torch.float16)
        and triton_lora.supports_grad_pass_rank(rank)
        and _use_triton("grad", g)
        and (GRAD_PASS_IN_EAGER or torch.compiler.is_compiling())
    )


def _merge(
    weight: torch.Tensor, lora_A: torch.Tensor, lora_B: torch.Tensor, scaling: float, transposed: bool
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(W0 + s·B A in W0's layout, s·A (r×in), s·B (out×r))``, all in W0's dtype.

    On CUDA with Triton: one kernel over the float32 masters (:mod:`lorakit.adapters.triton_lora`) that
    reads and writes the weight once and also emits the two cast, scaled factors, for ranks up to
    ``triton_lora.MAX_RANK``; otherwise torch ops.
    """
    if _use_triton("merge", weight) and triton_lora.supports_rank(lora_A.shape[0]):
        if _one_launch_applies(transposed, (weight, lora_A, lora_B)):
            merged, a_s, b_s = triton_lora.merge_lora_weights([weight], [lora_B], [lora_A], [scaling], True)
            return merged[0], a_s, b_s[0]
        if transposed:
            merged, a_t, b_t = triton_lora.merge_lora_weight(weight, lora_A.t(), lora_B.t(), scaling)
            return merged, a_t.t(), b_t.t()
        merged, b_s, a_s = triton_lora.merge_lora_weight(weight, lora_B, lora_A, scaling)
        return merged, a_s, b_s
    dtype = weight.dtype
    a = lora_A.to(dtype)
    a_s, b_s = (lora_A * scaling).to(dtype), (lora_B * scaling).to(dtype)
    merged = torch.addmm(weight, a.t(), b_s.t()) if transposed else torch.addmm(weight, b_s, a)
    return merged, a_s, b_s


def _capturing(t: torch.Tensor) -> bool:
    """Whether ``t`` is on CUDA and the current stream is capturing a CUDA graph."""
    return t.is_cuda and torch.cuda.is_current_stream_capturing()


def _one_launch_applies(transposed: bool, tensors: tuple[torch.Tensor, ...]) -> bool:
    """Whether :func:`triton_lora.merge_lora_weights` takes these: ``nn.Linear`` layout, contiguous, at
    16-byte aligned addresses (the kernel is compiled for that), factors of one dtype, in eager
    (``tensors`` = weights, then the factors).

    Its launch passes a device table of the tensors' addresses instead of each tensor and stride, and costs
    less host time: on H100 hosts, one launch per sibling group instead of one per sibling made the eager
    step a median 3% faster, over 11 same-process comparisons (benchmarks/RESULTS.md, "One merge launch per
    sibling group"). A layer's weights and factors keep their storage from step to step, so each table is
    built once. Not while a CUDA graph is being captured: a graph would keep reading a cached table that
    the cache may drop later, and an upload captured from pinned memory would replay whatever that memory
    holds by then.
    """
    return (
        ONE_LAUNCH_MERGE
        and not transposed
        and _table_launch_allowed(tensors)
        and len({t.dtype for t in tensors[len(tensors) // 3 :]}) == 1
        and sum(w.numel() for w in tensors[: len(tensors) // 3]) < 2**31  # the kernel's int32 offsets
    )


def _table_launch_allowed(tensors: Sequence[torch.Tensor]) -> bool:
    """What every launch from a cached device table of addresses needs (:func:`_one_launch_applies`,
    :func:`_grad_group_applies`): eager, no CUDA-graph capture (see :func:`_one_launch_applies`), and every
    tensor contiguous at a 16-byte aligned address, as the kernels are compiled for that."""
    return (
        not torch.compiler.is_compiling()
        and not _capturing(tensors[0])
        and all(t.is_contiguous() and t.data_ptr() % 16 == 0 for t in tensors)
    )


def _grad_group_applies(
    grads: Sequence[torch.Tensor],
    b_scaled: Sequence[torch.Tensor] | None,
    u: torch.Tensor | None,
    rank: int,
) -> bool:
    """Whether :func:`triton_lora.lora_grad_pass_group` takes these: with :data:`GRAD_PASS_IN_EAGER`, in eager
    on CUDA, at most ``triton_lora.GROUP_GRAD_MAX_MEMBERS`` bf16/fp16 upstream gradients dY_i (T × out_i,
    out_i a multiple of 16), the s_i B_i (or None: no G wanted) and u (or None: no dB wanted) in their
    dtype, the members' largest ``rank`` at most ``triton_lora.GRAD_PASS_MAX_RANK``, all contiguous at 16-byte
    aligned addresses (the kernel is compiled for that), under 2³¹ elements per dY_i (its int32 offsets).

    Not while a CUDA graph is being captured, for the reason :func:`_one_launch_applies` gives.
    """
    g0 = grads[0]
    operands = [*grads, *(b_scaled or ()), *(() if u is None else (u,))]
    return (
        GRAD_PASS_IN_EAGER
        and len(grads) <= triton_lora.GROUP_GRAD_MAX_MEMBERS
        and (b_scaled is not None or u is not None)
        and triton_lora.supports_grad_pass_rank(rank)
        and g0.dtype in (torch.bfloat16, torch.float16)
        and _use_triton("grad", g0)
        and _table_launch_allowed(operands)
        and all(t.dtype == g0.dtype for t in operands)
        and all(g.shape[1] % 16 == 0 and g.numel() < 2**31 for g in grads)
    )


def _matmul_as(a: torch.Tensor, b: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``a @ b`` returned in ``dtype``: on CUDA a bf16/fp16 GEMM writes float32 directly (no cast kernel)."""
    if (
        dtype == torch.float32
        and _MM_TO_FLOAT32
        and a.is_cuda
        and a.dtype in (torch.bfloat16, torch.float16)
        and not torch.compiler.is_compiling()  # inductor fuses the cast itself
    ):
        if _MM_OUT_DTYPE:
            return torch.mm(a, b, out_dtype=torch.float32)
        return torch.ops.aten.mm.dtype(a, b, torch.float32)
    return (a @ b).to(dtype)


def _product_factors(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
    """``(a, b)`` where ``x`` is the output of ``a * b`` and autograd saved both operands for that
    multiplication's backward (both require grad), with x's shape, dtype and device (no broadcast, no
    promotion, so ``a * b`` gives x again bit for bit); else None.

    The layer then gives a and b their gradients itself and x none (:data:`RECOMPUTE_PRODUCT_INPUT`);
    gradients that reach x from elsewhere still go through the multiplication's backward, and autograd
    adds both. Not where someone asked for x's own gradient (a hook on x, ``retain_grad``), under
    ``torch.compile`` (no autograd graph to read while tracing; the partitioner decides what to keep
    there) or saved-tensor hooks (offloading, checkpointing: reading a saved operand in forward would run
    their unpack hook), and only with :data:`RECOMPUTE_PRODUCT_INPUT`. ``torch.autograd.grad`` asked for x
    itself gets no gradient from the layer: set :data:`RECOMPUTE_PRODUCT_INPUT` to False for that.
    """
    if not RECOMPUTE_PRODUCT_INPUT or torch.compiler.is_compiling():  # first: grad_fn breaks a traced graph
        return None
    node = x.grad_fn
    if (
        node is None
        or node.name() != "MulBackward0"
        or x._backward_hooks
        or x.retains_grad
        or _saved_tensor_hooks_active()
    ):
        return None
    try:
        factors = (node._saved_self, node._saved_other)
    except RuntimeError:  # an operand was modified in place since: autograd refuses to unpack it
        return None
    if all(
        isinstance(t, torch.Tensor) and t.shape == x.shape and t.dtype == x.dtype and t.device == x.device
        for t in factors
    ):
        return factors
    return None


def _saved_tensor_hooks_active() -> bool:
    """Whether saved-tensor hooks are set (``torch.autograd.graph.saved_tensors_hooks``), as inside
    ``torch.utils.checkpoint(use_reentrant=False)`` or activation offloading.

    Reads torch's private query (what ``torch.utils.checkpoint`` itself uses). Where a torch lacks it or it
    takes other arguments, answers True, so the callers (sibling groups, the product rule) stay off rather
    than change what a checkpoint's recomputation saves.
    """
    top = getattr(torch._C._autograd, "_top_saved_tensors_default_hooks", None)
    try:
        return top is None or top(False) is not None
    except TypeError:
        return True


def _product_backward(
    dx: torch.Tensor,
    a: torch.Tensor,
    b: torch.Tensor,
    gb: torch.Tensor | None,
    dtype: torch.dtype,
    silu: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """``(dx ⊙ b, dx ⊙ a, dA)`` for a layer that took ``x = a * b`` (:func:`_product_factors`): the
    multiplication's input gradients for the layer's input gradient dx, and ``dA = gbᵀ (a ⊙ b)`` in
    ``dtype`` where gb is given (else None); all (T × in) rows. With ``silu``, ``x = silu(a) * b``
    (:func:`lora_gated_linear`) and the first two are ``dx ⊙ b ⊙ silu'(a)`` and ``dx ⊙ silu(a)``.

    On CUDA with Triton one kernel reads dx, a and b once for all three (:func:`triton_lora.product_backward`;
    torch's multiplication backward alone takes two passes): in eager through a direct launch, under
    ``torch.compile`` (with gb) as the registered op. Otherwise torch ops, the product formed again as in
    forward.
    """
    operands = (dx, a, b) if gb is None else (dx, a, b, gb)
    compiling = torch.compiler.is_compiling()
    if (
        _use_triton("grad", a)
        and (gb is None or triton_lora.supports_rank(gb.shape[1]))
        and a.dtype in (torch.bfloat16, torch.float16)
        and all(t.dtype == a.dtype for t in operands)  # one dtype: the compiled kernel is reused by that key
        and a.numel() < 2**31
        and (
            (compiling and gb is not None and all(t.is_contiguous() for t in operands))
            or _table_launch_allowed(operands)  # eager: contiguous and aligned, as the kernel is compiled
        )
    ):
        d_left, d_right, d_a = triton_lora.product_backward(dx, a, b, gb, None, silu)
        return d_left, d_right, d_a if d_a is None or d_a.dtype == dtype else d_a.to(dtype)
    if silu:
        activated = F.silu(a)
        d_a = None if gb is None else _matmul_as(gb.t(), activated * b, dtype)
        return torch.ops.aten.silu_backward(dx * b, a), dx * activated, d_a
    d_a = None if gb is None else _matmul_as(gb.t(), a * b, dtype)
    return dx * b, dx * a, d_a


def _rows(t: torch.Tensor) -> torch.Tensor:
    """(..., n) as (T, n); also for n = 0, where ``reshape(-1, 0)`` is ambiguous."""
    return t.reshape(math.prod(t.shape[:-1]), t.shape[-1])


def _base(
    x2: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, transposed: bool
) -> torch.Tensor:
    """``x2 Wᵀ + b`` on rows (T × in): a 2-D GEMM, never a view (see :func:`_as_output`)."""
    w_t = weight if transposed else weight.t()
    return x2 @ w_t if bias is None else torch.addmm(bias, x2, w_t)


def _as_output(y2: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """``y2`` (T × out) as (..., out) for an input ``x`` of shape (..., in), a tensor autograd does not see
    as a view: autograd forbids in-place ops (e.g. a ReLU(inplace=True) after the layer) on a view returned
    by a Function. A plain reshape would be one, and so would an N-D ``x @ W`` under ``torch.compile``
    (matmul's decomposition returns a view for 1-D or unfoldable inputs); ``_unsafe_view`` is what
    ``torch.matmul`` uses for the same purpose."""
    return y2 if x.dim() == 2 else _UNSAFE_VIEW(y2, (*x.shape[:-1], y2.shape[-1]))


def _input_grad(g: torch.Tensor, weight: torch.Tensor, transposed: bool) -> torch.Tensor:
    return g @ (weight.t() if transposed else weight)


#: ``strategy="auto"`` folds only projections with at least this many input and output features: at 512
#: output features (k/v) the folded GEMM took 1.29–1.38 × cuBLAS's time on an H100, and for the input
#: gradient more than merging did (benchmarks/RESULTS.md, "Folded LoRA GEMM").
FOLDED_MIN_FEATURES = 1024


def _folded_applies(x: torch.Tensor, in_f: int, out_f: int, r: int) -> bool:
    return (
        _use_triton("gemm", x)
        and triton_gemm.supports(x.dtype, in_f, out_f, r)
        and triton_gemm.supports_device(x.device)
    )


def _pick_strategy(
    strategy: str, x: torch.Tensor, tokens: int, in_f: int, out_f: int, r: int, has_mask: bool
) -> str:
    """The strategy that runs: an explicit one (checked), or for ``"auto"`` the one moving fewest bytes.

    Merged costs ~2·out·in bytes per pass over the weight; in-place accumulation ~T·(in + out). Where
    merging is the cheaper of the two, the folded GEMM (no extra pass at all) replaces it with
    :data:`FOLDED_GEMM` set, when its kernel applies (CUDA, Triton, half precision, rows a multiple of 16
    bytes) and the projection is not narrow (:data:`FOLDED_MIN_FEATURES`).
    """
    if strategy in ("merged", "folded") and has_mask:
        raise ValueError(f"lora_linear: strategy={strategy!r} cannot apply dropout; use 'addmm' or 'auto'")
    if strategy == "folded" and not _folded_applies(x, in_f, out_f, r):
        raise ValueError(
            "lora_linear: strategy='folded' needs Triton 3.4+ with 'gemm' in LORAKIT_TRITON, tensors in "
            f"bfloat16/float16 on a Hopper or newer GPU, and in, out and r multiples of 8 with r <= "
            f"{triton_gemm.MAX_RANK}; got {x.dtype} on {x.device}, (in, out, r) = ({in_f}, {out_f}, {r})"
        )
    if strategy != "auto":
        return strategy
    if has_mask or tokens * (in_f + out_f) < 2 * in_f * out_f:
        return "addmm"
    if FOLDED_GEMM and min(in_f, out_f) >= FOLDED_MIN_FEATURES and _folded_applies(x, in_f, out_f, r):
        return "folded"
    return "merged"


def _merge_for_input_grad(tokens: int, out_features: int) -> bool:
    """Whether the ``"merged"`` strategy's backward computes ``dX = G W`` on the rebuilt merged weight
    ``W = W0 + s·B A`` rather than as ``dX = (G · sB) A + G W0`` (``out_features`` summed over a sibling
    group, which shares one dX).

    Rebuilding W reads W0 and writes W, a memory-bound pass over 2·out·in elements. The other way, the
    rank-r GEMM writes dX (T·in elements) and the base GEMM adds into it (β = 1) while it is bound by
    compute; G · sB is what the backward computes for dA anyway. So W is rebuilt only where T ≥ 2·out: at
    T = 8192 tokens of the 16-layer Llama of benchmarks/throughput.py, q/k/v (Σout = 3072), o and down are
    rebuilt, and gate/up (Σout = 16384) are not. The callers also rebuild W where A is frozen, as no G is
    computed for dA there: on an H100, computing G for dX cost what not merging saved. Under
    ``torch.compile`` W is always rebuilt: there each of gate and up runs alone and the step was 1.6% slower
    without the merge (benchmarks/RESULTS.md, "The input gradient without the merged weight").
    """
    return not UNMERGED_INPUT_GRAD or torch.compiler.is_compiling() or tokens >= 2 * out_features


class _LoraLinearFunction(torch.autograd.Function):
    """Forward/backward of the LoRA linear; see the module docstring for the formulas.

    The settings come as one tuple ``flags`` = (scaling, dropout_p, transposed, strategy, need_dx, train_a,
    train_b, save_merged_weight, gated): ``apply`` costs host time per argument, and eager LoRA steps are
    bound by host time. With ``gated`` (:func:`lora_gated_linear`), x is None and the input is formed here
    as ``silu(left) * right``. Forward flattens ``x`` (and the dropout mask) to rows once, for its 2-D GEMMs
    and for the saved tensors, so a non-contiguous input is copied once; backward flattens the upstream
    gradient once.
    """

    @staticmethod
    def forward(
        ctx,
        x: torch.Tensor,
        weight: torch.Tensor,
        bias: torch.Tensor | None,
        lora_A: torch.Tensor,
        lora_B: torch.Tensor,
        mask: torch.Tensor | None,
        flags: tuple,
        left: torch.Tensor | None,
        right: torch.Tensor | None,
    ) -> torch.Tensor:
        # left, right: the factors of x = left * right (_product_factors) or of x = silu(left) * right
        # (gated), kept instead of x; else None
        scaling, dropout_p, transposed, strategy, need_dx, train_a, train_b, save_merged_weight, gated = flags
        if gated:
            x = F.silu(left) * right
        dtype = x.dtype
        if weight.dtype != dtype:  # checked here: a no-op .to() still costs a dispatch per call in eager
            weight = weight.to(dtype)
        if bias is not None and bias.dtype != dtype:
            bias = bias.to(dtype)
        x2 = _rows(x)
        mask2 = None if mask is None else _rows(mask)
        u = None  # s · dropout(x) Aᵀ, T×r, kept for dB
        kept = (None, None)  # the merged weight and s·B, when saved for backward
        if strategy == "merged":
            merged_weight, a_s, b_s = _merge(weight, lora_A, lora_B, scaling, transposed)
            if need_dx and train_a and not _merge_for_input_grad(x2.shape[0], lora_B.shape[0]):
                kept = (None, b_s)  # backward's dX = (G·sB) A + G W0 needs s·B, not W
            elif save_merged_weight and need_dx:  # kept only where backward would rebuild it
                kept = (merged_weight, b_s)
            y = _base(x2, merged_weight, bias, transposed)
            if train_b:
                u = x2 @ a_s.t()
        else:
            # Cast the r-sized factors, never x.
            xd = x2 if mask2 is None else _apply_mask(x2, mask2, dropout_p)
            u = xd @ (lora_A * scaling).to(dtype).t()
            if strategy == "folded":  # no dropout here: y = x W0ᵀ + u Bᵀ in one GEMM, where W0 (out, in) is
                # the (N, K) operand and a Conv1D's (in, out) the (K, N) one
                y = triton_gemm.lora_gemm(x2, weight, u, lora_B.to(dtype), bias, b_kn=transposed, v_rn=False)
            else:
                y = _base(x2, weight, bias, transposed)
                y.addmm_(u, lora_B.to(dtype).t())
        ctx.save_for_backward(
            x2 if train_a and left is None else None,
            u if train_b else None,
            mask2,
            weight,
            lora_A,
            lora_B,
            *kept,
            left,
            right,
        )
        ctx.flags = flags
        return _as_output(y, x)

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        # merged_weight and b_s (s·B in the activation dtype) are None unless forward kept them; left and
        # right are x's factors where forward took them, and x2 is then None
        x2, u, mask2, weight, lora_A, lora_B, merged_weight, b_s, left, right = ctx.saved_tensors
        scaling, dropout_p, transposed, strategy, need_dx, train_a, train_b, _, gated = ctx.flags
        g = _rows(grad_out)  # once: a non-contiguous upstream gradient is copied here and nowhere else
        dtype = g.dtype
        dx = d_a = d_b = None
        # forward kept s·B without the merged weight only for dX = (G·sB) A + G W0 (_merge_for_input_grad)
        on_merged = strategy == "merged" and (merged_weight is not None or b_s is None)
        if need_dx and on_merged:
            if merged_weight is None:
                merged_weight, _, b_s = _merge(weight, lora_A, lora_B, scaling, transposed)
            dx = _input_grad(g, merged_weight, transposed)
        if b_s is None and (train_a or need_dx):
            b_s = (lora_B * scaling).to(dtype)
        need_gb = train_a or (need_dx and not on_merged)
        gb, d_b = _gb_and_db(g, b_s, u, need_gb, train_b, lora_B.dtype)  # gb = G (sB), T×r
        if need_dx and strategy == "merged" and not on_merged:
            # the rank-r GEMM writes dX, the base GEMM adds G W0 into it (β = 1)
            dx = (gb @ lora_A.to(dtype)).addmm_(g, weight.t() if transposed else weight)
        elif need_dx and strategy == "folded":
            # dX = dY W0 + G A in one GEMM: W0 (out, in) is the (K, N) operand, a Conv1D's (in, out) (N, K)
            dx = triton_gemm.lora_gemm(g, weight, gb, lora_A.to(dtype), b_kn=not transposed, v_rn=True)
        elif need_dx and strategy == "addmm":
            dx = _input_grad(g, weight, transposed)
            if mask2 is None:
                dx.addmm_(gb, lora_A.to(dtype))
            else:
                dx.add_(_apply_mask(gb @ lora_A.to(dtype), mask2, dropout_p))
        if left is not None:  # x's factors get their gradients here, x none (_product_factors)
            d_left, d_right, d_a = _product_backward(
                dx, _rows(left), _rows(right), gb if train_a else None, lora_A.dtype, gated
            )
            return None, None, None, d_a, d_b, None, None, d_left.view(left.shape), d_right.view(right.shape)
        if dx is not None:
            dx = dx.view(*grad_out.shape[:-1], dx.shape[-1])
        if train_a:
            xd = x2 if mask2 is None else _apply_mask(x2, mask2, dropout_p)
            d_a = _matmul_as(gb.t(), xd, lora_A.dtype)
        return dx, None, None, d_a, d_b, None, None, None, None


def _gb_and_db(
    g: torch.Tensor,
    b_s: torch.Tensor | None,
    u: torch.Tensor | None,
    need_gb: bool,
    train_b: bool,
    db_dtype: torch.dtype,
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """``(G · sB if need_gb, dB = Gᵀ u in db_dtype if train_b)`` for the upstream gradient G (T×out).

    In eager where :func:`_grad_group_applies`, one launch of the table kernel reads G once for what is
    wanted; else, where both are wanted and :func:`_use_grad_pass` holds, one Triton kernel reads G once
    for both; otherwise each is a GEMM of its own (dB written in float32 directly on CUDA).
    """
    gb = d_b = None
    rank = (b_s if need_gb else u).shape[1] if need_gb or train_b else 0
    if (need_gb or train_b) and _grad_group_applies(
        [g], [b_s] if need_gb else None, u if train_b else None, rank
    ):
        gb, d_bs = triton_lora.lora_grad_pass_group(
            [g], [b_s] if need_gb else None, u if train_b else None, (rank,)
        )
        if d_bs is not None:
            d_b = d_bs[0] if d_bs[0].dtype == db_dtype else d_bs[0].to(db_dtype)
        return gb, d_b
    if need_gb:
        if train_b and _use_grad_pass(g, rank):
            gb, d_b = triton_lora.lora_grad_pass(g, b_s, u)  # one read of G for both
            if d_b.dtype != db_dtype:
                d_b = d_b.to(db_dtype)
        else:
            gb = g @ b_s
    if train_b and d_b is None:
        d_b = _matmul_as(g.t(), u, db_dtype)
    return gb, d_b


def _check_options(caller: str, strategy: str, dropout_p: float) -> None:
    """A ``ValueError`` naming ``caller`` for an unknown strategy or a dropout probability outside [0, 1)."""
    if strategy not in STRATEGIES:
        raise ValueError(f"{caller}: strategy must be one of {STRATEGIES}, got {strategy!r}")
    if not 0.0 <= dropout_p < 1.0:
        raise ValueError(f"{caller}: dropout_p must be in [0, 1), got {dropout_p!r}")


def lora_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    lora_A: torch.Tensor,
    lora_B: torch.Tensor,
    scaling: float,
    dropout_p: float = 0.0,
    training: bool = False,
    transposed_weight: bool = False,
    *,
    dropout_mask: torch.Tensor | None = None,
    strategy: str = "auto",
    save_merged_weight: bool = False,
) -> torch.Tensor:
    """Fused LoRA linear ``y = x W0ᵀ + b + s · (dropout(x) Aᵀ) Bᵀ`` in ``x``'s dtype.

    Args:
        x: input (..., in).
        weight: frozen base weight, (out, in) as in ``nn.Linear``, or (in, out) for GPT-2 ``Conv1D`` with
            ``transposed_weight=True``.
        bias: frozen base bias (out,) or None.
        lora_A: (r, in) float32 master factor, trainable (``requires_grad``) or frozen.
        lora_B: (out, r) float32 master factor, trainable or frozen.
        scaling: the scale ``s`` (α/r or α/√r).
        dropout_p: dropout probability on the LoRA path's input; applied only when ``training``.
        training: whether dropout is active.
        transposed_weight: ``weight`` is stored (in, out).
        dropout_mask: optional boolean keep-mask of ``x``'s shape (drawn with :func:`dropout_mask` if None);
            lets a caller reproduce the exact mask, e.g. to compare with :func:`reference_lora_linear`.
        strategy: ``"auto"`` (fewest bytes moved), ``"merged"``, ``"addmm"`` or ``"folded"`` (see module
            docstring).
        save_merged_weight: with the ``"merged"`` strategy, keep ``W0 + s·B A`` from forward for backward
            where backward would rebuild it (not where dX skips the merged weight, see
            :func:`_merge_for_input_grad`): faster, and one extra copy of the weight in memory until
            backward.

    Returns:
        (..., out) tensor in ``x.dtype``.
    """
    _check_options("lora_linear", strategy, dropout_p)
    in_f, out_f = _check_shapes(x, weight, bias, lora_A, lora_B, transposed_weight)
    if weight.requires_grad or (bias is not None and bias.requires_grad):
        # The fused path assumes a frozen base; a trainable base goes through plain autograd.
        return reference_lora_linear(
            x,
            weight,
            bias,
            lora_A,
            lora_B,
            scaling,
            dropout_p,
            training,
            transposed_weight,
            dropout_mask=dropout_mask,
        )
    mask = None
    if training and dropout_p > 0.0:
        mask = _dropout_mask_arg(x, dropout_p, dropout_mask)
    grad_on = torch.is_grad_enabled()
    need_dx = grad_on and x.requires_grad
    train_a = grad_on and lora_A.requires_grad
    train_b = grad_on and lora_B.requires_grad
    x, autocast = _autocast_input(x)
    picked = _pick_strategy(strategy, x, x.numel() // in_f, in_f, out_f, lora_A.shape[0], mask is not None)
    # where x = a * b, the layer keeps a and b (which autograd keeps anyway) instead of x
    factors = _product_factors(x) if train_a and need_dx and mask is None else None
    flags = (
        float(scaling),
        float(dropout_p),
        bool(transposed_weight),
        picked,
        need_dx,
        train_a,
        train_b,
        bool(save_merged_weight),
        False,
    )
    return _apply(
        _LoraLinearFunction,
        autocast,
        x,
        weight,
        bias,
        lora_A,
        lora_B,
        mask,
        flags,
        *(factors or (None, None)),
    )


def lora_gated_linear(
    gate: torch.Tensor,
    up: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    lora_A: torch.Tensor,
    lora_B: torch.Tensor,
    scaling: float,
    dropout_p: float = 0.0,
    training: bool = False,
    transposed_weight: bool = False,
    *,
    strategy: str = "auto",
    save_merged_weight: bool = False,
) -> torch.Tensor:
    """:func:`lora_linear` of ``x = silu(gate) ⊙ up``: the down projection of a gated (SwiGLU) MLP, given
    the two factors of its input.

    With A trained, no dropout, gate and up of one shape and dtype, one of them needing a gradient, no
    autocast and a frozen base, one Function forms x from the factors, and keeps gate and up (which the
    activation and the multiplication keep anyway for their own backward) instead of x, so x is freed
    after forward. Its backward gives gate and up their gradients, ``dX ⊙ up ⊙ silu'(gate)`` and
    ``dX ⊙ silu(gate)`` with ``silu'(g) = σ(g)(1 + g(1 − σ(g)))``, in the same pass that forms
    ``dA = (G·sB)ᵀ x`` (:func:`_product_backward`). This is :data:`RECOMPUTE_PRODUCT_INPUT` for where the
    autograd graph cannot be read, as under ``torch.compile``; :mod:`lorakit.adapters.gated_mlp` routes
    transformers' gated MLPs here. Elsewhere it is ``lora_linear(F.silu(gate) * up, ...)``. Arguments as
    :func:`lora_linear`'s, with gate and up of x's shape.
    """
    _check_options("lora_gated_linear", strategy, dropout_p)
    applies = (
        torch.is_grad_enabled()
        and lora_A.requires_grad
        and (gate.requires_grad or up.requires_grad)
        and not (training and dropout_p > 0.0)
        and gate.shape == up.shape
        and gate.dtype == up.dtype
        and gate.device == up.device
        and not weight.requires_grad
        and not (bias is not None and bias.requires_grad)
        and not torch.is_autocast_enabled(gate.device.type)
    )
    if not applies:
        return lora_linear(
            F.silu(gate) * up,
            weight,
            bias,
            lora_A,
            lora_B,
            scaling,
            dropout_p,
            training,
            transposed_weight,
            strategy=strategy,
            save_merged_weight=save_merged_weight,
        )
    in_f, out_f = _check_shapes(gate, weight, bias, lora_A, lora_B, transposed_weight)
    picked = _pick_strategy(strategy, gate, gate.numel() // in_f, in_f, out_f, lora_A.shape[0], False)
    train_b = lora_B.requires_grad
    flags = (
        float(scaling),
        0.0,
        bool(transposed_weight),
        picked,
        True,
        True,
        train_b,
        bool(save_merged_weight),
        True,
    )
    return _LoraLinearFunction.apply(None, weight, bias, lora_A, lora_B, None, flags, gate, up)


def _autocast_input(x: torch.Tensor) -> tuple[torch.Tensor, bool]:
    """``(x in the autocast dtype, True)`` under autocast (a Linear runs in that dtype: cast x as
    ``F.linear`` would), else ``(x, False)``."""
    device_type = x.device.type
    if torch.is_autocast_enabled(device_type):
        return x.to(torch.get_autocast_dtype(device_type)), True
    return x, False


def _apply(function: type[torch.autograd.Function], autocast: bool, x: torch.Tensor, *args) -> object:
    """``function.apply(x, *args)``; under autocast with autocast off inside, so forward and backward
    (which runs without autocast) see one dtype. No autocast context otherwise: entering one costs CPU time
    on every call, and eager LoRA steps are bound by CPU launch time."""
    if autocast:
        with torch.autocast(x.device.type, enabled=False):
            return function.apply(x, *args)
    return function.apply(x, *args)


def _dropout_mask_arg(x: torch.Tensor, p: float, given: torch.Tensor | None) -> torch.Tensor:
    if given is None:
        return dropout_mask(x, p)
    if given.shape != x.shape or given.dtype != torch.bool:
        raise ValueError(
            f"lora_linear: dropout_mask must be a bool tensor of x's shape {tuple(x.shape)}, "
            f"got {given.dtype} {tuple(given.shape)}"
        )
    return given


def reference_lora_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    lora_A: torch.Tensor,
    lora_B: torch.Tensor,
    scaling: float,
    dropout_p: float = 0.0,
    training: bool = False,
    transposed_weight: bool = False,
    *,
    dropout_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Plain PyTorch LoRA linear (three GEMMs and an add; autograd does the backward).

    ``y = x W0ᵀ + b + s · (dropout(x) Aᵀ) Bᵀ``; the factors are cast to ``x``'s dtype. The dropout mask is
    ``dropout_mask`` if given, else drawn by :func:`dropout_mask` (the same draw as :func:`lora_linear`).
    """
    _check_shapes(x, weight, bias, lora_A, lora_B, transposed_weight)
    dtype = x.dtype
    w = weight.to(dtype)
    base = F.linear(x, w.t() if transposed_weight else w, None if bias is None else bias.to(dtype))
    xd = x
    if training and dropout_p > 0.0:
        xd = _apply_mask(x, _dropout_mask_arg(x, dropout_p, dropout_mask), dropout_p)
    lora = F.linear(F.linear(xd, lora_A.to(dtype)), lora_B.to(dtype))
    return base + lora * scaling
