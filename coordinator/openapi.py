"""The coordinator's HTTP API as an OpenAPI 3.1 document, served at GET /openapi.json.

Built per server from the tables coordinator/request_fields.py and coordinator/openai_request.py validate
requests with (SAMPLING_FIELDS, N_FIELD, FLAGS, max_tokens_field, FIELDS, NEUTRAL) and the
server's own limits (max_output_tokens, max_prompt_tokens), so the ranges it states are the
ones enforced; a field not described is refused (400 naming it). WebSocket endpoints
(/v1/stream, /ws/worker, /ws/dashboard) are not HTTP operations and are not described here.
The API key is described as a header scheme only; its value never appears.

tests/test_openapi_fuzz.py checks that every HTTP route of the app is described, and fuzzes
the description against a running server with schemathesis.
"""
from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version

from coordinator import request_fields as api
from coordinator import openai_request as oa
from coordinator.tab_routes import KERNEL_DIR

JSON = "application/json"
NULL = {"type": "null"}


def _ref(name: str) -> dict:
    return {"$ref": f"#/components/schemas/{name}"}


def _field(rule: tuple, description: str) -> dict:
    """A JSON Schema for one `_num` rule (type, default, lowest, highest); null means the default."""
    kind, default, lo, hi = rule
    schema: dict = {"type": ["integer" if kind is int else "number", "null"], "description": description}
    if lo is not None:
        schema["minimum"] = lo
    if hi is not None:
        schema["maximum"] = hi
    if default is not None:
        schema["default"] = default
    return schema


def _json(schema: dict, description: str, headers: dict | None = None) -> dict:
    out = {"description": description, "content": {JSON: {"schema": schema}}}
    if headers:
        out["headers"] = headers
    return out


def _text(media: str, description: str) -> dict:
    return {"description": description, "content": {media: {"schema": {"type": "string"}}}}


RETRY_AFTER = {"Retry-After": {"description": "seconds to wait before retrying", "schema": {"type": "string"}}}


def _neutral(value) -> dict:
    """A field accepted only in the value that asks for nothing."""
    if value == {}:
        return {"type": ["object", "null"], "maxProperties": 0, "description": "accepted only empty"}
    return {"enum": [value, None], "description": f"accepted only as {value!r} (anything else is refused)"}


def _generation_fields(limits, model_ids: list, chat: bool) -> dict:
    max_tokens = _field(api.max_tokens_field(limits), "tokens to generate at most (the server's max_output_tokens is "
                                                       "the maximum; fewer where the context runs out)")
    descriptions = {"temperature": "0 means greedy decoding", "top_p": "nucleus sampling mass (0 means 1)",
                    "top_k": "sample among the k most likely tokens (0: all candidates)",
                    "seed": "sampling seed: the same seed gives the same tokens",
                    "stream": "true: the answer comes as server-sent events (text/event-stream)",
                    "greedy": "true: always the most likely token (as temperature 0)"}
    descriptions["seed"] = "sampling seed: the same seed gives the same tokens (default: a fresh one, returned as seed)"
    descriptions["top_p"] = "nucleus sampling mass; 0 keeps only the most likely token (greedy)"
    top = oa.MAX_TOP_LOGPROBS
    fields = {
        "model": {"enum": [*model_ids, None], "description": "the model served, by its id or an alias (optional)"},
        "max_tokens": max_tokens,
        "max_completion_tokens": {**max_tokens, "description": "the same as max_tokens, and wins over it"},
        "n": _field(api.N_FIELD, "choices per request, each sampled with seed + its index; they share the prompt's KV"),
        **{k: _field(rule, descriptions[k]) for k, rule in api.SAMPLING_FIELDS.items()},
        **{k: {"type": ["boolean", "null"], "default": False, "description": descriptions[k]} for k in api.FLAGS},
        "stop": {"description": f"up to {oa.MAX_STOPS} strings that end the answer; they are not returned (nor streamed)",
                 "anyOf": [{"type": "string", "minLength": 1}, {"type": "null"},
                           {"type": "array", "maxItems": oa.MAX_STOPS, "items": {"type": "string", "minLength": 1}}]},
        "stream_options": {"type": ["object", "null"], "additionalProperties": False,
                           "properties": {"include_usage": {"type": ["boolean", "null"]}},
                           "description": "with stream only; include_usage: a last chunk with no choices carries the usage"},
        "user": {"type": ["string", "null"], "description": "an end-user id: accepted, not stored"},
        "metadata": {"type": ["object", "null"], "description": "accepted, not stored"},
        "parallel_tool_calls": {"type": ["boolean", "null"], "description": "at most one call is made either way"},
        "ignore_eos": {"type": ["boolean", "null"], "description": "vLLM's extension: go on past the end-of-sequence "
                                                                  "token up to max_tokens"},
        **{k: _neutral(v) for k, v in oa.NEUTRAL.items()},
    }
    if chat:
        fields.update({
            "logprobs": {"type": ["boolean", "null"], "description": "return each token's log-probability (exact, "
                                                                     "over the whole vocabulary)"},
            "top_logprobs": {"type": ["integer", "null"], "minimum": 0, "maximum": top,
                             "description": "and this many most likely alternatives (needs logprobs)"},
            "response_format": {"type": ["object", "null"], "required": ["type"],
                                "properties": {"type": {"enum": ["text", "json_object", "json_schema"]},
                                               "json_schema": {"type": "object"}},
                                "description": "json_object: a JSON object; json_schema: JSON matching "
                                               "json_schema.schema (grammar-constrained decoding)"},
            "tools": {"type": ["array", "null"], "minItems": 1, "items": {
                "type": "object", "required": ["type", "function"],
                "properties": {"type": {"const": "function"},
                               "function": {"type": "object", "required": ["name"],
                                            "properties": {"name": {"type": "string", "minLength": 1},
                                                           "description": {"type": ["string", "null"]},
                                                           "parameters": {"type": ["object", "null"]}}}}}},
            "tool_choice": {"anyOf": [{"enum": ["none", "auto", "required", None]},
                                      {"type": "object", "required": ["type", "function"]}],
                            "description": "required or a named function: the answer is a call (JSON constrained "
                                           "by the function's parameters), returned as tool_calls"},
        })
    else:
        fields["logprobs"] = {"type": ["integer", "null"], "minimum": 0, "maximum": top,
                              "description": "return each token's log-probability and this many alternatives"}
    return fields


def _schemas(limits, model_ids: list) -> dict:
    model_id = model_ids[0]
    prompt_note = (f"At most {limits.max_prompt_tokens} prompt tokens (after the chat template) are accepted, and "
                   "fewer where the model's context is shorter; a longer prompt, or one the tokenizer reduces to no "
                   "tokens, is refused with 400 (error.param names the field). A field not listed is refused "
                   "(400 naming it): none is silently ignored.")
    usage = {"type": "object", "required": ["prompt_tokens", "completion_tokens", "total_tokens"],
             "properties": {k: {"type": "integer", "minimum": 0} for k in ("prompt_tokens", "completion_tokens", "total_tokens")}}
    finish = {"enum": ["stop", "length", "tool_calls"]}
    logprobs = {"type": ["object", "null"], "description": "chat: {content: [{token, logprob, bytes, top_logprobs}]}; "
                                                          "completions: {tokens, token_logprobs, top_logprobs, text_offset}"}
    tool_calls = {"type": "array", "items": {"type": "object", "required": ["id", "type", "function"]}}

    def completion(obj: str, choice: dict, chunk: bool = False) -> dict:
        """An answer, or one chunk of a streamed answer (only the last chunk has usage)."""
        return {"type": "object", "required": ["id", "object", "created", "model", "choices"] + ([] if chunk else ["usage"]),
                "properties": {"id": {"type": "string"}, "object": {"const": obj}, "created": {"type": "integer"},
                               "model": {"enum": model_ids},
                               "choices": {"type": "array", "minItems": 0 if chunk else 1, "maxItems": api.N_FIELD[3],
                                           "items": choice},
                               "usage": {"anyOf": [_ref("Usage"), NULL]} if chunk else _ref("Usage"),
                               "seed": {"type": "integer", "description": "the seed used (choice i: seed + i)"}}}

    def event(answer_chunk: str) -> dict:
        """One server-sent event: its data a JSON chunk, a JSON error, or the closing [DONE]."""
        payload = {"anyOf": [_ref(answer_chunk), _ref("StreamError")]}
        return {"type": "object", "required": ["data"], "properties": {"data": {"anyOf": [
            {"const": "[DONE]"}, {"type": "string", "contentMediaType": JSON, "contentSchema": payload}]}}}

    stream_finish = {"enum": ["stop", "length", "tool_calls", None]}
    return {
        "ChatCompletionChunk": completion("chat.completion.chunk", chunk=True, choice={
            "type": "object", "required": ["index", "delta", "finish_reason"],
            "properties": {"index": {"type": "integer", "minimum": 0}, "finish_reason": stream_finish, "logprobs": logprobs,
                           "delta": {"type": "object", "properties": {"role": {"const": "assistant"},
                                                                      "content": {"type": "string"},
                                                                      "tool_calls": tool_calls}}}}),
        "TextCompletionChunk": completion("text_completion", chunk=True, choice={
            "type": "object", "required": ["index", "text", "finish_reason"],
            "properties": {"index": {"type": "integer", "minimum": 0}, "text": {"type": "string"},
                           "finish_reason": stream_finish, "logprobs": logprobs}}),
        "StreamError": {
            "type": "object", "required": ["error"], "description": "a failure after the stream began",
            "properties": {"error": {"type": "object", "required": ["message", "type", "retriable"],
                                     "properties": {"message": {"type": "string"}, "type": {"type": "string"},
                                                    "retriable": {"type": "boolean"}}}}},
        "ChatCompletionEvent": event("ChatCompletionChunk"),
        "TextCompletionEvent": event("TextCompletionChunk"),
        "Error": {
            "type": "object", "required": ["error"],
            "properties": {"error": {
                "type": "object", "required": ["message", "type", "param", "code"],
                "properties": {"message": {"type": "string"}, "type": {"type": "string"},
                               "param": {"type": ["string", "null"], "description": "the request field at fault"},
                               "code": {"type": ["integer", "null"]}}}},
        },
        "ChatMessage": {
            "type": "object", "required": ["role"], "additionalProperties": True,
            "properties": {"role": {"enum": sorted(oa.ROLES), "description": "developer is read as system"},
                           "content": {"anyOf": [{"type": "string"}, NULL, {"type": "array", "items": {
                               "type": "object", "required": ["type", "text"],
                               "properties": {"type": {"const": "text"}, "text": {"type": "string"}}}}],
                               "description": "text, a list of text parts, or null for an assistant message "
                                              "with tool_calls"},
                           "tool_calls": {"type": ["array", "null"]},
                           "tool_call_id": {"type": ["string", "null"]}},
        },
        "ChatCompletionRequest": {
            "type": "object", "required": ["messages"], "additionalProperties": False, "description": prompt_note,
            "properties": {"messages": {"type": "array", "minItems": 1, "items": _ref("ChatMessage")},
                           **_generation_fields(limits, model_ids, True)},
        },
        "CompletionRequest": {
            "type": "object", "required": ["prompt"], "additionalProperties": False, "description": prompt_note,
            "properties": {"prompt": {"oneOf": [{"type": "string", "minLength": 1},
                                                {"type": "array", "minItems": 1, "maxItems": 1,
                                                 "items": {"type": "string", "minLength": 1}}]},
                           **_generation_fields(limits, model_ids, False)},
        },
        "Usage": usage,
        "ChatCompletion": completion("chat.completion", {
            "type": "object", "required": ["index", "message", "finish_reason"],
            "properties": {"index": {"type": "integer", "minimum": 0}, "finish_reason": finish, "logprobs": logprobs,
                           "message": {"type": "object", "required": ["role", "content"],
                                       "properties": {"role": {"const": "assistant"}, "content": {"type": ["string", "null"]},
                                                      "tool_calls": tool_calls}}}}),
        "TextCompletion": completion("text_completion", {
            "type": "object", "required": ["index", "text", "finish_reason"],
            "properties": {"index": {"type": "integer", "minimum": 0}, "text": {"type": "string"}, "finish_reason": finish,
                           "logprobs": logprobs}}),
        "Model": {"type": "object", "required": ["id", "object", "created", "owned_by"],
                  "properties": {"id": {"enum": model_ids}, "object": {"const": "model"}, "created": {"type": "integer"},
                                 "owned_by": {"type": "string"}, "root": {"const": model_id},
                                 "max_model_len": {"type": "integer"}}},
        "ModelList": {
            "type": "object", "required": ["object", "data"],
            "properties": {"object": {"const": "list"}, "data": {"type": "array", "items": _ref("Model")}},
        },
        "Root": {"type": "object", "required": ["name", "model"],
                 "properties": {"name": {"type": "string"}, "model": {"const": model_id}}},
        "Health": {"type": "object", "required": ["ok", "workers"],
                   "properties": {"ok": {"type": "boolean"}, "workers": {"type": "integer", "minimum": 0}}},
        "Status": {
            "type": "object", "description": "the shard map: stages, workers, sessions, counters, recent events",
            "required": ["model", "plan_version", "degraded", "stages", "workers", "sessions", "counters", "events", "access"],
            "properties": {"model": {"type": "object"}, "plan_version": {"type": "integer"}, "degraded": {"type": "boolean"},
                           "unserved_reason": {"type": ["string", "null"], "description": "why the model cannot be served now, naming the resource that is short ('memory: ...', 'workers: ...'); null when it can"},
                           "stages": {"type": "array"}, "workers": {"type": "array"}, "sessions": {"type": "array"},
                           "counters": {"type": "object"}, "events": {"type": "array"},
                           "speculation": {"type": ["object", "null"], "description": "speculative decoding in all: mode, max_k, drafter (\"coordinator\", the drafting worker's id, or null), trips, drafted, accepted, tokens, rollbacks, acceptance_rate, tokens_per_trip (each session carries its own)"},
                           "access": {"type": "object", "required": ["api_key_required", "join_token_required", "allowed_origins"],
                                      "properties": {"api_key_required": {"type": "boolean"},
                                                     "join_token_required": {"type": "boolean"},
                                                     "allowed_origins": {"type": "array", "items": {"type": "string"}}}}},
        },
        "DashboardSnapshot": {
            "type": "object",
            "required": ["t", "model", "plan_version", "degraded", "workers", "stages", "sessions", "counters", "timeline", "series"],
            "properties": {"t": {"type": "number"}, "model": {"type": "object"}, "plan_version": {"type": "integer"},
                           "degraded": {"type": "boolean"}, "unserved_reason": {"type": ["string", "null"]},
                           "workers": {"type": "array"}, "stages": {"type": "array"},
                           "sessions": {"type": "array"}, "counters": {"type": "object"}, "timeline": {"type": "array"},
                           "series": {"type": "object"}, "speculation": {"type": ["object", "null"], "description": "speculative decoding in all: mode, max_k, drafter (\"coordinator\", the drafting worker's id, or null), trips, drafted, accepted, tokens, rollbacks, acceptance_rate, tokens_per_trip (each session carries its own)"}},
        },
        "CompatMatrix": {"type": "object", "required": ["rows"], "properties": {"rows": {"type": "array"}}},
    }


def _generation(summary: str, request: str, answer: str, chunk_object: str, secured: list, errors: dict) -> dict:
    """With "stream": true the 200 is text/event-stream; its schema describes one event (as
    OpenAPI 3.2's itemSchema does, and schemathesis reads a 3.1 event-stream schema)."""
    return {
        "summary": summary, "tags": ["OpenAI-compatible"], "security": secured,
        "requestBody": {"required": True, "content": {JSON: {"schema": _ref(request)}}},
        "responses": {
            "200": {"description": "the answer; with \"stream\": true, server-sent events instead: `data: {JSON}` chunks "
                                   f"(object \"{chunk_object}\"), the last with finish_reason and usage, then "
                                   "`data: [DONE]`; a failure mid-stream is a `data: {\"error\": {...}}` event",
                    "content": {JSON: {"schema": _ref(answer)}, "text/event-stream": {"schema": _ref(f"{answer}Event")}}},
            **errors,
        },
    }


def _version() -> str:
    try:
        return version("tabshard")
    except PackageNotFoundError:
        return "unknown"


def build_spec(limits, model_id: str = api.MODEL_ID, api_key_required: bool = False, aliases: tuple = ()) -> dict:
    """The OpenAPI document for a server with these limits (CoordinatorSettings), serving
    `model_id` (also known by `aliases`)."""
    model_ids = [model_id, *[a for a in aliases if a != model_id]]
    error = _ref("Error")
    responses = {
        "BadRequest": _json(error, "the body is not a JSON object, a field is missing, of the wrong type or out of "
                                   "range (error.param names it), the prompt is too long, or generation failed"),
        "Unauthorized": _json(error, "missing or wrong API key", {"WWW-Authenticate": {"schema": {"type": "string"}}}),
        "ModelNotFound": _json(error, "the model asked for is not served here (error.param is \"model\")"),
        "TooLarge": _json(error, f"the body is larger than max_request_bytes ({limits.max_request_bytes} bytes)"),
        "Overloaded": _json(error, "max_sessions requests are running: retry later", RETRY_AFTER),
        "Unavailable": _json(error, "no worker could serve the request in time (retriable)", RETRY_AFTER),
    }
    ref = lambda name: {"$ref": f"#/components/responses/{name}"}  # noqa: E731
    api_errors = {"401": ref("Unauthorized")} if api_key_required else {}
    gen_errors = {"400": ref("BadRequest"), **api_errors, "404": ref("ModelNotFound"), "413": ref("TooLarge"), "429": ref("Overloaded"),
                  "503": ref("Unavailable")}
    secured = [{"bearerAuth": []}, {"apiKeyHeader": []}] if api_key_required else [{}, {"bearerAuth": []}, {"apiKeyHeader": []}]
    html, not_found = "text/html; charset=utf-8", _text("text/plain", "no such file")
    token = {"name": "token", "in": "query", "required": False, "schema": {"type": "string"},
             "description": "the join token `tabshard serve` printed"}

    def path_param(name: str, description: str, examples: list) -> dict:
        return {"name": name, "in": "path", "required": True, "schema": {"type": "string", "examples": examples},
                "description": description}

    def get(summary: str, tag: str, responses: dict, **extra) -> dict:
        return {"get": {"summary": summary, "tags": [tag], "responses": responses, **extra}}

    paths = {
        "/v1/chat/completions": {"post": _generation("Chat completion (OpenAI-compatible)", "ChatCompletionRequest",
                                                     "ChatCompletion", "chat.completion.chunk", secured, gen_errors)},
        "/v1/completions": {"post": _generation("Text completion (OpenAI-compatible)", "CompletionRequest",
                                                "TextCompletion", "text_completion", secured, gen_errors)},
        "/v1/models": get("The model served (by its id and each alias)", "OpenAI-compatible",
                          {"200": _json(_ref("ModelList"), "the model, once per name"), **api_errors}, security=secured),
        "/v1/models/{model}": get("One model by its id or an alias", "OpenAI-compatible", {
            "200": _json(_ref("Model"), "the model"), **api_errors, "404": ref("ModelNotFound")}, security=secured,
            parameters=[path_param("model", "the model id or an alias", model_ids)]),
        "/": get("What this server is and where its endpoints are", "operations", {"200": _json(_ref("Root"), "a JSON index")}),
        "/metrics": get("Prometheus metrics", "operations", {"200": _text("text/plain", "the text exposition format")}),
        "/health": get("Whether every stage has a serving worker", "operations", {
            "200": _json(_ref("Health"), "every stage is served"),
            "503": _json(_ref("Health"), "some stage has no serving worker (or no plan yet)", None)}),
        "/status": get("The shard map: stages, workers, sessions, counters", "operations",
                       {"200": _json(_ref("Status"), "the coordinator's state"),
                        "400": _json(_ref("Error"), "events_since is not a finite number")},
                       parameters=[{"name": "events_since", "in": "query", "required": False,
                                    "schema": {"type": "number"},
                                    "description": "every retained event after this coordinator time "
                                                   "(events' `t`) instead of the last 50"}]),
        "/openapi.json": get("This document", "operations", {"200": _json({"type": "object"}, "OpenAPI 3.1")}),
        "/dashboard": get("The live dashboard page", "dashboard", {
            "200": _text(html, "the page"), "503": _text(html, "the dashboard's assets are not built")}),
        "/dashboard/snapshot.json": get("The dashboard's current view", "dashboard",
                                        {"200": _json(_ref("DashboardSnapshot"), "the snapshot the page draws")}),
        "/dashboard/compat.json": get("The browser compatibility matrix", "dashboard",
                                      {"200": _json(_ref("CompatMatrix"), "rows of profiles and what they support")}),
        "/dashboard/static/{path}": get("The dashboard's static files", "dashboard", {
            "200": {"description": "the file"}, "404": not_found},
            parameters=[path_param("path", "a file of the dashboard's assets", ["dashboard.js"])]),
        "/tab": get("The browser tab join page", "tabs", {
            "200": _text(html, "the page; it joins at /ws/worker"),
            "403": _text(html, "no or wrong join token, or a foreign Origin"),
            "503": _text(html, "the tab's assets are not built")}, parameters=[token]),
        "/tab/qr.svg": get("The tab join URL as a QR code", "tabs", {
            "200": _text("image/svg+xml", "the QR code"), "403": _text("text/plain", "wrong join token")},
            parameters=[token]),
        "/tab/static/{path}": get("The tab page's static files", "tabs", {"200": {"description": "the file"}, "404": not_found},
                                  parameters=[path_param("path", "a file of tab_worker/web/dist", ["page.js"])]),
        "/kernels/layer_program.json": get("The op order of a layer that both tab backends run", "tabs", {
            "200": _json({"type": "object"}, "kernels/layer_program.py's program")}),
        "/kernels/{name}.wgsl": get("A WGSL kernel the tabs run", "tabs", {
            "200": _text("text/plain; charset=utf-8", "the shader source"), "404": _text("text/plain", "no such kernel")},
            parameters=[path_param("name", "a kernel name (letters, digits, _)",
                                   sorted(p.stem for p in KERNEL_DIR.glob("*.wgsl"))[:3])]),
    }
    return {
        "openapi": "3.1.0",
        "info": {"title": "tabshard coordinator", "version": _version(),
                 "description": "An LLM sharded across browser tabs, behind an OpenAI-compatible API. A token "
                                "stream over WebSocket (msgpack) is at /v1/stream; workers join at /ws/worker."},
        "paths": paths,
        "components": {
            "schemas": _schemas(limits, model_ids),
            "responses": responses,
            "securitySchemes": {
                "bearerAuth": {"type": "http", "scheme": "bearer",
                               "description": "the API key `tabshard serve` set (--api-key); needed on /v1/ when one is set"},
                "apiKeyHeader": {"type": "apiKey", "in": "header", "name": "X-API-Key",
                                 "description": "the same API key, as a header"},
            },
        },
    }
