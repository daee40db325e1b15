"""The browser compatibility matrix, produced from data: for each browser/device profile, which
kernels and backends ran, the limits in force and the measured step time.

Three sources, best first, per profile:

* real-browser   a browser ran our kernels (headless Chromium here: `measure_chromium`; browser
                 tabs may record their own runs with History.add_compat);
* native-limits  wgpu on this host with the device limited to the profile's limits (lavapipe
                 or a GPU never grants more than either): the tab's kernel choices are built
                 and a SmolLM2-shaped decode step is timed (`measure_native`);
* static         no run recorded: each kernel's workgroup (as the runner would size it under
                 the profile's limits) checked against those limits, read from the WGSL.

Profiles come from actors.profiles; without it the matrix holds recorded runs only.
"""
from __future__ import annotations

import json
import statistics
import time
from pathlib import Path

from tabshard.bench_history import DEFAULT_DB, History

# the kernels a decode step uses, with the overrides kernels/runner.py picks for given limits
KERNELS = ["qmatvec", "qmatmul", "rmsnorm", "rope", "kv_store", "attention", "silu_gate", "residual_add", "embedding", "topk"]


def _pow2_at_most(preferred: int, limits: dict) -> int:
    cap = min(preferred, limits["max-compute-invocations-per-workgroup"], limits["max-compute-workgroup-size-x"])
    p = 1
    while p * 2 <= cap:
        p *= 2
    return p


def kernel_variants(limits: dict) -> list[tuple[str, dict]]:
    wg = lambda n: _pow2_at_most(n, limits)  # noqa: E731 - Device.workgroup_size
    return [("qmatvec", {"BITS": 4, "GROUP": 32, "SYMMETRIC": 0, "WG": wg(256), "TPR": 16, "ROWS": 4}),
            ("qmatmul", {"BITS": 4, "GROUP": 32, "SYMMETRIC": 0, "TILE": 64}),
            ("rmsnorm", {"WG": wg(256)}), ("rope", {"WG": wg(64)}), ("kv_store", {"WG": wg(64)}),
            ("attention", {"WG": max(64, wg(64)), "HEAD_DIM": 64}), ("silu_gate", {"WG": wg(64)}),
            ("residual_add", {"WG": wg(64)}), ("embedding", {"BITS": 8, "GROUP": 32, "SYMMETRIC": 1, "WG": wg(64)}),
            ("topk", {"WG": wg(256), "KP": 64})]


def static_check(limits: dict) -> tuple[list[str], list[str]]:
    """(kernels that fit, 'kernel: why' for those that do not) under these limits."""
    from kernels import runner as R

    class _Src:  # Device.workgroup_shape reads only the WGSL source
        source = R.Device.source

    full = {**R.WEBGPU_DEFAULT_LIMITS, **limits}
    ok, bad = [], []
    for kernel, consts in kernel_variants(full):
        (x, y, z), storage = R.Device.workgroup_shape(_Src(), kernel, consts)
        why = []
        if x * y * z > full["max-compute-invocations-per-workgroup"]:
            why.append(f"{x * y * z} invocations > {full['max-compute-invocations-per-workgroup']}")
        if storage > full["max-compute-workgroup-storage-size"]:
            why.append(f"{storage} B workgroup memory > {full['max-compute-workgroup-storage-size']}")
        (bad.append(f"{kernel}: {'; '.join(why)}") if why else ok.append(kernel))
    return ok, bad


def _profiles() -> dict:
    try:
        from actors.profiles import PROFILES

        return dict(PROFILES)
    except Exception:  # the simulation package is optional here
        return {}


SMOLLM2 = dict(n_layers=30, hidden=576, n_heads=9, n_kv_heads=3, head_dim=64, ffn=1536, vocab=49152,
               rope_base=100000.0, rms_eps=1e-5, context=8192, eos_id=2, bos_id=1)


def measure_native(profile, layers: int = 2, steps: int = 5) -> dict:
    """Build a wgpu backend for SmolLM2-shaped layers under the profile's limits on this host
    and time decode steps (one token). Profiles without WebGPU run the numpy backend."""
    import numpy as np

    from tab_worker.backends import make_backend
    from protocol.model_types import ModelConfig, SessionSlice
    from model.synthetic import random_layer

    cfg = ModelConfig(**SMOLLM2)
    weights = {i: random_layer(cfg, i) for i in range(layers)}
    row = {"profile": profile.name, "browser": profile.browser, "source": "native-limits", "backend": profile.backend,
           "limits": dict(profile.limits)}
    try:
        if profile.webgpu:
            from kernels import runner as R

            dev = R.Device(limits=dict(profile.limits))
            be = make_backend("wgpu", cfg, weights, None, 256, device=dev)
            row["adapter"] = dev.describe()
            row["limits"] = {k: int(v) for k, v in dev.limits.items() if k in profile.limits}
        else:
            be = make_backend("numpy", cfg, weights, None, 256)
            row["adapter"] = "CPU (numpy stands in for WASM SIMD)"
        x = np.random.default_rng(0).standard_normal((1, cfg.hidden)).astype(np.float32)
        times = []
        for pos in range(steps + 1):
            t0 = time.perf_counter()
            be.forward([SessionSlice("s", pos, 1)], x)
            times.append((time.perf_counter() - t0) * 1000)
        row["step_ms"] = statistics.median(times[1:]) * cfg.n_layers / layers  # per whole-model token
        if profile.webgpu:
            row["kernels_ok"] = sorted({k[0] for k in dev._pipelines})
        else:
            row["kernels_ok"] = ["numpy"]
        row["kernels_failed"] = []
        row["detail"] = {"step_note": f"median of {steps} decode steps over {layers} layers, scaled to {cfg.n_layers}",
                         "speed_factor": profile.speed}
    except Exception as exc:
        row.update(kernels_ok=[], kernels_failed=[f"{type(exc).__name__}: {exc}"[:300]], step_ms=None)
    return row


CHROMIUM_ARGS = ["--headless=new", "--no-sandbox", "--enable-unsafe-webgpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run", "--disable-quic", "--disable-dev-shm-usage"]
CHROMIUM_JS = """
async ({sources, variants}) => {
  if (!navigator.gpu) return {error: 'no navigator.gpu'};
  const adapter = await navigator.gpu.requestAdapter();
  if (!adapter) return {error: 'no adapter'};
  const device = await adapter.requestDevice();  // the spec's default limits, as a page gets
  const ok = [], failed = [], limits = {};
  for (const k of ['maxStorageBufferBindingSize', 'maxComputeInvocationsPerWorkgroup', 'maxComputeWorkgroupStorageSize', 'maxBufferSize'])
    limits[k] = device.limits[k];
  for (const [name, constants] of variants) {
    const module = device.createShaderModule({code: sources[name]});
    device.pushErrorScope('validation');
    let msg = null;
    try { await device.createComputePipelineAsync({layout: 'auto', compute: {module, entryPoint: 'main', constants}}); }
    catch (e) { msg = e.message; }
    const err = await device.popErrorScope();
    if (err) msg = err.message;
    (msg ? failed : ok).push(msg ? `${name}: ${msg.slice(0, 200)}` : name);
  }
  // a step-sized matvec (576 x 1536, f32) timed with one submit + readback per call
  const K = 1536, N = 576, code = `
    @group(0) @binding(0) var<storage, read> w: array<f32>;
    @group(0) @binding(1) var<storage, read> x: array<f32>;
    @group(0) @binding(2) var<storage, read_write> y: array<f32>;
    @compute @workgroup_size(64) fn main(@builtin(global_invocation_id) g: vec3u) {
      if (g.x >= ${N}u) { return; }
      var s = 0.0; for (var k = 0u; k < ${K}u; k++) { s += w[g.x * ${K}u + k] * x[k]; }
      y[g.x] = s; }`;
  const pipe = device.createComputePipeline({layout: 'auto', compute: {module: device.createShaderModule({code}), entryPoint: 'main'}});
  const mk = (n, usage) => device.createBuffer({size: n * 4, usage});
  const S = GPUBufferUsage.STORAGE, C = GPUBufferUsage.COPY_SRC | GPUBufferUsage.COPY_DST;
  const wb = mk(N * K, S | C), xb = mk(K, S | C), yb = mk(N, S | C), rb = mk(N, GPUBufferUsage.MAP_READ | GPUBufferUsage.COPY_DST);
  const bg = device.createBindGroup({layout: pipe.getBindGroupLayout(0), entries: [wb, xb, yb].map((buffer, binding) => ({binding, resource: {buffer}}))});
  const times = [];
  for (let i = 0; i < 8; i++) {
    const t0 = performance.now();
    const enc = device.createCommandEncoder(), pass = enc.beginComputePass();
    pass.setPipeline(pipe); pass.setBindGroup(0, bg); pass.dispatchWorkgroups(Math.ceil(N / 64)); pass.end();
    enc.copyBufferToBuffer(yb, 0, rb, 0, N * 4);
    device.queue.submit([enc.finish()]);
    await rb.mapAsync(GPUMapMode.READ); rb.unmap();
    times.push(performance.now() - t0);
  }
  times.sort((a, b) => a - b);
  const info = adapter.info || {};
  return {ok, failed, limits, matvec_ms: times[times.length >> 1], ua: navigator.userAgent,
          adapter: [info.vendor, info.architecture, info.description].filter(Boolean).join(' ') || '?',
          fallback: !!(info.isFallbackAdapter || adapter.isFallbackAdapter)};
}
"""


def measure_chromium(chromium: str = "/usr/bin/chromium", timeout_s: float = 120) -> dict | None:
    """Compile every kernel (as the runner would configure it under the spec's default limits)
    in real headless Chromium and time a step-sized matvec there. None without Chromium."""
    import http.server
    import shutil
    import threading

    from kernels import runner as R
    from kernels import wgsl_source

    exe = chromium if Path(chromium).exists() else shutil.which("chromium")
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        return None
    if not exe:
        return None
    class Quiet(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            body = b"<!doctype html><title>tabshard compat</title>"
            self.send_response(200)
            self.send_header("Content-Type", "text/html")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Quiet)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        with sync_playwright() as pw:
            browser = pw.chromium.launch(executable_path=exe, args=CHROMIUM_ARGS, timeout=timeout_s * 1000)
            try:
                page = browser.new_page()
                page.set_default_timeout(timeout_s * 1000)
                page.goto(f"http://127.0.0.1:{server.server_address[1]}/")  # a secure context
                sources = {k: wgsl_source(k) for k in KERNELS}  # includes resolved, as tabs get them
                res = page.evaluate(CHROMIUM_JS, {"sources": sources, "variants": kernel_variants(dict(R.WEBGPU_DEFAULT_LIMITS))})
                version = browser.version
            finally:
                browser.close()
    finally:
        server.shutdown()
    if res.get("error"):
        return {"profile": "chromium-headless", "browser": f"Chromium {version} (headless)", "source": "real-browser",
                "backend": "none", "kernels_ok": [], "kernels_failed": [res["error"]], "step_ms": None}
    return {"profile": "chromium-swiftshader", "browser": f"Chromium {version} (headless)", "source": "real-browser",
            "backend": "WebGPU", "adapter": res["adapter"] + (" (fallback)" if res["fallback"] else ""), "limits": res["limits"],
            "kernels_ok": res["ok"], "kernels_failed": res["failed"], "step_ms": None,
            "detail": {"matvec_576x1536_ms": res["matvec_ms"], "user_agent": res["ua"]}}


# ---------------------------------------------------------------------- the table
COLUMNS = [("profile", "profile"), ("browser", "browser / device"), ("source", "source"), ("backend", "backend"),
           ("adapter", "adapter"), ("binding", "max binding"), ("invocations", "invocations"), ("wg_mem", "wg memory"),
           ("features", "features"), ("kernels", "kernels ran"), ("failed", "failed"), ("step", "step time")]


def _mib(v) -> str:
    return "–" if v is None else f"{v / (1 << 20):.0f} MiB" if v < (1 << 30) - 8 else f"{v / (1 << 30):.1f} GiB"


def _lim(limits: dict, *names):
    for n in names:
        if limits and n in limits:
            return limits[n]
    return None


def _display(rec: dict, profile=None) -> dict:
    lim = rec.get("limits") or {}
    step = rec.get("step_ms")
    detail = rec.get("detail") or {}
    if step is not None:
        step_s = f"{step:.0f} ms/token"
    elif detail.get("matvec_576x1536_ms") is not None:
        step_s = f"matvec 576×1536: {detail['matvec_576x1536_ms']:.2f} ms"
    else:
        step_s = "–"
    failed = rec.get("kernels_failed") or []
    ok = rec.get("kernels_ok") or []
    inv = _lim(lim, "max-compute-invocations-per-workgroup", "maxComputeInvocationsPerWorkgroup")
    wgm = _lim(lim, "max-compute-workgroup-storage-size", "maxComputeWorkgroupStorageSize")
    return {
        "profile": rec["profile"], "browser": rec.get("browser") or (profile.browser if profile else ""),
        "source": rec["source"] + (f" ({rec['date'][:10]})" if rec.get("date") else ""),
        "backend": rec.get("backend") or "", "adapter": rec.get("adapter") or "–",
        "binding": _mib(_lim(lim, "max-storage-buffer-binding-size", "maxStorageBufferBindingSize")) if lim else "no WebGPU",
        "invocations": "–" if inv is None else str(inv),
        "wg_mem": "–" if wgm is None else f"{wgm // 1024} KiB",
        "features": ", ".join(profile.features) if profile and profile.features else "–",
        "kernels": f"{len(ok)}: {', '.join(ok)}" if ok else "none",
        "failed": "; ".join(f.replace("\n", " ")[:160] for f in failed) if failed else "none",
        "step": step_s,
        "_class": {"failed": "bad" if failed else "ok"},
    }


def matrix(db: str | Path | None = DEFAULT_DB) -> dict:
    """{"columns": [{key, label}], "rows": [...], "note"}: one row per profile and source."""
    recorded: list[dict] = []
    if db is not None and (str(db) == ":memory:" or Path(db).exists()):
        h = History(db)
        try:
            recorded = h.latest_compat()
        finally:
            h.close()
    profiles = _profiles()
    rows = []
    seen = set()
    for rec in recorded:
        rows.append(_display(rec, profiles.get(rec["profile"])))
        seen.add(rec["profile"])
    for name, p in profiles.items():
        if name in seen:
            continue
        if p.webgpu:
            ok, bad = static_check(dict(p.limits))
        else:
            ok, bad = ["numpy"], []
        rows.append(_display({"profile": name, "browser": p.browser, "source": "static", "backend": p.backend,
                              "limits": dict(p.limits), "kernels_ok": ok, "kernels_failed": bad}, p))
    order = list(profiles) + sorted({r["profile"] for r in rows} - set(profiles))
    rows.sort(key=lambda r: (order.index(r["profile"]), r["source"]))
    note = ("native-limits: wgpu on this host with the profile's limits (speed is this host's, not the device's); "
            "real-browser: measured in that browser; static: workgroups checked against the limits, nothing run."
            + ("" if profiles else " actors.profiles not importable: recorded runs only."))
    return {"columns": [{"key": k, "label": v} for k, v in COLUMNS], "rows": rows, "note": note}


def main() -> None:  # python -m tabshard.compat_matrix: print the matrix as JSON
    print(json.dumps(matrix(), indent=1))


if __name__ == "__main__":
    main()
