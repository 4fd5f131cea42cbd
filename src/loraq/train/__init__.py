"""``loraq.train``: fine-tune a local Hugging Face model with LoRA/QLoRA from a config.

    from loraq.train import load_config, train
    cfg = load_config("examples/default.yaml", ["--training.max_steps", "50"])
    result = train(cfg)          # writes adapter/, config.yaml, metrics.jsonl, loss.png
    print(result.eval_after)

The pieces compose on their own: :mod:`.config` (dataclasses, YAML, overrides), :mod:`.data`
(files to batches), :mod:`.modeling` (load a model, make it trainable), :mod:`.optim` (AdamW,
schedule), :mod:`.evaluation` (eval metrics), :mod:`.loop` (the recipe: setup, step, eval,
finish), :mod:`.checkpoint` (atomic, resumable checkpoints), :mod:`.metrics` (metrics.jsonl,
loss.png), :mod:`.outputs` (the saved adapter or model) and :mod:`.inference` (load what a
run trained). ``generate`` and ``generate_ids`` are :mod:`loraq.generation.decode`'s.
"""

from loraq.generation.decode import generate, generate_ids
from loraq.generation.sampling import sample_next
from loraq.train.checkpoint import TrainState, latest_checkpoint, load_checkpoint, save_checkpoint
from loraq.train.config import default_config_path, load_config, parse_overrides
from loraq.train.evaluation import evaluate
from loraq.train.inference import load_trained
from loraq.train.loop import train
from loraq.train.modeling import load_model, load_tokenizer
from loraq.train.optim import make_optimizer, make_scheduler
from loraq.train.result import TrainResult
from loraq.train.schema import ConfigError, DataConfig, ModelConfig, TrainConfig, TrainingConfig

__all__ = [
    "ConfigError",
    "DataConfig",
    "ModelConfig",
    "TrainConfig",
    "TrainResult",
    "TrainState",
    "TrainingConfig",
    "default_config_path",
    "evaluate",
    "generate",
    "generate_ids",
    "latest_checkpoint",
    "load_checkpoint",
    "load_config",
    "load_model",
    "load_trained",
    "load_tokenizer",
    "make_optimizer",
    "make_scheduler",
    "parse_overrides",
    "sample_next",
    "save_checkpoint",
    "train",
]
