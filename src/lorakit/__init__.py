"""lorakit: low-rank adaptation built on what LoRA+, asymmetric LoRA and the expressive-power theory proved.

The core API::

    import lorakit
    model = lorakit.inject(model, lorakit.LoraConfig(r=8, alpha=16, targets=["query", "value"]))
    optimizer = lorakit.make_optimizer(model, lr=2e-4, ratio=16)   # LoRA+: lr_B = 16 · lr_A
    ...
    lorakit.save(model, "adapter/")   # PEFT layout: peft.PeftModel.from_pretrained(base, "adapter/") works
"""

from lorakit.adapters import (
    LoraLayer,
    inject,
    lora_layers,
    merge,
    trainable_summary,
    unload,
    unmerge,
)
from lorakit.checkpoint import load, read_adapter_config, save
from lorakit.config import LoraConfig
from lorakit.optim import make_optimizer, param_groups

__version__ = "0.1.0"

__all__ = [
    "LoraConfig",
    "LoraLayer",
    "__version__",
    "inject",
    "load",
    "lora_layers",
    "make_optimizer",
    "merge",
    "param_groups",
    "read_adapter_config",
    "save",
    "trainable_summary",
    "unload",
    "unmerge",
]
