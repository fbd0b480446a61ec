"""`rayinfer`: ask the cluster, watch it, and start its nodes.

Only click and the small CLI modules load at import time: httpx loads when a command talks to
the gateway, and Ray/torch only inside `rayinfer head`/`worker`.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, get_args

import click

from ray_inference import __version__
from ray_inference.bench.options import answer_lengths, prompt_lengths, sampling_options
from ray_inference.cli import render, settings
from ray_inference.cli.errors import (
    EPILOG,
    INTERRUPTED,
    SERVER_ERROR,
    USAGE,
    CliError,
)
from ray_inference.cli.render import out, out_json
from ray_inference.engine.types import KvCacheDtype, Quantize

if TYPE_CHECKING:
    from ray_inference.bench.prompts import Sampling
    from ray_inference.cli.client import Client

NODE_COMMANDS = {"head", "worker"}


class RayinferGroup(click.Group):
    """Turns Ctrl-C, a closed pipe and unexpected failures into one line and an exit code."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except KeyboardInterrupt:
            out(err=True)
            ctx.exit(INTERRUPTED)
        except BrokenPipeError:
            # `rayinfer actors | head -1`: the reader left; say nothing more.
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
            ctx.exit(0)
        except (click.ClickException, click.exceptions.Exit, click.Abort):
            raise
        except Exception as exc:
            # A node's crash keeps its traceback for the operator; a client shows one line.
            if ctx.invoked_subcommand in NODE_COMMANDS or os.environ.get("RAYINFER_DEBUG"):
                raise
            raise CliError(
                f"unexpected {type(exc).__name__}: {exc} (RAYINFER_DEBUG=1 shows the traceback)",
                SERVER_ERROR,
            ) from None


# ---- shared options ------------------------------------------------------------------------


def _remember(ctx: click.Context, param: click.Parameter, value: Any) -> Any:
    # ctx.meta is shared by the group and its command, so a command's --url overrides the
    # group's, which was parsed first.
    if value is not None:
        ctx.meta[f"rayinfer.{param.name}"] = value
    return value


def connection_options(f: Callable[..., Any]) -> Callable[..., Any]:
    f = click.option(
        "--api-key", callback=_remember, expose_value=False, metavar="KEY",
        help=f"API key sent as a Bearer token [env: {settings.ENV_API_KEY}].",
    )(f)
    return click.option(
        "--url", callback=_remember, expose_value=False, metavar="URL",
        help=f"Gateway URL [env: {settings.ENV_URL}; default: {settings.DEFAULT_URL}].",
    )(f)


json_option = click.option("--json", "as_json", is_flag=True, help="Print JSON for scripts.")


def generation_options(f: Callable[..., Any]) -> Callable[..., Any]:
    for option in reversed([
        click.option("-m", "--model", help="Model id (default: the server's first model)."),
        click.option("-s", "--system", help="System prompt."),
        click.option("--max-tokens", type=click.IntRange(min=1), help="Most tokens to generate."),
        click.option("--temperature", type=click.FloatRange(0, 2), help="Sampling temperature."),
        click.option(
            "-o", "--option", "options", type=(str, str), multiple=True, metavar="KEY VALUE",
            help="Any other request field, e.g. -o top_p 0.9 -o seed 1 (values parsed as JSON).",
        ),
    ]):
        f = option(f)
    return f


def _params(max_tokens: int | None, temperature: float | None,
            options: tuple[tuple[str, str], ...]) -> dict[str, Any]:
    params: dict[str, Any] = {}
    for key, value in options:
        try:
            params[key] = json.loads(value)
        except json.JSONDecodeError:
            params[key] = value
    if max_tokens is not None:
        params["max_tokens"] = max_tokens
    if temperature is not None:
        params["temperature"] = temperature
    return params


def _connection(ctx: click.Context) -> settings.Connection:
    return settings.resolve(ctx.meta.get("rayinfer.url"), ctx.meta.get("rayinfer.api_key"))


def _client(ctx: click.Context) -> Client:
    from ray_inference.cli.client import Client  # httpx loads only when needed

    conn = _connection(ctx)
    client = Client(conn.url.value, conn.api_key.value, url_source=conn.url.source)
    ctx.call_on_close(client.close)
    return client


# ---- the group -----------------------------------------------------------------------------


@click.group(cls=RayinferGroup, epilog=EPILOG,
             context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, "-V", "--version", prog_name="rayinfer")
@connection_options
def cli() -> None:
    """Distributed LLM inference on a Ray cluster.

    The client commands talk HTTP to the gateway on the head; `head` and `worker` start nodes.
    The gateway URL comes from --url, else RAYINFER_URL, else the client config file
    (RAYINFER_CLIENT_CONFIG, else ~/.config/rayinfer/client.yaml), else http://127.0.0.1:8000.

    \b
    Example:
        rayinfer --url http://head:8000 ask "What is Ray?"
    """


# ---- asking --------------------------------------------------------------------------------


@cli.command()
@click.argument("prompt", required=False)
@generation_options
@click.option("--stream/--no-stream", default=None,
              help="Print tokens as they come [default: when stdout is a terminal].")
@click.option("-q", "--quiet", is_flag=True, help="Print only the answer, not who answered.")
@json_option
@connection_options
@click.pass_context
def ask(ctx: click.Context, prompt: str | None, model: str | None, system: str | None,
        max_tokens: int | None, temperature: float | None,
        options: tuple[tuple[str, str], ...], stream: bool | None, quiet: bool,
        as_json: bool) -> None:
    """Ask one question and print the answer.

    The answer goes to stdout; who answered (node, hostname, IP, model, timing, retries) goes
    to stderr, so a pipe gets only the answer. PROMPT `-` (or no PROMPT with piped input)
    reads the prompt from stdin. --json prints the gateway's whole response.

    \b
    Example:
        rayinfer ask "What is artificial intelligence?"
        echo "Name three planets." | rayinfer ask - -m smollm2 --max-tokens 64
    """
    if prompt == "-" or (prompt is None and not sys.stdin.isatty()):
        prompt = sys.stdin.read().rstrip("\n")
    if prompt is None:
        raise click.UsageError("give a PROMPT, or `-` to read it from stdin")
    if not prompt.strip():
        raise CliError("the prompt is empty", USAGE)

    client = _client(ctx)
    model = model or client.default_model()
    messages = [{"role": "system", "content": system}] if system else []
    messages.append({"role": "user", "content": prompt})
    body = {"model": model, "messages": messages, **_params(max_tokens, temperature, options)}

    if as_json:
        out_json(client.chat(body)[1])
        return
    if stream is None:
        stream = sys.stdout.isatty()
    if stream:
        with client.stream_chat(body) as (pieces, answer):
            try:
                for piece in pieces:
                    out(piece, nl=False)
            finally:
                out()
    else:
        answer, _raw = client.chat(body)
        out(answer.text)
    if not quiet:
        out(render.answered_by(answer.info, answer.seconds, answer.usage), err=True)


@cli.command()
@generation_options
@click.option("--no-stream", is_flag=True, help="Print each answer whole, not token by token.")
@connection_options
@click.pass_context
def chat(ctx: click.Context, model: str | None, system: str | None, max_tokens: int | None,
         temperature: float | None, options: tuple[tuple[str, str], ...],
         no_stream: bool) -> None:
    """Talk with the cluster interactively.

    Follow-up questions keep the conversation's context. Type `help` for the commands
    (status, actors, models, logs, test, clear, quit). Ctrl-C stops an answer, Ctrl-D leaves.

    \b
    Example:
        rayinfer chat -m smollm2 -s "Answer briefly."
    """
    from ray_inference.cli.chat import ChatSession

    client = _client(ctx)
    session = ChatSession(
        client,
        model or client.default_model(),
        system=system,
        params=_params(max_tokens, temperature, options),
        stream=not no_stream,
    )
    session.run()


# ---- watching ------------------------------------------------------------------------------


@cli.command()
@json_option
@connection_options
@click.pass_context
def status(ctx: click.Context, as_json: bool) -> None:
    """Show cluster resources, nodes (Head Node, Worker Node #N) and actors per node.

    \b
    Example:
        rayinfer status
    """
    client = _client(ctx)
    cluster = client.get_json("/v1/cluster")
    if as_json:
        out_json(cluster)
    else:
        out(render.cluster_report(cluster, client.url))


@cli.command()
@json_option
@connection_options
@click.pass_context
def actors(ctx: click.Context, as_json: bool) -> None:
    """List inference actors: model, device, and the node, hostname and IP each runs on.

    \b
    Example:
        rayinfer actors --json
    """
    found = _client(ctx).get_json("/v1/cluster").get("actors") or []
    if as_json:
        out_json(found)
    else:
        out(render.actors_table(found) if found else "No inference actors yet.")


@cli.command()
@json_option
@connection_options
@click.pass_context
def models(ctx: click.Context, as_json: bool) -> None:
    """List the models the workers serve, with how many actors serve each.

    \b
    Example:
        rayinfer models
    """
    body = _client(ctx).get_json("/v1/models")
    if as_json:
        out_json(body)
    else:
        out(render.models_table(body))


@cli.command()
@click.option("-n", "--limit", type=click.IntRange(min=1), default=50, show_default=True,
              help="How many recent events.")
@json_option
@connection_options
@click.pass_context
def logs(ctx: click.Context, limit: int, as_json: bool) -> None:
    """Show the coordinator's recent events: registrations, routing, retries, errors.

    \b
    Example:
        rayinfer logs -n 20
    """
    body = _client(ctx).get_json("/v1/events", {"limit": limit})
    if as_json:
        out_json(render.events_list(body))
    else:
        out(render.events_text(body))


@cli.command()
@click.option("--role", type=click.Choice(["cluster", "head", "worker"]), default="cluster",
              show_default=True,
              help="cluster: the gateway's /health (ready with >= 1 worker); head: this host's "
                   "gateway is up; worker: this host's Ray node is up.")
@click.option("--port", type=click.IntRange(1, 65535), default=8000, show_default=True,
              help="Gateway port checked by --role head.")
@click.option("--raylet-port", type=click.IntRange(1, 65535), default=52365, show_default=True,
              help="Ray dashboard agent port checked by --role worker.")
@click.option("--timeout", type=click.FloatRange(min=0.1), default=2.0, show_default=True,
              help="Seconds to wait for the answer.")
@click.option("-q", "--quiet", is_flag=True, help="Print nothing; only the exit code tells.")
@json_option
@connection_options
@click.pass_context
def health(ctx: click.Context, role: str, port: int, raylet_port: int, timeout: float,
           quiet: bool, as_json: bool) -> None:
    """Check health: exit 0 when healthy, 1 otherwise (a Docker HEALTHCHECK).

    --role head and --role worker check this host only (127.0.0.1), fast and without Ray.

    \b
    Example:
        rayinfer health --role worker --timeout 2
    """
    from ray_inference.cli.client import probe

    if role == "head":
        target = f"http://127.0.0.1:{port}/health/live"
    elif role == "worker":
        target = f"http://127.0.0.1:{raylet_port}/api/local_raylet_healthz"
    else:
        target = _connection(ctx).url.value + "/health"
    healthy, reason, body = probe(target, timeout)
    if as_json:
        out_json({"healthy": healthy, "role": role, "url": target, "reason": reason,
                  "body": body})
    elif not quiet:
        word = click.style("healthy", fg="green") if healthy else click.style("unhealthy",
                                                                              fg="red")
        out(f"{word}: {target}: {reason}")
    ctx.exit(0 if healthy else 1)


@cli.command("config")
@json_option
@connection_options
@click.pass_context
def show_config(ctx: click.Context, as_json: bool) -> None:
    """Show which gateway URL and API key the client commands use, and where each comes from.

    \b
    Example:
        RAYINFER_URL=http://head:8000 rayinfer config
    """
    conn = _connection(ctx)
    if as_json:
        out_json({
            "url": conn.url.value,
            "url_source": conn.url.source,
            "api_key": settings.mask(conn.api_key.value),
            "api_key_source": conn.api_key.source,
            "client_config": str(conn.config_file),
            "client_config_found": conn.config_file_found,
        })
        return
    found = "" if conn.config_file_found else " (not found)"
    out(render.table(["SETTING", "VALUE", "FROM"], [
        ["url", conn.url.value or "-", conn.url.source],
        ["api_key", settings.mask(conn.api_key.value) or "-", conn.api_key.source],
        ["client config", f"{conn.config_file}{found}", settings.ENV_CLIENT_CONFIG
         if os.environ.get(settings.ENV_CLIENT_CONFIG) else "default"],
    ]))


# ---- nodes ---------------------------------------------------------------------------------

config_path_option = click.option(
    "--config", "config_path", envvar="RAYINFER_CONFIG", metavar="PATH",
    type=click.Path(dir_okay=False),
    help="The node's YAML config [env: RAYINFER_CONFIG].",
)


def _run_node(start: Callable[[], None]) -> None:
    from ray_inference.config import ConfigError
    from ray_inference.errors import RayInferError
    from ray_inference.node.stop_signals import StartInterrupted

    try:
        start()
    except (ConfigError, RayInferError) as exc:
        raise CliError(str(exc), SERVER_ERROR) from None
    except StartInterrupted as exc:  # asked to stop: what was started is stopped, exit 0
        click.echo(f"{exc}; nothing is left running", err=True)


@cli.command()
@config_path_option
def head(config_path: str | None) -> None:
    """Start the head node: Ray head, coordinator and the HTTP gateway (runs until stopped).

    \b
    Example:
        rayinfer head --config /etc/rayinfer/config.yaml
    """

    def start() -> None:
        from ray_inference.node.head import run_head

        run_head(config_path)

    _run_node(start)


@cli.command()
@config_path_option
@click.option("--head", "head_address", metavar="HOST:PORT",
              help="The Ray head's address (default: from the config).")
def worker(config_path: str | None, head_address: str | None) -> None:
    """Start a worker node: join the Ray head and register inference actors.

    \b
    Example:
        rayinfer worker --config /etc/rayinfer/config.yaml --head 10.0.0.1:6379
    """

    def start() -> None:
        from ray_inference.node.worker import run_worker

        run_worker(config_path, head_address)

    _run_node(start)


# ---- benchmarks ----------------------------------------------------------------------------


def _progress_bar(variant: str, requests: int):
    """One bar per benchmark variant, on stderr, advanced as its requests finish."""
    bar = click.progressbar(length=requests, label=f"{variant:>4}", file=sys.stderr,
                            show_pos=True, show_eta=True)
    bar.__enter__()  # draws it at 0

    def tick(done: int) -> None:
        bar.update(done)
        if bar.pos >= requests:
            bar.__exit__(None, None, None)  # the bar's final line

    return tick


@cli.command()
@click.option("-c", "--concurrency", "concurrency", multiple=True, type=click.IntRange(min=1),
              default=(16,), show_default=True,
              help="Concurrent requests (repeat for a sweep); also the static batch size of (b).")
@answer_lengths
@prompt_lengths
@sampling_options
@click.option("--sequential", type=click.IntRange(min=1), default=4, show_default=True,
              help="How many prompts variant (a) runs one at a time (it is slow), and the "
                   "single clients of (c) and (d).")
@click.option("--requests-per-client", type=click.IntRange(min=1), default=2, show_default=True,
              help="Requests each client of (c) and (d) sends, one after another; (b) runs "
                   "as many batches.")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--warm-up/--no-warm-up", default=True, show_default=True,
              help="Run each variant's work once untimed before timing it, as a process that "
                   "has served a while would have (the table's last column: that first pass's "
                   "tok/s).")
@click.option("--gateway", "gateway_url", default=None, metavar="URL",
              help="Also run (d): the same load through this gateway (the full stack).")
@click.option("--http-only", is_flag=True,
              help="Only the load generator: (d) against --gateway, else the gateway the "
                   "client commands use (--url); no model runs here.")
@click.option("-m", "--model", default="smollm2", show_default=True,
              help="Model name at the gateway for (d).")
@click.option("--hf-continuous", is_flag=True,
              help="Also run (e): transformers' own continuous batching (generate_batch).")
@click.option("--quantize", type=click.Choice(get_args(Quantize)), default="none",
              show_default=True,
              help="engine.quantize for (c); (d) runs as the gateway's workers are configured.")
@click.option("--kv-cache-dtype", type=click.Choice(get_args(KvCacheDtype)),
              default="auto", show_default=True,
              help="engine.kv_cache_dtype for (c); (d) runs as the gateway's workers are "
                   "configured.")
@click.option("--out", type=click.Path(dir_okay=False), default=None,
              help="Write JSON here, and a PNG beside it.")
@connection_options
@click.pass_context
def bench(ctx: click.Context, concurrency: tuple[int, ...], answer_tokens: tuple[int, int],
          prompt_tokens: tuple[int, int] | None, sampling: Sampling, sequential: int,
          requests_per_client: int, seed: int, warm_up: bool, gateway_url: str | None,
          http_only: bool, model: str, hf_continuous: bool, quantize: str, kv_cache_dtype: str,
          out: str | None) -> None:
    """Benchmark SmolLM2 side by side in one run: HF one at a time (a), HF static batches (b),
    the rayinfer engine (c) and, with --gateway, the full stack over HTTP (d); prints tok/s,
    p50 time to first token and ratios to (a) and (b), then req/s and p50/p90/p99 latencies.
    With --http-only it is a load generator for a running cluster: (d) alone.

    \b
    Example:
        rayinfer bench -c 16 -c 64 --gateway http://127.0.0.1:8000 --out benchmarks/results/cpu.json
        rayinfer bench --http-only -c 64 --requests-per-client 4 --url http://head:8000
    """
    from pathlib import Path

    from ray_inference.bench.offline import run

    if http_only and (hf_continuous or quantize != "none" or kv_cache_dtype != "auto"):
        raise click.UsageError("--hf-continuous, --quantize and --kv-cache-dtype choose how "
                               "this machine runs (c) and (e); --http-only runs neither")
    api_key = None
    if gateway_url or http_only:  # the client commands' URL and API key (docs/cli.md)
        connection = _connection(ctx)
        source = "--gateway" if gateway_url else connection.url.source
        gateway_url = settings.normalize_url(gateway_url) if gateway_url else connection.url.value
        api_key = connection.api_key.value
        _check_gateway(gateway_url, source, api_key, model)
    run(sorted(set(concurrency)), *answer_tokens, sequential, seed, gateway_url, model,
        api_key, Path(out) if out else None, echo=click.echo, progress=_progress_bar,
        hf_cb=hf_continuous, requests_per_client=requests_per_client,
        engine_settings={"quantize": quantize, "kv_cache_dtype": kv_cache_dtype},
        prompt_tokens=prompt_tokens, http_only=http_only, sampling=sampling, warm_up=warm_up)


def _check_gateway(url: str, source: str, api_key: str | None, model: str) -> None:
    """Before any load: the gateway answers, takes the key and serves the model (a wrong URL
    fails in seconds, not after the local variants' minutes)."""
    from ray_inference.cli.client import Client

    with Client(url, api_key, url_source=source) as client:
        client.require_model(model)
