"""Whole-model training steps on the paths users take, on the GPU, against a float64 reference.

``throughput.py`` checks one layer at a time in bf16 and float32. Users train whole models in other ways:
``transformers.Trainer(bf16=True)`` or ``fp16=True`` keeps the model in float32 and runs it under
``torch.autocast``, and gradient checkpointing (reentrant, transformers' default, or not) runs each decoder
layer's forward twice. For each path this script takes one language-model step of a small random model
(Llama by default; Qwen2, Mistral, Phi-3, Gemma and GPT-2 with ``--architectures``) with lorakit on every
linear layer, and compares the loss and every LoRA gradient with the same model in float64 on the reference
kernel. A path passes where lorakit's worst relative error is within 1e-2 or twice that of the reference
kernel run on the same path (plain LoRA math in the same precision), and where each family of Triton
kernels (merges, the G/dB pass) ran at the ranks it takes and not above. Exits non-zero otherwise. Needs a
CUDA GPU.

    PYTHONPATH=src python benchmarks/model_check.py --out out/model_check.json
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import logging
from collections import Counter
from pathlib import Path

import rank_check
import torch
from throughput import write_report

import lorakit
from lorakit.adapters import triton_lora

logger = logging.getLogger("model_check")
#: path name -> (model dtype, autocast dtype or None, gradient checkpointing: None, "reentrant" or "plain")
PATHS = {
    "bf16 model": (torch.bfloat16, None, None),
    "fp32 model, bf16 autocast (Trainer bf16=True)": (torch.float32, torch.bfloat16, None),
    "fp32 model, fp16 autocast (Trainer fp16=True)": (torch.float32, torch.float16, None),
    "bf16 model, gradient checkpointing (reentrant)": (torch.bfloat16, None, "reentrant"),
    "bf16 model, gradient checkpointing (non-reentrant)": (torch.bfloat16, None, "plain"),
}
#: the paths also run under ``torch.compile(model)`` (``--compile``)
COMPILED_PATHS = ("bf16 model", "fp32 model, bf16 autocast (Trainer bf16=True)")
FAMILIES = {family: rank_check.FAMILIES[family] for family in ("merge", "grad")}
GRAD_AND_MERGE = (*FAMILIES["merge"], *FAMILIES["grad"])


#: architecture -> (transformers config class, its arguments for a 2-layer model of width 512): Llama and
#: the models that copy its blocks, Qwen2's biased q/k/v, Phi-3's fused qkv_proj and gate_up_proj (its
#: down projection's input is the product of two views of one tensor), Gemma's GELU-gated MLP, and GPT-2's
#: Conv1D layers (weights stored transposed)
ARCHITECTURES = {
    "llama": ("LlamaConfig", {}),
    "qwen2": ("Qwen2Config", {}),
    "mistral": ("MistralConfig", {}),
    "phi3": ("Phi3Config", {"pad_token_id": 0}),
    "gemma": ("GemmaConfig", {"head_dim": 64}),
    "gpt2": (
        "GPT2Config",
        # no dropout: the float64 reference must draw no masks of its own
        {
            "n_embd": 512,
            "n_layer": 2,
            "n_head": 8,
            "n_positions": 512,
            "resid_pdrop": 0.0,
            "embd_pdrop": 0.0,
            "attn_pdrop": 0.0,
        },
    ),
}
_DECODER = {
    "hidden_size": 512, "intermediate_size": 1536, "num_hidden_layers": 2, "num_attention_heads": 8,
    "num_key_value_heads": 4, "max_position_embeddings": 512,
}  # fmt: skip


def mixed_ranks(rank: int) -> dict[str, int]:
    """A ``rank_pattern`` that gives the siblings of one input different ranks (q/k/v: r/2, r, 2r; gate/up:
    r/2, 2r), so that one group launch serves factors of several ranks."""
    return {
        "q_proj": max(1, rank // 2),
        "v_proj": 2 * rank,
        "gate_proj": max(1, rank // 2),
        "up_proj": 2 * rank,
    }


def build(architecture: str, rank: int, rank_pattern: dict[str, int] | None = None) -> torch.nn.Module:
    """A 2-layer random model of ``architecture`` (width 512, float32) with lorakit on every linear layer
    but the head (``targets="all-linear"``; ranks from ``rank_pattern`` where it names a layer) and random
    B."""
    import transformers

    class_name, arguments = ARCHITECTURES[architecture]
    shape = {} if architecture == "gpt2" else _DECODER
    config = getattr(transformers, class_name)(vocab_size=1000, use_cache=False, **shape, **arguments)
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config)
    config = lorakit.LoraConfig(r=rank, alpha=2 * rank, targets="all-linear", rank_pattern=rank_pattern or {})
    lorakit.inject(model, config)
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for _, layer in lorakit.lora_layers(model):
            layer.lora_B.copy_(torch.randn(layer.lora_B.shape, generator=generator) * 0.02)
    return model


def step(
    model: torch.nn.Module, ids: torch.Tensor, autocast: torch.dtype | None, forward=None
) -> list[torch.Tensor]:
    """The loss and every trainable gradient (float64) of one step on ``ids``, as ``model`` is set up,
    through ``forward`` (the compiled model) where given."""
    model.zero_grad(set_to_none=True)
    context = torch.autocast("cuda", dtype=autocast) if autocast else contextlib.nullcontext()
    with context:
        loss = (model if forward is None else forward)(input_ids=ids, labels=ids).loss
    loss.backward()
    grads = [p.grad.double() for p in model.parameters() if p.requires_grad]
    return [loss.detach().double().reshape(1), *grads]


def worst_error(got: list[torch.Tensor], want: list[torch.Tensor]) -> float:
    return max(float((g - w).norm() / w.norm().clamp_min(1e-30)) for g, w in zip(got, want, strict=True))


def set_kernel(model: torch.nn.Module, kernel: str) -> None:
    for _, layer in lorakit.lora_layers(model):
        layer.kernel = kernel


def check_path(
    name: str,
    base: torch.nn.Module,
    ids: torch.Tensor,
    want: list[torch.Tensor],
    ranks: set[int],
    compiled: bool = False,
) -> dict:
    """Path ``name`` on a copy of ``base`` (whose layers have ``ranks``) with each kernel (under
    ``torch.compile`` where ``compiled``, where the kernels' calls are not counted: the compiler refuses a
    Function that changes an outside variable) against ``want``."""
    dtype, autocast, checkpointing = PATHS[name]
    errors, counts = {}, Counter()
    for kernel in ("reference", "fused"):
        model = copy.deepcopy(base).to("cuda", dtype)
        set_kernel(model, kernel)
        if checkpointing:
            kwargs = {"use_reentrant": checkpointing == "reentrant"}
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
            model.enable_input_require_grads()  # what reentrant checkpointing needs with frozen embeddings
        model.train()
        forward = torch.compile(model) if compiled else None
        counted = kernel == "fused" and not compiled
        with rank_check.counting(counts, GRAD_AND_MERGE) if counted else contextlib.nullcontext():
            step(model, ids, autocast, forward)  # the first step: sibling groups find their inputs
            errors[kernel] = worst_error(step(model, ids, autocast, forward), want)
    ran = None if compiled else rank_check.families_ran(counts, FAMILIES)
    as_expected = compiled or rank_check.ran_as_expected(counts, ranks, FAMILIES)
    ok = errors["fused"] <= max(1e-2, 2 * errors["reference"]) and as_expected
    path = f"{name} (torch.compile)" if compiled else name
    return {"path": path, "rel_err": errors, "triton_calls": ran, "ok": ok}


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rank", type=int, default=16, help="LoRA rank")
    parser.add_argument(
        "--compile", action="store_true", help=f"torch.compile the model: the paths {COMPILED_PATHS}"
    )
    parser.add_argument(
        "--mixed-ranks", action="store_true", help="siblings of one input at different ranks (mixed_ranks)"
    )
    parser.add_argument("--architectures", default="llama", help=f"comma list of {', '.join(ARCHITECTURES)}")
    parser.add_argument(
        "--out", type=Path, default=Path("out/model_check.json"), help="JSON path (.md beside)"
    )
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    if not (torch.cuda.is_available() and triton_lora.AVAILABLE):
        raise SystemExit("model_check.py needs a CUDA GPU with Triton")
    rows = []
    for architecture in args.architectures.split(","):
        base = build(architecture, args.rank, mixed_ranks(args.rank) if args.mixed_ranks else None)
        ids = torch.randint(0, 1000, (2, 512), generator=torch.Generator().manual_seed(2)).cuda()
        reference = copy.deepcopy(base).to("cuda", torch.float64)
        set_kernel(reference, "reference")
        want = step(reference.train(), ids, None)
        ranks = {layer.r for _, layer in lorakit.lora_layers(base)}
        for name in COMPILED_PATHS if args.compile else PATHS:
            result = check_path(name, base, ids, want, ranks, args.compile)
            rows.append({"architecture": architecture, **result})
            logger.info("%s, %s: %s", architecture, name, rows[-1])
    lines = [
        f"Whole-model steps against float64 (2 layers, width 512, 2 × 512 tokens, r = {args.rank}"
        + (f", rank_pattern {mixed_ranks(args.rank)}" if args.mixed_ranks else "")
        + "):\n\n"
        "| model | path | lorakit rel. err | reference kernel rel. err | Triton merges / G/dB calls "
        "| pass |\n"
        "|---|---|---|---|---|---|\n"
    ]
    for row in rows:
        e, calls = row["rel_err"], row["triton_calls"]
        verdict = "PASS" if row["ok"] else "FAIL"
        called = "not counted" if calls is None else f"{calls['merge']} / {calls['grad']}"
        lines.append(
            f"| {row['architecture']} | {row['path']} | {e['fused']:.2e} | {e['reference']:.2e} | {called} "
            f"| {verdict} |\n"
        )
    write_report(args.out, {"rank": args.rank, "rows": rows}, "".join(lines))
    print("".join(lines))
    return 0 if all(row["ok"] for row in rows) else 1


if __name__ == "__main__":
    raise SystemExit(main())
