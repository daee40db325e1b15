"""Coordinator restart, real processes: the coordinator is SIGKILLed mid-stream and started
again on the same port. The in-flight client sees its connection drop (a transport failure:
retriable, nothing was completed); the workers reconnect by themselves with backoff and
re-register with the blobs they hold, so no weight byte is sent again; a new request is
served as soon as the plan is whole. Measured: restart -> first new token."""
import http.client
import json
import signal
import subprocess
import sys
import threading
import time
import urllib.request

from tabshard.cluster import LocalCluster
from tests.test_cluster import chat


def test_restart_workers_rejoin_without_weights_and_serve(capsys):
    with LocalCluster(workers=2, token="restart-token") as c:
        first = c.status()
        assert first["counters"]["weight_bytes_sent"] > 0
        # a streaming request in flight when the coordinator dies
        outcome = {}

        def client():
            body = json.dumps({"messages": [{"role": "user", "content": "Tell a long story."}], "max_tokens": 200,
                               "temperature": 0, "stream": True}).encode()
            req = urllib.request.Request(f"{c.base}/v1/chat/completions", body, {"Content-Type": "application/json"})
            try:
                with urllib.request.urlopen(req, timeout=60) as r:
                    for raw in r:
                        line = raw.decode().strip()
                        if line == "data: [DONE]":
                            outcome["result"] = "done"
                            return
                        if line.startswith("data: {"):
                            outcome["streaming"] = True
                outcome["result"] = "ended without [DONE]"
            except (OSError, http.client.HTTPException) as exc:
                outcome["result"] = exc

        t = threading.Thread(target=client)
        t.start()
        deadline = time.monotonic() + 60
        while "streaming" not in outcome and time.monotonic() < deadline:
            time.sleep(0.05)
        assert outcome.get("streaming"), outcome
        c.coordinator.send_signal(signal.SIGKILL)
        c.coordinator.wait()
        t.join(30)
        # the client's connection dropped mid-stream: the stream ends without its final [DONE]
        # chunk (or with a transport error): a retriable failure, never a completed answer
        assert outcome["result"] != "done", outcome

        restarted = time.monotonic()
        cmd = [sys.executable, "-m", "tabshard.cli", "serve", "--port", str(c.port), "--token", c.token]
        c.coordinator = subprocess.Popen(cmd, env=c._env, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
        st = c.wait_for(lambda s: s["stages"] and all(x["holders"] and x["holders"][0] in x["ready"] for x in s["stages"])
                        and sum(1 for w in s["workers"] if not w["local"] and w["state"] == "ready") == 2
                        and not any(x["holders"][0] == "local" for x in s["stages"]), 120, what="workers rejoined")
        whole = time.monotonic() - restarted
        assert st["counters"]["weight_bytes_sent"] == 0, ([(w["name"], w["weight_bytes_sent"], w["state"]) for w in st["workers"]], [(first["stages"], e["stages"]) for e in st["events"] if e["kind"] == "plan"])
        assert all(w["weight_bytes_sent"] == 0 for w in st["workers"])
        first_token = {}
        text = chat(c.base, max_tokens=8, on_token=lambda n: first_token.setdefault("t", time.monotonic()))
        assert text
        ttft = first_token["t"] - restarted
        with capsys.disabled():
            print(f"\ncoordinator restart: plan whole again after {whole:.1f} s, first new token {ttft:.1f} s after the "
                  f"restart (model load included); weight bytes re-sent: {st['counters']['weight_bytes_sent']}")
