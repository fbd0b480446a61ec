"""Start-up banners: the facts a person needs, like the seed printed them."""

from __future__ import annotations

import click


def show(title: str, lines: dict[str, object]) -> None:
    click.echo(click.style(f"== {title} ==", bold=True), err=True)
    width = max(len(k) for k in lines) if lines else 0
    for key, value in lines.items():
        click.echo(f"   {key:<{width}}  {value}", err=True)
