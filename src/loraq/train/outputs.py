"""What a finished run leaves in its folder: the adapter (or whole model) and the run's config.

    <output_dir>/adapter/   PEFT layout + ``loraq_train.yaml``   (``method: lora`` or ``dpo``)
    <output_dir>/model/     transformers layout + tokenizer + ``loraq_train.yaml``  (``full``)

Each folder is written through :func:`loraq.io.safe.staged_folder` (under a temporary name,
then renamed into place), so a crash leaves the previous result whole.
"""

from __future__ import annotations

from pathlib import Path

import yaml
from torch import nn

from ..io.peft_format import save_adapter
from ..io.safe import staged_folder
from .config import ConfigError, TrainConfig, from_dict, save_config
from .modeling import quiet_transformers
from .schema import ADAPTER_METHODS

#: File, inside a saved adapter folder, with the resolved config of the run that trained it.
RUN_CONFIG_NAME = "loraq_train.yaml"


def save_trained(model: nn.Module, cfg: TrainConfig, tokenizer, folder: Path) -> Path:
    """Write the result atomically: the adapter in PEFT layout (``method: lora`` or ``dpo``) or the whole
    model and tokenizer (``method: full``), plus the run's config as ``loraq_train.yaml``."""
    with staged_folder(folder, replace=True) as staging:  # a full disk is named
        if cfg.training.method in ADAPTER_METHODS:
            save_adapter(model, staging)
        else:
            with quiet_transformers():
                model.save_pretrained(str(staging))
            tokenizer.save_pretrained(str(staging))
        save_config(cfg, staging / RUN_CONFIG_NAME)
    return folder


def read_run_config(folder: str | Path) -> TrainConfig | None:
    """The config a loraq run saved next to its adapter (``loraq_train.yaml``), or None."""
    path = Path(folder) / RUN_CONFIG_NAME
    if not path.is_file():
        return None
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except (yaml.YAMLError, UnicodeDecodeError) as err:
        raise ConfigError(f"'{path}' is not a readable run config: {err}") from None
    return from_dict(raw)
