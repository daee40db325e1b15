"""HTTP and WebSocket endpoints (Starlette on uvicorn): workers join at /ws/worker, clients use
an OpenAI-compatible API (SSE streaming or not), a WebSocket token stream at /v1/stream,
/health and /status."""
from __future__ import annotations

import asyncio
import contextlib
import json
import time
import uuid

from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import JSONResponse, StreamingResponse
from starlette.routing import Route, WebSocketRoute
from starlette.websockets import WebSocket, WebSocketDisconnect

from coordinator.security import AccessGuard, RateLimit
from coordinator.server import CoordinatorService
from tabshard import wire
from tabshard.errors import ConfigError
from tabshard.sampling import CANDIDATES, SamplingParams

MODEL_ID = "smollm2-135m-instruct"
# numeric request fields: (type, default, lowest, highest), checked by `_num`; null means the
# default. coordinator/openapi.py documents these very tables (GET /openapi.json).
SAMPLING_FIELDS = {"temperature": (float, 1.0, 0.0, 2.0), "top_p": (float, 1.0, 0.0, 1.0),
                   "top_k": (int, 0, 0, CANDIDATES), "seed": (int, None, 0, 2**64 - 1)}
N_FIELD = (int, 1, 1, 1)
DEFAULT_MAX_TOKENS = 256
FLAGS = ("stream", "greedy")  # booleans (null: false)


def max_tokens_field(limits) -> tuple:
    return (int, min(DEFAULT_MAX_TOKENS, limits.max_output_tokens), 1, limits.max_output_tokens)


class BadRequest(Exception):
    def __init__(self, message: str, param: str | None = None, status: int = 400):
        super().__init__(message)
        self.param, self.status = param, status


def _error(message: str, status: int, param: str | None = None, kind: str = "invalid_request_error") -> JSONResponse:
    headers = {"Retry-After": "1"} if status in (429, 503) else None
    return JSONResponse({"error": {"message": message, "type": kind, "param": param, "code": None}}, status_code=status,
                        headers=headers)


def _num(body: dict, key: str, kind, default, lo=None, hi=None):
    v = body.get(key, default)
    if v is None:
        return default
    if kind is float and isinstance(v, int) and not isinstance(v, bool):
        v = float(v)
    if kind is int and isinstance(v, float) and v.is_integer():
        v = int(v)  # JSON has one number type: 2.0 is the integer 2
    if not isinstance(v, kind) or isinstance(v, bool):
        raise BadRequest(f"'{key}' must be a {kind.__name__}", key)
    if (lo is not None and v < lo) or (hi is not None and v > hi):
        raise BadRequest(f"'{key}' must be between {lo} and {hi}, got {v}", key)
    return v


def _flag(body: dict, key: str) -> bool:
    v = body.get(key)
    if v is not None and not isinstance(v, bool):
        raise BadRequest(f"'{key}' must be a boolean", key)
    return bool(v)


def _text(s: str, param: str) -> str:
    try:
        s.encode("utf-8")
    except UnicodeEncodeError:
        raise BadRequest(f"'{param}' is not valid Unicode (it holds a lone surrogate)", param) from None
    return s


def sampling_from_body(body: dict) -> SamplingParams:
    temperature, top_p, top_k, seed = (_num(body, k, *rule) for k, rule in SAMPLING_FIELDS.items())
    greedy = _flag(body, "greedy") or temperature == 0.0
    try:
        return SamplingParams(greedy=greedy, temperature=temperature or 1.0, top_p=top_p or 1.0, top_k=top_k, seed=seed)
    except ConfigError as exc:
        raise BadRequest(str(exc)) from None


def build_app(service: CoordinatorService, model_id: str = MODEL_ID) -> Starlette:
    tok = service.tokenizer
    limits = service.settings

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
        messages = body.get("messages")
        if not isinstance(messages, list) or not messages:
            raise BadRequest("'messages' must be a non-empty list", "messages")
        clean = []
        for i, m in enumerate(messages):
            if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
                raise BadRequest(f"messages[{i}] needs string 'role' and 'content'", f"messages.{i}")
            clean.append({"role": _text(m["role"], f"messages.{i}.role"), "content": _text(m["content"], f"messages.{i}.content")})
        return tok.encode(tok.render_chat(clean))

    def prompt_ids_from_completion(body: dict) -> list[int]:
        prompt = body.get("prompt")
        if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
            prompt = prompt[0]
        if not isinstance(prompt, str) or not prompt:
            raise BadRequest("'prompt' must be a non-empty string", "prompt")
        return tok.encode(_text(prompt, "prompt"))

    async def run_request(body: dict, chat: bool):
        if body.get("model") not in (None, model_id):
            raise BadRequest(f"model {body.get('model')!r} is not served here; use {model_id!r}", "model", 404)
        ids = prompt_ids_from_chat(body) if chat else prompt_ids_from_completion(body)
        max_tokens = _num(body, "max_tokens", *max_tokens_field(limits))
        max_tokens = _num(body, "max_completion_tokens", int, max_tokens, *max_tokens_field(limits)[2:])
        _num(body, "n", *N_FIELD)
        for key in FLAGS:
            _flag(body, key)
        params = sampling_from_body(body)
        check_admission(ids, "messages" if chat else "prompt")
        return service.open_request(ids, max_tokens, params)

    async def read_body(request: Request) -> bytes | None:
        """The request body, or None past max_request_bytes (read no further: a huge body would
        otherwise sit in memory and be tokenized on the event loop before any limit applies)."""
        declared = request.headers.get("content-length", "")
        if declared.isdigit() and int(declared) > limits.max_request_bytes:
            return None
        data = bytearray()
        async for piece in request.stream():
            data += piece
            if len(data) > limits.max_request_bytes:
                return None
        return bytes(data)

    async def completions(request: Request, chat: bool):
        raw = await read_body(request)
        if raw is None:
            return _error(f"the body exceeds max_request_bytes ({limits.max_request_bytes} bytes)", 413)
        try:
            body = json.loads(raw)
        except Exception:
            return _error("the body is not valid JSON", 400)
        if not isinstance(body, dict):
            return _error("the body must be a JSON object", 400)
        try:
            rid, client = await run_request(body, chat)
        except BadRequest as exc:
            return _error(str(exc), exc.status, exc.param, "overloaded" if exc.status == 429 else "invalid_request_error")
        created = int(time.time())
        obj = "chat.completion" if chat else "text_completion"
        oid = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex[:24]}"

        def usage():
            return {"prompt_tokens": client.prompt_tokens, "completion_tokens": len(client.tokens),
                    "total_tokens": client.prompt_tokens + len(client.tokens)}

        if body.get("stream"):  # a boolean (run_request checked)
            def sse_chunk(text: str, finish_reason: str | None, **extra) -> str:
                choice = ({"index": 0, "delta": {"content": text} if text else {}, "finish_reason": finish_reason} if chat
                          else {"index": 0, "text": text, "finish_reason": finish_reason, "logprobs": None})
                chunk = {"id": oid, "object": "chat.completion.chunk" if chat else obj, "created": created,
                         "model": model_id, "choices": [choice], **extra}
                return f"data: {json.dumps(chunk)}\n\n"

            async def events():
                finished = False
                try:
                    if chat:
                        first = {"id": oid, "object": "chat.completion.chunk", "created": created, "model": model_id,
                                 "choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}, "finish_reason": None}]}
                        yield f"data: {json.dumps(first)}\n\n"
                    while True:
                        ev = await client.queue.get()
                        if ev["type"] == "rewind":
                            # no OpenAI field withdraws text: an extension field says how much to drop
                            yield sse_chunk("", None, tabshard_rewind={"index": ev["index"], "retract_chars": ev["retract_chars"],
                                                                       "reason": ev["reason"]})
                        elif ev["type"] == "token":
                            if ev["text"]:
                                yield sse_chunk(ev["text"], None)
                        elif ev["type"] == "done":
                            finished = True
                            yield sse_chunk("", ev["finish_reason"], usage=usage())
                            yield "data: [DONE]\n\n"
                            return
                        else:
                            finished = True
                            yield f"data: {json.dumps({'error': {'message': ev['message'], 'type': ev['code'], 'retriable': ev.get('retriable', False)}})}\n\n"
                            return
                finally:
                    service.close_request(rid, cancelled=not finished)

            return StreamingResponse(events(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})

        finished = False
        try:
            while True:
                # a client that goes away while we wait cancels its work
                get = asyncio.ensure_future(client.queue.get())
                while not get.done():
                    await asyncio.wait([get], timeout=0.25)
                    if not get.done() and await request.is_disconnected():
                        get.cancel()
                        return _error("client disconnected", 499)
                ev = get.result()
                if ev["type"] in ("token", "rewind"):
                    continue  # the answer is built from client.tokens, already rewound
                if ev["type"] == "done":
                    finished = True
                    break
                if ev["type"] == "error":
                    finished = True
                    status = 429 if ev["code"] == "overloaded" else 503 if ev.get("retriable") else 400
                    return _error(ev["message"], status, kind=ev["code"])
        finally:
            service.close_request(rid, cancelled=not finished)
        text = tok.decode([t for t in client.tokens if t != service.core.config.eos_id])
        choice = ({"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": ev["finish_reason"], "logprobs": None}
                  if chat else {"index": 0, "text": text, "finish_reason": ev["finish_reason"], "logprobs": None})
        return JSONResponse({"id": oid, "object": obj, "created": created, "model": model_id, "choices": [choice],
                             "usage": usage()})

    async def chat_completions(request: Request):
        return await completions(request, chat=True)

    async def text_completions(request: Request):
        return await completions(request, chat=False)

    async def models(request: Request):
        return JSONResponse({"object": "list", "data": [{"id": model_id, "object": "model", "created": 0, "owned_by": "tabshard"}]})

    async def health(request: Request):
        st = service.core
        ok = bool(st.stages) and all(s.primary for s in st.stages)
        return JSONResponse({"ok": ok, "workers": sum(w.alive for w in st.workers.values())}, status_code=200 if ok else 503)

    async def status(request: Request):
        return JSONResponse(service.status())

    async def openapi(request: Request):
        from coordinator.openapi import build_spec  # it reads this module's tables

        return JSONResponse(build_spec(limits, model_id, api_key_required=bool(service.api_key)))

    async def worker_socket(ws: WebSocket):
        await ws.accept()
        await service.serve_worker(ws)

    async def token_stream(ws: WebSocket):
        """Client token stream: send `generate` / `cancel` (msgpack), receive `token` / `done` / `error`."""
        await ws.accept()
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
                data = await ws.receive_bytes()
                try:
                    if not rate.allow(time.monotonic()):
                        service.refusals["rate"] += 1
                        raise wire.ProtocolError("rate_limited", f"more than {limits.client_max_msgs_per_s} messages a "
                                                 "second on this socket; this one was dropped", None)
                    m = wire.decode(data, wire.CLIENT_LIMITS)
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
            Route("/health", health),
            Route("/status", status),
            Route("/openapi.json", openapi),
            WebSocketRoute("/ws/worker", worker_socket),
            WebSocketRoute("/v1/stream", token_stream),
        ],
        lifespan=lifespan,
        middleware=[Middleware(AccessGuard, service=service)],
    )
