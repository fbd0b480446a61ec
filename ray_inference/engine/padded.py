"""Padded batches for text-to-text (T5) and fill-mask (BERT) models.

Whatever is waiting when a batch starts runs together in one padded forward (T5: one greedy
`generate`); each request gets its whole answer as one chunk. Sampling settings other than
max_tokens and stop do not apply to these tasks.
"""

from __future__ import annotations

import torch

from ray_inference.engine import sdpa
from ray_inference.engine.base import Engine, Pending
from ray_inference.engine.text import TextTracker
from ray_inference.engine.types import GenerationRequest
from ray_inference.errors import InvalidRequest


class PaddedEngine(Engine):
    def prepare_prompt(self, request: GenerationRequest) -> list[int]:
        if request.messages:
            text = "\n".join(m["content"] for m in request.messages if m["role"] != "system")
        else:
            text = request.prompt or ""
        if not text.strip():
            raise InvalidRequest("the prompt is empty", "messages" if request.messages else "prompt")
        if self.loaded.task == "fill-mask" and self.tokenizer.mask_token not in text:
            raise InvalidRequest(f"fill-mask model {self.loaded.name} needs the mask token "
                                 f"{self.tokenizer.mask_token} in the prompt", "prompt")
        return self.tokenizer(text)["input_ids"]

    def _max_new_tokens(self, request: GenerationRequest, prompt_len: int) -> int:
        if self.loaded.task == "fill-mask":
            super()._max_new_tokens(GenerationRequest(max_tokens=1), prompt_len)
            return 1
        # Encoder-decoder: the answer has its own positions, only the encoder is bounded.
        return super()._max_new_tokens(request, min(prompt_len, self.loaded.context_length - 1))

    def step(self) -> None:
        for request_id in self._take_cancelled():
            self._cancelled.add(request_id)  # let _take_waiting drop them
        batch = self._take_waiting(self.config.max_batch_size, self.config.max_tokens_in_flight)
        if not batch:
            return
        self._running = batch
        self.stats.steps += 1
        self.stats.batch_sizes[len(batch)] += 1
        self.stats.max_batch = max(self.stats.max_batch, len(batch))
        pad = self.tokenizer.pad_token_id or 0
        width = max(len(p.prompt_ids) for p in batch)
        ids = torch.full((len(batch), width), pad, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for i, p in enumerate(batch):
            ids[i, :len(p.prompt_ids)] = torch.tensor(p.prompt_ids)
            mask[i, :len(p.prompt_ids)] = 1
        ids, mask = ids.to(self.loaded.device), mask.to(self.loaded.device)
        with sdpa.new_shape_backends(self.loaded.device):  # every batch may be a new shape
            if self.loaded.task == "fill-mask":
                answers = self._fill_masks(batch, ids, mask)
            else:
                answers = self._generate(batch, ids, mask)
        for pending, (tokens, reason) in zip(batch, answers, strict=True):
            text = self._text(pending, tokens)
            self.stats.tokens += len(tokens)
            self._finish(pending, reason, text, tokens, len(tokens))
        self._running = []

    def _text(self, pending: Pending, tokens: list[int]) -> str:
        if self.loaded.task == "fill-mask":
            return self.tokenizer.decode(tokens, skip_special_tokens=True)
        tracker = TextTracker(self.tokenizer, pending.request.stop)
        text = "".join(tracker.add(t) for t in tokens)
        return text + tracker.flush()

    def _generate(self, batch: list[Pending], ids, mask):
        longest = max(p.max_new for p in batch)
        out = self.loaded.model.generate(input_ids=ids, attention_mask=mask,
                                         max_new_tokens=longest, do_sample=False)
        specials = set(self.tokenizer.all_special_ids)
        eos = self.tokenizer.eos_token_id
        answers = []
        for row, pending in zip(out.tolist(), batch, strict=True):
            tokens, reason = [], "length"
            for token in row[1:]:  # row[0] is the decoder start token
                if token == eos:
                    reason = "stop"
                    break
                if token not in specials:
                    tokens.append(token)
                if len(tokens) >= pending.max_new:
                    break
            answers.append((tokens, reason))
        return answers

    def _fill_masks(self, batch: list[Pending], ids, mask):
        logits = self.loaded.model(input_ids=ids, attention_mask=mask).logits
        filled = torch.where(ids == self.tokenizer.mask_token_id, logits.argmax(-1), ids)
        answers = []
        for i, pending in enumerate(batch):
            answers.append((filled[i, :len(pending.prompt_ids)].tolist(), "stop"))
        return answers
