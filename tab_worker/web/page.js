// The tab's page: starts the dedicated worker (client.js, which owns the socket, the
// heartbeats and the compute) and shows what it reports. Nothing here is on the hot path,
// so a hidden, throttled page does not slow the tab's serving.
const params = new URLSearchParams(location.search);
const $ = (id) => document.getElementById(id);
const state = (window.tabState = { phase: "starting", messages: [], stats: {}, caps: null, connection: null });

function mb(bytes) { return bytes == null ? "–" : `${(bytes / 2 ** 20).toFixed(1)} MiB`; }

function show(text, error = false) {
  $("message").textContent = text;
  $("message").classList.toggle("error", error);
  state.messages.push({ text, error, t: Date.now() });
}

function phase(name) {
  state.phase = name;
  $("state").textContent = name;
  $("state").className = `state ${name}`;
}

function render(stats) {
  Object.assign(state.stats, stats);
  const s = state.stats;
  $("worker").textContent = s.worker_id || "–";
  $("layers").textContent = s.ranges?.length ? s.ranges.map(([a, b]) => `${a}–${b - 1}`).join(", ") + (s.heads ? " + head" : "") : "none yet";
  $("backend").textContent = s.backend || "–";
  $("measured").textContent = Object.entries(s.measured_ms || {}).map(([k, v]) => `${k} ${v == null ? "failed" : v.toFixed(2)}`).join(" · ") || "–";
  $("adapter").textContent = s.adapter || (s.gpu_error ? `no WebGPU: ${s.gpu_error}` : "–");
  $("memory").textContent = mb(s.memory_bytes);
  const p = s.progress || {};
  $("progress").textContent = p.total ? `${mb(p.received)} / ${mb(p.total)}${s.bytes_from_cache ? ` (${mb(s.bytes_from_cache)} from cache)` : ""}` : "–";
  $("bar").value = p.total ? p.received / p.total : 0;
  $("tokens").textContent = s.tokens || 0;
  $("steps").textContent = s.steps || 0;
  if (s.ranges?.length) phase("ready");
  else if (p.total && p.received < p.total) phase("loading");
}

// The tab's pass (welcome's `standing`), kept in sessionStorage: a reloaded tab rejoins with it.
const PASS_KEY = "tabshard-standing";

function storedPass() {
  try { return sessionStorage.getItem(PASS_KEY); } catch { return null; }
}

function start() {
  if (!params.get("token")) {
    phase("failed");
    show("This link has no join token. Open the tab join URL that `tabshard serve` printed (it ends in ?token=…).", true);
    return;
  }
  if (typeof Worker === "undefined") {
    phase("failed");
    show("This browser has no Web Workers; it cannot serve as a tab.", true);
    return;
  }
  const scheme = location.protocol === "https:" ? "wss:" : "ws:";
  const options = {
    token: params.get("token"), backend: params.get("backend") || "auto", limits: params.get("limits") || "adapter",
    memoryBytes: params.get("memory_mb") ? Math.round(Number(params.get("memory_mb")) * 2 ** 20) : null, base: location.origin,
    standing: storedPass(),
  };
  const name = params.get("name") || `tab-${Math.random().toString(36).slice(2, 8)}`;
  const worker = new Worker("/tab/static/client.js", { type: "module" });
  worker.onerror = (ev) => { phase("failed"); show(`The tab's worker failed to start: ${ev.message || "module error"}`, true); };
  worker.onmessage = (ev) => {
    const d = ev.data;
    if (d.type === "caps" && d.rejoin) {  // after a lost WebGPU device
      state.caps = d.caps;
      state.rejoins = (state.rejoins || 0) + 1;
      render(d.stats);
      show(`${d.rejoin}; rejoining…`, !d.caps.webgpu);
    } else if (d.type === "caps") {
      state.caps = d.caps;
      render(d.stats);
      show(`Detected ${d.caps.browser} ${d.caps.browser_version}${d.caps.mobile ? " (mobile)" : ""}: ` +
        (d.caps.webgpu ? `WebGPU on ${d.caps.adapter}` : `no WebGPU (${d.caps.webgpu_error || "unavailable"}), `) +
        (d.caps.wasm_simd ? " WASM SIMD available." : " no WASM SIMD: plain JS.") + " Connecting…");
    } else if (d.type === "stats") {
      render(d.stats);
      if (state.phase === "ready") show(`Serving layers ${$("layers").textContent} on ${d.stats.backend}.`);
    } else if (d.type === "connection") {
      state.connection = d;
      if (d.state === "open") { phase("joined"); show("Connected; measuring and waiting for an assignment…"); }
      else if (d.fatal) { phase("failed"); show(`The coordinator refused this tab: ${d.reason}. Check the join URL's token.`, true); }
      else { phase("reconnecting"); show(`Connection lost (${d.code}${d.reason ? `: ${d.reason}` : ""}); reconnecting…`, true); }
    } else if (d.type === "standing") {  // the coordinator's pass for this tab: kept across reloads
      try { sessionStorage.setItem(PASS_KEY, d.standing); } catch { /* storage off: the pass lasts this page */ }
    } else if (d.type === "problem") {
      show(d.message, true);
    } else if (d.type === "fatal") {
      phase("failed");
      show(`This tab cannot serve: ${d.message}`, true);
    }
  };
  worker.postMessage({ type: "start", url: `${scheme}//${location.host}/ws/worker`, name, options });
  state.name = name;
  // what a GPU driver reset does to this tab, on demand (tests, and a user curious to see it)
  window.tabDebug = { loseDevice: () => worker.postMessage({ type: "lose_device" }) };
}

start();
