"""What the CPU weight rewrites (prepack.py, quantize.py) share: finding a model's
`nn.Linear` layers, swapping each for a replacement, handing the freed memory back, and the
replacement's view of the layer it took over."""

from __future__ import annotations

import contextlib
import ctypes
import gc
from collections.abc import Callable

import torch

Place = tuple[torch.nn.Module, str]  # a parent module and its child's attribute name


class LinearReplacement(torch.nn.Module):
    """What a replacement keeps of the `nn.Linear` it takes over (inference only)."""

    def __init__(self, linear: torch.nn.Linear):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.bias = linear.bias

    def check_width(self, x: torch.Tensor) -> None:
        """Fail on an input of the wrong width, as `F.linear` does, for kernels that would
        read it as rows of `in_features` values without a word."""
        if x.shape[-1] != self.in_features:
            raise RuntimeError(f"{type(self).__name__} of {self.in_features} inputs got "
                               f"{x.shape[-1]} (input shape {tuple(x.shape)})")

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"bias={self.bias is not None}")


def cpu_linears(model: torch.nn.Module,
                wanted: Callable[[torch.nn.Linear], bool] = lambda linear: True) -> list[Place]:
    """Where the model's CPU `nn.Linear` layers that `wanted` accepts sit."""
    return [(parent, name) for parent in model.modules()
            for name, child in parent.named_children()
            if isinstance(child, torch.nn.Linear) and child.weight.device.type == "cpu"
            and wanted(child)]


def output_layer(model: torch.nn.Module) -> torch.nn.Module | None:
    """The layer whose logits sampling reads, which the lossy rewrites leave as it is."""
    return model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None


def replace(places: list[Place], make: Callable[[torch.nn.Linear], torch.nn.Module],
            trim_each: bool = False) -> int:
    """Swap each layer for `make(layer)`; nothing else holds the replaced layers afterwards,
    so their memory is freed and handed back (`trim_each`: after every layer, not only at the
    end). Returns how many."""
    for parent, name in places:
        setattr(parent, name, make(getattr(parent, name)))
        if trim_each:
            trim_heap()
    gc.collect()
    trim_heap()
    return len(places)


def sample_width(width: int) -> int:
    """The width a load-time check times for a model of `width` inputs: what its results are
    cached by, so that every model narrower than 512 shares one measurement."""
    return max(width, 512)


def timing_sample(width: int, layers: int, rows: int
                  ) -> tuple[list[torch.nn.Linear], torch.Tensor]:
    """What the load-time kernel checks (prepack.py, quantize.py) time: `layers` fresh
    (2 width, width) fp32 layers without bias, weights drawn as a model's are (std 0.02), and
    an input of `rows` rows; at least 512 wide (tiny test models would measure noise), the
    same numbers every time."""
    generator = torch.Generator().manual_seed(0)
    width = sample_width(width)
    sample = [torch.nn.Linear(width, 2 * width, bias=False) for _ in range(layers)]
    with torch.no_grad():
        for layer in sample:
            layer.weight.normal_(std=0.02, generator=generator)
    return sample, torch.randn(rows, width, generator=generator)


def trim_heap() -> None:
    """glibc keeps freed pages; hand them back to the system."""
    with contextlib.suppress(OSError, AttributeError):  # not glibc: nothing to trim
        ctypes.CDLL("libc.so.6").malloc_trim(0)
