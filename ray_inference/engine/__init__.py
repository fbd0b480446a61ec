"""Inference engines: no Ray and no HTTP in here, so each can be tested and benchmarked alone.

`CausalEngine` does continuous batching for decoder-only models; `PaddedEngine` runs padded
batches for text-to-text (T5) and fill-mask (BERT) models. `create_engine` picks one by task.
"""

from ray_inference.engine.base import Engine, RequestStream
from ray_inference.engine.types import Chunk, GenerationRequest


def create_engine(loaded, config) -> Engine:
    """An engine for a LoadedModel, sized by an EngineConfig."""
    if loaded.task == "causal":
        from ray_inference.engine.causal import CausalEngine

        return CausalEngine(loaded, config)
    from ray_inference.engine.padded import PaddedEngine

    return PaddedEngine(loaded, config)


__all__ = ["Chunk", "Engine", "GenerationRequest", "RequestStream", "create_engine"]
