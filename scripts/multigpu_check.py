"""Multi-GPU check: ``lorakit finetune`` under ``accelerate launch`` (DDP, FSDP) and ``torchrun`` vs one GPU.

Same model (MiniLM from the evidence bundle, fp16-shipped, cast to fp32), same data (the SST-2 subset),
same global batch (32: one GPU × 32, two GPUs × 16), 1 epoch, bf16 autocast. It checks

- the final dev accuracy of 2-GPU DDP equals 1-GPU within seed noise (seeds 0 and 1 of each);
- FSDP and torchrun runs finish and write one PEFT-format adapter (rank 0 only) that PEFT itself loads;
- throughput: train samples/s of 1 GPU × 32 against 2 GPUs × 32 per GPU (weak scaling, global batch 64).

Every launch runs ``scripts/multigpu_check.py worker ARGS``, which is ``lorakit finetune ARGS`` (it adds
the ``finetune`` command to the CLI if the lead has not wired it yet), so ``accelerate launch -m lorakit
finetune`` runs the same code. Example (on an nvidia-h200-x2 machine; the device command is in
docs/results.md)::

    python scripts/multigpu_check.py run --bundle out/device --work /tmp/mg
    python scripts/multigpu_check.py pack --work /tmp/mg --to $OUT/multigpu.json
    python scripts/multigpu_check.py render --results out/multigpu.json       # here: docs/results.md
"""

from __future__ import annotations

import argparse
import logging
import math
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))
sys.path.insert(0, str(REPO / "scripts"))

from lorakit.utils import atomic_write_json, read_json  # noqa: E402

logger = logging.getLogger("multigpu")

# NVLink multicast must stay off on the shared hosts (device KINDS.md), also in launched children.
SAFE_ENV = {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1", "NVSHMEM_DISABLE_NVLS": "1"}
MULTI_BEGIN, MULTI_END = "<!-- multigpu:begin -->", "<!-- multigpu:end -->"


def worker(argv: list[str]) -> int:
    """``lorakit finetune ARGV`` in this process (under accelerate launch / torchrun: one rank)."""
    import lorakit.cli

    if "finetune" not in lorakit.cli.COMMAND_MODULES:
        lorakit.cli.COMMAND_MODULES = (*lorakit.cli.COMMAND_MODULES, "finetune")
    return lorakit.cli.main(["finetune", *argv])


def _launchers(name: str) -> list[str]:
    script = [str(REPO / "scripts" / "multigpu_check.py"), "worker"]
    accelerate = [
        "accelerate",
        "launch",
        "--num_machines",
        "1",
        "--mixed_precision",
        "bf16",
        "--num_processes",
    ]
    if name == "single":
        return [sys.executable, *script]
    if name == "ddp":
        return [*accelerate, "2", "--multi_gpu", *script]
    if name == "fsdp":
        return [
            *accelerate,
            "2",
            "--use_fsdp",
            "--fsdp_sharding_strategy",
            "FULL_SHARD",
            "--fsdp_use_orig_params",
            "true",
            "--fsdp_auto_wrap_policy",
            "NO_WRAP",
            "--fsdp_state_dict_type",
            "FULL_STATE_DICT",
            *script,
        ]
    if name == "torchrun":
        return ["torchrun", "--standalone", "--nproc_per_node", "2", *script]
    raise ValueError(name)


def run(args: argparse.Namespace) -> None:
    from evidence_report import model_fp32

    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    model = model_fp32(Path(args.bundle), work / "minilm-fp32")
    data = Path(args.bundle) / "glue" / "SST-2"
    common = [
        "--data", str(data), "--model", str(model), "--method", "lora", "--epochs", str(args.epochs),
        "--max-length", "128", "--precision", "bf16", "--no-progress", "--log-every", "10",
    ]  # fmt: skip
    common += args.extra.split()
    env = {**os.environ, **SAFE_ENV, "PYTHONPATH": str(REPO / "src"), "PYTHONUNBUFFERED": "1"}
    # (name, launcher, per-process batch, seed, visible GPUs); the two single-GPU seeds run side by side.
    plan = [
        [("single-s0", "single", 32, 0, "0"), ("single-s1", "single", 32, 1, "1")],
        [("ddp-s0", "ddp", 16, 0, "0,1")],
        [("ddp-s1", "ddp", 16, 1, "0,1")],
        [("fsdp-s0", "fsdp", 16, 0, "0,1")],
        [("torchrun-s0", "torchrun", 16, 0, "0,1")],
        [("ddp-bs32-s0", "ddp", 32, 0, "0,1")],
    ]
    results: dict[str, Any] = {"machine": _machine(), "runs": {}, "epochs": args.epochs}
    for group in plan:
        procs = []
        for name, launcher, batch, seed, gpus in group:
            out = work / name
            cmd = [
                *_launchers(launcher),
                *common,
                "--batch-size",
                str(batch),
                "--seed",
                str(seed),
                "--out",
                str(out),
            ]
            log = open(work / f"{name}.log", "w", encoding="utf-8")  # noqa: SIM115 - closed below
            start = time.perf_counter()
            proc = subprocess.Popen(
                cmd, env={**env, "CUDA_VISIBLE_DEVICES": gpus}, stdout=log, stderr=subprocess.STDOUT
            )
            procs.append((name, launcher, batch, seed, proc, log, start, cmd))
        for name, launcher, batch, seed, proc, log, start, _cmd in procs:
            try:
                code = proc.wait(timeout=args.timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                code = "timeout"
            log.close()
            results["runs"][name] = _collect(
                work / name, launcher, batch, seed, code, time.perf_counter() - start
            )
            results["runs"][name]["command"] = _pretty(launcher)
            if code != 0:
                tail = (work / f"{name}.log").read_text(encoding="utf-8", errors="replace")[-3000:]
                results["runs"][name]["log_tail"] = tail
            logger.info(
                "%s: exit %s, %s",
                name,
                code,
                {k: results["runs"][name].get(k) for k in ("accuracy", "samples_per_s")},
            )
        # written after every group, so a time limit still returns what finished
        atomic_write_json(args.results, results)


def _pretty(launcher: str) -> str:
    head = {
        "single": "python -m lorakit finetune",
        "ddp": "accelerate launch --multi_gpu --num_processes 2 -m lorakit finetune",
        "fsdp": "accelerate launch --use_fsdp --fsdp_use_orig_params true --num_processes 2 "
        "-m lorakit finetune",
        "torchrun": "torchrun --standalone --nproc_per_node 2 -m lorakit finetune",
    }
    return head[launcher]


def _machine() -> dict[str, Any]:
    import torch

    info: dict[str, Any] = {"torch": torch.__version__, "gpus": torch.cuda.device_count()}
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


def _collect(run: Path, launcher: str, batch: int, seed: int, code: Any, seconds: float) -> dict[str, Any]:
    info: dict[str, Any] = {"launcher": launcher, "batch_per_process": batch, "seed": seed, "exit": code}
    info["launch_seconds"] = round(seconds, 1)
    summary_path = run / "summary.json"
    if summary_path.exists():
        s = read_json(summary_path)
        info.update(
            accuracy=s["final_metrics"].get("accuracy"),
            samples_per_s=s["train_samples_per_s"],
            train_time_s=s["train_time_s"],
            steps=s["steps"],
            num_processes=s["num_processes"],
            peak_memory_mb=s["peak_memory_mb"],
            status=s["status"],
        )
    adapter = run / "adapter"
    files = sorted(p.name for p in adapter.iterdir()) if adapter.exists() else []
    info["adapter_files"] = files
    info["peft_load"] = _peft_load(run) if "adapter_config.json" in files else "no adapter"
    return info


def _peft_load(run: Path) -> str:
    """Load the saved adapter with PEFT itself on a fresh base model: proves the PEFT layout."""
    try:
        from peft import PeftModel
        from transformers import AutoModelForSequenceClassification

        config = read_json(run / "config.json")
        base = AutoModelForSequenceClassification.from_pretrained(config["model"], num_labels=2)
        model = PeftModel.from_pretrained(base, str(run / "adapter"))
        n = sum("lora_" in name for name, _ in model.named_parameters())
        return f"ok: PeftModel.from_pretrained loaded {n} LoRA tensors"
    except Exception as error:  # reported in results.md, not fatal for the other runs
        return f"failed: {type(error).__name__}: {error}"


# ---------------------------------------------------------------------------------------------- render


def render(args: argparse.Namespace) -> None:
    from evidence_report import _replace_section

    data = read_json(args.results)
    runs = data["runs"]
    figures = REPO / "docs" / "figures"
    figures.mkdir(parents=True, exist_ok=True)
    atomic_write_json(figures / "multigpu.json", data)

    def acc(names: list[str]) -> tuple[float, float, list[float]]:
        values = [runs[n]["accuracy"] for n in names if runs.get(n, {}).get("accuracy") is not None]
        if not values:
            return math.nan, math.nan, []
        mean = sum(values) / len(values)
        std = (sum((v - mean) ** 2 for v in values) / (len(values) - 1)) ** 0.5 if len(values) > 1 else 0.0
        return mean, std, values

    machine = data["machine"]
    lines = [
        f"Machine: {machine.get('gpus')}× {machine.get('gpu')} (`device` tool, kind nvidia-h200-x2), torch "
        f"{machine.get('torch')}. MiniLM (fp16-shipped, fp32 weights), LoRA r = 8 on query/value, SST-2 "
        f"8,000-example subset, {data['epochs']:g} epoch, bf16 autocast, eval on the full SST-2 dev set. "
        "Command: `python scripts/multigpu_check.py run` (each launch runs `lorakit finetune`).",
        "",
        "| run | launcher | processes × batch | seed | dev accuracy | train samples/s | steps | "
        "adapter (rank 0) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, r in runs.items():
        accuracy = "—" if r.get("accuracy") is None else f"{100 * r['accuracy']:.2f}"
        speed = "—" if r.get("samples_per_s") is None else f"{r['samples_per_s']:.0f}"
        peft = r.get("peft_load", "")
        peft = "PEFT loads it" if peft.startswith("ok") else (peft[:80] if peft else "—")
        lines.append(
            f"| {name} | {_pretty(r['launcher']).split(' -m')[0]} | {r.get('num_processes', '?')} × "
            f"{r['batch_per_process']} | {r['seed']} | {accuracy} | {speed} | {r.get('steps', '—')} | "
            f"{peft} |"
        )
    single, ddp = acc(["single-s0", "single-s1"]), acc(["ddp-s0", "ddp-s1"])
    lines += [""]
    if single[2] and ddp[2]:
        lines.append(
            f"1 GPU: {100 * single[0]:.2f} ± {100 * single[1]:.2f}; 2-GPU DDP (same global batch 32): "
            f"{100 * ddp[0]:.2f} ± {100 * ddp[1]:.2f} (mean ± std over seeds 0, 1); difference "
            f"{100 * (ddp[0] - single[0]):+.2f} points against a seed spread of "
            f"{100 * max(single[1], ddp[1]):.2f}."
        )
    s1, s2 = runs.get("single-s0", {}).get("samples_per_s"), runs.get("ddp-bs32-s0", {}).get("samples_per_s")
    if s1 and s2:
        lines.append(
            f"Throughput at 32 examples per GPU: {s1:.0f} samples/s on 1 GPU, {s2:.0f} on 2 GPUs "
            f"(×{s2 / s1:.2f}; ideal ×2). The two single-GPU seeds ran at the same time, one per GPU."
        )
    failed = {n: r for n, r in runs.items() if r.get("exit") != 0}
    for name, r in failed.items():
        log = [x.strip() for x in (r.get("log_tail") or "").splitlines() if x.strip()]
        cause = next((x for x in reversed(log) if "Error" in x or "error:" in x), log[-1] if log else "?")
        lines.append(f"- **{name} failed** (exit {r.get('exit')}): `{cause[:240]}`")
    _replace_section(REPO / "docs" / "results.md", MULTI_BEGIN, MULTI_END, "\n".join(lines))


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "worker":
        return worker(argv[1:])
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = parser.add_subparsers(dest="command", required=True)
    r = sub.add_parser("run", help="the launches (needs 2 GPUs)")
    r.add_argument("--bundle", default="out/device", help="model + data bundle (evidence_report.py bundle)")
    r.add_argument("--work", default="out/multigpu-work", help="run folders and logs")
    r.add_argument("--results", default="out/multigpu.json", help="JSON results path")
    r.add_argument("--epochs", type=float, default=1.0, help="epochs per launch")
    r.add_argument("--timeout", type=int, default=150, help="seconds per launch")
    r.add_argument("--extra", default="", help="more 'lorakit finetune' options, e.g. '--max-steps 2'")
    d = sub.add_parser("render", help="write docs/results.md's Multi-GPU section")
    d.add_argument("--results", default="out/multigpu.json", help="the run command's JSON")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if args.command == "run":
        run(args)
    else:
        render(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
