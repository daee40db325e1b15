"""Client side of a simulation: requests streamed over the coordinator's /v1/stream WebSocket,
with the time of every token, and the fault-free reference tokens to compare them with.

A `rewind` message ({"type": "rewind", "index": k, "retract_chars": n, "reason": ...})
withdraws every token with index >= k already received (a worker caught lying computed them);
the next token has index k. The client applies it, so what is compared with the reference is
the final, corrected stream."""
from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field

import websockets

from protocol import wire

WORDS = ("the of and to in is for with on as by that it from at are this be or an which uses can each "
         "table hash list value key tab shard model token layer worker stage browser memory").split()


def make_prompt(seed: int, words: int) -> str:
    """A deterministic prompt of about `words` words (so about as many tokens)."""
    import random

    rng = random.Random(seed)
    return " ".join(rng.choice(WORDS) for _ in range(max(1, words)))


@dataclass
class RequestResult:
    request_id: str
    prompt: str
    max_tokens: int
    submitted: float
    ids: list = field(default_factory=list)
    times: list = field(default_factory=list)  # time.monotonic() of each token
    finished: float | None = None
    finish_reason: str | None = None
    error: str | None = None
    rewinds: int = 0  # rewind messages applied
    retracted: int = 0  # tokens they withdrew

    @property
    def ttft(self) -> float | None:
        return self.times[0] - self.submitted if self.times else None

    @property
    def itl(self) -> list[float]:
        return [b - a for a, b in zip(self.times, self.times[1:])]

    def to_dict(self) -> dict:
        return {"request_id": self.request_id, "max_tokens": self.max_tokens, "submitted": self.submitted,
                "tokens": len(self.ids), "finished": self.finished, "finish_reason": self.finish_reason,
                "error": self.error, "ttft_s": self.ttft, "rewinds": self.rewinds, "retracted": self.retracted}


async def stream_request(base: str, request_id: str, prompt: str, max_tokens: int, on_token=None,
                         timeout: float = 300.0) -> RequestResult:
    """One greedy request; `on_token(n)` is called (in this loop) after the n-th token."""
    res = RequestResult(request_id, prompt, max_tokens, time.monotonic())
    try:
        async with websockets.connect(base.replace("http", "ws") + "/v1/stream", compression=None,
                                      max_size=1 << 22, open_timeout=30) as ws:
            await ws.send(wire.encode(wire.make("generate", request_id=request_id, prompt=prompt,
                                                max_tokens=max_tokens, greedy=True)))
            deadline = time.monotonic() + timeout
            while True:
                m = wire.decode(await asyncio.wait_for(ws.recv(), max(0.1, deadline - time.monotonic())))
                if m["type"] == "rewind":
                    k = m["index"]
                    if not 0 <= k <= len(res.ids):
                        res.error = f"rewind to index {k} after {len(res.ids)} tokens"
                        break
                    res.rewinds += 1
                    res.retracted += len(res.ids) - k
                    del res.ids[k:], res.times[k:]
                elif m["type"] == "token":
                    if m["index"] != len(res.ids):
                        res.error = f"token index {m['index']} after {len(res.ids)} tokens (gap or duplicate)"
                        break
                    res.ids.append(int(m["token_id"]))
                    res.times.append(time.monotonic())
                    if on_token:
                        r = on_token(len(res.ids))
                        if asyncio.iscoroutine(r):
                            await r
                elif m["type"] == "done":
                    res.finish_reason = m["finish_reason"]
                    break
                else:
                    res.error = f"{m.get('code')}: {m.get('message')}"
                    break
    except (OSError, websockets.WebSocketException, asyncio.TimeoutError, wire.ProtocolError) as exc:
        res.error = f"{type(exc).__name__}: {exc}"
    res.finished = time.monotonic()
    return res


class Reference:
    """Fault-free tokens for a prompt: one single-process numpy run of the same weights (the
    cluster tests prove a fault-free cluster gives exactly these)."""

    def __init__(self, model_path: str | None = None):
        from tab_worker.generate import LocalGenerator
        from model.loader import open_model
        from model.tokenizer import GGUFTokenizer

        model = open_model(model_path)
        self.tokenizer = GGUFTokenizer(model)
        self.eos = model.config.eos_id
        self.gen = LocalGenerator(model.load_all(), backend="numpy", max_ctx=2048)
        self._cache: dict = {}

    _shared: dict = {}

    @classmethod
    def shared(cls, model_path: str | None = None) -> "Reference":
        """One per model per process: loading a model and dequantizing it costs seconds, and
        the report, the tests and their fixtures all want the same reference."""
        if model_path not in cls._shared:
            cls._shared[model_path] = cls(model_path)
        return cls._shared[model_path]

    def tokens(self, prompt: str, max_tokens: int) -> list[int]:
        key = (prompt, max_tokens)
        if key not in self._cache:
            out = []
            for t in self.gen.generate(self.tokenizer.encode(prompt), max_tokens):
                out.append(int(t))
                if t == self.eos:
                    break
            self._cache[key] = out
        return self._cache[key]


def differing_tokens(got: list[int], want: list[int]) -> int:
    """Positions where a finished stream differs from the reference (missing tokens count)."""
    n = max(len(got), len(want))
    return sum(1 for i in range(n) if i >= len(got) or i >= len(want) or got[i] != want[i])
