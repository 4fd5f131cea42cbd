"""The MiniLM sentiment task of ``loraq train`` (its built-in default), as benchmarks/fidelity.py
uses it: build the dense / NF4 / LoftQ bases, fine-tune with QLoRA, evaluate."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

import loraq
from loraq.model.quantize import quantize_model
from loraq.train.config import load_config
from loraq.train.data import collate, infer_labels, pad_id_of, read_records, tokenize_records
from loraq.train.evaluation import evaluate
from loraq.train.inference import load_trained
from loraq.train.loop import train
from loraq.train.modeling import load_model, load_tokenizer

LOFTQ_ITERS = 5


@dataclass
class MiniLMTask:
    """What benchmarks/fidelity.py needs of one model (see ``_rows_for`` there)."""

    name: str
    cfg: Any
    labels: list[str]
    pad_id: int
    examples: list[dict[str, Any]]
    probe: dict[str, torch.Tensor]
    folder: Path

    #: Before training the head is random: compare the pretrained part, sentence embeddings.
    base_kind = "embedding"

    @property
    def ids(self) -> dict[str, torch.Tensor]:
        """The calibration batch for merge reports."""
        return self.probe

    def base_outputs(self, model) -> torch.Tensor:
        """Mean-pooled sentence embeddings of the held-out sentences (MiniLM's own use)."""
        with torch.no_grad():
            hidden = model.bert(**self.probe).last_hidden_state.float()
        mask = self.probe["attention_mask"].unsqueeze(-1).float()
        return (hidden * mask).sum(1) / mask.sum(1)

    def dense(self):
        """The float model with the seeded random head (the same head in every row)."""
        torch.manual_seed(self.cfg.training.seed)
        model, _ = load_model(self.cfg.model.path, "seq-cls", self.labels, self.pad_id)
        return model

    def quantized(self, init: str | None):
        """The NF4 base (``init=None``), or NF4 with a LoftQ-initialised adapter."""
        model = self.dense()
        config = self.cfg.lora
        if init is None:
            quantize_model(model, config)
            return model
        return loraq.apply(model, config.replace(init=init, loftq_iters=LOFTQ_ITERS))

    def trained(self, init: str):
        """QLoRA fine-tuned from ``init`` (the run's own settings otherwise), loaded back."""
        out = self.folder / init
        overrides = {
            "training.output_dir": str(out),
            "lora.init": init,
            "lora.loftq_iters": LOFTQ_ITERS,
        }
        cfg = load_config(None, {**_flat_training(self.cfg), **overrides})
        train(cfg, log=lambda line: None)
        model, _, _ = load_trained(adapter=out / "adapter", device="cpu")
        return model

    def evaluate(self, model) -> dict[str, float]:
        """Accuracy and loss on the held-out sentences."""
        return evaluate(model, self.examples, "seq-cls", 64, self.pad_id)


def _flat_training(cfg) -> dict[str, Any]:
    t = cfg.training
    return {
        "training.max_steps": t.max_steps,
        "training.progress": False,
        "training.eval_before": False,
        "training.save_every": None,
    }


def minilm_task(folder: Path, steps: int) -> MiniLMTask:
    """The built-in MiniLM run with ``steps`` fine-tuning steps."""
    cfg = load_config(None, {"training.max_steps": steps})
    tokenizer = load_tokenizer(cfg.model.path)
    train_records = read_records(cfg.data.train, cfg.data.format)
    labels = cfg.data.labels or infer_labels(train_records, cfg.data.label_column, "train")
    pad_id = pad_id_of(tokenizer)
    records = read_records(cfg.data.eval, cfg.data.format)
    examples = tokenize_records(records, cfg, tokenizer, labels, "eval")
    probe = collate(examples[:64], pad_id)
    probe.pop("labels")
    return MiniLMTask("MiniLM", cfg, labels, pad_id, examples, probe, folder)
