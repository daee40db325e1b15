"""Choosing the next token from the head's top-k candidates, on the coordinator.

Stages return k candidates (ids and logits), not the whole vocabulary; greedy takes the
first, sampling renormalises over the candidates. With k = 64 the candidates hold all but
a negligible tail of the probability mass for any sensible temperature.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from tabshard.errors import ConfigError

CANDIDATES = 64


@dataclass(frozen=True)
class SamplingParams:
    greedy: bool = True
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0 = all candidates
    seed: int | None = None

    def __post_init__(self):
        if not self.greedy:
            if not (self.temperature > 0):
                raise ConfigError(f"temperature must be > 0 when sampling, got {self.temperature}")
            if not (0 < self.top_p <= 1):
                raise ConfigError(f"top_p must be in (0, 1], got {self.top_p}")
            if not (0 <= self.top_k <= CANDIDATES):
                raise ConfigError(f"top_k must be in [0, {CANDIDATES}], got {self.top_k}")

    @property
    def candidates(self) -> int:
        return 1 if self.greedy else CANDIDATES


class Sampler:
    """Per-session sampler; its random state advances once per token, so a replayed session
    that re-samples from the same candidates must be given the same step index (see `choose`)."""

    def __init__(self, params: SamplingParams):
        self.params = params

    def choose(self, ids: np.ndarray, logits: np.ndarray, step: int) -> int:
        p = self.params
        if p.greedy:
            return int(ids[0])
        # a fresh generator per (seed, step) makes the choice a pure function of the
        # candidates and the step, so recovery after a failure re-draws identically
        rng = np.random.default_rng([p.seed if p.seed is not None else 0, step])
        ids, prob = self.distribution(ids, logits)
        return int(ids[rng.choice(len(ids), p=prob)])

    def distribution(self, ids: np.ndarray, logits: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """The distribution `choose` samples from: (candidate ids, probabilities summing to 1);
        greedy is all mass on the first. Speculative sampling verifies drafts against it."""
        p = self.params
        if p.greedy:
            return ids[:1], np.ones(1)
        z = logits.astype(np.float64) / p.temperature
        if p.top_k:
            z, ids = z[: p.top_k], ids[: p.top_k]
        prob = np.exp(z - z.max())
        prob /= prob.sum()
        if p.top_p < 1:
            keep = np.searchsorted(np.cumsum(prob), p.top_p) + 1
            prob, ids = prob[:keep] / prob[:keep].sum(), ids[:keep]
        return ids, prob
