"""``lorakit finetune --liger-kernel`` end to end on a GPU: the same causal-LM run with and without liger.

Builds a small random Llama (4 layers, hidden 256, a word-level tokenizer) and a synthetic sentence corpus
in ``--work``, then fine-tunes LoRA on all seven projections twice through ``lorakit.train.finetune``, once
with ``liger_kernel=True`` (liger's RMSNorm, RoPE, SwiGLU and fused linear cross-entropy). It reports each
run's eval loss, train samples/s and peak memory, and exits non-zero if the two eval losses differ by more
than ``--tol`` (relative). Needs a CUDA GPU and liger-kernel.

    PYTHONPATH=src python3 benchmarks/liger_finetune_check.py --out out/liger_finetune.json
"""

from __future__ import annotations

import argparse
import json
import logging
import random
from pathlib import Path

import torch

from lorakit.train import FinetuneConfig, MethodSpec, finetune
from lorakit.utils import atomic_write_json

logger = logging.getLogger("liger_finetune_check")
# a clause picks one word per slot; a sentence is two clauses joined by "and then"
CLAUSE = (
    ("the", "a"), ("big", "small", "red", "blue"), ("cat", "dog"), ("sat", "ran"), ("quickly", "slowly"),
    ("on", "under"), ("the",), ("mat", "log"),
)  # fmt: skip
WORDS = sorted({word for slot in CLAUSE for word in slot} | {"and", "then"})
TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def sentence(rng: random.Random) -> str:
    """Two clauses of a fixed grammar, so that a small model can learn the corpus."""

    def clause() -> str:
        return " ".join(rng.choice(slot) for slot in CLAUSE)

    return f"{clause()} and then {clause()}"


def build(work: Path, examples: int) -> tuple[Path, Path]:
    """The model folder (random Llama + tokenizer) and the JSONL corpus, written under ``work``."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    vocab = {word: i for i, word in enumerate(["<unk>", "<pad>", "<eos>", *WORDS])}
    tokenizer = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    model_dir = work / "tiny-llama"
    PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, unk_token="<unk>", pad_token="<pad>", eos_token="<eos>"
    ).save_pretrained(model_dir)
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(vocab), hidden_size=256, intermediate_size=704, num_hidden_layers=4,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128, pad_token_id=1,
        eos_token_id=2, bos_token_id=2, tie_word_embeddings=False,
    )  # fmt: skip
    LlamaForCausalLM(config).save_pretrained(model_dir)
    rng = random.Random(0)
    data = work / "lm.jsonl"
    data.write_text("".join(json.dumps({"text": sentence(rng)}) + "\n" for _ in range(examples)))
    return model_dir, data


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--work", type=Path, default=Path("out/liger-check"), help="model, data and runs")
    parser.add_argument("--steps", type=int, default=300, help="optimizer steps per run")
    parser.add_argument("--examples", type=int, default=2000, help="sentences in the corpus")
    parser.add_argument("--tol", type=float, default=0.02, help="largest relative eval-loss difference")
    parser.add_argument("--out", type=Path, default=Path("out/liger_finetune.json"), help="JSON results")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    if not torch.cuda.is_available():
        raise SystemExit("liger_finetune_check.py needs a CUDA GPU")
    model_dir, data = build(args.work, args.examples)
    runs = {}
    for liger in (False, True):
        name = "liger" if liger else "plain"
        config = FinetuneConfig(
            model=str(model_dir), task="causal-lm", data=str(data), text_cols=["text"],
            method=MethodSpec("lora", targets=TARGETS), max_steps=args.steps, batch_size=32,
            max_eval_samples=256, eval_every=100, progress=False, liger_kernel=liger,
            out=str(args.work / name),
        )  # fmt: skip
        summary = finetune(config)
        runs[name] = {
            "eval_loss": summary.final_metrics["loss"],
            "train_samples_per_s": summary.train_samples_per_s,
            "peak_memory_mb": summary.peak_memory_mb,
            "device": summary.device,
        }
        logger.info("%s: %s", name, runs[name])
    plain, liger = runs["plain"]["eval_loss"], runs["liger"]["eval_loss"]
    result = {
        "runs": runs,
        "gpu": torch.cuda.get_device_name(),
        "eval_loss_rel_diff": abs(liger - plain) / plain,
        "speedup": runs["liger"]["train_samples_per_s"] / runs["plain"]["train_samples_per_s"],
    }
    result["ok"] = result["eval_loss_rel_diff"] <= args.tol
    atomic_write_json(args.out, result)
    logger.info("%s", json.dumps(result, indent=1))
    return 0 if result["ok"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
