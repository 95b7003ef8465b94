"""Adapter layers, init schemes and injection (the core every other lorakit module builds on)."""

from lorakit.adapters.init import INIT_SCHEMES, haar_orthonormal_rows
from lorakit.adapters.inject import (
    TrainableSummary,
    adapter_factors,
    find_targets,
    inject,
    lora_layers,
    merge,
    trainable_summary,
    unload,
    unmerge,
)
from lorakit.adapters.layers import LoraConv1D, LoraEmbedding, LoraLayer, LoraLinear

__all__ = [
    "INIT_SCHEMES",
    "LoraConv1D",
    "LoraEmbedding",
    "LoraLayer",
    "LoraLinear",
    "TrainableSummary",
    "adapter_factors",
    "find_targets",
    "haar_orthonormal_rows",
    "inject",
    "lora_layers",
    "merge",
    "trainable_summary",
    "unload",
    "unmerge",
]
