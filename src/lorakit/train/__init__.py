"""Fine-tuning: data loaders, metrics, method presets, the accelerate-based loop, run folders, comparisons.

Python API::

    from lorakit.train import FinetuneConfig, MethodSpec, finetune, compare, evaluate_run
    config = FinetuneConfig(data="glue/SST-2", method=MethodSpec("loraplus", rank=8), out="runs/sst2")
    summary = finetune(config)
    result = compare(FinetuneConfig(max_train_samples=2000), ["lora", "loraplus", "asym"], seeds=[0, 1, 2],
                     datasets=["glue/RTE", "glue/MRPC", "glue/CoLA"], out="runs/glue")
    print(result.table())

    from lorakit.train import apply_liger_kernels      # liger-kernel's RMSNorm/RoPE/SwiGLU/fused CE (CUDA)
    apply_liger_kernels(model)                          # before or after lorakit.inject
"""

from lorakit.train.compare import CompareResult, CompareRow, compare, format_table
from lorakit.train.data import DataError, TaskData, load_task
from lorakit.train.liger import apply_liger_kernels
from lorakit.train.methods import PRESETS, MethodSpec, parse_method
from lorakit.train.run import FinetuneConfig, RunSummary, evaluate_run, finetune, load_run_model
from lorakit.train.trainer import TrainingDivergedError

__all__ = [
    "PRESETS",
    "CompareResult",
    "CompareRow",
    "DataError",
    "FinetuneConfig",
    "MethodSpec",
    "RunSummary",
    "TaskData",
    "TrainingDivergedError",
    "apply_liger_kernels",
    "compare",
    "evaluate_run",
    "finetune",
    "format_table",
    "load_run_model",
    "load_task",
    "parse_method",
]
