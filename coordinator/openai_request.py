"""An OpenAI request body, validated once into a `Plan` (prompt ids, sampling, stops, n, logprobs,
a grammar): every field the API accepts is either honoured or refused with a 400 naming it
(FIELDS below is the list, and coordinator/openapi.py documents the same list)."""

import json
from dataclasses import dataclass, field


from coordinator import request_fields as api
from coordinator.request_fields import BadRequest, _flag, _num, _text
from model.sampling import SEED_MAX, SamplingParams

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
