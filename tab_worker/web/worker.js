// The browser tab's worker: the same protocol steps, in the same order and with the same
// names, as tab_worker/worker.py (TabWorker). client.js runs it, as client.py runs that.
import { make, Tensor } from "./codec.js";
import { DEFAULT_HEARTBEAT_MS } from "./messages.js";
import { BlobAssembler, BlobError, CHUNK_BYTES, sha256, unpack_blob } from "./weights.js";
import { CpuBackend, JsEngine, WasmEngine } from "./backend_cpu.js";

// bytes a tab holds per byte of packed weights: the blob itself (kept for re-assignment)
// plus the packed words again (WASM memory or GPU buffers) and f32 scales
export const EXPANSION = { webgpu: 2.3, wasm: 2.5, js: 2.5 };
const CACHE_NAME = "tabshard-weights-v1";
const CACHE_PREFIX = "/tabshard-blob/";
const PROGRESS_EVERY_MS = 250;

// ====================================================================== capabilities
export function browserInfo(nav = navigator) {
  const ua = nav.userAgent || "";
  const brands = nav.userAgentData?.brands || [];
  const brand = brands.find((b) => !/Not.?A.?Brand|Chromium/i.test(b.brand)) || brands.find((b) => /Chromium/i.test(b.brand));
  let family = brand?.brand, version = brand?.version;
  if (!family) {
    const m = /(Firefox|EdgA?|SamsungBrowser|Chrome|Chromium|Version(?=.*Safari))\/(\d+)/.exec(ua);
    family = m ? (m[1] === "Version" ? "Safari" : m[1]) : "unknown";
    version = m ? m[2] : "";
  }
  const mobile = nav.userAgentData?.mobile ?? /Android|iPhone|iPad|Mobile/i.test(ua);
  return { family, version: String(version || ""), mobile: !!mobile, user_agent: ua };
}

const LIMIT_KEYS = ["maxBufferSize", "maxStorageBufferBindingSize", "maxComputeWorkgroupStorageSize",
  "maxComputeInvocationsPerWorkgroup", "maxComputeWorkgroupSizeX", "maxComputeWorkgroupSizeY", "maxComputeWorkgroupSizeZ",
  "maxComputeWorkgroupsPerDimension", "maxStorageBuffersPerShaderStage", "minStorageBufferOffsetAlignment"];

// ====================================================================== TabWorker
export class TabWorker {
  constructor(name, { token = "", backend = "auto", memoryBytes = null, limits = "adapter", base = "" } = {}) {
    this.name = name;
    this.token = token;
    this.preference = backend;  // auto | webgpu | wasm | js
    this.backend_name = null;  // chosen when measuring its speed
    this.memory_budget = memoryBytes;
    this.limits_mode = limits;  // "adapter" or "default" (the spec's defaults: any conformant browser)
    this.base = base;
    this.worker_id = null;
    this.epoch = 0;
    this.heartbeat_ms = DEFAULT_HEARTBEAT_MS;
    this.blobs = new Map();  // sha256 -> Uint8Array
    this.cached = new Set();  // sha256 of blobs in the Cache API
    this._assembling = new Map();
    this._assignments = new Map();
    this.ranges = new Map();  // "start,end" -> backend
    this.range_heads = new Map();
    this.steps_served = 0;
    this.tokens_served = 0;
    this.bytes_received = 0;
    this.bytes_from_cache = 0;
    this.measured = {};
    this.progress = { received: 0, total: 0, layer: -1 };
    this.caps = null;
    this.gpu = null;  // {adapter, device, info} when WebGPU works
    this.gpu_error = null;
    this.wasm = null;
  }

  // ------------------------------------------------------------------ start
  async init() {
    await this._detect();
    try {
      this.cache = await caches.open(CACHE_NAME);
      for (const req of await this.cache.keys()) {
        const sha = new URL(req.url).pathname.slice(CACHE_PREFIX.length);
        if (/^[0-9a-f]{64}$/.test(sha)) this.cached.add(sha);
      }
    } catch (err) {
      this.cache = null;
      this.cache_error = String(err);
    }
  }

  async _detect() {
    const info = browserInfo();
    const caps = {
      kind: "browser", browser: info.family, browser_version: info.version, mobile: info.mobile, user_agent: info.user_agent,
      hardware_concurrency: navigator.hardwareConcurrency || 1, device_memory_gb: navigator.deviceMemory ?? null,
      wasm_simd: WasmEngine.supported(), webgpu: false,
    };
    if (this.preference !== "wasm" && this.preference !== "js" && navigator.gpu) {
      try {
        const { WebGpuDevice } = await import("./webgpu_device.js");
        this.gpu = await WebGpuDevice.create(this.limits_mode, this.base);
        Object.assign(caps, this.gpu.describe());
        caps.webgpu = true;
      } catch (err) {
        this.gpu_error = `${err.name || "Error"}: ${err.message}`;
      }
    } else if (!navigator.gpu) {
      this.gpu_error = "navigator.gpu is missing (WebGPU not enabled in this browser)";
    }
    if (this.gpu_error) caps.webgpu_error = this.gpu_error;
    if (caps.wasm_simd && this.preference !== "js" && this.preference !== "webgpu") {
      try {
        this.wasm = await WasmEngine.load(new URL("./kernels.wasm", import.meta.url));
      } catch (err) {
        caps.wasm_error = String(err);
      }
    }
    // the budget: what the page was told, else a quarter of the device's memory, at most 2 GiB
    // (WASM32 addresses 4 GiB; a tab should leave room for the rest of the browser)
    const gb = navigator.deviceMemory || 4;
    this.memory_budget = this.memory_budget || Math.min(2 ** 31, Math.floor(gb * 2 ** 30 / 4));
    caps.memory_bytes = this.memory_budget;
    this.caps = caps;
    this._setBackendCaps(this.candidates()[0]);
  }

  // A lost WebGPU device (driver reset, destroy(), out of memory) takes every buffer with it.
  // `onLost` hears of it once per device; recoverDevice then drops the GPU ranges, asks for a
  // new adapter and device (a few tries), and otherwise falls back to the CPU engines. The
  // blobs stay in memory (and in the Cache API), so the rejoining tab reloads without a download.
  watchDevice(onLost) {
    const gpu = this.gpu;
    if (!gpu) return;
    gpu.device.lost.then((info) => {
      if (this.gpu === gpu) onLost(`${info.reason || "unknown"}: ${info.message || "device lost"}`);
    });
  }

  async recoverDevice(reason, tries = 3) {
    for (const b of this.ranges.values()) { try { b.destroy?.(); } catch { /* its device is gone */ } }
    this.ranges.clear();
    this.range_heads.clear();
    this._assignments.clear();
    this.device_losses = (this.device_losses || 0) + 1;
    this.gpu = null;
    let why = "";
    for (let i = 0; i < tries && !this.gpu && this.preference !== "wasm" && this.preference !== "js"; i++) {
      try {
        const { WebGpuDevice } = await import("./webgpu_device.js");
        this.gpu = await WebGpuDevice.create(this.limits_mode, this.base);
      } catch (err) {
        why = `${err.name || "Error"}: ${err.message}`;
        await new Promise((r) => setTimeout(r, 250 * 2 ** i));
      }
    }
    if (this.gpu) {
      Object.assign(this.caps, this.gpu.describe());
      this.caps.webgpu = true;
      this.gpu_error = null;
      delete this.caps.webgpu_error;
      return { backend: this.backend_name, message: `WebGPU device lost (${reason}); a new device was created` };
    }
    this.caps.webgpu = false;
    this.gpu_error = this.caps.webgpu_error = `WebGPU device lost (${reason}) and none came back${why ? ` (${why})` : ""}`;
    delete this.measured.webgpu;
    if (this.backend_name === "webgpu") this._setBackendCaps(this.candidates()[0]);
    return { backend: this.backend_name, message: `${this.gpu_error}: falling back to ${this.backend_name}` };
  }

  candidates() {
    const c = [];
    if (this.gpu && this.preference !== "wasm" && this.preference !== "js") c.push("webgpu");
    if (this.wasm && this.preference !== "webgpu" && this.preference !== "js") c.push("wasm");
    if (this.preference === "js" || !c.length) c.push("js");  // the last resort
    return c;
  }

  _setBackendCaps(name) {
    this.backend_name = name;
    this.caps.backend = name;
    this.caps.expansion = EXPANSION[name];
  }

  capabilities() {
    return { ...this.caps, measured_ms: this.measured };
  }

  hello() {
    const partial = {};
    for (const a of this._assembling.values()) partial[a.info.sha256] = [...a.have].sort((x, y) => x - y);
    const have = [...new Set([...this.blobs.keys(), ...this.cached])].sort();
    return make("hello", { worker_name: this.name, token: this.token, capabilities: this.capabilities(),
      resume: { have, partial, worker_id: this.worker_id } });
  }

  heartbeat(seq) {
    return make("heartbeat", { seq, load: { steps: this.steps_served, ranges: [...this.ranges.keys()].map((k) => k.split(",").map(Number)) } });
  }

  // ------------------------------------------------------------------ dispatch
  async handle(m) {
    const handler = this[`on_${m.type}`];
    if (typeof handler !== "function") {
      return [make("error", { code: "unexpected_type", field: "type", message: `a worker does not accept '${m.type}'` })];
    }
    return (await handler.call(this, m)) || [];
  }

  on_welcome(m) {
    this.ranges.clear();
    this.range_heads.clear();
    this._assignments.clear();
    this.worker_id = m.worker_id;
    this.epoch = m.epoch;
    this.heartbeat_ms = m.heartbeat_ms;
  }

  on_error() { return null; }

  // Settings the coordinator asks of every tab, corrected to what this tab can do (reported
  // in ready, never silent): as worker.py's honour_precision.
  honour_precision(precision) {
    const options = {}, corrections = [];
    const correct = (setting, asked, used, reason) => corrections.push({ setting, asked, used, reason });
    const compute = precision.compute;
    if (compute != null && compute !== "f32") {
      correct("compute", compute, "f32", this.backend_name === "webgpu"
        ? `this tab's kernels are f32-only${this.caps.f16 ? "" : " and its adapter lacks shader-f16"}`
        : `the ${this.backend_name} backend computes in f32`);
    }
    const wg = precision.workgroup_size;
    if (wg != null) {
      if (this.backend_name !== "webgpu") {
        correct("workgroup_size", wg, null, `the ${this.backend_name} backend has no workgroups`);
      } else {
        const cap = this.gpu.limits.maxComputeInvocationsPerWorkgroup;
        const used = Math.min(Number(wg), cap, this.gpu.limits.maxComputeWorkgroupSizeX);
        if (used !== wg) correct("workgroup_size", wg, used, `the adapter allows at most ${cap} invocations per workgroup`);
        options.maxWorkgroup = used;
      }
    }
    return { options, corrections };
  }

  async make_backend(name, cfg, layers, head, maxCtx, options = {}) {
    if (name === "webgpu") {
      const { WebGpuBackend } = await import("./backend_webgpu.js");
      const gpu = options.maxWorkgroup ? this.gpu.withWorkgroupCap(options.maxWorkgroup) : this.gpu;
      const be = new WebGpuBackend(gpu, cfg, layers, head, maxCtx);
      await be.init();  // pipelines, created once and asynchronously
      return be;
    }
    return new CpuBackend(cfg, layers, head, maxCtx, name === "wasm" ? this.wasm : new JsEngine());
  }

  // Time one synthetic layer of the model's shape on every engine this tab has; keep the
  // fastest. The measured figures go to the coordinator (details.measured_ms).
  async on_measure(m) {
    const cfg = m.model, tokens = Number(m.tokens || 4);
    const layer = synthetic_layer(cfg);
    const x = new Float32Array(cfg.hidden).map((_, i) => Math.sin(i));
    for (const name of this.candidates()) {
      try {
        const be = await this.make_backend(name, cfg, { 0: layer }, null, tokens + 1);
        await be.forward([{ session_id: "measure", start_pos: 0, length: 1 }], x);  // warm-up
        // the fastest step, as the Python worker takes it: sibling tabs joining at once
        // preempt some steps, and the planner wants this engine's own speed
        let fastest = Infinity;
        for (let pos = 1; pos < Math.max(tokens, 2); pos++) {
          const t0 = performance.now();
          await be.forward([{ session_id: "measure", start_pos: pos, length: 1 }], x);
          fastest = Math.min(fastest, performance.now() - t0);
        }
        this.measured[name] = fastest;
        be.destroy?.();
      } catch (err) {
        this.measured[name] = null;
        this.caps[`${name}_error`] = `${err.name || "Error"}: ${err.message}`;
      }
    }
    const ok = Object.entries(this.measured).filter(([, ms]) => ms != null).sort((a, b) => a[1] - b[1]);
    if (!ok.length) throw new Error(`no compute engine works here: ${JSON.stringify(this.caps)}`);
    this._setBackendCaps(ok[0][0]);
    return [make("measurement", { step_ms: ok[0][1], details: { backend: this.backend_name, tokens, measured_ms: this.measured,
      expansion: EXPANSION[this.backend_name], adapter: this.caps.adapter ?? null } })];
  }

  async on_assign(m) {
    const infos = m.chunks;
    const need = infos.reduce((a, i) => a + i.size, 0) * EXPANSION[this.backend_name];
    if (need > this.memory_budget) {
      return [make("refuse", { reason: "memory", detail: { assignment_id: m.assignment_id, needed: Math.round(need), budget: this.memory_budget } })];
    }
    this._assignments.set(m.assignment_id, m);
    this.progress = { received: 0, total: infos.reduce((a, i) => a + i.size, 0), layer: m.layer_start };
    const out = [];
    for (const info of infos) {
      if (this.blobs.has(info.sha256) || this._assembling.has(info.sha256)) continue;
      if (this.cached.has(info.sha256) && await this._load_cached(info)) continue;
      this._assembling.set(info.sha256, new BlobAssembler(info));
    }
    for (const info of infos) if (this.blobs.has(info.sha256)) this.progress.received += info.size;
    out.push(this._load_progress());
    return out.concat(await this._finish_ready_assignments());
  }

  async _load_cached(info) {
    try {
      const res = await this.cache.match(CACHE_PREFIX + info.sha256);
      if (!res) return false;
      const data = new Uint8Array(await res.arrayBuffer());
      if (data.byteLength !== info.size || (await sha256(data)) !== info.sha256) return false;
      this.blobs.set(info.sha256, data);
      this.bytes_from_cache += data.byteLength;
      return true;
    } catch {
      return false;
    }
  }

  _load_progress() {
    return make("load_progress", { layer: this.progress.layer, received_bytes: this.progress.received, total_bytes: this.progress.total });
  }

  async on_weights_chunk(m) {
    const asm = this._assembling.get(m.blob || "");
    if (!asm) return [make("weights_ack", { chunk_id: m.chunk_id, ok: true })];  // already complete: a resend
    try {
      await asm.add(m.chunk_id, m.offset, m.data, m.sha256);
      this.bytes_received += m.data.byteLength;
      this.progress.received += m.data.byteLength;
      const key = asm.info.key;
      if (key.startsWith("layer:")) this.progress.layer = Number(key.slice(6));
      let out = [make("weights_ack", { chunk_id: m.chunk_id, ok: true, blob: asm.info.sha256 })];
      // progress at a bounded rate, as the Python worker: each completed blob, else every 250 ms
      const now = performance.now();
      if (asm.complete || !(now - this._progress_at < PROGRESS_EVERY_MS)) {
        this._progress_at = now;
        out.push(this._load_progress());
      }
      if (asm.complete) {
        const data = await asm.result();
        this.blobs.set(asm.info.sha256, data);
        this._assembling.delete(asm.info.sha256);
        if (this.cache) {
          try {
            await this.cache.put(CACHE_PREFIX + asm.info.sha256, new Response(data, { headers: { "Content-Type": "application/octet-stream" } }));
            this.cached.add(asm.info.sha256);
          } catch (err) {
            this.cache_error = String(err);  // quota: keep serving from memory
          }
        }
        out = out.concat(await this._finish_ready_assignments());
      }
      return out;
    } catch (err) {
      if (!(err instanceof BlobError)) throw err;
      return [make("weights_ack", { chunk_id: m.chunk_id, ok: false, error: err.message, blob: asm.info.sha256 })];
    }
  }

  async _finish_ready_assignments() {
    const out = [];
    for (const [aid, m] of [...this._assignments]) {
      const shas = m.chunks.map((c) => c.sha256);
      if (!shas.every((s) => this.blobs.has(s))) continue;
      this._assignments.delete(aid);
      const layers = {};
      let head = null;
      for (const s of shas) {
        const b = unpack_blob(this.blobs.get(s));
        if (b.kind === "layer") layers[b.index] = b.weights;
        else head = b.weights;
      }
      const key = `${m.layer_start},${m.layer_end}`;
      const { options, corrections } = this.honour_precision(m.precision || {});
      try {
        this.ranges.set(key, await this.make_backend(this.backend_name, m.model, layers, head, Number(m.max_ctx || m.model.context), options));
      } catch (err) {
        // the device cannot hold it (binding or workgroup limits, out of memory): the planner
        // learns this tab's real limit from the budget
        return out.concat([make("refuse", { reason: "device_limits", detail: { assignment_id: aid, budget: 0,
          error: `${err.name || "Error"}: ${err.message}` } })]);
      }
      this.range_heads.set(key, head !== null);
      this.progress.received = this.progress.total;
      out.push(make("ready", { assignment_id: aid, layers: [m.layer_start, m.layer_end], checksum: await sha256(new TextEncoder().encode(shas.join(""))),
        corrections }));
    }
    return out;
  }

  async on_step(m) {
    const key = `${m.layer_start},${m.layer_end}`;
    const backend = this.ranges.get(key);
    if (!backend) return [make("error", { code: "not_assigned", field: "layer_start", message: `layers [${key}] are not held here`, step_id: m.step_id })];
    const slices = m.sessions.map((s) => ({ session_id: s.session_id, start_pos: Number(s.start_pos), length: Number(s.length) }));
    const t0 = performance.now();
    const H = m.hidden.shape[1];
    const want = Number(m.want_topk || 0);
    const head = this.range_heads.get(key) && want > 0;
    // a speculative step wants the top-k of several last rows of a session (its drafts'): the
    // fused path reads back one row per slice, so those steps take forward + head_topk
    const topkRows = m.sessions.map((s) => Number(s.topk_rows || 1));
    const several = topkRows.some((r) => r !== 1);
    const nRows = topkRows.reduce((a, r, i) => a + Math.max(1, Math.min(r, slices[i].length)), 0);
    let out, top;
    try {
      if (head && backend.forward_topk && !several) {
        top = await backend.forward_topk(slices, m.hidden.data, want);  // one encoder, one readback
      } else {
        out = await backend.forward(slices, m.hidden.data);
      }
    } catch (err) {
      if (!(err instanceof RangeError)) throw err;
      return [make("error", { code: "bad_step", field: "sessions", message: err.message, step_id: m.step_id })];
    }
    const reply = make("step_result", { step_id: m.step_id, epoch: m.epoch });
    if (head) {
      if (!top) {
        const ends = new Float32Array(nRows * H);
        let end = 0, row = 0;
        slices.forEach((s, i) => {
          end += s.length;
          for (let r = end - Math.max(1, Math.min(topkRows[i], s.length)); r < end; r++, row++) ends.set(out.subarray(r * H, r * H + H), row * H);
        });
        top = await backend.head_topk(ends, want);
      }
      const { ids, values } = top;
      const k = ids.length / nRows;
      reply.output = new Tensor("f32", [0, H], new Float32Array(0));
      reply.topk_ids = new Tensor("i32", [nRows, k], ids);
      reply.topk_logits = new Tensor("f32", [nRows, k], values);
      this.tokens_served += nRows;
    } else {
      reply.output = new Tensor("f32", [out.length / H, H], out);
    }
    reply.compute_ms = performance.now() - t0;
    this.steps_served += 1;
    return [reply];
  }

  on_drop_session(m) {
    for (const b of this.ranges.values()) b.drop_session(m.session_id);
  }

  on_truncate_session(m) {
    for (const b of this.ranges.values()) b.truncate_session(m.session_id, Number(m.length));
  }

  on_fork_session(m) {
    for (const b of this.ranges.values()) if (b.sessions().includes(m.source_id)) b.fork_session(m.source_id, m.session_id, Number(m.length));
  }

  // the session's KV of a range held here, from the wider range held here that has it (a
  // backend, and a KV cache, per range): answered either way, so that the coordinator replays
  // what was not copied (the same step as tab_worker/worker.py's on_copy_kv)
  async on_copy_kv(m) {
    const [from, to, start, end, length] = [m.source_start, m.source_end, m.layer_start, m.layer_end, m.length].map(Number);
    const reply = { session_id: m.session_id, layer_start: start, layer_end: end, length };
    const source = this.ranges.get(`${from},${to}`), target = this.ranges.get(`${start},${end}`);
    try {
      if (!source || !target) throw new RangeError(`layers [${from},${to}] and [${start},${end}] are not both held here`);
      if (start < from || end > to || start >= end) throw new RangeError(`layers [${start}, ${end}) are not within [${from}, ${to})`);
      const { k, v } = await source.export_kv(m.session_id, start, end, length);
      target.import_kv(m.session_id, k, v, length);
    } catch (err) {
      return [make("kv_copied", { ...reply, ok: false, error: String(err.message ?? err).slice(0, 4000) })];
    }
    return [make("kv_copied", { ...reply, ok: true })];
  }

  on_unload(m) {
    if ("layer_start" in m) {
      const key = `${m.layer_start},${m.layer_end}`;
      this.ranges.get(key)?.destroy?.();
      this.ranges.delete(key);
    } else {
      for (const b of this.ranges.values()) b.destroy?.();
      this.ranges.clear();
    }
  }

  stats() {
    return {
      worker_id: this.worker_id, backend: this.backend_name, measured_ms: this.measured, steps: this.steps_served,
      tokens: this.tokens_served, bytes_received: this.bytes_received, bytes_from_cache: this.bytes_from_cache,
      ranges: [...this.ranges.keys()].map((k) => k.split(",").map(Number)), heads: [...this.range_heads.values()].some(Boolean),
      progress: this.progress, memory_bytes: this.memory_budget, adapter: this.gpu ? this.caps?.adapter ?? null : null,
      device_losses: this.device_losses || 0,
      gpu_error: this.gpu_error, cached_blobs: this.cached.size, heartbeat_ms: this.heartbeat_ms,
    };
  }
}

// A layer of the model's shape, packed a4g32 (the format of SmolLM2's layers), with
// deterministic pseudo-random codes: the speed measurement times it; its values do not matter.
export function synthetic_layer(cfg) {
  let seed = 12345;
  const rnd = () => (seed = (Math.imul(seed, 1664525) + 1013904223) >>> 0);
  const mat = (n, k) => {
    const groups = Math.ceil(k / 32), q = new Uint32Array(n * groups * 4), s = new Uint32Array(n * groups);
    for (let i = 0; i < q.length; i++) q[i] = rnd();
    s.fill((0xaccd << 16) | 0x211f);  // f16 min -0.075, scale 0.01: w in [-0.075, 0.075]
    return { spec: { name: "a4g32", bits: 4, group: 32, symmetric: false }, n, k, q, s };
  };
  const qd = cfg.n_heads * cfg.head_dim, kv = cfg.n_kv_heads * cfg.head_dim;
  return {
    attn_norm: new Float32Array(cfg.hidden).fill(1), ffn_norm: new Float32Array(cfg.hidden).fill(1),
    wq: mat(qd, cfg.hidden), wk: mat(kv, cfg.hidden), wv: mat(kv, cfg.hidden), wo: mat(cfg.hidden, qd),
    w_gate: mat(cfg.ffn, cfg.hidden), w_up: mat(cfg.ffn, cfg.hidden), w_down: mat(cfg.hidden, cfg.ffn),
  };
}
