"""Adapters on disk in PEFT's layout, so PEFT and lorakit read each other's checkpoints.

A checkpoint folder holds
- ``adapter_config.json``: PEFT's ``LoraConfig`` fields (``peft_type="LORA"``, ``r``, ``lora_alpha``,
  ``target_modules`` = the exact adapted paths, ``rank_pattern``/``alpha_pattern`` per path, ...);
- ``adapter_model.safetensors``: ``base_model.model.<path>.lora_A.weight`` (r×in) and ``.lora_B.weight``
  (out×r); embeddings use ``.lora_embedding_A`` / ``.lora_embedding_B``; ``modules_to_save`` weights
  under ``base_model.model.<path>.<param>``;
- ``lorakit_config.json``: lorakit-only settings (init, which factors train, seed, LoRA+ ratio), a
  file PEFT never reads.

Frozen factors are saved like trainable ones: a frozen random A is part of the adapter. Files are only
ever read with safetensors/JSON (never unpickled) and written atomically.
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file
from safetensors.torch import save as safetensors_bytes
from torch import nn

from lorakit.adapters.inject import (
    _first_match,
    _modules_to_save,
    find_targets,
    inject,
    layer_class_for,
    lora_layers,
    name_matches,
    unload,
)
from lorakit.adapters.layers import LoraEmbedding, LoraLayer
from lorakit.config import LoraConfig
from lorakit.utils import atomic_write, atomic_write_json, read_json

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
LORAKIT_CONFIG_NAME = "lorakit_config.json"
PREFIX = "base_model.model."


def _factor_keys(name: str, layer_cls: type[LoraLayer]) -> tuple[str, str]:
    if issubclass(layer_cls, LoraEmbedding):
        return f"{PREFIX}{name}.lora_embedding_A", f"{PREFIX}{name}.lora_embedding_B"
    return f"{PREFIX}{name}.lora_A.weight", f"{PREFIX}{name}.lora_B.weight"


def adapter_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The tensors of a checkpoint, keyed as PEFT keys them."""
    tensors: dict[str, torch.Tensor] = {}
    for name, layer in lora_layers(model):
        key_a, key_b = _factor_keys(name, type(layer))
        tensors[key_a] = layer.lora_A.detach()
        tensors[key_b] = layer.lora_B.detach()
    config = getattr(model, "lora_config", None)
    for module_name in _saved_module_names(model, config):
        for param_name, param in model.get_submodule(module_name).named_parameters():
            tensors[f"{PREFIX}{module_name}.{param_name}"] = param.detach()
    return {k: v.contiguous().cpu() for k, v in tensors.items()}


def _saved_module_names(model: nn.Module, config: LoraConfig | None) -> list[str]:
    if config is None or not config.modules_to_save:
        return []
    return _modules_to_save(model, config)


def peft_config_dict(model: nn.Module, base_model_name_or_path: str | None = None) -> dict[str, Any]:
    """``adapter_config.json`` contents for the adapters currently in ``model``."""
    config = _require_config(model)
    layers = dict(lora_layers(model))
    rank_pattern = {name: layer.r for name, layer in layers.items() if layer.r != config.r}
    alpha_pattern = {name: layer.alpha for name, layer in layers.items() if layer.alpha != config.alpha}
    conv1d = [name for name, layer in layers.items() if type(layer).__name__ == "LoraConv1D"]
    return {
        "peft_type": "LORA",
        "task_type": None,
        "base_model_name_or_path": base_model_name_or_path,
        "r": config.r,
        "lora_alpha": config.alpha,
        "lora_dropout": config.dropout,
        "use_rslora": config.scaling == "rslora",
        "target_modules": sorted(layers),
        "rank_pattern": rank_pattern,
        "alpha_pattern": alpha_pattern,
        # the module paths the patterns matched: PEFT reads these entries as names, not globs or regexes
        "modules_to_save": _saved_module_names(model, config) or None,
        "fan_in_fan_out": bool(conv1d) and len(conv1d) == len(layers),
        "bias": "none",
        "init_lora_weights": True,
        "inference_mode": True,
    }


def save(
    model: nn.Module,
    directory: str | os.PathLike,
    extra: dict[str, Any] | None = None,
    base_model: str | None = None,
) -> Path:
    """Write the model's adapters to ``directory`` (PEFT layout; see the module docstring).

    ``extra`` is merged into ``lorakit_config.json`` (e.g. ``{"ratio": 16}``); ``base_model`` is recorded
    as PEFT's ``base_model_name_or_path``.
    """
    config = _require_config(model)
    directory = Path(directory)
    tensors = adapter_state_dict(model)
    with atomic_write(directory / WEIGHTS_NAME, "wb") as handle:
        handle.write(safetensors_bytes(tensors, metadata={"format": "pt"}))
    atomic_write_json(directory / LORAKIT_CONFIG_NAME, {"lorakit": config.to_dict(), **(extra or {})})
    # The PEFT config goes last: a folder with a config is a complete checkpoint.
    atomic_write_json(directory / CONFIG_NAME, peft_config_dict(model, base_model))
    return directory


# PEFT LoraConfig fields whose adapters compute something lorakit's LoRA layers do not (a truthy value
# is refused by name rather than loaded into a model that would then compute something else).
_UNSUPPORTED_PEFT_FIELDS = (
    "use_dora",
    "lora_bias",
    "alora_invocation_tokens",
    "arrow_config",
    "kasa_config",
    "layer_replication",
    "monteclora_config",
    "target_parameters",
    "trainable_token_indices",
    "use_bdlora",
    "use_qalora",
)


def read_adapter_config(directory: str | os.PathLike) -> LoraConfig:
    """The ``LoraConfig`` that reproduces a saved adapter (PEFT's or lorakit's) when injected.

    A PEFT config is translated with PEFT's matching rules: a string ``target_modules`` /
    ``exclude_modules`` is a regex matched against the whole path; list entries are exact paths or dotted
    suffixes; ``rank_pattern`` / ``alpha_pattern`` keys are regexes matched against a dotted suffix of
    the path; ``layers_to_transform`` / ``layers_pattern`` become an ``exclude`` entry. ``modules_to_save``
    is copied as is (``lorakit.load`` keeps only the entries that match a module of the model, as PEFT
    does, e.g. ``"score"``, which PEFT adds to every sequence-classification adapter).
    """
    config, _ = _read_config(Path(directory))
    return config


def _read_config(directory: Path) -> tuple[LoraConfig, bool]:
    """The adapter's config, and whether it was translated from PEFT's (no ``lorakit_config.json``)."""
    peft_config = read_json(directory / CONFIG_NAME)
    lorakit_path = directory / LORAKIT_CONFIG_NAME
    if lorakit_path.exists():
        return LoraConfig.from_dict(read_json(lorakit_path)["lorakit"]), False
    return _from_peft(peft_config, directory / CONFIG_NAME), True


def _from_peft(peft_config: dict[str, Any], where: Path) -> LoraConfig:
    if peft_config.get("peft_type", "LORA") != "LORA":
        raise ValueError(f"{where}: peft_type is {peft_config.get('peft_type')!r}, expected 'LORA'")
    unsupported = [k for k in _UNSUPPORTED_PEFT_FIELDS if peft_config.get(k)]
    if peft_config.get("bias", "none") not in (None, "none"):
        unsupported.append(f"bias={peft_config['bias']!r}")
    if unsupported:
        raise ValueError(f"{where}: {unsupported} adapters are not supported by lorakit")
    targets = peft_config.get("target_modules")
    if targets is None:
        raise ValueError(f"{where}: target_modules is missing; lorakit adapts modules named there")
    if isinstance(targets, str):
        # PEFT: a string is a regex that must match the whole path, except PEFT's "all-linear" shorthand.
        targets = "all-linear" if targets.lower() == "all-linear" else [f"re:{targets}"]
    else:
        targets = [_peft_name(t) for t in targets]
    exclude = peft_config.get("exclude_modules") or ()
    # PEFT: a string exclude_modules is a regex (re.fullmatch), a list holds exact paths / dotted suffixes.
    exclude = [f"re:{exclude}"] if isinstance(exclude, str) else [_peft_name(e) for e in exclude]
    layers = _peft_layers_exclude(peft_config, where)
    if layers is not None:
        exclude.append(layers)
    return LoraConfig(
        r=int(peft_config["r"]),
        alpha=float(peft_config.get("lora_alpha", 8)),
        scaling="rslora" if peft_config.get("use_rslora") else "standard",
        dropout=float(peft_config.get("lora_dropout") or 0.0),
        targets=targets,
        exclude=exclude,
        rank_pattern={_peft_pattern(k): v for k, v in (peft_config.get("rank_pattern") or {}).items()},
        alpha_pattern={_peft_pattern(k): v for k, v in (peft_config.get("alpha_pattern") or {}).items()},
        modules_to_save=[_peft_name(m) for m in peft_config.get("modules_to_save") or ()],
    )


def _peft_name(name: str) -> str:
    """A PEFT list entry (exact path or dotted suffix) in lorakit's syntax, where ``*?[`` make a glob."""
    if any(char in name for char in "*?[") or name.startswith("re:"):
        return rf"re:(?:.*\.)?{re.escape(name)}"
    return name


def _peft_pattern(key: str) -> str:
    r"""A PEFT ``rank_pattern`` / ``alpha_pattern`` key: PEFT (``get_pattern_key``) tests
    ``re.match(rf"(.*\.)?({key})$", path)``, i.e. the key as a regex over a dotted suffix of the path."""
    return rf"re:(.*\.)?({key})"


def _peft_layers_exclude(peft_config: dict[str, Any], where: Path) -> str | None:
    r"""PEFT's ``layers_to_transform`` / ``layers_pattern`` as a lorakit ``exclude`` regex, or None.

    PEFT (``check_target_module_exists``) applies them to a module that matched a list ``target_modules``
    entry as a dotted suffix (an entry equal to the whole path bypasses them): the module is adapted only
    if the first layer index in its path is listed. Without ``layers_pattern`` the index is the first
    all-digit segment after the second segment (``re.match(r".*?\.[^.]*\.(?P<idx>\d+)\.", path)``); with
    it, the segment after the first ``<pattern>.`` (the first pattern that matches at all wins).
    """
    indexes = peft_config.get("layers_to_transform")
    patterns = peft_config.get("layers_pattern")
    if indexes is None or (isinstance(indexes, list) and not indexes):
        if patterns:
            raise ValueError(f"{where}: layers_pattern {patterns!r} is set without layers_to_transform")
        return None
    targets = peft_config.get("target_modules")
    if not isinstance(targets, list):
        raise ValueError(
            f"{where}: layers_to_transform {indexes!r} with a string target_modules {targets!r} is not "
            "supported (PEFT refuses it too); list the module names in target_modules"
        )
    if isinstance(indexes, int) and not isinstance(indexes, bool):
        indexes = [indexes]
    if not isinstance(indexes, list) or not all(
        isinstance(i, int) and not isinstance(i, bool) for i in indexes
    ):
        raise ValueError(
            f"{where}: layers_to_transform must be an integer or a list of them, got {indexes!r}"
        )
    if isinstance(patterns, str):
        patterns = [patterns]
    patterns = [p for p in patterns or () if p]
    wanted = [i for i in indexes if i >= 0]
    index = rf"0*(?:{'|'.join(str(i) for i in wanted)})\." if wanted else "(?!)"
    if not patterns:
        # segments 0 and 1, then any segments that are not all digits, then the index segment
        layer = rf"[^.]*\.[^.]*\.(?:(?!\d+\.)[^.]*\.)*{index}"
    else:
        options = []
        for i, pattern in enumerate(patterns):
            earlier = "".join(rf"(?!(?:.*\.)?(?:{p})\.\d+\.)" for p in patterns[:i])
            options.append(rf"{earlier}(?:(?!(?:{pattern})\.\d+\.)[^.]*\.)*(?:{pattern})\.{index}")
        layer = "(?:" + "|".join(options) + ")"
    exact = "|".join(re.escape(t) for t in targets)
    # Excluded: every path that neither has a listed layer index nor is a target_modules entry itself.
    return rf"re:(?!{layer}|(?:{exact})\Z).*"


def load(model: nn.Module, directory: str | os.PathLike, strict: bool = True) -> nn.Module:
    """Load a saved adapter (lorakit's or PEFT's) into ``model``.

    If ``model`` has no adapters yet, they are injected first from the checkpoint's config; every tensor
    of the file is checked against the planned adapters before the model is touched, and if injecting
    or copying still fails the model is put back as it was (modules, ``requires_grad``). If ``model``
    already has adapters, each one must agree with the checkpoint's config (r, alpha, scaling, dropout
    and, for lorakit checkpoints, which factors train): a mismatch raises an error naming the module, the
    field and both values. Every tensor is checked: a module the model lacks, a missing factor (with
    ``strict``) or a shape mismatch raises an error naming the module, the expected and the found shape.
    """
    directory = Path(directory)
    if not directory.is_dir():
        raise FileNotFoundError(f"adapter folder {directory} does not exist")
    weights_path = directory / WEIGHTS_NAME
    if not weights_path.exists():
        others = sorted(p.name for p in directory.iterdir())
        pickled = [n for n in others if n.endswith((".bin", ".pt", ".pth", ".ckpt"))]
        if pickled:
            raise ValueError(
                f"{directory}: found {pickled} but no {WEIGHTS_NAME}; lorakit reads only safetensors "
                "(never unpickles). Convert with safetensors.torch.save_file."
            )
        raise FileNotFoundError(f"{weights_path} is missing (folder holds {others})")
    config, from_peft = _read_config(directory)
    try:
        tensors = load_file(weights_path)
    except (SafetensorError, OSError) as error:
        raise ValueError(f"{weights_path} is not a readable safetensors file: {error}") from error
    if any(True for _ in lora_layers(model)):
        expected = _checked_targets(model, tensors, weights_path, strict)
        _check_layers_agree(model, config, tensors, weights_path, compare_train=not from_peft)
        _copy(tensors, expected)
        return model
    if from_peft and config.modules_to_save:
        # PEFT skips modules_to_save entries that match nothing (it adds "classifier" and "score" to every
        # SEQ_CLS adapter); the tensor check below still makes sure every saved tensor finds its module.
        names = [name for name, _ in model.named_modules() if name]
        kept = [m for m in config.modules_to_save if any(name_matches(n, m) for n in names)]
        config = dataclasses.replace(config, modules_to_save=kept)
    _check_tensors(weights_path, tensors, _planned_shapes(model, config), strict, type(model).__name__)
    flags = [(param, param.requires_grad) for param in model.parameters()]
    had_config, old_config = "lora_config" in model.__dict__, model.__dict__.get("lora_config")
    fastpath = _fastpath_enabled()
    try:
        inject(model, config)
        expected = _checked_targets(model, tensors, weights_path, strict)
        _copy(tensors, expected)
    except BaseException:
        # Put the model back as it was: original modules (a LoRA layer holds its base module itself),
        # requires_grad flags and lora_config attribute.
        unload(model)
        for param, requires_grad in flags:
            param.requires_grad_(requires_grad)
        if had_config:
            model.lora_config = old_config
        elif "lora_config" in model.__dict__:
            del model.lora_config
        _restore_fastpath(fastpath)
        raise
    return model


def _fastpath_enabled() -> bool | None:
    getter = getattr(getattr(torch.backends, "mha", None), "get_fastpath_enabled", None)
    return getter() if callable(getter) else None


def _restore_fastpath(enabled: bool | None) -> None:
    if enabled is not None and _fastpath_enabled() != enabled:
        torch.backends.mha.set_fastpath_enabled(enabled)


def _planned_shapes(model: nn.Module, config: LoraConfig) -> dict[str, tuple[int, ...]]:
    """The tensors ``inject(model, config)`` would create, keyed as in a checkpoint, without injecting.

    Uses inject's own matching (``find_targets``, ``_modules_to_save``, rank patterns), so a config that
    inject would refuse is refused here, before the model is touched.
    """
    shapes: dict[str, tuple[int, ...]] = {}
    for name in find_targets(model, config):
        base = model.get_submodule(name)
        layer_cls = layer_class_for(base)
        r = int(_first_match(name, config.rank_pattern) or config.r)
        in_features, out_features = layer_cls.features_of(base)
        key_a, key_b = _factor_keys(name, layer_cls)
        shapes[key_a] = (r, in_features)
        shapes[key_b] = (out_features, r)
    for module_name in _modules_to_save(model, config) if config.modules_to_save else ():
        for param_name, param in model.get_submodule(module_name).named_parameters():
            shapes[f"{PREFIX}{module_name}.{param_name}"] = tuple(param.shape)
    return shapes


def _check_tensors(
    weights_path: Path,
    tensors: dict[str, torch.Tensor],
    expected: dict[str, tuple[int, ...]],
    strict: bool,
    model_name: str,
) -> None:
    """Every tensor of the file has a place of the right shape; with ``strict``, every factor a tensor."""
    unknown = sorted(set(tensors) - set(expected))
    if unknown:
        raise ValueError(
            f"{weights_path}: tensor '{unknown[0]}' has no matching module in {model_name}"
            + (f" (and {len(unknown) - 1} more)" if len(unknown) > 1 else "")
        )
    missing = sorted(k for k in expected if k not in tensors and ".lora_" in k)
    if strict and missing:
        raise ValueError(f"{weights_path}: no tensor for '{missing[0]}' (model expects {len(missing)} more)")
    for key, value in tensors.items():
        if tuple(value.shape) != tuple(expected[key]):
            raise ValueError(
                f"{weights_path}: '{key}' has shape {tuple(value.shape)}, "
                f"the model expects {tuple(expected[key])}"
            )


def _check_layers_agree(
    model: nn.Module,
    config: LoraConfig,
    tensors: dict[str, torch.Tensor],
    weights_path: Path,
    compare_train: bool,
) -> None:
    """Each adapter the checkpoint fills must be the one the checkpoint's config describes: the tensors
    alone do not carry alpha, the scaling rule or dropout, and a mismatch would change the outputs."""
    model_config = getattr(model, "lora_config", None)
    for name, layer in lora_layers(model):
        if not any(key in tensors for key in _factor_keys(name, type(layer))):
            continue  # not in this checkpoint (strict=False): nothing of it is loaded
        r = int(_first_match(name, config.rank_pattern) or config.r)
        alpha = float(_first_match(name, config.alpha_pattern) or config.alpha)
        fields: list[tuple[str, Any, Any]] = [("r", r, layer.r), ("alpha", alpha, float(layer.alpha))]
        if model_config is not None:
            fields.append(("scaling", config.scaling, model_config.scaling))
        fields += [
            ("scaling factor", config.scale(r, alpha), float(layer.scaling)),
            ("dropout", 0.0 if isinstance(layer, LoraEmbedding) else config.dropout, layer.dropout_p),
        ]
        if compare_train:
            model_train = ("A" if layer.train_a else "") + ("B" if layer.train_b else "")
            fields.append(("train", config.train, model_train))
        for field_name, ours, theirs in fields:
            same = math.isclose(ours, theirs, rel_tol=1e-6) if isinstance(ours, float) else ours == theirs
            if not same:
                raise ValueError(
                    f"{weights_path}: module '{name}': the checkpoint has {field_name}={ours!r}, the model's "
                    f"adapter has {field_name}={theirs!r}; loading would keep the model's value and change "
                    "the adapter's outputs. Load into the model without adapters (lorakit.unload(model) "
                    "first) to inject the checkpoint's config"
                )


def _copy(tensors: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> None:
    # Convert everything first, so that a failure cannot leave the model half-loaded.
    values = {
        key: value.to(device=expected[key].device, dtype=expected[key].dtype)
        for key, value in tensors.items()
    }
    with torch.no_grad():
        for key, value in values.items():
            expected[key].copy_(value)


def _checked_targets(
    model: nn.Module, tensors: dict[str, torch.Tensor], weights_path: Path, strict: bool
) -> dict[str, torch.Tensor]:
    """The model's adapter tensors, keyed as in the file, after checking the file's tensors against them."""
    expected = _expected_tensors(model)
    shapes = {k: tuple(v.shape) for k, v in expected.items()}
    _check_tensors(weights_path, tensors, shapes, strict, type(model).__name__)
    return expected


def _expected_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    expected = {}
    for name, layer in lora_layers(model):
        key_a, key_b = _factor_keys(name, type(layer))
        expected[key_a] = layer.lora_A
        expected[key_b] = layer.lora_B
    for module_name in _saved_module_names(model, getattr(model, "lora_config", None)):
        for param_name, param in model.get_submodule(module_name).named_parameters():
            expected[f"{PREFIX}{module_name}.{param_name}"] = param
    return expected


def _require_config(model: nn.Module) -> LoraConfig:
    config = getattr(model, "lora_config", None)
    if config is None or not any(True for _ in lora_layers(model)):
        raise ValueError(
            f"{type(model).__name__} has no lorakit adapters; call lorakit.inject(model, config) first"
        )
    return config


__all__ = ["adapter_state_dict", "load", "peft_config_dict", "read_adapter_config", "save"]
