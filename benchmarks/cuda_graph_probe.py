"""Which CUDA graph capture set-ups work on this machine (each probe in its own process, since a
failed capture can leave CUDA state broken). Run: python benchmarks/cuda_graph_probe.py"""

from __future__ import annotations

import subprocess
import sys
import textwrap

PROBES = {
    "main thread": "run()",
    "worker thread": "in_thread(run)",
    "worker thread, inference_mode": "in_thread(lambda: inference(run))",
    "worker thread, inference_mode, MemPool":
        "in_thread(lambda: inference(lambda: run(pool=torch.cuda.MemPool().id)))",
    "worker thread, inference_mode, after a model forward":
        "in_thread(lambda: inference(lambda: (model_forward(), run())))",
    "main thread, after a model forward": "model_forward(); run()",
}
PRELUDE = textwrap.dedent("""
    import threading, torch
    def run(pool=None):
        x = torch.randn(256, 256, device="cuda")
        s = torch.cuda.Stream(); s.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(s):
            y = x @ x
        torch.cuda.current_stream().wait_stream(s)
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g, pool=pool):
            y = x @ x
        g.replay(); torch.cuda.synchronize()
        assert torch.allclose(y, x @ x)
    def inference(fn):
        with torch.inference_mode():
            fn()
    def in_thread(fn):
        errors = []
        def body():
            try:
                fn()
            except Exception as exc:
                errors.append(exc)
        t = threading.Thread(target=body); t.start(); t.join()
        if errors:
            raise errors[0]
    def model_forward():
        from transformers import LlamaConfig, LlamaForCausalLM
        with torch.device("cuda"):
            m = LlamaForCausalLM(LlamaConfig(hidden_size=64, intermediate_size=128,
                num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                vocab_size=100))
        m(torch.ones((2, 5), dtype=torch.long, device="cuda"))
""")

for name, body in PROBES.items():
    result = subprocess.run([sys.executable, "-c", PRELUDE + body], capture_output=True,
                            text=True, timeout=120)
    verdict = "ok" if result.returncode == 0 else result.stderr.strip().splitlines()[-1][:160]
    print(f"{name:<55} {verdict}", flush=True)
