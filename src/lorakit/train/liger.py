"""Liger's whole-model kernels on an adapted transformers model.

liger-kernel (LinkedIn) replaces a transformers model's RMSNorm, rotary embedding, SwiGLU MLP and LM-head
cross-entropy with Triton kernels; the fused linear cross-entropy never materialises the T × vocab logits.
These speed up the frozen model's own work, which LoRA does not touch, so the benchmarks report them apart
from LoRA's own numbers (``benchmarks/RESULTS.md``, "Liger kernels").

:func:`apply_liger_kernels` applies them to one model instance through liger's own per-model-type function
and keeps two things true on top:

- every LoRA adapter still runs: the fused cross-entropy reads ``lm_head.weight`` directly, so a model
  with a LoRA on ``lm_head`` is refused unless ``fused_linear_cross_entropy=False``;
- the down projection of a SwiGLU MLP still takes gate and up instead of keeping its T × intermediate
  input (:mod:`lorakit.adapters.gated_mlp`). liger's SwiGLU Function would hide the product from lorakit's
  eager rule, so lorakit routes liger's MLPs through its own gated pass in eager too; it fuses the same
  activation backward that liger's Function does.

Either order works: before or after :func:`lorakit.inject`. As with liger's own functions, transformers'
module for the model type is patched too, so models of that type built later in the process also get
liger's RMSNorm, RoPE and MLP classes.
"""

from __future__ import annotations

import inspect
import logging
from typing import Any

import torch
from torch import nn

from lorakit.adapters import gated_mlp
from lorakit.adapters.inject import lora_layers

logger = logging.getLogger(__name__)

INSTALL_HINT = "pip install 'lorakit[liger]' (liger-kernel; its kernels need a CUDA GPU and Triton)"


def _liger_functions() -> dict[str, Any]:
    """liger's ``model_type → apply_liger_kernel_to_<type>`` table."""
    try:
        from liger_kernel.transformers.monkey_patch import MODEL_TYPE_TO_APPLY_LIGER_FN
    except ImportError as error:
        raise ImportError(f"apply_liger_kernels needs liger-kernel ({error}): {INSTALL_HINT}") from error
    return MODEL_TYPE_TO_APPLY_LIGER_FN


def unavailable_reason() -> str | None:
    """Why liger's kernels cannot run in this process (liger-kernel missing, no CUDA GPU), or None."""
    try:
        _liger_functions()
    except ImportError as error:
        return str(error)
    if not torch.cuda.is_available():
        return "liger-kernel's kernels run on CUDA GPUs only, and none is visible"
    return None


def _is_causal_lm(model: nn.Module) -> bool:
    return type(model).__name__.endswith("ForCausalLM") and hasattr(model, "lm_head")


def apply_liger_kernels(
    model: nn.Module,
    *,
    rope: bool = True,
    rms_norm: bool = True,
    swiglu: bool = True,
    fused_linear_cross_entropy: bool | None = None,
) -> nn.Module:
    """Apply liger-kernel's RMSNorm, RoPE, SwiGLU and fused linear cross-entropy to ``model`` in place.

    Args:
        model: a transformers model of a type liger supports (``model.config.model_type``: llama, mistral,
            qwen2, qwen3, gemma, phi3, …), with or without lorakit adapters.
        rope, rms_norm, swiglu: which of liger's kernels to use (options a model type lacks are ignored).
        fused_linear_cross_entropy: the LM head and the loss in one chunked kernel (no logits tensor in
            training). ``None``: on for ``*ForCausalLM`` models, off otherwise.

    Returns ``model``. Raises ``ImportError`` without liger-kernel, and ``ValueError`` naming the field at
    fault for a model type liger does not cover, for the fused cross-entropy on a model that is not a
    causal LM, or on one whose ``lm_head`` has a LoRA adapter (the kernel would skip it).
    """
    functions = _liger_functions()
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if model_type not in functions:
        raise ValueError(
            f"apply_liger_kernels: liger-kernel has no kernels for model.config.model_type={model_type!r} "
            f"({type(model).__name__}); it covers: {', '.join(sorted(functions))}"
        )
    if fused_linear_cross_entropy is None:
        fused_linear_cross_entropy = _is_causal_lm(model)
    if fused_linear_cross_entropy:
        if not _is_causal_lm(model):
            raise ValueError(
                f"apply_liger_kernels: fused_linear_cross_entropy=True needs a *ForCausalLM model with an "
                f"lm_head; got {type(model).__name__}"
            )
        adapted = [name for name, _ in lora_layers(model) if name.split(".")[-1] == "lm_head"]
        if adapted:
            raise ValueError(
                f"apply_liger_kernels: {adapted[0]!r} has a LoRA adapter, and the fused linear cross-entropy "
                "reads lm_head.weight directly, so it would train without it; pass "
                "fused_linear_cross_entropy=False"
            )
    apply = functions[model_type]
    options = {
        "rope": rope,
        "rms_norm": rms_norm,
        "swiglu": swiglu,
        "fused_linear_cross_entropy": fused_linear_cross_entropy,
        "cross_entropy": False,
    }
    accepted = inspect.signature(apply).parameters
    apply(model=model, **{k: v for k, v in options.items() if k in accepted})
    # liger bound its own forward to each MLP: adapted ones hand gate and up to the down projection again
    # (MLPs adapted later are routed by inject)
    routed = gated_mlp.attach(model)
    logger.info(
        "liger-kernel %s on %s; %d adapted gated MLP(s) routed through lorakit",
        ", ".join(k for k, v in options.items() if v and k in accepted),
        model_type,
        len(routed),
    )
    return model
