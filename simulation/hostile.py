"""A scripted hostile tab: the tarpit of issue 16, speaking the real wire protocol over a real
socket (the one fake the house allows: no honest worker behaves like this).

It claims 0.001 ms a layer, 1 TiB of memory and every blob it was ever sent (`resume.have`, so it
downloads nothing), answers `ready` (with the right digest of the assignment's blob digests, or
"x"), heartbeats, never answers a step, and rejoins under a fresh name whenever it is dropped,
from one source address (127.0.0.0/8 is all loopback), so the coordinator's per-address backoff
is what stops it. Used by tests/test_hostile_tabs.py and benchmarks/bench_hostile.py.
"""
from __future__ import annotations

import asyncio
import hashlib
import time

import websockets

from protocol import wire


def digest_of(blob_shas: list[str]) -> str:
    """What `ready` proves: the sha256 of the assignment's blob digests, concatenated."""
    return hashlib.sha256("".join(blob_shas).encode()).hexdigest()


class ScriptedTarpit:
    def __init__(self, url: str, token: str, src: str, checksum_ok: bool = True):
        self.url, self.token, self.src, self.checksum_ok = url, token, src, checksum_ok
        self.joins = self.refused = 0
        self.shas: list[str] = []
        self.stop = False

    async def once(self, n: int) -> None:
        """One connection, until the coordinator drops it (or `stop`)."""
        async with websockets.connect(self.url, compression=None, max_size=None, open_timeout=10,
                                      local_addr=(self.src, 0)) as ws:
            await ws.send(wire.encode(wire.make("hello", worker_name=f"tarpit-{n}", token=self.token,
                                                capabilities={"kind": "python", "memory_bytes": 1 << 40},
                                                resume={"have": self.shas})))
            beat = 0
            while not self.stop:
                try:
                    m = wire.decode(await asyncio.wait_for(ws.recv(), 0.2))
                except asyncio.TimeoutError:
                    beat += 1
                    await ws.send(wire.encode(wire.make("heartbeat", seq=beat)))
                    continue
                if m["type"] == "welcome":
                    self.joins += 1
                elif m["type"] == "error" and m["code"] == "backoff":
                    self.refused += 1
                elif m["type"] == "measure":
                    await ws.send(wire.encode(wire.make("measurement", step_ms=0.001)))
                elif m["type"] == "assign":
                    shas = [c["sha256"] for c in m["chunks"]]
                    self.shas = sorted(set(self.shas) | set(shas))
                    await ws.send(wire.encode(wire.make("ready", assignment_id=m["assignment_id"],
                                                        layers=[m["layer_start"], m["layer_end"]],
                                                        checksum=digest_of(shas) if self.checksum_ok else "x")))

    async def run(self, seconds: float | None = None) -> None:
        """Rejoin in a loop for `seconds` (None: until `stop`)."""
        end = None if seconds is None else time.monotonic() + seconds
        n = 0
        while not self.stop and (end is None or time.monotonic() < end):
            n += 1
            try:
                if end is None:
                    await self.once(n)
                else:
                    await asyncio.wait_for(self.once(n), max(0.1, end - time.monotonic()))
            except (websockets.ConnectionClosed, asyncio.TimeoutError, OSError):
                pass
            await asyncio.sleep(0.1)
