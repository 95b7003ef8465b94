"""Gated MLPs whose down projection takes the two factors of its input.

A Llama-style MLP computes ``down_proj(silu(gate_proj(h)) * up_proj(h))``. With LoRA on ``down_proj`` and A
trained, dA = (G·sB)ᵀ x needs the product x in backward, the widest activation of the block (T × 8192 in a
Llama of hidden 2048). The activation and the multiplication keep gate and up for their own backward anyway,
so the down projection can keep those instead of x and form dA from them (:func:`fused.lora_gated_linear`).

In eager, :data:`fused.RECOMPUTE_PRODUCT_INPUT` finds the product by reading the autograd graph, for any
model. Under ``torch.compile`` there is no autograd graph to read while tracing, so :func:`attach` (run by
``inject``) gives each recognised gated MLP a forward that passes gate and up to the down projection
explicitly, under ``torch.compile`` only (:data:`UNDER_COMPILE`; in eager with :data:`IN_EAGER`). The
compiled partitioner then has nothing that needs x after forward: on an H100, a 16-layer Llama's compiled
step peaked at 11.77 against 13.77 GiB, at the same speed (benchmarks/RESULTS.md, "Gated MLPs under
torch.compile").

A module is recognised when its ``forward`` is, bytecode for bytecode, transformers' ``LlamaMLP.forward``
(which Mistral, Qwen2, Qwen3 and other models copy), its ``act_fn`` is a SiLU, and its ``down_proj`` is a
lorakit :class:`LoraLinear` with the fused kernel. Anything else keeps its own forward.
"""

from __future__ import annotations

import functools
import logging
from types import CodeType

import torch
from torch import nn

from lorakit.adapters.layers import LoraConv1D, LoraLinear

logger = logging.getLogger(__name__)

#: Route recognised gated MLPs through :func:`fused.lora_gated_linear` under ``torch.compile``.
UNDER_COMPILE = True
#: Also in eager. Off by default: eager already keeps the factors instead of x
#: (:data:`fused.RECOMPUTE_PRODUCT_INPUT`), and this route would also fuse the model's own activation
#: backward into the LoRA layer's pass, which a comparison of LoRA alone should not count.
IN_EAGER = False


@functools.cache
def _llama_mlp_code() -> CodeType | None:
    try:
        from transformers.models.llama.modeling_llama import LlamaMLP
    except ImportError:
        return None
    return LlamaMLP.forward.__code__


def _code_key(code: CodeType) -> tuple:
    """What makes two functions' code the same: bytecode, the names, constants and locals it uses."""
    return code.co_code, code.co_names, code.co_consts, code.co_varnames


def _is_silu(module: nn.Module) -> bool:
    # transformers' SiLUActivation is its own nn.Module subclass calling F.silu
    return isinstance(module, nn.SiLU) or type(module).__name__ == "SiLUActivation"


def is_gated_mlp(module: nn.Module) -> bool:
    """Whether ``module`` is a gated MLP whose down projection can take its input's factors (see the
    module docstring)."""
    down = getattr(module, "down_proj", None)
    if not (isinstance(down, LoraLinear) and not isinstance(down, LoraConv1D) and down.kernel == "fused"):
        return False  # checked first: the reference below imports transformers' Llama module
    reference = _llama_mlp_code()
    return (
        reference is not None
        and _code_key(type(module).forward.__code__) == _code_key(reference)
        and _is_silu(getattr(module, "act_fn", None))
    )


def _gated_forward(mlp: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``down_proj(silu(gate_proj(x)) * up_proj(x))``, the down projection given gate and up where
    :data:`UNDER_COMPILE` / :data:`IN_EAGER` say so."""
    routed = UNDER_COMPILE if torch.compiler.is_compiling() else IN_EAGER
    if routed:
        return mlp.down_proj.forward_gated(mlp.gate_proj(x), mlp.up_proj(x))
    return type(mlp).forward(mlp, x)


def attach(model: nn.Module) -> list[str]:
    """Give every recognised gated MLP in ``model`` the forward of :func:`_gated_forward` (an instance
    attribute, so the class and other instances are untouched); returns their names."""
    names = []
    for name, module in model.named_modules():
        if is_gated_mlp(module):
            # a partial of a module-level function, so the model still pickles and deep-copies
            module.forward = functools.partial(_gated_forward, module)
            names.append(name)
    if names:
        logger.debug("lorakit: %d gated MLP(s) take their down projection's input factors", len(names))
    return names


def detach(model: nn.Module) -> None:
    """Undo :func:`attach`: every module gets its class's forward back."""
    for module in model.modules():
        forward = module.__dict__.get("forward")
        if isinstance(forward, functools.partial) and forward.func is _gated_forward:
            del module.forward
