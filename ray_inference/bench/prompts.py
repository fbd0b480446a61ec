"""The benchmark's prompts: short, varied questions (with SmolLM2's chat template, 34-38
tokens, 24 of them the template's own), and the workload drawn from them. Longer prompts, of
drawn lengths, put a passage of filler words before the question."""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any

import click

QUESTIONS = [
    "What is the capital of France?", "Explain photosynthesis in one paragraph.",
    "Write a haiku about the sea.", "What is machine learning?", "Name three primary colors.",
    "How do airplanes fly?", "Give me a recipe for pancakes.", "What is Ray in Python?",
    "Summarize the plot of Hamlet.", "Why is the sky blue?", "List four planets.",
    "What does a CPU do?", "Tell me a fun fact about cats.", "How do vaccines work?",
    "What is the speed of light?", "Describe a rainbow.",
]

# Common words that SmolLM2's tokenizer (like most BPE vocabularies) keeps as one token each
# after a space, so a passage of N of them is about N tokens.
FILLER = ("the", "of", "and", "to", "in", "is", "that", "for", "it", "as", "was", "with", "be",
          "by", "on", "not", "this", "are", "or", "from", "at", "which", "but", "have", "an",
          "they", "you", "were", "there", "been", "one", "all", "we", "their", "has", "would",
          "when", "if", "so", "no", "more", "out", "up", "into", "do", "time", "only", "new",
          "some", "could", "these", "two", "may", "first", "any", "like", "now", "over", "such",
          "our", "even", "most", "made", "after", "also", "did", "many", "well")


class PromptLengthError(click.BadParameter):
    """A prompt length the workload cannot reach; a command that meets it exits 2 with the
    message, naming --min-prompt-tokens."""

    def __init__(self, message: str):
        super().__init__(message, param_hint="--min-prompt-tokens")


def chat_text(tokenizer: Any, messages: list[dict[str, str]]) -> str:
    """A request's messages as the prompt text, the chat template applied as the engine and
    the gateway's workers apply it."""
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


def chat_ids(tokenizer: Any, messages: list[dict[str, str]]) -> list[int]:
    return tokenizer(chat_text(tokenizer, messages), add_special_tokens=False)["input_ids"]


def chat_token_counter(tokenizer: Any) -> Callable[[list[dict[str, str]]], int]:
    """How many tokens a request's messages become."""
    return lambda messages: len(chat_ids(tokenizer, messages))


@dataclass(frozen=True)
class Sampling:
    """How every variant picks its tokens: greedy at temperature 0 (the default), else
    sampled at this temperature among the top_p nucleus."""

    temperature: float = 0.0
    top_p: float = 1.0

    def __str__(self) -> str:
        if not self.temperature:
            return "greedy"
        return f"sampled at temperature {self.temperature:g}, top_p {self.top_p:g}"

    def request_fields(self) -> dict[str, float]:
        """The request's fields, for the engine and the HTTP API alike."""
        return {"temperature": self.temperature, "top_p": self.top_p}

    def generate_options(self) -> dict[str, Any]:
        """transformers' generate (and GenerationConfig) options."""
        if not self.temperature:
            return {"do_sample": False}
        return {"do_sample": True, "temperature": self.temperature, "top_p": self.top_p}


@dataclass
class Workload:
    """Prompts, their drawn output lengths and how tokens are picked: the same work for every
    variant."""

    messages: list[list[dict[str, str]]]
    lengths: list[int]
    sampling: Sampling = field(default_factory=Sampling)

    @classmethod
    def make(cls, count: int, min_tokens: int, max_tokens: int, seed: int,
             sampling: Sampling | None = None) -> Workload:
        rng = random.Random(seed)
        return cls([[{"role": "user", "content": rng.choice(QUESTIONS)}] for _ in range(count)],
                   [rng.randint(min_tokens, max_tokens) for _ in range(count)],
                   sampling or Sampling())

    @classmethod
    def draw(cls, count: int, answer_tokens: tuple[int, int], seed: int,
             prompt_tokens: tuple[int, int] | None = None, tokenizer: Any = None,
             sampling: Sampling | None = None) -> Workload:
        """`make`, then with `prompt_tokens` each prompt lengthened as the model's
        `tokenizer` counts."""
        work = cls.make(count, *answer_tokens, seed, sampling)
        if prompt_tokens is None:
            return work
        return work.with_prompt_tokens(*prompt_tokens, seed, chat_token_counter(tokenizer))

    def head(self, count: int) -> Workload:
        return self.part(0, count)

    def part(self, start: int, stop: int) -> Workload:
        """Requests start to stop (not included), sampled alike."""
        return replace(self, messages=self.messages[start:stop], lengths=self.lengths[start:stop])

    def with_prompt_tokens(self, low: int, high: int, seed: int,
                           count_tokens: Callable[[list[dict[str, str]]], int]) -> Workload:
        """The same questions and answer lengths, each prompt lengthened to a drawn total of
        `low`-`high` tokens (chat template included, as `count_tokens` counts) by a passage of
        filler words before its question."""
        bares = [count_tokens(m) for m in self.messages]
        if low < max(bares):
            raise PromptLengthError(f"prompts of {low} tokens are shorter than the longest bare "
                                    f"question with the chat template ({max(bares)} tokens)")
        rng = random.Random(f"prompt tokens {seed}")
        messages = []
        for original, bare in zip(self.messages, bares, strict=True):
            target = rng.randint(low, high)
            question = original[-1]["content"]
            words = [rng.choice(FILLER) for _ in range(target)]
            used, lengthened, got = target - bare, original, bare
            for _ in range(8):  # the seam between passage and question may merge tokens
                lengthened = [{"role": "user",
                               "content": " ".join([*words[:used], question])}]
                got = count_tokens(lengthened)
                if got == target or not 0 < used + target - got <= target:
                    break
                used += target - got
            if got != target:
                raise PromptLengthError(f"could not build a prompt of exactly {target} tokens "
                                        f"around {question!r}")
            messages.append(lengthened)
        return replace(self, messages=messages, lengths=list(self.lengths))
