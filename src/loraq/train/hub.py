"""The Hugging Face environment of a call, set for its duration and restored after.

:func:`hub_offline` and :func:`quiet_transformers` are context managers: what they change
(``HF_HUB_OFFLINE``, transformers' verbosity and progress bars) is restored when they exit, so
importing or calling loraq never leaves the process offline or silenced behind its caller's
back. Light at import (transformers loads only when :func:`quiet_transformers` is entered).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from typing import Any


@contextlib.contextmanager
def hub_offline() -> Iterator[None]:
    """Hugging Face Hub offline mode for the duration; the previous mode comes back on exit.

    loraq loads local folders only, so no call should reach the network; this makes sure none
    does. ``huggingface_hub`` reads ``HF_HUB_OFFLINE`` once, at import, into its constants: both
    the variable and (when imported) the constant are set, and both are restored.
    """
    previous = os.environ.get("HF_HUB_OFFLINE")
    os.environ["HF_HUB_OFFLINE"] = "1"
    constants = _hub_constants()
    flag = constants.HF_HUB_OFFLINE if constants is not None else None
    if constants is not None:
        constants.HF_HUB_OFFLINE = True
    try:
        yield
    finally:
        if previous is None:
            os.environ.pop("HF_HUB_OFFLINE", None)
        else:
            os.environ["HF_HUB_OFFLINE"] = previous
        if constants is not None:
            constants.HF_HUB_OFFLINE = flag


def _hub_constants() -> Any:
    try:
        from huggingface_hub import constants
    except ImportError:
        return None
    return constants if hasattr(constants, "HF_HUB_OFFLINE") else None


@contextlib.contextmanager
def quiet_transformers() -> Iterator[None]:
    """Offline (:func:`hub_offline`), and transformers' load reports and progress bars silenced,
    for the duration; all three are restored on exit."""
    from transformers.utils import logging as hf_logging

    verbosity = hf_logging.get_verbosity()
    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        with hub_offline():
            yield
    finally:
        hf_logging.set_verbosity(verbosity)
        if bars:
            hf_logging.enable_progress_bar()
