"""The live dashboard: its feed logic without sockets, then the page in real headless Chromium
against a real LocalCluster whose worker is killed by PID mid-generation."""
import json
import os
import shutil
import signal
import threading
import time
import urllib.request
from pathlib import Path

import pytest

from coordinator.dashboard import DashboardFeed
from coordinator.records import Close, Emit

ARTIFACTS = Path(__file__).resolve().parents[1] / "artifacts"
CHROMIUM_ARGS = ["--headless=new", "--no-sandbox", "--disable-background-networking", "--disable-component-update",
                 "--disable-sync", "--no-first-run", "--disable-quic", "--disable-dev-shm-usage"]


# ---------------------------------------------------------------------------- feed logic
def test_feed_series_from_token_emits():
    feed = DashboardFeed(window_s=10)
    created = {"r1": 100.0}
    tok = lambda i: Emit("r1", {"type": "token", "index": i, "token_id": 5})  # noqa: E731
    feed.observe([tok(0)], 100.25, created.get)  # TTFT 250 ms
    feed.observe([tok(1)], 100.35, created.get)  # ITL 100 ms
    feed.observe([tok(2)], 101.45, created.get)  # ITL 1100 ms, next second
    s = feed.series(101.5)
    assert len(s["t"]) == 10 and s["t"][-1] == 101
    assert s["tok_s"][-2:] == [2, 1]
    assert s["ttft_ms"][-2] == 250.0 and s["ttft_ms"][-1] is None
    assert s["itl_ms"][-2:] == [100.0, 1100.0]
    feed.observe([Emit("r1", {"type": "done", "finish_reason": "length"})], 101.6)
    assert "r1" not in feed.last_token
    v = feed.version
    feed.observe([Close("c1", 4000, "fenced")], 102.0)
    assert feed.version > v
    assert feed.series(200.0)["tok_s"] == [0] * 10  # old buckets roll out of the window


def test_timeline_pairs_failures_with_durations():
    events = [{"t": 10.0, "kind": "join", "worker": "w1", "name": "a"},
              {"t": 11.0, "kind": "death", "worker": "w1", "reason": "socket closed", "last_seen_s": 0.05},
              {"t": 11.0, "kind": "rebuild", "stage": 1, "worker": "w2", "sessions": 1},
              {"t": 11.4, "kind": "recovered", "stage": 1, "recovery_s": 0.4},
              {"t": 11.5, "kind": "steps_internal"}]
    tl = DashboardFeed.timeline(events, now=12.0, wall=1000.0)
    assert [e["kind"] for e in tl] == ["recovered", "rebuild", "death", "join"]  # newest first, noise dropped
    assert tl[0]["duration_s"] == 0.4 and tl[0]["duration_label"] == "recovery"
    assert tl[2]["duration_s"] == 0.05 and tl[2]["t"] == 999.0


# ---------------------------------------------------------------------------- the page
def _stream(base: str, max_tokens: int, on_token) -> list[int]:
    import asyncio

    import websockets

    from protocol import wire

    async def go():
        async with websockets.connect(base.replace("http", "ws") + "/v1/stream", compression=None) as ws:
            await ws.send(wire.encode(wire.make("generate", request_id="d", messages=[{"role": "user", "content": "Count to fifty."}],
                                                max_tokens=max_tokens, greedy=True)))
            ids = []
            while True:
                m = wire.decode(await ws.recv())
                if m["type"] == "token":
                    ids.append(m["token_id"])
                    on_token(len(ids))
                elif m["type"] == "done":
                    return ids
                else:
                    raise RuntimeError(m)

    return asyncio.run(go())


def test_dashboard_in_chromium_shows_a_killed_worker(tmp_path):
    sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed")
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        pytest.skip("no chromium on this host")
    from tabshard.cluster import LocalCluster

    ARTIFACTS.mkdir(exist_ok=True)
    cluster = LocalCluster(workers=3, backend="numpy", log_dir=str(tmp_path / "logs"), serve_args=["--stages", "3"])
    cluster.start(timeout=90)
    try:
        with urllib.request.urlopen(f"{cluster.base}/dashboard/snapshot.json", timeout=5) as r:
            assert len(json.loads(r.read())["workers"]) >= 3
        with sync_api.sync_playwright() as pw:
            browser = pw.chromium.launch(executable_path=chromium, args=CHROMIUM_ARGS)
            try:
                page = browser.new_page(viewport={"width": 1400, "height": 1250})
                requests = []
                page.on("request", lambda req: requests.append(req.url))
                page.goto(f"{cluster.base}/dashboard")
                page.wait_for_selector("#conn.on", timeout=10_000)
                st = cluster.status()
                # live ones: on a loaded host a worker may be declared dead at start and rejoin
                remote = [w for w in st["workers"] if not w["local"] and w["state"] not in ("dead", "quarantined")]
                assert len(remote) == 3
                for w in remote:
                    page.wait_for_selector(f'tr[data-worker-id="{w["worker_id"]}"] .s-ready', timeout=10_000)
                assert page.evaluate("typeof uPlot") == "function", "chart library not bundled (npm run build)"

                # kill a middle stage's primary by PID while a generation runs
                victim = {}

                def on_token(n):
                    if n == 4 and not victim:
                        s = cluster.status()
                        stage = 1 if len(s["stages"]) > 1 else 0
                        victim["wid"] = s["stages"][stage]["holders"][0]
                        victim["pid"] = cluster.stage_worker_pid(stage)
                        os.kill(victim["pid"], signal.SIGKILL)

                result = {}
                t = threading.Thread(target=lambda: result.setdefault("ids", _stream(cluster.base, 24, on_token)))
                t.start()
                t.join(60)
                assert result.get("ids") and len(result["ids"]) == 24, "the generation did not survive the kill"
                row = f'tr[data-worker-id="{victim["wid"]}"]'
                page.wait_for_selector(f"{row} .s-dead", timeout=10_000)
                page.wait_for_selector(f'.tl-item[data-kind="death"]:has-text("{victim["wid"]}")', timeout=10_000)
                rec = page.wait_for_selector('.tl-item[data-kind="recovered"] .dur', timeout=10_000)
                assert "recovery" in rec.inner_text() and ("ms" in rec.inner_text() or " s" in rec.inner_text())
                page.wait_for_function("() => document.querySelectorAll('#compat table tr').length > 1", timeout=15_000)
                time.sleep(1.2)  # a second of the throughput chart after the stream
                page.screenshot(path=str(ARTIFACTS / "dashboard.png"), full_page=True)
                outside = [u for u in requests if not u.startswith(cluster.base) and not u.startswith("ws://127.0.0.1") and not u.startswith("data:")]
                assert not outside, f"the page reached outside: {outside}"
            finally:
                browser.close()
    finally:
        cluster.stop()
