"""Gradient baselines of Zeng & Lee (ICLR 2024, Sec. 5): Adam-trained LoRA and tuning the final k layers.

Protocol (authors' ``configs/regression_config.py``): LoRA output factor B = 0, input factor A ~ N(0, 0.25²),
no α/r scale; Adam (torch defaults, coupled L2 weight decay) over lr ∈ {1e-2, 1e-3, 1e-4} x weight decay ∈
{0, 1e-4, 1e-3, 1e-2}; one fresh Gaussian batch of 256 per step; validation 256 and test 5,000 points;
for each (rank, seed) the grid point with the lowest validation MSE of the final model is selected and its
test MSE reported; curves are medians over seeds. Train, validation and test data come from dedicated
``torch.Generator`` streams per seed (the authors' code re-seeds the global RNG in ``val()``/``test()``,
which makes the validation set part of the test set and recycles training batches).

For speed every (seed, rank or k, lr, weight decay) configuration is trained at once: parameters carry a
leading configuration axis K, ranks below the maximum are realised by masking factor rows/columns, and
:class:`BatchedAdam` applies each configuration's own lr and weight decay. The configurations do not
interact: the summed loss has a block-diagonal gradient.
"""

from __future__ import annotations

import itertools
import math
import statistics
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor
from tqdm.auto import tqdm

from lorakit.theory.models import FNN, TFN
from lorakit.utils import named_generator

PAPER_LRS = (1e-2, 1e-3, 1e-4)
PAPER_WEIGHT_DECAYS = (0.0, 1e-4, 1e-3, 1e-2)


@dataclass
class TrainSettings:
    """Optimisation protocol shared by the baselines (defaults = the paper's values)."""

    steps: int = 5000
    lrs: Sequence[float] = PAPER_LRS
    weight_decays: Sequence[float] = PAPER_WEIGHT_DECAYS
    batch: int = 256
    val_size: int = 256
    test_size: int = 5000
    lora_std: float = 0.25
    tokens: int = 10  # N, sequence length of TFN inputs
    eval_chunk: int = 1000
    progress: bool = True


class BatchedAdam:
    """Adam (``torch.optim.Adam`` semantics, coupled L2 weight decay) with per-configuration lr and decay.

    ``lr`` and ``weight_decay`` have shape (K,) and broadcast over each parameter's leading axis; ``masks``
    (optional, broadcastable to the parameter) zero the update of frozen entries.
    """

    def __init__(
        self,
        params: list[Tensor],
        lr: Tensor,
        weight_decay: Tensor,
        masks: list[Tensor | None] | None = None,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
    ) -> None:
        self.params, self.lr, self.wd = params, lr, weight_decay
        self.masks = masks or [None] * len(params)
        self.betas, self.eps, self.t = betas, eps, 0
        self.m = [torch.zeros_like(p) for p in params]
        self.v = [torch.zeros_like(p) for p in params]

    @torch.no_grad()
    def step(self) -> None:
        self.t += 1
        b1, b2 = self.betas
        c1, c2 = 1 - b1**self.t, 1 - b2**self.t
        for p, m, v, mask in zip(self.params, self.m, self.v, self.masks, strict=True):
            shape = (-1,) + (1,) * (p.ndim - 1)
            grad = p.grad + self.wd.view(shape) * p
            m.mul_(b1).add_(grad, alpha=1 - b1)
            v.mul_(b2).addcmul_(grad, grad, value=1 - b2)
            update = (m / c1) / ((v / c2).sqrt() + self.eps) * self.lr.view(shape)
            if mask is not None:
                update = update * mask
            p.sub_(update)
            p.grad = None


def _grid(
    settings: TrainSettings, seeds: int, variants: Sequence[int]
) -> list[tuple[int, int, float, float]]:
    return list(itertools.product(range(seeds), variants, settings.lrs, settings.weight_decays))


def split_inputs(seed: int, split: str, size: int, shape: Sequence[int]) -> Tensor:
    """The first ``size`` inputs (float64, N(0, I)) of the dedicated ``split`` stream of ``seed``."""
    return torch.randn((size, *shape), generator=split_generator(seed, split), dtype=torch.float64)


def split_generator(seed: int, split: str) -> torch.Generator:
    """Independent generator per (seed, split): train, val, test, calibration, ... never share a stream."""
    return named_generator(seed, f"expressive/{split}")


def _select(
    grid: list[tuple[int, int, float, float]], val: Tensor, test: Tensor, seeds: int, variants: Sequence[int]
) -> dict:
    """Best-validation grid point per (variant, seed); returns test MSE table and medians over seeds."""
    table = torch.full((len(variants), seeds), math.nan, dtype=torch.float64)
    chosen: list[list[dict]] = [[{} for _ in range(seeds)] for _ in variants]
    best = torch.full((len(variants), seeds), math.inf, dtype=torch.float64)
    index = {v: i for i, v in enumerate(variants)}
    for k, (s, variant, lr, wd) in enumerate(grid):
        i = index[variant]
        value = float(val[k])
        if not math.isfinite(value):
            continue
        if value < best[i, s]:
            best[i, s] = value
            table[i, s] = float(test[k])
            chosen[i][s] = {"lr": lr, "weight_decay": wd, "val_mse": value}
    rows = table.tolist()
    return {
        "variants": list(variants),
        "test_mse": rows,
        "median": [median(r) for r in rows],
        "chosen": chosen,
    }


def median(values: Sequence[float]) -> float:
    """Median of the finite values (NaN if none); the mean of the two middle values for an even count."""
    finite = [v for v in values if math.isfinite(v)]
    return statistics.median(finite) if finite else math.nan


def _run(
    params: list[Tensor],
    masks: list[Tensor | None],
    grid: list[tuple[int, int, float, float]],
    forward: Callable[[Sequence[Tensor], Tensor], Tensor],
    sample: Callable[[str, int], tuple[Tensor, Tensor]],
    settings: TrainSettings,
    desc: str,
) -> tuple[Tensor, Tensor]:
    """Train all configurations for ``settings.steps`` steps; return final (val MSE, test MSE) per config."""
    lr = torch.tensor([g[2] for g in grid], dtype=params[0].dtype)
    wd = torch.tensor([g[3] for g in grid], dtype=params[0].dtype)
    for p in params:
        p.requires_grad_(True)
    opt = BatchedAdam(params, lr, wd, masks)
    for _ in tqdm(range(settings.steps), desc=desc, disable=not settings.progress, leave=False):
        x, y = sample("train", settings.batch)
        loss = ((forward(params, x) - y) ** 2).flatten(1).mean(1)
        loss.sum().backward()
        opt.step()
    out = []
    with torch.no_grad():
        for split, size in (("val", settings.val_size), ("test", settings.test_size)):
            x, y = sample(split, size)
            total = torch.zeros(len(grid), dtype=torch.float64)
            for lo in range(0, size, settings.eval_chunk):
                err = (
                    forward(params, x[:, lo : lo + settings.eval_chunk]) - y[:, lo : lo + settings.eval_chunk]
                ) ** 2
                total += err.double().flatten(1).sum(1)
            out.append(total / y[0].numel())
    return out[0], out[1]


class _Sampler:
    """Per-seed Gaussian streams (train/val/test) and target outputs, gathered onto the config axis."""

    def __init__(
        self, targets: Sequence, seed_ids: Tensor, base_seeds: Sequence[int], shape: tuple[int, ...], dtype
    ):
        self.targets, self.seed_ids, self.shape, self.dtype = targets, seed_ids, shape, dtype
        self.gens = {
            split: [split_generator(s, split) for s in base_seeds] for split in ("train", "val", "test")
        }
        self.cache: dict[str, tuple[Tensor, Tensor]] = {}

    def __call__(self, split: str, size: int) -> tuple[Tensor, Tensor]:
        if split in self.cache:
            return self.cache[split]
        xs = [torch.randn((size, *self.shape), generator=g, dtype=torch.float64) for g in self.gens[split]]
        ys = [t(x) for t, x in zip(self.targets, xs, strict=True)]
        x = torch.stack(xs).to(self.dtype)[self.seed_ids]
        y = torch.stack(ys).to(self.dtype)[self.seed_ids]
        if split != "train":
            self.cache[split] = (x, y)  # fixed validation/test sets
        return x, y


def _fnn_apply(W: Tensor, b: Tensor, x: Tensor, model: FNN) -> Tensor:
    z = x
    for l in range(W.shape[1]):
        z = z @ W[:, l].mT + b[:, l, None]
        if model.applies_relu(l):
            z = torch.relu(z)
    return z


def _stack_fnn(models: Sequence[FNN], dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    W = torch.stack([torch.stack(m.weights) for m in models]).to(dtype)
    b = torch.stack([torch.stack(m.biases) for m in models]).to(dtype)
    return W, b


def train_lora_fnn(
    frozen: Sequence[FNN],
    targets: Sequence[FNN],
    ranks: Sequence[int],
    seeds: Sequence[int],
    settings: TrainSettings,
    *,
    tune_bias: bool = True,
    dtype: torch.dtype = torch.float32,
) -> dict:
    """Adam-trained LoRA (all layers, rank R, biases tuned if ``tune_bias``) for each (seed, R, lr, wd).

    ``frozen[s]``/``targets[s]`` belong to ``seeds[s]``. Returns best-validation test MSE per (R, seed) and
    medians over seeds (see :func:`_select`).
    """
    S, rmax = len(seeds), max(ranks)
    grid = _grid(settings, S, ranks)
    seed_ids = torch.tensor([g[0] for g in grid])
    W0, b0 = _stack_fnn(frozen, dtype)
    W0, b0 = W0[seed_ids], b0[seed_ids]
    K, L, D = W0.shape[0], W0.shape[1], W0.shape[2]
    gen = named_generator(seeds[0], "expressive/lora-init")
    A = (torch.randn((K, L, rmax, D), generator=gen, dtype=torch.float64) * settings.lora_std).to(dtype)
    B = torch.zeros((K, L, D, rmax), dtype=dtype)
    rank_mask = (torch.arange(rmax)[None, :] < torch.tensor([g[1] for g in grid])[:, None]).to(dtype)
    rank_mask = rank_mask[:, None, :, None]  # (K, 1, R, 1) masks rows of A
    bias = b0.clone()

    def forward(p: Sequence[Tensor], x: Tensor) -> Tensor:
        A_, B_, b_ = p
        return _fnn_apply(W0 + B_ @ (A_ * rank_mask), b_, x, frozen[0])

    sampler = _Sampler(targets, seed_ids, seeds, (D,), dtype)
    params = [A, B, bias]
    masks: list[Tensor | None] = [None, None, None if tune_bias else torch.zeros(1, dtype=dtype)]
    val, test = _run(
        params, masks, grid, forward, sampler, settings, f"LoRA FNN ({len(frozen[0].weights)} layers)"
    )
    return _select(grid, val, test, S, ranks)


def train_final_layers_fnn(
    frozen: Sequence[FNN],
    targets: Sequence[FNN],
    ks: Sequence[int],
    seeds: Sequence[int],
    settings: TrainSettings,
    *,
    dtype: torch.dtype = torch.float32,
) -> dict:
    """Tune weights and biases of the last ``k`` layers (others frozen) for each (seed, k, lr, wd)."""
    S = len(seeds)
    grid = _grid(settings, S, ks)
    seed_ids = torch.tensor([g[0] for g in grid])
    W0, b0 = _stack_fnn(frozen, dtype)
    W, b = W0[seed_ids].clone(), b0[seed_ids].clone()
    L, D = W.shape[1], W.shape[2]
    trainable = (torch.arange(L)[None, :] >= L - torch.tensor([g[1] for g in grid])[:, None]).to(dtype)

    def forward(p: Sequence[Tensor], x: Tensor) -> Tensor:
        return _fnn_apply(p[0], p[1], x, frozen[0])

    sampler = _Sampler(targets, seed_ids, seeds, (D,), dtype)
    masks: list[Tensor | None] = [trainable[:, :, None, None], trainable[:, :, None]]
    val, test = _run([W, b], masks, grid, forward, sampler, settings, f"final-layer tuning ({L} layers)")
    return _select(grid, val, test, S, ks)


_TFN_LORA = ("Wq", "Wk", "Wv", "Wo")


def tfn_apply(p: dict[str, Tensor], X: Tensor) -> Tensor:
    """Batched TFN forward: every tensor in ``p`` has a leading config axis K; ``X`` is (K, n, D, N)."""
    Z = X
    L, H = p["Wq"].shape[1], p["Wq"].shape[2]
    for l in range(L):
        attn = torch.zeros_like(Z)
        # Fold W_Kᵀ W_Q and W_O W_V into one D x D matrix each (fewer products over the batch).
        qk = p["Wk"][:, l].mT @ p["Wq"][:, l]
        ov = p["Wo"][:, l] @ p["Wv"][:, l]
        for h in range(H):
            weights = torch.softmax(Z.mT @ (qk[:, h, None] @ Z), dim=-2)
            attn = attn + (ov[:, h, None] @ Z) @ weights
        hidden = torch.relu(p["W1"][:, l, None] @ attn + p["b1"][:, l, None, :, None])
        Z = p["W2"][:, l, None] @ hidden + p["b2"][:, l, None, :, None]
    return p["Wout"][:, None] @ Z


def train_lora_tfn(
    frozen: Sequence[TFN],
    targets: Sequence[TFN],
    ranks: Sequence[int],
    seeds: Sequence[int],
    settings: TrainSettings,
    *,
    dtype: torch.dtype = torch.float32,
) -> dict:
    """Adam-trained LoRA on W_Q, W_K, W_V, W_O (all blocks), W_{2,L} and W_o, plus all FFN biases."""
    S, rmax = len(seeds), max(ranks)
    grid = _grid(settings, S, ranks)
    seed_ids = torch.tensor([g[0] for g in grid])
    names = (*_TFN_LORA, "W1", "b1", "W2", "b2", "Wout")
    base = {n: torch.stack([getattr(m, n) for m in frozen]).to(dtype)[seed_ids] for n in names}
    K, L, H, D = base["Wq"].shape[:4]
    gen = named_generator(seeds[0], "expressive/lora-init")
    ranks_k = torch.tensor([g[1] for g in grid])
    mask_r = (torch.arange(rmax)[None, :] < ranks_k[:, None]).to(dtype)

    def factors(shape: tuple[int, ...]) -> tuple[Tensor, Tensor]:
        A = (torch.randn((K, *shape, rmax, D), generator=gen, dtype=torch.float64) * settings.lora_std).to(
            dtype
        )
        return A, torch.zeros((K, *shape, D, rmax), dtype=dtype)

    lora = {n: factors((L, H)) for n in _TFN_LORA}
    lora["W2"], lora["Wout"] = factors(()), factors(())
    b1, b2 = base["b1"].clone(), base["b2"].clone()
    order = [*_TFN_LORA, "W2", "Wout"]
    params = [t for n in order for t in lora[n]] + [b1, b2]

    def forward(p: Sequence[Tensor], X: Tensor) -> Tensor:
        cur = dict(base)
        for i, n in enumerate(order):
            A, B = p[2 * i], p[2 * i + 1]
            mask = mask_r.view(K, *([1] * (A.ndim - 3)), rmax, 1)
            delta = B @ (A * mask)
            if n == "W2":
                cur["W2"] = torch.cat([base["W2"][:, :-1], (base["W2"][:, -1] + delta)[:, None]], dim=1)
            else:
                cur[n] = base[n] + delta
        cur["b1"], cur["b2"] = p[-2], p[-1]
        return tfn_apply(cur, X)

    sampler = _Sampler(list(targets), seed_ids, seeds, (D, settings.tokens), dtype)
    val, test = _run(params, [None] * len(params), grid, forward, sampler, settings, f"LoRA TFN ({L} blocks)")
    return _select(grid, val, test, S, ranks)


def merge_selections(first: dict, second: dict) -> dict:
    """Combine two sweeps over the same variants and seeds (e.g. tune_bias 0/1) by best validation MSE."""
    if first["variants"] != second["variants"]:
        raise ValueError("merge_selections: the two sweeps cover different variants")
    table = [row[:] for row in first["test_mse"]]
    chosen = [[dict(c) for c in row] for row in first["chosen"]]
    for i, row in enumerate(second["chosen"]):
        for s, pick in enumerate(row):
            if pick and (not chosen[i][s] or pick["val_mse"] < chosen[i][s]["val_mse"]):
                chosen[i][s], table[i][s] = dict(pick), second["test_mse"][i][s]
    medians = [median(row) for row in table]
    return {"variants": first["variants"], "test_mse": table, "median": medians, "chosen": chosen}
