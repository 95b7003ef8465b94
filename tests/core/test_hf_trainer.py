"""LoRA+ inside transformers.Trainer."""

from __future__ import annotations

import pytest
import torch

import lorakit
from lorakit import LoraConfig

transformers = pytest.importorskip("transformers")


class _Pairs(torch.utils.data.Dataset):
    def __len__(self) -> int:
        return 8

    def __getitem__(self, i: int) -> dict:
        generator = torch.Generator().manual_seed(i)
        return {"input_ids": torch.randint(0, 64, (6,), generator=generator), "labels": torch.tensor(i % 3)}


@pytest.mark.parametrize("style", ["subclass", "optimizers"])
def test_trainer_uses_loraplus_groups_and_keeps_ratio(tiny_bert, tmp_path, style):
    from lorakit.train.hf_trainer import LoraPlusTrainer, loraplus_optimizers

    model = lorakit.inject(
        tiny_bert, LoraConfig(r=4, targets=["query", "value"], modules_to_save=["classifier"])
    )
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path),
        per_device_train_batch_size=4,
        max_steps=2,
        learning_rate=1e-3,
        weight_decay=0.01,
        report_to=[],
        use_cpu=True,
        save_strategy="no",
        logging_strategy="no",
    )
    if style == "subclass":
        trainer = LoraPlusTrainer(model=model, args=args, train_dataset=_Pairs(), loraplus_ratio=16)
    else:
        trainer = transformers.Trainer(
            model=model,
            args=args,
            train_dataset=_Pairs(),
            optimizers=loraplus_optimizers(model, args, ratio=16),
        )
    before = {n: l.lora_B.clone() for n, l in lorakit.lora_layers(model)}
    trainer.train()
    groups = {g["name"]: g for g in trainer.optimizer.param_groups}
    assert groups["lora_B"]["initial_lr"] == pytest.approx(16 * groups["lora_A"]["initial_lr"])
    assert groups["lora_A"]["initial_lr"] == pytest.approx(1e-3)
    assert groups["lora_B"]["weight_decay"] == 0.01 and groups["other_no_decay"]["weight_decay"] == 0.0
    assert any(not torch.equal(before[n], l.lora_B) for n, l in lorakit.lora_layers(model))
