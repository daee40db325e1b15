"""A tab that lies, end to end over real sockets: a `tabshard serve` process on 127.0.0.1 and
two Python tab workers joined over WebSocket (in this process, so the test can turn one into a
liar mid-stream: actors.faults.lie, the same hook the simulation uses). The client streams over
/v1/stream; the tokens the liar changed come back withdrawn by a `rewind`, and what the client
ends with is exactly the single-worker `generate` result, also when the liar is caught only
after the last token went out ("done" waits for pending checks). A non-streaming request
afterwards returns the exact answer too."""
import asyncio
import contextlib
import json
import threading
import urllib.request

import pytest
import websockets

from actors.faults import lie
from tab_worker.client import WorkerConnection
from tab_worker.worker import TabWorker
from protocol import wire
from tabshard.cluster import LocalCluster
from tabshard.demo import stream_chat
from tab_worker.generate import LocalGenerator

PROMPT = "Write a short poem about the sea."
N = 32


@pytest.fixture(scope="module")
def reference(smollm2_weights, smollm2_tokenizer):
    gen = LocalGenerator(smollm2_weights, backend="numpy", max_ctx=512)
    ids = smollm2_tokenizer.encode(smollm2_tokenizer.render_chat([{"role": "user", "content": PROMPT}]))
    return list(gen.generate(ids, N))


class InProcessWorkers:
    """Python tab workers on their own event loop thread, reachable for fault injection."""

    def __init__(self, url: str, token: str, names: list[str]):
        self.workers = {n: TabWorker(n, backend="numpy", token=token) for n in names}
        self.loop = asyncio.new_event_loop()
        # a caught liar stays out: its tab would rejoin under a new id and lie again
        self.conns = [WorkerConnection(w, url, reconnect=False) for w in self.workers.values()]
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self):
        asyncio.set_event_loop(self.loop)
        self.loop.run_until_complete(asyncio.gather(*(c.run() for c in self.conns)))

    def stop(self):
        # each socket closed by its evict, awaited here: scheduled beside a stop that ended the
        # loop first, the evict never ran, and its coroutine's "never awaited" warning surfaced
        # in whichever later test collected it (test_network's, in CI)
        for c in self.conns:
            if not self.loop.is_running():  # every tab gone already (a fenced liar does not rejoin)
                c.stop()
                continue
            coro = c.evict("test over", 1000)
            try:
                asyncio.run_coroutine_threadsafe(coro, self.loop).result(10)
            except Exception:  # the loop ended before running it, or the socket was gone already
                coro.close()  # (closing a finished or never-started coroutine is harmless and silences it)
        self.thread.join(10)


@contextlib.contextmanager
def two_tabs_one_to_lie(tmp_path):
    """A coordinator (spot checks at 30 %) and two in-process tabs serving a stage each; yields
    the cluster and the first stage's TabWorker, the one a test turns into a liar."""
    cfg = tmp_path / "serve.toml"
    # trusted from the start (no probation): what is tested here is a sampled spot check that
    # catches a liar after its tokens went out; on probation every step of a new tab is checked,
    # which can catch it before a wrong token is sent, and then there is nothing to rewind
    cfg.write_text("spot_check_fraction = 0.3\nspot_check_seed = 5\nprefix_cache_entries = 0\nprobation_steps = 0\nstages = 2\n")
    with LocalCluster(workers=0, serve_args=["--config", str(cfg)], log_dir=str(tmp_path / "logs")) as cluster:
        pool = InProcessWorkers(cluster.worker_url, cluster.token, ["tab-a", "tab-b"])
        try:
            st = cluster.wait_for(lambda s: len(s["stages"]) == 2 and all(
                x["holders"] and x["holders"][0] in x["ready"] and x["holders"][0] != "local" for x in s["stages"]),
                120, "both tabs serving")
            by_id = {w["worker_id"]: w["name"] for w in st["workers"]}
            yield cluster, pool.workers[by_id[st["stages"][0]["holders"][0]]]
        finally:
            pool.stop()


def test_liar_tokens_are_rewound_and_the_client_ends_exact(tmp_path, reference, smollm2_tokenizer):
    with two_tabs_one_to_lie(tmp_path) as (cluster, liar):
        async def stream():
            events, ids, text = [], [], ""
            async with websockets.connect(cluster.base.replace("http", "ws") + "/v1/stream", compression=None) as ws:
                await ws.send(wire.encode(wire.make("generate", request_id="poem", max_tokens=N, greedy=True,
                                                    messages=[{"role": "user", "content": PROMPT}])))
                while True:
                    m = wire.decode(await asyncio.wait_for(ws.recv(), 120))
                    events.append(m["type"])
                    if m["type"] == "token":
                        assert m["index"] == len(ids)  # no gap, no duplicate
                        ids.append(m["token_id"])
                        text += m["text"]
                        if len(ids) == 3:
                            lie(liar, 3.0)  # from here on, every result it returns is wrong
                    elif m["type"] == "rewind":
                        assert m["index"] < len(ids) and m["retract_chars"] <= len(text)
                        del ids[m["index"]:]
                        text = text[:len(text) - m["retract_chars"]]
                    elif m["type"] == "done":
                        return ids, text, events
                    else:
                        raise AssertionError(m)

        ids, text, events = asyncio.run(stream())
        assert ids == reference
        assert text == smollm2_tokenizer.decode([t for t in reference if t != 2])
        assert "rewind" in events
        st = cluster.status()
        assert any(w["name"] == liar.name and w["state"] == "quarantined" for w in st["workers"])
        assert st["counters"]["tokens_retracted"] >= 1
        # the pool without the liar (tab-b and the coordinator) answers exactly
        body = json.dumps({"messages": [{"role": "user", "content": PROMPT}], "max_tokens": N, "temperature": 0}).encode()
        req = urllib.request.Request(f"{cluster.base}/v1/chat/completions", body, {"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=120) as r:
            answer = json.loads(r.read())["choices"][0]["message"]["content"]
        assert answer == smollm2_tokenizer.decode([t for t in reference if t != 2])


def test_liar_tokens_are_rewound_in_the_sse_stream(tmp_path, reference, smollm2_tokenizer):
    """The same over OpenAI-style SSE: the withdrawn text comes as a `tabshard_rewind` chunk
    (index, retract_chars), and the text the client ends with is the exact answer."""
    with two_tabs_one_to_lie(tmp_path) as (cluster, liar):
        pieces, rewinds = [], []

        def on_text(piece):
            pieces.append(piece)
            if len(pieces) == 3:
                lie(liar, 3.0)

        # the demo's SSE reader (tabshard demo prints what it returns)
        text, usage = stream_chat(cluster.base, PROMPT, N, on_text, rewinds.append)
        assert rewinds and all(rw["retract_chars"] >= 0 and rw["reason"] for rw in rewinds)
        assert usage["finish_reason"] in ("stop", "length")
        assert text == smollm2_tokenizer.decode([t for t in reference if t != 2])
        assert "".join(pieces) != text  # the liar's text did reach the client before it was withdrawn
