"""HTTP and WebSocket endpoints (Starlette on uvicorn): workers join at /ws/worker, clients use
an OpenAI-compatible API (SSE streaming or not), a WebSocket token stream at /v1/stream,
/health and /status."""
from __future__ import annotations

import asyncio
import contextlib
import math
import re
import time

from starlette.applications import Starlette
from starlette.convertors import Convertor, register_url_convertor
from starlette.middleware import Middleware
from starlette.middleware.cors import CORSMiddleware
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route, WebSocketRoute
from starlette.websockets import WebSocket, WebSocketDisconnect

from coordinator.security import AccessGuard, RateLimit
from coordinator.server import PRE_HELLO_LIMITS, CoordinatorService, peer_address
from protocol import wire
from coordinator.request_fields import (MODEL_ID, BadRequest, BodyUnread, _error, _num, _text, max_tokens_field,
                                        sampling_from_body)

JSON_NUMBER = re.compile(r"-?(0|[1-9][0-9]*)(\.[0-9]+)?([eE][+-]?[0-9]+)?")


async def body_unread(request: Request, exc: BodyUnread) -> JSONResponse:
    return _error("the request body did not arrive in time (body_timeout_s) or the client left", 408)


class ModelName(Convertor):
    """A model name in a path: any characters, slashes ("org/model") and control characters
    included (Starlette's `path` stops at a newline, and that request would get a plain-text 404)."""

    regex = "[\\s\\S]+"

    def convert(self, value: str) -> str:
        return value

    def to_string(self, value: str) -> str:
        return value


register_url_convertor("model_name", ModelName())


def cors_middleware(limits) -> list:
    """Browser web apps on these origins (the cors_origins setting, comma-separated, "*" for
    any) may call the API, preflight included; none by default."""
    origins = [o.strip() for o in getattr(limits, "cors_origins", "").split(",") if o.strip()]
    if not origins:
        return []
    return [Middleware(CORSMiddleware, allow_origins=origins, allow_methods=["GET", "POST", "OPTIONS"],
                       allow_headers=["Authorization", "Content-Type", "X-API-Key"],
                       expose_headers=["X-Tabshard-Seed", "Retry-After"], max_age=600)]


def build_app(service: CoordinatorService, model_id: str = MODEL_ID, served_model_names: list[str] | None = None) -> Starlette:
    """served_model_names: the names clients may ask for (vLLM's --served-model-name): the first
    is the model's id, the others aliases; default [model_id]."""
    from coordinator import openai_api
    from coordinator.openai_request import parse_messages
    from coordinator.metrics import Metrics

    names = list(dict.fromkeys(served_model_names or [model_id]))
    model_id = names[0]
    tok = service.tokenizer
    limits = service.settings
    metrics = Metrics(service)
    service.metrics = metrics

    def check_admission(ids: list[int], param: str) -> None:
        """Refuse before any work: a prompt over the limit (400), or a full house (429, retry)."""
        if not ids:
            raise BadRequest("the prompt has no tokens (only characters the tokenizer drops)", param)
        if len(ids) > limits.max_prompt_tokens:
            raise BadRequest(f"the prompt has {len(ids)} tokens; at most {limits.max_prompt_tokens} are allowed", param)
        if len(service.core.sessions) >= limits.max_sessions:
            service.refusals["overloaded"] += 1
            raise BadRequest(f"{len(service.core.sessions)} requests are running, the most this server takes; retry later",
                             None, 429)

    def prompt_ids_from_chat(body: dict) -> list[int]:
        return tok.encode_chat(parse_messages(body.get("messages"), [], "none"))  # content is text, never markers

    def prompt_ids_from_completion(body: dict) -> list[int]:
        prompt = body.get("prompt")
        if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
            prompt = prompt[0]
        if not isinstance(prompt, str) or not prompt:
            raise BadRequest("'prompt' must be a non-empty string", "prompt")
        return tok.encode(_text(prompt, "prompt"), special=False)  # "<|im_end|>" in a prompt is text

    async def chat_completions(request: Request):
        return await openai_api.handle(request, service, True, names, metrics)

    async def text_completions(request: Request):
        return await openai_api.handle(request, service, False, names, metrics)

    def model_card(name: str) -> dict:
        return {"id": name, "object": "model", "created": 0, "owned_by": "tabshard", "root": model_id,
                "max_model_len": min(limits.max_ctx, service.core.config.context)}

    async def models(request: Request):
        return JSONResponse({"object": "list", "data": [model_card(n) for n in names]})

    async def model_detail(request: Request):
        name = request.path_params["model"]
        if name not in names:
            return _error(f"model {name!r} is not served here; use {model_id!r}", 404, "model", "model_not_found")
        return JSONResponse(model_card(name))

    async def root(request: Request):
        return JSONResponse({"name": "tabshard coordinator", "model": model_id, "aliases": names[1:],
                             "api": "/v1 (OpenAI-compatible)", "openapi": "/openapi.json", "status": "/status",
                             "health": "/health", "metrics": "/metrics", "dashboard": "/dashboard", "docs": "docs/ in the repository"})

    async def prometheus(request: Request):
        return metrics.response()

    async def health(request: Request):
        st = service.core
        ok = bool(st.stages) and all(s.primary for s in st.stages)
        return JSONResponse({"ok": ok, "workers": sum(w.alive for w in st.workers.values())}, status_code=200 if ok else 503)

    async def status(request: Request):
        since = request.query_params.get("events_since")
        if since is None:
            return JSONResponse(service.status())
        # a JSON number only, as the spec says (Python's float() also takes "1_0", " 1", "nan")
        t = float(since) if JSON_NUMBER.fullmatch(since) else float("nan")
        if not math.isfinite(t):
            return _error(f"events_since must be a finite number (a coordinator event time), got {since[:40]!r}",
                          400, "events_since")
        return JSONResponse(service.status(events_since=t))

    async def openapi(request: Request):
        from coordinator.openapi import build_spec

        return JSONResponse(build_spec(limits, model_id, api_key_required=bool(service.api_key), aliases=tuple(names[1:])))

    async def worker_socket(ws: WebSocket):
        why = service.admit(ws, PRE_HELLO_LIMITS.max_frame_bytes)  # before accept: the first frame meets it
        await ws.accept()
        if why is not None:
            await ws.close(code=1013, reason=why[:120])
            return
        await service.serve_worker(ws)

    async def token_stream(ws: WebSocket):
        """Client token stream: send `generate` / `cancel` (msgpack), receive `token` / `done` / `error`."""
        why = service.admit(ws, wire.CLIENT_LIMITS.max_frame_bytes)  # a client never sends 64 MiB
        await ws.accept()
        if why is not None:
            await ws.close(code=1013, reason=why[:120])
            return
        active: dict[str, asyncio.Task] = {}
        rate = RateLimit(limits.client_max_msgs_per_s)

        async def pump(rid, client, request_id):
            finished = False
            try:
                while True:
                    ev = await client.queue.get()
                    if ev["type"] == "token":
                        await ws.send_bytes(wire.encode(wire.make("token", request_id=request_id, index=ev["index"], token_id=ev["token_id"], text=ev["text"])))
                    elif ev["type"] == "rewind":
                        await ws.send_bytes(wire.encode(wire.make("rewind", request_id=request_id, index=ev["index"],
                                                                  retract_chars=ev["retract_chars"], reason=ev["reason"])))
                    elif ev["type"] == "done":
                        finished = True
                        await ws.send_bytes(wire.encode(wire.make("done", request_id=request_id, finish_reason=ev["finish_reason"],
                                                                  usage={"prompt_tokens": client.prompt_tokens, "completion_tokens": len(client.tokens)})))
                        return
                    else:
                        finished = True
                        await ws.send_bytes(wire.encode(wire.make("error", code=ev["code"], message=ev["message"], field=None)))
                        return
            finally:
                service.close_request(rid, cancelled=not finished)
                active.pop(request_id, None)

        try:
            while True:
                frame = await ws.receive()
                if frame["type"] == "websocket.disconnect":
                    break
                data = frame.get("bytes")
                try:
                    if data is None:
                        raise wire.ProtocolError("malformed", "text frames are not part of the protocol; send binary msgpack", None)
                    if not rate.allow(time.monotonic()):
                        service.refusals["rate"] += 1
                        raise wire.ProtocolError("rate_limited", f"more than {limits.client_max_msgs_per_s} messages a "
                                                 "second on this socket; this one was dropped", None)
                    m = wire.decode(data, wire.CLIENT_LIMITS)
                    if m["type"] == "generate" and m["request_id"] in active:  # would orphan the running one
                        raise wire.ProtocolError("duplicate_request", f"request {m['request_id']!r} is running on this "
                                                 "socket; cancel it or use another request_id", "request_id")
                    if m["type"] == "generate":
                        body = {k: m[k] for k in ("temperature", "top_p", "top_k", "seed", "greedy") if k in m}
                        params = sampling_from_body(body)
                        if m.get("messages"):
                            ids = prompt_ids_from_chat({"messages": m["messages"]})
                        else:
                            ids = prompt_ids_from_completion({"prompt": m.get("prompt")})
                        max_tokens = _num({"max_tokens": m.get("max_tokens")}, "max_tokens", *max_tokens_field(limits))
                        check_admission(ids, "messages" if m.get("messages") else "prompt")
                        rid, client = service.open_request(ids, max_tokens, params)
                        active[m["request_id"]] = asyncio.create_task(pump(rid, client, m["request_id"]))
                    elif m["type"] == "cancel":
                        task = active.get(m["request_id"])
                        if task:
                            task.cancel()
                    else:
                        raise wire.ProtocolError("unknown_type", f"clients may send generate or cancel, not {m['type']!r}", "type")
                except wire.ProtocolError as err:
                    await ws.send_bytes(wire.encode(err.to_message()))
                except BadRequest as exc:
                    await ws.send_bytes(wire.encode(wire.make("error", code="overloaded" if exc.status == 429 else "bad_request", field=exc.param, message=str(exc))))
        except (WebSocketDisconnect, RuntimeError):
            pass
        finally:
            for task in list(active.values()):
                task.cancel()
            service.address_limits.release(peer_address(ws))

    @contextlib.asynccontextmanager
    async def lifespan(app):
        await service.start()
        try:
            yield
        finally:
            await service.stop()

    # pages and sockets of other areas (browser tab page, dashboard) register themselves here
    extra_routes = []
    import importlib

    for module in ("coordinator.tab_routes", "coordinator.dashboard"):
        try:
            mod = importlib.import_module(module)
        except ModuleNotFoundError as exc:
            if exc.name != module:
                raise
            continue
        extra_routes += mod.routes(service)

    return Starlette(
        routes=extra_routes + [
            Route("/v1/chat/completions", chat_completions, methods=["POST"]),
            Route("/v1/completions", text_completions, methods=["POST"]),
            Route("/v1/models", models),
            Route("/v1/models/{model:model_name}", model_detail),
            Route("/", root),
            Route("/metrics", prometheus),
            Route("/health", health),
            Route("/status", status),
            Route("/openapi.json", openapi),
            WebSocketRoute("/ws/worker", worker_socket),
            WebSocketRoute("/v1/stream", token_stream),
        ],
        lifespan=lifespan,
        exception_handlers={BodyUnread: body_unread},
        # CORS outermost: a browser's preflight (OPTIONS, no credentials) is answered before the guard
        middleware=[*cors_middleware(limits), Middleware(AccessGuard, service=service)],
    )
