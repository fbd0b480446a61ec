"""Inference engines: no Ray and no HTTP in here, so each can be tested and benchmarked alone.

`CausalEngine` does continuous batching for decoder-only models; `PaddedEngine` runs padded
batches for text-to-text (T5) and fill-mask (BERT) models. `create_engine` picks one by task.
Only the request and chunk types load with the package: the head imports them (through the
inference actor's handle) and must not pay for torch.
"""

from ray_inference.engine.types import Chunk, GenerationRequest


def create_engine(loaded, config):
    """An engine for a LoadedModel, sized by an EngineConfig."""
    if loaded.task == "causal":
        from ray_inference.engine.causal import CausalEngine

        return CausalEngine(loaded, config)
    from ray_inference.engine.padded import PaddedEngine

    return PaddedEngine(loaded, config)


def __getattr__(name: str):
    if name in ("Engine", "RequestStream"):  # they need torch: loaded on first use
        from ray_inference.engine import base

        return getattr(base, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = ["Chunk", "Engine", "GenerationRequest", "RequestStream", "create_engine"]
