"""Sibling LoRA projections that read the same input, as one autograd Function.

The q/k/v projections of an attention block read the same ``x``, and so do gate/up of a gated MLP. Run one
by one (:func:`lorakit.adapters.fused.lora_linear`), each adapted sibling reads ``x`` for its own
``u_i = x (s_i A_i)ᵀ`` in forward and again for ``dA_i = (G_i s_i B_i)ᵀ x`` in backward, and autograd sums
their input gradients with one elementwise pass per extra sibling (read two T×in tensors, write one). As a
group of n siblings (Hu et al. 2021's LoRA, ``W_i = W0_i + s_i B_i A_i`` merged as in the ``"merged"``
strategy of :mod:`lorakit.adapters.fused`):

    y_i    = x W_iᵀ + b_i                                 one GEMM per sibling, as before
    u      = x · [s_1 A_1; …; s_n A_n]ᵀ                    one pass over x for every u_i (T × Σr)
    dX     = Σ_i dY_i W_i                                 the first GEMM writes dX, the others add into it
                                                          in their epilogue (β = 1): no separate sum; or,
                                                          with fewer tokens than 2·Σout_i and every A
                                                          trained, Σ_i G_i A_i + dY_i W0_i without the
                                                          merged weights (fused._merge_for_input_grad)
    dA_cat = [dY_1 s_1 B_1, …, dY_n s_n B_n]ᵀ · x          one pass over x for every dA_i
    dB_i   = dY_iᵀ u_i

Per decoder layer of a Llama at hidden 2048 (T = 8192, bf16) that is two passes over x fewer for q/k/v
and one fewer for gate/up in each direction, and three elementwise sums fewer in backward.
:func:`lora_linear_group` runs it. :class:`SiblingGroup` finds at run time which adapted layers really
read one input: which ones do is a property of the model's forward, not of its module tree (o_proj sits
beside q/k/v and takes as many features, but reads the attention output).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import torch
from torch import nn

from lorakit.adapters import fused, triton_lora
from lorakit.adapters.layers import LoraConv1D, LoraLinear

logger = logging.getLogger(__name__)


class _LoraGroupFunction(torch.autograd.Function):
    """Forward/backward of n sibling LoRA linears on one input; see the module docstring.

    ``flags`` = (scalings, transposed, need_dx, train_a, train_b, save_merged_weight), where scalings,
    train_a and train_b have one entry per sibling. ``tensors`` = the n weights, n biases, n ``A`` and n
    ``B``, flattened (``apply`` takes tensors only as positional arguments).
    """

    @staticmethod
    def forward(
        ctx, x: torch.Tensor, flags: tuple, *tensors: torch.Tensor | None
    ) -> tuple[torch.Tensor, ...]:
        scalings, transposed, need_dx, train_a, train_b, save_merged_weight = flags
        n = len(scalings)
        weights, biases, factors_a, factors_b = (tensors[i * n : (i + 1) * n] for i in range(4))
        dtype = x.dtype
        x2 = fused._rows(x)
        # backward's dX = Σ_i G_i A_i + dY_i W0_i (G_i = dY_i s_iB_i), without the merged weights: only where
        # every G_i is computed for dA_i anyway (with A frozen, computing G cost what not merging saved on
        # an H100), and W0_i is in the activation dtype (casting it would cost the pass that is saved)
        unmerged_dx = (
            need_dx
            and all(train_a)
            and all(w.dtype == dtype for w in weights)
            and not fused._merge_for_input_grad(x2.shape[0], sum(b.shape[0] for b in factors_b))
        )
        keep = save_merged_weight and need_dx and not unmerged_dx  # only where backward would rebuild them
        merged, a_rows, b_scaled = _merge_siblings(
            weights,
            factors_a,
            factors_b,
            scalings,
            transposed,
            dtype,
            keep or unmerged_dx,
            stack_a=any(train_b),
        )
        outputs, kept = [], []
        for k, bias in enumerate(biases):
            bias = bias if bias is None or bias.dtype == dtype else bias.to(dtype)
            outputs.append(fused._as_output(fused._base(x2, merged[k], bias, transposed), x))
            kept += (merged[k] if keep else None, b_scaled[k] if keep or unmerged_dx else None)
        u = None  # [u_i for siblings whose B trains], T × Σr: one pass over x
        if any(train_b):
            if not all(train_b):
                parts = a_rows.split_with_sizes([a.shape[0] for a in factors_a])
                a_rows = torch.cat([part for part, t in zip(parts, train_b, strict=True) if t])
            u = x2 @ a_rows.t()
        ctx.save_for_backward(x2 if any(train_a) else None, u, *weights, *factors_a, *factors_b, *kept)
        ctx.flags = flags
        ctx.x_shape = x.shape
        ctx.set_materialize_grads(False)  # an unused sibling output costs no zero T×out gradient
        return tuple(outputs)

    @staticmethod
    def backward(ctx, *grads: torch.Tensor | None):
        scalings, transposed, need_dx, train_a, train_b, _ = ctx.flags
        n = len(scalings)
        x2, u, *saved = ctx.saved_tensors
        weights, factors_a, factors_b = saved[:n], saved[n : 2 * n], saved[2 * n : 3 * n]
        kept = saved[3 * n :]
        # forward kept the s_i B_i without the merged weights only for dX = Σ_i G_i A_i + dY_i W0_i
        unmerged_dx = kept[0] is None and kept[1] is not None
        dx = None
        d_a: list[torch.Tensor | None] = [None] * n
        if need_dx and not unmerged_dx and kept[0] is None:
            dtype = next(g for g in grads if g is not None).dtype
            merged, _, b_scaled = _merge_siblings(
                weights, factors_a, factors_b, scalings, transposed, dtype, True, stack_a=False
            )
            kept = [t for pair in zip(merged, b_scaled, strict=True) for t in pair]
        rows = [None if grad is None else fused._rows(grad) for grad in grads]
        if need_dx and not unmerged_dx:
            for g, merged_weight in zip(rows, kept[::2], strict=True):
                if g is not None:
                    w = merged_weight.t() if transposed else merged_weight
                    dx = g @ w if dx is None else dx.addmm_(g, w)
        b_s = [  # s_i B_i in the activation dtype, for the siblings whose G_i feeds dA_i or dX
            (kept[2 * i + 1] if kept[2 * i + 1] is not None else (factors_b[i] * scalings[i]).to(g.dtype))
            if (train_a[i] or unmerged_dx) and g is not None
            else None
            for i, g in enumerate(rows)
        ]
        gb_cat, with_g, d_b = _factor_grads(rows, b_s, u, train_b, factors_b)
        if unmerged_dx:  # the rank-Σr GEMM writes dX, each base GEMM adds dY_i W0_i into it (β = 1)
            a_cat = torch.cat([factors_a[i] for i in with_g]) if len(with_g) > 1 else factors_a[with_g[0]]
            dx = gb_cat @ a_cat.to(gb_cat.dtype)
            for g, weight in zip(rows, weights, strict=True):
                if g is not None:
                    dx.addmm_(g, weight.t() if transposed else weight)
        trained_a = [i for i in with_g if train_a[i]]
        if trained_a:  # one pass over x for every dA_i
            if len(trained_a) < len(with_g):
                parts = gb_cat.split_with_sizes([factors_a[i].shape[0] for i in with_g], 1)
                gb_cat = torch.cat([p for i, p in zip(with_g, parts, strict=True) if train_a[i]], dim=1)
            d_a_cat = fused._matmul_as(gb_cat.t(), x2, factors_a[trained_a[0]].dtype)
            widths = [factors_a[i].shape[0] for i in trained_a]
            for i, part in zip(trained_a, d_a_cat.split_with_sizes(widths), strict=True):
                d_a[i] = part
        if dx is not None:
            dx = dx.view(ctx.x_shape)
        return dx, None, *([None] * (2 * n)), *d_a, *d_b


def _factor_grads(
    rows: list[torch.Tensor | None],
    b_s: list[torch.Tensor | None],
    u: torch.Tensor | None,
    train_b: tuple[bool, ...],
    factors_b: Sequence[torch.Tensor],
) -> tuple[torch.Tensor | None, list[int], list[torch.Tensor | None]]:
    """``(G, siblings, dB)`` from the siblings' upstream gradients dY_i (``rows``, T × out_i, None where a
    sibling's output got none): G = [dY_i s_i B_i …] (T × Σr) over the listed siblings, those given an
    s_i B_i in ``b_s``; dB_i = dY_iᵀ u_i for each sibling whose B trains, else None.

    One launch of :func:`lorakit.adapters.triton_lora.lora_grad_pass_group` for the whole group where
    :func:`fused._grad_group_applies` (every sibling got a gradient and wants the same of G and dB); else
    each sibling on its own (:func:`fused._gb_and_db`) and one ``torch.cat``.
    """
    n = len(rows)
    with_g = [i for i in range(n) if b_s[i] is not None]
    if all(g is not None for g in rows) and len({b is None for b in b_s}) == len(set(train_b)) == 1:
        left = b_s if with_g else None
        stacked_u = u if train_b[0] else None
        ranks = tuple(f.shape[1] for f in factors_b)
        if fused._grad_group_applies(rows, left, stacked_u, max(ranks)):
            gb_cat, d_bs = triton_lora.lora_grad_pass_group(rows, left, stacked_u, ranks)
            if d_bs is None:
                return gb_cat, with_g, [None] * n
            d_b = [d if d.dtype == f.dtype else d.to(f.dtype) for d, f in zip(d_bs, factors_b, strict=True)]
            return gb_cat, with_g, d_b
    u_parts = _split_columns(u, [f.shape[1] for f, t in zip(factors_b, train_b, strict=True) if t])
    gbs, d_b = [], [None] * n
    for i, g in enumerate(rows):
        if g is None:
            continue
        u_i = u_parts[sum(train_b[:i])] if train_b[i] else None
        gb, d_b[i] = fused._gb_and_db(g, b_s[i], u_i, b_s[i] is not None, train_b[i], factors_b[i].dtype)
        if gb is not None:
            gbs.append(gb)
    gb_cat = torch.cat(gbs, dim=1) if len(gbs) > 1 else (gbs[0] if gbs else None)
    return gb_cat, with_g, d_b


def _merge_siblings(
    weights: Sequence[torch.Tensor],
    factors_a: Sequence[torch.Tensor],
    factors_b: Sequence[torch.Tensor],
    scalings: Sequence[float],
    transposed: bool,
    dtype: torch.dtype,
    scaled_b: bool,
    *,
    stack_a: bool,
) -> tuple[list[torch.Tensor], torch.Tensor | None, list[torch.Tensor | None]]:
    """Every sibling's ``W_i = W0_i + s_i B_i A_i`` in ``dtype``, all ``s_i A_i`` stacked (Σr × in), and
    ``s_i B_i`` per sibling (or Nones unless ``scaled_b``). The one launch writes the stack anyway; one
    merge each stacks it only with ``stack_a`` (else None), since backward has no use for it.

    In eager on CUDA, with contiguous ``nn.Linear`` weights and factors, one Triton launch for the whole
    group (:func:`lorakit.adapters.triton_lora.merge_lora_weights`); else one :func:`fused._merge` each.
    """
    weights = [w if w.dtype == dtype else w.to(dtype) for w in weights]
    if (
        fused._use_triton("merge", weights[0])
        and triton_lora.supports_rank(max(a.shape[0] for a in factors_a))
        and fused._one_launch_applies(transposed, (*weights, *factors_a, *factors_b))
    ):
        return triton_lora.merge_lora_weights(
            weights, list(factors_b), list(factors_a), list(scalings), scaled_b
        )
    merged, a_rows, b_rows = [], [], []
    for weight, lora_a, lora_b, scaling in zip(weights, factors_a, factors_b, scalings, strict=True):
        merged_weight, a_s, b_s = fused._merge(weight, lora_a, lora_b, scaling, transposed)
        merged.append(merged_weight)
        a_rows.append(a_s)
        b_rows.append(b_s if scaled_b else None)
    return merged, torch.cat(a_rows) if stack_a else None, b_rows


def _split_columns(t: torch.Tensor | None, widths: list[int]) -> tuple[torch.Tensor, ...]:
    return () if t is None else t.split_with_sizes(widths, 1)


def lora_linear_group(
    x: torch.Tensor,
    weights: Sequence[torch.Tensor],
    biases: Sequence[torch.Tensor | None],
    factors_a: Sequence[torch.Tensor],
    factors_b: Sequence[torch.Tensor],
    scalings: Sequence[float],
    transposed_weight: bool = False,
    *,
    save_merged_weight: bool = False,
) -> tuple[torch.Tensor, ...]:
    """``y_i = x W0_iᵀ + b_i + s_i (x A_iᵀ) B_iᵀ`` for n sibling projections of one input ``x``.

    The same function as n calls of :func:`lorakit.adapters.fused.lora_linear` with ``strategy="merged"``
    and no dropout, computed with one pass over ``x`` for all ``u_i`` and one for all ``dA_i``, and the input
    gradients summed inside the GEMMs (module docstring). The bases must be frozen. Returns one (..., out_i)
    tensor per sibling, each a separate (non-view) tensor.
    """
    n = len(weights)
    if not n or not (len(biases) == len(factors_a) == len(factors_b) == len(scalings) == n):
        raise ValueError(
            f"lora_linear_group: expected one weight, bias, A, B and scaling per sibling, got "
            f"{len(weights)}, {len(biases)}, {len(factors_a)}, {len(factors_b)}, {len(scalings)}"
        )
    for i, (weight, bias, lora_a, lora_b) in enumerate(
        zip(weights, biases, factors_a, factors_b, strict=True)
    ):
        try:
            fused._check_shapes(x, weight, bias, lora_a, lora_b, transposed_weight)
        except ValueError as error:
            raise ValueError(f"lora_linear_group: sibling {i}: {error}") from None
        if weight.requires_grad or (bias is not None and bias.requires_grad):
            raise ValueError(f"lora_linear_group: sibling {i} has a trainable base; group only frozen bases")
    grad_on = torch.is_grad_enabled()
    flags = (
        tuple(float(s) for s in scalings),
        bool(transposed_weight),
        grad_on and x.requires_grad,
        tuple(grad_on and a.requires_grad for a in factors_a),
        tuple(grad_on and b.requires_grad for b in factors_b),
        bool(save_merged_weight),
    )
    x, autocast = fused._autocast_input(x)
    return fused._apply(_LoraGroupFunction, autocast, x, flags, *weights, *biases, *factors_a, *factors_b)


class SiblingGroup:
    """Adapted linears under one parent module that take the same number of input features.

    Candidates only: the first forward (the probe) runs every member on its own and records the input
    tensor each one was called with. Members called with the very same tensor form a sharing set; from
    then on, the first member of a set to be called computes the whole set with :func:`lora_linear_group`
    and keeps the other members' outputs until each of them is called with that same tensor. A member
    called with anything else (another tensor, the same one modified in place, or twice in a row) ends its
    set's grouping for good, and every member runs on its own again: correct in every case, and grouped
    only while the model keeps reading one input. A set also runs member by member on a call where the
    merged strategy would not be picked (dropout active, few tokens as in decoding, a merged adapter).
    """

    def __init__(self, members: Sequence[nn.Module]) -> None:
        self.members = tuple(members)
        self._set_of: list[int | None] | None = None  # member -> its sharing set; None while probing
        self._sets: list[tuple[int, ...]] = []
        self._seen: list[tuple[int, torch.Tensor]] = []  # (member, input) of the probe
        self._pending: dict[int, tuple[torch.Tensor, int | None, list[torch.Tensor | None]]] = {}

    @property
    def sharing_sets(self) -> list[tuple[nn.Module, ...]]:
        """The sets of members that run grouped (empty until the probe has finished)."""
        if self._set_of is None:
            return []
        live = {s for s in self._set_of if s is not None}
        return [tuple(self.members[i] for i in self._sets[s]) for s in sorted(live)]

    def output(self, member: nn.Module, x: torch.Tensor) -> torch.Tensor | None:
        """``member``'s output for input ``x`` from a grouped call, or None: then the member runs alone.

        Always None under ``torch.compile``: there, on an H100, grouping did not change the step time and
        raised peak memory by 1.4 GiB (16-layer Llama; benchmarks/RESULTS.md, "Sibling groups"), so a
        compiled model runs every layer on its own, and the probe waits for an eager forward. Also None
        while saved-tensor hooks are active (non-reentrant activation checkpointing, offloading): the
        checkpoint's recomputation must save exactly what the forward saved, and a probe that ends between
        the two would change that.
        """
        if torch.compiler.is_compiling() or fused._saved_tensor_hooks_active():
            return None
        try:
            index = self.members.index(member)  # modules compare by identity
        except ValueError:
            return None  # a shallow copy of a member, e.g. an nn.DataParallel replica: it runs alone
        if self._set_of is None:
            self._probe(index, x)
            return None
        group = self._set_of[index]
        if group is None:
            return None
        pending = self._pending.get(group)
        position = self._sets[group].index(index)
        if pending is not None:
            first_input, version, outputs = pending
            if first_input is x and _version(x) == version and outputs[position] is not None:
                out, outputs[position] = outputs[position], None
                if all(o is None for o in outputs):
                    del self._pending[group]
                return out
            self._stop(group)
            return None
        layers = [self.members[i] for i in self._sets[group]]
        if not _merged_strategy_applies(layers, x):
            return None
        outputs = list(
            lora_linear_group(
                x,
                [layer.base_layer.weight for layer in layers],
                [layer.base_layer.bias for layer in layers],
                [layer.lora_A for layer in layers],
                [layer.lora_B for layer in layers],
                [layer.scaling for layer in layers],
                layers[0].transposed,
                save_merged_weight=layers[0].save_merged_weight,
            )
        )
        out, outputs[position] = outputs[position], None
        self._pending[group] = (x, _version(x), outputs)
        return out

    def _probe(self, index: int, x: torch.Tensor) -> None:
        if any(i == index for i, _ in self._seen):  # a second forward began before every member ran
            self._finish_probe()
            return
        self._seen.append((index, x))
        if len(self._seen) == len(self.members):
            self._finish_probe()

    def _finish_probe(self) -> None:
        sets: list[list[int]] = []
        inputs: list[torch.Tensor] = []
        for index, x in self._seen:
            match = next((k for k, seen in enumerate(inputs) if seen is x), None)
            if match is None:
                sets.append([index])
                inputs.append(x)
            else:
                sets[match].append(index)
        self._sets = [tuple(s) for s in sets if len(s) > 1]
        self._set_of = [None] * len(self.members)
        for k, members in enumerate(self._sets):
            for index in members:
                self._set_of[index] = k
        self._seen = []  # the probe held the inputs; let them go

    def _stop(self, group: int) -> None:
        self._pending.pop(group, None)
        for index in self._sets[group]:
            self._set_of[index] = None
        logger.info(
            "lorakit: %s no longer read one input tensor; they run one by one from now on",
            [type(self.members[i].base_layer).__name__ for i in self._sets[group]],
        )


def _version(x: torch.Tensor) -> int | None:
    """``x``'s in-place write counter; None for an inference tensor, which keeps none (then in-place writes
    between two siblings go unseen, as for any cache of inference outputs)."""
    return None if x.is_inference() else x._version


def _merged_strategy_applies(layers: Sequence[nn.Module], x: torch.Tensor) -> bool:
    """Whether each layer would run the ``"merged"`` strategy of :func:`fused.lora_linear` on ``x``."""
    tokens = x.numel() // x.shape[-1] if x.dim() else 0
    for layer in layers:
        weight = layer.base_layer.weight
        bias = layer.base_layer.bias
        if (
            layer.merged
            or layer.kernel != "fused"
            or (layer.training and layer.dropout_p > 0.0)
            or weight.requires_grad
            or (bias is not None and bias.requires_grad)
        ):
            return False
        in_f, out_f = layer.features_of(layer.base_layer)
        full_shape = (in_f, out_f) if layer.transposed else (out_f, in_f)
        # A sharded (FSDP, DTensor) or packed (quantised) weight of a sibling is not this call's to read:
        # each such layer runs alone, inside its own wrapper's forward.
        if type(weight) not in (torch.Tensor, nn.Parameter) or tuple(weight.shape) != full_shape:
            return False
        if x.shape[-1] != in_f:
            return False
        if fused._pick_strategy("auto", x, tokens, in_f, out_f, layer.r, False) != "merged":
            return False
    return True


def group_siblings(layers: Sequence[tuple[str, nn.Module]]) -> list[SiblingGroup]:
    """One :class:`SiblingGroup` per parent module for its fused LoRA linears of equal input width.

    ``layers`` are (qualified name, layer) pairs; each layer in a group gets it as ``sibling_group``.
    """
    candidates: dict[tuple, list[nn.Module]] = {}
    for name, layer in layers:
        # exact types: a subclass with other math (a new variant) must not run as plain LoRA
        if type(layer) not in (LoraLinear, LoraConv1D) or layer.kernel != "fused":
            continue
        parent = name.rpartition(".")[0]
        in_f = layer.features_of(layer.base_layer)[0]
        key = (parent, type(layer), in_f, layer.save_merged_weight)
        candidates.setdefault(key, []).append(layer)
    groups = []
    for members in candidates.values():
        if len(members) > 1:
            group = SiblingGroup(members)
            for layer in members:
                layer.sibling_group = group
            groups.append(group)
    return groups
