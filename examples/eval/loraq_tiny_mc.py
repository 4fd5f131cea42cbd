"""The items of the ``loraq_tiny_mc`` lm-eval task, read from the JSONL file beside this one
(so the task works from any folder and with no network)."""

from __future__ import annotations

from pathlib import Path

ITEMS = Path(__file__).with_suffix(".jsonl")


def load(**_metadata):
    """A ``datasets.DatasetDict`` with the one split ``test`` (lm-eval's ``custom_dataset``)."""
    import datasets

    return datasets.DatasetDict({"test": datasets.Dataset.from_json(str(ITEMS))})
