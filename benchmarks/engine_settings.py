"""An engine setting on and off, side by side (docs/benchmarks.md).

Runs the benchmark's variant (c), the engine alone with N clients, on the same workload with a
boolean EngineConfig field true and false, alternating for --rounds rounds in one process, and
prints tok/s and the steady-state p50 time to first token of each run, then the medians' ratio.

    .venv/bin/python benchmarks/engine_settings.py pack_arrivals -c 16 -c 64
"""

from __future__ import annotations

import statistics

import click

from ray_inference.bench.offline import engine_run
from ray_inference.bench.prompts import Workload
from ray_inference.config import EngineConfig
from ray_inference.models import loader, registry

SETTINGS = sorted(name for name, field in EngineConfig.model_fields.items()
                  if field.annotation is bool)


@click.command()
@click.argument("setting", type=click.Choice(SETTINGS))
@click.option("-c", "--concurrency", multiple=True, type=int, default=(16, 64), show_default=True)
@click.option("--rounds", type=int, default=2, show_default=True)
@click.option("--requests-per-client", type=int, default=2, show_default=True)
@click.option("--seed", type=int, default=0, show_default=True)
def main(setting: str, concurrency: tuple[int, ...], rounds: int, requests_per_client: int,
         seed: int) -> None:
    # A model per value: an engine changes its model for good (prepack_weights does).
    loaded = loader.load(registry.resolve("smollm2"))
    models = {True: loaded, False: loaded.own_copy()}
    work = Workload.make(requests_per_client * max(concurrency), 64, 128, seed)
    for clients in concurrency:
        part = work.head(requests_per_client * clients)
        runs: dict[bool, list] = {True: [], False: []}
        for _ in range(rounds):
            for value in (True, False):
                row = engine_run(models[value], part, clients, settings={setting: value})
                runs[value].append(row)
                click.echo(f"{clients:3d} clients  {setting}={str(value).lower():5s}  "
                           f"{row.tok_s:7.1f} tok/s  steady TTFT p50 "
                           f"{row.ttft_steady_p50_s:.3f} s")
        on, off = (statistics.median(r.tok_s for r in runs[v]) for v in (True, False))
        click.echo(f"{clients:3d} clients  median tok/s on / off: {on / off:.2f}")


if __name__ == "__main__":
    main()
