"""The tab's WASM engine before and after the shared C kernel source, side by side in one headless
Chromium run, and the native packed kernel on the same layer range in the same run:

    .venv/bin/python benchmarks/bench_wasm_ab.py [--layers 0:4] [--tokens 48] [--rev REV]

"before" is the tab's own kernel (tab_worker/web/wasm/kernels.c and its backend_cpu.js) at REV
(default: the last commit that had it), compiled with that commit's flags; "after" is
kernels/c/packed_kernels.c as tab_worker/web/build.py builds it. Decode steps of one token on
SmolLM2's real layer blobs, the two engines alternating step by step (the first of each pair
swapped every step) so both see the same host load; medians and minima of the steps.
Needs `npm ci && python tab_worker/web/build.py` and /usr/bin/chromium.
"""
from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from types import SimpleNamespace

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from bench_browser import FLAGS, PROMPT  # noqa: E402

PAGE_JS = """
async ({cfg, keys, tokens, prompt}) => {
  const { unpack_blob } = await import("/tab/static/weights.js");
  const after = await import("/tab/static/backend_cpu.js");
  const before = await import("/old/backend_cpu.js");
  const layers = {};
  for (const k of keys) {
    const b = unpack_blob(new Uint8Array(await (await fetch(`/bench/blob/${k}`)).arrayBuffer()));
    layers[b.index] = b.weights;
  }
  const x = new Float32Array(await (await fetch("/bench/x")).arrayBuffer());
  const H = cfg.hidden;
  const be = {
    before: new before.CpuBackend(cfg, layers, null, prompt + tokens + 1, await before.WasmEngine.load("/old/kernels.wasm")),
    after: new after.CpuBackend(cfg, layers, null, prompt + tokens + 1, await after.WasmEngine.load("/tab/static/kernels.wasm")),
  };
  const steps = { before: [], after: [] }, last = {};
  for (const name of ["before", "after"]) await be[name].forward([{session_id: "s", start_pos: 0, length: prompt}], x.subarray(0, prompt * H));
  for (let i = 0; i < tokens; i++) {
    for (const name of (i % 2 ? ["after", "before"] : ["before", "after"])) {
      const t0 = performance.now();
      last[name] = await be[name].forward([{session_id: "s", start_pos: prompt + i, length: 1}], x.subarray((prompt + i) * H, (prompt + i + 1) * H));
      steps[name].push(performance.now() - t0);
    }
  }
  let diff = 0;
  for (let j = 0; j < H; j++) diff = Math.max(diff, Math.abs(last.before[j] - last.after[j]));
  return { steps, diff };
}
"""


def build_before(rev: str, out: Path) -> None:
    src = subprocess.run(["git", "show", f"{rev}:tab_worker/web/wasm/kernels.c"], cwd=ROOT, capture_output=True,
                         text=True, check=True).stdout
    js = subprocess.run(["git", "show", f"{rev}:tab_worker/web/backend_cpu.js"], cwd=ROOT, capture_output=True,
                        text=True, check=True).stdout
    (out / "kernels.c").write_text(src)
    (out / "backend_cpu.js").write_text(js)
    subprocess.run(["clang", "--target=wasm32", "-O3", "-msimd128", "-nostdlib", "-Wl,--no-entry", "-Wl,--import-memory",
                    "-Wl,--export-dynamic", "-Wl,--export=__heap_base", "-o", str(out / "kernels.wasm"),
                    str(out / "kernels.c")], check=True)


def serve(blobs, x, old: Path):
    import uvicorn
    from starlette.applications import Starlette
    from starlette.responses import HTMLResponse, Response
    from starlette.routing import Route

    from coordinator.tab_routes import routes
    from tabshard.cluster import free_port

    types = {".js": "text/javascript", ".wasm": "application/wasm"}

    async def old_file(request):
        f = old / request.path_params["name"]
        return Response(f.read_bytes(), media_type=types.get(f.suffix, "application/octet-stream"))

    app = Starlette(routes=routes(SimpleNamespace(join_token=None)) + [
        Route("/bench", lambda r: HTMLResponse("<!doctype html><title>bench</title>")),
        Route("/bench/blob/{key}", lambda r: Response(blobs[r.path_params["key"]])),
        Route("/bench/x", lambda r: Response(x.astype("<f4").tobytes())),
        Route("/old/{name}", old_file)])
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    threading.Thread(target=server.run, daemon=True).start()
    while not server.started:
        time.sleep(0.05)
    return server, f"http://127.0.0.1:{port}"


def main() -> int:
    import os

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", default="0:4")
    ap.add_argument("--tokens", type=int, default=48)
    ap.add_argument("--rev", help="commit whose tab_worker/web/wasm/kernels.c is 'before' (default: the last one with it)")
    a = ap.parse_args()
    rev = a.rev or subprocess.run(["git", "rev-list", "-1", "HEAD", "--", "tab_worker/web/wasm/kernels.c"], cwd=ROOT,
                                  capture_output=True, text=True, check=True).stdout.strip() + "^"
    from tab_worker.backends import make_backend
    from protocol.model_types import SessionSlice
    from protocol.blobs import pack_layer
    from model.embedding import embed
    from model.loader import open_model

    start, end = map(int, a.layers.split(":"))
    weights = open_model(None).load_all()
    x = embed(weights.embedding, list(range(100, 100 + PROMPT + a.tokens)))
    blobs = {str(i): pack_layer(i, weights.layers[i]) for i in range(start, end)}
    load0 = os.getloadavg()[0]
    with tempfile.TemporaryDirectory() as tmp:
        build_before(rev, Path(tmp))
        server, base = serve(blobs, x, Path(tmp))
        from playwright.sync_api import sync_playwright

        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path="/usr/bin/chromium", headless=True, args=FLAGS)
            page = browser.new_page()
            page.goto(f"{base}/bench")
            res = page.evaluate(PAGE_JS, {"cfg": weights.config.to_dict(), "keys": list(blobs), "tokens": a.tokens, "prompt": PROMPT})
            browser.close()
        server.should_exit = True
    be = make_backend("numpy", weights.config, {i: weights.layers[i] for i in range(start, end)}, None, PROMPT + a.tokens + 1)
    be.forward([SessionSlice("s", 0, PROMPT)], x[:PROMPT])
    native = []
    for i in range(a.tokens):
        t0 = time.perf_counter()
        be.forward([SessionSlice("s", PROMPT + i, 1)], x[PROMPT + i: PROMPT + i + 1])
        native.append((time.perf_counter() - t0) * 1000)
    rows = {f"tab wasm before ({rev[:10]})": res["steps"]["before"], "tab wasm after (shared source)": res["steps"]["after"],
            "native packed kernel": native}
    print(f"layers {start}-{end - 1} of SmolLM2, decode steps of 1 token, {a.tokens} alternating steps; "
          f"load {load0:.1f} -> {os.getloadavg()[0]:.1f}; max|before - after| {res['diff']:.2e}")
    for name, v in rows.items():
        print(f"  {name:<34} median {statistics.median(v):7.2f} ms   min {min(v):7.2f} ms")
    b, af = statistics.median(res["steps"]["before"]), statistics.median(res["steps"]["after"])
    print(f"  after / before: median {af / b:.2f}x the time, min {min(res['steps']['after']) / min(res['steps']['before']):.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
