"""Put LoRA layers into a model, and take them out again.

``inject(model, config)`` replaces every targeted ``nn.Linear``, GPT-2 ``Conv1D`` or ``nn.Embedding``
by the matching :class:`~lorakit.adapters.layers.LoraLayer` (in place), freezes every base weight,
makes ``config.modules_to_save`` trainable and initialises the factors from ``(config.seed, path)``.
"""

from __future__ import annotations

import difflib
import fnmatch
import logging
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from lorakit.adapters import gated_mlp
from lorakit.adapters.grouped import group_siblings
from lorakit.adapters.init import initialise
from lorakit.adapters.layers import LoraConv1D, LoraEmbedding, LoraLayer, LoraLinear
from lorakit.config import LoraConfig
from lorakit.utils import named_generator

logger = logging.getLogger(__name__)

# Output heads that "all-linear" leaves alone (PEFT excludes the output embedding; we also keep task
# heads out, since they are usually trained in full through ``modules_to_save``).
HEAD_NAMES = frozenset({"lm_head", "classifier", "score", "qa_outputs", "cls"})


def _conv1d_type() -> type | None:
    try:
        from transformers.pytorch_utils import Conv1D
    except ImportError:
        return None
    return Conv1D


def layer_class_for(module: nn.Module) -> type[LoraLayer] | None:
    """The LoRA class that adapts ``module``, or None if lorakit does not support its type."""
    conv1d = _conv1d_type()
    if conv1d is not None and isinstance(module, conv1d):
        return LoraConv1D
    if isinstance(module, nn.Linear):
        return LoraLinear
    if isinstance(module, nn.Embedding):
        return LoraEmbedding
    return None


def name_matches(name: str, pattern: str) -> bool:
    """Match a module path against one pattern: ``re:<regex>``, a glob, or an exact path / dotted suffix."""
    if pattern.startswith("re:"):
        return re.fullmatch(pattern[3:], name) is not None
    if any(char in pattern for char in "*?["):
        return fnmatch.fnmatchcase(name, pattern)
    return name == pattern or name.endswith("." + pattern)


def _first_match(name: str, patterns: dict) -> object | None:
    return next((value for key, value in patterns.items() if name_matches(name, key)), None)


def _output_head_names(model: nn.Module) -> set[str]:
    heads = {name for name, _ in model.named_modules() if name and set(name.split(".")) & HEAD_NAMES}
    get_output = getattr(model, "get_output_embeddings", None)
    output = get_output() if callable(get_output) else None
    if output is not None:
        heads |= {name for name, module in model.named_modules() if module is output}
    return heads


def _read_by_parent(modules: dict[str, nn.Module], name: str) -> bool:
    """``nn.MultiheadAttention`` reads ``out_proj.weight`` itself instead of calling ``out_proj``, so a
    LoRA layer put there would be skipped silently."""
    parent = modules.get(name.rpartition(".")[0])
    return isinstance(parent, nn.MultiheadAttention)


def find_targets(model: nn.Module, config: LoraConfig) -> list[str]:
    """Paths of the modules ``config`` adapts; a clear error if none match or a match is unsupported.

    Modules inside a ``modules_to_save`` module are never adapted (as in PEFT): that module is trained and
    saved in full.
    """
    names = [name for name, _ in model.named_modules() if name]
    modules = dict(model.named_modules())
    excluded = {n for n in names if any(name_matches(n, p) for p in config.exclude)}
    saved = {n for n in names if any(name_matches(n, p) for p in config.modules_to_save)}
    excluded |= {n for n in names if n in saved or any(n.startswith(m + ".") for m in saved)}
    if config.targets == "all-linear":
        heads = _output_head_names(model)
        found = [
            n
            for n in names
            if n not in excluded
            and n not in heads
            and layer_class_for(modules[n]) in (LoraLinear, LoraConv1D)
            and not isinstance(modules[n], LoraLayer)
            and not _read_by_parent(modules, n)
        ]
        if not found:
            raise ValueError(
                f"LoraConfig.targets 'all-linear' matched no module of {type(model).__name__}: it has no "
                "torch.nn.Linear or GPT-2 Conv1D outside its output heads, exclude and modules_to_save"
            )
        return found
    matched = [n for n in names if n not in excluded and any(name_matches(n, p) for p in config.targets)]
    # Inside an already-adapted layer, "base_layer" is not a target of its own.
    matched = [n for n in matched if not isinstance(modules.get(n.rsplit(".", 1)[0]), LoraLayer)]
    if not matched:
        leaves = [n for n in names if layer_class_for(modules[n]) is not None]
        suffixes = sorted({n.rsplit(".", 1)[-1] for n in leaves})
        close = {c for t in config.targets for c in difflib.get_close_matches(t, suffixes + leaves, n=3)}
        hint = f" Closest module names: {sorted(close)}." if close else ""
        raise ValueError(
            f"LoraConfig.targets {list(config.targets)} matched no module of {type(model).__name__}.{hint} "
            f"Adaptable module names end in: {suffixes[:30]}"
        )
    for name in matched:
        if isinstance(modules[name], LoraLayer):
            raise ValueError(f"module '{name}' already has a LoRA adapter; call lorakit.unload(model) first")
        if _read_by_parent(modules, name):
            raise ValueError(
                f"module '{name}' is the output projection of a torch.nn.MultiheadAttention, whose forward "
                "reads its weight directly: an adapter there would never run (exclude it from the targets)"
            )
        if layer_class_for(modules[name]) is None:
            raise ValueError(
                f"module '{name}' matched LoraConfig.targets but is a {type(modules[name]).__name__}; "
                "lorakit adapts torch.nn.Linear, transformers' GPT-2 Conv1D and torch.nn.Embedding "
                "(use a more specific target name)"
            )
    return matched


def _set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, module)


def inject(model: nn.Module, config: LoraConfig) -> nn.Module:
    """Add LoRA adapters to ``model`` in place and return it.

    Base weights are frozen; only the trainable factors (``config.train``) and ``config.modules_to_save``
    require grad afterwards. The config is kept on the model as ``model.lora_config``. A model takes one
    config: injecting into a model that already has adapters is an error (``unload`` it first).
    """
    if not isinstance(config, LoraConfig):
        kind = type(config)
        raise TypeError(
            f"inject: expected a lorakit.LoraConfig, got {kind.__module__}.{kind.__qualname__}"
            + (
                "; build a lorakit.LoraConfig (lorakit.load reads PEFT checkpoints)"
                if "peft" in kind.__module__
                else ""
            )
        )
    adapted = [name for name, module in model.named_modules() if isinstance(module, LoraLayer)]
    if adapted:
        # A second call would freeze the first call's factors and leave model.lora_config (what checkpoints
        # save as the PEFT adapter config) describing only its own targets.
        raise ValueError(
            f"inject: {type(model).__name__} already has LoRA adapters on {len(adapted)} module(s), e.g. "
            f"'{adapted[0]}'; one LoraConfig describes all of a model's adapters (list every target in it, "
            "with rank_pattern/alpha_pattern for per-module ranks), or call lorakit.unload(model) first"
        )
    # Everything that can fail is checked before the model is touched, so a bad config leaves it as it was.
    targets = find_targets(model, config)
    saved = _modules_to_save(model, config)
    plans = []
    for name in targets:
        base = model.get_submodule(name)
        r = int(_first_match(name, config.rank_pattern) or config.r)
        alpha = float(_first_match(name, config.alpha_pattern) or config.alpha)
        layer_cls = layer_class_for(base)
        smallest = min(layer_cls.features_of(base))
        if r > smallest:
            raise ValueError(f"module '{name}': rank r={r} exceeds its smallest dimension {smallest}")
        plans.append((name, base, r, alpha, layer_cls))
    _turn_off_transformer_fastpath(model, targets)
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    for name, base, r, alpha, layer_cls in plans:
        layer = layer_cls(
            base,
            r=r,
            alpha=alpha,
            scaling=config.scale(r, alpha),
            dropout=config.dropout if layer_cls is not LoraEmbedding else 0.0,
            train_a=config.train_a,
            train_b=config.train_b,
            kernel=config.kernel,
            save_merged_weight=config.save_merged_weight,
        )
        generator = named_generator(config.seed, name)
        initialise(
            config.init,
            layer.lora_A.data,
            layer.lora_B.data,
            layer._base_weight_as_out_in().detach().float().cpu(),
            generator,
            embedding=layer_cls is LoraEmbedding,
        )
        _set_submodule(model, name, layer)
    if config.group_siblings:
        group_siblings([(name, model.get_submodule(name)) for name, *_ in plans])
    gated_mlp.attach(model)
    for name in saved:
        for parameter in model.get_submodule(name).parameters():
            parameter.requires_grad_(True)
    model.lora_config = config
    return model


def _turn_off_transformer_fastpath(model: nn.Module, targets: Sequence[str]) -> None:
    """torch's ``TransformerEncoderLayer`` inference fast path reads ``linear1.weight``/``linear2.weight``
    directly instead of calling the layers, which would skip their adapters without a word; turn it off
    (process-wide, logged) when an adapter sits inside one."""
    encoder_layers = [name for name, m in model.named_modules() if isinstance(m, nn.TransformerEncoderLayer)]
    inside = [t for t in targets if any(e == "" or t.startswith(e + ".") for e in encoder_layers)]
    if not inside:
        return
    if torch.backends.mha.get_fastpath_enabled():
        torch.backends.mha.set_fastpath_enabled(False)
        logger.warning(
            "lorakit: adapters inside torch.nn.TransformerEncoderLayer (e.g. '%s'); turned off torch's "
            "Transformer inference fast path (torch.backends.mha.set_fastpath_enabled(False)), which reads "
            "the layers' weights directly and would skip the adapters",
            inside[0],
        )


def _modules_to_save(model: nn.Module, config: LoraConfig) -> list[str]:
    names = [name for name, _ in model.named_modules() if name]
    found = []
    for pattern in config.modules_to_save:
        matches = [n for n in names if name_matches(n, pattern)]
        if not matches:
            close = difflib.get_close_matches(pattern, names, n=3)
            raise ValueError(
                f"LoraConfig.modules_to_save entry '{pattern}' matched no module"
                + (f"; closest: {close}" if close else "")
            )
        # Keep the outermost match only: its parameters include the inner ones.
        found += [m for m in matches if not any(m.startswith(o + ".") for o in matches)]
    return found


def lora_layers(model: nn.Module) -> Iterator[tuple[str, LoraLayer]]:
    """Yield ``(path, layer)`` for every LoRA layer in ``model``."""
    for name, module in model.named_modules():
        if isinstance(module, LoraLayer):
            yield name, module


def merge(model: nn.Module) -> nn.Module:
    """Fold every adapter into its base weight (forward = base only, no extra cost).

    Refuses a weight tied to another module (e.g. GPT-2's ``wte`` and ``lm_head``): merging would change
    that module too.
    """
    owners: dict[int, list[str]] = {}
    for name, param in model.named_parameters(remove_duplicate=False):
        owners.setdefault(id(param), []).append(name)
    for name, layer in lora_layers(model):
        tied = [o for o in owners.get(id(layer.base_layer.weight), []) if not o.startswith(name + ".")]
        if tied:
            raise ValueError(
                f"cannot merge the adapter of '{name}': its weight is tied to {tied}, "
                "which merging would change too"
            )
    for _, layer in lora_layers(model):
        layer.merge()
    return model


_merge_all = merge  # ``unload``'s ``merge`` argument shadows the function inside it.


def unmerge(model: nn.Module) -> nn.Module:
    """Undo :func:`merge`."""
    for _, layer in lora_layers(model):
        layer.unmerge()
    return model


def unload(model: nn.Module, merge: bool = False) -> nn.Module:
    """Replace every LoRA layer by its base module, optionally merging ``ΔW`` in first."""
    if merge:
        _merge_all(model)
    else:
        unmerge(model)
    gated_mlp.detach(model)
    for name, layer in list(lora_layers(model)):
        _set_submodule(model, name, layer.base_layer)
    if hasattr(model, "lora_config"):
        del model.lora_config
    return model


@dataclass(frozen=True)
class TrainableSummary:
    """Counts of trainable and total parameters (frozen LoRA factors count in the total)."""

    trainable: int
    total: int

    @property
    def percent(self) -> float:
        return 100.0 * self.trainable / self.total if self.total else 0.0

    def __str__(self) -> str:
        return f"trainable params: {self.trainable:,} / {self.total:,} ({self.percent:.4f}%)"


def trainable_summary(model: nn.Module) -> TrainableSummary:
    """Trainable / total parameter counts; the total includes frozen LoRA factors (buffers)."""
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    total += sum(
        factor.numel()
        for _, layer in lora_layers(model)
        for factor in (layer.lora_A, layer.lora_B)
        if not isinstance(factor, nn.Parameter)
    )
    return TrainableSummary(trainable=trainable, total=total)


def adapter_factors(model: nn.Module, only_trainable: bool = False) -> Sequence[tuple[str, torch.Tensor]]:
    """``(path.lora_A | path.lora_B, tensor)`` for every factor, frozen ones included unless asked."""
    out = []
    for name, layer in lora_layers(model):
        for factor_name in ("lora_A", "lora_B"):
            factor = getattr(layer, factor_name)
            if only_trainable and not isinstance(factor, nn.Parameter):
                continue
            out.append((f"{name}.{factor_name}", factor))
    return out
