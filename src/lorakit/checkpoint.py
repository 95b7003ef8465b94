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

import os
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file
from safetensors.torch import save as safetensors_bytes
from torch import nn

from lorakit.adapters.inject import inject, lora_layers
from lorakit.adapters.layers import LoraEmbedding, LoraLayer
from lorakit.config import LoraConfig
from lorakit.utils import atomic_write, atomic_write_json, read_json

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
LORAKIT_CONFIG_NAME = "lorakit_config.json"
PREFIX = "base_model.model."


def _factor_keys(name: str, layer: LoraLayer) -> tuple[str, str]:
    if isinstance(layer, LoraEmbedding):
        return f"{PREFIX}{name}.lora_embedding_A", f"{PREFIX}{name}.lora_embedding_B"
    return f"{PREFIX}{name}.lora_A.weight", f"{PREFIX}{name}.lora_B.weight"


def adapter_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The tensors of a checkpoint, keyed as PEFT keys them."""
    tensors: dict[str, torch.Tensor] = {}
    for name, layer in lora_layers(model):
        key_a, key_b = _factor_keys(name, layer)
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
    from lorakit.adapters.inject import _modules_to_save

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
        "modules_to_save": list(config.modules_to_save) or None,
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


def read_adapter_config(directory: str | os.PathLike) -> LoraConfig:
    """The ``LoraConfig`` that reproduces a saved adapter (PEFT's or lorakit's) when injected."""
    directory = Path(directory)
    peft_config = read_json(directory / CONFIG_NAME)
    lorakit_path = directory / LORAKIT_CONFIG_NAME
    if lorakit_path.exists():
        return LoraConfig.from_dict(read_json(lorakit_path)["lorakit"])
    if peft_config.get("peft_type", "LORA") != "LORA":
        raise ValueError(
            f"{directory / CONFIG_NAME}: peft_type is {peft_config.get('peft_type')!r}, expected 'LORA'"
        )
    unsupported = [k for k in ("use_dora", "lora_bias") if peft_config.get(k)]
    if unsupported:
        raise ValueError(f"{directory / CONFIG_NAME}: {unsupported} adapters are not supported by lorakit")
    targets = peft_config.get("target_modules")
    if isinstance(targets, str):
        targets = targets if targets == "all-linear" else [f"re:{targets}"]
    # PEFT matches rank/alpha pattern keys as a regex suffix of the module path.
    return LoraConfig(
        r=int(peft_config["r"]),
        alpha=float(peft_config.get("lora_alpha", 8)),
        scaling="rslora" if peft_config.get("use_rslora") else "standard",
        dropout=float(peft_config.get("lora_dropout") or 0.0),
        targets=targets,
        exclude=peft_config.get("exclude_modules") or (),
        rank_pattern={f"re:(.*\\.)?{k}": v for k, v in (peft_config.get("rank_pattern") or {}).items()},
        alpha_pattern={f"re:(.*\\.)?{k}": v for k, v in (peft_config.get("alpha_pattern") or {}).items()},
        modules_to_save=peft_config.get("modules_to_save") or (),
    )


def load(model: nn.Module, directory: str | os.PathLike, strict: bool = True) -> nn.Module:
    """Load a saved adapter (lorakit's or PEFT's) into ``model``.

    If ``model`` has no adapters yet, they are injected first from the checkpoint's config. Every tensor
    is checked: a module the model lacks, a missing factor or a shape mismatch raises an error naming
    the module, the expected and the found shape.
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
    config = read_adapter_config(directory)
    if not any(True for _ in lora_layers(model)):
        inject(model, config)
    try:
        tensors = load_file(weights_path)
    except (SafetensorError, OSError) as error:
        raise ValueError(f"{weights_path} is not a readable safetensors file: {error}") from error
    expected = _expected_tensors(model)
    unknown = sorted(set(tensors) - set(expected))
    if unknown:
        raise ValueError(
            f"{weights_path}: tensor '{unknown[0]}' has no matching module in {type(model).__name__}"
            + (f" (and {len(unknown) - 1} more)" if len(unknown) > 1 else "")
        )
    missing = sorted(k for k in expected if k not in tensors and ".lora_" in k)
    if strict and missing:
        raise ValueError(f"{weights_path}: no tensor for '{missing[0]}' (model expects {len(missing)} more)")
    with torch.no_grad():
        for key, value in tensors.items():
            target = expected[key]
            if tuple(value.shape) != tuple(target.shape):
                raise ValueError(
                    f"{weights_path}: '{key}' has shape {tuple(value.shape)}, "
                    f"the model expects {tuple(target.shape)}"
                )
            target.copy_(value.to(target.dtype))
    return model


def _expected_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    expected = {}
    for name, layer in lora_layers(model):
        key_a, key_b = _factor_keys(name, layer)
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
