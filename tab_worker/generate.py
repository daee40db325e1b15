"""Single-process generation: embedding and sampling as the coordinator does them, every layer and the
head in one backend (the reference that cluster runs are checked against, and the benchmarks' baseline)."""
from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass, field

from model.embedding import check_request, embed
from model.sampling import Sampler, SamplingParams
from protocol.model_types import ModelConfig, SessionSlice
from tab_worker.backends import forward_topk, make_backend


@dataclass
class GenerationStats:
    prompt_tokens: int = 0
    prefill_s: float = 0.0
    decode_s: float = 0.0
    generated: int = 0
    step_times: list[float] = field(default_factory=list)

    @property
    def decode_tok_s(self) -> float:
        return (self.generated - 1) / self.decode_s if self.generated > 1 and self.decode_s > 0 else 0.0

    @property
    def prefill_tok_s(self) -> float:
        return self.prompt_tokens / self.prefill_s if self.prefill_s > 0 else 0.0


class LocalGenerator:
    def __init__(self, weights, backend: str = "numpy", max_ctx: int | None = None, **device_options):
        self.config: ModelConfig = weights.config
        self.embedding = weights.embedding
        self.max_ctx = min(max_ctx or self.config.context, self.config.context)
        self.backend = make_backend(
            backend, self.config, dict(enumerate(weights.layers)), weights.head, self.max_ctx, **device_options
        )
        self._next_session = 0

    def generate(self, prompt_ids: list[int], max_tokens: int, params: SamplingParams = SamplingParams(),
                 stats: GenerationStats | None = None, stop_at_eos: bool = True) -> Iterator[int]:
        check_request(self.config, prompt_ids, max_tokens)
        max_tokens = min(max_tokens, self.max_ctx - len(prompt_ids))
        stats = stats if stats is not None else GenerationStats()
        stats.prompt_tokens = len(prompt_ids)
        sampler = Sampler(params)
        sid = f"local-{self._next_session}"
        self._next_session += 1
        try:
            t0 = time.perf_counter()
            ids, logits = forward_topk(self.backend, [SessionSlice(sid, 0, len(prompt_ids))], embed(self.embedding, prompt_ids),
                                       params.candidates)
            stats.prefill_s = time.perf_counter() - t0
            pos = len(prompt_ids)
            t_decode = time.perf_counter()
            for step in range(max_tokens):
                if step:
                    t = time.perf_counter()
                    ids, logits = forward_topk(self.backend, [SessionSlice(sid, pos, 1)], embed(self.embedding, [token]),
                                               params.candidates)
                    pos += 1
                    stats.step_times.append(time.perf_counter() - t)
                token = sampler.choose(ids[0], logits[0], step)
                stats.generated += 1
                stats.decode_s = time.perf_counter() - t_decode
                yield token
                if stop_at_eos and token == self.config.eos_id:
                    return
        finally:
            self.backend.drop_session(sid)
