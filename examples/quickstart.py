"""The README's core example: inject → LoRA+ optimizer → train step → save → load in PEFT."""

import torch
from peft import PeftModel
from transformers import BertConfig, BertForSequenceClassification

import lorakit

config = BertConfig(
    vocab_size=1000, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128
)
model = BertForSequenceClassification(config)
base_state = {k: v.clone() for k, v in model.state_dict().items()}
lorakit.inject(
    model, lorakit.LoraConfig(r=8, alpha=16, targets=["query", "value"], modules_to_save=["classifier"])
)
print(lorakit.trainable_summary(model))
optimizer = lorakit.make_optimizer(model, lr=2e-4, ratio=16)  # LoRA+: lr_B = 16 · lr_A
batch = torch.randint(0, 1000, (4, 16))
loss = model(batch, labels=torch.tensor([0, 1, 0, 1])).loss
loss.backward()
optimizer.step()
lorakit.save(model, "quickstart-adapter")

base = BertForSequenceClassification(config)
base.load_state_dict(base_state)
peft_model = PeftModel.from_pretrained(base, "quickstart-adapter").eval()
model.eval()
difference = (model(batch).logits - peft_model(batch).logits).abs().max().item()
print("max |lorakit - peft| =", difference)
assert difference < 1e-5, "PEFT's reading of the saved adapter disagrees with lorakit's model"
