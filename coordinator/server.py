"""The asyncio adapter around the coordinator's state machine: WebSockets in, actions out.

One event loop owns the `Coordinator`; every socket's frames are decoded here (wire.decode)
and fed in with the time; the returned actions are carried out without awaiting inside the
state machine: each connection has its own ordered outbox drained by a writer task. The
coordinator's own compute (used when tabs cannot hold the model) is an in-process worker, handed
in by `serve`, on a single worker thread that speaks the same messages, minus the bytes.
"""
from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import secrets
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np

from coordinator.security import AddressLimits, RateLimit, set_frame_limit
from coordinator.records import LOCAL, Close, CoordinatorSettings, Emit, Send
from coordinator.state import Coordinator
from model.embedding import embed
from model.sampling import SamplingParams
from model.tokenizer import GGUFTokenizer, StreamDecoder
from protocol import wire
from protocol.blobs import pack_head, pack_layer
from protocol.model_types import ModelWeights

log = logging.getLogger("tabshard.coordinator")

WORKER_LIMITS = wire.Limits(max_frame_bytes=64 << 20, max_tensor_elements=16 << 20)
# Until its hello is accepted a worker socket is anyone's: a hello is a few KiB (capabilities
# and resume are bounded by the schema), and nothing else may come first. The frame limit is
# lowered before the socket is accepted (security.set_frame_limit), so a 60 MB frame is refused
# by its header, unread; a client token stream gets CLIENT_LIMITS' 1 MiB the same way.
PRE_HELLO_LIMITS = wire.Limits(max_frame_bytes=256 << 10, max_tensor_elements=0, allowed_dtypes=frozenset(),
                               max_list_len=1 << 14, max_str_len=64 << 10)
TICK_S = 0.02
EMBED_CACHE_BYTES = 64 << 20  # decode rows kept dequantized (see CoordinatorService._embed)


@dataclass
class ClientStream:
    """Events for one request, plus the text decoder that turns token ids into text."""

    queue: asyncio.Queue
    decoder: StreamDecoder
    prompt_tokens: int
    tokens: list = field(default_factory=list)
    created: float = field(default_factory=time.monotonic)


def peer_address(ws) -> str:
    client = getattr(ws, "client", None)
    return client.host if client is not None and client.host else ""


class CoordinatorService:
    def __init__(self, model, settings: CoordinatorSettings = CoordinatorSettings(),
                 join_token: str | None = None, compute=None, api_key: str | None = None,
                 progress=None, draft=None):
        """model: an opened model (model.loader.open_model or tabshard.models.open_model);
        compute: the coordinator's own compute (tab_worker.local.LocalCompute, injected by `serve`:
        its worker, when settings.coordinator_compute, and the whole-vocabulary head), None for
        none; draft: the speculation's DraftModel, when settings ask for the draft-model mode;
        progress(what, done, total): told as the model loads (serve draws a bar from it)."""
        progress = progress or (lambda what, done, total: None)
        self.model = model
        self.compute = compute
        self.tokenizer = GGUFTokenizer(self.model)
        weights = self._load_weights(progress)
        self.weights = weights
        blobs = {f"layer:{i}": pack_layer(i, lw) for i, lw in enumerate(weights.layers)}
        blobs["head"] = pack_head(weights.head)
        self.join_token = join_token if join_token is not None else secrets.token_urlsafe(16)
        self._rows: dict[int, np.ndarray] = {}  # token id -> its embedded row, read-only
        self._rows_max = max(1, EMBED_CACHE_BYTES // (4 * weights.config.hidden))
        self.core = Coordinator(weights.config, blobs, self._embed, settings, self.join_token, draft=draft)
        self.core.head_logits = self._head_logits
        self._head_matrix = None  # full_head(), made on the first request that needs it
        self.bytes_to_workers = 0  # every frame sent on worker sockets (/metrics)
        # time this loop spent on worker frames: decoding them and the state machine's handling
        # (a token's sampling and embedding included), and encoding and sending frames to them
        self.worker_frames_ms = 0.0
        self.worker_sends_ms = 0.0
        self.settings = settings
        self.api_key = api_key  # never shown by any endpoint (coordinator/security.py checks it)
        self.allowed_origins = {o.strip() for o in settings.allowed_origins.split(",") if o.strip()}
        self.refusals = {"api_key": 0, "origin": 0, "rate": 0, "overloaded": 0, "address": 0}
        # per peer address: open worker / client-stream sockets and how fast new ones come
        self.address_limits = AddressLimits(settings.max_conns_per_address, settings.joins_per_address_per_s)
        # off loopback, /status, the dashboard and /openapi.json need the API key (serve sets
        # this unless --public-status; see security.AccessGuard)
        self.protect_status = False
        self.compat_matrix = None  # () -> the dashboard's browser compatibility matrix (serve sets it)
        self._outboxes: dict[str, asyncio.Queue] = {}
        self._sockets: dict[str, object] = {}
        self._conn_ids = itertools.count(1)
        self._request_ids = itertools.count(1)
        self.clients: dict[str, ClientStream] = {}
        self.loop: asyncio.AbstractEventLoop | None = None
        self._tick_task = None
        # read-only watchers (the dashboard): called with every non-empty action list and the
        # time, and with every decoded worker message; they must not raise or block
        self.observers: list = []
        self.message_observers: list = []
        self._local_exec = ThreadPoolExecutor(max_workers=1, thread_name_prefix="coordinator-compute")
        # That thread's numpy holds the GIL between BLAS calls; by default the event loop waits
        # up to 5 ms for it at every wake-up, and each pipeline hop goes through this loop.
        sys.setswitchinterval(min(sys.getswitchinterval(), 0.0005))
        self._local = None
        if settings.coordinator_compute and compute is not None:
            self._local = compute.worker({info.sha256: blobs[key] for key, info in self.core.blob_info.items()})

    def _load_weights(self, progress) -> ModelWeights:
        """The model's weights, layer by layer with progress (as GGUFModel.load_all reads them)."""
        m = self.model
        n = m.config.n_layers
        emb = m.embedding()
        layers = []
        for i in range(n):
            layers.append(m.layer(i))
            progress(f"layer {i + 1} of {n}", i + 1, n + 1)
        weights = ModelWeights(config=m.config, embedding=emb, layers=layers, head=m.head(emb))
        progress("weights loaded", n + 1, n + 1)
        return weights

    def _embed(self, ids) -> np.ndarray:
        """Coordinator.embed: every decode step of every stream embeds one token here, on the
        event loop every hop goes through, so a single token's row is dequantized once and kept
        (up to EMBED_CACHE_BYTES; read-only, as it is shared); prompts and drafts are embedded whole."""
        if len(ids) != 1:
            return embed(self.weights.embedding, ids)
        token = int(ids[0])
        row = self._rows.get(token)
        if row is None:
            row = embed(self.weights.embedding, ids)
            row.flags.writeable = False
            if len(self._rows) < self._rows_max:
                self._rows[token] = row
        return row

    def _head_logits(self, rows: np.ndarray) -> np.ndarray:
        """Coordinator.head_logits (sessions with logprobs or a grammar), built on first use."""
        if self._head_matrix is None:
            if self.compute is None:
                raise RuntimeError("this coordinator has no compute of its own for whole-vocabulary logits")
            self._head_matrix = self.compute.full_head(self.weights.head, self.core.config.rms_eps)
        return self._head_matrix(rows)

    # ------------------------------------------------------------------ lifecycle
    async def start(self) -> None:
        self.loop = asyncio.get_running_loop()
        self._tick_task = asyncio.create_task(self._ticker())
        if self._local is not None:
            self._local_send(self._local.hello())

    async def stop(self) -> None:
        if self._tick_task:
            self._tick_task.cancel()
        self._local_exec.shutdown(wait=False, cancel_futures=True)

    async def _ticker(self) -> None:
        while True:
            await asyncio.sleep(TICK_S)
            try:
                self.perform(self.core.tick(time.monotonic()))
            except Exception:  # a bug here must not stop failure detection for everyone
                log.exception("tick failed")

    # ------------------------------------------------------------------ actions
    def perform(self, actions: list) -> None:
        if actions and self.observers:
            now = time.monotonic()
            for fn in self.observers:
                fn(actions, now)
        # workers' messages first, clients' events after: a token's event wakes its client's
        # task, and a task woken first runs first, so emitting first would put the client's
        # send ahead of the next pipeline step (order within each socket is unchanged)
        for a in actions:
            if isinstance(a, Send):
                if a.conn == LOCAL:
                    self._local_exec.submit(self._local_handle, a.msg)
                else:
                    box = self._outboxes.get(a.conn)
                    if box is not None:
                        box.put_nowait(a.msg)
            elif isinstance(a, Close):
                box = self._outboxes.get(a.conn)
                if box is not None:
                    box.put_nowait(a)
        for a in actions:
            if isinstance(a, Emit):
                self._emit(a)

    def _local_handle(self, m: dict) -> None:
        replies = self._local.handle(m)
        for r in replies:
            self.loop.call_soon_threadsafe(self._local_send, r)

    def _local_send(self, m: dict) -> None:
        self.perform(self.core.on_message(LOCAL, m, time.monotonic()))

    def _emit(self, a: Emit) -> None:
        client = self.clients.get(a.request_id)
        if client is None:
            return
        ev = dict(a.event)
        eos = self.core.config.eos_id
        if ev["type"] == "token":
            client.tokens.append(ev["token_id"])
            ev["text"] = "" if ev["token_id"] == eos else client.decoder.push(ev["token_id"])
        elif ev["type"] == "rewind":  # tokens from a caught liar: the client drops them and their text
            kept = sum(1 for t in client.tokens[:ev["index"]] if t != eos)  # the decoder never saw EOS
            del client.tokens[ev["index"]:]
            ev["retract_chars"] = client.decoder.rewind(kept)
        client.queue.put_nowait(ev)

    # ------------------------------------------------------------------ worker sockets
    def admit(self, ws, frame_limit: int) -> str | None:
        """Before a worker or client-stream socket is accepted: its frame limit, and whether its
        address may open one more (None) or why not. A refused socket costs one handshake."""
        set_frame_limit(ws, frame_limit)
        why = self.address_limits.admit(peer_address(ws), time.monotonic())
        if why is not None:
            self.refusals["address"] += 1
        return why

    async def serve_worker(self, ws) -> None:
        """ws: a starlette WebSocket, already accepted (after `admit`)."""
        conn = f"c{next(self._conn_ids)}"
        address = peer_address(ws)
        box: asyncio.Queue = asyncio.Queue()
        self._outboxes[conn] = box
        writer = asyncio.create_task(self._writer(conn, ws, box))
        reason = "closed"
        limit = RateLimit(self.settings.worker_max_msgs_per_s)
        limits = PRE_HELLO_LIMITS
        standing = ws.query_params.get("standing") or None  # the tab's pass (welcome's `standing`)
        if standing is not None and len(standing) > 64:
            standing = None  # no pass is that long
        self.perform(self.core.on_connect(conn, address, time.monotonic(), standing))
        try:
            while conn in self._outboxes and not writer.done():
                frame = await ws.receive()
                if frame["type"] == "websocket.disconnect":
                    break
                data = frame.get("bytes")
                now = time.monotonic()
                t0 = time.perf_counter()
                if not limit.allow(now):
                    self.refusals["rate"] += 1
                    err = wire.ProtocolError("rate_limited", f"more than {self.settings.worker_max_msgs_per_s} messages "
                                             "a second on this socket", None)
                    self.perform(self.core.on_protocol_error(conn, err, now))
                    with contextlib.suppress(Exception):  # let the error and the close reach the peer
                        await asyncio.wait_for(writer, 2.0)
                    break
                if data is None:
                    err = wire.ProtocolError("malformed", "text frames are not part of the protocol; send binary msgpack", None)
                    self.perform(self.core.on_protocol_error(conn, err, now))
                    continue
                try:
                    m = wire.decode(data, limits)
                except wire.ProtocolError as err:
                    self.perform(self.core.on_protocol_error(conn, err, now))
                    continue
                for fn in self.message_observers:
                    fn(conn, m, now)
                self.perform(self.core.on_message(conn, m, now))
                self.worker_frames_ms += (time.perf_counter() - t0) * 1000
                if limits is PRE_HELLO_LIMITS and conn in self.core.conn_worker:  # joined: what a worker sends
                    limits = WORKER_LIMITS
                    set_frame_limit(ws, WORKER_LIMITS.max_frame_bytes)
        except Exception as exc:  # the socket broke: same as a close
            reason = f"error {type(exc).__name__}"
        finally:
            self.perform(self.core.on_disconnect(conn, time.monotonic(), reason))
            if not box.empty() and not writer.done():  # a refusal's error and close reach the peer first
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(asyncio.shield(writer), 1.0)
            writer.cancel()
            self._outboxes.pop(conn, None)
            self.address_limits.release(address)

    async def _writer(self, conn: str, ws, box: asyncio.Queue) -> None:
        try:
            while True:
                item = await box.get()
                if isinstance(item, Close):
                    await ws.close(code=item.code, reason=item.reason)
                    return
                t0 = time.perf_counter()
                frame = wire.encode(item, validate=False)
                self.bytes_to_workers += len(frame)
                await ws.send_bytes(frame)
                self.worker_sends_ms += (time.perf_counter() - t0) * 1000
        except Exception:
            return

    # ------------------------------------------------------------------ clients
    def open_request(self, prompt_ids: list[int], max_tokens: int, params: SamplingParams,
                     request_id: str | None = None, **session_options) -> tuple[str, ClientStream]:
        """session_options: Coordinator.submit's chooser / share_prefix (coordinator/openai_api.py)."""
        rid = request_id or f"req-{next(self._request_ids)}-{secrets.token_hex(4)}"
        client = ClientStream(asyncio.Queue(), StreamDecoder(self.tokenizer), len(prompt_ids))
        self.clients[rid] = client
        try:
            self.perform(self.core.submit(rid, prompt_ids, max_tokens, params, time.monotonic(), **session_options))
        except Exception:
            # a bug in the state machine must fail this request at once, not leave it waiting
            # for a session that will never be scheduled
            log.exception("submit failed for %s", rid)
            self.clients.pop(rid, None)
            self.perform(self.core.cancel(rid, time.monotonic()))
            raise
        return rid, client

    def close_request(self, rid: str, cancelled: bool) -> None:
        if cancelled:
            self.perform(self.core.cancel(rid, time.monotonic()))
        self.clients.pop(rid, None)

    def status(self, events_since: float | None = None) -> dict:
        """/status: the last 50 events, or every retained one after `events_since` (a poller that
        must not miss one, e.g. a test that reads the events after a burst)."""
        st = self.core.status(time.monotonic())
        if events_since is not None:
            st["events"] = [e for e in self.core.events if e["t"] > events_since]
        st["model"]["name"] = self.model.path.name
        st["counters"].update({f"refused_{k}": v for k, v in self.refusals.items()})
        st["counters"].update(worker_frames_ms=round(self.worker_frames_ms, 3), worker_sends_ms=round(self.worker_sends_ms, 3))
        st["access"] = {"api_key_required": bool(self.api_key), "join_token_required": bool(self.join_token),
                        "allowed_origins": sorted(self.allowed_origins)}
        return st
