"""Analysis of adapters and training runs.

- :mod:`~lorakit.analysis.diagnostics`: LoRA+ efficiency terms δ¹/δ² per layer during training (Hayou et
  al.), optional curvature terms along each factor's step, and the η_B/η_A ratio they suggest.
- :mod:`~lorakit.analysis.similarity`: subspace similarity of A, B and ΔW across adapters (Hu et al.'s φ,
  principal angles, CCA as in Zhu et al.'s Fig. 1).
- :mod:`~lorakit.analysis.spectrum`: singular values, effective rank and energy ranks of ΔW = s·B·A.
- :mod:`~lorakit.analysis.adapter_io`: read the factors of any adapter folder saved by PEFT or lorakit.
"""

from lorakit.analysis.adapter_io import Adapter, AdapterLayer, load_adapter_factors
from lorakit.analysis.diagnostics import (
    DeltaDiagnostics,
    RatioSuggestion,
    balancing_ratio,
    delta_terms,
    hessian_quadratic_forms,
    quadratic_model_ratio,
    read_diagnostics,
    suggest_ratio,
)
from lorakit.analysis.similarity import compare_adapters, compare_subspaces, pairwise_similarity, phi
from lorakit.analysis.spectrum import delta_spectrum

__all__ = [
    "Adapter",
    "AdapterLayer",
    "DeltaDiagnostics",
    "RatioSuggestion",
    "balancing_ratio",
    "compare_adapters",
    "compare_subspaces",
    "delta_spectrum",
    "delta_terms",
    "hessian_quadratic_forms",
    "load_adapter_factors",
    "pairwise_similarity",
    "phi",
    "quadratic_model_ratio",
    "read_diagnostics",
    "suggest_ratio",
]
