"""Incremental detokenization with stop strings.

Text is released only when it can no longer change: an incomplete UTF-8 character at the end
(decoded as U+FFFD) and any tail that could still grow into a stop string are held back.
"""

from __future__ import annotations


class TextTracker:
    def __init__(self, tokenizer, stop: list[str] | None = None, prefix_ids: list[int] | None = None):
        self._tokenizer = tokenizer
        self._stop = [s for s in (stop or []) if s]
        self._longest_stop = max((len(s) for s in self._stop), default=0)
        self.ids: list[int] = list(prefix_ids or [])
        self.sent = len(self._decode()) if self.ids else 0
        self.stopped = False

    def _decode(self) -> str:
        return self._tokenizer.decode(self.ids, skip_special_tokens=True)

    def add(self, token_id: int) -> str:
        """Add one generated token; returns the text that became final (may be empty)."""
        self.ids.append(token_id)
        text = self._decode()
        if self._stop:
            start = max(0, self.sent - self._longest_stop)
            hits = [i for i in (text.find(s, start) for s in self._stop) if i >= 0]
            if hits:
                end = max(min(hits), self.sent)
                delta, self.sent, self.stopped = text[self.sent:end], end, True
                return delta
        safe = len(text.rstrip("\ufffd"))
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
        text = self._decode().rstrip("\ufffd")
        delta, self.sent = text[self.sent:], max(self.sent, len(text))
        return delta
