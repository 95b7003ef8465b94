"""Shared fixtures: tiny random transformers models (no download) and the GLUE data location."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

REPO_ROOT = Path(__file__).resolve().parents[1]


def glue_dir() -> Path:
    """GLUE folders from ``LORAKIT_GLUE_DIR`` (default ``../shared/data/glue`` beside the repo)."""
    return Path(os.environ.get("LORAKIT_GLUE_DIR", REPO_ROOT.parent / "shared" / "data" / "glue"))


@pytest.fixture
def glue_root() -> Path:
    root = glue_dir()
    if not (root / "SST-2" / "train.tsv").exists():
        pytest.skip(
            f"GLUE data not found at {root} (set LORAKIT_GLUE_DIR to the folder holding SST-2/, RTE/, ...)"
        )
    return root


@pytest.fixture
def tiny_bert():
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=64,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=48,
        num_labels=3,
    )
    return BertForSequenceClassification(config).eval()


def save_tiny_bert(
    folder: Path,
    words: list[str],
    *,
    hidden: int,
    layers: int,
    heads: int,
    intermediate: int,
    encoder_only: bool = False,
) -> Path:
    """Save a random BERT classifier (2 labels) and a word-level tokenizer over ``words`` to ``folder``.

    ``encoder_only`` saves the encoder alone, as the MiniLM checkpoint is (the head is created on load).
    """
    from transformers import BertConfig, BertForSequenceClassification, BertTokenizerFast

    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *words]
    BertTokenizerFast(vocab={word: i for i, word in enumerate(vocab)}).save_pretrained(
        folder
    )  # transformers 5
    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=len(vocab), hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
        intermediate_size=intermediate, max_position_embeddings=32, num_labels=2,
    )  # fmt: skip
    model = BertForSequenceClassification(config)
    (model.bert if encoder_only else model).save_pretrained(folder)
    return folder


@pytest.fixture
def tiny_gpt2():
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    config = GPT2Config(
        vocab_size=64, n_embd=32, n_layer=2, n_head=4, n_positions=32, bos_token_id=0, eos_token_id=0
    )
    return GPT2LMHeadModel(config).eval()


@pytest.fixture(autouse=True)
def _one_torch_thread():
    """Every test uses tiny tensors: one thread is faster there and avoids thrashing on a shared CPU."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


LLAMA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def tiny_llama(hidden_act: str = "silu", layers: int = 2) -> torch.nn.Module:
    """A random transformers ``LlamaForCausalLM`` (2 layers by default, width 32, MLP 48, vocabulary 64);
    skips where transformers is absent."""
    transformers = pytest.importorskip("transformers")
    config = transformers.LlamaConfig(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        hidden_act=hidden_act,
    )
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(config)


def adapted_tiny_llama(hidden_act: str = "silu") -> torch.nn.Module:
    """:func:`tiny_llama` with lorakit LoRA (r = 4, B random, A zero) on all seven projections."""
    import lorakit

    model = tiny_llama(hidden_act)
    lorakit.inject(model, lorakit.LoraConfig(r=4, alpha=8, targets=LLAMA_TARGETS, init="gaussian-b"))
    return model


def llama_lora_grads(model: torch.nn.Module, forward=None) -> dict[str, torch.Tensor]:
    """The trainable parameters' gradients after one language-model step on fixed token ids, through
    ``forward`` (e.g. the compiled model) if given; the model's gradients are cleared afterwards."""
    ids = torch.randint(0, 64, (2, 24), generator=torch.Generator().manual_seed(0))
    (model if forward is None else forward)(input_ids=ids, labels=ids).loss.backward()
    grads = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
    model.zero_grad(set_to_none=True)
    return grads
