"""Incremental detokenization with stop strings.

Text is released only when it can no longer change: an incomplete UTF-8 character at the end
(decoded as U+FFFD) and any tail that could still grow into a stop string are held back.
"""

from __future__ import annotations

RESUME_CONTEXT = 6


class TextTracker:
    """Each new token is decoded together with the few before it (a window), never the whole
    answer again: cost per token stays constant however long the answer grows."""

    def __init__(self, tokenizer, stop: list[str] | None = None, prefix_ids: list[int] | None = None):
        self._tokenizer = tokenizer
        # A fast tokenizer's own decoder, when transformers would add nothing to it (most of
        # the per-token cost is transformers' wrapper, not the decoding).
        backend = getattr(tokenizer, "backend_tokenizer", None)
        self._backend = (backend if backend is not None
                         and not getattr(tokenizer, "clean_up_tokenization_spaces", False)
                         else None)
        self._stop = [s for s in (stop or []) if s]
        self._longest_stop = max((len(s) for s in self._stop), default=0)
        self.ids: list[int] = list(prefix_ids or [])
        self.text = self._decode(0, len(self.ids)) if self.ids else ""  # final text so far
        self.sent = len(self.text)
        # ids[_window:_read] were already turned into text; ids[_read:] not yet. After a
        # resume, the window starts a few tokens back so that the next token is decoded in
        # context (a space before a word, the rest of a character).
        self._read = len(self.ids)
        self._window = max(0, self._read - RESUME_CONTEXT)
        self.stopped = False

    def _decode(self, start: int, end: int | None = None) -> str:
        if self._backend is not None:
            return self._backend.decode(self.ids[start:end], skip_special_tokens=True)
        return self._tokenizer.decode(self.ids[start:end], skip_special_tokens=True)

    def _advance(self, final: bool = False) -> None:
        """Append the text of tokens not yet decoded, unless it ends inside a character (at
        the end of the answer, such an unfinished character is dropped instead)."""
        before = self._decode(self._window, self._read)
        after = self._decode(self._window)
        if len(after) > len(before) and (final or not after.endswith("\ufffd")):
            self.text += after[len(before):].rstrip("\ufffd")
            self._window, self._read = self._read, len(self.ids)

    def add(self, token_id: int) -> str:
        """Add one generated token; returns the text that became final (may be empty)."""
        self.ids.append(token_id)
        self._advance()
        text = self.text
        if self._stop:
            start = max(0, self.sent - self._longest_stop)
            hits = [i for i in (text.find(s, start) for s in self._stop) if i >= 0]
            if hits:
                end = max(min(hits), self.sent)
                delta, self.sent, self.stopped = text[self.sent:end], end, True
                return delta
        safe = len(text)
        for stop in self._stop:
            for k in range(min(len(stop) - 1, safe), 0, -1):
                if text[:safe].endswith(stop[:k]):
                    safe -= k
                    break
        if safe <= self.sent:
            return ""
        delta, self.sent = text[self.sent:safe], safe
        return delta

    def flush(self) -> str:
        """The held-back tail, once generation ended without a stop string."""
        if self.stopped:
            return ""
        self._advance(final=True)
        delta, self.sent = self.text[self.sent:], max(self.sent, len(self.text))
        return delta
