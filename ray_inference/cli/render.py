"""How the gateway's JSON looks to a person: aligned tables, byte sizes, the "answered by" line.

Functions return text with click styles; `out` prints it, and click drops the colours when the
stream is not a terminal (or NO_COLOR is set), so pipes get plain aligned text.
"""

from __future__ import annotations

import datetime
import json
import os
import re
from typing import Any

import click

Cell = str | tuple[str, dict[str, Any]]  # text, or text with click.style arguments


def out(text: str = "", *, err: bool = False, nl: bool = True) -> None:
    click.echo(text, err=err, nl=nl, color=False if os.environ.get("NO_COLOR") else None)


def out_json(data: Any) -> None:
    click.echo(json.dumps(data, indent=2, ensure_ascii=False))


def table(headers: list[str], rows: list[list[Cell]]) -> str:
    texts = [[c if isinstance(c, str) else c[0] for c in row] for row in rows]
    widths = [max([len(h)] + [len(r[i]) for r in texts]) for i, h in enumerate(headers)]
    last = len(headers) - 1

    def line(cells: list[Cell], strong: bool = False) -> str:
        parts = []
        for i, cell in enumerate(cells):
            text, style = (cell, {}) if isinstance(cell, str) else cell
            padded = text if i == last else text.ljust(widths[i])
            parts.append(click.style(padded, bold=True) if strong else
                         click.style(padded, **style) if style else padded)
        return "  ".join(parts)

    return "\n".join([line(list(headers), strong=True)] + [line(row) for row in rows])


def size(n: float | None) -> str:
    if n is None:
        return "-"
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit in ("B", "KiB") else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")


def number(n: Any) -> str:
    if isinstance(n, float) and n.is_integer():
        return str(int(n))
    return "-" if n is None else str(n)


def plural(n: Any, word: str) -> str:
    return f"{number(n)} {word}{'' if n == 1 else 's'}"


def _label_key(label: str) -> tuple[int, int]:
    match = re.search(r"#(\d+)", label)
    return (0 if label.lower().startswith("head") else 1, int(match.group(1)) if match else 0)


def summary(cluster: dict[str, Any]) -> str:
    t = cluster.get("totals") or {}
    nodes = cluster.get("nodes") or []
    workers = t.get("workers", sum(1 for n in nodes if n.get("role") == "worker"))
    parts = [
        f"{plural(t.get('nodes', len(nodes)), 'node')} ({plural(workers, 'worker')})",
        plural(t.get("actors", len(cluster.get("actors") or [])), "actor"),
        f"{number(t.get('cpus'))} CPUs",
        f"{number(t.get('gpus'))} GPUs",
        f"{size(t.get('memory_bytes'))} memory",
        f"{plural(t.get('in_flight', 0), 'request')} in flight",
    ]
    return ", ".join(parts)


def nodes_table(cluster: dict[str, Any]) -> str:
    nodes = sorted(cluster.get("nodes") or [], key=lambda n: _label_key(n.get("label") or ""))
    rows: list[list[Cell]] = []
    for n in nodes:
        res = n.get("resources") or {}
        alive = n.get("alive", True)
        rows.append([
            (n.get("label") or n.get("role") or "?", {"bold": True}),
            n.get("hostname") or "-",
            n.get("ip") or "-",
            ("alive", {"fg": "green"}) if alive else ("dead", {"fg": "red"}),
            str(n.get("actors", 0)),
            number(res.get("CPU", 0)),
            number(res.get("GPU", 0)),
            size(res.get("memory")),
        ])
    return table(["NODE", "HOSTNAME", "IP", "STATE", "ACTORS", "CPU", "GPU", "MEMORY"], rows)


def actors_table(actors: list[dict[str, Any]]) -> str:
    actors = sorted(actors, key=lambda a: (_label_key(a.get("node_label") or ""),
                                           a.get("model") or ""))
    rows: list[list[Cell]] = []
    for a in actors:
        state = a.get("state") or "-"
        rows.append([
            (a.get("actor_id") or "-")[:12],
            (a.get("model") or "-", {"fg": "cyan"}),
            " ".join(filter(None, (a.get("device") or "-", a.get("numerics")))),
            (a.get("node_label") or "-", {"bold": True}),
            a.get("hostname") or "-",
            a.get("ip") or "-",
            (state, {"fg": "green" if state == "ready" else "yellow"}),
            number(a.get("load", 0)),
            size(a.get("rss_bytes")),
        ])
    return table(["ACTOR", "MODEL", "DEVICE", "NODE", "HOSTNAME", "IP", "STATE", "LOAD", "RSS"],
                 rows)


def cluster_report(cluster: dict[str, Any], url: str) -> str:
    actors = cluster.get("actors") or []
    parts = [
        click.style(f"Cluster at {url}", bold=True) + ": " + summary(cluster),
        "",
        nodes_table(cluster),
        "",
        actors_table(actors) if actors else click.style("No inference actors yet.", fg="yellow"),
    ]
    return "\n".join(parts)


def models_table(body: dict[str, Any]) -> str:
    models = body.get("data") or []
    if not models:
        return click.style("No model is served: no worker has registered yet.", fg="yellow")
    rows: list[list[Cell]] = []
    for m in models:
        extra = m.get("rayinfer") or {}
        rows.append([(m.get("id") or "?", {"fg": "cyan"}), number(extra.get("actors", "-")),
                     str(extra.get("task") or "-")])
    return table(["MODEL", "ACTORS", "TASK"], rows)


def events_list(body: Any) -> list[dict[str, Any]]:
    if isinstance(body, dict):
        body = body.get("events", body.get("data", []))
    return [e if isinstance(e, dict) else {"message": str(e)} for e in body or []]


def events_text(body: Any) -> str:
    """One line per event: time, kind, then its message or its other fields as key=value."""
    events = events_list(body)
    if not events:
        return "No events yet."
    rows = []
    for e in events:
        rest = dict(e)
        when = _when(_pop(rest, "ts", "time", "timestamp"))
        kind = str(_pop(rest, "event", "kind", "type") or "-")
        message = _pop(rest, "message", "msg")
        if message is None:
            message = " ".join(f"{k}={v}" for k, v in rest.items())
        rows.append((when, kind, str(message)))
    width = max(len(kind) for _, kind, _ in rows)
    return "\n".join(
        f"{click.style(when, dim=True)}  {click.style(kind.ljust(width), fg='cyan')}  {message}"
        .rstrip()
        for when, kind, message in rows
    )


def _pop(d: dict[str, Any], *keys: str) -> Any:
    for key in keys:
        if key in d:
            return d.pop(key)
    return None


def _when(ts: Any) -> str:
    if isinstance(ts, int | float):
        return datetime.datetime.fromtimestamp(ts).strftime("%H:%M:%S")
    return str(ts) if ts is not None else ""


def answered_by(info: dict[str, Any], seconds: float, usage: dict[str, Any] | None = None) -> str:
    """Who answered, like the seed's client showed it: node, hostname, IP, model, timing."""
    if not info:
        return click.style(f"answered in {seconds:.2f}s (the gateway sent no node info)",
                           dim=True)
    where = click.style(str(info.get("node_label") or "unknown node"), bold=True)
    host = info.get("hostname") or "?"
    ip = f" ({info['ip']})" if info.get("ip") else ""
    model = str(info.get("model") or "?")
    if info.get("device"):
        model += f" on {info['device']}"
    timing = []
    if info.get("generation_s") is not None:
        timing.append(f"{info['generation_s']:.2f}s")
    extra = []
    if info.get("queue_s") is not None:
        extra.append(f"queue {info['queue_s']:.2f}s")
    extra.append(f"total {seconds:.2f}s")
    timing.append(f"({', '.join(extra)})")
    retries = int(info.get("retries") or 0)
    retry_text = click.style("1 retry" if retries == 1 else f"{retries} retries",
                             fg="yellow" if retries else None)
    parts = [f"answered by {where}", f"{host}{ip}", model, " ".join(timing), retry_text]
    if usage and usage.get("completion_tokens") is not None:
        parts.append(f"{usage['completion_tokens']} tokens")
    return click.style(" · ", dim=True).join(parts)
