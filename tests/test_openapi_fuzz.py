"""GET /openapi.json describes every HTTP route of the app, and schemathesis fuzzing that
description against a real `serve` on 127.0.0.1 (coordinator compute, no workers, SmolLM2)
gets no 5xx and answers as described.

The server's max_output_tokens is 2 and max_prompt_tokens 96, and the spec states the
server's own limits, so every generated request that runs the model stays short.
Operations are driven with Hypothesis directly (`APIOperation.as_strategy`):
schemathesis's pytest plugin (`schemathesis.pytest.from_fixture`) fails under pytest 9.2
('Function' object has no attribute '_nodeid').
"""
import json
import re
from unittest.mock import MagicMock

import pytest

schemathesis = pytest.importorskip("schemathesis")
import requests  # noqa: E402
from hypothesis import HealthCheck, given, settings  # noqa: E402
from schemathesis import GenerationMode  # noqa: E402
from schemathesis.checks import not_a_server_error  # noqa: E402
from schemathesis.specs.openapi.checks import (  # noqa: E402
    content_type_conformance,
    negative_data_rejection,
    response_schema_conformance,
    status_code_conformance,
)
from starlette.routing import Mount, Route, WebSocketRoute  # noqa: E402

from coordinator.app import build_app  # noqa: E402
from coordinator.openapi import build_spec  # noqa: E402
from coordinator.records import CoordinatorSettings  # noqa: E402
from tabshard.cluster import LocalCluster  # noqa: E402

KEY = "fuzz-SECRET-9d41c7"
JOIN = "join-SECRET-30be8e"
AUTH = {"Authorization": f"Bearer {KEY}"}
LIMITS = {"max_prompt_tokens": 96, "max_output_tokens": 2, "max_sessions": 8}
EXAMPLES = 25  # per operation and generation mode
# no 5xx; status codes, content types and bodies as documented; data the spec forbids refused
# (not positive_data_acceptance: a prompt's token count cannot be told from its characters)
CHECKS = [not_a_server_error, status_code_conformance, content_type_conformance, response_schema_conformance,
          negative_data_rejection]
OPERATIONS = [(method.upper(), path) for path, ops in build_spec(CoordinatorSettings(**LIMITS))["paths"].items()
              for method in ops]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    conf = tmp_path_factory.mktemp("serve") / "serve.toml"
    conf.write_text("[serve]\n" + "".join(f"{k} = {v}\n" for k, v in LIMITS.items()))
    with LocalCluster(workers=0, token=JOIN, serve_args=["--api-key", KEY, "--config", str(conf)]) as c:
        yield c


@pytest.fixture(scope="module")
def api_schema(server):
    return schemathesis.openapi.from_url(f"{server.base}/openapi.json")


@pytest.fixture(scope="module")
def http():
    with requests.Session() as s:
        yield s


def _http_routes(routes) -> set[tuple[str, str]]:
    """(method, path) of every HTTP route, in OpenAPI's path syntax; HEAD comes with GET."""
    out = set()
    for r in routes:
        if isinstance(r, WebSocketRoute):
            continue
        if isinstance(r, Mount):
            out.add(("GET", r.path + "/{path}"))
        elif isinstance(r, Route):
            out |= {(m, re.sub(r":\w+}", "}", r.path)) for m in r.methods - {"HEAD"}}  # {name:convertor} -> {name}
        else:
            raise AssertionError(f"a route of a kind this test does not know: {r!r}")
    return out


def test_spec_is_valid_and_lists_every_http_route(server, api_schema, http):
    api_schema.validate()  # against the OpenAPI 3.1 meta-schema
    text = http.get(f"{server.base}/openapi.json", timeout=30).text
    assert KEY not in text and JOIN not in text
    spec = json.loads(text)
    described = {(method.upper(), path) for path, ops in spec["paths"].items() for method in ops}
    # nothing in the route table runs at build time: a stand-in service shows every route
    assert described == _http_routes(build_app(MagicMock(api_key=None)).routes) == set(OPERATIONS)
    max_tokens = spec["components"]["schemas"]["ChatCompletionRequest"]["properties"]["max_tokens"]
    assert max_tokens["maximum"] == LIMITS["max_output_tokens"]  # the server's own limit, stated
    assert spec["paths"]["/v1/models"]["get"]["security"] == [{"bearerAuth": []}, {"apiKeyHeader": []}]


def _streamed(case):
    case.body = {**case.body, "stream": True}  # still valid: a positive body is an object
    return case


@pytest.mark.parametrize("method, path", OPERATIONS, ids=[f"{m} {p}" for m, p in OPERATIONS])
def test_fuzz_no_server_error(method, path, api_schema, http):
    op = api_schema[path][method]
    runs = [op.as_strategy(GenerationMode.POSITIVE)]
    if op.body or op.query:  # something to get wrong (an untyped path segment or none at all is never wrong)
        runs.append(op.as_strategy(GenerationMode.NEGATIVE))
    if op.body:  # the text/event-stream answer too, every time
        runs.append(op.as_strategy(GenerationMode.POSITIVE).map(_streamed))
    if any(p.name == "token" for p in op.query):
        runs.append(op.as_strategy(GenerationMode.POSITIVE, query={"token": JOIN}))  # past the join check too
    for strategy in runs:
        @given(case=strategy)
        @settings(max_examples=EXAMPLES, deadline=None, database=None, suppress_health_check=list(HealthCheck))
        def fuzz(case):
            case.call_and_validate(session=http, headers=AUTH, checks=CHECKS, timeout=60)

        fuzz()


@pytest.mark.parametrize("path, body, field", [
    ("/v1/completions", '{"prompt": "a\\ud800", "max_tokens": 1}', "prompt"),  # was 500
    ("/v1/chat/completions", '{"messages": [{"role": "\\udc00", "content": "hi"}]}', "messages.0.role"),  # was 500
    ("/v1/completions", '{"prompt": "hi", "temperature": 1, "seed": -1}', "seed"),  # hung forever
    ("/v1/completions", '{"prompt": "hi", "stream": "no"}', "stream"),  # streamed anyway
    ("/v1/completions", '{"prompt": "hi", "max_tokens": "x", "max_completion_tokens": 1}', "max_tokens"),  # was ignored
    ("/v1/completions", '{"prompt": "\\u0016"}', "prompt"),  # no tokens: was a 400 naming no field
])
def test_malformed_requests_get_a_4xx_naming_the_field(server, http, path, body, field):
    r = http.post(server.base + path, data=body, headers={**AUTH, "Content-Type": "application/json"}, timeout=30)
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == field


def test_integral_numbers_are_integers_and_any_token_text_is_checked(server, http):
    r = http.post(f"{server.base}/v1/completions", json={"prompt": "hi", "max_tokens": 1.0, "seed": 7.0}, headers=AUTH,
                  timeout=60)
    assert r.status_code == 200, r.text  # JSON Schema's integer: 1.0 is one
    for page in ("/tab", "/tab/qr.svg"):
        assert http.get(f"{server.base}{page}", params={"token": "é"}, timeout=30).status_code == 403  # was 500
