"""The one text stream: incremental detokenizing with stop strings held back.

A token may end inside a multi-byte UTF-8 character (the decoded text then ends with
U+FFFD) and a stop string may be split across tokens, so text is released only once it
can no longer change or become part of a stop string. The stop string itself is never
emitted.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any


def find_stop(text: str, stops: Sequence[str]) -> int:
    """Index where the earliest stop string begins in ``text``, or -1."""
    hits = [i for i in (text.find(s) for s in stops if s) if i >= 0]
    return min(hits) if hits else -1


class TextStream:
    """Feed token ids with :meth:`push`; each call returns the text now safe to show.

    After a stop string appears, ``stop_string`` names it and pushes return nothing more.
    :meth:`flush` returns what is held back, for when the sequence ends for another reason.
    """

    def __init__(self, tokenizer: Any, stops: Sequence[str] = ()) -> None:
        self.tokenizer = tokenizer
        self.stops = tuple(s for s in stops if s)
        self.hold = max((len(s) for s in self.stops), default=0)
        self.tokens: list[int] = []
        self.emitted = 0
        self.stop_string: str | None = None

    def _text(self) -> str:
        return self.tokenizer.decode(self.tokens, skip_special_tokens=True)

    def push(self, token_id: int) -> str:
        if self.stop_string is not None:
            return ""
        self.tokens.append(token_id)
        text = self._text()
        cut = find_stop(text, self.stops)
        if cut >= 0:
            self.stop_string = next(s for s in self.stops if text.find(s) == cut)
            end = max(cut, self.emitted)
        elif text.endswith("\ufffd"):
            return ""  # an incomplete UTF-8 sequence: wait for the next token
        else:
            end = max(len(text) - self.hold, self.emitted)  # keep back what could still become a stop string
        piece = text[self.emitted:end]
        self.emitted = end
        return piece

    def flush(self) -> str:
        """Everything not yet emitted (nothing after a stop string)."""
        if self.stop_string is not None:
            return ""
        text = self._text()
        piece = text[self.emitted:]
        self.emitted = len(text)
        return piece
