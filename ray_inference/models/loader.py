"""Load a resolved model onto a device with the dtype that measures fastest there."""

from __future__ import annotations

import copy
import dataclasses
import logging
import time
from dataclasses import dataclass
from typing import Any, Literal

import torch

from ray_inference.errors import ModelLoadError
from ray_inference.models.registry import ModelSource
from ray_inference.timing import fastest_seconds, one_thread

log = logging.getLogger(__name__)

Task = Literal["causal", "text2text", "fill-mask"]
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class LoadedModel:
    name: str
    task: Task
    model: Any
    tokenizer: Any
    device: torch.device
    dtype: torch.dtype
    context_length: int
    load_s: float
    # Counted at load: an engine may swap layers for ones that hold their weights otherwise.
    parameters: int = 0

    def __post_init__(self) -> None:
        self.parameters = self.parameters or sum(p.numel() for p in self.model.parameters())

    def own_copy(self) -> LoadedModel:
        """The same model (dtype and tokenizer too) with weights of its own: an engine changes
        the model it is given (its attention, packed weights)."""
        return dataclasses.replace(self, model=copy.deepcopy(self.model))

    @property
    def has_chat_template(self) -> bool:
        return bool(getattr(self.tokenizer, "chat_template", None))

    def describe(self) -> dict[str, Any]:
        return {"model": self.name, "task": self.task, "device": str(self.device),
                "dtype": str(self.dtype).removeprefix("torch."), "parameters": self.parameters,
                "context_length": self.context_length, "load_s": round(self.load_s, 2)}


def pick_device(prefer_gpu: bool = True) -> torch.device:
    if prefer_gpu and torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _linear_seconds(dtypes: tuple[torch.dtype, ...], width: int, rows: int = 64) -> list[float]:
    """Four (rows, width) x (width, 2 width) products per dtype, the fastest of several
    interleaved rounds."""
    pairs = {str(d): (torch.randn(rows, width, dtype=d), torch.randn(width * 2, width, dtype=d))
             for d in dtypes}

    def products(x: torch.Tensor, w: torch.Tensor):
        return lambda: [torch.nn.functional.linear(x, w) for _ in range(4)]

    best = fastest_seconds({name: products(*pair) for name, pair in pairs.items()})
    return [best[str(d)] for d in dtypes]


def _cpu_flags() -> set[str]:
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def pick_dtype(requested: str, device: torch.device, width: int = 576) -> torch.dtype:
    """`auto` measures on CPUs that have bf16 instructions (with AMX, bf16 prefills SmolLM2 3.4x
    faster); without them bf16 loses 1.5-6x, and a timing on a busy machine could pick it."""
    if requested != "auto":
        return DTYPES[requested]
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    flags = _cpu_flags()
    if flags and not flags & {"avx512_bf16", "amx_bf16"}:
        return torch.float32
    width = max(width, 512)  # tiny test models would measure noise
    with one_thread():  # bf16 is 1.6x slower on the Xeon without AMX: a stall could flip it
        fp32, bf16 = _linear_seconds((torch.float32, torch.bfloat16), width)
    return torch.bfloat16 if bf16 < fp32 * 0.9 else torch.float32


def detect_task(config: Any) -> Task:
    if getattr(config, "is_encoder_decoder", False):
        return "text2text"
    architectures = getattr(config, "architectures", None) or []
    if any(a.endswith("ForMaskedLM") for a in architectures) or config.model_type in (
        "bert", "distilbert", "roberta", "albert", "electra", "deberta", "deberta-v2",
    ):
        return "fill-mask"
    return "causal"


def _context_length(config: Any, tokenizer: Any) -> int:
    for key in ("max_position_embeddings", "n_positions", "n_ctx", "max_seq_len"):
        value = getattr(config, key, None)
        if isinstance(value, int) and value > 0:
            return value
    limit = getattr(tokenizer, "model_max_length", None)
    return limit if isinstance(limit, int) and 0 < limit < 1_000_000 else 512


def load(source: ModelSource, dtype: str = "auto", device: torch.device | None = None) -> LoadedModel:
    from transformers import (
        AutoConfig,
        AutoModelForCausalLM,
        AutoModelForMaskedLM,
        AutoModelForSeq2SeqLM,
    )

    device = device or pick_device()
    started = time.perf_counter()
    extra = _gguf(source)
    config = _read(source, AutoConfig.from_pretrained)
    tokenizer = load_tokenizer(source)
    task = detect_task(config)
    chosen = pick_dtype(dtype, device, getattr(config, "hidden_size", None) or 576)
    auto_class = {"causal": AutoModelForCausalLM, "text2text": AutoModelForSeq2SeqLM,
                  "fill-mask": AutoModelForMaskedLM}[task]
    try:
        model = auto_class.from_pretrained(source.path, local_files_only=True, dtype=chosen,
                                           **extra)
    except (OSError, ValueError) as exc:
        raise ModelLoadError(f"model {source.name}: cannot load weights from {source.path}: "
                             f"{str(exc).splitlines()[0]}") from None
    model.to(device).eval()
    return LoadedModel(source.name, task, model, tokenizer, device, chosen,
                       _context_length(config, tokenizer), time.perf_counter() - started)


def load_tokenizer(source: ModelSource) -> Any:
    """The model's tokenizer, with a pad token (its end of sequence, else its unknown token,
    where it has none): what `load` gives its LoadedModel, here without the weights."""
    from transformers import AutoTokenizer

    tokenizer = _read(source, AutoTokenizer.from_pretrained)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token or tokenizer.unk_token
    return tokenizer


def _gguf(source: ModelSource) -> dict[str, str]:
    return {"gguf_file": source.gguf_file} if source.gguf_file else {}


def _read(source: ModelSource, from_pretrained: Any) -> Any:
    """A config or tokenizer of the model's files, or a ModelLoadError naming them."""
    try:
        return from_pretrained(source.path, local_files_only=True, **_gguf(source))
    except (OSError, ValueError) as exc:
        raise ModelLoadError(f"model {source.name}: cannot read {source.path}: "
                             f"{str(exc).splitlines()[0]}") from None
