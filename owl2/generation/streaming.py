"""Incremental detokenisation with stop strings.

LLaMA's tokenizer spells characters it has no piece for as UTF-8 bytes, one token per byte, so decoding a prefix of
the output can end inside a character (the decoder shows U+FFFD). :class:`TextStream` only releases text that can
no longer change: it holds back an unfinished character and any tail that could still grow into a stop string, so
the deltas concatenate to exactly the final text.

Each token costs a decode of a few recent ids, not of the whole output (which made a long answer quadratic): the
stream keeps a window ``ids[prefix:]`` whose first part ``ids[prefix:read]`` is text already settled, decodes the
window and that part, and settles the difference. Both decodes start at the same id, so whatever the decoder does
at the start of a text (SentencePiece drops the first piece's space) happens to both and cancels out.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

_REPLACEMENT = "\ufffd"
_MAX_PENDING = 8
"""Ids a window may hold past the settled part while its text ends in U+FFFD, before the stream settles all but
the last ``_CHARACTER_IDS`` of them: a run of invalid bytes would otherwise grow the window without end."""
_CHARACTER_IDS = 4
"""The most ids one character can take (a 4-byte UTF-8 character as four byte pieces)."""


class TextStream:
    """Feed token ids with :meth:`push`; each call returns the new, settled text (possibly empty).

    ``decode`` turns ids into text (``tokenizer.decode``); it is called only on a bounded window of recent ids."""

    def __init__(self, decode: Callable[[list[int]], str], stop: Sequence[str] = ()) -> None:
        self._decode = decode
        self._stop = tuple(stop)
        self.ids: list[int] = []
        self._prefix = 0  # the window starts here
        self._read = 0  # ids[:read] are settled: their text is released or held back for the stop strings
        self._settled = ""  # the text of ids[prefix:read], decoded from the window's start
        self._held = ""  # settled text not yet released: it could still grow into a stop string
        self._chunks: list[str] = []
        self.stopped = False  # a stop string was found; the text ends before it

    def push(self, token_id: int) -> str:
        if self.stopped:
            return ""
        self.ids.append(token_id)
        return self._release(self._settle(final=False), final=False)

    def finish(self) -> str:
        """Release everything still held back (generation is over)."""
        return "" if self.stopped else self._release(self._settle(final=True), final=True)

    @property
    def text(self) -> str:
        """Everything released so far."""
        if len(self._chunks) > 1:
            self._chunks = ["".join(self._chunks)]
        return self._chunks[0] if self._chunks else ""

    def _settle(self, final: bool) -> str:
        """The text that the ids since ``read`` settle (all of it when ``final``), and move the window on."""
        end = len(self.ids)
        if end == self._read:
            return ""
        text = self._decode(self.ids[self._prefix:])
        if not text.startswith(self._settled):
            # An earlier piece decodes differently in context (a decoder that joins across pieces); wait until
            # the texts agree, or at the end compare with the whole output once.
            return self._settle_whole() if final else ""
        if not final and text.endswith(_REPLACEMENT):
            if end - self._read <= _MAX_PENDING:
                return ""  # maybe an unfinished character: its next bytes would replace the U+FFFD
            # every character that starts before the last few ids is complete, or final as U+FFFD
            window, end = text, end - _CHARACTER_IDS
            text = self._decode(self.ids[self._prefix:end])
            if not (text.startswith(self._settled) and window.startswith(text)):
                return ""
        delta = text[len(self._settled):]
        if not delta and not final:
            return ""
        self._move(end)
        return delta

    def _move(self, end: int) -> None:
        """Settle ``ids[:end]``: the next window starts where the settled ids began."""
        self._prefix, self._settled, self._read = self._read, self._decode(self.ids[self._read:end]), end

    def _settle_whole(self) -> str:
        whole = self._decode(self.ids)
        released = self.text + self._held
        self._read = len(self.ids)
        return whole[len(released):] if whole.startswith(released) else ""

    def _release(self, settled: str, final: bool) -> str:
        """Release ``settled`` after what was held back, cut at the first stop string and less any tail that could
        still grow into one. A stop can only begin in the held tail or the new text: any earlier start would have
        been held back as a stop's prefix."""
        text = self._held + settled
        cut = self._first_stop(text)
        if cut is not None:
            text, self._held = text[:cut], ""
            self.stopped = True
        elif final:
            self._held = ""
        else:
            keep = self._partial_stop_length(text)
            text, self._held = text[:len(text) - keep], text[len(text) - keep:]
        if text:
            self._chunks.append(text)
        return text

    def _first_stop(self, text: str) -> int | None:
        found = [i for i in (text.find(s) for s in self._stop) if i >= 0]
        return min(found) if found else None

    def _partial_stop_length(self, text: str) -> int:
        """Length of the longest tail of ``text`` that is a proper prefix of a stop string.

        Only the lengths k at which the stop's k-th character equals the text's last one can match, and ``rfind``
        jumps from one to the next: trying every k would cost the square of the text's length on each token, which a
        client could turn into seconds of the shared worker's time with one long stop string."""
        best = 0
        if not text:
            return 0
        last = text[-1]
        for stop in self._stop:
            k = min(len(stop) - 1, len(text))
            while k > best:
                k = stop.rfind(last, 0, k) + 1  # the longest candidate length not above k (0: none)
                if k <= best:
                    break
                if text.endswith(stop[:k]):
                    best = k
                    break
                k -= 1
        return best
