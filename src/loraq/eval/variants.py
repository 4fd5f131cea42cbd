"""The columns of ``loraq eval``: the base, each adapter, and an adapter merged into its base.

Light at import (no torch): the command line checks its options against these names before
loading anything.
"""

from __future__ import annotations

from dataclasses import dataclass

#: Column name of the model without adapters, and the suffix of a merged adapter's column.
BASE_COLUMN, MERGED_SUFFIX = "base", "+merged"


@dataclass(frozen=True)
class Variant:
    """One column of scores: the base (``adapter`` None) or an adapter, maybe merged."""

    name: str
    adapter: str | None = None
    merged: bool = False


def variants(adapters: list[str], merged: bool = False) -> list[Variant]:
    """The base, then each adapter; with ``merged`` (one adapter only) that adapter merged too,
    last (a merge changes the base for good)."""
    if merged and len(adapters) != 1:
        raise ValueError(f"--merge scores one adapter merged into its base; got {len(adapters)}")
    out = [Variant(BASE_COLUMN)] + [Variant(name, name) for name in adapters]
    if merged:
        out.append(Variant(adapters[0] + MERGED_SUFFIX, adapters[0], merged=True))
    return out
