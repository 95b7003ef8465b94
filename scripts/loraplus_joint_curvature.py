"""Does the A–B cross-curvature fix ``suggest_ratio`` on the LoRA+ GD toy? A float64 autograd check.

``suggest_ratio``'s ``"curvature"`` criterion models each factor's step on its own (block-diagonal
Hessian): with the measured GD step (ΔA, ΔB), per-factor terms ℓ_A = ⟨∇_A L, ΔA⟩, ℓ_B = ⟨∇_B L, ΔB⟩ and
curvatures q_AA = ⟨ΔA, H_AA ΔA⟩, q_BB = ⟨ΔB, H_BB ΔB⟩, it takes the multiples m = −ℓ/q. The joint model keeps
the cross term q_AB = ⟨ΔA, H_AB ΔB⟩: the multiples minimising

    L(m_A, m_B) ≈ L + m_A ℓ_A + m_B ℓ_B + ½ (m_A² q_AA + 2 m_A m_B q_AB + m_B² q_BB)

solve [[q_AA, q_AB], [q_AB, q_BB]] m = −[ℓ_A, ℓ_B] (where that matrix is positive definite), and
λ' = λ · m_B/m_A. This script trains the toy of ``lorakit.experiments.loraplus_toy`` (same problem draws)
by GD at η_A = η_B = ``--eta``. At every step it computes all terms exactly with float64 Hessian-vector
products, and reports the median λ' of each model over seeds and steps, after skipping the first 10% of
steps as ``suggest_ratio`` does. Compare with the near-best band of ``lorakit reproduce loraplus``
(``ratio_suggestion_check.band``).

    OMP_NUM_THREADS=2 python scripts/loraplus_joint_curvature.py --out out/joint_curvature.json
"""

from __future__ import annotations

import argparse
import logging
import statistics
from pathlib import Path

import torch

from lorakit.experiments.loraplus_toy import make_problem
from lorakit.utils import atomic_write_json

logger = logging.getLogger("loraplus_joint_curvature")


def per_step_ratios(eta: float, steps: int, seed: int, skip: int) -> dict[str, list[float]]:
    """λ' of the loss, block-curvature and joint-curvature models at every step after ``skip`` (λ = 1)."""
    problem = make_problem(100, n_train=1000, n_test=100, seed=seed)  # float32 draws, as the toy
    h = torch.relu(problem.x_train.double() @ problem.W_in.double().T)
    y, w_out = problem.y_train.double(), problem.W_out.double()
    a, b = problem.A0.double().clone(), problem.B0.double().clone()

    def loss(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return ((torch.relu(h @ a.T @ b.T) @ w_out - y) ** 2).mean()

    out: dict[str, list[float]] = {"loss": [], "block": [], "joint": []}
    for t in range(1, steps + 1):
        g_a, g_b = torch.autograd.grad(loss(a.requires_grad_(), b.requires_grad_()), (a, b))
        a, b = a.detach(), b.detach()
        d_a, d_b = -eta * g_a, -eta * g_b
        zero_a, zero_b = torch.zeros_like(d_a), torch.zeros_like(d_b)
        _, (h_a_only, _) = torch.autograd.functional.hvp(loss, (a, b), (d_a, zero_b))
        _, (h_cross, h_b_only) = torch.autograd.functional.hvp(loss, (a, b), (zero_a, d_b))
        q_aa, q_bb = float((d_a * h_a_only).sum()), float((d_b * h_b_only).sum())
        q_ab = float((d_a * h_cross).sum())  # ⟨ΔA, H_AB ΔB⟩
        l_a, l_b = float((g_a * d_a).sum()), float((g_b * d_b).sum())
        if t > skip and l_a < 0 and l_b < 0:
            out["loss"].append(l_a / l_b)
            if q_aa > 0 and q_bb > 0:
                out["block"].append((l_b / q_bb) / (l_a / q_aa))
            det = q_aa * q_bb - q_ab**2
            if q_aa > 0 and det > 0:
                m_a, m_b = (-l_a * q_bb + l_b * q_ab) / det, (-l_b * q_aa + l_a * q_ab) / det
                if m_a > 0 and m_b > 0:
                    out["joint"].append(m_b / m_a)
        a, b = a + d_a, b + d_b
    return out


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--eta", type=float, default=0.01, help="the equal rate (quick grid's best: 0.01)")
    parser.add_argument("--steps", type=int, default=200, help="GD steps (200)")
    parser.add_argument("--seeds", type=int, default=3, help="seeds 0..N-1 (3)")
    parser.add_argument(
        "--out", type=Path, default=Path("out/joint_curvature.json"), help="JSON results path"
    )
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    pooled: dict[str, list[float]] = {"loss": [], "block": [], "joint": []}
    for seed in range(args.seeds):
        for key, values in per_step_ratios(args.eta, args.steps, seed, args.steps // 10).items():
            pooled[key].extend(values)
    result = {
        "eta": args.eta,
        "steps": args.steps,
        "seeds": args.seeds,
        "median_ratio": {k: statistics.median(v) if v else None for k, v in pooled.items()},
        "samples": {k: len(v) for k, v in pooled.items()},
    }
    logger.info("median λ' per model: %s (samples %s)", result["median_ratio"], result["samples"])
    atomic_write_json(args.out, result)


if __name__ == "__main__":
    main()
