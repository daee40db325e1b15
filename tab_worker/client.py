"""The asyncio adapter of a Python tab worker: a WebSocket to the coordinator, a heartbeat
timer, and one compute thread that runs `TabWorker.handle` for each message in order.

Heartbeats come from the event loop, not the compute thread, so a long step never looks
like a death. The exception is a decode step known to be quick (its range's last one took
under a fifth of the heartbeat interval) arriving while the compute thread is idle: it runs
on the event loop and its result is sent from there, because the two thread hand-offs (wake
the compute thread, then wake the loop with the result) cost a sizeable part of what a hop
costs beyond compute (benchmarks/bench_cluster.py measures the hop).

The connection is re-made with backoff when it drops (a coordinator restart, or fencing after
a freeze): the worker keeps its weight blobs and reports them in `hello`, so nothing is
downloaded twice. What cannot be fixed by retrying ends the run with a `TabshardError` naming
the cause: a refused join token, a protocol version the coordinator does not speak, an
endpoint that is not there (HTTP 404), a URL that is not ws:// or wss://.

`say` (the `tabshard worker` command passes a printer) gets one line per lifecycle event:
connecting, joined as wN, loading layers with progress, ready for layers a-b, unloaded,
fenced or closed with the coordinator's reason, reconnecting in N s and why, stopped.
"""
from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import signal
import ssl
from concurrent.futures import ThreadPoolExecutor
from urllib.parse import urlencode

import websockets

from tab_worker.worker import TabWorker
from protocol import wire
from protocol.errors import TabshardError

log = logging.getLogger("tabshard.worker")
MAX_FRAME = 64 << 20
NAME_MISMATCH = {62, 64}  # OpenSSL: X509_V_ERR_HOSTNAME_MISMATCH, X509_V_ERR_IP_ADDRESS_MISMATCH


# errors from the coordinator that retrying cannot fix: code -> what to tell the user
FATAL = {
    "bad_token": "the coordinator refused the join token {token}: pass the token `tabshard serve` printed (--token)",
    "version_mismatch": "the coordinator speaks another protocol version than this worker ({message}): run the same "
                        "tabshard version on both sides",
}


def check_url(url: str) -> None:
    """A worker URL is ws:// or wss://; an http(s) URL gets the ws one it probably meant."""
    from urllib.parse import urlsplit

    parts = urlsplit(url)
    if parts.scheme in ("ws", "wss") and parts.netloc:
        return
    if parts.scheme in ("http", "https") and parts.netloc:
        ws = ("wss" if parts.scheme == "https" else "ws") + url[len(parts.scheme):]
        if not parts.path.rstrip("/").endswith("/ws/worker"):
            ws = ws.rstrip("/") + "/ws/worker" if parts.path in ("", "/") else ws
        raise TabshardError(f"{url} is an {parts.scheme}:// URL; workers connect over WebSocket: use {ws}")
    raise TabshardError(f"{url!r} is not a worker URL: use ws://HOST:PORT/ws/worker (wss:// for a TLS coordinator)")


class WorkerConnection:
    def __init__(self, worker: TabWorker, url: str, reconnect: bool = True, cafile: str | None = None, say=None,
                 source_address: str | None = None):
        """cafile: a PEM certificate (bundle) to trust for a wss:// coordinator, e.g. its own
        self-signed certificate; without it the system's trust store decides. say: called with
        one line per lifecycle event (None: silent, as simulated tabs are). source_address: the
        local address the socket is bound to (None: the system's choice); a simulated tab
        connects from its own device's loopback address, as each device of a LAN has its own."""
        check_url(url)
        self.worker = worker
        self.url = url
        self._source = {"local_addr": (source_address, 0)} if source_address else {}
        # the pass the coordinator welcomed this tab with (coordinator/security.Standing),
        # presented when it reconnects: once proven, it rejoins while its address is backed off
        self.standing: str | None = None
        self.say = say or (lambda line: None)
        self.fatal: str | None = None  # set by a refusal that retrying cannot fix
        self.welcomed = False  # the current connection was welcomed (joined): the reconnect backoff starts over
        self.retry_after_s = 0.0  # a backoff refusal's wait before the next try
        self._loading: dict = {}  # layer_start -> (layer_end, last percent said)
        self.reconnect = reconnect
        try:
            self._tls = {"ssl": ssl.create_default_context(cafile=cafile)} if cafile else {}
        except (OSError, ssl.SSLError) as exc:
            raise TabshardError(f"--cafile {cafile}: not a readable PEM certificate ({exc})") from None
        self._exec = ThreadPoolExecutor(max_workers=1, thread_name_prefix="tab-compute")
        self._stop = asyncio.Event()
        self.connected = asyncio.Event()
        self.sessions_joined = 0
        self._ws = None

    # ------------------------------------------------------------------ hooks
    # Whoever runs this connection may override these (actors/tab.py's simulated tabs do: a
    # network partition, a fenced liar that stays away, a hidden tab's timer jitter).
    def delivers(self) -> bool:
        """Whether frames get through now, both ways."""
        return True

    async def before_hello(self) -> None:
        """Called on a fresh socket before the hello goes out."""

    def session_ended(self, close_code: int | None) -> None:
        """Called when a socket's session ends, with the coordinator's close code."""

    def heartbeat_interval(self) -> float:
        """Seconds until the next heartbeat: the coordinator's heartbeat_ms."""
        return self.worker.heartbeat_ms / 1000

    def link(self, ws):
        """The socket as this connection uses it, wrapped around each fresh one (a simulated tab
        puts its network's latency, jitter and bandwidth there: actors/network.py)."""
        return ws

    def in_compute_thread(self, fn):
        """Run fn() on the thread that runs the worker's steps (so it never races one): a future."""
        return self._exec.submit(fn)

    async def run(self) -> None:
        # the wait before a reconnect doubles (to 5 s) until a connection is welcomed: a socket
        # that opens and is refused at once (an address backed off or over its rate) must not
        # reconnect ten times a second, using up its address's joins for the others there
        backoff = 0.1
        while not self._stop.is_set():
            why = "the connection closed"
            self.say(f"connecting to {self.url}")
            self.welcomed, self.retry_after_s = False, 0.0
            try:
                async with websockets.connect(self._url_with_pass(), max_size=MAX_FRAME, compression=None, ping_interval=None,
                                              open_timeout=10, **self._tls, **self._source) as raw:
                    ws = self.link(raw)
                    await self._session(ws)
                    why = self._closed(ws)
            except ssl.SSLCertVerificationError as exc:  # permanent: retrying cannot fix trust
                hint = ("connect to a host name or address that the certificate names" if exc.verify_code in NAME_MISMATCH
                        else "pass --cafile with the coordinator's certificate (PEM) to trust it")
                raise TabshardError(f"{self.url}: certificate verify failed ({exc.verify_message}): {hint}") from None
            except websockets.InvalidStatus as exc:
                status = exc.response.status_code
                if status == 404:
                    raise TabshardError(f"{self.url}: no worker endpoint there (HTTP 404): the path is /ws/worker") from None
                why = f"the coordinator answered HTTP {status}"
            except (OSError, websockets.WebSocketException, asyncio.TimeoutError) as exc:
                log.info("connection to %s lost: %s", self.url, exc)
                why = _reason(exc)
            self.connected.clear()
            if self.fatal:
                raise TabshardError(self.fatal)
            if not self.reconnect or self._stop.is_set():
                return
            if self.welcomed:
                backoff = 0.1
            wait = max(backoff * (1 + random.random() * 0.2), self.retry_after_s)
            self.say(f"reconnecting in {wait:.1f} s because {why}")
            await asyncio.sleep(wait)
            backoff = min(backoff * 2, 5.0)

    def _closed(self, ws) -> str:
        code, reason = ws.close_code, ws.close_reason or ""
        if self._stop.is_set():
            return "stopped"
        if code == 4000:
            self.say(f"fenced by the coordinator: {reason.removeprefix('fenced: ')}")
            return "the coordinator fenced this worker"
        if code in (1000, 1001) and not reason:
            return "the coordinator closed the connection"
        return f"the coordinator closed the connection ({code} {reason})".rstrip()

    def _url_with_pass(self) -> str:
        """The coordinator's URL, with this tab's pass as the `standing` query where it has one."""
        if not self.standing:
            return self.url
        return f"{self.url}{'&' if '?' in self.url else '?'}{urlencode({'standing': self.standing})}"

    def _observe_in(self, m: dict) -> None:
        """Lifecycle lines (and fatal refusals) from what the coordinator sends."""
        kind = m.get("type")
        if kind == "welcome":
            self.welcomed = True
            self.standing = m.get("standing") or self.standing
            self.say(f"joined as {m['worker_id']} (heartbeat every {m['heartbeat_ms']} ms)")
        elif kind == "error" and m.get("code") in FATAL:
            token = repr(self.worker.token) if self.worker.token else "(none given)"
            self.fatal = FATAL[m["code"]].format(token=token, message=m.get("message", ""))
        elif kind == "error" and m.get("code") == "backoff":
            self.retry_after_s = float(m.get("retry_after_s") or 0.0)  # the next try waits for it
            self.say(f"refused for now: {m.get('message')}")
        elif kind == "assign":
            self._loading[m["layer_start"]] = (m["layer_end"], -1)
            self.say(f"loading layers {m['layer_start']}-{m['layer_end'] - 1}"
                     f"{' + head' if m.get('include_head') else ''}")
        elif kind == "unload":
            self.say(f"unloaded layers {m['layer_start']}-{m['layer_end'] - 1} ({m.get('reason', 're-plan')})")

    def _observe_out(self, m: dict) -> None:
        kind = m.get("type")
        if kind == "load_progress" and m.get("total_bytes"):
            end, said = self._loading.get(m["layer"], (None, -1))
            pct = int(100 * m["received_bytes"] / m["total_bytes"])
            if pct >= said + 25 or (pct == 100 and said < 100):  # a line per quarter, not per chunk
                bar = "#" * (pct // 5) + "." * (20 - pct // 5)
                self.say(f"  [{bar}] {pct:3d}%  {m['received_bytes'] / 1e6:.1f} of {m['total_bytes'] / 1e6:.1f} MB")
                self._loading[m["layer"]] = (end, pct - pct % 25)
        elif kind == "ready":
            a, b = m["layers"]
            self.say(f"ready for layers {a}-{b - 1}")
        elif kind == "refuse":
            self.say(f"refused an assignment: {m.get('reason')} {m.get('detail') or ''}".rstrip())

    async def leave(self, reason: str = "stopped") -> None:
        """Stop for good: say goodbye to the coordinator (it moves the layers at once instead of
        waiting for silence) and close."""
        self._stop.set()
        ws = self._ws
        if ws is not None:
            with contextlib.suppress(Exception):
                await ws.send(wire.encode(wire.make("bye", reason=reason)))
                await ws.close(code=1000, reason=reason)

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
        await self.before_hello()
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
                self._observe_out(m)
                if self.delivers():
                    await ws.send(wire.encode(m, validate=False))

        async def heartbeats():
            seq = 0
            while True:
                await asyncio.sleep(self.heartbeat_interval())
                seq += 1
                if self.delivers():
                    outbox.put_nowait(self.worker.heartbeat(seq))

        tasks = [asyncio.create_task(writer()), asyncio.create_task(heartbeats())]
        try:
            async for data in ws:
                if not self.delivers():
                    continue
                m = wire.decode(data)
                self._observe_in(m)
                if m["type"] == "welcome":
                    self.connected.set()
                if m["type"] == "ping":  # answered here, ahead of any compute: it times the round trip
                    outbox.put_nowait(self.worker.on_ping(m)[0])
                    continue
                if not in_thread and self.worker.is_quick_step(m, self.worker.heartbeat_ms / 5):
                    for r in answer(m):
                        if outbox.empty() and self.delivers():
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
            self.session_ended(ws.close_code)


def _reason(exc: BaseException) -> str:
    if isinstance(exc, ConnectionRefusedError):
        return "nothing accepts connections there (is `tabshard serve` running?)"
    if isinstance(exc, asyncio.TimeoutError):
        return "the connection timed out"
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror.lower()
    return str(exc) or type(exc).__name__


async def run_worker(url: str, worker: TabWorker, reconnect: bool = True, cafile: str | None = None, say=None) -> None:
    """Serve until stopped. With `say`, SIGTERM and SIGINT leave cleanly (a bye to the
    coordinator, then return)."""
    conn = WorkerConnection(worker, url, reconnect, cafile, say)
    loop = asyncio.get_running_loop()
    stopping = []
    if say is not None:
        def stop(name: str) -> None:
            if not stopping:
                stopping.append(name)
                conn.say(f"stopping ({name}): leaving the coordinator")
                loop.create_task(conn.leave(f"worker stopped ({name})"))
        for sig in (signal.SIGTERM, signal.SIGINT):
            with contextlib.suppress(NotImplementedError, RuntimeError):
                loop.add_signal_handler(sig, stop, sig.name)
    try:
        await conn.run()
    finally:
        if say is not None:
            for sig in (signal.SIGTERM, signal.SIGINT):
                with contextlib.suppress(NotImplementedError, RuntimeError):
                    loop.remove_signal_handler(sig)
    if stopping:
        conn.say("stopped")
