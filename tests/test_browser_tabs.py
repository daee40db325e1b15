"""Real browser tabs as shard workers: headless Debian Chromium (Playwright) opens the
coordinator's /tab page; the tabs' workers join over the wire protocol and serve SmolLM2.

One coordinator (`tabshard serve` subprocess) and one browser serve the whole module, in
order: codec vectors (node), three WebGPU tabs on the spec's default limits, a mixed pool
(a Python worker joins them; being faster, it takes most layers, which keeps the later tests
short on SwiftShader), a tab closed mid-generation, a tab reloaded (rejoins from its Cache
API copy), a browser without --enable-unsafe-webgpu (WASM fallback), and the kernels the
serving path does not use, on the spec's default limits. Every generation
is greedy and must give exactly the tokens of `LocalGenerator(..., backend="numpy")`.
"""
from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import websockets

from protocol import wire
from protocol.blobs import pack_head, pack_layer
from tests.layer_parity import run_tab_cpu_engines, two_layer_case
from tabshard.cluster import LocalCluster
from tab_worker.generate import LocalGenerator

ROOT = Path(__file__).resolve().parent.parent
DIST = ROOT / "tab_worker" / "web" / "dist"
CHROMIUM = "/usr/bin/chromium"
PROMPT = "What is the capital of France?"
N = 6
TOKEN = "tab-test-token"
PARITY_TOKENS = [504, 3575, 282, 4649, 314, 7042, 30]  # the two-layer parity case's prompt
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
    c = LocalCluster(workers=0, token=TOKEN, serve_args=["--stages", "16"], log_dir=str(tmp_path_factory.mktemp("tabs")))
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


def steps_by_name(st) -> dict[str, int]:
    """Steps each name computed, over all its worker ids: a tab that a starved host declared dead
    (silent heartbeat) rejoins under a new id, and the steps it served before still count."""
    out: dict[str, int] = {}
    for w in st["workers"]:
        out[w["name"]] = out.get(w["name"], 0) + w["steps"]
    return out


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
    index = json.loads((ROOT / "tests" / "vectors" / "index.json").read_text())
    assert f"{len(index['valid']) + len(index['invalid'])} passed, 0 failed" in r.stdout


def test_tab_refuses_an_assignment_beyond_its_budget():
    """worker.js's TabWorker steps in node: an assignment beyond the memory budget is refused
    with the numbers the planner acts on; hello, heartbeat and errors are valid wire messages."""
    build_assets()
    node = shutil.which("node")
    if node is None:
        pytest.skip("node is not installed")
    r = subprocess.run([node, str(ROOT / "tests" / "js" / "tab_worker_steps.mjs"), str(DIST)], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and r.stdout.strip().endswith("ok"), r.stdout + r.stderr


def test_tab_cpu_backends_match_numpy(smollm2_weights, tmp_path):
    """WASM SIMD and plain JS (in node) against NumpyBackend on two real layers and the head;
    and a session's KV of the last layer copied to a backend of it alone (copy_kv) decodes as
    a replay of the history there does."""
    build_assets()
    node = shutil.which("node")
    if node is None:
        pytest.skip("node is not installed")
    files, _, be, want = two_layer_case(smollm2_weights, PARITY_TOKENS)
    ids, values = be.head_topk(want[-1:], 5)
    for e in run_tab_cpu_engines(node, DIST, files, tmp_path):
        np.testing.assert_allclose(np.array(e["hidden"]).reshape(want.shape), want, atol=2e-3, rtol=1e-4, err_msg=e["engine"])
        assert e["ids"] == ids[0].tolist(), e["engine"]
        np.testing.assert_allclose(e["values"], values[0], atol=1e-3, rtol=1e-4, err_msg=e["engine"])
        # copy_kv: a decode step after the KV was copied from the wider range is the replay's, bit for bit
        assert e["copied"] == e["replayed"] and len(e["copied"]) == want.shape[1], e["engine"]


WEBGPU_PARITY_JS = """
async ({fuseRuns}) => {
  const { WebGpuDevice } = await import("/tab/static/webgpu_device.js");
  const { WebGpuBackend } = await import("/tab/static/backend_webgpu.js");
  const { unpack_blob } = await import("/tab/static/weights.js");
  const get = async (name) => new Uint8Array(await (await fetch(`/parity-files/${name}`)).arrayBuffer());
  const layers = {};
  for (const name of ["layer0.blob", "layer1.blob"]) { const b = unpack_blob(await get(name)); layers[b.index] = b.weights; }
  const head = unpack_blob(await get("head.blob")).weights;
  const cfg = JSON.parse(new TextDecoder().decode(await get("config.json")));
  const xb = await get("x.f32"), x = new Float32Array(xb.slice().buffer);
  const H = cfg.hidden, T = x.length / H;
  const gpu = await WebGpuDevice.create("default", location.origin);
  const out = {};
  for (const [name, fuseMaxRows, kvSplits] of fuseRuns) {
    const be = new WebGpuBackend(gpu, cfg, layers, head, 64, fuseMaxRows, kvSplits);
    await be.init();
    const a = await be.forward([{ session_id: "s", start_pos: 0, length: T - 1 }], x.subarray(0, (T - 1) * H));
    const before = gpu.dispatches;
    gpu.trace = [];
    const b = await be.forward([{ session_id: "s", start_pos: T - 1, length: 1 }], x.subarray((T - 1) * H));
    const decodeDispatches = gpu.dispatches - before, trace = gpu.trace;
    gpu.trace = undefined;
    // the prefix cache's fork: "f" gets s's prompt positions, then decodes the last token as s did
    be.fork_session("s", "f", T - 1);
    const forked = await be.forward([{ session_id: "f", start_pos: T - 1, length: 1 }], x.subarray((T - 1) * H));
    const top = await be.forward_topk([{ session_id: "t", start_pos: 0, length: T }], x, 5);
    // copy_kv: layer 1's KV of s copied into a backend of layer 1 alone, then a decode step
    // there, against the same step after replaying s's history on such a backend
    const only = async (i, withHead) => { const b = new WebGpuBackend(gpu, cfg, { [i]: layers[i] }, withHead ? head : null, 64, fuseMaxRows, kvSplits); await b.init(); return b; };
    const lead = await only(0, false), copied = await only(1, true), replayed = await only(1, true);
    for (const [pos, len] of [[0, T - 1], [T - 1, 1]]) {
      const sl = [{ session_id: "s", start_pos: pos, length: len }];
      await replayed.forward(sl, new Float32Array(await lead.forward(sl, x.subarray(pos * H, (pos + len) * H))));
    }
    const { k, v } = await be.export_kv("s", 1, 2, T);
    copied.import_kv("s", k, v, T);
    const next = [{ session_id: "s", start_pos: T, length: 1 }];
    const h = new Float32Array(await lead.forward(next, x.subarray(0, H)));
    const afterCopy = new Float32Array(await copied.forward(next, h)), afterReplay = new Float32Array(await replayed.forward(next, h));
    out[name] = { hidden: [...new Float32Array(a), ...new Float32Array(b)], forked: [...new Float32Array(forked)], decodeDispatches, trace,
                  ids: [...top.ids], values: [...top.values], copied: [...afterCopy], replayed: [...afterReplay] };
    for (const x of [be, lead, copied, replayed]) x.destroy();
  }
  return out;
}
"""


def test_webgpu_tab_backend_fused_and_unfused_match_numpy(cluster, browser, smollm2_weights, tmp_path):
    """The tab's WebGPU backend (SwiftShader here) on two real layers and the head: decode steps
    run the fused kernels (norm + q/k/v, rope + KV store + attention, wo, norm + gate/up, silu +
    down: 5 dispatches a layer), and with fusing off the 10 unfused ones, and fused with
    split-K attention (3 key runs a row: 6 dispatches, the partials' fold added), which a real
    GPU's long contexts take; all against NumpyBackend, and the head's top-k (its norm folded
    into its matvec) against numpy's. A session's KV of layer 1 copied into a backend of that
    layer alone (copy_kv) decodes as a replay of its history there does.

    Both backends build their ops from one layer program (kernels/layer_program.py, served as
    /kernels/layer_program.json): the native WgpuBackend on this host's adapter at the spec's
    default limits runs the same rows, and its decode step's dispatches (kernel and grid, in
    order) must be the browser's, its hidden states the browser's within f32 round-off."""
    from kernels import runner as R
    from protocol.model_types import SessionSlice
    from tab_worker.wgpu_backend import WgpuBackend

    w = smollm2_weights
    x, be, want, out = _two_layers_in_a_tab(cluster, browser, w, [["unfused", 0], ["fused", 16], ["split", 16, 3]])
    ids, values = be.head_topk(want[-1:], 5)
    assert out["fused"]["decodeDispatches"] == 2 * 5 and out["unfused"]["decodeDispatches"] == 2 * 10, out
    assert out["split"]["decodeDispatches"] == 2 * 6 and [3] * 2 == [d[3] for d in out["split"]["trace"] if d[0] == "attention_rope"]
    for name, e in out.items():
        np.testing.assert_allclose(np.array(e["hidden"]).reshape(want.shape), want, atol=2e-3, rtol=1e-4, err_msg=name)
        # a forked session's decode is the source's, bit for bit (the same keys and values, the same kernels)
        assert e["forked"] == e["hidden"][-want.shape[1]:], name
        # copy_kv: a decode step after the KV was copied from the wider range is the replay's, bit for bit
        assert e["copied"] == e["replayed"] and len(e["copied"]) == want.shape[1], name
        assert e["ids"] == ids[0].tolist(), name
        np.testing.assert_allclose(e["values"], values[0], atol=1e-3, rtol=1e-4, err_msg=name)
    try:
        device = R.get_device("webgpu-default")
    except R.NoAdapterError as exc:
        pytest.skip(f"no native wgpu adapter: {exc}")
    assert not device.is_real_gpu()  # a CPU rasteriser like SwiftShader: the same branch of the program
    for name, fuse, kv_splits in (("unfused", False, None), ("fused", True, None), ("split", True, 3)):
        native = WgpuBackend(w.config, {0: w.layers[0], 1: w.layers[1]}, w.head, 64, device=device, fuse_decode=fuse,
                             kv_splits=kv_splits)
        got = np.concatenate([native.forward([SessionSlice("s", 0, 6)], x[:6]), native.forward([SessionSlice("s", 6, 1)], x[6:])])
        trace = [[d.launch.kernel, d.x, d.y, d.z] for op in native._layer_ops for d in op.dispatches(1)]
        assert trace == out[name]["trace"], name
        np.testing.assert_allclose(got, np.array(out[name]["hidden"]).reshape(want.shape), atol=1e-3, rtol=1e-4, err_msg=name)


def _two_layers_in_a_tab(cluster, browser, w, fuse_runs):
    """Layers 0-1 and the head of `w` run by NumpyBackend and by the tab's WebGPU backend
    (WEBGPU_PARITY_JS, files served to the page): (x, the numpy backend, its hidden states,
    the tab's output by fuse run)."""
    files, x, be, want = two_layer_case(w, PARITY_TOKENS)
    page = browser.new_page()
    page.route("**/parity-files/*", lambda route: route.fulfill(status=200, body=files[route.request.url.rsplit("/", 1)[1]]))
    page.goto(f"{cluster.base}/tab/static/index.html")  # any page of the origin: the modules load from it
    out = page.evaluate(WEBGPU_PARITY_JS, {"fuseRuns": fuse_runs})
    page.close()
    return x, be, want, out


def test_webgpu_tab_backend_runs_a_rotated_ffn(cluster, browser, smollm2_weights):
    """A model whose FFN hidden spaces are rotated (tabshard/rotation.py, issue 22): the tab's
    WebGPU backend takes the layer program's silu_hadamard branch (silu_hadamard then ffn_down
    instead of the fused silu + down) and matches NumpyBackend."""
    from dataclasses import replace

    from kernels.quant import QuantSpec
    from tabshard.rotation import rotate_ffn_weights

    w = rotate_ffn_weights(replace(smollm2_weights, layers=smollm2_weights.layers[:2]), seed=22, spec=QuantSpec.parse("s4g64"))
    assert w.config.ffn_hadamard == 512
    _, _, want, out = _two_layers_in_a_tab(cluster, browser, w, [["fused", 16]])
    out = out["fused"]
    kernels = [d[0] for d in out["trace"]]
    assert kernels.count("silu_hadamard") == 2 and "qmatvec_silu" not in kernels, kernels
    np.testing.assert_allclose(np.array(out["hidden"]).reshape(want.shape), want, atol=2e-3, rtol=1e-4)


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
    steps = steps_by_name(cluster.status())
    assert all(steps.get(f"gpu-{i}", 0) > 0 for i in range(3)), steps
    # each tab's socket answered the coordinator's pings (its round trip is timed there)
    cluster.wait_for(lambda s: all(w["rtt_ms"] is not None and w["rtt_ms"] > 0 for w in tab_workers(s)), 10, what="tabs' round trips")
    state = pages[0].evaluate("window.tabState")
    assert state["caps"]["webgpu"] and state["caps"]["limits_mode"] == "default"
    assert state["caps"]["limits"]["maxComputeInvocationsPerWorkgroup"] == 256


def test_mixed_pool_of_tabs_and_python_workers(cluster, browser, reference):
    cluster.add_worker(name="py-0")
    names = {p.evaluate("window.tabState.name") for p in browser._tabshard_pages if not p.is_closed()} | {"py-0"}
    st = wait_plan(cluster, names)
    kinds = {w["name"]: w["kind"] for w in st["workers"]}
    # every worker primary on a stage of the plan computes steps (the CPU backend holds packed
    # weights, expansion 1.2 not 8, so the Python worker takes more layers and a tab may stay spare)
    serving = set(served_by(st))
    assert {kinds[n] for n in serving} == {"browser", "python"}
    assert ws_tokens(cluster.base) == reference
    st = cluster.status()
    steps = steps_by_name(st)
    assert all(steps[n] > 0 for n in serving), steps
    loads = [w["load_progress"] for w in tab_workers(st)]
    assert loads and all(p.get("total_bytes") and p["received_bytes"] == p["total_bytes"] for p in loads), loads


def page_of(browser, name):
    return next(p for p in browser._tabshard_pages if not p.is_closed() and p.evaluate("window.tabState.name") == name)


def test_tab_closed_mid_generation_recovers_identical_tokens(cluster, browser, reference):
    st = cluster.status()
    kinds = {w["name"]: w["kind"] for w in st["workers"]}
    tabs = [n for n in served_by(st) if kinds[n] == "browser"]
    victim = tabs[len(tabs) // 2]  # a tab serving a stage (the Python worker may hold others)
    with ThreadPoolExecutor(1) as pool:
        future = pool.submit(ws_tokens_async, cluster.base, PROMPT, N)
        cluster.wait_for(lambda s: any(x["tokens"] >= 2 for x in s["sessions"]) or future.done(), 120, what="2 tokens")
        assert not future.done(), "the generation finished before the tab could be closed"
        page_of(browser, victim).close()
        closed_at = time.monotonic()
        tokens = future.result(timeout=240)
    assert tokens == reference
    events = cluster.status()["events"]
    death = next(e for e in events if e["kind"] == "death" and "socket" in e["reason"])
    assert death["last_seen_s"] < 1.0  # a closed tab is seen at once, not after a timeout
    assert any(e["kind"] == "recovered" and e["t"] >= death["t"] for e in events)
    assert time.monotonic() - closed_at < 240


def _loaded_and_never_held(page, before: dict, w):
    """Once the tab's ranges are loaded (a tab the plan keeps as a spare gets none: then nothing
    may come), (its stats, the layers it held in `before`'s stats, the layers it holds now, the
    bytes of the blobs it did not hold before: all it may have been sent since)."""
    with contextlib.suppress(playwright_api.TimeoutError):
        page.wait_for_function("window.tabState.stats.ranges.length > 0 && window.tabState.stats.progress.received"
                               " >= window.tabState.stats.progress.total", timeout=60_000)
    after = page.evaluate("window.tabState.stats")
    held = {i for a, b in before["ranges"] for i in range(a, b)}
    now = {i for a, b in after["ranges"] for i in range(a, b)}
    allowed = sum(len(pack_layer(i, w.layers[i])) for i in now - held)
    allowed += len(pack_head(w.head)) if after["heads"] and not before["heads"] else 0
    return after, held, now, allowed


def test_tab_survives_losing_its_gpu_device_mid_generation(cluster, browser, reference, smollm2_weights):
    """device.destroy() mid-stream (what a driver reset or an out-of-memory does to a tab): the
    tab leaves at once, the coordinator recovers the stream with the exact tokens, and the tab
    gets a new WebGPU device and rejoins, its weights still in memory: what it held is not
    downloaded again (the plan may have changed shape meanwhile, e.g. merged ranges after an
    earlier test's death: only layers it never held may come over the wire)."""
    st = cluster.wait_for(lambda s: any(n for n in served_by(s) if n.startswith("gpu-")), 240, what="a GPU tab serving")
    name = next(n for n in served_by(st) if n.startswith("gpu-"))
    page = page_of(browser, name)
    with ThreadPoolExecutor(1) as pool:
        future = pool.submit(ws_tokens_async, cluster.base, PROMPT, N)
        cluster.wait_for(lambda s: any(x["tokens"] >= 2 for x in s["sessions"]) or future.done(), 120, what="2 tokens")
        assert not future.done(), "the generation finished before the device could be lost"
        lost_at = time.monotonic()
        before = page.evaluate("window.tabState.stats")
        page.evaluate("window.tabDebug.loseDevice()")
        tokens = future.result(timeout=240)
    assert tokens == reference
    page.wait_for_function("(window.tabState.rejoins || 0) >= 1 && window.tabState.connection?.state === 'open'",
                           timeout=120_000)
    rejoined_s = time.monotonic() - lost_at
    state = page.evaluate("window.tabState")
    assert state["caps"]["webgpu"] is True and state["stats"]["device_losses"] == 1, state
    # the tab's old worker ended at once (its in-flight step failed on the lost device, or its
    # socket closed, whichever reached the coordinator first) and it came back under a new id
    st = cluster.status()
    mine = [(w["worker_id"], w["state"], w["why"]) for w in st["workers"] if w["name"] == name]
    assert any(state == "dead" and ("socket" in why or "device" in why or "step failed" in why)
               for _, state, why in mine if why), mine
    st = cluster.wait_for(lambda s: any(w["name"] == name and w["state"] not in ("dead", "quarantined")
                                        for w in tab_workers(s)), 120, what=f"{name} back in the cluster")
    # bytes downloaded since the loss <= the blobs it never held
    after, held, _, allowed = _loaded_and_never_held(page, before, smollm2_weights)
    downloaded = after["bytes_received"] - before["bytes_received"]
    assert downloaded <= allowed, (before["ranges"], after["ranges"], downloaded, allowed)
    assert held, before
    print(f"\n{name}: device lost -> rejoined in {rejoined_s:.1f} s")
    assert ws_tokens(cluster.base) == reference


def test_reloaded_tab_rejoins_from_its_cache(cluster, browser, reference, smollm2_weights):
    """A reloaded tab rejoins from its Cache API: what it held is not sent again. Which range it
    gets back is the planner's (a plan that changed shape since, or keeps it as a standby of
    another range, may hand it layers it never held: only those may come over the wire)."""
    live = [p for p in browser._tabshard_pages if not p.is_closed()]
    page = live[0]
    name = page.evaluate("window.tabState.name")
    cluster.wait_for(lambda s: name in served_by(s), 240, what=f"{name} serving")
    before = page.evaluate("window.tabState.stats")
    # the pass it was welcomed with (coordinator/security.Standing) survives the reload
    assert page.evaluate("sessionStorage.getItem('tabshard-standing')")
    carried = cluster.status()["counters"]["passes_carried"]
    page.reload()
    cluster.wait_for(lambda s: sum(1 for w in tab_workers(s) if w["name"] == name) == 1
                     and any(w["name"] == name and w["state"] in ("ready", "idle") for w in tab_workers(s)), 240,
                     what=f"{name} rejoined")
    after, held, now, allowed = _loaded_and_never_held(page, before, smollm2_weights)
    assert held and after["bytes_received"] <= allowed, (before["ranges"], after["ranges"], after["bytes_received"], allowed)
    if now & held:
        assert after["bytes_from_cache"] > 0, after  # what it held came from its cache
    assert cluster.status()["counters"]["passes_carried"] > carried  # it rejoined with its pass
    assert ws_tokens(cluster.base) == reference


def test_wasm_fallback_without_unsafe_webgpu(cluster, playwright, browser, reference):
    ctx = launch(playwright, webgpu=False)
    try:
        page = open_tab(ctx, cluster, "wasm-0")
        page.wait_for_function("window.tabState.caps !== null", timeout=60_000)
        caps = page.evaluate("window.tabState.caps")
        assert caps["webgpu"] is False and caps["wasm_simd"] is True, caps
        names = {p.evaluate("window.tabState.name") for p in browser._tabshard_pages if not p.is_closed()} | {"wasm-0", "py-0"}
        st = wait_plan(cluster, names)
        me = next(w for w in tab_workers(st) if w["name"] == "wasm-0")
        assert me["backend"] == "wasm" and "wasm" in me["capabilities"]["measurement"]["measured_ms"]
        assert ws_tokens(cluster.base) == reference
        assert steps_by_name(cluster.status()).get("wasm-0", 0) > 0
    finally:
        close(ctx)
    cluster.wait_for(lambda s: "wasm-0" not in served_by(s) and served_by(s), 240, what="plan without wasm-0")


KERNEL_JS = """
async ({cases}) => {
  const { WebGpuDevice, runKernel } = await import("/tab/static/webgpu_device.js");
  const gpu = await WebGpuDevice.create("default", location.origin);
  const T = {f32: Float32Array, u32: Uint32Array};
  const out = {limits: gpu.limits};
  for (const c of cases) {
    const bufs = c.buffers.map(([dtype, values]) => T[dtype].from(values));
    out[c.name] = await runKernel(gpu, c.kernel, c.constants, c.params, bufs, c.grid);
  }
  return out;
}
"""


def test_kernels_outside_the_serving_path_run_on_default_limits(cluster, browser):
    """The serving tests run rmsnorm, qmatvec, rope, kv_store, attention, silu_gate and topk
    on a device with the spec's default limits; this runs the rest (qmatmul at its largest
    tile, which needs exactly the default 16 KiB of workgroup memory and 256 invocations;
    embedding; residual_add; the 3-bit qmatvec) and checks them against kernels/reference.py."""
    from kernels import reference as ref
    from kernels.quant import QuantSpec, quantize_rtn

    rng = np.random.default_rng(7)
    n, k, m = 40, 72, 5
    w = quantize_rtn(rng.standard_normal((n, k)).astype(np.float32), QuantSpec(4, 32, False))
    x = rng.standard_normal((m, 72)).astype(np.float32)
    w3 = quantize_rtn(rng.standard_normal((n, k)).astype(np.float32), QuantSpec(3, 64, True))
    table = quantize_rtn(rng.standard_normal((50, 40)).astype(np.float32), QuantSpec(8, 32, True))
    ids = np.array([3, 49, 0, 17], np.uint32)
    ra_x, ra_y = rng.standard_normal((3, 44)).astype(np.float32), rng.standard_normal((3, 44)).astype(np.float32)

    def quant(t, spec):
        return {"BITS": spec.bits, "GROUP": spec.group, "SYMMETRIC": int(spec.symmetric)}

    mm = dict(n=n, k=k, m=m, x_stride=72, y_stride=n, y_col=0, accumulate=0)
    cases = [
        {"name": "qmatmul", "kernel": "qmatmul", "constants": {**quant(w, w.spec), "TILE": 64}, "params": mm,
         "buffers": [["u32", w.qweight.ravel().tolist()], ["u32", w.scales.ravel().tolist()], ["f32", x.ravel().tolist()],
                     ["f32", [0.0] * (m * n)]], "grid": [1, 1, 1]},
        {"name": "qmatvec3", "kernel": "qmatvec", "constants": {**quant(w3, w3.spec), "WG": 64, "TPR": 1, "ROWS": 8}, "params": mm,
         "buffers": [["u32", w3.qweight.ravel().tolist()], ["u32", w3.scales.ravel().tolist()], ["f32", x.ravel().tolist()],
                     ["f32", [0.0] * (m * n)]], "grid": [1, 1, 1]},
        {"name": "embedding", "kernel": "embedding", "constants": {**quant(table, table.spec), "WG": 64},
         "params": dict(k=40, row_start=0, n_rows=50, y_stride=40),
         "buffers": [["u32", ids.tolist()], ["u32", table.qweight.ravel().tolist()], ["u32", table.scales.ravel().tolist()],
                     ["f32", [0.0] * (4 * 40)]], "grid": [4, 1, 1]},
        {"name": "residual_add", "kernel": "residual_add", "constants": {"WG": 64}, "params": dict(n=44, x_stride=44, y_stride=44),
         "buffers": [["f32", ra_x.ravel().tolist()], ["f32", ra_y.ravel().tolist()]], "grid": [1, 3, 1]},
    ]
    page = browser.new_page()
    page.goto(f"{cluster.base}/tab/static/index.html")  # any page of the origin: the modules load from it
    out = page.evaluate(KERNEL_JS, {"cases": cases})
    page.close()
    assert out["limits"]["maxComputeWorkgroupStorageSize"] == 16384 and out["limits"]["maxComputeInvocationsPerWorkgroup"] == 256
    tol = dict(atol=2e-4, rtol=1e-4)
    np.testing.assert_allclose(np.array(out["qmatmul"][3]).reshape(m, n), ref.qmatmul(x, w), **tol)
    np.testing.assert_allclose(np.array(out["qmatvec3"][3]).reshape(m, n), ref.qmatvec(x, w3), **tol)
    np.testing.assert_allclose(np.array(out["embedding"][3]).reshape(4, 40), ref.embedding(ids, table), **tol)
    np.testing.assert_allclose(np.array(out["residual_add"][1]).reshape(3, 44), ref.residual_add(ra_y, ra_x), **tol)


SUBGROUP_JS = """
async ({n, k, q, s, x, normWeight, runs}) => {
  const { QuantLinear, WebGpuDevice, uploadQuant } = await import("/tab/static/webgpu_device.js");
  const gpu = await WebGpuDevice.create("default", location.origin);
  // the tab as on a real GPU: the GPU tuning, with this adapter's probed subgroups
  const dev = Object.create(gpu, { isRealGpu: { value: () => true } });
  const w = uploadQuant(dev, { n, k, q: Uint32Array.from(q), s: Uint32Array.from(s), spec: { bits: 4, group: 32, symmetric: false } }, "w");
  const xb = dev.upload(Float32Array.from(x), "x"), nw = dev.upload(Float32Array.from(normWeight), "norm_weight");
  const out = { subgroupSize: gpu.subgroupSize(), features: gpu.features };
  for (const [name, rows, norm] of runs) {
    const yb = dev.buffer(4 * rows * n, "y");
    const op = new QuantLinear(dev, w, xb, k, yb, n, 0, false, norm ? { norm: [nw, 1e-5] } : {});
    await dev.prepare(op.pipelinesFor(rows));
    const enc = dev.device.createCommandEncoder(), pass = enc.beginComputePass();
    op.record(pass, rows);
    pass.end();
    const rb = dev.device.createBuffer({ size: yb.size, usage: GPUBufferUsage.MAP_READ | GPUBufferUsage.COPY_DST });
    enc.copyBufferToBuffer(yb, 0, rb, 0, yb.size);
    dev.queue.submit([enc.finish()]);
    await rb.mapAsync(GPUMapMode.READ);
    out[name] = { kernel: op.kernel, constants: op.pipelinesFor(rows)[0][1], y: [...new Float32Array(rb.getMappedRange().slice(0, 4 * rows * n))] };
    rb.unmap();
  }
  return out;
}
"""


def test_tab_sums_matvec_lanes_by_subgroup_shuffles_on_the_gpu_tuning(cluster, browser):
    """A tab whose adapter has subgroups (SwiftShader's: 4 lanes) requests them, probes them with
    the native probe (kernels/probes/subgroup_size.wgsl, `enable subgroups;` added by the route),
    and on the GPU tuning (forced here: SwiftShader is a CPU rasteriser) runs the K+subgroup matvecs
    with SG = that size, as runner.QuantLinear would: outputs of 16 lanes (several subgroups each),
    one row and a batch, and the inverse RMS summed over the workgroup; against the numpy twins."""
    from kernels import reference as ref
    from kernels.quant import QuantSpec, quantize_rtn

    rng = np.random.default_rng(15)
    n, k = 64, 1024
    w = quantize_rtn(rng.standard_normal((n, k)).astype(np.float32), QuantSpec(4, 32, False))
    x = rng.standard_normal((5, k)).astype(np.float32)
    nw = rng.standard_normal(k).astype(np.float32)
    runs = [["one_row", 1, False], ["batch", 5, False], ["norm", 1, True]]
    page = browser.new_page()
    page.goto(f"{cluster.base}/tab/static/index.html")  # any page of the origin: the modules load from it
    assert page.request.get(f"{cluster.base}/kernels/qmatvec+nope.wgsl").status == 404
    out = page.evaluate(SUBGROUP_JS, {"n": n, "k": k, "q": w.qweight.ravel().tolist(), "s": w.scales.ravel().tolist(),
                                      "x": x.ravel().tolist(), "normWeight": nw.tolist(), "runs": runs})
    page.close()
    if "subgroups" not in out["features"]:
        pytest.skip("this Chromium's adapter has no subgroups")
    sg = out["subgroupSize"]
    assert sg >= 4 and sg & (sg - 1) == 0, out["subgroupSize"]
    tol = dict(atol=2e-4, rtol=1e-4)
    for name, rows, norm in runs:
        got = out[name]
        assert got["kernel"] == ("qmatvec_norm" if norm else "qmatvec") + "+subgroup", got["kernel"]
        assert got["constants"]["SG"] == sg and got["constants"]["TPR"] > sg, got["constants"]
        want = ref.qmatvec_norm(x[:rows], w, nw, 1e-5) if norm else ref.qmatvec(x[:rows], w)
        np.testing.assert_allclose(np.array(got["y"]).reshape(rows, n), want, **tol, err_msg=name)


def test_compat_matrix_chromium_row_compiles_every_kernel():
    """`tabshard bench`'s compatibility row for real Chromium compiles each kernel as a tab gets
    it (includes resolved); it once compiled the raw files and failed qmatvec, qmatmul and embedding."""
    from tabshard import compat_matrix as cm

    with ThreadPoolExecutor(1) as pool:  # Playwright's sync API refuses a thread with a running event loop (this module's)
        row = pool.submit(cm.measure_chromium, CHROMIUM).result()
    assert row is not None and row["backend"] == "WebGPU", row
    assert row["kernels_failed"] == [] and sorted(row["kernels_ok"]) == sorted(cm.KERNELS)
