"""Switches read from environment variables (``LORAQ_KERNELS``, ``LORAQ_CPU_BF16``), spelled
one way everywhere:

========  ===========================  ==============================================
value     also spelled                 meaning
========  ===========================  ==============================================
``auto``  unset or empty               loraq decides (what the variable's owner says)
``off``   ``0``, ``false``, ``no``     never
``on``    ``1``, ``true``, ``yes``     always
========  ===========================  ==============================================

Case and surrounding spaces are ignored; any other value is a ValueError naming the variable
and the accepted spellings (one line in the CLI).
"""

from __future__ import annotations

import os

__all__ = ["SWITCH_VALUES", "read_switch"]

#: Every accepted spelling, by the switch position it selects (table above).
SWITCH_VALUES: dict[str, tuple[str, ...]] = {
    "auto": ("auto", ""),
    "off": ("off", "0", "false", "no"),
    "on": ("on", "1", "true", "yes"),
}


def read_switch(name: str) -> str:
    """``auto``, ``off`` or ``on`` from the environment variable ``name`` (unset: ``auto``).

    Raises:
        ValueError: for a value outside :data:`SWITCH_VALUES`, naming the variable.
    """
    raw = os.environ.get(name, "")
    value = raw.strip().lower()
    for position, spellings in SWITCH_VALUES.items():
        if value in spellings:
            return position
    allowed = ", ".join(s for spellings in SWITCH_VALUES.values() for s in spellings if s)
    raise ValueError(f"{name}={raw!r} is not a known value: use one of {allowed}")
