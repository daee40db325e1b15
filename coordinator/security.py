"""Who may talk to the coordinator: an ASGI guard in front of every route.

- The client API (/v1/...) needs the API key when one is set: `Authorization: Bearer KEY` or
  `X-API-Key: KEY` (a WebSocket client that cannot set headers may pass `?api_key=KEY`).
  `serve` sets a key whenever it binds a non-loopback address (`--api-key`, $TABSHARD_API_KEY,
  else a random one, printed); on loopback the key is optional.
- Browser tabs (/tab..., /ws/worker) are checked against an Origin allowlist: same origin,
  loopback origins, and the `allowed_origins` setting. A request without an Origin header is
  not a browser's; it still needs the join token (checked in the state machine's hello).
- Off loopback, /status, /openapi.json, /metrics, /dashboard* and /ws/dashboard need the API key
  as well (`?api_key=KEY` works for the dashboard in a browser), unless `serve --public-status`.
- Refusals are answered in one sentence (401/403, or a WebSocket close 4401/4403 with the
  reason) and counted; nothing behind the guard runs for them.
"""
from __future__ import annotations

import ipaddress
import json
import secrets
from urllib.parse import parse_qs, urlsplit

LOOPBACK_NAMES = {"localhost", "127.0.0.1", "::1", "[::1]"}
# paths that show the cluster (workers, addresses, events) or its API surface: behind the API key
# off loopback (`serve --public-status` opens them); the dashboard's pages and socket as well
PROTECTED = {"/status", "/openapi.json", "/metrics", "/ws/dashboard"}


def is_loopback(host: str) -> bool:
    if host in LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def api_key_for(host: str, given: str | None) -> tuple[str | None, bool]:
    """The API key `serve` enforces and whether it was generated (so it must be printed)."""
    if given:
        return given, False
    if is_loopback(host):
        return None, False
    return secrets.token_urlsafe(24), True


def origin_allowed(origin: str | None, host_header: str | None, extra: set[str]) -> bool:
    if not origin:
        return True
    if "*" in extra or origin in extra:
        return True
    parts = urlsplit(origin)
    if parts.netloc and host_header and parts.netloc.lower() == host_header.lower():
        return True  # same origin
    return is_loopback(parts.hostname or "")


class AccessGuard:
    """ASGI middleware; `service` carries `api_key`, `allowed_origins` and `refusals`."""

    def __init__(self, app, service):
        self.app = app
        self.service = service

    async def __call__(self, scope, receive, send):
        if scope["type"] not in ("http", "websocket"):
            return await self.app(scope, receive, send)
        path = scope.get("path", "")
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", [])}
        key = getattr(self.service, "api_key", None)
        # off loopback (unless --public-status), what shows the cluster or drives it needs the key too
        guarded = path.startswith("/v1/") or (getattr(self.service, "protect_status", False) and (
            path in PROTECTED or path.startswith("/dashboard")))
        if key and guarded and not self._key_ok(key, headers, scope):
            self.service.refusals["api_key"] += 1
            return await self._deny(scope, receive, send, 401, 4401, "missing or wrong API key: send 'Authorization: Bearer <key>'",
                                    "invalid_api_key")
        # browser pages that may open these: the tab's, and (for the dashboard's socket, which
        # streams the cluster's state) no page of a foreign origin either
        if path in ("/ws/worker", "/ws/dashboard") or path == "/tab" or path.startswith("/tab/"):
            extra = set(getattr(self.service, "allowed_origins", ()) or ())
            if not origin_allowed(headers.get("origin"), headers.get("host"), extra):
                self.service.refusals["origin"] += 1
                return await self._deny(scope, receive, send, 403, 4403, "this page's origin may not join as a tab "
                                        "(see the allowed_origins setting)", "origin_not_allowed")
        return await self.app(scope, receive, send)

    @staticmethod
    def _key_ok(key: str, headers: dict, scope) -> bool:
        auth = headers.get("authorization", "")
        given = auth[7:].strip() if auth.lower().startswith("bearer ") else headers.get("x-api-key", "")
        if not given and (scope["type"] == "websocket" or scope.get("path", "").startswith("/dashboard")):
            given = (parse_qs(scope.get("query_string", b"").decode("latin-1")).get("api_key") or [""])[0]
        return bool(given) and secrets.compare_digest(given.encode(), key.encode())

    @staticmethod
    async def _deny(scope, receive, send, status: int, ws_code: int, message: str, kind: str):
        if scope["type"] == "websocket":
            await receive()  # websocket.connect
            await send({"type": "websocket.accept"})
            await send({"type": "websocket.close", "code": ws_code, "reason": message[:120]})
            return
        body = json.dumps({"error": {"message": message, "type": kind, "param": None, "code": status}}).encode()
        extra = [(b"www-authenticate", b"Bearer")] if status == 401 else []
        await send({"type": "http.response.start", "status": status,
                    "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())] + extra})
        await send({"type": "http.response.body", "body": body})


class RateLimit:
    """A token bucket: `per_s` messages a second on average, bursts of `burst` (2 s worth)."""

    def __init__(self, per_s: float, burst: float | None = None):
        self.rate = float(per_s)
        self.capacity = float(burst if burst is not None else 2 * per_s)
        self.tokens = self.capacity
        self.t: float | None = None

    def allow(self, now: float) -> bool:
        if self.t is not None:
            self.tokens = min(self.capacity, self.tokens + (now - self.t) * self.rate)
        self.t = now
        if self.tokens >= 1:
            self.tokens -= 1
            return True
        return False


class Backoff:
    """Exponential backoff per peer key (an address): past two offenses (a protocol violation,
    a failed verification, a trial or step left unanswered), each one doubles how long that
    key's joins are refused, from `base_s` up to `max_s`. A key with no offense for `forgive_s` after its
    refusal ended starts over. Keyed by address, not by the name a tab gives itself, so that
    rejoining under fresh names does not reset it. Pure bookkeeping: the state machine owns it."""

    def __init__(self, base_s: float = 1.0, max_s: float = 600.0, forgive_s: float = 600.0, max_keys: int = 10_000):
        self.base_s, self.max_s, self.forgive_s, self.max_keys = base_s, max_s, forgive_s, max_keys
        self.records: dict[str, dict] = {}

    def offend(self, key: str, reason: str, now: float) -> float:
        """Record an offense; returns how long joins from `key` are now refused."""
        rec = self.records.get(key)
        if rec is None or now > rec["until"] + self.forgive_s:
            rec = {"offenses": 0, "until": now, "reason": reason}
        rec["offenses"] += 1
        # two offenses are free (a tab with a bug, a retry after it); from the third on, joins
        # wait, doubling each time
        wait = 0.0 if rec["offenses"] <= 2 else min(self.max_s, self.base_s * 2 ** (rec["offenses"] - 3))
        rec["until"] = max(rec["until"], now + wait)
        rec["reason"] = reason[:200]
        self.records.pop(key, None)
        self.records[key] = rec  # newest last: the oldest go first when the table is full
        while len(self.records) > self.max_keys:
            self.records.pop(next(iter(self.records)))
        return wait

    def wait(self, key: str, now: float) -> float:
        rec = self.records.get(key)
        return max(0.0, rec["until"] - now) if rec else 0.0

    def snapshot(self, now: float) -> list[dict]:
        return [{"address": k, "offenses": r["offenses"], "refused_for_s": round(max(0.0, r["until"] - now), 1),
                 "reason": r["reason"]} for k, r in self.records.items() if now <= r["until"] + self.forgive_s]


class Standing:
    """Passes for tabs in good standing: the per-address backoff (Backoff) holds back every tab of
    a machine, and every machine behind one NAT, for one tab's offenses; a pass lets a tab that
    proved itself rejoin meanwhile. Each worker is issued a secret at `welcome`; it is earned when
    the worker passes probation, revoked when the worker offends, and presented when the tab
    reconnects (the worker socket's `?standing=` query, so that the refusal still comes before any
    frame is read). It admits only from the address it was issued to, and lapses `ttl_s` after
    its worker was last seen in good standing. A rejoining tab carries its pass on: the new
    worker inherits it, earned, until it offends. Pure bookkeeping: the state machine owns it.

    A tarpit gets nothing from it: a pass is earned only by passing probation (trial steps
    recomputed against a trusted worker), and the worker's first offense revokes it."""

    def __init__(self, ttl_s: float = 600.0, max_passes: int = 10_000):
        self.ttl_s, self.max_passes = ttl_s, max_passes
        self.passes: dict[str, dict] = {}  # secret -> {worker, address, earned, revoked, at}
        self.of_worker: dict[str, str] = {}  # worker id -> its secret

    def admits(self, secret: str | None, address: str, now: float) -> bool:
        """Whether `secret` lets a tab from `address` join while the address is backed off."""
        rec = self.passes.get(secret or "")
        return (rec is not None and rec["earned"] and not rec["revoked"] and rec["address"] == address
                and now - rec["at"] <= self.ttl_s)

    def issue(self, worker_id: str, address: str, now: float, presented: str | None = None) -> str:
        """The pass `worker_id` is welcomed with: the one its tab presented where that is still
        good for this address (carried on: earned stays earned), else a new one."""
        rec = self.passes.get(presented or "")
        if rec is None or rec["revoked"] or rec["address"] != address or now - rec["at"] > self.ttl_s:
            presented = secrets.token_urlsafe(24)
            rec = {"earned": False, "revoked": False, "address": address}
        self.of_worker.pop(rec.get("worker", ""), None)
        rec.update(worker=worker_id, at=now)
        self.passes.pop(presented, None)
        self.passes[presented] = rec  # newest last: the oldest go first when the table is full
        self.of_worker[worker_id] = presented
        while len(self.passes) > self.max_passes:
            old = next(iter(self.passes))
            self.of_worker.pop(self.passes.pop(old)["worker"], None)
        return presented

    def earn(self, worker_id: str, now: float) -> None:
        """The worker passed probation: its pass admits from now on."""
        rec = self.passes.get(self.of_worker.get(worker_id, ""))
        if rec is not None and not rec["revoked"]:
            rec.update(earned=True, at=now)

    def revoke(self, worker_id: str) -> None:
        """The worker offended: its pass admits no more."""
        rec = self.passes.get(self.of_worker.get(worker_id, ""))
        if rec is not None:
            rec["revoked"] = True

    def seen(self, worker_id: str, now: float) -> None:
        """The worker is gone (or still here) in good standing at `now`: its pass lapses ttl_s on."""
        rec = self.passes.get(self.of_worker.get(worker_id, ""))
        if rec is not None and not rec["revoked"]:
            rec["at"] = now


def set_frame_limit(ws, size: int) -> bool:
    """Set the largest WebSocket message this socket may receive from now on, before any byte
    of a bigger one is buffered (the ASGI server checks each frame's declared length). Starlette
    hands the app uvicorn's protocol's bound `receive`; its WebSocket protocol object (the
    websockets sans-I/O one, or the legacy one) reads the limit again at every frame. Called
    before `accept`, so that even the first frame meets it. False when the server is another."""
    proto = getattr(getattr(ws, "_receive", None), "__self__", None)
    conn = getattr(proto, "conn", None)
    if conn is not None and hasattr(conn, "max_message_size"):  # uvicorn websockets-sansio
        conn.max_message_size = size
        return True
    if proto is not None and hasattr(proto, "max_size"):  # uvicorn legacy websockets
        proto.max_size = size
        return True
    return False


class AddressLimits:
    """Per peer address: open sockets at most `max_conns`, new ones at `per_s` a second (bursts
    of 2 s). `admit` says why a socket is refused, or None; `release` when it closes."""

    def __init__(self, max_conns: int, per_s: float, max_keys: int = 10_000):
        self.max_conns, self.per_s, self.max_keys = max_conns, per_s, max_keys
        self.open: dict[str, int] = {}
        self.rates: dict[str, RateLimit] = {}

    def admit(self, address: str, now: float) -> str | None:
        if self.open.get(address, 0) >= self.max_conns:
            return f"{self.max_conns} sockets from this address are open already"
        rate = self.rates.pop(address, None) or RateLimit(self.per_s)
        self.rates[address] = rate  # newest last: the least recently seen go first when full
        while len(self.rates) > self.max_keys:
            self.rates.pop(next(iter(self.rates)))
        if not rate.allow(now):
            return f"more than {self.per_s:g} new sockets a second from this address"
        self.open[address] = self.open.get(address, 0) + 1
        return None

    def release(self, address: str) -> None:
        n = self.open.get(address, 0) - 1
        if n > 0:
            self.open[address] = n
        else:
            self.open.pop(address, None)


def header_timeout_protocol(timeout_s: float):
    """uvicorn's h11 protocol with a deadline for the request head: a connection that has not
    sent a whole request line and headers within `timeout_s` of opening (or of its previous
    response: uvicorn's own keep-alive timeout covers the idle wait) is closed. uvicorn has no
    such timeout of its own, so 200 slowloris connections each sending a header byte now and
    then stayed open for ever."""
    from uvicorn.protocols.http.h11_impl import H11Protocol

    class HeaderTimeoutH11Protocol(H11Protocol):
        _head_timer = None

        def connection_made(self, transport):
            super().connection_made(transport)
            self._head_timer = self.loop.call_later(timeout_s, self._head_timeout)

        def handle_events(self):
            super().handle_events()
            if self.cycle is not None and self._head_timer is not None:  # a request head arrived
                self._head_timer.cancel()
                self._head_timer = None

        def connection_lost(self, exc):
            if self._head_timer is not None:
                self._head_timer.cancel()
                self._head_timer = None
            super().connection_lost(exc)

        def _head_timeout(self):
            self._head_timer = None
            if self.cycle is None and self.transport.get_protocol() is self and not self.transport.is_closing():
                self.transport.close()

    return HeaderTimeoutH11Protocol
