"""The asyncio adapter of a Python tab worker: a WebSocket to the coordinator, a heartbeat
timer, and one compute thread that runs `TabWorker.handle` for each message in order.

Heartbeats come from the event loop, not the compute thread, so a long step never looks
like a death. The exception is a decode step known to be quick (its range's last one took
under a fifth of the heartbeat interval) arriving while the compute thread is idle: it runs
on the event loop and its result is sent from there, because the two thread hand-offs (wake
the compute thread, then wake the loop with the result) cost ~0.4 ms a hop, measured in a
4-stage pipeline on this 2-vCPU host: a third of what a hop cost beyond compute.

The connection is re-made with backoff when it drops (a coordinator restart, or fencing after
a freeze): the worker keeps its weight blobs and reports them in `hello`, so nothing is
downloaded twice.
"""
from __future__ import annotations

import asyncio
import logging
import random
import ssl
import threading
from concurrent.futures import ThreadPoolExecutor

import websockets

from tab_worker.worker import TabWorker
from tabshard import wire
from tabshard.errors import TabshardError

log = logging.getLogger("tabshard.worker")
MAX_FRAME = 64 << 20
NAME_MISMATCH = {62, 64}  # OpenSSL: X509_V_ERR_HOSTNAME_MISMATCH, X509_V_ERR_IP_ADDRESS_MISMATCH


class WorkerConnection:
    def __init__(self, worker: TabWorker, url: str, reconnect: bool = True, cafile: str | None = None):
        """cafile: a PEM certificate (bundle) to trust for a wss:// coordinator, e.g. its own
        self-signed certificate; without it the system's trust store decides."""
        self.worker = worker
        self.url = url
        self.reconnect = reconnect
        try:
            self._tls = {"ssl": ssl.create_default_context(cafile=cafile)} if cafile else {}
        except (OSError, ssl.SSLError) as exc:
            raise TabshardError(f"--cafile {cafile}: not a readable PEM certificate ({exc})") from None
        self._exec = ThreadPoolExecutor(max_workers=1, thread_name_prefix="tab-compute")
        self._stop = asyncio.Event()
        self.connected = asyncio.Event()
        self.sessions_joined = 0
        # fault hooks (simulation): drop everything both ways while set
        self.partitioned = threading.Event()
        self._ws = None

    async def run(self) -> None:
        backoff = 0.1
        while not self._stop.is_set():
            try:
                async with websockets.connect(self.url, max_size=MAX_FRAME, compression=None, ping_interval=None,
                                              open_timeout=10, **self._tls) as ws:
                    backoff = 0.1
                    await self._session(ws)
            except ssl.SSLCertVerificationError as exc:  # permanent: retrying cannot fix trust
                hint = ("connect to a host name or address that the certificate names" if exc.verify_code in NAME_MISMATCH
                        else "pass --cafile with the coordinator's certificate (PEM) to trust it")
                raise TabshardError(f"{self.url}: certificate verify failed ({exc.verify_message}): {hint}") from None
            except (OSError, websockets.WebSocketException, asyncio.TimeoutError) as exc:
                log.info("connection to %s lost: %s", self.url, exc)
            self.connected.clear()
            if not self.reconnect or self._stop.is_set():
                return
            await asyncio.sleep(backoff * (1 + random.random() * 0.2))
            backoff = min(backoff * 2, 5.0)

    def stop(self) -> None:
        self._stop.set()

    async def evict(self, reason: str = "evicted by the browser", code: int = 4001) -> None:
        """The browser discards the tab: the socket closes with a reason and nothing reconnects."""
        self._stop.set()
        if self._ws is not None:
            await self._ws.close(code=code, reason=reason)

    async def send(self, m: dict) -> None:
        """Send a message outside the request/reply flow (e.g. a memory-pressure refusal)."""
        if self._ws is not None:
            await self._ws.send(wire.encode(m))

    async def _session(self, ws) -> None:
        loop = asyncio.get_running_loop()
        outbox: asyncio.Queue = asyncio.Queue()
        self._ws = ws
        await ws.send(wire.encode(self.worker.hello()))
        self.sessions_joined += 1

        in_thread = 0  # messages handed to the compute thread and not answered yet

        def deliver(replies):
            nonlocal in_thread
            in_thread -= 1
            for r in replies:
                outbox.put_nowait(r)

        def answer(m) -> list:
            try:
                return self.worker.handle(m)
            except Exception as exc:  # our bug: report it as an error message, keep serving
                log.exception("handling %s failed", m.get("type"))
                return [wire.make("error", code="worker_failure", field=None, message=f"{type(exc).__name__}: {exc}",
                                  step_id=m.get("step_id", -1))]

        def handle(m):
            loop.call_soon_threadsafe(deliver, answer(m))

        async def writer():
            while True:
                m = await outbox.get()
                if not self.partitioned.is_set():
                    await ws.send(wire.encode(m, validate=False))

        async def heartbeats():
            seq = 0
            while True:
                await asyncio.sleep(self.worker.heartbeat_ms / 1000)
                seq += 1
                if not self.partitioned.is_set():
                    outbox.put_nowait(self.worker.heartbeat(seq))

        tasks = [asyncio.create_task(writer()), asyncio.create_task(heartbeats())]
        try:
            async for data in ws:
                if self.partitioned.is_set():
                    continue
                m = wire.decode(data)
                if m["type"] == "welcome":
                    self.connected.set()
                if not in_thread and self.worker.is_quick_step(m, self.worker.heartbeat_ms / 5):
                    for r in answer(m):
                        if outbox.empty() and not self.partitioned.is_set():
                            await ws.send(wire.encode(r, validate=False))  # nothing queued would go first
                        else:
                            outbox.put_nowait(r)
                    continue
                in_thread += 1
                loop.run_in_executor(self._exec, handle, m)
        except wire.ProtocolError as err:
            await ws.send(wire.encode(err.to_message()))
        finally:
            for t in tasks:
                t.cancel()


async def run_worker(url: str, worker: TabWorker, reconnect: bool = True, cafile: str | None = None) -> None:
    await WorkerConnection(worker, url, reconnect, cafile).run()
