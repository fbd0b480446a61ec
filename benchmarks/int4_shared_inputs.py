"""4-bit copies shared by the layers that read one input, against a copy per layer
(ray_inference/engine/int4.py, docs/benchmarks.md).

The engine alone (the benchmark's variant (c)) with SmolLM2 in fp32 and its default 4-bit
copies, which give q/k/v one product and gate/up another, against the same engine on a model
whose layers were each given a copy of their own before the engine was made. The two compute
the same numbers bit for bit (tests/test_int4.py); what differs is how many calls of the
kernel a step makes (120 against 210). First the model's forward pass of one decode step
alone (transformers' own cache, kept at --columns columns; the two models alternate, medians
of --passes passes), for 1, 4 and 16 rows; then the engine alone with N clients, runs
alternating round after round on the same workload: tok/s and inter-token latency per run,
then the medians and their ratio.

    .venv/bin/python benchmarks/int4_shared_inputs.py -c 1 -c 4 -c 16 --rounds 3
"""

from __future__ import annotations

import statistics
import time

import click
import torch
from transformers import DynamicCache

from ray_inference.bench.offline import engine_run
from ray_inference.bench.options import answer_lengths
from ray_inference.bench.prompts import Workload
from ray_inference.engine import int4
from ray_inference.engine.causal import cache_keyword
from ray_inference.models import loader, registry


def forward_ms(models: dict, rows: int, columns: int, passes: int) -> dict[str, float]:
    """Median ms of one decode forward pass of `rows` rows over `columns` cached columns, the
    models taking turns."""
    ids = torch.randint(100, 1000, (rows, columns + 1), generator=torch.Generator().manual_seed(0))
    caches, times = {}, {name: [] for name in models}
    with torch.inference_mode():
        for name, model in models.items():
            caches[name] = DynamicCache(config=model.config)
            model(input_ids=ids[:, :columns], use_cache=True,
                  **{cache_keyword(model): caches[name]})
        for _ in range(passes):
            for name, model in models.items():
                started = time.perf_counter()
                model(input_ids=ids[:, columns:], use_cache=True,
                      **{cache_keyword(model): caches[name]})
                times[name].append((time.perf_counter() - started) * 1000)
                caches[name].crop(-1)  # back to `columns` columns
    return {name: statistics.median(values) for name, values in times.items()}


@click.command()
@click.option("-c", "--concurrency", multiple=True, type=int, default=(1, 4, 16),
              show_default=True)
@click.option("--rounds", type=int, default=2, show_default=True)
@click.option("--requests-per-client", type=int, default=2, show_default=True)
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--columns", type=int, default=100, show_default=True)
@click.option("--passes", type=int, default=40, show_default=True)
@answer_lengths
def main(concurrency: tuple[int, ...], rounds: int, requests_per_client: int, seed: int,
         columns: int, passes: int, answer_tokens: tuple[int, int]) -> None:
    shared = loader.load(registry.resolve("smollm2"), "float32")
    own = shared.own_copy()
    copies = int4.add_copies(own.model, int4.AUTO_MAX_ROWS, only_exact=True,
                             share_inputs=False)
    click.echo(f"a copy per layer: {copies} layers; the engine's default: shared copies")
    # The forward pass alone, on models given their copies as the engine gives them.
    alone = {"shared": shared.own_copy().model, "per layer": own.own_copy().model}
    int4.add_copies(alone["shared"], int4.AUTO_MAX_ROWS, only_exact=True)
    for rows in (1, 4, 16):
        ms = forward_ms(alone, rows, columns, passes)
        click.echo(f"forward pass, {rows:2d} rows: shared {ms['shared']:6.2f} ms, per layer "
                   f"{ms['per layer']:6.2f} ms ({ms['shared'] / ms['per layer']:.2f}x)")
    del alone
    variants = {"shared": (shared, {}),
                # Its layers have their copies already; the engine adds none of its own.
                "per layer": (own, {"int4_max_rows": 0})}
    work = Workload.draw(requests_per_client * max(concurrency), answer_tokens, seed)
    for clients in concurrency:
        part = work.head(requests_per_client * clients)
        tok_s: dict[str, list[float]] = {name: [] for name in variants}
        for _ in range(rounds):
            for name, (loaded, settings) in variants.items():
                row = engine_run(loaded, part, clients, settings=settings)
                tok_s[name].append(row.tok_s)
                click.echo(f"{clients:3d} clients  {name:9s}  {row.tok_s:7.1f} tok/s  "
                           f"ITL p50 {row.latency['itl_p50_s'] * 1000:5.1f} ms")
        base = statistics.median(tok_s["per layer"])
        for name, values in tok_s.items():
            median = statistics.median(values)
            click.echo(f"{clients:3d} clients  {name:9s}  median {median:7.1f} tok/s "
                       f"({median / base:.2f}x a copy per layer)")


if __name__ == "__main__":
    main()
