"""Command-line options that `rayinfer bench` and the scripts in benchmarks/ share."""

from __future__ import annotations

import functools
from collections.abc import Callable

import click


def output_lengths(command: Callable) -> Callable:
    """--min-tokens and --max-tokens (each request's answer length is drawn between them),
    refused by name when the range is empty, before anything loads."""

    @functools.wraps(command)
    def checked(*args, min_tokens: int, max_tokens: int, **kwargs):
        if min_tokens > max_tokens:
            raise click.BadParameter(f"--min-tokens {min_tokens} is larger than --max-tokens "
                                     f"{max_tokens}")
        return command(*args, min_tokens=min_tokens, max_tokens=max_tokens, **kwargs)

    checked = click.option("--max-tokens", type=click.IntRange(min=1), default=128,
                           show_default=True, help="Most new tokens per request.")(checked)
    return click.option("--min-tokens", type=click.IntRange(min=1), default=64,
                        show_default=True, help="Fewest new tokens per request.")(checked)
