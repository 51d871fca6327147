"""Incremental detokenisation with stop strings.

LLaMA's tokenizer spells characters it has no piece for as UTF-8 bytes, one token per byte, so decoding a prefix of
the output can end inside a character (the decoder shows U+FFFD). :class:`TextStream` only releases text that can
no longer change: it holds back an unfinished character and any tail that could still grow into a stop string, so
the deltas concatenate to exactly the final text.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

_REPLACEMENT = "\ufffd"


class TextStream:
    """Feed token ids with :meth:`push`; each call returns the new, settled text (possibly empty)."""

    def __init__(self, decode: Callable[[list[int]], str], stop: Sequence[str] = ()) -> None:
        self._decode = decode
        self._stop = tuple(stop)
        self.ids: list[int] = []
        self.emitted = ""
        self.stopped = False  # a stop string was found; the text ends before it

    def push(self, token_id: int) -> str:
        if self.stopped:
            return ""
        self.ids.append(token_id)
        return self._advance(final=False)

    def finish(self) -> str:
        """Release everything still held back (generation is over)."""
        return "" if self.stopped else self._advance(final=True)

    @property
    def text(self) -> str:
        return self.emitted

    def _advance(self, final: bool) -> str:
        text = self._decode(self.ids)
        cut = self._first_stop(text)
        if cut is not None:
            text, final = text[:cut], True
            self.stopped = True
        if not final:
            text = text.rstrip(_REPLACEMENT)
            text = text[: len(text) - self._partial_stop_length(text)]
        if not text.startswith(self.emitted):
            # An earlier piece decoded differently in context; wait until the text agrees with what was sent.
            return ""
        delta = text[len(self.emitted):]
        self.emitted = text
        return delta

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
