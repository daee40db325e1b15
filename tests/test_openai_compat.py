"""The official `openai` client against a real `tabshard serve` on 127.0.0.1 with one real
Python tab worker (the coordinator computes nothing itself, so every step, the full-vocabulary
head rows included, crosses a real socket): each row of the compatibility table of issue 21."""
import json
import urllib.error
import urllib.request

import numpy as np
import openai
import pytest

from coordinator.openai_api import token_bytes
from tabshard.cluster import LocalCluster

MODEL = "smollm2-135m-instruct"
ALIAS = "tabshard-small"
COUNT = [{"role": "user", "content": "Count from 1 to 5, one number per line."}]
ORIGIN = "https://app.example"


@pytest.fixture(scope="module")
def cluster():
    args = ["--no-coordinator-compute", "--served-model-name", MODEL, ALIAS, "--cors-origins", ORIGIN]
    with LocalCluster(workers=1, token="compat", serve_args=args) as c:
        yield c


@pytest.fixture(scope="module")
def client(cluster):
    return openai.OpenAI(base_url=f"{cluster.base}/v1", api_key="unused", max_retries=0, timeout=120)


def chat(client, **kw):
    return client.chat.completions.create(model=kw.pop("model", MODEL), messages=kw.pop("messages", COUNT), **kw)


def test_stop_is_honoured_and_never_streamed(client):
    full = chat(client, max_tokens=24, temperature=0).choices[0].message.content
    assert "3" in full, full  # the model counts: the stop below has something to cut
    cut = chat(client, max_tokens=24, temperature=0, stop=["3"])
    assert cut.choices[0].message.content == full[:full.index("3")]
    assert cut.choices[0].finish_reason == "stop"
    # a stop string over several tokens, across streamed chunks: held back, never sent
    stop = full[full.index("3"):full.index("3") + 4]
    pieces = [c.choices[0].delta.content or "" for c in
              chat(client, max_tokens=24, temperature=0, stop=stop, stream=True) if c.choices]
    assert "".join(pieces) == full[:full.index(stop)]
    assert not any(stop[:2] in p for p in pieces)
    text = client.completions.create(model=MODEL, prompt="1, 2, 3, 4,", max_tokens=12, temperature=0, stop=[" 7"])
    assert " 7" not in text.choices[0].text and text.choices[0].finish_reason == "stop"


def test_fresh_randomness_without_seed_and_the_seed_reported(client):
    a = chat(client, max_tokens=16, messages=[{"role": "user", "content": "Tell me a story."}])
    b = chat(client, max_tokens=16, messages=[{"role": "user", "content": "Tell me a story."}])
    assert a.model_extra["seed"] != b.model_extra["seed"]
    assert a.choices[0].message.content != b.choices[0].message.content
    again = chat(client, max_tokens=16, messages=[{"role": "user", "content": "Tell me a story."}], seed=a.model_extra["seed"])
    assert again.choices[0].message.content == a.choices[0].message.content


def test_top_p_zero_is_greedy(client):
    greedy = chat(client, max_tokens=10, temperature=0).choices[0].message.content
    assert chat(client, max_tokens=10, top_p=0, temperature=1.5).choices[0].message.content == greedy


def test_n_choices_share_the_prompt_prefix(client, cluster):
    hits = cluster.status()["counters"]["prefix_hits"]
    r = chat(client, max_tokens=6, n=3, seed=11)
    assert [c.index for c in r.choices] == [0, 1, 2]
    assert len({c.message.content for c in r.choices}) > 1  # seeds 11, 12, 13
    assert 3 <= r.usage.completion_tokens <= 18
    assert cluster.status()["counters"]["prefix_hits"] >= hits + 2  # choices 1 and 2 forked choice 0's prompt KV
    streamed = chat(client, max_tokens=4, n=2, stream=True, seed=11)
    finished = {c.choices[0].index for c in streamed if c.choices and c.choices[0].finish_reason}
    assert finished == {0, 1}


def test_logprobs_are_exact_log_softmax_over_the_vocabulary(client, smollm2_weights, smollm2_tokenizer):
    from kernels import reference as ref
    from tab_worker.backends import make_backend
    from protocol.model_types import SessionSlice
    from model.embedding import embed
    from model.sampling import log_softmax

    r = chat(client, max_tokens=3, temperature=0, logprobs=True, top_logprobs=20)
    first = r.choices[0].logprobs.content[0]
    assert len(first.top_logprobs) == 20 and first.top_logprobs[0].logprob == pytest.approx(first.logprob)
    # the reference: the whole model in numpy, the head over all 49,152 tokens, log-softmax
    w = smollm2_weights
    ids = smollm2_tokenizer.encode(smollm2_tokenizer.render_chat(COUNT))
    backend = make_backend("numpy", w.config, dict(enumerate(w.layers)), w.head, len(ids) + 1)
    out = backend.forward([SessionSlice("ref", 0, len(ids))], embed(w.embedding, ids))
    logits = ref.qmatvec(ref.rmsnorm(out[-1:], w.head.output_norm, w.config.rms_eps), w.head.output)[0]
    lp = log_softmax(logits)
    best = np.argsort(-lp)[:20]
    assert [t.bytes for t in first.top_logprobs[:5]] == [token_bytes(smollm2_tokenizer, int(i)) for i in best[:5]]
    np.testing.assert_allclose([t.logprob for t in first.top_logprobs], lp[best], atol=2e-3)
    streamed = [lp for c in chat(client, max_tokens=3, temperature=0, logprobs=True, top_logprobs=20, stream=True)
                if c.choices and c.choices[0].logprobs for lp in c.choices[0].logprobs.content]
    assert [(t.token, t.logprob) for t in streamed] == [(t.token, t.logprob) for t in r.choices[0].logprobs.content]
    text = client.completions.create(model=MODEL, prompt="The capital of France is", max_tokens=3, temperature=0, logprobs=5)
    lps = text.choices[0].logprobs
    assert len(lps.tokens) == len(lps.token_logprobs) == len(lps.top_logprobs) == 3
    assert "".join(lps.tokens) == text.choices[0].text and lps.text_offset[0] == 0
    assert all(len(alts) == 5 and max(alts.values()) <= 0 for alts in lps.top_logprobs)


def test_message_shapes_clients_send(client):
    tools = [{"type": "function", "function": {"name": "add", "parameters": {
        "type": "object", "properties": {"a": {"type": "integer"}, "b": {"type": "integer"}}, "required": ["a", "b"]}}}]
    messages = [{"role": "developer", "content": [{"type": "text", "text": "You add numbers."}]},
                {"role": "user", "content": [{"type": "text", "text": "What is "}, {"type": "text", "text": "2 + 3?"}]},
                {"role": "assistant", "content": None, "tool_calls": [
                    {"id": "call_1", "type": "function", "function": {"name": "add", "arguments": "{\"a\": 2, \"b\": 3}"}}]},
                {"role": "tool", "tool_call_id": "call_1", "content": "5"}]
    r = chat(client, messages=messages, max_tokens=8, temperature=0, tools=tools, tool_choice="none")
    assert r.choices[0].message.content
    with pytest.raises(openai.BadRequestError) as e:
        chat(client, messages=[{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}], max_tokens=2)
    assert e.value.body["param"] == "messages.0.content.0"


def test_response_format_and_tools_are_grammar_constrained(client):
    schema = {"type": "object", "properties": {"city": {"type": "string", "maxLength": 12}, "rank": {"type": "integer"}},
              "required": ["city", "rank"], "additionalProperties": False}
    r = chat(client, messages=[{"role": "user", "content": "Name a big city and its rank, as JSON."}], max_tokens=40,
             response_format={"type": "json_schema", "json_schema": {"name": "city", "schema": schema}}, temperature=0)
    answer = json.loads(r.choices[0].message.content)
    assert set(answer) == {"city", "rank"} and isinstance(answer["rank"], int)
    obj = chat(client, messages=[{"role": "user", "content": "Reply with a JSON object."}], max_tokens=24, temperature=0,
               response_format={"type": "json_object"}).choices[0]
    assert obj.message.content.lstrip().startswith("{")
    if obj.finish_reason == "stop":
        assert isinstance(json.loads(obj.message.content), dict)
    tools = [{"type": "function", "function": {"name": "get_weather", "parameters": {
        "type": "object", "properties": {"city": {"type": "string", "maxLength": 20}}, "required": ["city"],
        "additionalProperties": False}}}]
    weather = [{"role": "user", "content": "What is the weather in Paris?"}]
    for choice in ("required", {"type": "function", "function": {"name": "get_weather"}}):
        r = chat(client, messages=weather, max_tokens=30, temperature=0, tools=tools, tool_choice=choice)
        call = r.choices[0].message.tool_calls[0]
        assert r.choices[0].finish_reason == "tool_calls" and r.choices[0].message.content is None
        assert call.function.name == "get_weather" and set(json.loads(call.function.arguments)) == {"city"}
    chunks = list(chat(client, messages=weather, max_tokens=30, temperature=0, tools=tools, tool_choice="required",
                       stream=True))
    calls = [tc for c in chunks if c.choices for tc in (c.choices[0].delta.tool_calls or [])]
    assert len(calls) == 1 and calls[0].function.name == "get_weather"
    assert chunks[-1].choices[0].finish_reason == "tool_calls"


def test_stream_options_include_usage_as_specified(client):
    plain = list(chat(client, max_tokens=4, temperature=0, stream=True))
    assert all(c.usage is None for c in plain) and plain[-1].choices[0].finish_reason
    chunks = list(chat(client, max_tokens=4, temperature=0, stream=True, stream_options={"include_usage": True}))
    *body, last = chunks
    assert last.choices == [] and last.usage.completion_tokens == 4
    assert all(c.usage is None for c in body)


def test_models_aliases_root_and_cors(client, cluster):
    assert client.models.retrieve(MODEL).id == MODEL
    assert client.models.retrieve(ALIAS).root == MODEL
    assert {m.id for m in client.models.list()} == {MODEL, ALIAS}
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("gpt-4o")
    assert chat(client, model=ALIAS, max_tokens=2, temperature=0).model == ALIAS
    root = json.loads(urllib.request.urlopen(f"{cluster.base}/", timeout=30).read())
    assert root["model"] == MODEL and root["aliases"] == [ALIAS]
    pre = urllib.request.Request(f"{cluster.base}/v1/chat/completions", method="OPTIONS", headers={
        "Origin": ORIGIN, "Access-Control-Request-Method": "POST", "Access-Control-Request-Headers": "authorization,content-type"})
    with urllib.request.urlopen(pre, timeout=30) as r:
        assert r.status == 200 and r.headers["Access-Control-Allow-Origin"] == ORIGIN
    pre.headers["Origin"] = "https://elsewhere.example"
    with pytest.raises(urllib.error.HTTPError) as e:
        urllib.request.urlopen(pre, timeout=30)
    assert e.value.code == 400  # a preflight from an origin not listed


@pytest.mark.parametrize("extra, param", [
    ({"presence_penalty": 0.5}, "presence_penalty"),
    ({"logit_bias": {"50": 10}}, "logit_bias"),
    ({"top_logprobs": 3}, "top_logprobs"),  # without logprobs
    ({"n": 17}, "n"),
    ({"temperature": 0.7, "greedy": True}, "greedy"),
    ({"stream_options": {"include_usage": True}}, "stream_options"),  # without stream
    ({"frobnicate": 1}, "frobnicate"),
    ({"response_format": {"type": "json_schema", "json_schema": {"schema": {"type": "nonsense"}}}}, "response_format"),
    ({"tool_choice": "required"}, "tool_choice"),  # without tools
])
def test_every_parameter_is_honoured_or_refused_by_name(client, extra, param):
    with pytest.raises(openai.BadRequestError) as e:
        chat(client, max_tokens=2, extra_body=extra)
    assert e.value.body["param"] == param, e.value.body


def test_choice_holds_back_what_may_start_a_stop_and_rewinds_only_what_was_sent(smollm2_tokenizer):
    """The stop/rewind logic alone (no server): events in, what the client gets out."""
    from coordinator.openai_api import Choice

    c = Choice(0, ["END", "\n\n"], smollm2_tokenizer, eos_id=2)
    tok = lambda i, text: c.feed({"type": "token", "index": i, "token_id": 100 + i, "text": text})  # noqa: E731
    assert tok(0, "one E")["text"] == "one "  # "E" may begin "END": held
    assert tok(1, "N")["text"] == ""  # "EN" still may
    out = c.feed({"type": "rewind", "index": 1, "retract_chars": 1, "reason": "liar"})
    assert out["retract"] == 0 and c.text == "one E"  # only held text was withdrawn: the client hears nothing
    assert tok(1, "ND two")["text"] == "" and c.finish_reason == "stop" and c.text == "one "  # the stop is cut, never sent
    c = Choice(0, ["\n\n"], smollm2_tokenizer, eos_id=2)
    assert tok(0, "a\n")["text"] == "a"
    out = c.feed({"type": "rewind", "index": 0, "retract_chars": 2, "reason": "liar"})
    assert out["retract"] == 1 and c.sent == 0  # "a" had been sent: the client drops one character
    assert tok(0, "b")["text"] == "b"
    assert c.feed({"type": "done", "finish_reason": "length"})["text"] == "" and c.finish_reason == "length"


def test_tool_choice_auto_is_a_call_or_plain_text(client, smollm2_tokenizer):
    """tool_choice "auto": the grammar admits a well-formed call of a listed tool, or text that
    does not start with "{" (so an answer is never a malformed call); the API returns whichever
    the model wrote, as tool_calls or as content."""
    from coordinator.structured import Grammar, GrammarError, tools_grammar

    tools = [{"type": "function", "function": {"name": "get_weather", "parameters": {
        "type": "object", "properties": {"city": {"type": "string", "maxLength": 20}}, "required": ["city"],
        "additionalProperties": False}}}]
    grammar = tools_grammar(tools, required=False)

    def admits(text):
        g = Grammar(smollm2_tokenizer, grammar)
        try:
            g.allowed(smollm2_tokenizer.encode(text, special=False))
            return True
        except GrammarError:
            return False

    assert admits("It is sunny in Paris.")
    assert admits('{"name": "get_weather", "arguments": {"city": "Paris"}}')
    assert not admits('{"name": "get_time", "arguments": {}}')  # not a listed tool
    assert not admits('{"city": "Paris"}')  # JSON that is not a call
    for prompt in ("What is the weather in Paris?", "Say hello."):
        r = chat(client, messages=[{"role": "user", "content": prompt}], max_tokens=30, temperature=0, tools=tools,
                 tool_choice="auto")
        m, finish = r.choices[0].message, r.choices[0].finish_reason
        if m.tool_calls:
            assert finish == "tool_calls" and m.content is None
            assert m.tool_calls[0].function.name == "get_weather"
            assert set(json.loads(m.tool_calls[0].function.arguments)) == {"city"}
        else:
            assert finish in ("stop", "length") and m.content and not m.content.lstrip().startswith("{")
