"""Real browser tabs as shard workers: headless Debian Chromium (Playwright) opens the
coordinator's /tab page; the tabs' workers join over the wire protocol and serve SmolLM2.

One coordinator (`tabshard serve` subprocess) and one browser serve the whole module, in
order: codec vectors (node), three WebGPU tabs on the spec's default limits, a tab closed
mid-generation, a tab reloaded (rejoins from its Cache API copy), a browser without
--enable-unsafe-webgpu (WASM fallback), a mixed pool with a Python worker. Every generation
is greedy and must give exactly the tokens of `LocalGenerator(..., backend="numpy")`.
"""
from __future__ import annotations

import asyncio
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
import urllib.request
from pathlib import Path

import pytest
import websockets

from tabshard import wire
from tabshard.cluster import LocalCluster
from tabshard.generate import LocalGenerator

ROOT = Path(__file__).resolve().parent.parent
DIST = ROOT / "tab_worker" / "web" / "dist"
CHROMIUM = "/usr/bin/chromium"
PROMPT = "What is the capital of France?"
N = 6
TOKEN = "tab-test-token"
BASE_FLAGS = ["--headless=new", "--no-sandbox", "--disable-background-networking", "--disable-component-update",
              "--disable-sync", "--no-first-run", "--disable-quic", "--disable-dev-shm-usage"]
WEBGPU_FLAGS = ["--enable-unsafe-webgpu", "--enable-features=Vulkan", "--use-webgpu-adapter=swiftshader"]

playwright_api = pytest.importorskip("playwright.sync_api")
pytestmark = pytest.mark.skipif(not os.path.exists(CHROMIUM), reason="Debian chromium is not installed")


def build_assets() -> None:
    if not (DIST / "codec.js").exists() or not (DIST / "kernels.wasm").exists():
        if not (ROOT / "node_modules" / "@msgpack" / "msgpack").exists():
            pytest.skip("node_modules missing: run `npm ci` at the repo root")
        subprocess.run([sys.executable, str(ROOT / "tab_worker" / "web" / "build.py")], check=True)


def ws_tokens(base, prompt=PROMPT, max_tokens=N, timeout=240):
    """Greedy token ids through /v1/stream (in a thread: Playwright's sync API owns this
    thread's event loop)."""
    with ThreadPoolExecutor(1) as pool:
        return pool.submit(ws_tokens_async, base, prompt, max_tokens, timeout).result()


def ws_tokens_async(base, prompt=PROMPT, max_tokens=N, timeout=240):
    async def go():
        async with websockets.connect(base.replace("http", "ws") + "/v1/stream", compression=None) as ws:
            await ws.send(wire.encode(wire.make("generate", request_id="t1", messages=[{"role": "user", "content": prompt}],
                                                max_tokens=max_tokens, greedy=True)))
            ids = []
            while True:
                m = wire.decode(await asyncio.wait_for(ws.recv(), timeout))
                if m["type"] == "token":
                    assert m["index"] == len(ids)
                    ids.append(m["token_id"])
                elif m["type"] == "done":
                    return ids
                else:
                    raise AssertionError(m)

    return asyncio.run(go())


@pytest.fixture(scope="module")
def reference(smollm2_weights, smollm2_tokenizer):
    gen = LocalGenerator(smollm2_weights, backend="numpy", max_ctx=256)
    ids = smollm2_tokenizer.encode(smollm2_tokenizer.render_chat([{"role": "user", "content": PROMPT}]))
    return list(gen.generate(ids, N))


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    build_assets()
    c = LocalCluster(workers=0, token=TOKEN, log_dir=str(tmp_path_factory.mktemp("tabs")))
    c.start(timeout=180)
    yield c
    c.stop()


@pytest.fixture(scope="module")
def playwright():
    with playwright_api.sync_playwright() as p:
        yield p


def launch(playwright, webgpu: bool):
    profile = tempfile.mkdtemp(prefix="tabshard-chromium-")
    ctx = playwright.chromium.launch_persistent_context(profile, executable_path=CHROMIUM, headless=True,
                                                        args=BASE_FLAGS + (WEBGPU_FLAGS if webgpu else []))
    ctx._tabshard_profile = profile
    return ctx


def close(ctx):
    ctx.close()
    shutil.rmtree(ctx._tabshard_profile, ignore_errors=True)


@pytest.fixture(scope="module")
def browser(playwright):
    ctx = launch(playwright, webgpu=True)
    yield ctx
    close(ctx)


def open_tab(ctx, cluster, name, **params):
    page = ctx.new_page()
    query = "&".join(f"{k}={v}" for k, v in {"token": TOKEN, "name": name, **params}.items())
    page.goto(f"{cluster.base}/tab?{query}")
    return page


def tab_workers(st, alive=True):
    return [w for w in st["workers"] if w.get("kind") == "browser" and (not alive or w["state"] not in ("dead", "quarantined"))]


def served_by(st) -> list[str]:
    """Names of the workers primary on each stage, if every stage is ready."""
    names = {w["worker_id"]: w["name"] for w in st["workers"]}
    if not st["stages"] or any(not s["holders"] or s["holders"][0] not in s["ready"] for s in st["stages"]):
        return []
    return [names[s["holders"][0]] for s in st["stages"]]


def wait_plan(cluster, names: set[str], timeout=240):
    """Until the plan's primaries are exactly these worker names, all loaded."""
    return cluster.wait_for(lambda st: set(served_by(st)) == names, timeout, what=f"stages served by {sorted(names)}")


# ---------------------------------------------------------------------------------- tests
def test_js_codec_passes_golden_vectors():
    build_assets()
    node = shutil.which("node")
    if node is None:
        pytest.skip("node is not installed")
    r = subprocess.run([node, str(ROOT / "tests" / "js" / "codec_vectors.mjs"), str(DIST)], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "22 passed, 0 failed" in r.stdout


def test_wrong_token_gets_a_clear_403(cluster, browser):
    page = browser.new_page()
    resp = page.goto(f"{cluster.base}/tab?token=nope")
    assert resp.status == 403 and "Wrong join token" in page.content()
    page.close()


def test_three_webgpu_tabs_on_default_limits_serve_identical_tokens(cluster, browser, reference):
    """Three tabs, WebGPU only, device requested with the spec's default limits (what Safari
    or a phone grants): every kernel a layer and the head need runs there."""
    pages = [open_tab(browser, cluster, f"gpu-{i}", backend="webgpu", limits="default") for i in range(3)]
    browser._tabshard_pages = pages
    st = wait_plan(cluster, {"gpu-0", "gpu-1", "gpu-2"})
    for w in tab_workers(st):
        assert w["backend"] == "webgpu", w
    assert ws_tokens(cluster.base) == reference
    st = cluster.status()
    caps = {w["name"]: w for w in tab_workers(st)}
    assert all(caps[f"gpu-{i}"]["steps"] > 0 for i in range(3))
    state = pages[0].evaluate("window.tabState")
    assert state["caps"]["webgpu"] and state["caps"]["limits_mode"] == "default"
    assert state["caps"]["limits"]["maxComputeInvocationsPerWorkgroup"] == 256
