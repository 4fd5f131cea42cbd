"""stories260K (llama2.c format, ../shared/models/stories260K): its tokenizer's encoder and a
small fine-tuning task for benchmarks/fidelity.py. The model comes from the tests' converter
(tests/stories260k.py); the format is in that folder's SOURCE.md; nothing is copied."""

from __future__ import annotations

import struct
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

import loraq
from loraq.model.quantize import quantize_model
from loraq.train.data import collate
from loraq.train.evaluation import evaluate

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from stories260k import STORIES as FOLDER  # noqa: E402  (the tests' converter)
from stories260k import load_stories260k  # noqa: E402

LOFTQ_ITERS = 5
LEARNING_RATE = 2e-4
BOS = 1

# Short stories in the style of TinyStories, written for this benchmark (train / held-out).
TRAIN_TEXT = [
    "Once upon a time, there was a little dog named Max. Max liked to run in the park. One day, "
    "he found a big red ball under a tree. He was very happy and played with it all day.",
    "Lily had a small cat. The cat was soft and white. Every morning, Lily gave the cat some "
    "milk. The cat said meow and jumped on her bed. Lily laughed and hugged her cat.",
    "Tom wanted to build a tall tower with his blocks. He put one block on top of another. The "
    "tower fell down, but Tom did not cry. He tried again and made the tower even taller.",
    "One sunny day, Sue went to the beach with her mom. They made a sand castle and looked for "
    "shells. Sue found a pretty blue shell. She kept it in her pocket and smiled.",
    "Ben saw a bird with a hurt wing. He was sad for the bird. He gave it some water and a "
    "little bread. After a few days, the bird could fly again. Ben waved goodbye to his friend.",
    "Mia loved to draw. She drew a big sun, a green tree and a happy frog. Her dad put the "
    "picture on the wall. Mia felt proud and drew another picture for her grandma.",
]
EVAL_TEXT = [
    "Once upon a time, there was a little girl named Anna. Anna liked to play in the garden. "
    "One day, she saw a small bunny near the flowers. She gave the bunny a carrot and it was happy.",
    "Sam had a red car. He drove the car around the room. The car went fast and hit the door. "
    "Sam said sorry to the door and laughed. Then he played with his car again.",
]


def load_stories() -> tuple[Any, dict[str, float]] | None:
    """``(LlamaForCausalLM, vocab {piece: score})`` or None when the files are absent."""
    weights, vocab_file = FOLDER / "stories260K.bin", FOLDER / "tok512.bin"
    if not (weights.is_file() and vocab_file.is_file()):
        return None
    return load_stories260k(FOLDER).eval(), _vocab(vocab_file.read_bytes())


def _vocab(data: bytes) -> dict[str, tuple[int, float]]:
    (max_len,) = struct.unpack("<i", data[:4])
    at, pieces = 4, {}
    for token in range(512):
        score, length = struct.unpack("<fi", data[at : at + 8])
        piece = data[at + 8 : at + 8 + length].decode("utf-8", errors="replace")
        pieces.setdefault(piece, (token, score))
        at += 8 + length
    return pieces


def encode(text: str, vocab: dict[str, tuple[int, float]]) -> list[int]:
    """llama2.c's encoder: BOS, a leading space, characters (bytes as fallback), best merges."""
    ids: list[int] = []
    for ch in " " + text:
        if ch in vocab:
            ids.append(vocab[ch][0])
        else:
            ids.extend(b + 3 for b in ch.encode("utf-8"))
    text_of = {token: piece for piece, (token, _) in vocab.items()}
    while True:
        best = None
        for i in range(len(ids) - 1):
            merged = vocab.get(text_of.get(ids[i], "") + text_of.get(ids[i + 1], ""))
            if merged is not None and (best is None or merged[1] > best[1]):
                best = (i, merged[1], merged[0])
        if best is None:
            return [BOS, *ids]
        i, _, token = best
        ids[i : i + 2] = [token]


@dataclass
class StoriesTask:
    """What benchmarks/fidelity.py needs of one model (see ``_rows_for`` there)."""

    name: str
    base: Any
    train_examples: list[dict[str, list[int]]]
    examples: list[dict[str, list[int]]]
    probe: dict[str, torch.Tensor]
    steps: int = 20

    base_kind = "logits"

    @property
    def ids(self) -> dict[str, torch.Tensor]:
        """The calibration batch for merge reports."""
        return self.probe

    def base_outputs(self, model) -> torch.Tensor:
        """Next-token logits on the held-out stories."""
        with torch.no_grad():
            return model(**self.probe).logits.float()

    def config(self, init: str = "kaiming") -> loraq.LoraConfig:
        """NF4 (double quantization) QLoRA on every linear layer."""
        return loraq.LoraConfig(r=8, alpha=16, quant="nf4", init=init, loftq_iters=LOFTQ_ITERS)

    def dense(self):
        """A fresh copy of the pretrained model."""
        import copy

        return copy.deepcopy(self.base)

    def quantized(self, init: str | None):
        """The NF4 base, or NF4 with a LoftQ-initialised adapter."""
        model = self.dense()
        if init is None:
            quantize_model(model, self.config())
            return model
        return loraq.apply(model, self.config(init))

    def trained(self, init: str):
        """QLoRA (from ``init``) fine-tuned on the training stories."""
        torch.manual_seed(0)
        model = loraq.apply(self.dense(), self.config(init)).train()
        optimizer = torch.optim.AdamW(loraq.trainable_parameters(model), lr=LEARNING_RATE)
        batch = collate(self.train_examples, 0)
        for _ in range(self.steps):
            loss = model(**batch).loss
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()
        return model.eval()

    def evaluate(self, model) -> dict[str, float]:
        """Perplexity and loss on the held-out stories."""
        return evaluate(model, self.examples, "causal-lm", 8, 0)


def stories_task(folder: Path) -> StoriesTask:
    """The stories260K task (``folder`` is unused: nothing is written)."""
    loaded = load_stories()
    if loaded is None:
        raise FileNotFoundError(f"stories260K is not in {FOLDER}")
    model, vocab = loaded

    def example(text: str) -> dict[str, list[int]]:
        ids = encode(text, vocab)
        return {"input_ids": ids, "labels": ids}

    train_examples = [example(t) for t in TRAIN_TEXT]
    examples = [example(t) for t in EVAL_TEXT]
    probe = collate(examples, 0)
    probe.pop("labels")
    return StoriesTask("stories260K", model, train_examples, examples, probe)
