"""A reply's text as its tokens arrive: incremental decoding and stop strings, written once for
``loraq.generate`` and the server's streams.

Decoding the whole reply again at every token costs time quadratic in its length. A
:class:`ReplyText` decodes a small window instead (the method of vLLM's detokenizer and
transformers' ``TextStreamer``):

=============  ===================================================================================
step           what happens
=============  ===================================================================================
window         ``decode(ids[prefix:])`` and ``decode(ids[prefix:read])``; the first minus the
               second is the new text. Starting one emission back keeps what a tokenizer does to
               a window's first token (SentencePiece drops its leading space) the same on both
               sides, so the pieces join to exactly the full decode
incomplete     a window ending in U+FFFD holds an unfinished UTF-8 character (its bytes split
               over tokens): nothing is added until its last byte arrives (or the reply ends)
stop strings   searched in the new text plus the ``len(stop) - 1`` characters before it; the
               text is cut before the first one
held back      :meth:`ReplyText.take` keeps back an end of the text that may still grow into a
               stop string, so a streamed reply never shows what the full reply cuts
=============  ===================================================================================

Special tokens are skipped, as in the final text of every reply.
"""

from __future__ import annotations

from collections.abc import Sequence

_INCOMPLETE = "\ufffd"  # what a decoder shows for the bytes of an unfinished character


def truncate_at_stop(text: str, stops: Sequence[str], start: int = 0) -> tuple[str, bool]:
    """``text`` cut before the first stop string found at or after ``start``, and whether one was."""
    found = (text.find(s, start) for s in stops if s)
    cut = min((i for i in found if i >= 0), default=-1)
    return (text, False) if cut < 0 else (text[:cut], True)


def held_back(text: str, stops: Sequence[str]) -> int:
    """Characters at the end of ``text`` that are the start of some stop string."""
    hold = 0
    for stop in stops:
        for k in range(min(len(stop) - 1, len(text)), hold, -1):
            if text.endswith(stop[:k]):
                hold = k
                break
    return hold


class ReplyText:
    """The text of one reply, grown token by token (see the module table).

    ``add(ids)`` feeds new token ids; :attr:`text` is the reply so far (cut before a stop
    string once :attr:`stopped`); :meth:`take` hands out the part that can no longer change;
    :meth:`finish` ends the reply (an unfinished character then shows as U+FFFD, as in the
    full decode).
    """

    def __init__(self, tokenizer, stops: Sequence[str] = ()) -> None:
        self.tokenizer = tokenizer
        self.stops = tuple(s for s in stops if s)
        self.stopped = False
        self.finished = False
        self._ids: list[int] = []
        self._prefix = 0  # first token of the decode window
        self._read = 0  # tokens whose text is in self._text
        self._text = ""
        self._taken = 0  # characters handed out by take()

    @property
    def text(self) -> str:
        """The reply's text so far (complete characters only until :meth:`finish`)."""
        return self._text

    @property
    def consumed(self) -> int:
        """How many token ids :meth:`add` has received."""
        return len(self._ids)

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    def add(self, ids: Sequence[int]) -> None:
        """Append the reply's next token ids (ignored once a stop string was found)."""
        if self.stopped or self.finished or not ids:
            return
        self._ids.extend(ids)
        self._advance(final=False)

    def finish(self) -> None:
        """End the reply: the text of every token received is now in :attr:`text`."""
        if not self.finished and not self.stopped:
            self._advance(final=True)
        self.finished = True

    def _advance(self, final: bool) -> None:
        before = self._decode(self._ids[self._prefix : self._read])
        window = self._decode(self._ids[self._prefix :])
        if len(window) <= len(before) or (window.endswith(_INCOMPLETE) and not final):
            return
        old = len(self._text)
        self._text += window[len(before) :]
        self._prefix, self._read = self._read, len(self._ids)
        if self.stops:
            start = max(0, old - max(len(s) for s in self.stops) + 1)
            self._text, self.stopped = truncate_at_stop(self._text, self.stops, start)

    def take(self) -> str:
        """The text not handed out yet that is final: all of it once the reply has stopped or
        finished, else all but an end that may still become a stop string."""
        end = len(self._text)
        if not (self.stopped or self.finished):
            end -= held_back(self._text, self.stops)
        if end <= self._taken:
            return ""
        piece = self._text[self._taken : end]
        self._taken = end
        return piece
