"""`tabshard worker` and `tabshard status` as a user runs them: real processes, a real
coordinator on 127.0.0.1 (and, for a refused protocol version, a scripted coordinator speaking
the real protocol over a real socket). Each failure ends the worker at once with a sentence
naming the cause; a joined worker says what it does and leaves cleanly on SIGTERM."""
import asyncio
import os
import queue
import signal
import subprocess
import sys
import threading
import time

import pytest
import websockets

from protocol import wire
from tabshard.cluster import LocalCluster, free_port

TOKEN = "cli-token"


def tabshard(*args, **kw) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "tabshard.cli", *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, **kw)


class Lines:
    """A process's stdout lines as they come (read on a thread)."""

    def __init__(self, proc: subprocess.Popen):
        self.proc, self.q, self.seen = proc, queue.Queue(), []
        threading.Thread(target=lambda: [self.q.put(line) for line in proc.stdout], daemon=True).start()

    def wait_for(self, text: str, timeout: float) -> str:
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            try:
                line = self.q.get(timeout=0.2)
            except queue.Empty:
                continue
            self.seen.append(line)
            if text in line:
                return line
        raise AssertionError(f"no line with {text!r} in {timeout} s; got {self.seen}")


@pytest.fixture(scope="module")
def cluster():
    with LocalCluster(workers=0, token=TOKEN) as c:
        yield c


def finish(p: subprocess.Popen, timeout: float) -> tuple[int, str]:
    _, err = p.communicate(timeout=timeout)
    return p.returncode, err


def test_wrong_token_exits_at_once_naming_the_token(cluster):
    t0 = time.monotonic()
    p = tabshard("worker", "--connect", cluster.worker_url, "--token", "not-the-token", "--backend", "numpy")
    rc, err = finish(p, 30)
    elapsed = time.monotonic() - t0
    assert rc == 2 and "join token 'not-the-token'" in err and "Traceback" not in err, err
    assert elapsed < 5, f"took {elapsed:.1f} s"


def test_an_http_url_is_refused_with_the_ws_one(cluster):
    p = tabshard("worker", "--connect", cluster.base, "--token", TOKEN)
    rc, err = finish(p, 30)
    assert rc == 2 and f"use {cluster.worker_url}" in err, err


def test_a_refused_protocol_version_ends_the_worker():
    """A coordinator of another version refuses the hello (its decoder's version_mismatch)."""
    port = free_port()

    async def coordinator(ws):
        wire.decode(await ws.recv())
        await ws.send(wire.encode(wire.make("error", code="version_mismatch", field="v", message="protocol version 1 is not 2")))
        await ws.close(1008, "protocol error: version_mismatch")

    ready, done = threading.Event(), threading.Event()

    def serve():
        async def main():
            async with websockets.serve(coordinator, "127.0.0.1", port, compression=None):
                ready.set()
                while not done.is_set():
                    await asyncio.sleep(0.05)
        asyncio.run(main())

    threading.Thread(target=serve, daemon=True).start()
    assert ready.wait(10)
    try:
        rc, err = finish(tabshard("worker", "--connect", f"ws://127.0.0.1:{port}/ws/worker", "--token", TOKEN,
                                  "--backend", "numpy"), 30)
    finally:
        done.set()
    assert rc == 2 and "protocol version" in err and "same tabshard version" in err, err


def test_no_coordinator_says_why_it_retries_and_sigterm_stops_it():
    p = tabshard("worker", "--connect", f"ws://127.0.0.1:{free_port()}/ws/worker", "--token", TOKEN, "--backend", "numpy")
    lines = Lines(p)
    lines.wait_for("reconnecting in", 20)
    assert any("nothing accepts connections" in line for line in lines.seen)
    p.send_signal(signal.SIGTERM)
    assert p.wait(10) == 0


def status(cluster, *args) -> str:
    out = subprocess.run([sys.executable, "-m", "tabshard.cli", "status", "--url", cluster.base, *args],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and not out.stderr, out.stderr
    return out.stdout


def test_worker_lifecycle_sigterm_and_status(cluster):
    p = tabshard("worker", "--connect", cluster.worker_url, "--token", TOKEN, "--backend", "numpy", "--name", "laptop")
    lines = Lines(p)
    joined = lines.wait_for("joined as w", 30)
    wid = joined.split("joined as ")[1].split()[0]
    lines.wait_for("loading layers", 60)
    lines.wait_for("ready for layers", 120)
    cluster.wait_for(lambda st: any(s["holders"][:1] == [wid] and wid in s["ready"] for s in st["stages"]), 60, "tab serving")
    shown = status(cluster)
    assert shown.startswith("plan v") and "healthy" in shown.splitlines()[0], shown
    assert f"-> {wid}" in shown and "laptop" in shown and "[" not in shown  # ids in the map, names in the table only

    p.send_signal(signal.SIGTERM)
    assert p.wait(10) == 0
    lines.wait_for("stopped", 5)
    st = cluster.wait_for(lambda st: any(w["worker_id"] == wid and w["state"] == "dead" for w in st["workers"]), 10, "left")
    assert any(e.get("worker") == wid for e in st["events"])
    cluster.wait_for(lambda st: all(s["holders"][:1] == ["local"] for s in st["stages"]), 30, "coordinator took over")
    shown = status(cluster)
    assert "DEGRADED" in shown and "coordinator's own compute" in shown, shown
    assert "laptop" not in shown and "ended worker" in shown  # live workers only by default
    assert "laptop" in status(cluster, "--all")


def test_status_is_quiet_on_a_closed_pipe(cluster):
    """As `tabshard status | head -0`: the reader is gone before status writes."""
    read, write = os.pipe()
    os.close(read)
    p = subprocess.Popen([sys.executable, "-m", "tabshard.cli", "status", "--all", "--url", cluster.base], stdout=write,
                         stderr=subprocess.PIPE, text=True)
    os.close(write)
    _, err = p.communicate(timeout=60)
    assert p.returncode == 0 and err == "", err
