"""POST /v1/chat/completions and /v1/completions as OpenAI clients use them.

A request is validated once into a `Plan` (coordinator/openai_request.py). Each of the n choices
is one coordinator session; choices after the first are submitted once the first one's prompt
KV exists, which it leaves in the prefix cache for them to fork.

Stop strings are matched on the decoded text: text that could still be the start of a stop
string is held back, so a stop string never reaches the client, and the session is ended
at the first match. A rewind (a caught liar's tokens withdrawn) drops held-back text first
and tells the client only about characters it had already received.
"""

import asyncio
import json
import time
import uuid

from starlette.requests import Request
from starlette.responses import JSONResponse, StreamingResponse

from coordinator import request_fields as api
from coordinator.openai_request import Plan, parse
from coordinator.request_fields import BadRequest
from model.sampling import FullVocabChooser


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
