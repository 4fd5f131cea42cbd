"""The folder a model came from: where it is, and the tokenizer files that travel with it.

A merged export and a 4-bit checkpoint both copy the base's tokenizer files next to their
weights, so ``from_pretrained`` on the new folder finds a complete model.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from torch import nn

#: Files a tokenizer may consist of; copied next to an export when the base came from a folder.
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.txt",
    "vocab.json",
    "merges.txt",
    "tokenizer.model",
    "spiece.model",
    "sentencepiece.bpe.model",
    "chat_template.jinja",
    "chat_template.json",
)


def source_folder(model: nn.Module) -> Path | None:
    """The local folder the base model was loaded from (``config._name_or_path``), if any."""
    config = getattr(model, "config", None)
    name = getattr(config, "_name_or_path", None) or getattr(model, "name_or_path", None)
    if name and os.path.isdir(str(name)):
        return Path(str(name))
    return None


def copy_tokenizer_files(source: Path, target: Path) -> list[str]:
    """Copy the tokenizer files found in ``source`` to ``target``; returns their names."""
    copied = []
    for name in TOKENIZER_FILES:
        if (source / name).is_file():
            shutil.copy2(source / name, target / name)
            copied.append(name)
    return copied
