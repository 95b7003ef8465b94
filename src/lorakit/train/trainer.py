"""The training loop, built on ``accelerate.Accelerator``: one code path for one CPU, one GPU, and
``accelerate launch`` / ``torchrun`` (DDP, FSDP).

Per optimizer step (after ``grad_accum`` micro-batches): clip gradients, check the loss is finite, call
``cb.before_step(step)``, ``optimizer.step()``, ``cb.after_step(step)``, then the LR schedule

    lr(t) = lr₀ · t / T_w                      for t < T_w (warm-up)
    lr(t) = lr₀ · max(0, (T − t) / (T − T_w))   afterwards (linear decay to 0 at the last step T).

The data order of epoch e is a permutation seeded by ``(seed, e)``, so a resumed run sees exactly the
batches it would have seen; :class:`Trainer` skips the batches already consumed in the current epoch.
A non-finite loss stops the run before the optimizer touches the weights (:class:`TrainingDivergedError`);
the last checkpoint, written only from finite states, stays the resume point.
"""

from __future__ import annotations

import contextlib
import logging
import math
import random
import resource
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader

from lorakit.train.metrics import compute_metrics, higher_is_better

logger = logging.getLogger(__name__)


class TrainingDivergedError(RuntimeError):
    """The loss (or a trainable weight) became NaN/inf; the message names the step and the last checkpoint."""


@dataclass
class TrainState:
    """Where training is: optimizer steps done, epoch, micro-batches consumed in that epoch, counters."""

    step: int = 0
    epoch: int = 0
    batch_in_epoch: int = 0
    samples: int = 0
    train_time: float = 0.0
    best_metric: float | None = None
    best_step: int | None = None
    best_metrics: dict[str, float] | None = None
    # The train losses since the last "train" record (summed over optimizer steps), so that the first
    # record after a resume averages the same steps as without the interruption.
    loss_window_sum: float = 0.0
    loss_window_steps: int = 0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class LoopSettings:
    """Loop hyper-parameters (a subset of :class:`lorakit.train.run.FinetuneConfig`)."""

    batch_size: int = 16
    eval_batch_size: int = 64
    grad_accum: int = 1
    epochs: float = 1.0
    max_steps: int | None = None
    warmup_ratio: float = 0.0
    eval_every: int | None = None
    log_every: int = 10
    save_every: int | None = None
    max_grad_norm: float | None = 1.0
    seed: int = 0
    progress: bool = True


# ------------------------------------------------------------------------------------------- batching


class Collator:
    """Pad a list of encoded examples; ``labels`` become int64 (classes), float32 (regression) or, for a
    causal LM, the input ids with padding set to -100 (ignored by the loss)."""

    def __init__(self, tokenizer: Any, task_type: str) -> None:
        self.tokenizer = tokenizer
        self.task_type = task_type

    def __call__(self, features: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        labels = [f.get("labels") for f in features]
        inputs = [{k: v for k, v in f.items() if k != "labels"} for f in features]
        batch = dict(self.tokenizer.pad(inputs, return_tensors="pt"))
        if self.task_type == "causal-lm":
            ids = batch["input_ids"].clone()
            ids[batch["attention_mask"] == 0] = -100
            batch["labels"] = ids
        elif labels[0] is not None:
            dtype = torch.float32 if self.task_type == "regression" else torch.long
            batch["labels"] = torch.tensor(labels, dtype=dtype)
        return batch


def encode(
    tokenizer: Any, texts: Sequence[tuple[str, ...]], labels: Sequence[Any], max_length: int
) -> list[dict]:
    """Tokenize 1- or 2-text examples (truncated to ``max_length`` tokens) into feature dicts."""
    if not texts:
        return []
    first = [t[0] for t in texts]
    second = [t[1] for t in texts] if len(texts[0]) > 1 else None
    encoded = tokenizer(first, second, truncation=True, max_length=max_length)
    keys = [k for k in ("input_ids", "attention_mask", "token_type_ids") if k in encoded]
    return [{**{k: encoded[k][i] for k in keys}, "labels": labels[i]} for i in range(len(first))]


# ------------------------------------------------------------------------------------------ evaluation


@torch.no_grad()
def evaluate_model(
    model: nn.Module, loader: Any, accelerator: Any, task_type: str, metric_names: Sequence[str]
) -> dict[str, float]:
    """Score ``model`` on ``loader``: classification → argmax, regression → the single logit,
    causal LM → mean token loss and perplexity exp(loss). Predictions are gathered over processes."""
    was_training = model.training
    model.eval()
    preds: list[torch.Tensor] = []
    golds: list[torch.Tensor] = []
    loss_sum = torch.zeros((), dtype=torch.float64, device=accelerator.device)
    token_count = torch.zeros((), dtype=torch.float64, device=accelerator.device)
    for batch in loader:
        output = model(**{k: v for k, v in batch.items() if task_type == "causal-lm" or k != "labels"})
        logits = output.logits.float()
        if task_type == "causal-lm":
            shift_logits, shift_labels = logits[:, :-1], batch["labels"][:, 1:]
            loss_sum += nn.functional.cross_entropy(
                shift_logits.reshape(-1, shift_logits.shape[-1]),
                shift_labels.reshape(-1),
                ignore_index=-100,
                reduction="sum",
            ).double()
            token_count += (shift_labels != -100).sum()
            continue
        pred = logits.argmax(-1) if task_type == "classification" else logits.squeeze(-1)
        pred, gold = accelerator.gather_for_metrics((pred, batch["labels"]))
        preds.append(pred.cpu())
        golds.append(gold.cpu())
    model.train(was_training)
    if task_type == "causal-lm":
        total_loss = accelerator.reduce(loss_sum, "sum").item()
        tokens = accelerator.reduce(token_count, "sum").item()
        loss = total_loss / max(tokens, 1.0)
        return {"loss": loss, "perplexity": math.exp(min(loss, 700.0))}
    prediction = torch.cat(preds).numpy()
    gold = torch.cat(golds).numpy()
    return compute_metrics(metric_names, prediction, gold)


# ----------------------------------------------------------------------------------------------- loop


def linear_schedule(optimizer: torch.optim.Optimizer, total_steps: int, warmup_steps: int) -> Any:
    """LambdaLR implementing linear warm-up then linear decay to zero (see the module docstring)."""

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / (warmup_steps + 1)
        return max(0.0, (total_steps - step) / max(1, total_steps - warmup_steps))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


_PROC_STATUS = Path("/proc/self/status")
_PROC_CLEAR_REFS = Path("/proc/self/clear_refs")
_cpu_peak_was_reset = False  # whether the last reset_peak_memory() reset the CPU peak


def reset_peak_memory() -> None:
    """Start a new peak for :func:`peak_memory`, so each of several runs in one process reports its own.

    CUDA: ``reset_peak_memory_stats``. CPU on Linux: writing 5 to ``/proc/self/clear_refs`` resets the peak
    resident set size (VmHWM); elsewhere, or where that is not allowed, the peak stays the process's.
    """
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.reset_peak_memory_stats()
    global _cpu_peak_was_reset
    try:
        _PROC_CLEAR_REFS.write_text("5")
        _cpu_peak_was_reset = True
    except OSError:
        _cpu_peak_was_reset = False


def peak_memory() -> tuple[float, str]:
    """Peak memory in MiB and what it measures: CUDA max allocated on GPU; else the peak resident set size
    since :func:`reset_peak_memory` (``cpu_peak_rss``, Linux) or since the process started
    (``cpu_process_peak_rss``)."""
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        return torch.cuda.max_memory_allocated() / 2**20, "cuda_max_allocated"
    kind = "cpu_peak_rss" if _cpu_peak_was_reset else "cpu_process_peak_rss"
    try:
        for line in _PROC_STATUS.read_text().splitlines():
            if line.startswith("VmHWM:"):
                return float(line.split()[1]) / 2**10, kind  # the line is in kB
    except OSError:
        pass
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / (2**20 if sys.platform == "darwin" else 2**10), "cpu_process_peak_rss"


def rng_state() -> dict[str, Any]:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


class Trainer:
    """Run the loop. ``hooks`` connects it to a run folder:

    - ``hooks.log(record)``: append a record to ``metrics.jsonl`` (main process only);
    - ``hooks.save_checkpoint(trainer)``: write a checkpoint (called on every process; only rank 0 writes);
    - ``hooks.last_checkpoint()``: a description of the last good checkpoint, for error messages.

    ``callbacks`` are objects with any of ``before_step(step)``, ``after_step(step)``,
    ``on_eval(step, metrics)``.
    """

    def __init__(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        train_features: list[dict],
        eval_features: list[dict],
        collate: Callable,
        accelerator: Any,
        settings: LoopSettings,
        *,
        task_type: str,
        metric_names: Sequence[str],
        hooks: Any = None,
        callbacks: Sequence[Any] = (),
    ) -> None:
        if not train_features:
            raise ValueError("trainer: the training set is empty")
        if not eval_features:
            raise ValueError("trainer: the eval set is empty")
        self.accelerator = accelerator
        self.settings = settings
        self.task_type = task_type
        self.metric_names = list(metric_names)
        self.main_metric = self.metric_names[0]
        self.higher_is_better = higher_is_better(self.main_metric)
        self.hooks = hooks
        self.callbacks = list(callbacks)
        self.step_batches: list[dict[str, Any]] = []  # the micro-batches of the optimizer step in progress
        self.train_features = train_features
        self.collate = collate
        self.trainable = [p for p in model.parameters() if p.requires_grad]
        self.model, self.optimizer = accelerator.prepare(model, optimizer)
        eval_loader = DataLoader(
            eval_features,
            batch_size=settings.eval_batch_size,
            collate_fn=collate,
            generator=torch.Generator(),
        )
        self.eval_loader = accelerator.prepare_data_loader(eval_loader)
        per_process = math.ceil(len(train_features) / (settings.batch_size * accelerator.num_processes))
        self.updates_per_epoch = max(1, math.ceil(per_process / settings.grad_accum))
        self.total_steps = settings.max_steps or max(1, math.ceil(settings.epochs * self.updates_per_epoch))
        self.num_epochs = math.ceil(self.total_steps / self.updates_per_epoch)
        warmup = round(settings.warmup_ratio * self.total_steps)
        self.scheduler = linear_schedule(self.optimizer, self.total_steps, warmup)
        self.eval_every = settings.eval_every or self.updates_per_epoch
        self.save_every = settings.save_every or self.eval_every
        self.state = TrainState()
        self.start_time = time.perf_counter()
        self.elapsed_before = 0.0
        self.last_metrics: dict[str, float] | None = None  # of the last evaluation in train()

    # -- state for checkpoints --------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        return {
            "trainer": self.state.to_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "rng": rng_state(),
            "wall_time": self.wall_time(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.state = TrainState(**state["trainer"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        set_rng_state(state["rng"])
        self.elapsed_before = float(state.get("wall_time", 0.0))

    def wall_time(self) -> float:
        return self.elapsed_before + time.perf_counter() - self.start_time

    def unwrapped_model(self) -> nn.Module:
        return self.accelerator.unwrap_model(self.model)

    def step_loss(self) -> torch.Tensor:
        """The loss whose gradient the current optimizer step uses, recomputed at the current parameters.

        The mean over this step's micro-batches (what gradient accumulation averages), on the unwrapped
        model: no DDP gradient synchronisation, so under multi-GPU it is this rank's share. For callbacks
        that need a loss closure (``DeltaDiagnostics.after_step(loss_fn=...)``).
        """
        if not self.step_batches:
            raise RuntimeError("Trainer.step_loss: no micro-batch recorded for the current step")
        model = self.unwrapped_model()
        return sum(model(**batch).loss for batch in self.step_batches) / len(self.step_batches)

    # -- the loop -------------------------------------------------------------------------------------------

    def _epoch_loader(self, epoch: int) -> Any:
        order = torch.randperm(
            len(self.train_features),
            generator=torch.Generator().manual_seed(self.settings.seed * 1000 + epoch),
        ).tolist()
        # A private generator: iterating must not draw from the global RNG (dropout), or a resumed run
        # would see different dropout masks from the uninterrupted one.
        loader = DataLoader(
            [self.train_features[i] for i in order],
            batch_size=self.settings.batch_size,
            collate_fn=self.collate,
            generator=torch.Generator().manual_seed(epoch),
        )
        loader = self.accelerator.prepare_data_loader(loader)
        if self.state.batch_in_epoch:
            loader = self.accelerator.skip_first_batches(loader, self.state.batch_in_epoch)
        return loader

    def train(self) -> TrainState:
        """Train to ``total_steps``, evaluating, logging and checkpointing; returns the final state."""
        from tqdm.auto import tqdm

        acc = self.accelerator
        self.start_time = time.perf_counter()
        bar = tqdm(
            total=self.total_steps,
            initial=self.state.step,
            desc="train",
            unit="step",
            dynamic_ncols=True,
            disable=not (self.settings.progress and acc.is_local_main_process),
        )
        step_loss = torch.zeros((), device=acc.device)
        micro = 0
        self.step_batches = []
        self.model.train()
        while self.state.step < self.total_steps:
            epoch_start = time.perf_counter()
            for batch in self._epoch_loader(self.state.epoch):
                with acc.accumulate(self.model):
                    loss = self.model(**batch).loss
                    acc.backward(loss)
                self.step_batches.append(batch)
                step_loss += loss.detach().float()
                micro += 1
                self.state.batch_in_epoch += 1
                self.state.samples += batch["input_ids"].shape[0] * acc.num_processes
                if not acc.sync_gradients:
                    continue
                mean_loss = acc.reduce(step_loss / micro, "mean").item()
                step_loss.zero_()
                micro = 0
                if not math.isfinite(mean_loss):
                    self._diverged(f"the training loss is {mean_loss}")
                if self.settings.max_grad_norm:
                    acc.clip_grad_norm_(self.trainable, self.settings.max_grad_norm)
                self._call("before_step", self.state.step)
                self.optimizer.step()
                self._call("after_step", self.state.step)
                self.scheduler.step()
                self.optimizer.zero_grad(set_to_none=True)
                self.step_batches = []
                self.state.step += 1
                self.state.loss_window_sum += mean_loss
                self.state.loss_window_steps += 1
                bar.update(1)
                bar.set_postfix(loss=f"{mean_loss:.4f}")
                done = self.state.step >= self.total_steps
                if self.state.step % self.settings.log_every == 0 or done:
                    self.state.train_time += time.perf_counter() - epoch_start
                    epoch_start = time.perf_counter()
                    self._log_train(self.state.loss_window_sum / self.state.loss_window_steps)
                    self.state.loss_window_sum, self.state.loss_window_steps = 0.0, 0
                if self.state.step % self.eval_every == 0 or done:
                    self.state.train_time += time.perf_counter() - epoch_start
                    self.run_eval()
                    epoch_start = time.perf_counter()
                if self.state.step % self.save_every == 0 or done:
                    self.state.train_time += time.perf_counter() - epoch_start
                    self._checkpoint()
                    epoch_start = time.perf_counter()
                if done:
                    break
            else:
                self.state.train_time += time.perf_counter() - epoch_start
                self.state.epoch += 1
                self.state.batch_in_epoch = 0
                continue
            self.state.train_time += time.perf_counter() - epoch_start
        bar.close()
        return self.state

    def _call(self, hook: str, *args: Any) -> None:
        for callback in self.callbacks:
            method = getattr(callback, hook, None)
            if method is not None:
                method(*args)

    def _epoch_float(self) -> float:
        return self.state.step / self.updates_per_epoch

    def _log_train(self, loss: float) -> None:
        groups = {g.get("name", str(i)): g["lr"] for i, g in enumerate(self.optimizer.param_groups)}
        record = {
            "type": "train",
            "step": self.state.step,
            "epoch": round(self._epoch_float(), 4),
            "loss": loss,
            "lr": groups,
            "samples": self.state.samples,
            "train_time": round(self.state.train_time, 3),
            "wall_time": round(self.wall_time(), 3),
        }
        if self.hooks is not None and self.accelerator.is_main_process:
            self.hooks.log(record)

    def evaluate(self) -> dict[str, float]:
        """Score the current weights on the eval set; records, logs and tracks nothing."""
        return evaluate_model(
            self.model, self.eval_loader, self.accelerator, self.task_type, self.metric_names
        )

    def run_eval(self) -> dict[str, float]:
        """Evaluate, track the best metrics, log an ``eval`` record and call ``on_eval``."""
        metrics = self.evaluate()
        value = metrics[self.main_metric]
        best = self.state.best_metric
        if best is None or (value > best if self.higher_is_better else value < best):
            self.state.best_metric, self.state.best_step, self.state.best_metrics = (
                value,
                self.state.step,
                metrics,
            )
        record = {
            "type": "eval",
            "step": self.state.step,
            "epoch": round(self._epoch_float(), 4),
            **metrics,
            "train_time": round(self.state.train_time, 3),
            "wall_time": round(self.wall_time(), 3),
        }
        if self.hooks is not None and self.accelerator.is_main_process:
            self.hooks.log(record)
        logger.info(
            "step %d eval: %s", self.state.step, ", ".join(f"{k}={v:.4f}" for k, v in metrics.items())
        )
        self._call("on_eval", self.state.step, metrics)
        self.last_metrics = metrics
        return metrics

    def _checkpoint(self) -> None:
        bad = [p for p in self.trainable if not torch.isfinite(p).all()]
        if bad:
            self._diverged("a trainable weight is NaN/inf")
        if self.hooks is not None:
            self.hooks.save_checkpoint(self)

    def _diverged(self, what: str) -> None:
        last = self.hooks.last_checkpoint() if self.hooks is not None else None
        where = f"the last good checkpoint is {last}" if last else "no checkpoint was written yet"
        raise TrainingDivergedError(
            f"training diverged at step {self.state.step + 1} (epoch {self.state.epoch}): {what}; stopped, "
            f"{where}. Lower the learning rate (or LoRA+ ratio) and rerun, or --resume from it."
        )


@contextlib.contextmanager
def full_parameters(accelerator: Any, model: nn.Module):
    """Gather FSDP-sharded parameters so rank 0 can save whole adapters; a no-op for other setups."""
    try:
        from torch.distributed.fsdp import FullyShardedDataParallel
    except ImportError:  # pragma: no cover
        FullyShardedDataParallel = None
    if FullyShardedDataParallel is not None and isinstance(model, FullyShardedDataParallel):
        with FullyShardedDataParallel.summon_full_params(model, writeback=False, rank0_only=True):
            yield
    else:
        yield
