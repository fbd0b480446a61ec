"""Prompt prefixes that many requests share, and their K/V, so prefills skip them.

Chat requests to one model start alike: the chat template's system prompt and role markers
(24 of SmolLM2's 34-38 prompt tokens in the benchmark). The cache learns such a prefix from
the prompts it sees (the common start of the last few, when long enough), keeps the K/V that
a full prefill computed for it, and later prefills start from that K/V and compute only what
follows. Matching is by token ids, so a hit is exact; a miss costs nothing but a comparison.
"""

from __future__ import annotations

import collections

import torch

Layers = list[tuple[torch.Tensor, torch.Tensor]]  # per layer: keys, values (1, heads, P, dim)


class PrefixCache:
    def __init__(self, min_tokens: int = 16, entries: int = 4, window: int = 8,
                 max_spread: int = 16):
        self.min_tokens = min_tokens
        # Rows of one prefill keep the padding between the prefix and the rest of their
        # prompt: prompts whose lengths differ more than this are prefilled in full.
        self.max_spread = max_spread
        self._entries: collections.OrderedDict[tuple[int, ...], Layers] = \
            collections.OrderedDict()
        self._capacity = entries
        self._recent: collections.deque[tuple[int, ...]] = collections.deque(maxlen=window)

    def match(self, sequences: list[list[int]]) -> tuple[int, Layers] | None:
        """The longest cached prefix that starts every sequence and leaves each at least one
        token to prefill: (its length, its K/V)."""
        lengths = [len(s) for s in sequences]
        if max(lengths) - min(lengths) > self.max_spread:
            return None
        best = None
        for prefix, layers in self._entries.items():
            size = len(prefix)
            if (best is None or size > best[0]) and all(
                    len(s) > size and tuple(s[:size]) == prefix for s in sequences):
                best = (size, layers, prefix)
        if best is None:
            return None
        self._entries.move_to_end(best[2])
        return best[0], best[1]

    def candidate(self, sequences: list[list[int]]) -> tuple[int, ...] | None:
        """After a full prefill: the common start of the prompts seen lately (these
        included), when it is long enough and not cached yet. It stops one token short of the
        shortest prompt, so that a prompt equal to it still has a token to prefill."""
        self._recent.extend(tuple(s) for s in sequences)
        if len(self._recent) < 2:
            return None
        # The common start of all is that of the lexicographically first and last.
        low, high = min(self._recent), max(self._recent)
        size = next((i for i, (a, b) in enumerate(zip(low, high, strict=False)) if a != b),
                    min(len(low), len(high)))
        shortest = min(len(s) for s in self._recent)
        prefix = low[:min(size, shortest - 1)]
        if len(prefix) < self.min_tokens or prefix in self._entries:
            return None
        return prefix

    def add(self, prefix: tuple[int, ...], layers: Layers) -> None:
        self._entries[prefix] = layers
        while len(self._entries) > self._capacity:
            self._entries.popitem(last=False)
