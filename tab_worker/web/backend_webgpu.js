// The WebGPU backend of a browser tab, on its device (webgpu_device.js), as
// tab_worker/wgpu_backend.py is the native one.
//
// Pipelines are created once, asynchronously, at load (only those the held layers need); a
// step records every layer (and the head, for the last stage: forward_topk, as the native
// backend's) into ONE command encoder and reads back once. On a real GPU, decode-sized steps
// (up to FUSE_MAX_ROWS rows) run the native decode path's fused kernels (norm + q/k/v, rope +
// KV store + attention, wo, norm + gate/up, silu + down: 5 dispatches a layer, the head's norm
// folded into its matvec); longer ones (prefill, replay) and every step on a CPU rasteriser
// the unfused 10, as wgpu_backend.py: the fused matvecs redo the norm per workgroup and silu
// per output row, which a CPU rasteriser pays in full (benchmarks/bench_browser.py measures
// both).

import { checkKv } from "./backend_cpu.js";
import { ByRows, FUSE_MAX_ROWS, Launch, LimitError, ProgramKernel, QuantLinear, TOPK_SLOTS, WebGpuDevice, evaluate, kernelConstants, programNames, ropeFreqTurns, round4, uploadQuant } from "./webgpu_device.js";

// ====================================================================== backend
export class WebGpuBackend {
  // fuseMaxRows: steps of up to this many rows run the fused kernels (0: never); by default
  // FUSE_MAX_ROWS on a real GPU, 0 on a CPU rasteriser
  // kvSplits: split-K attention's key runs per row (default: the layer program's kv_splits rule)
  constructor(gpu, config, layers, head, maxCtx, fuseMaxRows = undefined, kvSplits = undefined) {
    this.name = "webgpu";
    this.dev = gpu;
    this.kvSplitsWanted = kvSplits;
    this.kvSplits = 1;
    this._attnParts = null;
    this.fuseMaxRows = fuseMaxRows ?? (gpu.isRealGpu() ? FUSE_MAX_ROWS : 0);
    this.config = config;
    this.layerIds = Object.keys(layers).map(Number).sort((a, b) => a - b);
    this.maxCtx = maxCtx;
    this._weights = { layers, head };
    const c = config;
    this.qDim = c.n_heads * c.head_dim;
    this.kvDim = c.n_kv_heads * c.head_dim;
    this.strides = { h: round4(c.hidden), xn: round4(c.hidden), qkv: round4(this.qDim + 2 * this.kvDim), attn: round4(this.qDim),
      gate_up: round4(2 * c.ffn), act: round4(c.ffn) };
    this.logitsStride = round4(c.vocab);
    const widest = Math.max(...Object.values(this.strides)) * 4;
    this.maxRows = Math.min(Math.floor(gpu.maxBinding / widest), gpu.limits.maxComputeWorkgroupsPerDimension);
    this.headMaxRows = Math.min(this.maxRows, Math.floor(gpu.maxBinding / (this.logitsStride * 4)));
    this.positionBytes = c.n_kv_heads * c.head_dim * 4;
    this.siluFusable = c.ffn % 4 === 0;  // qmatvec_silu reads the up half as vec4
    this._slots = new Map();
    this._lengths = new Map();
    this.poolSlots = 0;
    this.poolCtx = 0;
    this._pools = [];
    this.rowsCap = 0;
    this.buf = {};
    this._layerOps = null;
    this._headOps = null;
  }

  // Uploads the weights and creates every pipeline the held layers and head need, at once.
  async init() {
    const dev = this.dev, c = this.config, { layers, head } = this._weights;
    const fused = (ts) => {  // q/k/v (gate/up) as one matrix when their formats agree
      const f = ts[0];
      if (ts.every((t) => t.spec.name === f.spec.name && t.k === f.k)) {
        const cat = (key) => { const out = new Uint32Array(ts.reduce((a, t) => a + t[key].length, 0)); let o = 0; for (const t of ts) { out.set(t[key], o); o += t[key].length; } return out; };
        return [[{ spec: f.spec, n: ts.reduce((a, t) => a + t.n, 0), k: f.k, q: cat("q"), s: cat("s") }, 0]];
      }
      let col = 0;
      return ts.map((t) => { const r = [t, col]; col += t.n; return r; });
    };
    this._layers = this.layerIds.map((i) => {
      const w = layers[i];
      return {
        attn_norm: dev.upload(w.attn_norm, `layer${i}.attn_norm`), ffn_norm: dev.upload(w.ffn_norm, `layer${i}.ffn_norm`),
        qkv: fused([w.wq, w.wk, w.wv]).map(([t, col]) => [uploadQuant(dev, t, `layer${i}.qkv`), col]),
        gate_up: fused([w.w_gate, w.w_up]).map(([t, col]) => [uploadQuant(dev, t, `layer${i}.gate_up`), col]),
        wo: uploadQuant(dev, w.wo, `layer${i}.wo`), w_down: uploadQuant(dev, w.w_down, `layer${i}.w_down`),
      };
    });
    this._head = head ? { norm: dev.upload(head.output_norm, "output_norm"), output: uploadQuant(dev, head.output, "output") } : null;
    this._weights = null;  // the blobs stay with the worker; the device holds its own copy
    this._freqTurns = dev.upload(ropeFreqTurns(c.head_dim, c.rope_base), "rope.freq_turns");
    if (this.maxRows < 1 || (this._head && this.headMaxRows < 1)) throw new LimitError(`one row of activations does not fit the binding limit ${dev.maxBinding}`);
    this.program = await dev.layerProgram();
    await dev.prepare(this.pipelineList());
  }

  // Every pipeline the held layers and head will use, from the layer program: its kernel ops'
  // overrides, and each linear's matvec at 1 row (decode: the fused kernel where this backend
  // fuses) and 8 (prefill / replay chunks). A step of 2-4 rows prepares its ROWS=4 variants
  // when it comes.
  pipelineList() {
    const dev = this.dev, list = [], fuse = this.fuseMaxRows > 0;
    const env = programNames(this.program, this.config, 0);
    const weights = (L) => ({ qkv: L.qkv.map(([q]) => q), gate_up: L.gate_up.map(([q]) => q), wo: [L.wo], w_down: [L.w_down] });
    const walk = (ops, w, rows) => {
      for (const op of ops) {
        if (op.op === "kernel") list.push([op.kernel, kernelConstants(dev, op, env)]);
        else if (op.op === "linear") {
          for (const m of w[op.weight]) {
            const ql = new QuantLinear(dev, m, null, 0, null, 0, 0, false, op.norm ? { norm: [null, 0] } : op.silu_up_col !== undefined ? { siluUpCol: 4 } : {});
            for (const r of rows) list.push(...ql.pipelinesFor(r));
          }
        } else if (op.op === "when") walk(evaluate(op.if, env) ? op.then : op.else, w, rows);
        else if (op.op !== "by_rows") throw new Error(`layer program: unknown op ${op.op}`);
        else if (fuse && evaluate(op.fusable ?? 1, env)) { walk(op.fused, w, [1]); walk(op.plain, w, [8]); }
        else walk(op.plain, w, [1, 8]);
      }
    };
    for (const L of this._layers) walk(this.program.layer, weights(L), [1, 8]);
    if (this._head) {
      list.push(["topk", { WG: dev.workgroupSize(dev.isRealGpu() ? 1024 : 256), KP: TOPK_SLOTS }]);
      walk(this.program.head, { output: [this._head.output] }, [1]);
    }
    const seen = new Set();
    return list.filter(([k, cst]) => { const key = WebGpuDevice.key(k, cst); if (seen.has(key)) return false; seen.add(key); return true; });
  }

  destroy() {
    for (const b of Object.values(this.buf)) b.destroy?.();
    this._attnParts?.destroy();
    for (const [k, v] of this._pools) { k.destroy(); v.destroy(); }
  }

  // ------------------------------------------------------------------ sessions
  sessions() { return [...this._lengths.keys()]; }
  session_length(id) { return this._lengths.get(id) ?? 0; }
  drop_session(id) { this._lengths.delete(id); this._slots.delete(id); }
  // keep positions [0, length): a speculative step's rejected drafts go (longer: no-op)
  truncate_session(id, length) { if (this._lengths.has(id)) this._lengths.set(id, Math.min(this._lengths.get(id), Math.max(0, length))); }

  fork_session(src, dst, length) {
    if (length > (this._lengths.get(src) ?? 0)) throw new Error(`session ${src} cannot fork ${length} positions`);
    this._assignSlots([{ session_id: dst, start_pos: 0, length }]);
    const nKv = this.config.n_kv_heads, from = this._slots.get(src), to = this._slots.get(dst);
    const run = length * this.positionBytes / nKv;  // one kv head's keys (or values) over the forked positions
    if (run && this._pools.length) {
      // through a scratch buffer: WebGPU copies nothing from a buffer into itself (a validation
      // error); copies in one encoder run in order, so one scratch serves every pool in turn
      const scratch = this.dev.buffer(nKv * run, "fork.scratch");
      const off = (slot, h) => ((slot * nKv + h) * this.poolCtx) * this.positionBytes / nKv;
      const enc = this.dev.device.createCommandEncoder();
      for (const pool of this._pools) {
        for (const buf of pool) {
          for (let h = 0; h < nKv; h++) enc.copyBufferToBuffer(buf, off(from, h), scratch, h * run, run);
          for (let h = 0; h < nKv; h++) enc.copyBufferToBuffer(scratch, h * run, buf, off(to, h), run);
        }
      }
      this.dev.queue.submit([enc.finish()]);
      scratch.destroy();  // after submit: destroy waits for queued use
    }
    this._lengths.set(dst, length);
  }

  // As CpuBackend.export_kv: each layer's slot copied into a buffer read back once
  async export_kv(id, layerStart, layerEnd, length) {
    const held = this._lengths.get(id) ?? 0;
    if (length > held) throw new RangeError(`session ${id} holds ${held} positions, cannot copy ${length}`);
    const nKv = this.config.n_kv_heads, lo = layerStart - this.layerIds[0], n = layerEnd - layerStart;
    const run = length * this.positionBytes / nKv, floats = run / 4;  // one kv head's keys (or values) over the positions
    const k = new Float32Array(n * nKv * floats), v = new Float32Array(k.length);
    if (!run) return { k, v };
    const slot = this._slots.get(id), off = (h) => (slot * nKv + h) * this.poolCtx * this.positionBytes / nKv;
    const staging = this.dev.device.createBuffer({ size: 2 * n * nKv * run, usage: GPUBufferUsage.MAP_READ | GPUBufferUsage.COPY_DST, label: "copy_kv.readback" });
    const enc = this.dev.device.createCommandEncoder();
    for (let l = 0; l < n; l++) {
      this._pools[lo + l].forEach((buf, j) => { for (let h = 0; h < nKv; h++) enc.copyBufferToBuffer(buf, off(h), staging, ((l * 2 + j) * nKv + h) * run, run); });
    }
    this.dev.queue.submit([enc.finish()]);
    await staging.mapAsync(GPUMapMode.READ);
    const all = new Float32Array(staging.getMappedRange().slice(0));
    staging.destroy();
    if (this.dev.lost) throw new Error(`the WebGPU device was lost: ${this.dev.lost}`);
    for (let l = 0; l < n; l++) {
      for (let h = 0; h < nKv; h++) {
        const to = (l * nKv + h) * floats;
        k.set(all.subarray(((l * 2) * nKv + h) * floats, ((l * 2) * nKv + h + 1) * floats), to);
        v.set(all.subarray(((l * 2 + 1) * nKv + h) * floats, ((l * 2 + 1) * nKv + h + 1) * floats), to);
      }
    }
    return { k, v };
  }

  // As CpuBackend.import_kv: written into the session's slot, each (layer, kv head) run where the kernels read it
  import_kv(id, k, v, length) {
    const nKv = this.config.n_kv_heads, floats = length * this.config.head_dim;
    checkKv(k, v, this._layers.length * nKv * floats, length, this.maxCtx);
    this.drop_session(id);
    const sl = [{ session_id: id, start_pos: 0, length }];
    this._check(sl);
    this._assignSlots(sl);
    const slot = this._slots.get(id), run = this.poolCtx * this.positionBytes / nKv;
    this._pools.forEach(([kPool, vPool], l) => {
      for (let h = 0; h < nKv; h++) {
        const from = (l * nKv + h) * floats;
        this.dev.write(kPool, k.subarray(from, from + floats), (slot * nKv + h) * run);
        this.dev.write(vPool, v.subarray(from, from + floats), (slot * nKv + h) * run);
      }
    });
    this._lengths.set(id, length);
  }

  _check(slices) {
    const seen = new Set();
    for (const sl of slices) {
      if (seen.has(sl.session_id)) throw new RangeError(`session ${sl.session_id} appears twice in one batch`);
      seen.add(sl.session_id);
      const end = sl.start_pos + sl.length;
      if (end > this.maxCtx) throw new RangeError(`session ${sl.session_id}: position ${end} exceeds the context of ${this.maxCtx}`);
      if (!this._lengths.has(sl.session_id)) {
        if (sl.start_pos !== 0) throw new RangeError(`session ${sl.session_id} is unknown here and starts at ${sl.start_pos}, not 0`);
      } else if (sl.start_pos > this._lengths.get(sl.session_id)) {
        throw new RangeError(`session ${sl.session_id}: start ${sl.start_pos} leaves a gap after length ${this._lengths.get(sl.session_id)}`);
      }
    }
    if (this._layers.length) {
      const [slots, ctx] = this._poolShapeFor(slices);
      if (slots * ctx * this.positionBytes > this.dev.maxBinding) {
        throw new RangeError(`${slots} sessions of up to ${ctx} positions need more KV memory per layer than one binding holds (${this.dev.maxBinding} bytes)`);
      }
    }
  }

  _poolShapeFor(slices) {
    const fresh = slices.filter((s) => !this._slots.has(s.session_id)).length;
    const slots = Math.max(this.poolSlots, this._slots.size + fresh);
    const longest = Math.max(...slices.map((s) => s.start_pos + s.length), this.poolCtx, 1);
    const ctx = longest <= this.poolCtx ? this.poolCtx : Math.min(this.maxCtx, 2 ** Math.ceil(Math.log2(longest)));
    return [slots, Math.max(ctx, Math.min(this.maxCtx, 16))];
  }

  _assignSlots(slices) {
    const [needSlots, needCtx] = this._layers.length ? this._poolShapeFor(slices) : [0, 0];
    for (const sl of slices) {
      if (!this._slots.has(sl.session_id)) {
        const used = new Set(this._slots.values());
        let s = 0;
        while (used.has(s)) s++;
        this._slots.set(sl.session_id, s);
      }
    }
    if (needSlots > this.poolSlots || needCtx > this.poolCtx) this._growPools(needSlots, needCtx);
  }

  _growPools(needSlots, ctx) {
    const perSlot = this.positionBytes * ctx;
    let slots = this.poolSlots;
    if (needSlots > slots) slots = Math.max(needSlots, Math.min(2 * slots, Math.floor(this.dev.maxBinding / perSlot)));
    const nKv = this.config.n_kv_heads, run = this.poolCtx * this.positionBytes / nKv;
    const enc = this.dev.device.createCommandEncoder();
    const pools = [];
    this._layers.forEach((_, li) => {
      const old = this._pools[li];
      const fresh = [this.dev.buffer(slots * perSlot, `layer${li}.k_pool`), this.dev.buffer(slots * perSlot, `layer${li}.v_pool`)];
      if (old) {
        old.forEach((ob, j) => {
          if (ctx === this.poolCtx) enc.copyBufferToBuffer(ob, 0, fresh[j], 0, ob.size);
          else for (let row = 0; row < this.poolSlots * nKv; row++) if (run) enc.copyBufferToBuffer(ob, row * run, fresh[j], row * run * ctx / this.poolCtx, run);
        });
      }
      pools.push(fresh);
    });
    this.dev.queue.submit([enc.finish()]);
    for (const [k, v] of this._pools) { k.destroy(); v.destroy(); }  // after submit: destroy waits for queued use
    this._pools = pools;
    this.poolSlots = slots;
    this.poolCtx = ctx;
    this._layerOps = null;
  }

  // ------------------------------------------------------------------ scratch and ops
  _ensureRows(rows) {
    if (rows <= this.rowsCap) return;
    const cap = Math.min(this.maxRows, Math.max(rows, 2 * this.rowsCap, 8));
    for (const b of Object.values(this.buf)) b.destroy();
    this.buf = {};
    for (const [name, stride] of Object.entries(this.strides)) this.buf[name] = this.dev.buffer(cap * stride * 4, name);
    this.buf.positions = this.dev.buffer(cap * 4, "positions");
    this.buf.slots = this.dev.buffer(cap * 4, "slots");
    if (this._head) {
      const headCap = Math.min(cap, this.headMaxRows);
      this.buf.head_in = this.dev.buffer(headCap * this.strides.h * 4, "head_in");
      this.buf.logits = this.dev.buffer(headCap * this.logitsStride * 4, "logits");
      this.buf.topk_values = this.dev.buffer(headCap * TOPK_SLOTS * 4, "topk.values");
      this.buf.topk_ids = this.dev.buffer(headCap * TOPK_SLOTS * 4, "topk.ids");
    }
    this.buf.readback = this.dev.device.createBuffer({ size: Math.max(cap * this.strides.h * 4, 2 * Math.min(cap, this.headMaxRows) * TOPK_SLOTS * 4),
      usage: GPUBufferUsage.MAP_READ | GPUBufferUsage.COPY_DST, label: "readback" });
    this.rowsCap = cap;
    this._layerOps = null;
    this._headOps = null;
  }

  _linear(w, x, y, yCol = 0, accumulate = false, prologue = {}) {
    return new QuantLinear(this.dev, w, this.buf[x], this.strides[x], this.buf[y], this.strides[y], yCol, accumulate, prologue);
  }

  // Every held layer's ops, from the layer program (kernels/layer_program.py, as the native
  // backend's _build_layer_ops); split-K attention's partials fit one binding (fewer splits if not)
  _buildLayerOps() {
    const c = this.config, env = programNames(this.program, c, this.poolCtx, 0, this.dev.isRealGpu(), this.kvSplitsWanted);
    const perSplit = 16 * (c.head_dim / 4 + 1) * c.n_heads * this.rowsCap;
    this.kvSplits = Math.max(1, Math.min(env.kv_splits, Math.floor(this.dev.maxBinding / perSplit)));
    const need = this.kvSplits > 1 ? perSplit * this.kvSplits : 16;  // attention binds them even unsplit
    if (!this._attnParts || this._attnParts.size < need) {
      this._attnParts?.destroy();
      this._attnParts = this.dev.buffer(need, "attention.parts");
    }
    return this._layers.flatMap((L, li) => {
      const [kPool, vPool] = this._pools[li];
      return this._programOps(this.program.layer, { ...this.buf, freq_turns: this._freqTurns, attn_norm: L.attn_norm, ffn_norm: L.ffn_norm,
        k_pool: kPool, v_pool: vPool, attn_parts: this._attnParts }, { qkv: L.qkv, gate_up: L.gate_up, wo: [[L.wo, 0]], w_down: [[L.w_down, 0]] });
    });
  }

  // The launchers of a layer program section on these buffers and weights (name -> [[matrix, first column]])
  _programOps(program, buffers, weights) {
    const dev = this.dev, env = programNames(this.program, this.config, this.poolCtx, 0, dev.isRealGpu(), this.kvSplits);
    const strides = { ...this.strides, src: this.strides.h, head_in: this.strides.h, logits: this.logitsStride };
    const build = (op) => {
      if (op.op === "kernel") return [new ProgramKernel(dev, op, env, buffers)];
      if (op.op === "linear") {
        const prologue = op.norm ? { norm: [buffers[op.norm], this.config.rms_eps] } : op.silu_up_col !== undefined ? { siluUpCol: evaluate(op.silu_up_col, env) } : {};
        return weights[op.weight].map(([w, col]) => new QuantLinear(dev, w, buffers[op.x], strides[op.x], buffers[op.y], strides[op.y], col, op.accumulate, prologue));
      }
      if (op.op === "by_rows") {
        const plain = op.plain.flatMap(build);
        if (!this.fuseMaxRows || !evaluate(op.fusable ?? 1, env)) return plain;
        return [new ByRows(this.fuseMaxRows, op.fused.flatMap(build), plain)];
      }
      if (op.op === "when") return (evaluate(op.if, env) ? op.then : op.else).flatMap(build);
      throw new Error(`layer program: unknown op ${op.op}`);
    };
    return program.flatMap(build);
  }

  _buildHeadOps() {
    const ops = this._programOps(this.program.head, { ...this.buf, src: this.buf.head_in, output_norm: this._head.norm }, { output: [[this._head.output, 0]] });
    return { pipelinesFor: (rows) => ops.flatMap((op) => op.pipelinesFor(rows)), record: (pass, rows) => { for (const op of ops) op.record(pass, rows); } };
  }

  _topk(k) {
    const c = this.config, dev = this.dev, b = this.buf;
    const launch = new Launch(dev, "topk", { WG: dev.workgroupSize(dev.isRealGpu() ? 1024 : 256), KP: TOPK_SLOTS }, [b.logits, b.topk_values, b.topk_ids],
      { count: c.vocab, in_stride: this.logitsStride, k, out_stride: k });
    return { record: (pass, rows) => launch.dispatch(pass, rows) };
  }

  // ------------------------------------------------------------------ compute
  _writeInputs(hidden, rows, positions, slots) {
    const H = this.config.hidden, stride = this.strides.h;
    let data = hidden;
    if (stride !== H) { data = new Float32Array(rows * stride); for (let r = 0; r < rows; r++) data.set(hidden.subarray(r * H, r * H + H), r * stride); }
    this.dev.write(this.buf.h, data);
    if (positions) { this.dev.write(this.buf.positions, positions); this.dev.write(this.buf.slots, slots); }
  }

  async _readback(bytes) {
    const rb = this.buf.readback;
    await rb.mapAsync(GPUMapMode.READ, 0, bytes);
    const out = rb.getMappedRange(0, bytes).slice(0);
    rb.unmap();
    if (this.dev.lost) throw new Error(`the WebGPU device was lost: ${this.dev.lost}`);
    return out;
  }

  async forward(slices, hidden) {
    return (await this.forward_topk(slices, hidden, 0)).output;
  }

  // The whole step in one encoder and one readback: every held layer, then (k > 0) the head
  // and top-k of each session's last row. -> {output (k == 0) | ids, values (k > 0)}
  async forward_topk(slices, hidden, k) {
    const c = this.config, H = c.hidden;
    const total = slices.reduce((a, s) => a + s.length, 0);
    if (hidden.length !== total * H) throw new RangeError(`hidden has ${hidden.length} floats; expected ${total} x ${H}`);
    if (k && !this._head) throw new Error("this backend holds no head");
    if (k > TOPK_SLOTS) throw new RangeError(`k must be in [1, ${TOPK_SLOTS}], got ${k}`);
    this._check(slices);
    this._assignSlots(slices);
    const positions = new Uint32Array(total), slots = new Uint32Array(total);
    let r = 0;
    for (const s of slices) for (let i = 0; i < s.length; i++, r++) { positions[r] = s.start_pos + i; slots[r] = this._slots.get(s.session_id); }
    if (total > this.maxRows || (k && slices.length > this.headMaxRows)) throw new RangeError(`a step of ${total} rows exceeds this device's ${this.maxRows}`);
    this._ensureRows(total);
    if (this._layers.length && !this._layerOps) this._layerOps = this._buildLayerOps();
    const ops = this._layers.length ? this._layerOps : [];
    const headRows = slices.length;
    if (k) {
      if (!this._headOps) this._headOps = this._buildHeadOps();
      await this.dev.prepare(this._headOps.pipelinesFor(headRows));  // a batch of sessions: its ROWS variant, once
    }
    await this.dev.prepare(ops.flatMap((op) => op.pipelinesFor(total)));  // no-ops once created at init
    this._writeInputs(hidden, total, positions, slots);
    const enc = this.dev.device.createCommandEncoder();
    let pass = enc.beginComputePass();
    for (const op of ops) op.record(pass, total);
    pass.end();
    const rowBytes = this.strides.h * 4;
    let bytes;
    if (k) {
      let end = -1;
      slices.forEach((s, i) => { end += s.length; enc.copyBufferToBuffer(this.buf.h, end * rowBytes, this.buf.head_in, i * rowBytes, rowBytes); });
      pass = enc.beginComputePass();
      this._headOps.record(pass, headRows);
      this._topk(k).record(pass, headRows);
      pass.end();
      bytes = headRows * k * 4;
      enc.copyBufferToBuffer(this.buf.topk_values, 0, this.buf.readback, 0, Math.ceil(bytes / 4) * 4);
      enc.copyBufferToBuffer(this.buf.topk_ids, 0, this.buf.readback, bytes, Math.ceil(bytes / 4) * 4);
      bytes *= 2;
    } else {
      bytes = total * rowBytes;
      enc.copyBufferToBuffer(this.buf.h, 0, this.buf.readback, 0, bytes);
    }
    this.dev.queue.submit([enc.finish()]);
    for (const s of slices) this._lengths.set(s.session_id, s.start_pos + s.length);
    const data = await this._readback(bytes);
    if (k) {
      const n = headRows * k;
      return { values: new Float32Array(data, 0, n).slice(), ids: new Int32Array(data, n * 4, n).slice() };
    }
    const out = new Float32Array(total * H), f = new Float32Array(data);
    for (let i = 0; i < total; i++) out.set(f.subarray(i * this.strides.h, i * this.strides.h + H), i * H);
    return { output: out };
  }

  // the head alone on given rows (benchmarks, tests); a step uses forward_topk
  async head_topk(rows, k) {
    const n = rows.length / this.config.hidden;
    const saved = this._layers;
    this._layers = [];
    try {
      return await this.forward_topk(Array.from({ length: n }, (_, i) => ({ session_id: `__head${i}`, start_pos: 0, length: 1 })), rows, k);
    } finally {
      this._layers = saved;
      for (let i = 0; i < n; i++) this.drop_session(`__head${i}`);
    }
  }
}
