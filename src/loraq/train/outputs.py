"""What a finished run leaves in its folder: the adapter (or whole model) and the run's config.

    <output_dir>/adapter/   PEFT layout + ``loraq_train.yaml``   (``method: lora``)
    <output_dir>/model/     transformers layout + tokenizer + ``loraq_train.yaml``  (``full``)

Each folder is written under a temporary name and renamed into place, so a crash leaves the
previous result whole.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from torch import nn

from loraq.train.checkpoint import cleaned_up_on_failure
from loraq.train.config import ConfigError, TrainConfig, save_config
from loraq.train.modeling import quiet_transformers

#: File, inside a saved adapter folder, with the resolved config of the run that trained it.
RUN_CONFIG_NAME = "loraq_train.yaml"


def _replace_dir(tmp: Path, final: Path) -> None:
    """Move the finished folder ``tmp`` to ``final``, replacing any older one."""
    if final.exists():
        old = final.with_name(f".old-{final.name}-{os.getpid()}")
        os.replace(final, old)
        os.replace(tmp, final)
        shutil.rmtree(old)
    else:
        os.replace(tmp, final)


def save_trained(model: nn.Module, cfg: TrainConfig, tokenizer, folder: Path) -> Path:
    """Write the result atomically: the adapter in PEFT layout (``method: lora``) or the whole
    model and tokenizer (``method: full``), plus the run's config as ``loraq_train.yaml``."""
    tmp = folder.with_name(f".tmp-{folder.name}-{os.getpid()}")
    if tmp.exists():
        shutil.rmtree(tmp)
    with cleaned_up_on_failure(tmp, folder):  # nothing half-written; a full disk named
        if cfg.training.method == "lora":
            import loraq

            loraq.save_adapter(model, tmp)
        else:
            with quiet_transformers():
                model.save_pretrained(str(tmp))
            tokenizer.save_pretrained(str(tmp))
        save_config(cfg, tmp / RUN_CONFIG_NAME)
    _replace_dir(tmp, folder)
    return folder


def read_run_config(folder: str | Path) -> TrainConfig | None:
    """The config a loraq run saved next to its adapter (``loraq_train.yaml``), or None."""
    path = Path(folder) / RUN_CONFIG_NAME
    if not path.is_file():
        return None
    import yaml

    from loraq.train.config import from_dict

    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except (yaml.YAMLError, UnicodeDecodeError) as err:
        raise ConfigError(f"'{path}' is not a readable run config: {err}") from None
    return from_dict(raw)
