"""Choosing the next token from the head's top-k candidates, on the coordinator.

Stages return k candidates (ids and logits), not the whole vocabulary; greedy takes the
first, sampling renormalises over the candidates. With k = 64 the candidates hold all but
a negligible tail of the probability mass for any sensible temperature.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from protocol.errors import ConfigError

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


# ---------------------------------------------------------------------- one set of defaults
# What a user gets when they give no sampling option, in the CLI (`generate`) and the HTTP API
# alike (docs/api.md lists them): OpenAI's defaults, and a fresh random seed each request.
USER_DEFAULTS = {"temperature": 1.0, "top_p": 1.0, "top_k": 0, "seed": None, "max_tokens": 256}
SEED_MAX = 2**63 - 1


def resolve_params(temperature: float | None = None, top_p: float | None = None, top_k: int | None = None,
                   seed: int | None = None, greedy: bool = False) -> SamplingParams:
    """User-facing sampling options -> SamplingParams, the same rules for every entry point.

    temperature 0 means greedy; `greedy` with a non-zero temperature is a contradiction and is
    refused (not silently resolved); top_p 0 is a nucleus holding only the most likely token,
    i.e. greedy. With no seed a fresh one is drawn, so that a "regenerate" differs, and it is
    kept in the params so that the caller can report it (the same seed replays the answer)."""
    import secrets

    t = USER_DEFAULTS["temperature"] if temperature is None else float(temperature)
    p = USER_DEFAULTS["top_p"] if top_p is None else float(top_p)
    k = USER_DEFAULTS["top_k"] if top_k is None else int(top_k)
    if not 0 <= t <= 2:
        raise ConfigError(f"temperature must be between 0 and 2, got {t}")
    if not 0 <= p <= 1:
        raise ConfigError(f"top_p must be between 0 and 1, got {p}")
    if not 0 <= k <= CANDIDATES:
        raise ConfigError(f"top_k must be between 0 and {CANDIDATES}, got {k}")
    if greedy and temperature is not None and t != 0:
        raise ConfigError(f"greedy decoding and temperature {t} contradict each other: give one (temperature 0 is greedy)")
    if seed is not None and not 0 <= int(seed) <= SEED_MAX:
        raise ConfigError(f"seed must be between 0 and {SEED_MAX}, got {seed}")
    greedy = greedy or t == 0 or p == 0
    seed = int(seed) if seed is not None else secrets.randbelow(SEED_MAX)
    return SamplingParams(greedy=greedy, temperature=t if t > 0 else 1.0, top_p=p if p > 0 else 1.0, top_k=k, seed=seed)


# ---------------------------------------------------------------------- full-vocabulary choice
@dataclass(frozen=True)
class TokenLogprob:
    """One chosen token's log-probability and the `top` most likely alternatives, exact
    log-softmax values over the whole vocabulary (the model's distribution, before
    temperature, as OpenAI and vLLM report them)."""

    token_id: int
    logprob: float
    top: tuple  # ((token_id, logprob), ...) best first


def log_softmax(logits: np.ndarray) -> np.ndarray:
    """log p over the whole vocabulary; the normaliser summed in float64 (49,152 terms)."""
    z = np.asarray(logits, np.float32)
    m = float(z.max())
    return z.astype(np.float64) - (m + np.log(np.exp(z - m, dtype=np.float32).sum(dtype=np.float64)))


class FullVocabChooser:
    """A session's token choice from the whole vocabulary's logits, for what top-k candidates
    cannot do: exact logprobs, and a grammar mask (a constraint may allow only tokens far
    down the ranking). Sampling itself is `Sampler` over the best CANDIDATES allowed tokens, so
    an unconstrained session draws exactly what it would from a stage's top-k.

    grammar: an object with `allowed(history) -> bool array | None` (None: anything), a pure
    function of the tokens so far, so a rewound or replayed session is masked again the same."""

    needs_full_logits = True

    def __init__(self, params: SamplingParams, top_logprobs: int | None = None, grammar=None):
        self.sampler = Sampler(params)
        self.top_logprobs = top_logprobs  # None: no logprobs; 0: the chosen token's only
        self.grammar = grammar

    def choose(self, logits: np.ndarray, history: list[int]) -> tuple[int, TokenLogprob | None]:
        masked = logits
        if self.grammar is not None:
            allowed = self.grammar.allowed(history)
            if allowed is not None:
                masked = np.where(allowed[: len(logits)], logits, -np.inf).astype(np.float32)
        from kernels.reference import topk

        ids, vals = topk(masked[None, :], CANDIDATES)
        finite = np.isfinite(vals[0])
        token = self.sampler.choose(ids[0][finite], vals[0][finite], len(history))
        if self.top_logprobs is None:
            return token, None
        lp = log_softmax(logits)
        n = self.top_logprobs
        best = np.argpartition(-lp, n - 1)[:n] if n else np.zeros(0, np.int64)  # the n best, then only they are sorted
        best = best[np.lexsort((best, -lp[best]))]  # best first, ties to the lower id
        return token, TokenLogprob(token, float(lp[token]), tuple((int(i), float(lp[i])) for i in best))
