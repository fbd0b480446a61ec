"""An engine setting's values side by side (docs/benchmarks.md).

Runs the benchmark's variant (c), the engine alone with N clients, on the same workload once
per value of one EngineConfig field (a boolean's values default to true and false), values
alternating for --rounds rounds in one process, and prints tok/s and the steady-state p50 time
to first token of each run, then each value's median tok/s against the first value's. Other
fields keep their defaults unless --set gives them a value for every run.

    .venv/bin/python benchmarks/engine_settings.py pack_arrivals -c 16 -c 64
    .venv/bin/python benchmarks/engine_settings.py quantize int8 none -c 64 --rounds 3
    .venv/bin/python benchmarks/engine_settings.py kv_cache_dtype bfloat16 auto --set quantize=int8
    .venv/bin/python benchmarks/engine_settings.py kv_cache_dtype bfloat16 auto -c 64 \\
        --min-tokens 256 --max-tokens 512
    .venv/bin/python benchmarks/engine_settings.py huge_pages true -c 64 --rounds 1  # one value
"""

from __future__ import annotations

import statistics

import click
import fixed_settings
import yaml

from ray_inference.bench.offline import engine_run
from ray_inference.bench.options import answer_lengths, prompt_lengths, sampling_options
from ray_inference.bench.prompts import Sampling, Workload
from ray_inference.config import EngineConfig
from ray_inference.models import loader, registry


@click.command()
@click.argument("setting", type=click.Choice(sorted(EngineConfig.model_fields)))
@click.argument("values", nargs=-1)
@click.option("-c", "--concurrency", multiple=True, type=int, default=(16, 64), show_default=True)
@click.option("--rounds", type=int, default=2, show_default=True)
@click.option("--requests-per-client", type=int, default=2, show_default=True)
@click.option("--seed", type=int, default=0, show_default=True)
@answer_lengths
@prompt_lengths
@sampling_options
@click.option("--set", "fixed", multiple=True, metavar="FIELD=VALUE",
              help="another EngineConfig field's value (YAML) for every run")
def main(setting: str, values: tuple[str, ...], concurrency: tuple[int, ...], rounds: int,
         requests_per_client: int, seed: int, answer_tokens: tuple[int, int],
         prompt_tokens: tuple[int, int] | None, sampling: Sampling,
         fixed: tuple[str, ...]) -> None:
    """SETTING's VALUES (YAML: true, null, int8), the first one the base."""
    if not values and EngineConfig.model_fields[setting].annotation is bool:
        values = ("true", "false")
    if not values:
        raise click.BadParameter("give the values to compare", param_hint="VALUES")
    if setting == "huge_pages" and len(values) > 1:  # its collapse acts on the whole process
        raise click.BadParameter("huge_pages changes every engine in the process: run each "
                                 "value in a process of its own", param_hint="VALUES")
    parsed = [yaml.safe_load(v) for v in values]
    try:
        others = fixed_settings.parse(fixed, setting)
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint="--set") from exc
    for value in parsed:  # a bad value fails here, before anything runs
        EngineConfig(**others, **{setting: value})
    # A model per value: an engine changes its model for good (prepack_weights, quantize).
    loaded = loader.load(registry.resolve("smollm2"))
    models = [loaded, *(loaded.own_copy() for _ in parsed[1:])]
    work = Workload.draw(requests_per_client * max(concurrency), answer_tokens, seed,
                         prompt_tokens, loaded.tokenizer, sampling)
    for clients in concurrency:
        part = work.head(requests_per_client * clients)
        runs: list[list[float]] = [[] for _ in parsed]
        for _ in range(rounds):
            for index, value in enumerate(parsed):
                row = engine_run(models[index], part, clients,
                                 settings={**others, setting: value})
                runs[index].append(row.tok_s)
                click.echo(f"{clients:3d} clients  {setting}={value!s:8s}  {row.tok_s:7.1f} "
                           f"tok/s  steady TTFT p50 {row.ttft_steady_p50_s:.3f} s")
        base = statistics.median(runs[0])
        for value, tok_s in zip(parsed, runs, strict=True):
            median = statistics.median(tok_s)
            click.echo(f"{clients:3d} clients  {setting}={value!s:8s}  median {median:7.1f} "
                       f"tok/s ({median / base:.2f}x)")


if __name__ == "__main__":
    main()
