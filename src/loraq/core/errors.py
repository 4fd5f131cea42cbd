"""Which errors the user caused, and the one line that reports each.

The command line shows an error the user can fix (a bad value, a missing or unreadable file, a
full disk, a file in the wrong format) as one line ``loraq <command>: error: <what>`` and exits
with :data:`EXIT_ERROR`; anything else is a bug in loraq and keeps its traceback. The rule:

=======================================  ==================================================
exception                                 treated as
=======================================  ==================================================
``ValueError`` (``ConfigError``,          the user's: loraq raises these for bad values and
``FormatError``, JSON/Unicode errors)     files, and the message names the key or file
``OSError`` (missing file, permission,    the user's (or the machine's): reported with the
no space left on device, ...)             path
``FloatingPointError``                    the user's: the loss diverged (lower the lr)
``MemoryError``, ``torch.OutOfMemoryError``  the machine's: too little memory for this run
anything else (``TypeError``, ``KeyError``,  a bug: the traceback is shown
``RuntimeError``, ...)
=======================================  ==================================================

``--debug`` (or ``LORAQ_DEBUG=1``) shows the traceback for every error.
"""

from __future__ import annotations

import errno

#: Exit code for an error the user can fix.
EXIT_ERROR = 2
#: Exit code after Ctrl-C (128 + SIGINT, as shells report it).
EXIT_INTERRUPTED = 130


class UserError(Exception):
    """An error to report in one line; raise it for user mistakes that are not ValueErrors."""


class CliError(UserError):
    """A user error found by a command-line layer, reported in one line (exit code 2)."""


def _out_of_memory_types() -> tuple[type[BaseException], ...]:
    import torch

    oom = getattr(torch, "OutOfMemoryError", None) or getattr(torch.cuda, "OutOfMemoryError", None)
    return (MemoryError, oom) if isinstance(oom, type) else (MemoryError,)


def _os_message(err: OSError) -> str:
    what = err.strerror or str(err)
    if err.errno == errno.ENOSPC:
        what = "no space left on device"
    text = what[:1].lower() + what[1:]
    return f"{text} ({err.filename})" if err.filename else text


def user_message(err: BaseException) -> str | None:
    """The one-line report of ``err`` if the user caused it, else None (a bug)."""
    if isinstance(err, _out_of_memory_types()):
        return f"out of memory ({' '.join(str(err).split()) or type(err).__name__}); try a smaller batch or model"
    if isinstance(err, OSError):
        text = _os_message(err) if err.strerror else str(err)
    elif isinstance(err, (UserError, ValueError, FloatingPointError)):
        text = str(err)
    else:
        return None
    return " ".join(text.split()) or type(err).__name__
