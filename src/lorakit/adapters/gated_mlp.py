"""Gated MLPs whose down projection takes the two factors of its input.

A Llama-style MLP computes ``down_proj(silu(gate_proj(h)) * up_proj(h))``. With LoRA on ``down_proj`` and A
trained, dA = (G·sB)ᵀ x needs the product x in backward, the widest activation of the block (T × 8192 in a
Llama of hidden 2048). The activation and the multiplication keep gate and up for their own backward anyway,
so the down projection can keep those instead of x and form dA from them (:func:`fused.lora_gated_linear`).

In eager, :data:`fused.RECOMPUTE_PRODUCT_INPUT` finds the product by reading the autograd graph, for any
model. Under ``torch.compile`` there is no autograd graph to read while tracing, so :func:`attach` (run by
``inject``) makes each recognised gated MLP an instance of a subclass of its class whose forward passes gate
and up to the down projection explicitly, under ``torch.compile`` only (:data:`UNDER_COMPILE`; in eager
with :data:`IN_EAGER`). The compiled partitioner then has nothing that needs x after forward: on an H100, a
16-layer Llama's compiled step peaked at 11.77 against 13.77 GiB, at the same speed (benchmarks/RESULTS.md,
"Gated MLPs under torch.compile").

A module is recognised when its ``down_proj`` is a lorakit :class:`LoraLinear` with the fused kernel and
the forward it runs (its own, where one is bound to the instance, else its class's) is either, bytecode
for bytecode, transformers' ``LlamaMLP.forward`` (which Mistral, Qwen2, Qwen3 and other models copy) with a
SiLU ``act_fn``, or liger-kernel's ``LigerSwiGLUMLP.forward`` (:mod:`lorakit.train.liger`). Anything else
keeps its own forward. liger's MLPs are routed in eager too (:data:`LIGER_IN_EAGER`): their SiLU-multiply
Function hides the product from the eager rule, and liger already fuses the activation's backward, which
lorakit's pass then does instead.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable
from types import CodeType, MethodType

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
#: Route liger-kernel's SwiGLU MLPs in eager, where the down projection's A is trained (see the module
#: docstring).
LIGER_IN_EAGER = True


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


def _is_liger_swiglu(forward: Callable) -> bool:
    if getattr(forward, "__qualname__", None) != "LigerSwiGLUMLP.forward":
        return False  # checked first: the import below loads liger's Triton kernels
    try:
        from liger_kernel.transformers.swiglu import LigerSwiGLUMLP
    except ImportError:
        return False
    return forward is LigerSwiGLUMLP.forward


# original class → its routed subclass, and back
_ROUTED: dict[type, type] = {}
_ORIGINAL: dict[type, type] = {}


def _own_forward(module: nn.Module) -> Callable | None:
    """The function ``module``'s forward runs: one bound to the instance (as liger binds its MLP's, also
    after :func:`attach`), the one :func:`attach` replaced, or its class's; None for anything else bound to
    the instance."""
    forward = module.__dict__.get("forward")
    if forward is not None:
        bound = isinstance(forward, MethodType) and forward.__self__ is module
        return forward.__func__ if bound else None
    if type(module) in _ORIGINAL:
        return module._lorakit_gated[0]
    return type(module).forward


def _kind(module: nn.Module) -> str | None:
    """Which recognised gated MLP ``module`` is, "liger" or "llama" (see the module docstring); None if
    none."""
    down = getattr(module, "down_proj", None)
    if not (isinstance(down, LoraLinear) and not isinstance(down, LoraConv1D) and down.kernel == "fused"):
        return None  # checked first: the references below import transformers' and liger's modules
    forward = _own_forward(module)
    if forward is None or not hasattr(forward, "__code__"):
        return None
    if _is_liger_swiglu(forward):
        return "liger"
    reference = _llama_mlp_code()
    if (
        reference is not None
        and _code_key(forward.__code__) == _code_key(reference)
        and _is_silu(getattr(module, "act_fn", None))
    ):
        return "llama"
    return None


def is_gated_mlp(module: nn.Module) -> bool:
    """Whether ``module`` is a gated MLP whose down projection can take its input's factors (see the
    module docstring)."""
    return _kind(module) is not None


def _routed_forward(self: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``down_proj(silu(gate_proj(x)) * up_proj(x))``: the down projection given gate and up where
    :data:`UNDER_COMPILE`, :data:`IN_EAGER` or :data:`LIGER_IN_EAGER` say so, else the MLP's own forward
    (``self._lorakit_gated``: that forward, and whether it is liger's)."""
    forward, liger = self._lorakit_gated
    if torch.compiler.is_compiling():
        routed = UNDER_COMPILE
    else:
        routed = IN_EAGER or (
            liger and LIGER_IN_EAGER and self.down_proj.lora_A.requires_grad and torch.is_grad_enabled()
        )
    if routed:
        return self.down_proj.forward_gated(self.gate_proj(x), self.up_proj(x))
    return forward(self, x)


def _reduce_routed(self: nn.Module, protocol: int) -> tuple:
    # pickle and deepcopy rebuild the routed subclass through the original class, which pickle can find
    return _new_routed, (_ORIGINAL[type(self)],), self.__dict__


def _new_routed(original: type) -> nn.Module:
    routed = _routed_class(original)
    return routed.__new__(routed)


def _routed_class(original: type) -> type:
    """The subclass of ``original`` whose forward is :func:`_routed_forward`, one per class. A class, not
    a forward bound to each instance: ``torch.compile`` guards on a module's class, as for the model's own
    modules, but on the identity of a per-instance callable, so a graph entered at each layer's MLP (after
    a graph break, or with layers compiled one by one) would recompile per layer."""
    routed = _ROUTED.get(original)
    if routed is None:
        namespace = {
            "forward": _routed_forward,
            "__reduce_ex__": _reduce_routed,
            "__module__": original.__module__,
            "__qualname__": original.__qualname__,
        }
        routed = type(original.__name__, (original,), namespace)
        _ROUTED[original], _ORIGINAL[routed] = routed, original
    return routed


def attach(model: nn.Module) -> list[str]:
    """Route every recognised gated MLP in ``model`` through :func:`_routed_forward`: its class becomes a
    subclass of its own with that forward (:func:`_routed_class`; other instances are untouched), and the
    forward it ran before is kept. Returns their names. Idempotent."""
    names = []
    for name, module in model.named_modules():
        kind = _kind(module)
        if kind is not None:
            forward = _own_forward(module)
            module.__dict__.pop("forward", None)  # one bound to the instance (liger's) is kept below
            module._lorakit_gated = (forward, kind == "liger")
            module.__class__ = _routed_class(_ORIGINAL.get(type(module), type(module)))
            names.append(name)
    if names:
        logger.debug("lorakit: %d gated MLP(s) take their down projection's input factors", len(names))
    return names


def detach(model: nn.Module) -> None:
    """Undo :func:`attach`: every routed MLP gets its class back, and a forward that was bound to the
    instance (such as liger's) is bound again."""
    for module in model.modules():
        original = _ORIGINAL.get(type(module))
        if original is None:
            continue
        forward, _ = module.__dict__.pop("_lorakit_gated")
        module.__class__ = original
        if forward is not original.forward:
            module.forward = MethodType(forward, module)
