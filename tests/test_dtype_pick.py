"""`engine.dtype: auto` on a CPU: the pick survives another process on the cores."""

import subprocess
import sys

import pytest
import torch

from ray_inference.models.loader import _cpu_flags, pick_dtype

CPU = torch.device("cpu")
# Another process multiplying on two threads, as a second worker loading beside this one does.
BUSY = ("import torch, time\ntorch.set_num_threads(2)\nx = torch.randn(256, 1024)\n"
        "w = torch.randn(1024, 1024)\nend = time.time() + 30\n"
        "while time.time() < end:\n    x @ w\n")


@pytest.mark.skipif(not _cpu_flags() & {"avx512_bf16", "amx_bf16"},
                    reason="without bf16 instructions auto takes fp32 and times nothing")
def test_auto_gives_the_threads_back():
    threads = torch.get_num_threads()
    assert pick_dtype("auto", CPU) in (torch.float32, torch.bfloat16)
    assert torch.get_num_threads() == threads


@pytest.mark.skipif("avx512_bf16" not in _cpu_flags() or "amx_bf16" in _cpu_flags(),
                    reason="the case measured: bf16 instructions without AMX")
def test_auto_keeps_fp32_without_amx_while_another_process_computes():
    """Without AMX bf16 products are about 1.6x slower here. Timed on two threads while
    another process took the cores, a fifth to three fifths of the picks were bf16 (the laptop
    demo's two workers started together, and one ran bf16); timed on one thread, none."""
    busy = subprocess.Popen([sys.executable, "-c", BUSY])
    try:
        threads = torch.get_num_threads()
        torch.set_num_threads(2)
        picks = [pick_dtype("auto", CPU) for _ in range(12)]
    finally:
        torch.set_num_threads(threads)
        busy.kill()
        busy.wait()
    assert picks == [torch.float32] * 12
