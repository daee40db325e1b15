"""Access: API key on the client API, Origin allowlist for tabs, join token, TLS; refusals are
clear and counted; no endpoint ever shows the join token or the API key. Real `serve`
processes on 127.0.0.1 (coordinator compute only: no workers needed)."""
import asyncio
import json
import shutil
import ssl
import subprocess
import sys
import time
import urllib.error
import urllib.request

import pytest
import websockets

from coordinator.security import api_key_for, origin_allowed
from protocol import wire
from tabshard.cluster import LocalCluster, free_port

JOIN = "join-SECRET-7f3a9c"
KEY = "apikey-SECRET-51be02"


def test_key_needed_off_loopback_only():
    assert api_key_for("127.0.0.1", None) == (None, False)
    assert api_key_for("localhost", None) == (None, False)
    key, generated = api_key_for("0.0.0.0", None)
    assert generated and len(key) >= 24
    assert api_key_for("0.0.0.0", "k") == ("k", False)
    assert api_key_for("127.0.0.1", "k") == ("k", False)


def test_origin_allowlist():
    assert origin_allowed(None, "10.0.0.5:8000", set())  # not a browser
    assert origin_allowed("http://10.0.0.5:8000", "10.0.0.5:8000", set())  # same origin
    assert origin_allowed("http://127.0.0.1:9999", "10.0.0.5:8000", set())  # loopback
    assert origin_allowed("http://localhost:3000", "10.0.0.5:8000", set())
    assert not origin_allowed("https://evil.example", "10.0.0.5:8000", set())
    assert origin_allowed("https://lab.example", "10.0.0.5:8000", {"https://lab.example"})


def get(url, headers=None, ctx=None):
    req = urllib.request.Request(url, headers=headers or {})
    try:
        with urllib.request.urlopen(req, timeout=30, context=ctx) as r:
            return r.status, r.read().decode("utf-8", "replace")
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode("utf-8", "replace")


def post(url, body, headers=None):
    req = urllib.request.Request(url, json.dumps(body).encode(), {"Content-Type": "application/json", **(headers or {})})
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()


async def ws_close(url, origin=None, send=None, **kw):
    """Connect, optionally send one message; return (close code, reason, first message)."""
    headers = {"Origin": origin} if origin else None
    async with websockets.connect(url, additional_headers=headers, compression=None, open_timeout=10, **kw) as ws:
        if send is not None:
            await ws.send(wire.encode(send))
        first = None
        try:
            first = await asyncio.wait_for(ws.recv(), 10)
            await asyncio.wait_for(ws.recv(), 10)
        except websockets.ConnectionClosed:
            pass
        return ws.close_code, ws.close_reason, first


LIMITS = {"max_request_bytes": 65536, "max_sessions": 1, "max_prompt_tokens": 64, "max_output_tokens": 24, "client_max_msgs_per_s": 5,
          "worker_max_msgs_per_s": 50}


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    conf = tmp_path_factory.mktemp("serve") / "serve.toml"
    conf.write_text("[serve]\n" + "".join(f"{k} = {v}\n" for k, v in LIMITS.items()))
    c = LocalCluster(workers=0, token=JOIN, serve_args=["--api-key", KEY, "--allowed-origins", "https://lab.example",
                                                        "--config", str(conf)])
    with c:
        yield c


def test_refusals_are_clear_counted_and_process_nothing(cluster):
    base = cluster.base
    before = cluster.status()["counters"]
    code, body = get(f"{base}/v1/models")
    assert code == 401 and "API key" in json.loads(body)["error"]["message"]
    assert get(f"{base}/v1/models", {"Authorization": f"Bearer {KEY}"})[0] == 200
    assert get(f"{base}/v1/models", {"X-API-Key": KEY})[0] == 200
    assert get(f"{base}/v1/models", {"Authorization": "Bearer wrong"})[0] == 401
    code, _ = post(f"{base}/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2})
    assert code == 401
    ws_base = base.replace("http", "ws")
    code, reason, _ = asyncio.run(ws_close(f"{ws_base}/v1/stream"))
    assert code == 4401 and "API key" in reason
    # browser origins: a foreign page can neither open the tab nor join as one
    assert get(f"{base}/tab?token={JOIN}", {"Origin": "https://evil.example"})[0] == 403
    code, reason, _ = asyncio.run(ws_close(f"{ws_base}/ws/worker", origin="https://evil.example"))
    assert code == 4403 and "origin" in reason
    # an allowed origin with a wrong join token: refused by the hello check
    hello = wire.make("hello", worker_name="x", token="nope", capabilities={"kind": "python"}, resume={"have": []})
    code, reason, first = asyncio.run(ws_close(f"{ws_base}/ws/worker", origin="https://lab.example", send=hello))
    assert code == 1008 and wire.decode(first)["code"] == "bad_token"
    after = cluster.status()["counters"]
    assert after["refused_api_key"] - before["refused_api_key"] == 4
    assert after["refused_origin"] - before["refused_origin"] == 2
    assert after["rejected_joins"] - before["rejected_joins"] == 1
    assert after["requests"] == before["requests"]  # nothing was processed for them
    # the key lets a request through
    code, body = post(f"{base}/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2,
                                                      "temperature": 0}, {"Authorization": f"Bearer {KEY}"})
    assert code == 200, body


def test_no_endpoint_reveals_a_secret(cluster):
    base = cluster.base
    auth = {"Authorization": f"Bearer {KEY}"}
    bodies = {}
    for path in ["/status", "/health", "/v1/models", "/dashboard", "/dashboard/snapshot.json", "/tab", "/tab?token=wrong",
                 "/openapi.json", "/nonexistent"]:
        bodies[path] = get(base + path, auth)[1]
    bodies["chat"] = post(f"{base}/v1/chat/completions", {"messages": [{"role": "user", "content": "say a token"}],
                                                          "max_tokens": 3, "temperature": 0}, auth)[1]

    async def dashboard_ws():
        async with websockets.connect(base.replace("http", "ws") + "/ws/dashboard") as ws:
            return await asyncio.wait_for(ws.recv(), 10)

    bodies["/ws/dashboard"] = asyncio.run(dashboard_ws())
    st = json.loads(bodies["/status"])
    assert st["access"] == {"api_key_required": True, "join_token_required": True, "allowed_origins": ["https://lab.example"]}
    for path, body in bodies.items():
        assert JOIN not in body and KEY not in body, path


def test_status_events_since_returns_every_retained_event_after_a_time(cluster):
    """/status shows the last 50 events; ?events_since=T every retained one after T, so a poller
    that fell behind a burst misses none. A value that is not a finite number is refused."""
    base, auth = cluster.base, {"Authorization": f"Bearer {KEY}"}
    last50 = json.loads(get(f"{base}/status", auth)[1])["events"]
    assert last50, "the coordinator's own compute joined and was planned: there are events"
    every = json.loads(get(f"{base}/status?events_since=-1e9", auth)[1])["events"]
    assert every[-len(last50):] == last50
    t = last50[0]["t"]
    assert json.loads(get(f"{base}/status?events_since={t!r}", auth)[1])["events"] == [e for e in every if e["t"] > t]
    assert json.loads(get(f"{base}/status?events_since=1e18", auth)[1])["events"] == []
    for bad in ("abc", "nan", "inf"):
        code, body = get(f"{base}/status?events_since={bad}", auth)
        err = json.loads(body)["error"]
        assert code == 400 and err["param"] == "events_since" and "finite" in err["message"], body


def test_limits_refuse_clearly(cluster):
    base, auth = cluster.base, {"Authorization": f"Bearer {KEY}"}
    chat = lambda content, n: post(f"{base}/v1/chat/completions", {"messages": [{"role": "user", "content": content}],  # noqa: E731
                                                                  "max_tokens": n, "temperature": 0}, auth)
    code, body = chat("word " * 200, 4)
    assert code == 400 and "at most 64 are allowed" in body
    code, body = chat("hi", 25)
    assert code == 400 and "'max_tokens' must be between 1 and 24" in body
    code, body = chat("x" * 70_000, 4)  # refused by size before it is read whole or tokenized
    assert code == 413 and "max_request_bytes (65536 bytes)" in body
    # one session at a time: a second request while one streams gets 429 + Retry-After
    req = urllib.request.Request(f"{base}/v1/chat/completions", json.dumps(
        {"messages": [{"role": "user", "content": "count to twenty"}], "max_tokens": 24, "temperature": 0, "stream": True,
         "ignore_eos": True}).encode(), {"Content-Type": "application/json", **auth})
    with urllib.request.urlopen(req, timeout=60) as stream:
        stream.readline()  # the first chunk: the session is running
        try:
            urllib.request.urlopen(urllib.request.Request(f"{base}/v1/chat/completions", json.dumps(
                {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}).encode(),
                {"Content-Type": "application/json", **auth}), timeout=30)
            raise AssertionError("expected 429")
        except urllib.error.HTTPError as e:
            assert e.code == 429 and e.headers["Retry-After"] == "1"
            assert "retry later" in json.loads(e.read())["error"]["message"]
        stream.read()

    async def flood_stream():
        errors = 0
        async with websockets.connect(base.replace("http", "ws") + "/v1/stream", additional_headers=auth) as ws:
            for _ in range(30):
                await ws.send(wire.encode(wire.make("cancel", request_id="nothing")))
            while True:
                try:
                    m = wire.decode(await asyncio.wait_for(ws.recv(), 1.0))
                except asyncio.TimeoutError:
                    return errors
                errors += m["code"] == "rate_limited"

    assert asyncio.run(flood_stream()) >= 15  # burst of 10, then refusals

    async def flood_worker():
        async with websockets.connect(base.replace("http", "ws") + "/ws/worker") as ws:
            await ws.send(wire.encode(wire.make("hello", worker_name="flood", token=JOIN, capabilities={"kind": "python"},
                                                resume={"have": []})))
            try:
                for i in range(1000):
                    await ws.send(wire.encode(wire.make("heartbeat", seq=i, load={})))
                async for data in ws:
                    m = wire.decode(data)
                    if m["type"] == "error":
                        return m["code"], None
            except websockets.ConnectionClosed:
                pass
            return None, ws.close_code

    code, close = asyncio.run(flood_worker())
    assert code == "rate_limited" or close == 1008
    st = cluster.status()
    assert st["counters"]["refused_rate"] >= 16 and st["counters"]["refused_overloaded"] >= 1
    assert any(w["name"] == "flood" and w["state"] == "quarantined" for w in st["workers"])


def self_signed(tmp_path):
    """A self-signed certificate for 127.0.0.1 and localhost (the openssl command line; the venv has no
    `cryptography`)."""
    openssl = shutil.which("openssl")
    if openssl is None:
        pytest.skip("no openssl to make a test certificate")
    certfile, keyfile = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run([openssl, "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
                    "-keyout", str(keyfile), "-out", str(certfile), "-days", "1", "-subj", "/CN=127.0.0.1",
                    "-addext", "subjectAltName=IP:127.0.0.1,DNS:localhost"], check=True, capture_output=True)
    return str(certfile), str(keyfile)


def test_tls_https_and_wss(tmp_path):
    certfile, keyfile = self_signed(tmp_path)
    port = free_port()
    p = subprocess.Popen([sys.executable, "-m", "tabshard.cli", "serve", "--port", str(port), "--token", JOIN,
                          "--certfile", certfile, "--keyfile", keyfile], stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        ctx = ssl.create_default_context(cafile=certfile)
        deadline = time.monotonic() + 90
        while True:
            try:
                code, body = get(f"https://127.0.0.1:{port}/health", ctx=ctx)
                break
            except (OSError, urllib.error.URLError):
                assert time.monotonic() < deadline and p.poll() is None, "TLS coordinator did not come up"
                time.sleep(0.3)
        assert code in (200, 503) and "workers" in json.loads(body)
        hello = wire.make("hello", worker_name="x", token="nope", capabilities={"kind": "python"}, resume={"have": []})
        code, _, first = asyncio.run(ws_close(f"wss://127.0.0.1:{port}/ws/worker", send=hello, ssl=ctx))
        assert code == 1008 and wire.decode(first)["code"] == "bad_token"
        with pytest.raises(OSError):  # plain http on the TLS port is not served
            urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=5).read()
    finally:
        p.terminate()
        out = p.communicate(timeout=10)[0].decode()
    assert "wss://127.0.0.1" in out and "https://127.0.0.1" in out
