"""The benchmark: the same prompts through every variant, in one process and one run.

(a) one request at a time with HF `generate` (the seed's way), (b) HF static batches as large
as the concurrency (the bound for padded batching), (c) the rayinfer engine with every request
in flight at once, and (d), when a gateway URL is given, the full stack over HTTP. Output
lengths are drawn per prompt (fixed seed) and every variant makes exactly those tokens (end of
sequence ignored), so tok/s compare like for like; static batches pay for their longest row.
"""

from __future__ import annotations

import asyncio
import functools
import json
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from ray_inference.bench.load import LoadResult
from ray_inference.bench.prompts import Sampling, Workload, chat_ids, chat_text, chat_token_counter

Tick = Callable[[int], None]  # told how many more requests of a variant are done
LATENCY_KEYS = ("req_s", *(f"{name}_p{q}_s" for name in ("ttft", "itl", "e2e")
                           for q in (50, 90, 99)))


def _no_tick(done: int) -> None:
    pass


@dataclass
class Row:
    variant: str
    concurrency: int
    requests: int
    tokens: int
    seconds: float
    ttft_p50_s: float | None = None
    # Without each client's first request (those arrive together, a cold-start burst).
    ttft_steady_p50_s: float | None = None
    errors: int = 0
    # (c) and (d): req/s and p50/p90/p99 of TTFT, inter-token latency and end to end.
    latency: dict | None = None
    # What the first few failed requests said.
    error_samples: list[str] = field(default_factory=list)
    # The same work's untimed first pass (`warm_up`): it met a cold process (on a CPU the
    # engine's heaps not yet grown: docs/benchmarks.md).
    first_pass_tok_s: float | None = None

    @classmethod
    def from_load(cls, variant: str, result: LoadResult) -> Row:
        summary = result.summary()
        return cls(variant, result.concurrency, result.requests, result.tokens, result.seconds,
                   summary["ttft_p50_s"], summary["ttft_steady_p50_s"], result.errors,
                   {key: value for key, value in summary.items() if key in LATENCY_KEYS},
                   summary["error_samples"])

    @property
    def tok_s(self) -> float:
        return self.tokens / self.seconds if self.seconds else 0.0

    def to_dict(self) -> dict:
        return {**self.__dict__, "tok_s": round(self.tok_s, 2)}


def _hf_batch(loaded, work: Workload) -> None:
    texts = [chat_text(loaded.tokenizer, m) for m in work.messages]
    loaded.tokenizer.padding_side = "left"
    batch = loaded.tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False)
    longest = max(work.lengths)
    loaded.model.generate(**batch.to(loaded.device), max_new_tokens=longest,
                          min_new_tokens=longest, **work.sampling.generate_options(),
                          pad_token_id=loaded.tokenizer.pad_token_id)


def one_at_a_time(loaded, work: Workload, tick: Tick = _no_tick) -> Row:
    start = time.perf_counter()
    for i in range(len(work.lengths)):
        _hf_batch(loaded, work.part(i, i + 1))
        tick(1)
    dtype = str(loaded.dtype).removeprefix("torch.")
    return Row(f"a: HF generate, one at a time, {dtype}", 1, len(work.lengths),
               sum(work.lengths), time.perf_counter() - start)


def static_batches(loaded, work: Workload, size: int, tick: Tick = _no_tick) -> Row:
    start = time.perf_counter()
    for i in range(0, len(work.lengths), size):
        _hf_batch(loaded, work.part(i, i + size))
        tick(len(work.lengths[i:i + size]))
    return Row(f"b: HF static batches of {size}", size, len(work.lengths), sum(work.lengths),
               time.perf_counter() - start)


def hf_continuous(loaded, work: Workload, concurrency: int, tick: Tick = _no_tick) -> Row:
    """transformers' own continuous batching (paged attention), the alternative we measured."""
    from transformers import GenerationConfig

    inputs = [chat_ids(loaded.tokenizer, m) for m in work.messages]
    config = GenerationConfig(max_new_tokens=max(work.lengths), min_new_tokens=max(work.lengths),
                              **work.sampling.generate_options(), eos_token_id=-1,
                              pad_token_id=loaded.tokenizer.pad_token_id,
                              max_batch_tokens=concurrency * 64)
    start = time.perf_counter()
    outputs = loaded.model.generate_batch(inputs=inputs, generation_config=config,
                                          progress_bar=False)
    seconds = time.perf_counter() - start
    tick(len(outputs))
    tokens = sum(min(len(o.generated_tokens), n)
                 for o, n in zip(outputs.values(), work.lengths, strict=False))
    return Row(f"e: transformers generate_batch ({concurrency})", concurrency, len(outputs),
               tokens, seconds)


def describe_settings(config) -> str:
    """The engine's non-default numerics, for a row's label: "int8, int4 <= 4 rows,
    bfloat16 K/V"."""
    parts = [config.quantize] if config.quantize != "none" else []
    if config.int4_max_rows != "auto":
        parts.append(f"int4 <= {config.int4_max_rows} rows" if config.int4_max_rows
                     else "no int4 copies")
    if config.kv_cache_dtype != "auto":
        parts.append(f"{config.kv_cache_dtype} K/V")
    return ", ".join(parts)


def engine_run(loaded, work: Workload, concurrency: int, tick: Tick = _no_tick,
               settings: dict | None = None) -> Row:
    """(c): `concurrency` clients against a new engine; `settings` are further EngineConfig
    fields (benchmarks/engine_settings.py compares them)."""
    return EngineVariant(loaded, work, concurrency, settings)(tick)


class EngineVariant:
    """(c) at one concurrency, run `passes` times (the warm-up, then the timed pass) on one
    engine, as a server keeps its engine between bursts: its KV cache stays allocated
    (`engine.kv_cache_keep_s`), as the full stack's worker keeps it between (d)'s passes. The
    engine is shut down after the last pass."""

    def __init__(self, loaded, work: Workload, concurrency: int, settings: dict | None = None,
                 passes: int = 1):
        from ray_inference.config import EngineConfig

        self._loaded, self._work, self._concurrency = loaded, work, concurrency
        self._config = EngineConfig(max_batch_size=concurrency,
                                    max_queue=len(work.lengths) + 1, **(settings or {}))
        self._passes = passes
        self._engine = None

    def __call__(self, tick: Tick = _no_tick) -> Row:
        from ray_inference.engine import create_engine

        if self._engine is None:
            self._engine = create_engine(self._loaded, self._config)
        engine = self._engine
        result = _drive(engine, self._work, self._concurrency, tick)
        # As it ran: a CPU without fast int8 products declines int8 (engine/quantize.py).
        config = self._config
        took = config.model_copy(update={"quantize": config.quantize
                                         if engine.describe().get("int8_linears") else "none"})
        self._passes -= 1
        if self._passes <= 0:
            engine.shutdown()
            self._engine = None
        kind = describe_settings(took)
        kind = f" ({kind})" if kind else ""
        return Row.from_load(f"c: rayinfer engine{kind}, {self._concurrency} clients", result)


def _drive(engine, work: Workload, concurrency: int, tick: Tick) -> LoadResult:
    """`concurrency` clients, each sending its next request when the previous one ends."""
    from ray_inference.engine import GenerationRequest

    result = LoadResult(concurrency)
    lock = threading.Lock()
    start = time.perf_counter()

    def consume(stream, submitted: float, cold: bool) -> None:
        first = last = None
        tokens = 0
        for chunk in stream:
            if chunk.token_ids:
                last = time.perf_counter()
                first = first or last
                tokens += len(chunk.token_ids)
        with lock:
            result.record(submitted, first, last, tokens, cold)
            tick(1)

    pending = list(zip(work.messages, work.lengths, strict=True))
    pending.reverse()

    def client() -> None:
        cold = True
        while True:
            with lock:
                if not pending:
                    return
                messages, length = pending.pop()
            submitted = time.perf_counter()
            consume(engine.submit(GenerationRequest(messages=messages, max_tokens=length,
                                                    ignore_eos=True,
                                                    **work.sampling.request_fields())),
                    submitted, cold)
            cold = False

    threads = [threading.Thread(target=client) for _ in range(concurrency)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    result.seconds = time.perf_counter() - start
    return result


def gateway_run(url: str, model: str, work: Workload, concurrency: int,
                api_key: str | None, tick: Tick = _no_tick) -> Row:
    from ray_inference.bench.load import run_load

    result = asyncio.run(run_load(url, model, concurrency, work, api_key, progress=tick))
    return Row.from_load(f"d: full stack over HTTP, {concurrency} clients", result)


def _single_ttft(rows: list[Row], prefix: str) -> float | None:
    """The same variant's p50 TTFT with one client (its requests after the first)."""
    return next((r.ttft_steady_p50_s or r.ttft_p50_s for r in rows
                 if r.variant.startswith(prefix) and r.concurrency == 1), None)


def _seconds(value: float | None) -> str:
    return f"{value:.2f}s" if value is not None else "-"


def table(rows: list[Row], echo: Callable[[str], None]) -> None:
    """Ratios: tok/s against (a) and against (b) of the same size; p50 TTFT against the same
    variant's single-client p50 TTFT, for all requests and for the steady state (without each
    client's first request, which all arrive at once); last, the untimed first pass's tok/s."""
    base_a = next((r.tok_s for r in rows if r.variant.startswith("a")), None)
    width = max([40, *(len(r.variant) for r in rows)])
    echo(f"\n{'variant':<{width}} {'tok/s':>8} {'x (a)':>7} {'x (b)':>7} {'TTFT p50':>9} "
         f"{'x 1':>5} {'steady':>7} {'x 1':>5} {'errors':>6} {'1st pass':>8}")
    for row in rows:
        same_b = next((r.tok_s for r in rows if r.variant.startswith("b")
                       and r.concurrency == row.concurrency), None)
        single = _single_ttft(rows, row.variant[:1])
        ratio_a = f"{row.tok_s / base_a:.2f}" if base_a else "-"
        ratio_b = f"{row.tok_s / same_b:.2f}" if same_b else "-"
        ratios = [f"{value / single:.2f}" if single and value is not None else "-"
                  for value in (row.ttft_p50_s, row.ttft_steady_p50_s)]
        first_pass = f"{row.first_pass_tok_s:.1f}" if row.first_pass_tok_s is not None else "-"
        echo(f"{row.variant:<{width}} {row.tok_s:>8.1f} {ratio_a:>7} {ratio_b:>7} "
             f"{_seconds(row.ttft_p50_s):>9} {ratios[0]:>5} {_seconds(row.ttft_steady_p50_s):>7} "
             f"{ratios[1]:>5} {row.errors:>6} {first_pass:>8}")
    latency_table([r for r in rows if r.latency], echo, width)
    for row in rows:
        if row.errors:
            echo(f"\n{row.errors} of {row.requests + row.errors} requests of {row.variant} "
                 f"failed, e.g.: " + "; ".join(row.error_samples[:3]))


def latency_table(rows: list[Row], echo: Callable[[str], None], width: int) -> None:
    """Requests per second and the p50/p90/p99 latencies of (c) and (d): TTFT and end to end
    in seconds, inter-token latency (per request, over its tokens after the first) in ms."""
    if not rows:
        return
    echo(f"\n{'latency':<{width}} {'req/s':>6} {'TTFT p50/p90/p99 s':>20} "
         f"{'ITL p50/p90/p99 ms':>20} {'e2e p50/p90/p99 s':>20}")
    for row in rows:
        cells = []
        for name, scale, digits in (("ttft", 1, 2), ("itl", 1000, 1), ("e2e", 1, 2)):
            values = [row.latency[f"{name}_p{q}_s"] for q in (50, 90, 99)]
            cells.append("/".join("-" if v is None else f"{v * scale:.{digits}f}"
                                  for v in values))
        echo(f"{row.variant:<{width}} {row.latency['req_s']:>6.2f} {cells[0]:>20} "
             f"{cells[1]:>20} {cells[2]:>20}")


def plot(rows: list[Row], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    for prefix, label in (("b", "HF static batches"), ("c", "rayinfer engine"),
                          ("d", "full stack (HTTP)")):
        series = sorted((r.concurrency, r.tok_s, r.ttft_steady_p50_s) for r in rows
                        if r.variant.startswith(prefix))
        if not series:
            continue
        left.plot([s[0] for s in series], [s[1] for s in series], marker="o", label=label)
        if prefix != "b":
            right.plot([s[0] for s in series], [s[2] for s in series], marker="o", label=label)
    single = next((r for r in rows if r.variant.startswith("a")), None)
    if single:
        left.axhline(single.tok_s, color="grey", linestyle="--", label="one at a time")
    left.set(xlabel="concurrent requests", ylabel="tokens / s", title="Throughput")
    right.set(xlabel="concurrent requests", ylabel="seconds",
              title="p50 time to first token, steady state")
    for axis in (left, right):
        axis.legend()
        axis.grid(alpha=0.3)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)


def _in_float32(loaded, spec):
    """The model as the seed loaded it (transformers' default dtype, float32), from its files
    (`spec`): the stored weights may be finer than `loaded`'s."""
    import torch

    from ray_inference.models import loader

    if loaded.dtype == torch.float32:
        return loaded
    return loader.load(spec, "float32", loaded.device)


def run(concurrency: list[int], min_tokens: int, max_tokens: int, sequential: int, seed: int,
        url: str | None = None, model: str = "smollm2", api_key: str | None = None,
        out: Path | None = None, echo: Callable[[str], None] = print,
        progress: Callable[[str, int], Tick] | None = None, hf_cb: bool = False,
        requests_per_client: int = 2, engine_settings: dict | None = None,
        prompt_tokens: tuple[int, int] | None = None, http_only: bool = False,
        sampling: Sampling | None = None, warm_up: bool = True) -> list[Row]:
    """`warm_up`: every variant runs its work once untimed before the timed pass, as a server
    that has been up a while has (its tok/s goes in the row as `first_pass_tok_s`);
    `engine_settings`: EngineConfig fields for (c) (quantize, kv_cache_dtype);
    `prompt_tokens`: the range of prompt lengths (None: the bare questions); `sampling`: how
    every variant picks its tokens (None: greedy); `http_only`: only (d), the load generator
    against `url`, with no model loaded here (SmolLM2's tokenizer still draws and counts the
    prompts)."""
    from ray_inference.config import EngineConfig
    from ray_inference.models import loader, registry

    if http_only and not url:
        raise ValueError("an HTTP-only benchmark needs the gateway's URL")
    engine_settings = engine_settings or {}
    spec = registry.resolve("smollm2")
    loaded = None if http_only else loader.load(spec)
    tokenizer = loader.load_tokenizer(spec) if http_only else loaded.tokenizer
    top = max(concurrency)
    work = Workload.draw(requests_per_client * top, (min_tokens, max_tokens), seed,
                         prompt_tokens, tokenizer, sampling)
    count_tokens = chat_token_counter(tokenizer)
    prompt_lengths = [count_tokens(m) for m in work.messages]
    shape = (f"concurrency {concurrency}; prompts of {min(prompt_lengths)}-"
             f"{max(prompt_lengths)} tokens; {min_tokens}-{max_tokens} new tokens per prompt; "
             f"{requests_per_client} requests per client; {work.sampling}; seed {seed}")
    if http_only:
        echo(f"the full stack only: model {model} at {url}; {shape}")
        header = {"gateway": url, "model": model}
    else:
        import torch

        torch.manual_seed(seed)
        numerics = describe_settings(EngineConfig(**engine_settings)) or "the defaults"
        echo(f"smollm2 on {loaded.device} ({str(loaded.dtype).removeprefix('torch.')}; (a) in "
             f"float32, the seed's dtype; engine numerics: {numerics}), "
             f"{torch.get_num_threads()} threads; {shape}")
        header = {"device": str(loaded.device), "dtype": str(loaded.dtype),
                  "threads": torch.get_num_threads(), **({"gateway": url, "model": model}
                                                         if url else {})}
    local = None if http_only else (loaded, spec, engine_settings, hf_cb)
    gateway = (url, model, api_key) if url else None
    steps = _steps(work, concurrency, sequential, requests_per_client, local, gateway,
                   passes=2 if warm_up else 1)
    rows = []
    for name, count, step in steps:
        first = step(progress(f"{name} warm-up", count) if progress else _no_tick) \
            if warm_up else None
        row = step(progress(name, count) if progress else _no_tick)
        row.first_pass_tok_s = first.tok_s if first else None
        rows.append(row)
    table(rows, echo)
    if out:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps({
            **header, "min_tokens": min_tokens, "max_tokens": max_tokens,
            "prompt_tokens": [min(prompt_lengths), max(prompt_lengths)],
            "seed": seed, "requests_per_client": requests_per_client, "warm_up": warm_up,
            "sampling": work.sampling.request_fields(),
            "engine_settings": None if http_only else engine_settings,
            "rows": [r.to_dict() for r in rows]}, indent=2))
        plot(rows, out.with_suffix(".png"))
        echo(f"wrote {out} and {out.with_suffix('.png')}")
    return rows


# (name, requests, run): each variant is told its progress as requests finish.
Step = tuple[str, int, Callable[[Tick], Row]]


def _steps(work: Workload, concurrency: list[int], sequential: int, requests_per_client: int,
           local: tuple | None, gateway: tuple[str, str, str | None] | None,
           passes: int = 1) -> list[Step]:
    """The variants in the order they run: one client first, then each concurrency.
    `local`: (loaded, spec, engine_settings, hf_cb) for (a), (b), (c) and (e); `gateway`:
    (url, model, api_key) for (d); `passes`: how often each step is called (2 with a
    warm-up), so that (c) keeps one engine through them."""
    first = work.head(sequential)  # may hold fewer than `sequential`: the workload is short
    alone = len(first.lengths)
    steps: list[Step] = []
    if local:
        loaded, spec, settings, hf_cb = local
        # (a) and (b) run transformers' model as it comes; the engine changes the one it gets.
        engine_loaded = loaded.own_copy()
        # (a) is the seed's way, float32 included: here it is also the faster dtype for one
        # request at a time (docs/benchmarks.md), so the ratios to (a) do not flatter the
        # engine. Loaded when (a) first runs, once for its warm-up and timed passes.
        seed_model = functools.cache(lambda: _in_float32(loaded, spec))
        steps.append(("a", alone, lambda tick: one_at_a_time(seed_model(), first, tick)))
        # One client at a time: the single-request time to first token the others are held to.
        steps.append(("c1", alone, EngineVariant(engine_loaded, first, 1, settings, passes)))
    if gateway:
        url, model, key = gateway
        steps.append(("d1", alone, lambda tick: gateway_run(url, model, first, 1, key, tick)))
    for c in concurrency:
        part = work.head(requests_per_client * c)
        count = len(part.lengths)
        if local:
            steps.append((f"b{c}", count, lambda tick, part=part, c=c:
                          static_batches(loaded, part, c, tick)))
            steps.append((f"c{c}", count,
                          EngineVariant(engine_loaded, part, c, settings, passes)))
            if hf_cb:
                steps.append((f"e{c}", count, lambda tick, part=part, c=c:
                              hf_continuous(loaded, part, c, tick)))
        if gateway:
            steps.append((f"d{c}", count, lambda tick, part=part, c=c:
                          gateway_run(url, model, part, c, key, tick)))
    return steps
