"""Training throughput of LoRA on a random-init Llama: no adapters vs PEFT vs lorakit, eager and compiled.

One process, one model recipe and one input batch for every variant. Order (each timed twice):
no-adapter, PEFT default (float32 adapters), PEFT bf16 (``autocast_adapter_dtype=False``), PEFT bf16 with
frozen lora_A, lorakit LoRA (train AB), lorakit frozen-A (``orthonormal-a``, ``train="B"``); first eager,
then under ``torch.compile(model)``. A step is forward (with the LM loss) + backward + AdamW.

Before timing, lorakit's fused path is checked against the float64 reference on the GPU (outputs and
gradients, bf16 rel. err ≤ 1e-2, fp32 ≤ 1e-5); if it disagrees the lorakit variants are not timed.

Example (GPU):
    PYTHONPATH=src python3 benchmarks/throughput.py --out out/throughput.json --results benchmarks/RESULTS.md
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import itertools
import json
import logging
import platform
import statistics
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, replace
from functools import partial
from pathlib import Path

import torch
import torch.nn.functional as F

from lorakit.adapters import fused, gated_mlp, grouped, triton_gemm, triton_lora
from lorakit.adapters.fused import dropout_mask, lora_gated_linear, lora_linear, reference_lora_linear
from lorakit.utils import atomic_write, atomic_write_json

LOG = logging.getLogger("throughput")
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
VARIANTS = ["no-adapter", "peft-default", "peft-bf16", "peft-bf16-frozenA", "lorakit", "lorakit-frozenA"]
SWEEP_RANKS = (8, 16, 32, 64, 128)  # --sweep rank
# Diagnostics: lorakit layers with kernel="reference"; the fused path with torch ops instead of Triton; the
# fused path with the Triton merge kernel only (G and dB by two cuBLAS GEMMs). Opt-in speed for memory:
# lorakit and lorakit frozen-A with LoraConfig(save_merged_weight=True). G and dB by two cuBLAS GEMMs per
# projection in eager (fused.GRAD_PASS_IN_EAGER off; -cublasgrad). The folded GEMM instead of the merged
# weight (fused.FOLDED_GEMM: one Triton GEMM per projection with the LoRA slice in its reduction). Every
# adapted layer on its own, without sibling groups for q/k/v and gate/up (group_siblings=False). Groups
# merging each sibling's weight with a launch of its own, lone layers with the per-weight launch
# (fused.ONE_LAUNCH_MERGE off). Backward rebuilding the merged weight for dX everywhere, also where
# dX = (G·sB) A + G W0 moves fewer bytes (fused.UNMERGED_INPUT_GRAD off; -remerge). The merge and G/dB
# kernels launched through Triton's own launch on every call (triton_lora.DIRECT_LAUNCH off; -jitlaunch).
# down_proj keeping its input x = act(gate) * up for dA, with torch's backward of the multiplication, instead
# of taking the two factors autograd keeps anyway and giving them their gradients itself
# (fused.RECOMPUTE_PRODUCT_INPUT off; -keepinput). Llama's MLPs with their own forward, so that under
# torch.compile the down projection keeps its input x instead of taking gate and up (gated_mlp.detach after
# inject; -nogated).
EXTRA_VARIANTS = [
    "lorakit-reference",
    "lorakit-notriton",
    "lorakit-mergeonly",
    "lorakit-savemerged",
    "lorakit-frozenA-savemerged",
    "lorakit-cublasgrad",
    "lorakit-frozenA-cublasgrad",
    "lorakit-folded",
    "lorakit-frozenA-folded",
    "lorakit-ungrouped",
    "lorakit-frozenA-ungrouped",
    "lorakit-mergeeach",
    "lorakit-frozenA-mergeeach",
    "lorakit-remerge",
    "lorakit-frozenA-remerge",
    "lorakit-jitlaunch",
    "lorakit-frozenA-jitlaunch",
    "lorakit-keepinput",
    "lorakit-nogated",
    "lorakit-savemerged-nogated",
]
TRITON_KERNELS = {
    "lorakit-notriton": frozenset(),
    "lorakit-mergeonly": frozenset({"merge"}),
}
PEER = {
    "lorakit": "peft-bf16",
    "lorakit-frozenA": "peft-bf16-frozenA",
    "lorakit-reference": "peft-bf16",
    "lorakit-notriton": "peft-bf16",
    "lorakit-mergeonly": "peft-bf16",
    "lorakit-savemerged": "peft-bf16",
    "lorakit-frozenA-savemerged": "peft-bf16-frozenA",
    "lorakit-cublasgrad": "peft-bf16",
    "lorakit-frozenA-cublasgrad": "peft-bf16-frozenA",
    "lorakit-folded": "peft-bf16",
    "lorakit-frozenA-folded": "peft-bf16-frozenA",
    "lorakit-ungrouped": "peft-bf16",
    "lorakit-frozenA-ungrouped": "peft-bf16-frozenA",
    "lorakit-mergeeach": "peft-bf16",
    "lorakit-frozenA-mergeeach": "peft-bf16-frozenA",
    "lorakit-remerge": "peft-bf16",
    "lorakit-frozenA-remerge": "peft-bf16-frozenA",
    "lorakit-jitlaunch": "peft-bf16",
    "lorakit-frozenA-jitlaunch": "peft-bf16-frozenA",
    "lorakit-keepinput": "peft-bf16",
    "lorakit-nogated": "peft-bf16",
    "lorakit-savemerged-nogated": "peft-bf16",
}
TARGET_VS_NONE = {
    "lorakit": 0.95,
    "lorakit-frozenA": 0.97,
    "lorakit-savemerged": 0.95,
    "lorakit-frozenA-savemerged": 0.97,
    "lorakit-folded": 0.95,
    "lorakit-frozenA-folded": 0.97,
    "lorakit-ungrouped": 0.95,
    "lorakit-frozenA-ungrouped": 0.97,
    "lorakit-mergeeach": 0.95,
    "lorakit-frozenA-mergeeach": 0.97,
    "lorakit-cublasgrad": 0.95,
    "lorakit-frozenA-cublasgrad": 0.97,
    "lorakit-remerge": 0.95,
    "lorakit-frozenA-remerge": 0.97,
    "lorakit-jitlaunch": 0.95,
    "lorakit-frozenA-jitlaunch": 0.97,
    "lorakit-keepinput": 0.95,
    "lorakit-nogated": 0.95,
    "lorakit-savemerged-nogated": 0.95,
}
# eager variants profiled with --profile
PROFILED = (
    "no-adapter",
    "peft-bf16",
    "lorakit",
    "lorakit-savemerged",
    "lorakit-cublasgrad",
    "lorakit-frozenA",
    "lorakit-frozenA-cublasgrad",
    "lorakit-folded",
    "lorakit-mergeeach",
    "lorakit-remerge",
    "lorakit-frozenA-remerge",
    "lorakit-jitlaunch",
    "lorakit-keepinput",
)
CHECK_TOL = {torch.bfloat16: 1e-2, torch.float32: 1e-5}
# Any variant + this suffix steps AdamW(fused=True) (one kernel per step) instead of torch's default on CUDA
# (foreach: several launches per group of tensors). Its ratios are taken against the PEFT runs with the same
# suffix; no-adapter has no optimizer either way.
FUSED_OPTIMIZER = "-fusedopt"
# Any variant + one of these suffixes (before -fusedopt) runs on a model given liger-kernel's kernels first
# (lorakit.train.liger.apply_liger_kernels with these options): +liger all of them (RMSNorm, RoPE, SwiGLU,
# fused linear cross-entropy), +ligerce the fused linear cross-entropy alone. Whole-model kernels, reported
# apart from LoRA's own numbers; ratios are taken against no-adapter and PEFT with the same suffix.
LIGER = {"+liger": {}, "+ligerce": {"rope": False, "rms_norm": False, "swiglu": False}}


def liger_suffix(variant: str) -> str:
    """The variant's liger suffix (a key of :data:`LIGER`), or ""."""
    return next((k for k in LIGER if variant.removesuffix(FUSED_OPTIMIZER).endswith(k)), "")


def base_variant(variant: str) -> tuple[str, bool]:
    """(the variant without its suffixes, whether it steps AdamW(fused=True))."""
    plain = variant.removesuffix(FUSED_OPTIMIZER)
    return plain.removesuffix(liger_suffix(variant)), variant.endswith(FUSED_OPTIMIZER)


@contextlib.contextmanager
def liger_scope(liger: bool) -> Iterator[None]:
    """With ``liger`` (a variant with a liger suffix), undo on exit what liger patches in transformers'
    Llama module (its RoPE function and the RMSNorm and MLP classes), so that the variants after it run
    transformers' own code."""
    if not liger:
        yield
        return
    from transformers.models.llama import modeling_llama

    saved = dict(vars(modeling_llama))
    try:
        yield
    finally:
        for name, value in saved.items():
            if getattr(modeling_llama, name, None) is not value:
                setattr(modeling_llama, name, value)


def set_library_flags(variant: str) -> tuple[str, bool]:
    """Set lorakit's module switches for ``variant`` (``fused.TRITON_KERNELS``, ``GRAD_PASS_IN_EAGER``,
    ``ONE_LAUNCH_MERGE``, ``FOLDED_GEMM``, ``UNMERGED_INPUT_GRAD``, ``RECOMPUTE_PRODUCT_INPUT``,
    ``triton_lora.DIRECT_LAUNCH``); returns :func:`base_variant`'s pair."""
    variant, fused_optimizer = base_variant(variant)
    fused.TRITON_KERNELS = TRITON_KERNELS.get(variant, frozenset(fused.TRITON_KERNEL_NAMES))
    fused.GRAD_PASS_IN_EAGER = not variant.endswith("-cublasgrad")
    fused.ONE_LAUNCH_MERGE = not variant.endswith("-mergeeach")
    fused.FOLDED_GEMM = variant.endswith("-folded")
    fused.UNMERGED_INPUT_GRAD = not variant.endswith("-remerge")
    fused.RECOMPUTE_PRODUCT_INPUT = not variant.endswith("-keepinput")
    triton_lora.DIRECT_LAUNCH = not variant.endswith("-jitlaunch")
    return variant, fused_optimizer


@dataclass(frozen=True)
class Spec:
    layers: int = 16
    hidden: int = 2048
    intermediate: int = 8192
    heads: int = 32
    kv_heads: int = 8
    vocab: int = 32000
    batch: int = 4
    seq: int = 2048
    rank: int = 16
    alpha: float = 32.0


# ----------------------------------------------------------------------------------------------- check
def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def _case_errors(
    names: Sequence[str],
    got: Sequence[torch.Tensor | None],
    want: Sequence[torch.Tensor | None],
    dtype: torch.dtype,
) -> tuple[dict, bool]:
    """Relative error per output against the float64 reference, and whether the worst is within
    ``CHECK_TOL[dtype]``. A tensor on one side only, or a non-finite one, counts as an infinite error;
    None on both sides (a frozen factor's gradient) is not compared."""
    errs = {}
    for name, g, w in zip(names, got, want, strict=True):
        if w is None:
            errs[name] = None if g is None else float("inf")
        else:
            errs[name] = _rel(g, w) if g is not None and torch.isfinite(g).all() else float("inf")
    worst = max(e for e in errs.values() if e is not None)
    return errs, worst <= CHECK_TOL[dtype]


def _both_launches(run: Callable[[], list]) -> list[list]:
    """``run()`` twice with empty kernel caches: the first launches each Triton kernel through Triton, the
    second directly through the compiled kernel of the first (``triton_lora.DIRECT_LAUNCH``). Afterwards the
    library switches are back at lorakit's defaults (the check cases set some before calling)."""
    if triton_lora.AVAILABLE:
        triton_lora._COMPILED.clear()
    try:
        return [run() for _ in ("triton launch", "direct launch")]
    finally:
        set_library_flags("lorakit")


def _worse_of(
    names: Sequence[str],
    runs: Sequence[Sequence[torch.Tensor | None]],
    want: Sequence[torch.Tensor | None],
    dtype: torch.dtype,
) -> tuple[dict, bool]:
    """:func:`_case_errors` over several runs of one case: the worst error per output, and whether every run
    is within tolerance."""
    checked = [_case_errors(names, got, want, dtype) for got in runs]
    errs = {k: max((e[k] for e, _ in checked if e[k] is not None), default=None) for k in names}
    return errs, all(passed for _, passed in checked)


FUSED_CHECK_SHAPES = {False: (1024, 3072), True: (2048, 768)}  # (in, out) of the Linear and Conv1D cases


def check_fused(device: str, tokens: int = 4096, rank: int = 16) -> dict:
    """Fused path (bf16 and fp32 on ``device``) vs the reference in float64, fresh random inputs per case, at
    LoRA rank ``rank``. Each case runs twice (:func:`_both_launches`); the worse run counts."""
    results, ok = [], True
    folded_runs = (
        triton_gemm.AVAILABLE
        and triton_gemm.supports_device(torch.device(device))  # Hopper
        # the folded GEMM's limits on the rank (forward: K = in, N = out; backward: the other way round)
        and all(triton_gemm.supports(torch.bfloat16, k, n, rank) for k, n in FUSED_CHECK_SHAPES.values())
    )
    cases = [
        (dtype, train, transposed, strategy, p)
        for dtype in (torch.bfloat16, torch.float32)
        for train in ("AB", "B", "A")
        for transposed in (False, True)
        for strategy, p in (
            ("merged", 0.0),
            ("merged+saved", 0.0),
            ("merged+cublasgrad", 0.0),  # G and dB by cuBLAS (GRAD_PASS_IN_EAGER off)
            # dX on the rebuilt merged weight also where (G·sB) A + G W0 moves fewer bytes: the Linear case
            # (T = 4096 < 2·out) runs without it otherwise (UNMERGED_INPUT_GRAD off)
            ("merged+remerge", 0.0),
            ("addmm", 0.0),
            ("folded", 0.0),  # the Triton GEMM with the LoRA slice folded in (half precision only)
            ("auto", 0.1),
        )
        if strategy != "folded" or (dtype != torch.float32 and folded_runs)
    ]
    gen = torch.Generator(device=device).manual_seed(1234)
    for dtype, train, transposed, strategy, p in cases:
        (in_f, out_f), r = FUSED_CHECK_SHAPES[transposed], rank
        x = torch.randn(tokens // 2, 2, in_f, device=device, generator=gen).to(dtype)
        w_shape = (in_f, out_f) if transposed else (out_f, in_f)
        w = (torch.randn(w_shape, device=device, generator=gen) / in_f**0.5).to(dtype)
        bias = torch.randn(out_f, device=device, generator=gen).to(dtype)
        a = torch.randn(r, in_f, device=device, generator=gen) / in_f**0.5
        b = torch.randn(out_f, r, device=device, generator=gen) * 0.1
        g = torch.randn(tokens // 2, 2, out_f, device=device, generator=gen).to(dtype)
        mask = dropout_mask(x, p) if p > 0 else None

        def run(
            fn,
            cast,
            x=x,
            w=w,
            bias=bias,
            a=a,
            b=b,
            g=g,
            mask=mask,
            p=p,
            train=train,
            transposed=transposed,
            **kw,
        ):
            xs = x.detach().to(cast).clone().requires_grad_(True)
            factor = torch.float64 if cast == torch.float64 else torch.float32
            a_ = a.detach().to(factor).clone().requires_grad_("A" in train)
            b_ = b.detach().to(factor).clone().requires_grad_("B" in train)
            y = fn(xs, w.to(cast), bias.to(cast), a_, b_, 2.0, p, p > 0, transposed, dropout_mask=mask, **kw)
            y.backward(g.to(cast))
            return [y, xs.grad, a_.grad, b_.grad]

        fused.GRAD_PASS_IN_EAGER = not strategy.endswith("+cublasgrad")
        fused.UNMERGED_INPUT_GRAD = not strategy.endswith("+remerge")
        runs = _both_launches(
            partial(
                run,
                lora_linear,
                dtype,
                strategy=strategy.split("+")[0],
                save_merged_weight=strategy.endswith("+saved"),
            )
        )
        want = run(reference_lora_linear, torch.float64)
        errs, passed = _worse_of(("y", "dx", "dA", "dB"), runs, want, dtype)
        ok &= passed
        results.append(
            {
                "dtype": str(dtype),
                "train": train,
                "conv1d": transposed,
                "strategy": strategy,
                "dropout": p,
                "rel_err": errs,
                "pass": passed,
            }
        )
    return {"ok": ok, "cases": results}


def check_product(device: str, tokens: int = 4096, rank: int = 16) -> dict:
    """A layer whose input is the product of two tensors that require grad (``down_proj(act(gate) * up)``,
    ``fused.RECOMPUTE_PRODUCT_INPUT``), and ``fused.lora_gated_linear`` given gate and up of
    ``silu(gate) * up``: outputs and the gradients of both factors, A and B against float64, bf16 and fp32,
    merged and addmm, at LoRA rank ``rank``. Each case runs twice (:func:`_both_launches`); the worse run
    counts. A bf16 case whose backward did not go through ``triton_lora.product_backward`` (where the
    kernel takes the rank) fails."""
    results, ok = [], True
    gen = torch.Generator(device=device).manual_seed(2468)
    in_f, out_f, r = 4096, 1024, rank
    launches = []
    if triton_lora.AVAILABLE:
        real = triton_lora.product_backward
        triton_lora.product_backward = lambda *args: launches.append(1) or real(*args)
    try:
        for dtype, train, strategy, gated in itertools.product(
            (torch.bfloat16, torch.float32), ("AB", "A"), ("merged", "addmm"), (False, True)
        ):
            left, right = (torch.randn(tokens // 2, 2, in_f, device=device, generator=gen) for _ in "ab")
            w = torch.randn(out_f, in_f, device=device, generator=gen) / in_f**0.5
            a = torch.randn(r, in_f, device=device, generator=gen) / in_f**0.5
            b = torch.randn(out_f, r, device=device, generator=gen) * 0.1
            g = torch.randn(tokens // 2, 2, out_f, device=device, generator=gen)

            def run(fn, cast, left=left, right=right, w=w, a=a, b=b, g=g, train=train, gated=gated, **kw):
                factor = torch.float64 if cast == torch.float64 else torch.float32
                ls, rs = (t.to(cast).clone().requires_grad_(True) for t in (left, right))
                a_ = a.to(factor).clone().requires_grad_("A" in train)
                b_ = b.to(factor).clone().requires_grad_("B" in train)
                if fn is lora_gated_linear:
                    y = fn(ls, rs, w.to(cast), None, a_, b_, 2.0, **kw)
                else:
                    y = fn(F.silu(ls) * rs if gated else ls * rs, w.to(cast), None, a_, b_, 2.0, **kw)
                y.backward(g.to(cast))
                return [y, ls.grad, rs.grad, a_.grad, b_.grad]

            launches.clear()
            layer = lora_gated_linear if gated else lora_linear
            runs = _both_launches(partial(run, layer, dtype, strategy=strategy))
            want = run(reference_lora_linear, torch.float64)
            errs, passed = _worse_of(("y", "d_left", "d_right", "dA", "dB"), runs, want, dtype)
            on_gpu_kernel = (
                dtype != torch.float32 and fused._use_triton("grad", left) and triton_lora.supports_rank(r)
            )
            kernel_ran = len(launches) == 2 or not on_gpu_kernel
            ok &= passed and kernel_ran
            results.append(
                {
                    "dtype": str(dtype),
                    "train": train,
                    "strategy": f"{strategy}+{'gated' if gated else 'productinput'}",
                    "rel_err": errs,
                    "pass": passed and kernel_ran,
                }
            )
    finally:
        if triton_lora.AVAILABLE:
            triton_lora.product_backward = real
    return {"ok": ok, "cases": results}


def _grouped_run(case: dict, cast: torch.dtype, train: str, group: bool) -> list[torch.Tensor | None]:
    """Outputs and gradients of three siblings on one input: grouped, or the reference per sibling."""
    factor = torch.float64 if cast == torch.float64 else torch.float32
    x = case["x"].detach().to(cast).clone().requires_grad_(True)
    factors_a = [a.detach().to(factor).clone().requires_grad_("A" in train) for a in case["A"]]
    factors_b = [b.detach().to(factor).clone().requires_grad_("B" in train) for b in case["B"]]
    weights, biases = [w.to(cast) for w in case["W"]], [b.to(cast) for b in case["bias"]]
    if group:
        ys = grouped.lora_linear_group(x, weights, biases, factors_a, factors_b, [2.0] * len(weights))
    else:
        siblings = zip(weights, biases, factors_a, factors_b, strict=True)
        ys = [reference_lora_linear(x, *args, 2.0) for args in siblings]
    torch.autograd.backward(ys, [g.to(cast) for g in case["grads"]])
    return [*ys, x.grad, *(t.grad for t in factors_a + factors_b)]


def check_grouped(device: str, tokens: int = 4096, rank: int = 16) -> dict:
    """Sibling groups (``grouped.lora_linear_group``, bf16 and fp32, with and without the one-pass G/dB
    kernel) vs the reference in float64 per sibling: three siblings of one input, with biases, at ``tokens``
    (T ≥ 2·Σout: backward's dX on the rebuilt merged weights) and ``tokens // 4`` (dX without them), at
    LoRA rank ``rank``. Each case runs twice (:func:`_both_launches`: Triton's launch, then the direct one);
    the worse run counts."""
    results, ok = [], True
    gen = torch.Generator(device=device).manual_seed(4321)
    in_f, outs, r = 1024, (1024, 256, 256), rank

    def randn(*shape: int, scale: float = 1.0) -> torch.Tensor:
        return torch.randn(shape, device=device, generator=gen) * scale

    for dtype, train, grad_pass, rows in itertools.product(
        (torch.bfloat16, torch.float32), ("AB", "B", "A"), (0, 1), (tokens, tokens // 4)
    ):
        case = {
            "x": randn(rows // 2, 2, in_f).to(dtype),
            "W": [randn(o, in_f, scale=in_f**-0.5).to(dtype) for o in outs],
            "bias": [randn(o).to(dtype) for o in outs],
            "A": [randn(r, in_f, scale=in_f**-0.5) for _ in outs],
            "B": [randn(o, r, scale=0.1) for o in outs],
            "grads": [randn(rows // 2, 2, o).to(dtype) for o in outs],
        }
        fused.GRAD_PASS_IN_EAGER = bool(grad_pass)
        runs = _both_launches(partial(_grouped_run, case, dtype, train, group=True))
        want = _grouped_run(case, torch.float64, train, group=False)
        n = len(outs)
        names = (
            [f"y{i}" for i in range(n)] + ["dx"] + [f"dA{i}" for i in range(n)] + [f"dB{i}" for i in range(n)]
        )
        errs, passed = _worse_of(names, runs, want, dtype)
        ok &= passed
        strategy = ("grouped" if grad_pass else "grouped+cublasgrad") + (
            "" if fused._merge_for_input_grad(rows, sum(outs)) else "+unmergeddx"
        )
        results.append(
            {"dtype": str(dtype), "train": train, "strategy": strategy, "rel_err": errs, "pass": passed}
        )
    return {"ok": ok, "cases": results}


def compile_check(
    device: str,
    save_merged_weight: bool = False,
    folded: bool = False,
    liger: bool = False,
    rank: int = 16,
) -> dict:
    """``torch.compile(block, fullgraph=True)`` on one adapted Llama decoder layer at LoRA rank ``rank``:
    runs, matches eager (with ``folded``, both run the folded GEMM: ``fused.FOLDED_GEMM``; with ``liger``,
    both run liger's kernels, and the compile may break the graph at them)."""
    with liger_scope(liger):
        import lorakit

        spec = Spec(layers=1, hidden=1024, intermediate=4096, heads=16, kv_heads=4, batch=2, seq=512)
        model = build_model(spec, device)
        if liger:
            from lorakit.train.liger import apply_liger_kernels

            apply_liger_kernels(model)
        model.requires_grad_(False)
        config = lorakit.LoraConfig(
            r=rank, alpha=2 * rank, targets=TARGETS, save_merged_weight=save_merged_weight
        )
        lorakit.inject(model, config)
        with torch.no_grad():
            for _, layer in lorakit.lora_layers(model):
                layer.lora_B.normal_(0, 1e-2)
        block = model.model.layers[0]
        x = torch.randn(
            spec.batch, spec.seq, spec.hidden, device=device, dtype=torch.bfloat16, requires_grad=True
        )
        pos = torch.arange(spec.seq, device=device)[None].expand(spec.batch, -1)
        rope = model.model.rotary_emb(x, pos)

        def run(fn: Callable) -> list[torch.Tensor]:
            x.grad = None
            model.zero_grad(set_to_none=True)
            out = fn(x, position_embeddings=rope)
            out = out[0] if isinstance(out, tuple) else out
            out.float().square().mean().backward()
            grads = [p.grad for p in model.parameters() if p.requires_grad]
            return [out.detach(), x.grad.clone()] + [g.clone() for g in grads]

        settings = {"save_merged_weight": save_merged_weight, "folded": folded, "liger": liger, "rank": rank}
        fused.FOLDED_GEMM = folded
        try:
            eager = run(block)
            compiled = run(torch.compile(block, fullgraph=not liger))
            errs = [_rel(c, e) for c, e in zip(compiled, eager, strict=True)]
            return {"ok": max(errs) <= 1e-2, "worst_rel_err": max(errs), **settings}
        except Exception as error:  # report, don't crash the benchmark
            return {"ok": False, "error": f"{type(error).__name__}: {error}"[:500], **settings}
        finally:
            fused.FOLDED_GEMM = False


# ----------------------------------------------------------------------------------------------- models
def build_model(spec: Spec, device: str) -> torch.nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        hidden_size=spec.hidden,
        intermediate_size=spec.intermediate,
        num_hidden_layers=spec.layers,
        num_attention_heads=spec.heads,
        num_key_value_heads=spec.kv_heads,
        vocab_size=spec.vocab,
        max_position_embeddings=spec.seq,
        use_cache=False,
    )
    torch.manual_seed(0)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        with torch.device(device):
            model = LlamaForCausalLM(config)
    finally:
        torch.set_default_dtype(previous)
    return model.train()


def apply_variant(model: torch.nn.Module, variant: str, spec: Spec) -> torch.nn.Module:
    """Add the variant's adapters; lora_B gets small random values everywhere (no GEMM on zeros)."""
    model.requires_grad_(False)
    gen = torch.Generator(device="cpu").manual_seed(42)
    if variant == "no-adapter":
        model.enable_input_require_grads()  # frozen forward + input-gradient backward
        return model
    if variant.startswith("peft"):
        from peft import LoraConfig, get_peft_model

        cfg = LoraConfig(r=spec.rank, lora_alpha=spec.alpha, target_modules=TARGETS, lora_dropout=0.0)
        model = get_peft_model(model, cfg, autocast_adapter_dtype=(variant == "peft-default"))
        with torch.no_grad():
            for name, param in model.named_parameters():
                if "lora_B" in name:
                    param.copy_(torch.randn(param.shape, generator=gen) * 1e-3)
                if "lora_A" in name and variant.endswith("frozenA"):
                    param.requires_grad_(False)
        return model
    import lorakit

    frozen_a = variant.startswith("lorakit-frozenA")
    cfg = lorakit.LoraConfig(
        r=spec.rank,
        alpha=spec.alpha,
        targets=TARGETS,
        init="orthonormal-a" if frozen_a else "lora",
        train="B" if frozen_a else "AB",
        kernel="reference" if variant == "lorakit-reference" else "fused",
        save_merged_weight="-savemerged" in variant,
        group_siblings="-ungrouped" not in variant,
    )
    lorakit.inject(model, cfg)
    if variant.endswith("-nogated"):
        gated_mlp.detach(model)
    with torch.no_grad():
        for _, layer in lorakit.lora_layers(model):
            layer.lora_B.copy_(torch.randn(layer.lora_B.shape, generator=gen) * 1e-3)
    return model


def describe_dtypes(model: torch.nn.Module) -> dict:
    trainable = [p for p in model.parameters() if p.requires_grad]
    return {
        "trainable_params": sum(p.numel() for p in trainable),
        "trainable_dtypes": sorted({str(p.dtype) for p in trainable}),
    }


# ----------------------------------------------------------------------------------------------- timing
def make_step(
    model: torch.nn.Module,
    ids: torch.Tensor,
    compiled: bool,
    fused_optimizer: bool = False,
    compile_mode: str = "default",
) -> tuple[Callable[[], float], object]:
    params = [p for p in model.parameters() if p.requires_grad]
    opt_kwargs = {"fused": True} if fused_optimizer else {}
    opt = torch.optim.AdamW(params, lr=1e-4, **opt_kwargs) if params else None
    forward = torch.compile(model, mode=compile_mode) if compiled else model

    def step() -> float:
        loss = forward(input_ids=ids, labels=ids).loss
        loss.backward()
        if opt is not None:
            opt.step()
            opt.zero_grad(set_to_none=True)
        return loss

    return step, opt


def prepare_variant(
    variant: str,
    spec: Spec,
    device: str,
    compiled: bool = False,
    generator: torch.Generator | None = None,
    compile_mode: str = "default",
) -> tuple[torch.nn.Module, torch.Tensor, Callable[[], float], object]:
    """``(model, ids, step, optimizer)`` for ``variant`` (optionally ending in a key of :data:`LIGER` and
    then ``-fusedopt``): lorakit's switches set for it (:func:`set_library_flags`), the model built (given
    liger's kernels for a liger suffix; run it inside :func:`liger_scope`) and adapted, random token ids, and
    :func:`make_step`'s training step (optimizer None without trainable parameters), compiled in
    ``compile_mode`` if ``compiled``."""
    base, fused_optimizer = set_library_flags(variant)
    model = build_model(spec, device)
    if liger_suffix(variant):
        from lorakit.train.liger import apply_liger_kernels

        apply_liger_kernels(model, **LIGER[liger_suffix(variant)])
    model = apply_variant(model, base, spec)
    ids = torch.randint(0, spec.vocab, (spec.batch, spec.seq), device=device, generator=generator)
    step, opt = make_step(model, ids, compiled, fused_optimizer, compile_mode)
    return model, ids, step, opt


def variants_parser(description: str, out: str, variants: str) -> argparse.ArgumentParser:
    """``--variants`` (comma-separated variants of this script, default ``variants``), ``--layers`` and
    ``--out`` (JSON path, default ``out``; a Markdown rendering goes beside it): the command line of the
    scripts that profile whole steps per variant."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--variants", default=variants, help="comma-separated throughput.py variants")
    parser.add_argument("--layers", type=int, default=Spec.layers, help="decoder layers of the model")
    parser.add_argument("--out", type=Path, default=Path(out), help="JSON of every row (.md beside it)")
    return parser


def write_report(out: Path, data: dict, text: str) -> None:
    """``data`` as JSON at ``out`` and ``text`` as Markdown beside it (``.md``), each written atomically."""
    atomic_write_json(out, data)
    with atomic_write(out.with_suffix(".md")) as handle:
        handle.write(text)


def timed(step: Callable, steps: int) -> list[float]:
    times = []
    for _ in range(steps):
        torch.cuda.synchronize()
        start = time.perf_counter()
        step()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return times


def run_mode(compiled: bool, compile_mode: str = "default") -> str:
    """A run's mode as results name it: "eager", "compile", or "compile-<mode>" for another
    ``torch.compile`` mode (``reduce-overhead``: CUDA graphs)."""
    if not compiled:
        return "eager"
    return "compile" if compile_mode == "default" else f"compile-{compile_mode}"


def measure(
    spec: Spec,
    variant: str,
    compiled: bool,
    device: str,
    warmup: int,
    steps: int,
    repeats: int,
    profile_to: Path | None = None,
    compile_mode: str = "default",
) -> dict:
    gc.collect()
    torch.cuda.empty_cache()
    torch._dynamo.reset()
    with liger_scope(bool(liger_suffix(variant))):  # the run uses what liger patches
        model, _, step, opt = prepare_variant(
            variant, spec, device, compiled, torch.Generator(device=device).manual_seed(7), compile_mode
        )
        info = describe_dtypes(model)
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        t0 = time.perf_counter()
        loss0 = float(step())
        torch.cuda.synchronize()
        first_step_s = time.perf_counter() - t0
        for _ in range(warmup - 1):
            step()
        runs = [timed(step, steps) for _ in range(repeats)]
        peak = torch.cuda.max_memory_allocated() / 2**30
        if profile_to is not None:
            profile_steps(step, profile_to, f"{variant} {'compiled' if compiled else 'eager'}")
        tokens = spec.batch * spec.seq
        all_times = [t for run in runs for t in run]
        med = statistics.median(all_times)
        result = {
            "variant": variant,
            "mode": run_mode(compiled, compile_mode),
            "spec": asdict(spec),
            "tok_per_s": tokens / med,
            "step_ms": med * 1e3,
            "runs_tok_per_s": [tokens / statistics.median(run) for run in runs],
            "peak_gib": peak,
            "first_step_s": first_step_s,
            "first_loss": loss0,
            "steps_per_run": steps,
            **info,
        }
        del step, opt, model
        return result


def profile_steps(step: Callable, path: Path, title: str) -> None:
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(2):
            step()
        torch.cuda.synchronize()
    averages = prof.key_averages()
    table = averages.table(sort_by="cuda_time_total", row_limit=30, max_name_column_width=70)
    # each kernel on its own (Triton's, cuBLAS's, elementwise), largest GPU time first
    kernels = averages.table(sort_by="self_cuda_time_total", row_limit=60, max_name_column_width=70)
    with path.open("a", encoding="utf-8") as handle:
        handle.write(f"\n### {title} (2 steps)\n{table}\n\n#### by self GPU time\n{kernels}\n")


# ----------------------------------------------------------------------------------------------- micro
def micro(device: str, tokens: int, rank: int) -> list[dict]:
    """One adapted projection, fwd+bwd, bf16, Llama-2048 shapes: base only vs fused vs reference."""
    from triton.testing import do_bench

    rows = []
    shapes = {"q/o": (2048, 2048), "k/v": (2048, 512), "gate/up": (2048, 8192), "down": (8192, 2048)}
    for name, (in_f, out_f) in shapes.items():
        x = torch.randn(tokens, in_f, device=device, dtype=torch.bfloat16, requires_grad=True)
        w = torch.randn(out_f, in_f, device=device, dtype=torch.bfloat16) / in_f**0.5
        g = torch.randn(tokens, out_f, device=device, dtype=torch.bfloat16)
        row = {"proj": name, "in": in_f, "out": out_f, "tokens": tokens}
        for train in ("AB", "B"):
            a = (torch.randn(rank, in_f, device=device) / in_f**0.5).requires_grad_("A" in train)
            b = (torch.randn(out_f, rank, device=device) * 1e-3).requires_grad_(True)

            def bench(fn: Callable, tensors: tuple = (x, w, a, b, g)) -> float:
                xx, ww, aa, bb, gg = tensors

                def go() -> None:
                    fn(xx, ww, None, aa, bb, 2.0).backward(gg)
                    xx.grad = aa.grad = bb.grad = None

                return do_bench(go, warmup=25, rep=100, return_mode="median")

            row["base_ms"] = bench(lambda x_, w_, *_: torch.nn.functional.linear(x_, w_))
            row[f"fused_{train}_ms"] = bench(lora_linear)
            row[f"addmm_{train}_ms"] = bench(partial(lora_linear, strategy="addmm"))
            row[f"reference_{train}_ms"] = bench(reference_lora_linear)
        rows.append(row)
    return rows


# ----------------------------------------------------------------------------------------------- report
def add_ratios(runs: list[dict]) -> None:
    def find(variant: str, mode: str, spec: dict, sweep: str | None) -> dict | None:
        return next(
            (
                r
                for r in runs
                if r["variant"] == variant
                and r["mode"] == mode
                and r["spec"] == spec
                and r.get("sweep") == sweep
            ),
            None,
        )

    for run in runs:
        variant, fused_optimizer = base_variant(run["variant"])
        liger = liger_suffix(run["variant"])  # baselines with the same whole-model kernels
        suffix = liger + (FUSED_OPTIMIZER if fused_optimizer else "")  # and PEFT with the same optimizer
        for key, other in (
            ("vs_peft_bf16", "peft-bf16" + suffix),
            ("vs_no_adapter", "no-adapter" + liger),
            ("vs_peft_default", "peft-default" + suffix),
        ):
            ref = find(other, run["mode"], run["spec"], run.get("sweep"))
            run[key] = run["tok_per_s"] / ref["tok_per_s"] if ref else None
        peer = find(PEER.get(variant, "") + suffix, run["mode"], run["spec"], run.get("sweep"))
        run["peak_vs_peer"] = run["peak_gib"] / peer["peak_gib"] if peer else None
        if variant in TARGET_VS_NONE and run["vs_no_adapter"] is not None and not liger:
            run["target_vs_no_adapter"] = TARGET_VS_NONE[variant]
            run["meets_target"] = run["vs_no_adapter"] >= TARGET_VS_NONE[variant]


def _fmt(value: float | None, spec: str = ".3f") -> str:
    return "–" if value is None else format(value, spec)


def table(runs: list[dict]) -> str:
    head = (
        "| mode | variant | tok/s | runs tok/s | step ms | peak GiB | × PEFT-bf16 | × PEFT default "
        "| × no-adapter | target × no-adapter | peak ÷ PEFT peer |\n"
        "|---|---|---|---|---|---|---|---|---|---|---|\n"
    )
    lines = []
    for r in runs:
        target = ""
        if "target_vs_no_adapter" in r:
            target = f"≥ {r['target_vs_no_adapter']:.2f}: {'met' if r['meets_target'] else 'MISSED'}"
        lines.append(
            f"| {r['mode']} | {r['variant']} | {r['tok_per_s'] / 1e3:.1f}k | "
            + " / ".join(f"{v / 1e3:.1f}k" for v in r["runs_tok_per_s"])
            + f" | {r['step_ms']:.1f} | {r['peak_gib']:.2f} | {_fmt(r['vs_peft_bf16'])}"
            f" | {_fmt(r['vs_peft_default'])}"
            f" | {_fmt(r['vs_no_adapter'])} | {target} | {_fmt(r['peak_vs_peer'])} |"
        )
    return head + "\n".join(lines) + "\n"


def sweep_table(rows: list[dict]) -> str:
    head = (
        "| sweep | layers | hidden | rank | variant | tok/s | step ms | peak GiB "
        "| × no-adapter | × PEFT-bf16 |\n"
        "|---|---|---|---|---|---|---|---|---|---|\n"
    )
    body = [
        f"| {r['sweep']} | {r['spec']['layers']} | {r['spec']['hidden']} | {r['spec']['rank']} "
        f"| {r['variant']} | {r['tok_per_s'] / 1e3:.1f}k | {r['step_ms']:.1f} | {r['peak_gib']:.2f} "
        f"| {_fmt(r['vs_no_adapter'])} | "
        f"{_fmt(r['vs_peft_bf16'])} |"
        for r in rows
    ]
    return head + "\n".join(body) + "\n"


def micro_table(rows: list[dict]) -> str:
    keys = [k for k in rows[0] if k.endswith("_ms")]
    head = "| proj (in→out) | " + " | ".join(keys) + " |\n|---|" + "---|" * len(keys) + "\n"
    body = [
        f"| {r['proj']} ({r['in']}→{r['out']}) | " + " | ".join(f"{r[k]:.3f}" for k in keys) + " |"
        for r in rows
    ]
    return head + "\n".join(body) + "\n"


def environment(device: str) -> dict:
    import peft
    import transformers

    env = {
        "gpu": torch.cuda.get_device_name(device),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "transformers": transformers.__version__,
        "peft": peft.__version__,
        "python": platform.python_version(),
        "command": " ".join(sys.argv),
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
    }
    with contextlib.suppress(ImportError):
        import triton

        env["triton"] = triton.__version__
    with contextlib.suppress(ImportError):
        from importlib.metadata import version

        env["liger_kernel"] = version("liger-kernel")
    return env


# ----------------------------------------------------------------------------------------------- main
def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    d = Spec()
    model_help = {
        "layers": "decoder layers",
        "hidden": "hidden size",
        "intermediate": "MLP size",
        "heads": "attention heads",
        "kv_heads": "key/value heads",
        "vocab": "vocabulary size",
        "batch": "sequences per step",
        "seq": "tokens per sequence",
        "rank": "LoRA rank r",
    }
    for field, text in model_help.items():
        default = getattr(d, field)
        parser.add_argument(
            f"--{field.replace('_', '-')}", type=int, default=default, help=f"{text} ({default})"
        )
    parser.add_argument("--alpha", type=float, default=d.alpha, help=f"LoRA alpha ({d.alpha:g})")
    parser.add_argument("--modes", default="eager,compile", help="comma list of eager, compile")
    parser.add_argument(
        "--compile-mode",
        default="default",
        choices=["default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"],
        help="torch.compile mode of the compile runs (reduce-overhead: CUDA graphs; results name the mode)",
    )
    parser.add_argument(
        "--variants",
        default=",".join(VARIANTS),
        help=f"comma list of {VARIANTS + EXTRA_VARIANTS}, each optionally ending in "
        f"{' or '.join(LIGER)} (liger-kernel's whole-model kernels) and then {FUSED_OPTIMIZER}",
    )
    parser.add_argument("--warmup", type=int, default=5, help="untimed steps before each timed run")
    parser.add_argument("--steps", type=int, default=20, help="timed steps per run (median)")
    parser.add_argument("--repeats", type=int, default=2, help="timed runs per variant")
    parser.add_argument("--sweep", default="", help="comma list of size, rank (eager, --sweep-layers layers)")
    parser.add_argument("--sweep-layers", type=int, default=4, help="decoder layers of the sweep models")
    parser.add_argument("--micro", action="store_true", help="per-projection fwd+bwd micro-benchmark")
    parser.add_argument("--profile", action="store_true", help="profiler tables for eager runs (profile.txt)")
    parser.add_argument("--skip-check", action="store_true", help="do not check (then lorakit is not timed)")
    parser.add_argument("--out", default="out/throughput.json", help="JSON results path")
    parser.add_argument(
        "--results", default="benchmarks/RESULTS.md", help="markdown file the table is appended to"
    )
    parser.add_argument("--title", default="", help="heading of the appended RESULTS.md section")
    parser.add_argument("--render", default="", help="only append the table of this saved JSON to --results")
    parser.add_argument("--compile-check", action="store_true", help="fullgraph compile of one adapted block")
    return parser.parse_args(argv)


def render(report: dict) -> str:
    """Markdown section for RESULTS.md from a report (also usable on a saved JSON, see --render)."""
    settings = report["settings"]
    env = report["env"]
    text = [
        f"\n## {settings['title'] or 'Throughput run'} ({env['date']})\n",
        f"GPU: {env['gpu']}; torch {env['torch']} (CUDA {env['cuda']}), transformers {env['transformers']}, "
        f"peft {env['peft']}, triton {env.get('triton', '–')}"
        + (f", liger-kernel {env['liger_kernel']}" if "liger_kernel" in env else "")
        + ".\n",
        f"Command: `{env['command']}`\n",
        f"Model: random-init Llama {json.dumps(settings['spec'])}, bf16, AdamW, "
        f"LoRA on {', '.join(TARGETS)}. tok/s = batch·seq / median step time over "
        f"{settings['repeats']}×{settings['steps']} timed steps after {settings['warmup']} warm-up steps, "
        "CUDA-synchronised per step.\n",
    ]
    if "check" in report:
        worst = {}
        for case in report["check"]["cases"]:
            errs = [e for e in case["rel_err"].values() if e is not None]
            worst[case["dtype"]] = max(worst.get(case["dtype"], 0.0), max(errs))
        text.append(
            f"Correctness check (fused vs float64 reference, {len(report['check']['cases'])} cases): "
            f"{'PASS' if report['check']['ok'] else 'FAIL'}; worst rel. err "
            + ", ".join(f"{k}: {v:.2e}" for k, v in worst.items())
            + "\n"
        )
    if report["runs"]:
        text.append("\n" + table(report["runs"]))
    if report["micro"]:
        text.append(
            "\nPer-projection forward+backward, bf16, T = batch·seq (ms, do_bench median):\n\n"
            + micro_table(report["micro"])
        )
    if report["sweeps"]:
        text.append(
            f"\nSweeps (eager, {settings['sweep_layers']} layers, same tokens per step):\n\n"
            + sweep_table(report["sweeps"])
        )
    if report.get("compile_check"):
        text.append(f"\nfullgraph compile check: {report['compile_check']}\n")
    return "".join(text)


def append_results(report: dict, results: Path) -> int:
    """Render ``report`` as a Markdown section, append it to ``results`` (atomically) and print it."""
    text = render(report)
    previous = results.read_text(encoding="utf-8") if results.exists() else "# Throughput results\n"
    with atomic_write(results) as handle:
        handle.write(previous + text)
    print(text)
    return 0


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    args = parse_args(argv)
    if args.render:
        report = json.loads(Path(args.render).read_text(encoding="utf-8"))
        add_ratios(report["runs"])
        add_ratios(report["sweeps"])
        return append_results(report, Path(args.results))
    if not torch.cuda.is_available():
        LOG.error("throughput.py needs a CUDA GPU")
        return 2
    device = "cuda"
    torch.backends.cuda.matmul.allow_tf32 = False
    spec = Spec(**{k: getattr(args, k) for k in asdict(Spec())})
    out = Path(args.out)
    settings = {
        "title": args.title,
        "repeats": args.repeats,
        "steps": args.steps,
        "warmup": args.warmup,
        "sweep_layers": args.sweep_layers,
        "compile_mode": args.compile_mode,
        "spec": asdict(spec),
    }
    report: dict = {"env": environment(device), "settings": settings, "runs": [], "sweeps": [], "micro": []}
    LOG.info("environment %s", report["env"])

    lorakit_ok = False
    if not args.skip_check:
        report["check"] = check_fused(device, rank=spec.rank)
        for extra in (check_grouped(device, rank=spec.rank), check_product(device, rank=spec.rank)):
            report["check"]["cases"] += extra["cases"]
            report["check"]["ok"] &= extra["ok"]
        lorakit_ok = report["check"]["ok"]
        for case in report["check"]["cases"]:
            LOG.info("check %s", case)
        if not lorakit_ok:
            LOG.error(
                "REFUSING to time lorakit: fused outputs/gradients disagree with the reference (see check)"
            )
    variants = [v for v in args.variants.split(",") if v]
    variants = [v for v in variants if lorakit_ok or not v.startswith("lorakit")]
    compiled_ok = True  # the compiled path has its own kernel (the one-pass G/dB), checked here when asked
    if args.compile_check and lorakit_ok:
        # one check per setting of save_merged_weight, the folded GEMM and liger among the lorakit variants
        settings = sorted(
            {
                ("-savemerged" in v, base_variant(v)[0].endswith("-folded"), liger_suffix(v) == "+liger")
                for v in variants
                if v.startswith("lorakit")
            }
        )
        report["compile_check"] = [
            compile_check(device, *s, rank=spec.rank) for s in settings or [(False, False, False)]
        ]
        LOG.info("compile check: %s", report["compile_check"])
        compiled_ok = all(check["ok"] for check in report["compile_check"])
        if not compiled_ok:
            LOG.error("REFUSING to time compiled lorakit: compiled block disagrees with eager (see check)")
    atomic_write_json(out, report)
    profile_path = out.with_name("profile.txt") if args.profile else None

    if args.micro and lorakit_ok:
        report["micro"] = micro(device, spec.batch * spec.seq, spec.rank)
        LOG.info("micro\n%s", micro_table(report["micro"]))
    for mode in [m for m in args.modes.split(",") if m]:
        for variant in variants:
            if mode == "compile" and variant.startswith("lorakit") and not compiled_ok:
                continue
            profiled = mode == "eager" and base_variant(variant)[0] in PROFILED
            prof = profile_path if profiled else None
            result = measure(
                spec,
                variant,
                mode == "compile",
                device,
                args.warmup,
                args.steps,
                args.repeats,
                prof,
                args.compile_mode,
            )
            report["runs"].append(result)
            add_ratios(report["runs"])
            LOG.info(
                "%s %s: %.1fk tok/s, %.1f ms, %.2f GiB (first step %.1f s)",
                mode,
                variant,
                result["tok_per_s"] / 1e3,
                result["step_ms"],
                result["peak_gib"],
                result["first_step_s"],
            )
            atomic_write_json(out, report)

    for sweep in [s for s in args.sweep.split(",") if s]:
        settings = (
            [
                replace(
                    spec,
                    layers=args.sweep_layers,
                    hidden=h,
                    intermediate=4 * h,
                    heads=h // 64,
                    kv_heads=h // 256,
                )
                for h in (1024, 2048, 4096)
            ]
            if sweep == "size"
            else [replace(spec, layers=args.sweep_layers, rank=r) for r in SWEEP_RANKS]
        )
        for setting in settings:
            names = ["no-adapter", "peft-bf16"] + (["lorakit", "lorakit-frozenA"] if lorakit_ok else [])
            for variant in names:
                result = measure(setting, variant, False, device, 3, max(args.steps, 20), 1)
                result["sweep"] = sweep
                report["sweeps"].append(result)
                add_ratios(report["sweeps"])
                LOG.info(
                    "sweep %s %s %s: %.1fk tok/s", sweep, asdict(setting), variant, result["tok_per_s"] / 1e3
                )
                atomic_write_json(out, report)

    return append_results(report, Path(args.results))


if __name__ == "__main__":
    raise SystemExit(main())
