"""The engine releases its creator's OpenMP team, so the engine thread's is the only one."""

import os
import threading

import pytest
import torch

from ray_inference.engine.openmp import _libgomp, release_calling_thread_team

needs_gomp = pytest.mark.skipif(_libgomp() is None or torch.get_num_threads() < 2,
                                reason="needs torch on GNU OpenMP with 2+ threads")


def _os_threads() -> set[str]:
    """This process's threads (other threads may come and go meanwhile: compare sets)."""
    return set(os.listdir("/proc/self/task"))


def _parallel_work() -> torch.Tensor:
    a = torch.randn(256, 256, generator=torch.Generator().manual_seed(0))
    return a @ a


@needs_gomp
def test_release_frees_the_calling_threads_team_and_torch_still_works():
    def run(result: dict) -> None:
        expected = _parallel_work()
        with_team = _os_threads()
        result["released"] = release_calling_thread_team()
        result["freed"] = len(with_team - _os_threads())
        # The next parallel region brings a team back, and computes what the old one did.
        result["same"] = torch.allclose(_parallel_work(), expected)

    result: dict = {}
    worker = threading.Thread(target=run, args=(result,))
    worker.start()
    worker.join()
    assert result["released"] is True
    assert result["freed"] >= 1  # the team's worker threads are gone
    assert result["same"]


@needs_gomp
def test_engine_start_releases_the_loading_threads_team(tiny_llama):
    from ray_inference.config import EngineConfig
    from ray_inference.engine import GenerationRequest, create_engine
    from ray_inference.models import loader, registry

    def run(result: dict) -> None:
        loaded = loader.load(registry.resolve(tiny_llama), "float32")
        _parallel_work()  # this loading thread owns a team now
        before = _os_threads()
        engine = create_engine(loaded, EngineConfig())
        # The loading thread's team workers left (and the engine thread started).
        result["gone"] = len(before - _os_threads())
        result["tokens"] = [t for c in engine.submit(GenerationRequest(
            prompt="hello", max_tokens=3, temperature=0)) for t in c.token_ids]
        engine.shutdown()

    result: dict = {}
    worker = threading.Thread(target=run, args=(result,))
    worker.start()
    worker.join()
    assert result["gone"] >= torch.get_num_threads() - 1
    assert len(result["tokens"]) == 3
