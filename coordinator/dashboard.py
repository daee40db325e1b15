"""The live dashboard: GET /dashboard, pushed over the WebSocket /ws/dashboard.

`DashboardFeed` is the logic, with no I/O: it watches the service's actions (token emits feed
rolling throughput, time-to-first-token and inter-token-latency series) and builds snapshots
of the cluster from the coordinator's status. The socket adapter below sends a snapshot on
connect, then a new one only when something changed, at most `MAX_PUSH_HZ` times a second
(plus a once-a-second refresh while heartbeat ages tick). Nothing polls the server: the page
only listens.

Static files come from coordinator/web/dist/dashboard (built by `npm ci && npm run build` in
coordinator/web); without a build the page is served from the sources and draws no charts.
"""
from __future__ import annotations

import asyncio
import json
import time
from collections import deque
from pathlib import Path

from starlette.responses import FileResponse, HTMLResponse, JSONResponse
from starlette.routing import Mount, Route, WebSocketRoute
from starlette.staticfiles import StaticFiles
from starlette.websockets import WebSocket, WebSocketDisconnect

from coordinator.records import Close, Emit

WEB = Path(__file__).resolve().parent / "web"
BUILT = WEB / "dist" / "dashboard"
SOURCES = WEB / "dashboard"
MAX_PUSH_HZ = 4.0
REFRESH_S = 1.0  # heartbeat ages change continuously: refresh at most this often when idle
WINDOW_S = 300  # seconds of rolling series kept and charted
TIMELINE_KINDS = {"join", "death", "quarantine", "silent", "suspect", "rebuild", "recovered", "plan", "plan_kept", "plan_failed",
                  "refused", "worker_error", "stage_unserved", "retired"}


def asset_dir() -> Path:
    return BUILT if (BUILT / "index.html").exists() else SOURCES


class DashboardFeed:
    """Rolling metric series and snapshots. `observe` is a CoordinatorService observer."""

    def __init__(self, window_s: int = WINDOW_S):
        self.window_s = window_s
        self.buckets: deque = deque()  # [second, tokens, ttft samples (s), itl samples (s)]
        self.last_token: dict[str, float] = {}  # request id -> time of its last token
        self.first_token: dict[str, tuple[float, int]] = {}  # request id -> (first token time, tokens)
        self.created: dict[str, float] = {}
        self.version = 0  # bumped on every observed change
        self._waiters: set[asyncio.Event] = set()

    # ------------------------------------------------------------------ inputs
    def _bucket(self, now: float) -> list:
        sec = int(now)
        if not self.buckets or self.buckets[-1][0] != sec:
            self.buckets.append([sec, 0, [], []])
            while self.buckets and self.buckets[0][0] <= sec - self.window_s:
                self.buckets.popleft()
        return self.buckets[-1]

    def observe(self, actions: list, now: float, created_of=None) -> None:
        """Called with every action list the service performs."""
        changed = False
        for a in actions:
            if isinstance(a, Emit):
                changed = True
                rid, ev = a.request_id, a.event
                if ev.get("type") == "token":
                    b = self._bucket(now)
                    b[1] += 1
                    prev = self.last_token.get(rid)
                    if prev is None:
                        created = created_of(rid) if created_of else self.created.get(rid)
                        if created is not None:
                            b[2].append(now - created)
                        self.first_token[rid] = (now, 1)
                    else:
                        b[3].append(now - prev)
                        first, n = self.first_token.get(rid, (now, 0))
                        self.first_token[rid] = (first, n + 1)
                    self.last_token[rid] = now
                else:  # done / error: the session is over
                    self.last_token.pop(rid, None)
                    self.first_token.pop(rid, None)
                    self.created.pop(rid, None)
            elif isinstance(a, Close):
                changed = True
        if changed or actions:
            self.touch()

    def observe_message(self, conn: str, m: dict, now: float) -> None:
        if m.get("type") != "heartbeat":
            self.touch()

    def touch(self) -> None:
        self.version += 1
        for ev in self._waiters:
            ev.set()

    # ------------------------------------------------------------------ outputs
    def series(self, now: float, offset: float = 0.0) -> dict:
        """Per-second points over the window: tokens/s, mean TTFT (ms), median ITL (ms);
        `offset` turns the monotonic seconds into epoch seconds for the page."""
        end = int(now)
        by_sec = {b[0]: b for b in self.buckets}
        t, tok, ttft, itl = [], [], [], []
        for sec in range(end - self.window_s + 1, end + 1):
            b = by_sec.get(sec)
            t.append(round(sec + offset, 3))
            tok.append(b[1] if b else 0)
            ttft.append(round(1000 * sum(b[2]) / len(b[2]), 2) if b and b[2] else None)
            itl.append(round(1000 * sorted(b[3])[len(b[3]) // 2], 2) if b and b[3] else None)
        return {"t": t, "tok_s": tok, "ttft_ms": ttft, "itl_ms": itl}

    def snapshot(self, status: dict, core, now: float, wall: float) -> dict:
        """A JSON-ready view of the cluster. `status` is Coordinator.status(now); `core` the
        Coordinator itself, read only (capabilities, weight sizes, in-flight steps)."""
        to_wall = lambda t: round(wall - (now - t), 3)  # noqa: E731 - monotonic -> epoch seconds
        stages = status["stages"]
        busy = {st.inflight.worker for st in core.stages if st.inflight}
        blob = core.blob_info
        workers = []
        for w in status["workers"]:
            rec = core.workers.get(w["worker_id"])
            caps = rec.caps if rec else {}
            profile = caps.get("profile") or {}
            held = [stages[i] for i in w["stages"] if i < len(stages)]
            used = 0
            for st in held:
                a, b = st["layers"]
                used += sum(blob[f"layer:{i}"].size for i in range(a, b)) + (blob["head"].size if st["head"] else 0)
            state = w["state"]
            if state == "quarantined":
                state = "fenced"
            elif state == "ready" and w["worker_id"] in busy:
                state = "busy"
            progress = None
            if state == "loading":  # the worker's last load_progress report (Coordinator keeps it)
                got, total = (w.get("load_progress") or {}).get("received_bytes", 0), (w.get("load_progress") or {}).get("total_bytes", 0)
                progress = round(got / total, 3) if total else None
            if w["local"]:
                kind = "coordinator (local compute)"
            elif caps.get("browser") or caps.get("user_agent"):
                kind = caps.get("browser") or caps.get("user_agent")
            elif profile.get("name"):
                kind = f"simulated: {profile['name']}" + (" (hidden)" if profile.get("hidden") else "")
            else:
                kind = caps.get("kind") or "?"
            workers.append({
                "id": w["worker_id"], "name": w["name"], "kind": kind, "backend": w["backend"] or "?",
                "adapter": w["adapter"] or caps.get("platform") or "", "state": state, "progress": progress,
                "layers": [st["layers"] + ([True] if st["head"] else []) for st in held],
                "primary_of": [st["index"] for st in held if st["holders"][:1] == [w["worker_id"]]],
                "memory_used": used, "memory_budget": w["memory_bytes"], "step_ms": w["last_step_ms"], "rtt_ms": w.get("rtt_ms"),
                "heartbeat_age_ms": None if w["local"] else w["heartbeat_age_ms"], "steps": w["steps"], "local": w["local"],
                # its place in the plan, or why it is off the critical path; measurements clamped
                "plan": w.get("plan"), "flagged": w.get("flagged"),
            })
        sessions = []
        for s in status["sessions"]:
            first, n = self.first_token.get(s["request_id"], (None, 0))
            rate = (n - 1) / (now - first) if first is not None and n > 1 and now > first else None
            sessions.append({**s, "tok_s": round(rate, 2) if rate else None})
        return {
            "t": round(wall, 3), "model": status["model"], "plan_version": status["plan_version"],
            "degraded": status["degraded"], "unserved_reason": status.get("unserved_reason"), "workers": workers,
            "stages": [{"index": s["index"], "layers": s["layers"], "head": s["head"], "holders": s["holders"],
                        "ready": s["ready"], "busy": s["busy"], "queued": s["queued"], "pipeline": s.get("pipeline", 0)} for s in stages],
            "sessions": sessions, "counters": status["counters"],
            "speculation": status.get("speculation"),  # acceptance rate and tokens per trip in all
            "timeline": self.timeline(core.events, now, wall),
            "series": self.series(now, offset=wall - now),
        }

    @staticmethod
    def timeline(events, now: float, wall: float, limit: int = 60) -> list[dict]:
        """Failures, detections and recoveries, newest first, each with its duration where one
        applies: detection (silence before a death was declared) and recovery (detection to
        the next token)."""
        out = []
        for e in events:
            kind = e.get("kind")
            if kind not in TIMELINE_KINDS:
                continue
            item = {"t": round(wall - (now - e["t"]), 3), "kind": kind, "worker": e.get("worker"), "stage": e.get("stage")}
            if kind in ("death", "quarantine"):
                item["text"] = e.get("reason", "")
                item["duration_s"] = e.get("last_seen_s")
                item["duration_label"] = "detected after" if "silent" in item["text"] else "last heard"
            elif kind == "recovered":
                item["text"] = f"stage {e['stage']} served again"
                item["duration_s"] = e.get("recovery_s")
                item["duration_label"] = "recovery"
            elif kind == "silent":
                item["text"] = "no heartbeat"
                item["duration_s"] = e.get("silent_s")
                item["duration_label"] = "silent for"
            elif kind == "rebuild":
                item["text"] = f"stage {e['stage']} rebuilt on {e.get('worker')} ({e.get('sessions', 0)} sessions replayed)"
            elif kind == "plan":
                pipes = {st.get("pipeline", 0) for st in e.get("stages", []) if not st.get("retiring")}
                depth = sum(1 for st in e.get("stages", []) if st.get("pipeline", 0) == 0 and not st.get("retiring"))
                item["text"] = (f"plan v{e.get('version')}: " + (f"{len(pipes)} pipelines of {depth} stage(s)" if len(pipes) > 1
                                else f"{depth} stages") + (" (a replica added)" if e.get("extended") else "")
                                + (", the old plan serving while it loads" if any(st.get("retiring") for st in e.get("stages", [])) else ""))
            elif kind == "retired":
                item["text"] = f"the old plan's {len({st.get('pipeline') for st in e.get('stages', [])})} pipeline(s) handed over"
            elif kind == "join":
                item["text"] = f"{e.get('name')} joined"
            elif kind == "suspect":
                item["text"] = f"step {e.get('step_id')} overdue"
            else:
                item["text"] = str(e.get("reason") or e.get("message") or e.get("detail") or "")
            out.append(item)
        return out[::-1][:limit]

    # ------------------------------------------------------------------ waiting
    def waiter(self) -> asyncio.Event:
        ev = asyncio.Event()
        self._waiters.add(ev)
        return ev

    def drop(self, ev: asyncio.Event) -> None:
        self._waiters.discard(ev)


def _compat(matrix) -> dict:
    """The browser compatibility matrix from the benchmark history: `serve` hands in the function
    that reads it (service.compat_matrix, tabshard/compat_matrix.py), None when there is none."""
    if matrix is None:
        return {"rows": [], "error": "this coordinator was started without a compatibility matrix"}
    try:
        return matrix()
    except Exception as exc:  # the matrix is a nicety: never break the live view for it
        return {"rows": [], "error": f"{type(exc).__name__}: {exc}"}


def routes(service) -> list:
    feed = DashboardFeed()

    def created_of(rid):
        c = service.clients.get(rid)
        return c.created if c is not None else None

    service.observers.append(lambda actions, now: feed.observe(actions, now, created_of))
    service.message_observers.append(feed.observe_message)
    service.dashboard = feed

    def snapshot() -> dict:
        now = time.monotonic()
        st = service.status()
        return feed.snapshot(st, service.core, now, time.time())

    async def page(request):
        index = asset_dir() / "index.html"
        if not index.exists():
            return HTMLResponse("dashboard assets missing: run `npm ci && npm run build` in coordinator/web", 503)
        return FileResponse(index, headers={"Cache-Control": "no-cache"})

    async def snapshot_json(request):
        return JSONResponse(snapshot())

    async def compat_json(request):
        return JSONResponse(await asyncio.to_thread(_compat, service.compat_matrix))

    async def socket(ws: WebSocket):
        from coordinator.security import set_frame_limit

        set_frame_limit(ws, 4096)  # the page sends nothing: no 64 MiB frame is buffered for it either
        await ws.accept()
        changed = feed.waiter()
        receiver = asyncio.create_task(ws.receive())  # the page sends nothing; this sees it leave
        last_key, last_sent = None, 0.0
        try:
            while True:
                snap = snapshot()
                key = json.dumps({k: v for k, v in snap.items() if k != "t"}
                                 | {"workers": [{**w, "heartbeat_age_ms": None} for w in snap["workers"]]}, sort_keys=True)
                mono = time.monotonic()
                if key != last_key or mono - last_sent >= REFRESH_S:
                    await ws.send_text(json.dumps(snap))
                    last_key, last_sent = key, mono
                changed.clear()
                waiter = asyncio.create_task(changed.wait())
                done, _ = await asyncio.wait({receiver, waiter}, timeout=REFRESH_S, return_when=asyncio.FIRST_COMPLETED)
                waiter.cancel()
                if receiver in done:
                    msg = receiver.result()
                    if msg["type"] == "websocket.disconnect":
                        return
                    receiver = asyncio.create_task(ws.receive())
                await asyncio.sleep(max(0.0, 1 / MAX_PUSH_HZ - (time.monotonic() - mono)))
        except (WebSocketDisconnect, RuntimeError, ConnectionError):
            return
        finally:
            feed.drop(changed)
            receiver.cancel()

    return [
        Route("/dashboard", page),
        Route("/dashboard/snapshot.json", snapshot_json),
        Route("/dashboard/compat.json", compat_json),
        Mount("/dashboard/static", app=StaticFiles(directory=str(asset_dir()), check_dir=False), name="dashboard-static"),
        WebSocketRoute("/ws/dashboard", socket),
    ]
