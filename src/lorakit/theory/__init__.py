"""Expressive power of LoRA (Zeng & Lee, ICLR 2024): closed-form adapters, rank thresholds, error bounds,
gradient baselines on the paper's synthetic models, and a rank advisor for real fine-tunes.

Constructions, thresholds and bounds compute in float64 so that they can be verified to machine precision;
the gradient-trained baselines (:mod:`lorakit.theory.baselines`) default to float32, as training would.
"""

from lorakit.theory.advisor import AdvisorResult, adapter_deltas, advise, frobenius_rank, spectral_rank
from lorakit.theory.bounds import fnn_error_bound
from lorakit.theory.fnn import DomainWarning, FNNConstruction, construct_fnn
from lorakit.theory.linear import (
    LinearConstruction,
    NonSingularityError,
    adapted_product,
    construct_linear,
    gaussian_mse,
    linear_threshold,
)
from lorakit.theory.models import FNN, TFN
from lorakit.theory.rank import (
    best_partition,
    group_ranks,
    headline_rank,
    numerical_rank,
    required_rank,
    residual_rank,
    rounding_noise,
    uniform_partition,
    uniform_rank,
)
from lorakit.theory.transformer import TFNConstruction, construct_tfn

__all__ = [
    "FNN",
    "TFN",
    "AdvisorResult",
    "DomainWarning",
    "FNNConstruction",
    "LinearConstruction",
    "NonSingularityError",
    "TFNConstruction",
    "adapted_product",
    "adapter_deltas",
    "advise",
    "best_partition",
    "construct_fnn",
    "construct_linear",
    "construct_tfn",
    "fnn_error_bound",
    "frobenius_rank",
    "gaussian_mse",
    "group_ranks",
    "headline_rank",
    "linear_threshold",
    "numerical_rank",
    "required_rank",
    "residual_rank",
    "rounding_noise",
    "spectral_rank",
    "uniform_partition",
    "uniform_rank",
]
