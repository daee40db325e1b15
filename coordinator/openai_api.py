"""POST /v1/chat/completions and /v1/completions as OpenAI clients use them.

A request is validated once, here, into a `Plan` (prompt ids, sampling, stops, n, logprobs,
a grammar); every field the API accepts is either honoured or refused with a 400 naming it
(FIELDS below is the list, and coordinator/openapi.py documents the same list). Each of the
n choices is one coordinator session; choices after the first are submitted once the first
one's prompt KV exists, which it leaves in the prefix cache for them to fork.

Stop strings are matched on the decoded text: text that could still be the start of a stop
string is held back, so a stop string never reaches the client, and the session is ended
at the first match. A rewind (a caught liar's tokens withdrawn) drops held-back text first
and tells the client only about characters it had already received.
"""
from __future__ import annotations

import asyncio
import json
import time
import uuid
from dataclasses import dataclass, field

from starlette.requests import Request
from starlette.responses import JSONResponse, StreamingResponse

from coordinator import request_fields as api
from coordinator.request_fields import BadRequest, _flag, _num, _text
from model.sampling import SEED_MAX, FullVocabChooser, SamplingParams

MAX_STOPS = 16
MAX_TOP_LOGPROBS = 20
# fields a request may carry besides the ones with a meaning below; each is accepted only in
# the values that ask for nothing (a non-zero penalty, a logit bias, echo... are refused)
NEUTRAL = {"presence_penalty": 0, "frequency_penalty": 0, "repetition_penalty": 1, "logit_bias": {}, "echo": False,
           "suffix": None, "best_of": 1, "store": False, "service_tier": "auto"}
COMMON = {"model", "max_tokens", "max_completion_tokens", "temperature", "top_p", "top_k", "seed", "stream",
          "stream_options", "stop", "n", "greedy", "ignore_eos", "user", "metadata", "parallel_tool_calls", *NEUTRAL}
FIELDS = {"chat": COMMON | {"messages", "logprobs", "top_logprobs", "response_format", "tools", "tool_choice"},
          "completion": COMMON | {"prompt", "logprobs"}}
ROLES = {"system", "developer", "user", "assistant", "tool"}


@dataclass
class Plan:
    """One validated request."""

    chat: bool
    model: str
    prompt_ids: list[int]
    max_tokens: int
    params: list[SamplingParams]  # one per choice
    stream: bool
    include_usage: bool
    stops: list[str]
    logprobs: int | None  # None: none; k: the chosen token's and the k best alternatives
    grammar: str | None  # an llguidance grammar, or None
    tools: list = field(default_factory=list)
    tool_choice: str = "none"  # none | auto | required
    ignore_eos: bool = False  # vLLM's extension: generate max_tokens even past the end-of-sequence token


# ---------------------------------------------------------------------- parsing
def _same_kind(a, b) -> bool:
    """JSON's kinds: 0 and 0.0 are one number, false is not a number."""
    number = lambda x: isinstance(x, (int, float)) and not isinstance(x, bool)  # noqa: E731
    return type(a) is type(b) or (number(a) and number(b))


def _neutral(body: dict) -> None:
    for key, neutral in NEUTRAL.items():
        v = body.get(key)
        if v is None or (_same_kind(v, neutral) and v == neutral):  # 0 or 0.0 for 0, but never false for 0
            continue
        raise BadRequest(f"'{key}' = {v!r} is not supported here (only {neutral!r}, which asks for nothing)", key)


def _content(m: dict, i: int) -> str:
    c = m.get("content")
    if isinstance(c, str):
        return _text(c, f"messages.{i}.content")
    if c is None:
        if m.get("role") == "assistant" and m.get("tool_calls"):
            return ""
        raise BadRequest(f"messages[{i}].content is null: only an assistant message with tool_calls may omit it",
                         f"messages.{i}.content")
    if isinstance(c, list):
        parts = []
        for j, p in enumerate(c):
            if not isinstance(p, dict) or p.get("type") != "text" or not isinstance(p.get("text"), str):
                kind = p.get("type") if isinstance(p, dict) else type(p).__name__
                raise BadRequest(f"messages[{i}].content[{j}] is of type {kind!r}: this model reads text parts only "
                                 "({\"type\": \"text\", \"text\": ...})", f"messages.{i}.content.{j}")
            parts.append(_text(p["text"], f"messages.{i}.content.{j}.text"))
        return "".join(parts)
    raise BadRequest(f"messages[{i}].content must be a string, a list of text parts or null", f"messages.{i}.content")


def _tool_calls_text(m: dict, i: int) -> str:
    calls = m.get("tool_calls") or []
    if not isinstance(calls, list):
        raise BadRequest(f"messages[{i}].tool_calls must be a list", f"messages.{i}.tool_calls")
    out = []
    for j, c in enumerate(calls):
        fn = c.get("function") if isinstance(c, dict) else None
        if not isinstance(fn, dict) or not isinstance(fn.get("name"), str) or not isinstance(fn.get("arguments", "{}"), str):
            raise BadRequest(f"messages[{i}].tool_calls[{j}] needs function.name and function.arguments (a JSON string)",
                             f"messages.{i}.tool_calls.{j}")
        try:
            args = json.loads(fn.get("arguments") or "{}")
        except ValueError:
            raise BadRequest(f"messages[{i}].tool_calls[{j}].function.arguments is not JSON",
                             f"messages.{i}.tool_calls.{j}.function.arguments") from None
        out.append(json.dumps({"name": fn["name"], "arguments": args}))
    return "\n".join(out)


def parse_messages(messages, tools: list, tool_choice: str) -> list[dict]:
    """OpenAI chat messages -> the chat template's {role, content} (text parts joined, an
    assistant's tool calls written as the JSON the model is asked to produce)."""
    if not isinstance(messages, list) or not messages:
        raise BadRequest("'messages' must be a non-empty list", "messages")
    clean = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str):
            raise BadRequest(f"messages[{i}] needs a string 'role'", f"messages.{i}")
        role = m["role"]
        if role not in ROLES:
            raise BadRequest(f"messages[{i}].role {role!r} is not one of {', '.join(sorted(ROLES))}", f"messages.{i}.role")
        if m.get("tool_calls") is not None and not isinstance(m["tool_calls"], list):
            raise BadRequest(f"messages[{i}].tool_calls must be a list", f"messages.{i}.tool_calls")
        if m.get("tool_call_id") is not None and not isinstance(m["tool_call_id"], str):
            raise BadRequest(f"messages[{i}].tool_call_id must be a string", f"messages.{i}.tool_call_id")
        content = _content(m, i)
        if role == "assistant" and m.get("tool_calls"):
            content = (content + "\n" if content else "") + _tool_calls_text(m, i)
        clean.append({"role": "system" if role == "developer" else role, "content": content})
    if tools and tool_choice != "none":
        listing = "\n".join(json.dumps({"name": t["function"]["name"], "description": t["function"].get("description", ""),
                                        "parameters": t["function"].get("parameters") or {}}) for t in tools)
        note = ("You can call these functions:\n" + listing + "\nTo call one, answer with only a JSON object "
                "{\"name\": ..., \"arguments\": {...}}.")
        if clean[0]["role"] == "system":
            clean[0] = {"role": "system", "content": clean[0]["content"] + "\n\n" + note}
        else:
            clean.insert(0, {"role": "system", "content": note})
    return clean


def _stops(body: dict) -> list[str]:
    stop = body.get("stop")
    if stop is None:
        return []
    stops = [stop] if isinstance(stop, str) else stop
    if not isinstance(stops, list) or not all(isinstance(s, str) and s for s in stops) or len(stops) > MAX_STOPS:
        raise BadRequest(f"'stop' must be a non-empty string or a list of at most {MAX_STOPS} of them", "stop")
    return [_text(s, "stop") for s in stops]


def _tools(body: dict) -> tuple[list, str]:
    tools = body.get("tools")
    choice = body.get("tool_choice")
    if tools is None:
        if choice not in (None, "none"):
            raise BadRequest("'tool_choice' needs 'tools'", "tool_choice")
        return [], "none"
    if not isinstance(tools, list) or not tools:
        raise BadRequest("'tools' must be a non-empty list of {\"type\": \"function\", \"function\": {...}}", "tools")
    for j, t in enumerate(tools):
        fn = t.get("function") if isinstance(t, dict) and t.get("type") == "function" else None
        if not isinstance(fn, dict) or not isinstance(fn.get("name"), str) or not fn["name"]:
            raise BadRequest(f"tools[{j}] must be {{\"type\": \"function\", \"function\": {{\"name\": ...}}}}", f"tools.{j}")
        if fn.get("description") is not None and not isinstance(fn["description"], str):
            raise BadRequest(f"tools[{j}].function.description must be a string", f"tools.{j}.function.description")
        if fn.get("parameters") is not None and not isinstance(fn["parameters"], dict):
            raise BadRequest(f"tools[{j}].function.parameters must be a JSON schema object", f"tools.{j}.function.parameters")
    if choice is None:
        return tools, "auto"
    if choice in ("none", "auto", "required"):
        return tools, choice
    name = choice.get("function", {}).get("name") if isinstance(choice, dict) and choice.get("type") == "function" else None
    picked = [t for t in tools if t["function"]["name"] == name]
    if not picked:
        raise BadRequest("'tool_choice' must be none, auto, required or {\"type\": \"function\", \"function\": "
                         "{\"name\": <one of tools>}}", "tool_choice")
    return picked, "required"


def _response_format(body: dict) -> dict | None:
    """The JSON schema the answer must match ({} for any JSON object), or None for text."""
    rf = body.get("response_format")
    if rf is None:
        return None
    kind = rf.get("type") if isinstance(rf, dict) else None
    if kind == "text":
        return None
    if kind == "json_object":
        return {"type": "object"}
    if kind == "json_schema":
        js = rf.get("json_schema")
        schema = js.get("schema") if isinstance(js, dict) else None
        if not isinstance(schema, dict):
            raise BadRequest("response_format json_schema needs json_schema.schema (an object)", "response_format")
        return schema
    raise BadRequest("'response_format' must be {\"type\": \"text\" | \"json_object\" | \"json_schema\", ...}",
                     "response_format")


def _logprobs(body: dict, chat: bool) -> int | None:
    if chat:
        want = _flag(body, "logprobs")
        top = _num(body, "top_logprobs", int, None, 0, MAX_TOP_LOGPROBS)
        if top is not None and not want:
            raise BadRequest("'top_logprobs' needs 'logprobs': true", "top_logprobs")
        return (top or 0) if want else None
    return _num(body, "logprobs", int, None, 0, MAX_TOP_LOGPROBS)  # completions: the number of alternatives


def parse(body: dict, chat: bool, tokenizer, limits, model_names: list[str]) -> Plan:
    unknown = sorted(set(body) - FIELDS["chat" if chat else "completion"])
    if unknown:
        raise BadRequest(f"unknown field {unknown[0]!r} (see GET /openapi.json for the fields this server takes)", unknown[0])
    model = body.get("model")
    if model is not None and model not in model_names:
        raise BadRequest(f"model {model!r} is not served here; use {model_names[0]!r}", "model", 404)
    _neutral(body)
    for key in ("user",):
        if body.get(key) is not None and not isinstance(body[key], str):
            raise BadRequest(f"'{key}' must be a string", key)
    for key in ("metadata",):
        if body.get(key) is not None and not isinstance(body[key], dict):
            raise BadRequest(f"'{key}' must be an object", key)
    _flag(body, "parallel_tool_calls")
    ignore_eos = _flag(body, "ignore_eos")
    stream = _flag(body, "stream")
    opts = body.get("stream_options")
    if opts is not None:
        if not stream:
            raise BadRequest("'stream_options' is only allowed with \"stream\": true", "stream_options")
        if not isinstance(opts, dict) or set(opts) - {"include_usage"}:
            raise BadRequest("'stream_options' takes only include_usage", "stream_options")
    include_usage = _flag(opts or {}, "include_usage")
    tools, tool_choice = _tools(body) if chat else ([], "none")
    schema = _response_format(body) if chat else None
    if schema is not None and tools and tool_choice != "none":
        raise BadRequest("'response_format' and 'tools' both constrain the answer: give one", "response_format")
    if chat:
        ids = tokenizer.encode_chat(parse_messages(body.get("messages"), tools, tool_choice))  # content is text, never markers
    else:
        prompt = body.get("prompt")
        if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
            prompt = prompt[0]
        if not isinstance(prompt, str) or not prompt:
            raise BadRequest("'prompt' must be a non-empty string (or a list of one)", "prompt")
        ids = tokenizer.encode(_text(prompt, "prompt"), special=False)  # "<|im_end|>" in a prompt is text
    max_tokens = _num(body, "max_tokens", *api.max_tokens_field(limits))
    max_tokens = _num(body, "max_completion_tokens", int, max_tokens, *api.max_tokens_field(limits)[2:])
    n = _num(body, "n", *api.N_FIELD)
    base = api.sampling_from_body(body)
    params = [base] + [SamplingParams(base.greedy, base.temperature, base.top_p, base.top_k, (base.seed + i) % SEED_MAX)
                       for i in range(1, n)]
    grammar = None
    if schema is not None or (tools and tool_choice != "none"):
        from coordinator import structured

        try:
            grammar = (structured.json_schema_grammar(schema) if schema is not None
                       else structured.tools_grammar(tools, tool_choice == "required"))
            structured.Grammar(tokenizer, grammar)  # compile once now: a bad schema is this request's 400
        except structured.GrammarError as exc:
            raise BadRequest(str(exc), "response_format" if schema is not None else "tools") from None
    return Plan(chat, model or model_names[0], ids, max_tokens, params, stream, include_usage, _stops(body),
                _logprobs(body, chat), grammar, tools, tool_choice, ignore_eos)


# ---------------------------------------------------------------------- one choice
_BYTE_DECODER = None


def token_bytes(tokenizer, token_id: int) -> list[int]:
    """A byte-level BPE token's raw bytes (GPT-2's byte-to-unicode table, reversed)."""
    global _BYTE_DECODER
    if _BYTE_DECODER is None:
        bs = list(range(33, 127)) + list(range(161, 173)) + list(range(174, 256))
        cs, n = bs[:], 0
        for b in range(256):
            if b not in bs:
                bs.append(b)
                cs.append(256 + n)
                n += 1
        _BYTE_DECODER = {chr(c): b for b, c in zip(bs, cs)}
    text = tokenizer.token_text(token_id)
    if all(ch in _BYTE_DECODER for ch in text):
        return [_BYTE_DECODER[ch] for ch in text]
    return list(text.encode("utf-8"))


class Choice:
    """One choice's text as the client sees it: decoded increments in, stop strings cut,
    held-back text, logprob records released with the text they belong to."""

    def __init__(self, index: int, stops: list[str], tokenizer, eos_id: int):
        self.index, self.stops, self.tok, self.eos = index, stops, tokenizer, eos_id
        self.text = ""  # everything decoded so far (after rewinds)
        self.sent = 0  # characters of it given to the client
        self.records: list[tuple[int, int, object]] = []  # (token index, text end, TokenLogprob) not yet given
        self.logprobs: list[tuple[int, object]] = []  # (text offset, TokenLogprob) given
        self.tokens = 0
        self.finish_reason: str | None = None
        self.rid: str | None = None
        self.client = None

    def _hold(self) -> int:
        """How many trailing characters might still begin a stop string."""
        hold = 0
        for s in self.stops:
            for k in range(min(len(s) - 1, len(self.text) - self.sent), 0, -1):
                if self.text.endswith(s[:k]):
                    hold = max(hold, k)
                    break
        return hold

    def feed(self, ev: dict) -> dict:
        """One session event -> what to give the client: {"text", "logprobs", "retract"}; sets
        finish_reason at the end (a stop string found ends the choice with "stop")."""
        out = {"text": "", "logprobs": [], "retract": 0}
        if ev["type"] == "token":
            start = len(self.text)
            self.text += ev["text"]
            self.tokens = ev["index"] + 1
            if ev.get("logprob") is not None and ev["token_id"] != self.eos:
                self.records.append((ev["index"], start, ev["logprob"]))
            cut = min((p for p in (self.text.find(s, self.sent) for s in self.stops) if p >= 0), default=-1)
            if cut >= 0:
                self.text = self.text[:cut]
                self.finish_reason = "stop"
            upto = len(self.text) if self.finish_reason else len(self.text) - self._hold()
            if upto > self.sent:
                out["text"] = self.text[self.sent:upto]
                self.sent = upto
            # a token's record goes with the first of its characters (an EOS or a token
            # whose characters are still pending waits)
            keep = []
            for r in self.records:
                if r[1] < self.sent:  # its first character is out
                    out["logprobs"].append(r)
                    self.logprobs.append((r[1], r[2]))
                elif not (self.finish_reason and r[1] >= len(self.text)):
                    keep.append(r)
            self.records = keep
        elif ev["type"] == "rewind":
            self.text = self.text[:max(0, len(self.text) - ev["retract_chars"])]
            self.records = [r for r in self.records if r[0] < ev["index"]]
            self.logprobs = [lp for lp in self.logprobs if lp[0] < len(self.text)]
            if self.sent > len(self.text):
                out["retract"] = self.sent - len(self.text)
                self.sent = len(self.text)
            self.tokens = ev["index"]
        elif ev["type"] == "done":
            self.finish_reason = self.finish_reason or ev["finish_reason"]
            if self.sent < len(self.text):
                out["text"] = self.text[self.sent:]
                self.sent = len(self.text)
            out["logprobs"] = [r for r in self.records if r[1] < len(self.text)]
            self.logprobs += [(r[1], r[2]) for r in out["logprobs"]]
            self.records = []
        return out

    # ---- the OpenAI shapes of logprobs
    def _entry(self, token_id: int, logprob: float) -> dict:
        b = token_bytes(self.tok, token_id)
        return {"token": bytes(b).decode("utf-8", errors="replace"), "logprob": logprob, "bytes": b}

    def chat_logprobs(self, records) -> dict:
        return {"content": [{**self._entry(r.token_id, r.logprob),
                             "top_logprobs": [self._entry(i, lp) for i, lp in r.top]} for _, _, r in records]}

    def completion_logprobs(self, records) -> dict:
        return {"tokens": [self._entry(r.token_id, r.logprob)["token"] for _, _, r in records],
                "token_logprobs": [r.logprob for _, _, r in records],
                "top_logprobs": [{self._entry(i, lp)["token"]: lp for i, lp in r.top} for _, _, r in records],
                "text_offset": [off for _, off, _ in records]}


def tool_calls(text: str) -> list[dict] | None:
    """The model's answer as tool_calls, when it is a call ({"name", "arguments"})."""
    try:
        call = json.loads(text)
    except ValueError:
        return None
    if not isinstance(call, dict) or not isinstance(call.get("name"), str) or "arguments" not in call:
        return None
    return [{"id": f"call_{uuid.uuid4().hex[:24]}", "type": "function",
             "function": {"name": call["name"], "arguments": json.dumps(call["arguments"])}}]


# ---------------------------------------------------------------------- the endpoint
async def handle(request: Request, service, chat: bool, model_names: list[str], metrics=None):
    limits = service.settings
    endpoint = "chat" if chat else "completions"

    def refuse(message: str, status: int, param: str | None = None, kind: str = "invalid_request_error"):
        if metrics is not None:
            metrics.request(endpoint, status)
        return api._error(message, status, param, kind)

    raw = await api.read_body(request, limits)
    if raw is None:
        return refuse(f"the body exceeds max_request_bytes ({limits.max_request_bytes} bytes)", 413)
    try:
        body = json.loads(raw)
    except ValueError:
        return refuse("the body is not valid JSON", 400)
    if not isinstance(body, dict):
        return refuse("the body must be a JSON object", 400)
    try:
        plan = parse(body, chat, service.tokenizer, limits, model_names)
        param = "messages" if chat else "prompt"
        if not plan.prompt_ids:
            raise BadRequest("the prompt has no tokens (only characters the tokenizer drops)", param)
        if len(plan.prompt_ids) > limits.max_prompt_tokens:
            raise BadRequest(f"the prompt has {len(plan.prompt_ids)} tokens; at most {limits.max_prompt_tokens} are allowed", param)
        running = len(service.core.sessions)
        if running + len(plan.params) > limits.max_sessions:
            service.refusals["overloaded"] += 1
            raise BadRequest(f"{running} requests are running and this one needs {len(plan.params)}, over the "
                             f"{limits.max_sessions} this server takes; retry later", None, 429)
    except BadRequest as exc:
        return refuse(str(exc), exc.status, exc.param, "overloaded" if exc.status == 429 else "invalid_request_error")
    run = Run(service, plan)
    run.start()
    if plan.stream:
        if metrics is not None:
            metrics.request(endpoint, 200)
        return StreamingResponse(run.events(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Tabshard-Seed": str(plan.params[0].seed)})
    try:
        error = await run.wait(request)
    finally:
        run.close()
    if error is not None:
        return refuse(*error)
    if metrics is not None:
        metrics.request(endpoint, 200)
    return JSONResponse(run.answer(), headers={"X-Tabshard-Seed": str(plan.params[0].seed)})


class Run:
    """The n sessions of one request, their events merged in order of arrival."""

    def __init__(self, service, plan: Plan):
        self.service, self.plan = service, plan
        self.choices = [Choice(i, plan.stops, service.tokenizer, service.core.config.eos_id) for i in range(len(plan.params))]
        self.merged: asyncio.Queue = asyncio.Queue()
        self.first_ready = asyncio.Event()
        self.tasks: list[asyncio.Task] = []
        self.id = f"{'chatcmpl' if plan.chat else 'cmpl'}-{uuid.uuid4().hex[:24]}"
        self.created = int(time.time())
        self.prompt_tokens = len(plan.prompt_ids)

    def _open(self, i: int) -> None:
        plan, c = self.plan, self.choices[i]
        chooser = None
        if plan.logprobs is not None or plan.grammar is not None:
            from coordinator import structured

            grammar = structured.Grammar(self.service.tokenizer, plan.grammar) if plan.grammar else None
            chooser = FullVocabChooser(plan.params[i], plan.logprobs, grammar)
        c.rid, c.client = self.service.open_request(plan.prompt_ids, plan.max_tokens, plan.params[i], chooser=chooser,
                                                    share_prefix=len(self.choices) > 1 and i == 0,
                                                    stop_at_eos=not plan.ignore_eos)

    async def _pump(self, i: int) -> None:
        c = self.choices[i]
        if i:
            await self.first_ready.wait()  # choice 0's prompt KV is in the prefix cache: fork it
        self._open(i)
        while True:
            ev = await c.client.queue.get()
            if i == 0 and ev["type"] != "rewind":
                self.first_ready.set()
            await self.merged.put((i, ev))
            if ev["type"] in ("done", "error"):
                return

    def start(self) -> None:
        self.tasks = [asyncio.create_task(self._pump(i)) for i in range(len(self.choices))]

    def close(self) -> None:
        for t in self.tasks:
            t.cancel()
        for c in self.choices:
            if c.rid is not None:
                self.service.close_request(c.rid, cancelled=c.finish_reason is None)
                c.rid = None

    def _end(self, c: Choice) -> None:
        """A choice cut by a stop string: its session is ended now."""
        if c.rid is not None:
            self.service.close_request(c.rid, cancelled=True)
            c.rid = None

    async def _next(self, request: Request | None = None):
        """The next (choice, event), or None when the client went away."""
        get = asyncio.ensure_future(self.merged.get())
        while not get.done():
            await asyncio.wait([get], timeout=0.25)
            if not get.done() and request is not None and await request.is_disconnected():
                get.cancel()
                return None
        return get.result()

    def usage(self) -> dict:
        completion = sum(c.tokens for c in self.choices)
        return {"prompt_tokens": self.prompt_tokens, "completion_tokens": completion,
                "total_tokens": self.prompt_tokens + completion}

    async def wait(self, request: Request) -> tuple | None:
        """Run every choice to its end; an error tuple for refuse() if one failed."""
        pending = {c.index for c in self.choices}
        while pending:
            item = await self._next(request)
            if item is None:
                return ("client disconnected", 499)
            i, ev = item
            c = self.choices[i]
            if c.finish_reason is not None:
                continue
            if ev["type"] == "error":
                status = 429 if ev["code"] == "overloaded" else 503 if ev.get("retriable") else 400
                return (ev["message"], status, None, ev["code"])
            c.feed(ev)
            if c.finish_reason is not None:
                if ev["type"] != "done":
                    self._end(c)
                else:
                    c.rid = None
                pending.discard(i)
        return None

    def _message(self, c: Choice) -> tuple[dict, str]:
        calls = tool_calls(c.text) if self.plan.tools and self.plan.tool_choice != "none" else None
        if calls:
            return {"role": "assistant", "content": None, "tool_calls": calls}, "tool_calls"
        return {"role": "assistant", "content": c.text}, c.finish_reason

    def answer(self) -> dict:
        plan, choices = self.plan, []
        for c in self.choices:
            records = [(None, off, r) for off, r in c.logprobs]
            if plan.chat:
                message, finish = self._message(c)
                lp = c.chat_logprobs(records) if plan.logprobs is not None else None
                choices.append({"index": c.index, "message": message, "finish_reason": finish, "logprobs": lp})
            else:
                lp = c.completion_logprobs(records) if plan.logprobs is not None else None
                choices.append({"index": c.index, "text": c.text, "finish_reason": c.finish_reason, "logprobs": lp})
        return {"id": self.id, "object": "chat.completion" if plan.chat else "text_completion", "created": self.created,
                "model": plan.model, "choices": choices, "usage": self.usage(), "system_fingerprint": None,
                "seed": plan.params[0].seed}

    def _chunk(self, choice: dict | None, **extra) -> str:
        chunk = {"id": self.id, "object": "chat.completion.chunk" if self.plan.chat else "text_completion",
                 "created": self.created, "model": self.plan.model, "choices": [choice] if choice else [],
                 "seed": self.plan.params[0].seed, **extra}
        if self.plan.include_usage and "usage" not in extra:
            chunk["usage"] = None
        return f"data: {json.dumps(chunk)}\n\n"

    def _delta(self, c: Choice, text: str, records: list, finish: str | None, **extra) -> str:
        plan = self.plan
        lp = None
        if plan.logprobs is not None and records:
            lp = c.chat_logprobs(records) if plan.chat else c.completion_logprobs(records)
        if plan.chat:
            choice = {"index": c.index, "delta": {"content": text} if text else {}, "logprobs": lp, "finish_reason": finish}
        else:
            choice = {"index": c.index, "text": text, "logprobs": lp, "finish_reason": finish}
        return self._chunk(choice, **extra)

    async def events(self):
        """Server-sent events: a role chunk per choice (chat), text deltas, a last chunk per
        choice with its finish_reason, with include_usage one more chunk with no choices and
        the usage, then [DONE]. Text of a tool call is held and sent as one tool_calls delta."""
        plan = self.plan
        calls_mode = plan.chat and plan.tools and plan.tool_choice != "none"
        try:
            if plan.chat:
                for c in self.choices:
                    yield self._chunk({"index": c.index, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                                       "finish_reason": None})
            pending = {c.index for c in self.choices}
            while pending:
                i, ev = await self._next()
                c = self.choices[i]
                if c.finish_reason is not None:
                    continue
                if ev["type"] == "error":
                    err = {"message": ev["message"], "type": ev["code"], "retriable": ev.get("retriable", False)}
                    yield f"data: {json.dumps({'error': err})}\n\n"
                    return
                out = c.feed(ev)
                if out["retract"]:
                    # no OpenAI field withdraws text: an extension field says how much to drop
                    yield self._delta(c, "", [], None, tabshard_rewind={"index": ev["index"], "choice": c.index,
                                                                       "retract_chars": out["retract"], "reason": ev["reason"]})
                held = calls_mode and c.text.lstrip().startswith("{")
                if (out["text"] or out["logprobs"]) and not held:
                    yield self._delta(c, out["text"], out["logprobs"], None)
                if c.finish_reason is not None:
                    if ev["type"] != "done":
                        self._end(c)
                    else:
                        c.rid = None
                    pending.discard(i)
                    if held:
                        message, finish = self._message(c)
                        if message.get("tool_calls"):
                            calls = [{"index": k, **call} for k, call in enumerate(message["tool_calls"])]
                            yield self._chunk({"index": c.index, "delta": {"tool_calls": calls}, "logprobs": None,
                                               "finish_reason": None})
                        else:
                            yield self._delta(c, c.text, [], None)
                        yield self._delta(c, "", [], finish)
                    else:
                        yield self._delta(c, "", [], c.finish_reason)
            if plan.include_usage:
                yield self._chunk(None, usage=self.usage())
            yield "data: [DONE]\n\n"
        finally:
            self.close()
