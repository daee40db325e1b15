"""Per-token step time of a fixed layer range in a browser tab: WebGPU vs WASM SIMD vs plain
JS (and WebGPU with the fused decode kernels forced, webgpu-fused: a software adapter's
default is unfused), side by side in one headless Chromium run, and the same range in the
native workers (wgpu-py's WgpuBackend by default and with fused kernels forced, and
NumpyBackend) on the same machine.

    .venv/bin/python benchmarks/bench_browser.py [--layers 0:4] [--tokens 16] [--json OUT]

The tab side loads SmolLM2's real layer blobs (the bytes the coordinator streams) into the
tab's own backends (tab_worker/web/backend_*.js, running the repo's kernels/*.wgsl for WebGPU)
and times decode steps of one token (positions 0..tokens-1 after a warm-up prompt of 8).
Needs `npm ci && python tab_worker/web/build.py` and /usr/bin/chromium.
"""
from __future__ import annotations

import argparse
import json
import os
import tempfile
import statistics
import sys
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
if not os.path.isdir(os.environ.get("XDG_RUNTIME_DIR", "")):  # Mesa complains without one
    os.environ["XDG_RUNTIME_DIR"] = tempfile.mkdtemp(prefix="xdg-")
sys.path.insert(0, str(ROOT))

from coordinator.tab_routes import routes  # noqa: E402
from protocol.model_types import SessionSlice  # noqa: E402
from protocol.blobs import pack_layer  # noqa: E402
from tabshard.cluster import free_port  # noqa: E402
from model.embedding import embed  # noqa: E402
from model.loader import open_model  # noqa: E402

FLAGS = ["--headless=new", "--no-sandbox", "--enable-unsafe-webgpu", "--disable-background-networking",
         "--disable-component-update", "--disable-sync", "--no-first-run", "--disable-quic", "--disable-dev-shm-usage"]
PROMPT = 8

PAGE_JS = """
async ({cfg, keys, tokens, prompt, engines}) => {
  const { unpack_blob } = await import("/tab/static/weights.js");
  const { CpuBackend, JsEngine, WasmEngine } = await import("/tab/static/backend_cpu.js");
  const { WebGpuDevice, FUSE_MAX_ROWS } = await import("/tab/static/webgpu_device.js");
  const { WebGpuBackend } = await import("/tab/static/backend_webgpu.js");
  const layers = {};
  for (const k of keys) {
    const b = unpack_blob(new Uint8Array(await (await fetch(`/bench/blob/${k}`)).arrayBuffer()));
    layers[b.index] = b.weights;
  }
  const x = new Float32Array(await (await fetch("/bench/x")).arrayBuffer());
  const H = cfg.hidden, out = {};
  for (const name of engines) {
    try {
      let be, t0 = performance.now();
      if (name.startsWith("webgpu")) {  // "webgpu": fused decode kernels on a real GPU only; -fused / -unfused: forced
        const gpu = await WebGpuDevice.create("adapter", location.origin);
        be = new WebGpuBackend(gpu, cfg, layers, null, prompt + tokens + 1, { "webgpu-fused": FUSE_MAX_ROWS, "webgpu-unfused": 0 }[name]);
        await be.init();
        out.adapter = gpu.describe().adapter;
      } else {
        const engine = name === "wasm" ? await WasmEngine.load("/tab/static/kernels.wasm") : new JsEngine();
        be = new CpuBackend(cfg, layers, null, prompt + tokens + 1, engine);
      }
      const load_ms = performance.now() - t0;
      t0 = performance.now();
      await be.forward([{session_id: "s", start_pos: 0, length: prompt}], x.subarray(0, prompt * H));
      const prefill_ms = performance.now() - t0;
      const steps = [];
      let last;
      for (let i = 0; i < tokens; i++) {
        t0 = performance.now();
        last = await be.forward([{session_id: "s", start_pos: prompt + i, length: 1}], x.subarray((prompt + i) * H, (prompt + i + 1) * H));
        steps.push(performance.now() - t0);
      }
      steps.sort((a, b) => a - b);
      out[name] = {load_ms, prefill_ms, step_ms: steps[steps.length >> 1], min_ms: steps[0], last: Array.from(last.subarray(0, 8))};
    } catch (err) {
      out[name] = {error: `${err.name}: ${err.message}`};
    }
  }
  return out;
}
"""


def serve(blobs: dict[str, bytes], x: np.ndarray):
    import uvicorn
    from starlette.applications import Starlette
    from starlette.responses import HTMLResponse, Response
    from starlette.routing import Route

    async def page(request):
        return HTMLResponse("<!doctype html><title>bench</title>")

    async def blob(request):
        return Response(blobs[request.path_params["key"]], media_type="application/octet-stream")

    async def xs(request):
        return Response(x.astype("<f4").tobytes(), media_type="application/octet-stream")

    app = Starlette(routes=routes(SimpleNamespace(join_token=None)) + [
        Route("/bench", page), Route("/bench/blob/{key}", blob), Route("/bench/x", xs)])
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    threading.Thread(target=server.run, daemon=True).start()
    while not server.started:
        time.sleep(0.05)
    return server, f"http://127.0.0.1:{port}"


def native(weights, layer_ids, x, tokens, backend):
    """backend: numpy, wgpu (fused decode kernels on a real GPU only) or wgpu-fused (forced)."""
    from tab_worker.backends import make_backend

    t0 = time.perf_counter()
    options = {"fuse_decode": True} if backend == "wgpu-fused" else {}
    be = make_backend(backend.removesuffix("-fused"), weights.config, {i: weights.layers[i] for i in layer_ids}, None,
                      PROMPT + tokens + 1, **options)
    load_ms = (time.perf_counter() - t0) * 1000
    t0 = time.perf_counter()
    be.forward([SessionSlice("s", 0, PROMPT)], x[:PROMPT])
    prefill_ms = (time.perf_counter() - t0) * 1000
    steps = []
    for i in range(tokens):
        t0 = time.perf_counter()
        last = be.forward([SessionSlice("s", PROMPT + i, 1)], x[PROMPT + i: PROMPT + i + 1])
        steps.append((time.perf_counter() - t0) * 1000)
    return {"load_ms": load_ms, "prefill_ms": prefill_ms, "step_ms": statistics.median(steps), "min_ms": min(steps),
            "last": [float(v) for v in last[0, :8]], "adapter": _adapter() if backend.startswith("wgpu") else "numpy"}


def _adapter() -> str:
    from kernels.runner import shared_device

    return shared_device().describe()


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", default="0:4", help="layer range START:END (default 0:4)")
    ap.add_argument("--tokens", type=int, default=16)
    ap.add_argument("--engines", default="webgpu,webgpu-fused,wasm,js",
                    help="tab engines: webgpu (fused decode kernels on a real GPU only), webgpu-fused, webgpu-unfused, wasm, js")
    ap.add_argument("--no-native", action="store_true")
    ap.add_argument("--native", default="wgpu,wgpu-fused,numpy", help="native backends to time (numpy: the CPU packed kernel)")
    ap.add_argument("--json", metavar="OUT")
    a = ap.parse_args(argv)
    start, end = map(int, a.layers.split(":"))
    model = open_model(None)
    weights = model.load_all()
    ids = list(range(100, 100 + PROMPT + a.tokens))
    x = embed(weights.embedding, ids)
    blobs = {str(i): pack_layer(i, weights.layers[i]) for i in range(start, end)}
    server, base = serve(blobs, x)
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path="/usr/bin/chromium", headless=True, args=FLAGS)
        page = browser.new_page()
        page.goto(f"{base}/bench")
        results = page.evaluate(PAGE_JS, {"cfg": weights.config.to_dict(), "keys": list(blobs), "tokens": a.tokens,
                                          "prompt": PROMPT, "engines": a.engines.split(",")})
        browser.close()
    server.should_exit = True
    adapter = results.pop("adapter", "?")
    rows = {f"tab {k}": v for k, v in results.items()}
    if not a.no_native:
        for backend in [b for b in a.native.split(",") if b]:
            try:
                rows[f"native {backend}"] = native(weights, range(start, end), x, a.tokens, backend)
            except Exception as exc:  # no Vulkan/lavapipe: report, do not die
                rows[f"native {backend}"] = {"error": str(exc)}
    print(f"layers {start}-{end - 1} of SmolLM2 ({end - start} layers), decode of 1 token after a {PROMPT}-token prompt, "
          f"median of {a.tokens} steps; tab WebGPU adapter: {adapter}")
    print(f"{'where':<18}{'ms/token':>10}{'ms/layer':>10}{'min ms':>9}{'prefill ms':>12}{'load ms':>10}")
    ref = rows.get("native numpy", {}).get("last")
    for name, r in rows.items():
        if "error" in r:
            print(f"{name:<18}  failed: {r['error'][:100]}")
            continue
        diff = "" if ref is None else f"  max|diff| vs numpy {max(abs(u - v) for u, v in zip(r['last'], ref)):.2e}"
        print(f"{name:<18}{r['step_ms']:>10.2f}{r['step_ms'] / (end - start):>10.2f}{r['min_ms']:>9.2f}{r['prefill_ms']:>12.1f}"
              f"{r['load_ms']:>10.0f}{diff}")
    if a.json:
        Path(a.json).write_text(json.dumps({"layers": [start, end], "tokens": a.tokens, "adapter": adapter, "rows": rows}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
