"""SmolLM2's linear layers through each CPU kernel a worker can give them, side by side
(ray_inference/engine/int4.py, prepack.py; docs/benchmarks.md): the engine's shared 4-bit
copies, fp32 weights packed for MKL, packed for oneDNN, and plain `nn.Linear`.

For each thread count and row count, every linear layer of the model but its output layer
(its real weights, in --dtype: fp32, or bf16 where AMX's products compete) is called once, in
the model's order, with inputs of that many rows (q/k/v share one input, as gate/up do, so the
copies multiply once per input as in a decode step); the variants take turns, and each line
gives the medians of --passes in ms and the ratios that pick the defaults: copies against the
packed kernel the worker would pick (`engine.int4_max_rows: auto` should sit at the largest
row count where it stays under 1, for each dtype), and each packed kernel against plain
products (`engine.prepack_weights`).

    .venv/bin/python benchmarks/linear_kernels.py --threads 1 --threads 2
    .venv/bin/python benchmarks/linear_kernels.py --dtype bfloat16   # a CPU with bf16 kernels
"""

from __future__ import annotations

import platform
import statistics
import time

import click
import torch

from ray_inference.engine import int4, linears, prepack
from ray_inference.models import loader, registry


def layers_in_order(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The model's linear layers but its output layer, in its order; a copy's own layer (its
    `many_rows`, for larger calls) is not one of them."""
    output = linears.output_layer(model)
    return [module for name, module in model.named_modules()
            if isinstance(module, torch.nn.Linear | linears.LinearReplacement)
            and module is not output and not name.endswith(".many_rows")]


def _cpu_name() -> str:
    with open("/proc/cpuinfo") as cpuinfo:
        names = [line.split(":", 1)[1].strip() for line in cpuinfo if line.startswith("model name")]
    return f"{len(names)} x {names[0]}" if names else platform.machine()


def all_layers_ms(layers: list[torch.nn.Module], rows: int, dtype: torch.dtype) -> float:
    """One call of every layer, one input per width (the readers of one input share it)."""
    generator = torch.Generator().manual_seed(rows)
    inputs = {width: torch.randn(rows, width, generator=generator).to(dtype)
              for width in {layer.in_features for layer in layers}}
    started = time.perf_counter()
    for layer in layers:
        layer(inputs[layer.in_features])
    return (time.perf_counter() - started) * 1000


@click.command()
@click.option("--threads", multiple=True, type=int, default=(1, 2), show_default=True)
@click.option("--rows", "row_counts", multiple=True, type=int,
              default=(1, 2, 4, 8, 12, 16, 24, 32, 48, 64), show_default=True)
@click.option("--passes", type=int, default=9, show_default=True)
@click.option("--dtype", type=click.Choice(["float32", "bfloat16"]), default="float32",
              show_default=True, help="the weights' and inputs' dtype")
def main(threads: tuple[int, ...], row_counts: tuple[int, ...], passes: int, dtype: str) -> None:
    base = loader.load(registry.resolve("smollm2"), dtype)
    weights = base.dtype
    models = {"copies": base.own_copy().model, "plain": base.own_copy().model}
    added = int4.add_copies(models["copies"], max(row_counts), only_exact=True)
    for kernel in prepack.kernels(weights):
        models[kernel] = base.own_copy().model
        prepack.pack(models[kernel], kernel)
    variants = {name: layers_in_order(model) for name, model in models.items()}
    packed = [name for name in variants if name in prepack.KERNELS]
    if not packed:
        raise click.ClickException(f"this CPU build packs no {dtype} weights")
    click.echo(f"{_cpu_name()}, torch {torch.__version__}, {dtype}: {added} layers with copies, "
               f"{len(variants['plain'])} products a pass; packed: {', '.join(packed)}")
    saved = torch.get_num_threads()
    try:
        for count in threads:
            torch.set_num_threads(count)
            fastest = (prepack.fastest_fp32_kernel(base.model.config.hidden_size)[0]
                       if len(packed) > 1 else packed[0])
            click.echo(f"{count} thread(s): a worker would pack for {fastest}")
            with torch.inference_mode():
                for rows in row_counts:
                    times: dict[str, list[float]] = {name: [] for name in variants}
                    for layers in variants.values():  # warm each
                        all_layers_ms(layers, rows, weights)
                    for _ in range(passes):
                        for name, layers in variants.items():
                            times[name].append(all_layers_ms(layers, rows, weights))
                    ms = {name: statistics.median(values) for name, values in times.items()}
                    kernels = "  ".join(f"{name} {ms[name]:6.1f}" for name in variants)
                    ratios = "  ".join(f"{name}/plain {ms[name] / ms['plain']:.2f}"
                                       for name in packed)
                    click.echo(f"{count}T {rows:3d} rows (ms): {kernels}  copies/{fastest} "
                               f"{ms['copies'] / ms[fastest]:.2f}  {ratios}")
    finally:
        torch.set_num_threads(saved)


if __name__ == "__main__":
    main()
