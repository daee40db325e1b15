"""Real processes on 127.0.0.1: a coordinator (`tabshard serve`) and Python tab workers
(`tabshard worker`) serving SmolLM2; failures are real signals to real PIDs."""
import asyncio
import json
import signal
import time
import urllib.request

import numpy as np
import pytest
import websockets

from protocol import wire
from tabshard.cluster import LocalCluster
from tab_worker.generate import LocalGenerator

PROMPT = "List three uses of a hash table."
N = 24


@pytest.fixture(scope="module")
def reference(smollm2_weights, smollm2_tokenizer):
    """Single-worker `generate` on the same backend: the tokens every cluster must reproduce."""
    gen = LocalGenerator(smollm2_weights, backend="numpy", max_ctx=512)
    ids = smollm2_tokenizer.encode(smollm2_tokenizer.render_chat([{"role": "user", "content": PROMPT}]))
    return list(gen.generate(ids, N))


def chat(base, max_tokens=N, stream=True, prompt=PROMPT, on_token=None, timeout=120):
    body = json.dumps({"messages": [{"role": "user", "content": prompt}], "max_tokens": max_tokens,
                       "temperature": 0, "stream": stream}).encode()
    req = urllib.request.Request(f"{base}/v1/chat/completions", body, {"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=timeout) as r:
        if not stream:
            return json.loads(r.read())
        text = []
        for raw in r:
            line = raw.decode().strip()
            if line.startswith("data: {"):
                ev = json.loads(line[6:])
                assert "error" not in ev, ev
                piece = ev["choices"][0]["delta"].get("content")
                if piece:
                    text.append(piece)
                    if on_token:
                        on_token(len(text))
        return "".join(text)


def ws_tokens(base, prompt=PROMPT, max_tokens=N):
    """Token ids through the WebSocket token stream (/v1/stream)."""

    async def go():
        async with websockets.connect(base.replace("http", "ws") + "/v1/stream", compression=None) as ws:
            await ws.send(wire.encode(wire.make("generate", request_id="t1", messages=[{"role": "user", "content": prompt}],
                                                max_tokens=max_tokens, greedy=True)))
            ids = []
            while True:
                m = wire.decode(await ws.recv())
                if m["type"] == "token":
                    assert m["index"] == len(ids)  # no gap, no duplicate
                    ids.append(m["token_id"])
                elif m["type"] == "done":
                    return ids
                else:
                    raise AssertionError(m)

    return asyncio.run(go())


@pytest.mark.parametrize("n_workers", [1, 2])
def test_small_clusters_match_single_worker(reference, n_workers):
    with LocalCluster(workers=n_workers, serve_args=["--stages", str(n_workers)]) as cluster:
        assert len(cluster.status()["stages"]) == n_workers
        assert ws_tokens(cluster.base) == reference


def test_a_started_cluster_enters_as_it_is(reference):
    """`with LocalCluster(...).start(timeout=...)`: entering a started cluster starts nothing
    again (it doubled the workers on the first coordinator, and stop() left that one running)."""
    with LocalCluster(workers=1).start(timeout=120) as cluster:
        st = cluster.status()
        assert len(cluster.workers) == 1 and [w["name"] for w in st["workers"] if not w["local"]] == ["worker-0"], st["workers"]
        assert ws_tokens(cluster.base) == reference
        procs = [cluster.coordinator, *cluster.workers]
    assert all(p.poll() is not None for p in procs)


@pytest.fixture(scope="module")
def cluster4(tmp_path_factory):
    c = LocalCluster(workers=4, serve_args=["--stages", "4"], log_dir=str(tmp_path_factory.mktemp("cluster4")))
    c.start()
    yield c
    c.stop()


def test_four_workers_match_single_worker(cluster4, reference, smollm2_tokenizer):
    st = cluster4.status()
    assert len(st["stages"]) == 4 and not st["degraded"]
    assert ws_tokens(cluster4.base) == reference
    # each tab's decode step, split into the compute it reports and the hop around it (kept when a
    # tab reloads: the tabs' probation may end during the request, and the re-plan that follows
    # can have every tab loading its new range right now)
    tabs = [w for w in cluster4.status()["workers"] if not w["local"] and w["state"] not in ("dead", "quarantined")]
    assert len(tabs) == 4 and all(w["compute_ms"] > 0 and w["transport_ms"] >= 0 for w in tabs), tabs
    # and each tab's round trip, timed by the coordinator's pings over the real sockets
    cluster4.wait_for(lambda s: all(w["rtt_ms"] is not None and w["rtt_ms"] > 0 for w in s["workers"] if not w["local"]
                                    and w["state"] not in ("dead", "quarantined")), 10, what="the tabs' round trips")
    text = chat(cluster4.base)
    assert text == smollm2_tokenizer.decode([t for t in reference if t != 2])


def test_openai_client_streams_a_chat_completion(cluster4, reference, smollm2_tokenizer):
    openai = pytest.importorskip("openai")
    client = openai.OpenAI(base_url=cluster4.base + "/v1", api_key="unused")
    assert [m.id for m in client.models.list().data] == ["smollm2-135m-instruct"]
    stream = client.chat.completions.create(model="smollm2-135m-instruct", messages=[{"role": "user", "content": PROMPT}],
                                            max_tokens=N, temperature=0, stream=True)
    text = "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
    assert text == smollm2_tokenizer.decode([t for t in reference if t != 2])
    full = client.completions.create(model="smollm2-135m-instruct", prompt="The capital of France is", max_tokens=5, temperature=0)
    assert full.choices[0].text.startswith(" Paris")


def test_client_disconnect_cancels_within_a_second(cluster4):
    body = json.dumps({"messages": [{"role": "user", "content": "Write a long story."}], "max_tokens": 400,
                       "temperature": 0, "stream": True}).encode()
    req = urllib.request.Request(f"{cluster4.base}/v1/chat/completions", body, {"Content-Type": "application/json"})
    r = urllib.request.urlopen(req, timeout=60)
    for _ in range(6):
        r.readline()
    r.close()
    t0 = time.monotonic()
    cluster4.wait_for(lambda st: not st["sessions"], 1.5, "the session to be cancelled")
    assert time.monotonic() - t0 < 1.5
    assert cluster4.status()["counters"]["cancelled"] >= 1


def test_bad_messages_are_refused_and_other_sessions_unharmed(cluster4, reference):
    async def attack():
        # each attack from a loopback address of its own: the coordinator backs off an address
        # past two offenses, and the honest workers (127.0.0.1) must not share the penalty
        url = cluster4.worker_url
        results = {}
        # 1) garbage bytes before joining
        async with websockets.connect(url, compression=None, local_addr=("127.0.0.71", 0)) as ws:
            await ws.send(b"\xc1\xff garbage")
            results["garbage"] = wire.decode(await ws.recv())
        # 2) a joined worker sends a wrong-shape step result
        async with websockets.connect(url, compression=None, local_addr=("127.0.0.72", 0)) as ws:
            await ws.send(wire.encode(wire.make("hello", worker_name="liar", token=cluster4.token, capabilities={"memory_bytes": 1})))
            while True:
                m = wire.decode(await ws.recv())
                if m["type"] == "measure":
                    break
            bad = wire.make("step_result", step_id=1, epoch=1, output=np.zeros((2, 3), np.float64).astype(np.float32))
            bad["output"] = "not a tensor"
            await ws.send(wire.encode(bad, validate=False))
            # the coordinator's once-a-second ping may come first: the answer is what follows
            while (m := wire.decode(await ws.recv()))["type"] == "ping":
                pass
            results["wrong_type"] = m
        # 3) an oversized frame
        async with websockets.connect(url, compression=None, max_size=None, local_addr=("127.0.0.73", 0)) as ws:
            try:
                await ws.send(b"\x80" + b"\0" * (65 << 20))
                results["oversized"] = await asyncio.wait_for(ws.recv(), 10)
            except websockets.ConnectionClosed as exc:
                results["oversized"] = exc.rcvd.code if exc.rcvd else None
        return results

    import threading

    out = {}
    t = threading.Thread(target=lambda: out.setdefault("ids", ws_tokens(cluster4.base)))
    t.start()
    results = asyncio.run(attack())
    t.join(120)
    assert results["garbage"]["type"] == "error" and results["garbage"]["code"] == "malformed"
    assert results["wrong_type"]["code"] == "bad_field" and results["wrong_type"]["field"] == "output"
    assert results["oversized"] == 1009  # message too big: refused by the socket layer before decoding
    assert out["ids"] == reference
    st = cluster4.status()
    assert any(w["name"] == "liar" and w["state"] == "quarantined" for w in st["workers"])
    assert st["counters"]["protocol_errors"] >= 2


def test_kill_dash_nine_mid_stream_gives_identical_tokens(cluster4, reference, smollm2_tokenizer):
    killed = {}

    def on_token(n):
        if n == 6 and not killed:
            pid = cluster4.stage_worker_pid(1)
            cluster4.signal_worker(pid, signal.SIGKILL)
            killed["t"] = time.monotonic()

    text = chat(cluster4.base, on_token=on_token)
    assert killed
    assert text == smollm2_tokenizer.decode([t for t in reference if t != 2])
    ev = cluster4.status()["events"]
    death = [e for e in ev if e["kind"] == "death"]
    # a closed socket is a death at once: well inside the second a failed tab is promised to be
    # found in (0.33 s once on a 2-core host at load 5, where 0.15 s was asked before)
    assert death and death[-1]["t"] - killed["t"] < 1.0
    assert any(e["kind"] == "recovered" for e in ev)


def test_sigstop_is_detected_within_a_second_then_fenced(cluster4, reference, smollm2_tokenizer):
    cluster4.wait_for(lambda st: not st["sessions"] and all(s["holders"] and s["holders"][0] in s["ready"] for s in st["stages"]), 60, "idle plan")
    stopped = {}

    def on_token(n):
        if n == 5 and not stopped:
            st = cluster4.status()
            wid = st["stages"][0]["holders"][0]
            stopped["name"] = next(w["name"] for w in st["workers"] if w["worker_id"] == wid)
            stopped["worker_id"] = wid
            stopped["pid"] = cluster4.stage_worker_pid(0)
            cluster4.signal_worker(stopped["pid"], signal.SIGSTOP)
            stopped["t"] = time.monotonic()

    try:
        text = chat(cluster4.base, on_token=on_token)
        assert stopped
        assert text == smollm2_tokenizer.decode([t for t in reference if t != 2])
        ev = cluster4.status()["events"]
        death = next(e for e in ev if e["kind"] == "death" and e["worker"] == stopped["worker_id"])
        assert death["t"] - stopped["t"] <= 1.0  # time.monotonic is one clock for every process here
        assert "silent" in death["reason"]
    finally:
        if stopped:
            cluster4.signal_worker(stopped["pid"], signal.SIGCONT)
    # the frozen worker wakes to find itself fenced (its old id stays dead) and rejoins as a new worker
    st = cluster4.wait_for(lambda st: any(w["name"] == stopped["name"] and w["worker_id"] != stopped["worker_id"]
                                          and w["state"] not in ("dead", "quarantined") for w in st["workers"]), 20,
                           "the fenced worker to rejoin")
    assert next(w for w in st["workers"] if w["worker_id"] == stopped["worker_id"])["state"] == "dead"
    assert ws_tokens(cluster4.base) == reference


def test_worker_joining_mid_session_is_used_later(cluster4, reference):
    cluster4.wait_for(lambda st: not st["sessions"], 30, "idle")
    import threading

    out = {}
    t = threading.Thread(target=lambda: out.setdefault("ids", ws_tokens(cluster4.base, max_tokens=N)))
    t.start()
    time.sleep(0.3)
    cluster4.add_worker(name="worker-late")
    t.join(120)
    assert out["ids"] == reference
    st = cluster4.wait_for(lambda st: any(w["name"] == "worker-late" and w["stages"] for w in st["workers"])
                           and all(s["holders"] and s["holders"][0] in s["ready"] for s in st["stages"]), 60, "re-plan with the new worker")
    assert ws_tokens(cluster4.base) == reference
    st = cluster4.status()
    assert next(w for w in st["workers"] if w["name"] == "worker-late")["steps"] > 0
