"""Command-line options that `rayinfer bench` and the scripts in benchmarks/ share."""

from __future__ import annotations

import functools
from collections.abc import Callable

import click

from ray_inference.bench.prompts import Sampling


def _token_range(kind: str, default: tuple[int, int] | None, low_help: str, high_help: str,
                 keyword: str) -> Callable[[Callable], Callable]:
    """--min-{kind}tokens and --max-{kind}tokens, handed to the command as one (low, high)
    `keyword` (None when neither is given and there is no default; one alone fixes the
    length), refused by name when low is above high, before anything loads."""
    low_flag, high_flag = f"--min-{kind}tokens", f"--max-{kind}tokens"
    low_name, high_name = (flag[2:].replace("-", "_") for flag in (low_flag, high_flag))

    def decorate(command: Callable) -> Callable:
        @functools.wraps(command)
        def checked(*args, **kwargs):
            low, high = kwargs.pop(low_name), kwargs.pop(high_name)
            low = high if low is None else low  # one alone fixes the length
            high = low if high is None else high
            if low is not None and low > high:
                raise click.BadParameter(f"{low_flag} {low} is larger than {high_flag} {high}")
            return command(*args, **{keyword: None if low is None else (low, high)}, **kwargs)

        for flag, value, text in ((high_flag, default and default[1], high_help),
                                  (low_flag, default and default[0], low_help)):
            checked = click.option(flag, type=click.IntRange(min=1), default=value,
                                   show_default=value is not None, help=text)(checked)
        return checked

    return decorate


# Each request's answer length is drawn between these (end of sequence ignored).
answer_lengths = _token_range("", (64, 128), "Fewest new tokens per request.",
                              "Most new tokens per request.", "answer_tokens")
# Each prompt's length, chat template included; neither: the bare questions.
prompt_lengths = _token_range(
    "prompt-", None,
    "Fewest prompt tokens (chat template included): filler words go before each question. "
    "Neither this nor --max-prompt-tokens: the bare questions (34-38 tokens).",
    "Most prompt tokens.", "prompt_tokens")


def sampling_options(command: Callable) -> Callable:
    """--temperature and --top-p, handed to the command as one `sampling` (greedy unless
    --temperature is above 0)."""
    @functools.wraps(command)
    def checked(*args, temperature: float, top_p: float, **kwargs):
        if top_p < 1 and not temperature:
            raise click.BadParameter("--top-p samples, so it needs a --temperature above 0 "
                                     "(0 is greedy)")
        return command(*args, sampling=Sampling(temperature, top_p), **kwargs)

    checked = click.option("--top-p", type=click.FloatRange(0, 1, min_open=True), default=1.0,
                           show_default=True,
                           help="Sample among the most likely tokens holding this much "
                                "probability (with --temperature).")(checked)
    return click.option("--temperature", type=click.FloatRange(0, 2), default=0.0,
                        show_default=True,
                        help="Every variant's sampling temperature; 0 is greedy.")(checked)
