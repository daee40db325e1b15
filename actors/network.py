"""A simulated tab's network: every frame it sends and receives crosses a link with one-way
latency, jitter and bandwidth (actors/profiles.py: NETWORKS), as a browser tab on a home or
office network would see.

`Link` is one direction's schedule, pure (fed the time, returns the arrival time): a frame
starts onto the wire when the frames before it have left (it is serialised at the bandwidth:
nbytes * 8 / bits per second), then arrives latency + a jitter draw later, and never before
the frame sent ahead of it (a WebSocket is one TCP stream: jitter delays, never reorders).
`NetworkedSocket` is the asyncio adapter around a websockets connection: `send` returns at
once (the bytes are in the socket's buffer) and a sender task writes each frame at its arrival
time; a receiver task reads frames as they come and the tab's `async for` gets each one at
its arrival time. The two directions are independent, as on a full-duplex link: a weight
download filling the downlink never holds back a heartbeat going up. simulation/network.py
applies the same `Link` on the coordinator's side for workers that are not simulated tabs.
"""
from __future__ import annotations

import asyncio
import contextlib
import random

from actors.profiles import NetworkProfile


class Link:
    """One direction of a link: when each frame arrives, given when it was sent and its size."""

    def __init__(self, net: NetworkProfile, rng: random.Random | None = None):
        self.net = net
        self.rng = rng or random.Random(0)
        self._wire_free_at = float("-inf")  # when the frames queued so far have been serialised
        self._last_arrival = float("-inf")

    def arrival(self, now: float, nbytes: int) -> float:
        """The time (same clock as `now`, seconds) at which a frame of `nbytes` sent at `now` arrives."""
        start = max(now, self._wire_free_at)
        bps = self.net.bandwidth_mbps * 1e6 if self.net.bandwidth_mbps else 0.0
        self._wire_free_at = start + (nbytes * 8 / bps if bps else 0.0)
        jitter = self.rng.uniform(0.0, self.net.jitter_ms) if self.net.jitter_ms else 0.0
        at = max(self._wire_free_at + (self.net.latency_ms + jitter) / 1000, self._last_arrival)
        self._last_arrival = at
        return at


class NetworkedSocket:
    """A websockets connection seen through a simulated network (see the module's docstring).
    Everything but send, close and iteration is the wrapped connection's (close_code, ...)."""

    _CLOSE = object()  # in the send queue: close after the frames queued before it

    def __init__(self, ws, net: NetworkProfile, seed: int = 0):
        rng = random.Random(seed)
        self._ws = ws
        self.net = net
        self.up, self.down = Link(net, rng), Link(net, rng)
        self._loop = asyncio.get_running_loop()
        self._out: asyncio.Queue = asyncio.Queue()
        self._in: asyncio.Queue = asyncio.Queue()
        self._sender = asyncio.create_task(self._send_loop())
        self._receiver = asyncio.create_task(self._receive_loop())

    def __getattr__(self, name):
        return getattr(self._ws, name)

    async def send(self, data) -> None:
        self._out.put_nowait((self.up.arrival(self._loop.time(), len(data)), data))

    async def close(self, code: int = 1000, reason: str = "") -> None:
        """Close after the frames already sent have gone out (a bye before a close arrives first)."""
        if self._sender.done():
            await self._ws.close(code=code, reason=reason)
            return
        done = self._loop.create_future()
        self._out.put_nowait((self.up.arrival(self._loop.time(), 0), (self._CLOSE, code, reason, done)))
        await asyncio.shield(done)

    async def _send_loop(self) -> None:
        while True:
            at, data = await self._out.get()
            if data is None:  # the socket closed (the receiver saw it): nothing more goes out
                self._drain_closes()
                return
            await asyncio.sleep(max(0.0, at - self._loop.time()))
            if isinstance(data, tuple) and data[0] is self._CLOSE:
                _, code, reason, done = data
                with contextlib.suppress(Exception):
                    await self._ws.close(code=code, reason=reason)
                if not done.done():
                    done.set_result(None)
                continue
            try:
                await self._ws.send(data)
            except Exception:  # the socket closed: what was still on the wire is lost, as on a real link
                self._drain_closes()
                return

    def _drain_closes(self) -> None:
        while not self._out.empty():
            _, data = self._out.get_nowait()
            if isinstance(data, tuple) and data and data[0] is self._CLOSE and not data[3].done():
                data[3].set_result(None)

    async def _receive_loop(self) -> None:
        end = None
        try:
            async for data in self._ws:
                self._in.put_nowait((self.down.arrival(self._loop.time(), len(data)), data))
        except Exception as exc:  # an abnormal close: raised to the reader after the frames before it
            end = exc
        self._in.put_nowait((self.down.arrival(self._loop.time(), 0), end))
        self._out.put_nowait((0.0, None))

    def __aiter__(self):
        return self._frames()

    async def _frames(self):
        while True:
            at, data = await self._in.get()
            await asyncio.sleep(max(0.0, at - self._loop.time()))
            if data is None:
                return
            if isinstance(data, BaseException):
                raise data
            yield data
