"""Speculative decoding: draft tokens for a session, keep those the model itself would produce.

A single stream over N tabs pays N hops per token. The coordinator instead drafts up to k tokens,
sends the session's last token and the drafts through the pipeline as k+1 rows of one step, and
the head returns its candidates for every one of those rows (the step's `topk_rows`). Row j's
candidates decide token j exactly as a plain decode would (the session's sampler at the same
step index); drafts are kept while they equal what was decided, and the first disagreement is
replaced by the decided token. A trip yields at least one token and at most k+1, and they are
the tokens of plain decoding:

* greedy: a draft is kept when it is the row's argmax.
* sampling: both sources draft one token per position (prompt lookup; the draft model's
  argmax), so q is a point mass on the draft d. Speculative sampling's rule -- keep d with
  probability min(1, p(d)/q(d)) = p(d), else draw from the residual (p - q)+ normalised, i.e. p
  without d -- is then exactly "draw from p and keep d if the draw is d; else the draw is the
  token". Drawing with the session's own seeded generator gives the very tokens of plain
  sampling, seed for seed (tests/test_speculation.py also checks the distribution).

Draft sources sit behind ``DraftSource``: ``PromptLookup`` (no second model: the last n tokens
matched against the prompt and the text so far, proposing what followed them) and
``DraftModel`` (a small GGUF of the same vocabulary run by the coordinator's own compute); or,
in the draft-model mode without a DraftModel here, a worker holding one drafts (the scheduler
sends `draft` and parks the trip until `draft_result` or a deadline).
``AdaptiveK`` picks each session's k from its recent acceptance; k = 0 when drafts stop paying.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import numpy as np

from model.drafting import DraftRunner
from model.sampling import Sampler

MODES = ("off", "prompt-lookup", "draft-model")


# ---------------------------------------------------------------------- draft sources
@dataclass(frozen=True)
class Draft:
    """Tokens proposed to follow a context, one choice per position (a point-mass q)."""

    tokens: list[int]


class DraftSource(Protocol):
    def propose(self, session_id: str, context: list[int], k: int, sampler: Sampler, step: int) -> Draft:
        """Up to k tokens to follow `context` (prompt + tokens so far); `step` is the index of the
        first drafted token in the session's output (the sampler's step)."""

    def forget(self, session_id: str) -> None:
        """The session ended: drop whatever is kept for it."""


class PromptLookup:
    """Drafts by lookup: find the latest earlier occurrence of the context's last n tokens
    (n from max_ngram down to min_ngram) and propose the tokens that followed it. Costs a scan
    of the context per trip (~20 us for 2,000 tokens) and no model."""

    def __init__(self, max_ngram: int = 3, min_ngram: int = 1):
        if not 1 <= min_ngram <= max_ngram:
            raise ValueError(f"ngram sizes must satisfy 1 <= min ({min_ngram}) <= max ({max_ngram})")
        self.max_ngram, self.min_ngram = max_ngram, min_ngram

    def propose(self, session_id: str, context: list[int], k: int, sampler: Sampler | None = None, step: int = 0) -> Draft:
        return Draft(lookup(context, k, self.max_ngram, self.min_ngram))

    def forget(self, session_id: str) -> None:
        pass


def lookup(context: list[int], k: int, max_ngram: int = 3, min_ngram: int = 1) -> list[int]:
    """What followed the latest earlier occurrence of the longest suffix of `context` (at most
    max_ngram, at least min_ngram tokens) that occurred before; up to k tokens."""
    if k <= 0 or len(context) < min_ngram + 1:
        return []
    a = np.asarray(context, dtype=np.int64)
    size = len(a)
    for n in range(min(max_ngram, size - 1), min_ngram - 1, -1):
        # windows starting at 0 .. size-n-1: each has a token after it, and none is the suffix itself
        win = np.lib.stride_tricks.sliding_window_view(a[:-1], n)
        hits = np.flatnonzero((win == a[size - n:]).all(axis=1))
        if len(hits):
            start = int(hits[-1]) + n
            return a[start:start + k].tolist()
    return []


class DraftModel:
    """Drafts with a small model of the same vocabulary, run on the coordinator's own compute:
    its argmax at each position (a point-mass q, whatever the session's sampling). The loop --
    each session's KV cache here, rolled back to the context's common prefix -- is
    model/drafting.py's DraftRunner, the one a worker holding a draft model runs too."""

    def __init__(self, weights, compute, max_ctx: int | None = None):
        """compute: the coordinator's own compute (tab_worker.local.LocalCompute, from `serve`),
        which makes the backend and runs it."""
        self.config = weights.config
        self.max_ctx = min(max_ctx or self.config.context, self.config.context)
        self.runner = DraftRunner(compute.draft_backend(weights, self.max_ctx), weights.embedding,
                                  compute.next_token, self.max_ctx)

    @property
    def backend(self):
        return self.runner.backend

    def propose(self, session_id: str, context: list[int], k: int, sampler: Sampler | None = None, step: int = 0) -> Draft:
        return Draft(self.runner.propose(session_id, context, k))

    def forget(self, session_id: str) -> None:
        self.runner.forget(session_id)


# ---------------------------------------------------------------------- how many drafts
@dataclass
class AdaptiveK:
    """A session's draft length from its recent acceptance. `rate` estimates the chance that a
    draft token is accepted given the ones before it were (an average over recent trips, and
    over drafts that were proposed but not sent: whether their first token came true is known
    for free). k maximises the tokens a trip yields per unit of its cost, E[tokens] =
    (1 - rate^(k+1)) / (1 - rate) against 1 + row_cost * k, so it falls to 0 when drafts stop
    paying and comes back when the lookup starts hitting again."""

    max_k: int
    row_cost: float = 0.15  # a drafted row's cost relative to a whole trip (Speculator measures it)
    rate: float = 0.5
    memory: float = 0.8  # weight of the past in `rate`
    trips: int = 0
    drafted: int = 0
    accepted: int = 0
    tokens: int = 0

    def k(self) -> int:
        best, best_gain = 0, 1.0
        r = min(self.rate, 0.999)
        for k in range(1, self.max_k + 1):
            gain = (1 - r ** (k + 1)) / (1 - r) / (1 + self.row_cost * k)
            if gain > best_gain * 1.02:  # a marginal gain is noise: keep the shorter draft
                best, best_gain = k, gain
        return best

    def observe(self, sent: int, accepted: int, first_came_true: bool | None = None) -> None:
        """A trip verified `sent` drafts and kept `accepted` of them; or (sent 0) a draft was
        proposed but not sent, and its first token `first_came_true`."""
        if sent:
            # accepted successes, then one failure unless every draft was kept
            trials = accepted + (1 if accepted < sent else 0)
            for i in range(trials):
                self.rate = self.memory * self.rate + (1 - self.memory) * (1.0 if i < accepted else 0.0)
        elif first_came_true is not None:
            self.rate = self.memory * self.rate + (1 - self.memory) * (1.0 if first_came_true else 0.0)

    def count_trip(self, sent: int, accepted: int, tokens: int) -> None:
        self.trips += 1
        self.drafted += sent
        self.accepted += accepted
        self.tokens += tokens

    def to_dict(self) -> dict:
        """/status: k now; over the trips that carried drafts, the share of drafts kept and the
        tokens each trip decided (trips without drafts decide one token each)."""
        return {"k": self.k(), "acceptance_rate": round(self.accepted / self.drafted, 3) if self.drafted else None,
                "tokens_per_trip": round(self.tokens / self.trips, 3) if self.trips else None,
                "trips": self.trips, "drafted": self.drafted, "accepted": self.accepted}


# ---------------------------------------------------------------------- acceptance
def decide_trip(sampler: Sampler, step: int, rows: list[tuple[np.ndarray, np.ndarray]], draft: Draft) -> list[int]:
    """The tokens a trip decides from the head's candidates for its rows (row j follows the j-th
    draft; row 0 the session's last token): each row's token is the sampler's choice at step
    `step + j`, and the trip stops after the first that differs from its draft, or after the row
    past the last draft (the bonus token). len(result) - 1 drafts were kept."""
    out = []
    for j, (ids, logits) in enumerate(rows):
        token = sampler.choose(ids, logits, step + j)
        out.append(token)
        if j >= len(draft.tokens) or token != draft.tokens[j]:
            break
    return out


# ---------------------------------------------------------------------- per-session bookkeeping
# one trip in this many goes the other way: a plain trip re-times the baseline while drafts pay
# (load and batch sizes move it), a one-draft trip re-measures drafts while they do not
CALIBRATE_EVERY = 32


class Speculator:
    """The coordinator's speculation: a draft source, each session's AdaptiveK, and the totals
    /status shows. The scheduler asks ``draft`` for a trip's drafts and tells ``verified`` what
    the head kept of them."""

    def __init__(self, mode: str = "off", max_k: int = 6, source: DraftSource | None = None, row_cost: float = 0.15):
        """row_cost: a drafted row's cost relative to a plain trip until trips measure it (see
        `trip_done`): on a CPU tab an extra row costs a good part of a layer's compute, on a GPU
        tab or behind a Wi-Fi hop next to nothing."""
        if mode not in MODES:
            raise ValueError(f"speculation must be one of {', '.join(MODES)}, got {mode!r}")
        self.mode, self.max_k, self.row_cost = mode, max_k, row_cost
        self.source = source if source is not None else (PromptLookup() if mode == "prompt-lookup" else None)
        self.sessions: dict[str, AdaptiveK] = {}
        self._shadow: dict[str, int] = {}  # session -> the token a draft not sent guessed next
        self._started: dict[str, tuple[float, int]] = {}  # session -> (its trip's start, drafted rows)
        self.plain_trip_ms: float | None = None  # a trip without drafts, smoothed
        self._timed_plain = 0  # plain trips timed so far
        self._asked = 0  # trips whose k was chosen (every CALIBRATE_EVERY-th goes the other way)
        self.totals = {"trips": 0, "drafted": 0, "accepted": 0, "tokens": 0, "rollbacks": 0}
        # the draft-model mode without a model here: a worker holding one drafts (the scheduler
        # asks it with a `draft` message and waits for its `draft_result` up to a deadline)
        self.remote = mode == "draft-model" and self.source is None
        self.drafter: str | None = "coordinator" if self.source is not None else None  # who drafted last (/status)
        self.remote_sessions: dict[str, str] = {}  # session -> the worker holding its draft cache
        self.dropped: list[tuple[str, str]] = []  # (worker, session): ended sessions whose draft cache it should drop

    @property
    def on(self) -> bool:
        return self.mode != "off" and (self.source is not None or self.remote) and self.max_k > 0

    def draft(self, session_id: str, context: list[int], sampler: Sampler, step: int, limit: int,
              now: float | None = None) -> Draft:
        """Drafts to follow `context` (its last token is the one the trip carries), at most
        `limit` (the room left in the session's output and context); `now`: the trip starts (its
        cost is measured when `trip_done` is told)."""
        if not self.on:
            return Draft([])
        d = self._draft(session_id, context, sampler, step, limit)
        if now is not None:
            self._started[session_id] = (now, len(d.tokens))
        return d

    def _draft(self, session_id: str, context: list[int], sampler: Sampler, step: int, limit: int) -> Draft:
        k = self.draft_k(session_id, context, limit)
        return self.source.propose(session_id, context, k, sampler, step) if k > 0 else Draft([])

    def draft_k(self, session_id: str, context: list[int], limit: int) -> int:
        """How many drafts the session's next trip should carry (its AdaptiveK, at most `limit`)."""
        a = self.sessions.setdefault(session_id, AdaptiveK(self.max_k, self.row_cost))
        a.row_cost = self.row_cost
        guess = self._shadow.pop(session_id, None)
        if guess is not None:
            a.observe(0, 0, context[-1] == guess)
        k = min(a.k(), limit)
        self._asked += 1
        probe = self._asked % CALIBRATE_EVERY == 0
        if k > 0 and (self._timed_plain == 0 or probe):
            return 0  # a plain trip: what drafts cost is measured against it
        if k <= 0 and probe and limit > 0 and not isinstance(self.source, PromptLookup):
            return 1  # a draft model has no free guess to learn from: one draft re-measures whether drafts pay
        if k <= 0 and limit > 0 and isinstance(self.source, PromptLookup):
            # a draft not sent costs a lookup, not a row: learn from it whether drafts pay again
            guess = self.source.propose(session_id, context, 1)
            if guess.tokens:
                self._shadow[session_id] = guess.tokens[0]
        return max(0, k)

    def started(self, session_id: str, now: float, drafted: int) -> None:
        """A trip of the session left with `drafted` drafts (a worker's, which `draft` did not
        make): `trip_done` times it."""
        self._started[session_id] = (now, drafted)

    def trip_done(self, session_id: str, now: float) -> None:
        """The trip `draft` started for this session came back from the head: its time teaches
        what a trip costs without drafts and what each drafted row adds to it (relative), which
        AdaptiveK weighs against the acceptance. Trips far slower than plain ones (a recovery
        replayed in between) teach nothing."""
        started = self._started.pop(session_id, None)
        if started is None:
            return
        t0, drafted = started
        ms = (now - t0) * 1000
        plain = self.plain_trip_ms
        if drafted == 0:
            self._timed_plain += 1
            if ms > 0 and (plain is None or ms < 10 * plain):
                self.plain_trip_ms = ms if plain is None else 0.8 * plain + 0.2 * ms
        elif plain and ms < 10 * plain * (1 + drafted):
            observed = min(4.0, max(0.0, (ms / plain - 1) / drafted))
            self.row_cost = 0.7 * self.row_cost + 0.3 * observed

    def verified(self, session_id: str, sent: int, kept: int, tokens: int) -> None:
        a = self.sessions.setdefault(session_id, AdaptiveK(self.max_k, self.row_cost))
        a.observe(sent, kept)
        a.count_trip(sent, kept, tokens)
        t = self.totals
        t["trips"] += 1
        t["drafted"] += sent
        t["accepted"] += kept
        t["tokens"] += tokens
        t["rollbacks"] += kept < sent

    def forget(self, session_id: str) -> None:
        self.sessions.pop(session_id, None)
        self._shadow.pop(session_id, None)
        self._started.pop(session_id, None)
        if self.source is not None:
            self.source.forget(session_id)
        wid = self.remote_sessions.pop(session_id, None)
        if wid is not None:
            self.dropped.append((wid, session_id))

    def session_status(self, session_id: str) -> dict | None:
        a = self.sessions.get(session_id)
        return None if a is None else a.to_dict()

    def status(self) -> dict:
        t = self.totals
        return {"mode": self.mode, "max_k": self.max_k, "drafter": self.drafter, **t, "row_cost": round(self.row_cost, 4),
                "plain_trip_ms": None if self.plain_trip_ms is None else round(self.plain_trip_ms, 3),
                "acceptance_rate": round(t["accepted"] / t["drafted"], 3) if t["drafted"] else None,
                "tokens_per_trip": round(t["tokens"] / t["trips"], 3) if t["trips"] else None}


def make_speculator(mode: str, max_k: int, draft: DraftModel | None = None) -> Speculator:
    """The Speculator `serve` settings ask for; the draft-model mode drafts with `draft`, which
    `serve` loads (any GGUF of the served model's vocabulary, on the coordinator's own compute),
    or without one, with a worker's draft model (`tabshard worker --draft-model`)."""
    return Speculator(mode, max_k, draft if mode == "draft-model" else None)
