"""LoRA+ efficiency diagnostics: δ¹, δ², δ³ per adapted layer, and the η_B/η_A ratio that balances them.

Hayou et al. (LoRA+, ICML 2024, §4) split one optimizer step's change of an adapted layer's LoRA features
``s·B A x`` (s = ``layer.scaling``) into::

    δ¹_t = s · B_{t-1} (A_t − A_{t-1}) x          change through A
    δ²_t = s · (B_t − B_{t-1}) A_{t-1} x          change through B
    δ³_t = s · (B_t − B_{t-1}) (A_t − A_{t-1}) x  second-order term

Training is *efficient* when δ¹ and δ² are both Θ(1); a persistent ratio δ¹/δ² far from 1 means one factor
barely learns. :class:`DeltaDiagnostics` measures the RMS of each term (over the sampled rows of x and the
output units) every ``every``-th optimizer step, on the inputs of that step's batch.

Usage with any training loop::

    diag = DeltaDiagnostics(model, every=10, run_dir="runs/exp1", optimizer=opt)
    for batch in loader:
        loss = model(batch).loss; loss.backward()
        diag.before_step()      # snapshots A, B (only on measured steps)
        opt.step()
        diag.after_step()       # computes δ terms, appends to diagnostics.jsonl
        opt.zero_grad()

``diag.after_step(loss_fn=lambda: model(batch).loss)`` also measures the curvature terms (below).

With ``transformers.Trainer``: ``Trainer(..., callbacks=[HFDeltaDiagnosticsCallback(every=10)])`` (the run
folder defaults to ``args.output_dir``). The step counter is internal (or set with ``begin_step(step)``);
inputs are captured by forward pre-hooks that only copy data while a measured step is armed, the layer is in
training mode and no input has been kept yet for that step (the first micro-batch under gradient
accumulation). At most ``max_rows`` rows of x are kept, detached. Embedding adapters (integer inputs) are
skipped with a debug log.

File format of ``<run_dir>/diagnostics.jsonl`` (one JSON object per measured step)::

    {"step": 10,
     "layers": {"<module path>": {"delta1": float, "delta2": float, "delta3": float, "ratio": float|null,
                                  "loss1": float|null, "loss2": float|null,
                                  "curv1": float|null, "curv2": float|null,   (only with a loss closure)
                                  "lr_A": float|null, "lr_B": float|null}, ...},
     "overall": {"delta1": float, "delta2": float, "delta3": float, "ratio": float|null}}

``ratio`` is δ¹/δ² (null when δ² = 0). ``loss1``/``loss2`` are ⟨dZ̄, δ¹⟩, ⟨dZ̄, δ²⟩ (below; null when the
factor has no ``.grad``). ``curv1``/``curv2`` are the curvatures ⟨ΔA, H_AA ΔA⟩, ⟨ΔB, H_BB ΔB⟩ along the step
(below); the keys exist only on steps measured with ``after_step(loss_fn=...)``, null for a frozen factor.
``overall`` is the root-mean-square over layers of each δ term.
``lr_A``/``lr_B`` are the learning rates of the param groups holding the layer's factors (null if the
optimizer is unknown or the factor is frozen). The file is rewritten atomically after every measurement.

**First-order loss terms** (LoRA+ Appendix B). The loss change of a step is, to first order,
``ΔL ≈ ⟨dZ̄, ΔZ_B⟩ = ⟨dZ̄, δ¹⟩ + ⟨dZ̄, δ²⟩ + O(δ³)``, with ``dZ̄`` the loss gradient at the layer output. Since
``∂L/∂A = s·Bᵀ dZ̄ xᵀ`` and ``∂L/∂B = s·dZ̄ (A x)ᵀ``, the two contributions are exactly
``⟨dZ̄, δ¹⟩ = ⟨∂L/∂A, ΔA⟩`` and ``⟨dZ̄, δ²⟩ = ⟨∂L/∂B, ΔB⟩``. They are recorded as ``loss1`` and ``loss2``
from the factors' ``.grad`` seen right before ``optimizer.step()`` (the whole batch's gradient, not only the
``max_rows`` kept rows; negative = the step lowers the loss through that factor).

**Ratio suggestion** (:func:`suggest_ratio`). Write the step of each factor as ``ΔA = −η_A P_A`` and
``ΔB = −η_B P_B``, where the processed gradient P does not depend on the factor's own rate at a given state:
P = ∇L for plain GD/SGD, and for Adam/SignSGD the scale-free normalised moment (the setting of LoRA+
Theorem 1). Then, at that state, each term is linear in its own factor's rate:

* ``criterion="feature"`` (LoRA+ §4, efficiency = δ¹ and δ² both Θ(1)): ``δ¹ = η_A·c₁`` with
  ``c₁ = RMS(s·B P_A x)`` and ``δ² = η_B·c₂`` with ``c₂ = RMS(s·P_B A x)``;
* ``criterion="loss"`` (LoRA+ Appendix B): ``−⟨dZ̄, δ¹⟩ = η_A·ℓ₁`` with ``ℓ₁ = ⟨∇_A L, P_A⟩`` and
  ``−⟨dZ̄, δ²⟩ = η_B·ℓ₂`` with ``ℓ₂ = ⟨∇_B L, P_B⟩`` (for GD ``ℓ = ‖∇L‖²``).

Keeping the state and changing the rates to (η_A', η_B'), the terms are equal when ``η_A'·c₁ = η_B'·c₂``::

    λ' = η_B'/η_A' = c₁/c₂ = (η_B/η_A) · (term¹/term²)

with term = δ (RMS) or −⟨dZ̄, δ⟩. This holds exactly for one step at a fixed state; over a run the state
depends on the rates (for GD, ∇_A L ∝ B and ∇_B L ∝ A x change along the trajectory), so it is a local,
first-order guide, and it may be iterated (measure at λ₀, suggest λ₁, re-measure at λ₁, …). The default is
``"loss"``: the RMS of δ counts feature movement the loss does not see (units behind a dead ReLU, directions
the next layers ignore) and only uses the ``max_rows`` kept rows, whereas −⟨dZ̄, δ⟩ is exactly each factor's
share of the first-order loss decrease of the whole batch, the quantity Appendix B ties efficiency to.
``"feature"`` remains the literal §4 criterion (and the one whose width scaling Theorem 1 states). Neither
sees curvature or stability: balancing either term is LoRA+'s efficiency criterion, not a prediction of the
rate pair with the lowest loss (under plain GD that pair sits at the edge of stability). The estimate is the
median over measured steps and layers of the per-(step, layer) λ', skipping step 0 and the first
``skip_fraction`` of the measured steps (transients, e.g. δ¹ = 0 while B = 0 under Init[1]); ``max_step``
restricts it to early (feature-learning) steps.

**Curvature-aware criteria.** Both first-order criteria say how to *share* a step between the factors, not
how long each factor's step may be. Two second-order criteria add the loss curvature, through the diagonal
Hessian blocks ``H_AA = ∂²L/∂A²`` and ``H_BB = ∂²L/∂B²``. The cross block ``H_AB`` is ignored: on the LoRA+
toy, a joint two-factor model that keeps it moved the suggestion only from 0.83 to 1.25
(``scripts/loraplus_joint_curvature.py``). The two criteria:

* ``criterion="curvature"`` (local quadratic model along each factor's own step). With ``ΔA = −η_A P_A``
  and the other factor held at its pre-step value, the second-order model of the loss is
  ``L(A − η P_A) ≈ L − η·⟨∇_A L, P_A⟩ + ½η²·⟨P_A, H_AA P_A⟩``, minimised at
  ``η*_A = ⟨∇_A L, P_A⟩ / ⟨P_A, H_AA P_A⟩`` when the curvature is positive (the exact line-search step of the
  quadratic model; for GD, ``‖∇_A L‖²/⟨∇_A L, H_AA ∇_A L⟩``, the Cauchy step). Likewise for B, and the
  suggestion is ``λ' = η*_B/η*_A``. In terms of the recorded step (``loss1 = ⟨∇_A L, ΔA⟩ = −η_A⟨∇_A L, P_A⟩``,
  ``curv1 = ⟨ΔA, H_AA ΔA⟩ = η_A²⟨P_A, H_AA P_A⟩``) the optimal multiple of the step taken is
  ``m*_A = η*_A/η_A = −loss1/curv1``, so ``λ' = λ · m*_B/m*_A = λ · (loss2/curv2)/(loss1/curv1)``, whatever
  the optimizer's processing P (GD, Adam, …). It extends the ``"loss"`` criterion (LoRA+ App. B) by the
  ``½η²`` term of the same expansion: each factor gets the rate that minimises its own quadratic model, and
  λ' is their ratio. It still looks one step ahead at a fixed state.
* ``criterion="sharpness"`` (stability edge). Gradient descent with rate η on a quadratic diverges along
  an eigenvector of H once η > 2/λ_max(H). Treating the blocks as decoupled, the largest stable rates are
  ``2/λ_max(H_AA)`` and ``2/λ_max(H_BB)``; putting both factors at the same fraction of their edge (the
  LoRA+ text on Fig. 2 notes that the best toy rates sit near the edge of stability, citing Cohen et al.)
  gives ``λ' = λ_max(H_AA)/λ_max(H_BB)`` (fields ``sharp1``, ``sharp2``). This holds for plain GD only
  (for Adam the edge is that of the preconditioned Hessian), needs an eigenvalue per factor (power
  iteration: many Hessian-vector products), and is measured only by the toy
  (:mod:`lorakit.experiments.loraplus_toy`).

``"curvature"`` is the one :class:`DeltaDiagnostics` measures: it is the exact minimiser of the local
model along the step actually taken, holds for any optimizer, and costs one Hessian-vector product per
factor. With ``after_step(loss_fn=...)`` (a closure recomputing the loss of the measured batch at the
current parameters), ``curv`` is taken by a central difference of gradients along the step,
``⟨Δ, H Δ⟩ ≈ ⟨Δ, ∇L(θ + εΔ) − ∇L(θ − εΔ)⟩/(2ε)`` at the pre-step state θ (every trainable parameter the
optimizer, or else the model, holds is put back to its pre-step value, e.g. a trained task head; only the
LoRA factors when neither was given), one factor at a time (all layers'
A factors together, then all B factors): four extra forward/backward passes on measured steps only, all
with the same forked RNG seed (so dropout masks agree), exact for a loss quadratic in the factor. The
default ``curvature_eps = 1`` makes it the secant curvature over the step taken (robust in low precision);
a smaller ε approaches the Hessian at θ. Per layer, ``curv1`` is that layer's share
``⟨ΔA_l, (H_AA ΔA)_l⟩`` of the curvature of the joint A-block (the layers' shares add up to
``⟨ΔA, H_AA ΔA⟩``; for a single adapted layer it is the layer's own block). No double backward is needed,
so fused kernels without second derivatives work. The closure must compute the same loss as the step's
gradient (same batch; under gradient accumulation, the same micro-batches), and on the unwrapped model.

On the LoRA+ toy under GD none of the four criteria lands in the near-best λ band at t = T (numbers in
``docs/results.md``); the default stays ``"loss"``.
"""

from __future__ import annotations

import logging
import math
import os
import statistics
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lorakit.utils import JsonlLog, read_jsonl

logger = logging.getLogger(__name__)

DIAGNOSTICS_FILE = "diagnostics.jsonl"


def _find_lora_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    import lorakit

    return list(lorakit.lora_layers(model))


def _factor(layer: nn.Module, name: str) -> torch.Tensor:
    value = getattr(layer, name, None)
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"lorakit.analysis.diagnostics: layer {type(layer).__name__} has no tensor {name!r}")
    return value


def _is_embedding(layer: nn.Module) -> bool:
    return isinstance(getattr(layer, "base_layer", None), nn.Embedding)


def rms(tensor: torch.Tensor) -> float:
    """Root mean square of all entries (0.0 for an empty tensor)."""
    return float(_rms(tensor))


def _rms(tensor: torch.Tensor) -> torch.Tensor:
    if not tensor.numel():
        return tensor.new_zeros((), dtype=torch.float32)
    return tensor.float().pow(2).mean().sqrt()


def _delta_tensor(
    x: torch.Tensor,
    a_prev: torch.Tensor,
    b_prev: torch.Tensor,
    a_new: torch.Tensor,
    b_new: torch.Tensor,
    scaling: float,
) -> torch.Tensor:
    """(3,) tensor of RMS δ¹, δ², δ³ on the factors' device (no host synchronisation).

    RMS = ‖·‖_F / √numel, one norm kernel per term; the three terms share numel (rows × out) and s, so one
    multiply applies both to all three (few kernels: on small GPU models a measurement is launch-bound).
    """
    x = x.reshape(-1, x.shape[-1]).float()
    a_prev, b_prev = a_prev.float(), b_prev.float()
    d_a = a_new.float() - a_prev
    d_b = b_new.float() - b_prev
    z_prev = x @ a_prev.T
    z_delta = x @ d_a.T
    numel = x.shape[0] * b_prev.shape[0]
    if not numel:
        return x.new_zeros(3)
    norms = torch.stack(
        [torch.linalg.vector_norm(t) for t in (z_delta @ b_prev.T, z_prev @ d_b.T, z_delta @ d_b.T)]
    )
    return norms * (abs(scaling) / math.sqrt(numel))


def delta_terms(
    x: torch.Tensor,
    a_prev: torch.Tensor,
    b_prev: torch.Tensor,
    a_new: torch.Tensor,
    b_new: torch.Tensor,
    scaling: float = 1.0,
) -> tuple[float, float, float]:
    """RMS of δ¹ = s·B_prev ΔA x, δ² = s·ΔB A_prev x, δ³ = s·ΔB ΔA x for rows x (…, in_features)."""
    d1, d2, d3 = _delta_tensor(x, a_prev, b_prev, a_new, b_new, scaling).tolist()
    return d1, d2, d3


def _first_order_terms(
    grads: Sequence[torch.Tensor], befores: Sequence[torch.Tensor], afters: Sequence[torch.Tensor]
) -> torch.Tensor:
    """``[⟨g_i, after_i − before_i⟩]`` (float64) for any number of tensors in a fixed handful of kernels.

    The tensors are flattened into one vector each; the products are summed per tensor with ``index_add_``
    over segment ids that are cached per layout (building them copies to the device once).
    """
    device = grads[0].device
    sizes = tuple(g.numel() for g in grads)
    key = (sizes, str(device))
    ids = _SEGMENT_IDS.get(key)
    if ids is None:
        counts = torch.tensor(sizes, device=device)
        ids = torch.repeat_interleave(torch.arange(len(sizes), device=device), counts)
        _SEGMENT_IDS.clear()  # one layout per model: keep only the current one
        _SEGMENT_IDS[key] = ids

    def flat(tensors: Sequence[torch.Tensor]) -> torch.Tensor:
        return torch.cat([t.reshape(-1).to(device) for t in tensors]).double()

    products = flat(grads) * (flat(afters) - flat(befores))
    return torch.zeros(len(sizes), dtype=torch.float64, device=device).index_add_(0, ids, products)


_SEGMENT_IDS: dict[tuple, torch.Tensor] = {}


def first_order_loss_term(grad: torch.Tensor, before: torch.Tensor, after: torch.Tensor) -> float:
    """``⟨∇L, Δθ⟩`` of one factor: ⟨dZ̄, δ¹⟩ for A, ⟨dZ̄, δ²⟩ for B (module docstring; float64 sum)."""
    return float((grad.double() * (after.double() - before.double())).sum())


def _gradients_at(
    loss_fn: Callable[[], torch.Tensor],
    params: Sequence[torch.Tensor],
    values: Sequence[torch.Tensor],
    seed: int,
) -> list[torch.Tensor]:
    """∇L w.r.t. ``params`` with ``params`` set to ``values``, under a forked RNG seeded with ``seed``."""
    with torch.no_grad():
        for param, value in zip(params, values, strict=True):
            param.copy_(value)
    devices = sorted({p.device.index or 0 for p in params if p.device.type == "cuda"})
    with torch.random.fork_rng(devices=devices), torch.enable_grad():
        torch.manual_seed(seed)
        loss = loss_fn()
        grads = torch.autograd.grad(loss, list(params), allow_unused=True)
    return [torch.zeros_like(p) if g is None else g.detach() for p, g in zip(params, grads, strict=True)]


def hessian_quadratic_forms(
    loss_fn: Callable[[], torch.Tensor],
    params: Sequence[torch.Tensor],
    directions: Sequence[torch.Tensor],
    eps: float = 1.0,
    seed: int = 0,
) -> list[float]:
    """Per tensor i, ``⟨v_i, (H v)_i⟩`` with H the Hessian of ``loss_fn()`` w.r.t. ``params`` jointly, at the
    current values θ, along v = ``directions``; their sum is ``⟨v, H v⟩``.

    Central difference of gradients, ``H v ≈ (∇L(θ + εv) − ∇L(θ − εv))/(2ε)``: two forward/backward passes,
    both under the same forked RNG seed (equal dropout masks), exact when the loss is quadratic in
    ``params``. The parameters are restored to θ afterwards. Dot products in float64.
    """
    if eps <= 0:
        raise ValueError(f"lorakit.analysis.diagnostics: eps must be > 0, got {eps}")
    base = [p.detach().clone() for p in params]
    try:
        plus = _gradients_at(
            loss_fn, params, [b + eps * v for b, v in zip(base, directions, strict=True)], seed
        )
        minus = _gradients_at(
            loss_fn, params, [b - eps * v for b, v in zip(base, directions, strict=True)], seed
        )
    finally:
        with torch.no_grad():
            for param, value in zip(params, base, strict=True):
                param.copy_(value)
    return [
        float((v.double() * (gp.double() - gm.double())).sum()) / (2.0 * eps)
        for v, gp, gm in zip(directions, plus, minus, strict=True)
    ]


@dataclass
class _Tracked:
    name: str
    layer: nn.Module
    x: torch.Tensor | None = None
    snapshot: tuple[torch.Tensor, torch.Tensor] | None = None
    grads: tuple[torch.Tensor | None, torch.Tensor | None] = (None, None)
    handle: Any = None


class DeltaDiagnostics:
    """Measures δ¹, δ², δ³ of every LoRA layer every ``every``-th step (see the module docstring).

    ``layers``: explicit ``(name, layer)`` pairs; default ``lorakit.lora_layers(model)``. ``run_dir``: where
    ``diagnostics.jsonl`` is written (None: keep in memory only, see :attr:`records`). ``curvature_eps``: the
    ε of the finite-difference curvature ``curv1``/``curv2``, in units of the step (module docstring).
    """

    def __init__(
        self,
        model: nn.Module | None = None,
        every: int = 10,
        run_dir: str | os.PathLike | None = None,
        optimizer: torch.optim.Optimizer | None = None,
        max_rows: int = 256,
        layers: Iterable[tuple[str, nn.Module]] | None = None,
        curvature_eps: float = 1.0,
    ) -> None:
        if curvature_eps <= 0:
            raise ValueError(f"lorakit.analysis.diagnostics: curvature_eps must be > 0, got {curvature_eps}")
        if every < 1:
            raise ValueError(f"lorakit.analysis.diagnostics: every must be >= 1, got {every}")
        if max_rows < 1:
            raise ValueError(f"lorakit.analysis.diagnostics: max_rows must be >= 1, got {max_rows}")
        self.every = every
        self.max_rows = max_rows
        self.curvature_eps = curvature_eps
        self.optimizer = optimizer
        self.run_dir = Path(run_dir) if run_dir is not None else None
        self._log = JsonlLog(None if self.run_dir is None else self.run_dir / DIAGNOSTICS_FILE)
        self.step = 0
        self._tracked: list[_Tracked] = []
        self._model: nn.Module | None = None
        # (parameter, pre-step copy) of the other trainable parameters, on measured steps (curvature)
        self._others: list[tuple[torch.Tensor, torch.Tensor]] = []
        self._recomputing = False
        if layers is not None or model is not None:
            self.attach(model, layers)

    # -- set-up -------------------------------------------------------------------------------------
    def attach(self, model: nn.Module | None, layers: Iterable[tuple[str, nn.Module]] | None = None) -> None:
        """Register the input-capturing pre-hooks on every adapted layer (idempotent per instance)."""
        self.detach()
        self._model = model
        pairs = list(layers) if layers is not None else _find_lora_layers(model) if model is not None else []
        if not pairs:
            raise ValueError("lorakit.analysis.diagnostics: no LoRA layers found (inject adapters first)")
        for name, layer in pairs:
            if _is_embedding(layer):
                logger.debug("diagnostics: skipping embedding adapter %s", name)
                continue
            tracked = _Tracked(name, layer)
            tracked.handle = layer.register_forward_pre_hook(self._make_hook(tracked))
            self._tracked.append(tracked)
        if not self._tracked:
            raise ValueError("lorakit.analysis.diagnostics: only embedding adapters; nothing to measure")

    def detach(self) -> None:
        """Remove the hooks."""
        for tracked in self._tracked:
            tracked.handle.remove()
        self._tracked = []

    @property
    def armed(self) -> bool:
        """Whether the current step is measured."""
        return self.step % self.every == 0

    def _make_hook(self, tracked: _Tracked):
        def hook(module: nn.Module, args: tuple) -> None:
            if (
                self._recomputing
                or not self.armed
                or tracked.x is not None
                or not module.training
                or not args
            ):
                return
            x = args[0]
            if not isinstance(x, torch.Tensor) or not x.is_floating_point():
                logger.debug("diagnostics: %s got a non-float input; not measured", tracked.name)
                return
            rows = x.detach().reshape(-1, x.shape[-1])
            tracked.x = rows[: self.max_rows].clone()

        return hook

    # -- per step -------------------------------------------------------------------------------------
    def begin_step(self, step: int) -> None:
        """Set the step counter explicitly (e.g. a trainer's global step) before the step's forward pass."""
        if step != self.step:
            for tracked in self._tracked:
                tracked.x = None
        self.step = int(step)

    def resume(self, step: int) -> None:
        """Continue a run at ``step`` (e.g. from a checkpoint): keep the records of ``run_dir``'s file that
        were measured before ``step`` (later ones are re-measured) and set the step counter."""
        self.begin_step(step)
        self._log.load(lambda record: record.get("step", 0) < step)

    def before_step(self) -> None:
        """Call right before ``optimizer.step()``: snapshots A, B and their gradients on measured steps, and
        the other trainable parameters (for the curvature terms' pre-step state)."""
        if not self.armed:
            return
        sources: list[torch.Tensor] = []
        copies: list[torch.Tensor] = []

        def snapshot(tensor: torch.Tensor | None) -> torch.Tensor | None:
            if tensor is None:
                return None
            sources.append(tensor.detach())
            copies.append(torch.empty_like(tensor))
            return copies[-1]

        for tracked in self._tracked:
            a, b = _factor(tracked.layer, "lora_A"), _factor(tracked.layer, "lora_B")
            tracked.snapshot = (snapshot(a), snapshot(b))
            tracked.grads = (snapshot(a.grad), snapshot(b.grad))
        self._others = [(param, snapshot(param)) for param in self._other_trainable()]
        if sources:
            torch._foreach_copy_(copies, sources)  # one multi-tensor kernel instead of one clone each

    def after_step(self, loss_fn: Callable[[], torch.Tensor] | None = None) -> dict[str, Any] | None:
        """Call right after ``optimizer.step()``: computes δ terms, records them, advances the counter.

        ``loss_fn``: optional closure returning the loss of this step's batch at the model's current
        parameters; on measured steps it adds ``curv1``/``curv2`` (four extra forward/backward passes, see the
        module docstring). It is not called on other steps.
        """
        record = None
        if self.armed:
            curvature = self._curvature(loss_fn) if loss_fn is not None else None
            record = self._measure(curvature)
            if record is not None:
                self._log.add(record)
        for tracked in self._tracked:
            tracked.x = None
            tracked.snapshot = None
            tracked.grads = (None, None)
        self._others = []
        self.step += 1
        return record

    def _other_trainable(self) -> list[torch.Tensor]:
        """Trainable parameters other than the tracked factors: the optimizer's, else the model's."""
        if self.optimizer is not None:
            params = [p for group in self.optimizer.param_groups for p in group["params"]]
        elif self._model is not None:
            params = list(self._model.parameters())
        else:
            return []
        factors = {id(_factor(t.layer, name)) for t in self._tracked for name in ("lora_A", "lora_B")}
        unique = {id(p): p for p in params if p.requires_grad and id(p) not in factors}
        return list(unique.values())

    def _curvature(self, loss_fn: Callable[[], torch.Tensor]) -> dict[str, tuple[float | None, float | None]]:
        """Per layer ``(⟨ΔA, H_AA ΔA⟩, ⟨ΔB, H_BB ΔB⟩)`` shares at the pre-step state (module docstring)."""
        tracked = [t for t in self._tracked if t.snapshot is not None]
        factors = [(_factor(t.layer, "lora_A"), _factor(t.layer, "lora_B")) for t in tracked]
        new = [(a.detach().clone(), b.detach().clone()) for a, b in factors]
        others_new = [param.detach().clone() for param, _ in self._others]
        out: dict[str, list[float | None]] = {t.name: [None, None] for t in tracked}
        self._recomputing = True
        try:
            with torch.no_grad():  # the quadratic model is taken at the state the step started from
                for (a, b), t in zip(factors, tracked, strict=True):
                    a.copy_(t.snapshot[0])
                    b.copy_(t.snapshot[1])
                for param, before in self._others:
                    param.copy_(before)
            for k in (0, 1):
                chosen = [
                    (t.name, pair[k], (n[k] - t.snapshot[k]).to(pair[k].dtype))
                    for t, pair, n in zip(tracked, factors, new, strict=True)
                    if pair[k].requires_grad
                ]
                if not chosen:
                    continue
                params = [c[1] for c in chosen]
                directions = [c[2] for c in chosen]
                shares = hessian_quadratic_forms(
                    loss_fn, params, directions, self.curvature_eps, seed=self.step
                )
                for (name, *_), share in zip(chosen, shares, strict=True):
                    out[name][k] = share
        finally:
            self._recomputing = False
            with torch.no_grad():
                for (a, b), (a_new, b_new) in zip(factors, new, strict=True):
                    a.copy_(a_new)
                    b.copy_(b_new)
                for (param, _), after in zip(self._others, others_new, strict=True):
                    param.copy_(after)
        return {name: (v[0], v[1]) for name, v in out.items()}

    @torch.no_grad()
    def _measure(
        self, curvature: dict[str, tuple[float | None, float | None]] | None = None
    ) -> dict[str, Any] | None:
        layers: dict[str, dict[str, float | None]] = {}
        lrs = self._learning_rates()
        measured = []  # (name, layer, δ tensor (3,), [factor has a gradient] × 2)
        loss_inputs: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []  # (grad, before, after)
        for tracked in self._tracked:
            if tracked.x is None or tracked.snapshot is None:
                continue
            layer = tracked.layer
            a_prev, b_prev = tracked.snapshot
            a_new, b_new = _factor(layer, "lora_A"), _factor(layer, "lora_B")
            x = tracked.x.to(a_prev.device)
            deltas = _delta_tensor(x, a_prev, b_prev, a_new, b_new, float(layer.scaling))
            has_grad = [grad is not None for grad in tracked.grads]
            for grad, prev, new in zip(tracked.grads, (a_prev, b_prev), (a_new, b_new), strict=True):
                if grad is not None:
                    loss_inputs.append((grad, prev, new))
            measured.append((tracked.name, layer, deltas, has_grad))
        # One device-to-host copy each for all layers: a float() per value would synchronise each time.
        delta_values = torch.stack([m[2] for m in measured]).tolist() if measured else []
        loss_values = iter(
            _first_order_terms(*zip(*loss_inputs, strict=True)).tolist() if loss_inputs else []
        )
        for (name, layer, _, has_grad), (d1, d2, d3) in zip(measured, delta_values, strict=True):
            loss1, loss2 = (next(loss_values) if has else None for has in has_grad)
            layers[name] = {
                "delta1": d1,
                "delta2": d2,
                "delta3": d3,
                "ratio": d1 / d2 if d2 > 0 else None,
                "loss1": loss1,
                "loss2": loss2,
                **(
                    {}
                    if curvature is None
                    else dict(zip(("curv1", "curv2"), curvature.get(name, (None, None)), strict=True))
                ),
                "lr_A": lrs.get(id(layer.lora_A)),
                "lr_B": lrs.get(id(layer.lora_B)),
            }
        if not layers:
            logger.debug("diagnostics: step %d armed but no layer input was captured", self.step)
            return None
        overall = {
            key: math.sqrt(statistics.fmean(v[key] ** 2 for v in layers.values()))
            for key in ("delta1", "delta2", "delta3")
        }
        overall["ratio"] = overall["delta1"] / overall["delta2"] if overall["delta2"] > 0 else None
        return {"step": self.step, "layers": layers, "overall": overall}

    def _learning_rates(self) -> dict[int, float]:
        if self.optimizer is None:
            return {}
        return {id(p): float(group["lr"]) for group in self.optimizer.param_groups for p in group["params"]}

    @property
    def records(self) -> list[dict[str, Any]]:
        """The records measured so far (those of ``<run_dir>/diagnostics.jsonl`` when there is a run_dir)."""
        return self._log.records

    def write(self) -> Path:
        """Rewrite ``<run_dir>/diagnostics.jsonl`` atomically with all records so far (``after_step``
        already appends each record as it is measured)."""
        if self.run_dir is None:
            raise ValueError("lorakit.analysis.diagnostics: no run_dir given; nothing to write to")
        return self._log.rewrite()


def read_diagnostics(path: str | os.PathLike) -> list[dict[str, Any]]:
    """Read a diagnostics JSONL file (or a run folder containing ``diagnostics.jsonl``)."""
    path = Path(path)
    if path.is_dir():
        path = path / DIAGNOSTICS_FILE
    if not path.is_file():
        raise FileNotFoundError(f"no diagnostics file at {path} (run training with DeltaDiagnostics first)")
    records = []
    for number, record in read_jsonl(path):
        valid = isinstance(record, dict) and "step" in record and isinstance(record.get("layers"), dict)
        if not valid:
            raise ValueError(f"{path}, line {number}: expected an object with 'step' and 'layers' fields")
        for name, values in record["layers"].items():
            missing = {"delta1", "delta2"} - set(values)
            if missing:
                raise ValueError(f"{path}, line {number}: layer {name!r} lacks {sorted(missing)}")
        records.append(record)
    if not records:
        raise ValueError(f"{path}: no measurements in the file")
    return records


#: criteria of :func:`suggest_ratio`: which pair of per-factor terms is balanced (module docstring)
CRITERIA = ("feature", "loss", "curvature", "sharpness")

#: record fields each criterion reads, and how to get them when a file lacks them
CRITERION_FIELDS = {
    "feature": ("delta1", "delta2"),
    "loss": ("loss1", "loss2"),
    "curvature": ("loss1", "loss2", "curv1", "curv2"),
    "sharpness": ("sharp1", "sharp2"),
}
_HOW_TO_MEASURE = {
    "feature": "record them with DeltaDiagnostics",
    "loss": "record them with DeltaDiagnostics (factors need .grad before optimizer.step())",
    "curvature": "measure them with DeltaDiagnostics.after_step(loss_fn=...), a closure recomputing the loss "
    "of the measured batch (four extra forward/backward passes on measured steps)",
    "sharpness": "top Hessian-block eigenvalues are measured only by the LoRA+ toy "
    "(lorakit.experiments.loraplus_toy); use criterion='curvature' for real models",
}


@dataclass
class RatioSuggestion:
    """Output of :func:`suggest_ratio`."""

    ratio: float
    current_ratio: float
    samples: int
    per_layer: dict[str, float] = field(default_factory=dict)
    criterion: str = "loss"


def balancing_ratio(delta1: float, delta2: float, current_ratio: float) -> float:
    """``λ' = λ · term¹/term²``: the η_B/η_A equalising two terms linear in η_A and η_B (module docstring).

    ``delta1``, ``delta2``: the positive per-factor terms (δ RMS, or the first-order loss decreases).
    """
    if not (delta1 > 0 and delta2 > 0 and current_ratio > 0):
        raise ValueError(
            f"lorakit.analysis.diagnostics: need positive delta1, delta2 and ratio, got "
            f"{delta1!r}, {delta2!r}, {current_ratio!r} (a frozen factor gives a zero term)"
        )
    return current_ratio * delta1 / delta2


def quadratic_model_ratio(
    loss1: float, loss2: float, curv1: float, curv2: float, current_ratio: float
) -> float:
    """``λ' = η*_B/η*_A = λ · m*_B/m*_A`` with ``m* = −loss/curv`` the step multiple minimising each factor's
    quadratic model ``m·loss + ½m²·curv`` (module docstring, ``criterion="curvature"``).

    ``loss1``, ``loss2``: ``⟨∇L, Δθ⟩`` per factor (negative); ``curv1``, ``curv2``: ``⟨Δθ, H Δθ⟩`` (positive).
    """
    if not (loss1 < 0 and loss2 < 0 and curv1 > 0 and curv2 > 0 and current_ratio > 0):
        raise ValueError(
            f"lorakit.analysis.diagnostics: need loss terms < 0 and curvatures > 0, got loss "
            f"{loss1!r}, {loss2!r}, curvature {curv1!r}, {curv2!r} (ratio {current_ratio!r})"
        )
    return current_ratio * (loss2 / curv2) / (loss1 / curv1)


def _balanced(layer: dict[str, Any], criterion: str, current: float) -> float | None:
    """λ' of one (step, layer) entry, or None when its terms do not allow one (frozen factor, loss increase
    to first order, non-positive curvature)."""
    values = [layer.get(key) for key in CRITERION_FIELDS[criterion]]
    if any(v is None for v in values):
        return None
    if criterion == "feature":
        d1, d2 = values
        return balancing_ratio(d1, d2, current) if d1 > 0 and d2 > 0 else None
    if criterion == "loss":
        l1, l2 = values
        return balancing_ratio(-l1, -l2, current) if l1 < 0 and l2 < 0 else None  # loss decreases
    if criterion == "curvature":
        l1, l2, c1, c2 = values
        usable = l1 < 0 and l2 < 0 and c1 > 0 and c2 > 0
        return quadratic_model_ratio(l1, l2, c1, c2, current) if usable else None
    s1, s2 = values
    return s1 / s2 if s1 > 0 and s2 > 0 else None


def has_fields(records: Iterable[dict[str, Any]], criterion: str) -> bool:
    """Whether any (step, layer) entry of ``records`` holds every field ``criterion`` needs."""
    fields = CRITERION_FIELDS[criterion]
    return any(
        all(key in layer for key in fields) for record in records for layer in record["layers"].values()
    )


def _records_iter(records: Iterable[dict[str, Any]] | str | os.PathLike) -> list[dict[str, Any]]:
    if isinstance(records, (str, os.PathLike)):
        return read_diagnostics(records)
    return list(records)


def suggest_ratio(
    records: Iterable[dict[str, Any]] | str | os.PathLike,
    lr_A: float | None = None,
    lr_B: float | None = None,
    skip_fraction: float = 0.1,
    criterion: str = "loss",
    max_step: int | None = None,
) -> RatioSuggestion:
    """Robust λ = η_B/η_A from the records: the median over steps and layers of the per-entry λ'.

    ``criterion`` (derivations in the module docstring): ``"loss"`` (default) balances the first-order loss
    decreases −⟨dZ̄, δ¹⟩ and −⟨dZ̄, δ²⟩ (LoRA+ App. B; fields ``loss1``/``loss2``); ``"feature"`` balances the
    RMS feature changes δ¹ and δ² (LoRA+ §4); ``"curvature"`` takes the ratio of the per-factor rates that
    minimise the local quadratic model, ``λ·(loss2/curv2)/(loss1/curv1)`` (needs ``curv1``/``curv2``, from
    ``DeltaDiagnostics.after_step(loss_fn=...)``); ``"sharpness"`` the ratio of the factors' stability
    edges, ``sharp1/sharp2`` = λ_max(H_AA)/λ_max(H_BB) (toy records only).
    ``records``: diagnostics records (as written by :class:`DeltaDiagnostics`) or a path to them.
    ``lr_A``, ``lr_B``: the rates used, when the records lack them (records' own values win).
    Uses steps ``1..max_step`` (all when None), then skips the first ``skip_fraction`` of them; ignores
    entries whose terms give no λ' (a frozen factor, a step that raised the loss to first order, a
    non-positive curvature). Raises ``ValueError`` naming the missing field when no entry has the fields the
    criterion needs, and when nothing usable remains.
    """
    if criterion not in CRITERIA:
        raise ValueError(
            f"lorakit.analysis.diagnostics: criterion must be one of {CRITERIA}, not {criterion!r}"
        )
    if not 0.0 <= skip_fraction < 1.0:
        raise ValueError(
            f"lorakit.analysis.diagnostics: skip_fraction must be in [0, 1), not {skip_fraction}"
        )
    last = math.inf if max_step is None else max_step
    items = sorted((r for r in _records_iter(records) if 0 < r["step"] <= last), key=lambda r: r["step"])
    items = items[int(len(items) * skip_fraction) :]
    fields = CRITERION_FIELDS[criterion]
    entries = [(record["step"], name, layer) for record in items for name, layer in record["layers"].items()]
    if entries and not has_fields(items, criterion):
        step, name, layer = entries[0]
        missing = [key for key in fields if key not in layer]
        raise ValueError(
            f"lorakit.analysis.diagnostics: criterion {criterion!r} needs the fields {list(fields)}; the "
            f"records lack {missing} (e.g. step {step}, layer {name!r}): {_HOW_TO_MEASURE[criterion]}"
        )
    values: list[float] = []
    current: list[float] = []
    per_layer_values: dict[str, list[float]] = {}
    for record in items:
        for name, layer in record["layers"].items():
            if _balanced(layer, criterion, 1.0) is None:
                continue  # a frozen factor, a first-order loss increase or a non-positive curvature
            la = layer.get("lr_A") if layer.get("lr_A") is not None else lr_A
            lb = layer.get("lr_B") if layer.get("lr_B") is not None else lr_B
            if la is None or lb is None:
                raise ValueError(
                    f"lorakit.analysis.diagnostics: step {record['step']}, layer {name!r} has no learning "
                    "rates; pass lr_A and lr_B to suggest_ratio"
                )
            if la <= 0 or lb <= 0:
                continue
            value = _balanced(layer, criterion, lb / la)
            values.append(value)
            current.append(lb / la)
            per_layer_values.setdefault(name, []).append(value)
    if not values:
        needs = {
            "feature": "delta1 > 0 and delta2 > 0",
            "loss": "loss1 < 0 and loss2 < 0",
            "curvature": "loss1 < 0, loss2 < 0, curv1 > 0 and curv2 > 0",
            "sharpness": "sharp1 > 0 and sharp2 > 0",
        }[criterion]
        raise ValueError(
            f"lorakit.analysis.diagnostics: no measurement with {needs} after skipping the first "
            "steps; is one factor frozen?"
        )
    return RatioSuggestion(
        ratio=statistics.median(values),
        current_ratio=statistics.median(current),
        samples=len(values),
        per_layer={name: statistics.median(v) for name, v in per_layer_values.items()},
        criterion=criterion,
    )


def _hf_callback_class() -> type:
    from transformers import TrainerCallback

    class HFDeltaDiagnosticsCallback(TrainerCallback):
        """``transformers.TrainerCallback`` running :class:`DeltaDiagnostics` (run folder: ``output_dir``)."""

        def __init__(self, every: int = 10, run_dir: str | os.PathLike | None = None, max_rows: int = 256):
            self.every, self.run_dir, self.max_rows = every, run_dir, max_rows
            self.diagnostics: DeltaDiagnostics | None = None

        def on_train_begin(self, args, state, control, model=None, **kwargs):
            self.diagnostics = DeltaDiagnostics(
                model, every=self.every, run_dir=self.run_dir or args.output_dir, max_rows=self.max_rows
            )

        def on_step_begin(self, args, state, control, **kwargs):
            if self.diagnostics is not None:
                self.diagnostics.begin_step(state.global_step)

        def on_pre_optimizer_step(self, args, state, control, optimizer=None, **kwargs):
            if self.diagnostics is not None:
                self.diagnostics.optimizer = optimizer
                self.diagnostics.before_step()

        def on_optimizer_step(self, args, state, control, **kwargs):
            if self.diagnostics is not None:
                self.diagnostics.after_step()

        def on_train_end(self, args, state, control, **kwargs):
            if self.diagnostics is not None:
                self.diagnostics.detach()

    return HFDeltaDiagnosticsCallback


_HF_CLASS: type | None = None


def __getattr__(name: str) -> Any:
    # built on first use so that this module imports without transformers installed
    global _HF_CLASS
    if name == "HFDeltaDiagnosticsCallback":
        if _HF_CLASS is None:
            _HF_CLASS = _hf_callback_class()
        return _HF_CLASS
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def iter_layer_series(
    records: list[dict[str, Any]], key: str
) -> Iterator[tuple[str, list[int], list[float]]]:
    """Per layer: (name, steps, values of ``key``) in step order (for tables and plots)."""
    names: list[str] = []
    for record in records:
        names.extend(n for n in record["layers"] if n not in names)
    for name in names:
        steps, values = [], []
        for record in sorted(records, key=lambda r: r["step"]):
            if name in record["layers"] and record["layers"][name].get(key) is not None:
                steps.append(record["step"])
                values.append(float(record["layers"][name][key]))
        yield name, steps, values
