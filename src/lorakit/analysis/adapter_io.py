"""Read the LoRA factors of an adapter folder saved by PEFT or lorakit, for analysis (no model needed).

Layout (PEFT's, which ``lorakit.save`` also writes): ``adapter_config.json`` and
``adapter_model.safetensors`` whose keys are ``base_model.model.<module>.lora_A.weight`` (r×in) and
``.lora_B.weight`` (out×r), or ``.lora_embedding_A`` (r×num_embeddings) / ``.lora_embedding_B``
(dim×r) for embeddings; convolution factors are flattened to (r, in·k…) and (out, r). Other keys
(``modules_to_save`` copies, DoRA magnitudes, …) are ignored. A run folder may hold the adapter in a
sub-folder ``adapter/``; both are accepted. Only safetensors is read: pickled ``.bin`` files are never
loaded.

Scaling per module: ``s = lora_alpha / r``, or ``lora_alpha / √r`` with ``use_rslora``; ``rank_pattern`` and
``alpha_pattern`` override r and alpha for modules whose name they match as a regex suffix, exactly as
PEFT's ``get_pattern_key`` does (``re.match(rf"(.*\\.)?({key})$", module)``, first matching key wins).
The rank is read from the tensors and must agree with the configured one.

Frozen factors are saved like trainable ones. If a ``lorakit_config.json`` sits beside the adapter
(or in the run folder) and its ``lorakit.train`` field (``"AB"``, ``"A"``, ``"B"``) says which factors
were trained, the frozen ones are recorded in :attr:`Adapter.frozen`.
"""

from __future__ import annotations

import logging
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from lorakit.utils import read_json

logger = logging.getLogger(__name__)

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
LORAKIT_CONFIG_NAME = "lorakit_config.json"
ADAPTER_SUBDIR = "adapter"
_PREFIX = "base_model.model."
_KEY = re.compile(r"^(?P<module>.+)\.(?P<kind>lora_A|lora_B|lora_embedding_A|lora_embedding_B)(?:\.weight)?$")


@dataclass
class AdapterLayer:
    """The factors of one adapted module: ``ΔW = scaling · B @ A`` with A (r, in) and B (out, r)."""

    name: str
    A: torch.Tensor
    B: torch.Tensor
    scaling: float
    kind: str = "linear"  # "linear", "embedding" or "conv"

    @property
    def r(self) -> int:
        return int(self.A.shape[0])

    def delta_weight(self) -> torch.Tensor:
        """``scaling · B @ A`` in float64, shape (out, in) (for embeddings (dim, num_embeddings))."""
        return self.scaling * (self.B.double() @ self.A.double())


@dataclass
class Adapter:
    """An adapter read from disk: its folder, a display label, the raw config and the factors."""

    path: Path
    label: str
    config: dict[str, Any]
    layers: dict[str, AdapterLayer]
    frozen: frozenset[str] = field(default_factory=frozenset)


def find_adapter_dir(path: str | Path) -> Path:
    """``path`` itself if it holds ``adapter_config.json``, else ``path/adapter``; otherwise an error."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such run or adapter folder")
    if path.is_file():
        raise FileNotFoundError(
            f"{path}: expected a folder holding {CONFIG_NAME} and {WEIGHTS_NAME}, got a file"
        )
    for candidate in (path, path / ADAPTER_SUBDIR):
        if (candidate / CONFIG_NAME).is_file():
            return candidate
    raise FileNotFoundError(
        f"{path}: no adapter found: expected {path / CONFIG_NAME} or {path / ADAPTER_SUBDIR / CONFIG_NAME}"
    )


def _read_json(path: Path) -> dict[str, Any]:
    data = read_json(path)
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a JSON object, got {type(data).__name__}")
    return data


def _read_tensors(path: Path) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    if not path.is_file():
        pickled = [p.name for p in path.parent.glob("adapter_model*.bin")] + [
            p.name for p in path.parent.glob("*.pt")
        ]
        hint = (
            f"; found {pickled}, which lorakit never unpickles: re-save with safetensors" if pickled else ""
        )
        raise FileNotFoundError(f"{path}: adapter weights not found{hint}")
    try:
        return load_file(str(path), device="cpu")
    except (SafetensorError, OSError, ValueError, RuntimeError) as error:
        raise ValueError(f"{path}: not a readable safetensors file ({error})") from error


def _pattern_value(patterns: Mapping[str, Any], module: str, default: Any) -> Any:
    """PEFT's ``get_pattern_key``: the first key matching ``module`` as a regex suffix wins."""
    for key in patterns:
        if re.match(rf"(.*\.)?({key})$", module):
            return patterns[key]
    return default


def module_scaling(config: Mapping[str, Any], module: str, rank: int, source: Path | None = None) -> float:
    """The scale ``s`` of ``module`` under a PEFT-style config, checking its rank against ``rank``."""
    where = f"{source}: " if source is not None else ""
    try:
        r = _pattern_value(config.get("rank_pattern") or {}, module, config.get("r", rank))
        alpha = _pattern_value(config.get("alpha_pattern") or {}, module, config.get("lora_alpha", r))
    except re.error as error:
        raise ValueError(f"{where}invalid regex in rank_pattern/alpha_pattern ({error})") from error
    if not isinstance(r, int) or isinstance(r, bool) or r < 1:
        raise ValueError(
            f"{where}field 'r' (or rank_pattern) for module {module} must be a positive int, got {r!r}"
        )
    if not isinstance(alpha, (int, float)) or isinstance(alpha, bool) or not math.isfinite(alpha):
        raise ValueError(f"{where}field 'lora_alpha' for module {module} must be a number, got {alpha!r}")
    if r != rank:
        raise ValueError(
            f"{where}module {module}: the config gives rank {r} but the saved factors have rank {rank}"
        )
    return float(alpha) / (math.sqrt(r) if config.get("use_rslora") else r)


def _frozen_factors(folder: Path) -> frozenset[str]:
    for candidate in (folder / LORAKIT_CONFIG_NAME, folder.parent / LORAKIT_CONFIG_NAME):
        if candidate.is_file():
            data = _read_json(candidate)
            # lorakit.save nests the LoraConfig under "lorakit"; accept a flat file too
            section = data.get("lorakit") if isinstance(data.get("lorakit"), dict) else data
            train = section.get("train")
            if isinstance(train, str) and train and set(train) <= {"A", "B"}:
                return frozenset({"A", "B"} - set(train))
    return frozenset()


def load_adapter_factors(path: str | Path, label: str | None = None) -> Adapter:
    """Read the adapter in ``path`` (or ``path/adapter``) into an :class:`Adapter` (factors as saved).

    Raises ``FileNotFoundError`` / ``ValueError`` naming the file and, where relevant, the module.
    """
    run_dir = Path(path)
    folder = find_adapter_dir(run_dir)
    config_path, weights_path = folder / CONFIG_NAME, folder / WEIGHTS_NAME
    config = _read_json(config_path)
    peft_type = config.get("peft_type")
    if peft_type is not None and str(peft_type).upper() != "LORA":
        raise ValueError(
            f"{config_path}: field 'peft_type' is {peft_type!r}; only LoRA adapters can be analysed"
        )
    tensors = _read_tensors(weights_path)
    factors: dict[str, dict[str, torch.Tensor]] = {}
    kinds: dict[str, str] = {}
    for key, tensor in tensors.items():
        match = _KEY.match(key)
        if match is None:
            logger.debug("%s: ignoring non-LoRA tensor %s", weights_path, key)
            continue
        module = match["module"].removeprefix(_PREFIX)
        kind = match["kind"]
        factors.setdefault(module, {})[kind[-1]] = tensor
        if kind.startswith("lora_embedding"):
            kinds[module] = "embedding"
        elif tensor.ndim > 2:
            kinds[module] = "conv"
        else:
            kinds.setdefault(module, "linear")
    if not factors:
        raise ValueError(
            f"{weights_path}: no LoRA tensors (keys '<module>.lora_A.weight' / '.lora_B.weight')"
        )
    layers: dict[str, AdapterLayer] = {}
    for module, pair in factors.items():
        missing = {"A", "B"} - set(pair)
        if missing:
            raise ValueError(f"{weights_path}: module {module} has no lora_{missing.pop()} tensor")
        A, B = pair["A"], pair["B"]
        r = A.shape[0]
        if A.ndim < 2 or B.ndim < 2 or B.shape[1] != r or math.prod(B.shape[2:]) != 1:
            raise ValueError(
                f"{weights_path}: module {module}: expected lora_A (r, in…) and lora_B (out, r…) with the "
                f"same r, got {tuple(A.shape)} and {tuple(B.shape)}"
            )
        A2, B2 = A.reshape(r, -1), B.reshape(B.shape[0], r)
        if not (torch.isfinite(A2).all() and torch.isfinite(B2).all()):
            raise ValueError(f"{weights_path}: module {module}: factors contain NaN or inf")
        layers[module] = AdapterLayer(
            name=module,
            A=A2,
            B=B2,
            scaling=module_scaling(config, module, r, config_path),
            kind=kinds[module],
        )
    ordered = dict(sorted(layers.items(), key=lambda item: _natural_key(item[0])))
    label = label if label is not None else (run_dir.resolve().name or str(run_dir))
    return Adapter(path=folder, label=label, config=config, layers=ordered, frozen=_frozen_factors(folder))


def _natural_key(name: str) -> list[Any]:
    """Sort ``layer.2`` before ``layer.10``."""
    return [(0, int(part), "") if part.isdigit() else (1, 0, part) for part in re.split(r"(\d+)", name)]
