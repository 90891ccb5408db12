"""Streamed text from streamed token ids: incremental detokenization and `stop` strings.

Each new token re-decodes the generated ids (special tokens skipped) and hands out only what is settled: text
ending in an incomplete multi-byte character (U+FFFD) waits for the next token, and a tail that could still
grow into a stop string is held back until it cannot. When a stop string appears, the text ends before it.
"""
from __future__ import annotations

from typing import List, Sequence


class TextStream:
    def __init__(self, tokenizer, stops: Sequence[str] = ()):
        self.tok, self.stops = tokenizer, [s for s in stops if s]
        self.ids: List[int] = []
        self.sent = ""          # text handed out so far
        self.stopped = False    # a stop string was found: no more text

    def _held_back(self, text: str) -> int:
        """Length of the longest tail of `text` that is a proper prefix of a stop string."""
        best = 0
        for s in self.stops:
            for n in range(min(len(s) - 1, len(text)), best, -1):
                if text.endswith(s[:n]):
                    best = n
                    break
        return best

    def push(self, token_id: int) -> str:
        """The new settled text after `token_id` ('' when nothing is settled yet)."""
        if self.stopped:
            return ""
        self.ids.append(int(token_id))
        text = self.tok.decode(self.ids, skip_special_tokens=True)
        if text.endswith("\ufffd"):
            return ""
        return self._hand_out(text, final=False)

    def finish(self) -> str:
        """What was held back, once generation has ended."""
        if self.stopped:
            return ""
        text = self.tok.decode(self.ids, skip_special_tokens=True)
        return self._hand_out(text, final=True)

    def _hand_out(self, text: str, final: bool) -> str:
        if not text.startswith(self.sent):   # the decoder revised earlier text (rare): never take back what was sent
            return ""
        found = [at for at in (text.find(s, max(0, len(self.sent) - len(s) + 1)) for s in self.stops) if at >= 0]
        if found:
            self.stopped = True
            text = text[:min(found)]
        end = len(text) if (final or self.stopped) else len(text) - self._held_back(text)
        new = text[len(self.sent):end] if end > len(self.sent) else ""
        self.sent += new
        return new

    @property
    def text(self) -> str:
        return self.sent
