"""``loraq eval --offline``: the Hugging Face Hub and ``datasets`` offline for the duration.

Only on request: lm-eval's hub tasks download their data sets, so ``loraq eval --tasks`` leaves
the network as the user set it unless ``--offline`` asks otherwise. Both libraries read their
switch from the environment once, at import, into a module constant; both the variables and
(where the library is imported) the constants are set, and all are restored on exit.
"""

from __future__ import annotations

import contextlib
import importlib
import os
import sys
from collections.abc import Iterator

#: Environment variable -> (module, constant) that caches it after import.
SWITCHES = {
    "HF_HUB_OFFLINE": ("huggingface_hub.constants", "HF_HUB_OFFLINE"),
    "HF_DATASETS_OFFLINE": ("datasets.config", "HF_HUB_OFFLINE"),
}


@contextlib.contextmanager
def offline() -> Iterator[None]:
    """No Hugging Face Hub access (models, tokenizers, data sets) inside; restored after."""
    saved_env = {name: os.environ.get(name) for name in SWITCHES}
    saved_constants = []
    for name, (module_name, constant) in SWITCHES.items():
        os.environ[name] = "1"
        module = sys.modules.get(module_name)
        if module is None and module_name.startswith("datasets"):
            continue  # read from the environment when datasets is first imported
        with contextlib.suppress(ImportError):
            module = module or importlib.import_module(module_name)
            if hasattr(module, constant):
                saved_constants.append((module, constant, getattr(module, constant)))
                setattr(module, constant, True)
    try:
        yield
    finally:
        for module, constant, value in reversed(saved_constants):
            setattr(module, constant, value)
        for name, value in saved_env.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
