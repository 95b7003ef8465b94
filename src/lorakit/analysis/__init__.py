"""Analysis tools: LoRA+ efficiency diagnostics (δ¹/δ² per layer, ratio suggestion).

``lorakit.analysis.diagnostics`` measures, during training, how much each LoRA factor moves the layer's
features (Hayou et al., LoRA+) and suggests the η_B/η_A ratio that balances the two factors.
"""

from lorakit.analysis.diagnostics import (
    DeltaDiagnostics,
    RatioSuggestion,
    balancing_ratio,
    delta_terms,
    read_diagnostics,
    suggest_ratio,
)

__all__ = [
    "DeltaDiagnostics",
    "RatioSuggestion",
    "balancing_ratio",
    "delta_terms",
    "read_diagnostics",
    "suggest_ratio",
]
