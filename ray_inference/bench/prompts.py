"""The benchmark's prompts: short, varied questions (with SmolLM2's chat template, 34-38
tokens, 24 of them the template's own), and the workload drawn from them."""

from __future__ import annotations

import random
from dataclasses import dataclass

QUESTIONS = [
    "What is the capital of France?", "Explain photosynthesis in one paragraph.",
    "Write a haiku about the sea.", "What is machine learning?", "Name three primary colors.",
    "How do airplanes fly?", "Give me a recipe for pancakes.", "What is Ray in Python?",
    "Summarize the plot of Hamlet.", "Why is the sky blue?", "List four planets.",
    "What does a CPU do?", "Tell me a fun fact about cats.", "How do vaccines work?",
    "What is the speed of light?", "Describe a rainbow.",
]


@dataclass
class Workload:
    """Prompts and their drawn output lengths: the same work for every variant."""

    messages: list[list[dict[str, str]]]
    lengths: list[int]

    @classmethod
    def make(cls, count: int, min_tokens: int, max_tokens: int, seed: int) -> Workload:
        rng = random.Random(seed)
        return cls([[{"role": "user", "content": rng.choice(QUESTIONS)}] for _ in range(count)],
                   [rng.randint(min_tokens, max_tokens) for _ in range(count)])

    def head(self, count: int) -> Workload:
        return Workload(self.messages[:count], self.lengths[:count])
