// The WebGPU device of a browser tab and what it launches (as kernels/runner.py and
// kernels/launchers.py do natively): the very kernels/*.wgsl files the native path runs, fetched
// from the coordinator's /kernels/NAME.wgsl; params uniform at binding 0 then the storage
// buffers in binding order, the Params fields parsed from the WGSL, override constants chosen
// from the adapter's limits, qmatvec's ROWS variants; the layer program's expressions evaluated
// as kernels/layer_program.py does.

const SOFTWARE_ADAPTERS = ["llvmpipe", "lavapipe", "swiftshader", "softpipe", "microsoft basic render"];
const LIMIT_KEYS = ["maxBufferSize", "maxStorageBufferBindingSize", "maxUniformBufferBindingSize",
  "maxComputeWorkgroupStorageSize", "maxComputeInvocationsPerWorkgroup", "maxComputeWorkgroupSizeX",
  "maxComputeWorkgroupSizeY", "maxComputeWorkgroupSizeZ", "maxComputeWorkgroupsPerDimension",
  "maxStorageBuffersPerShaderStage", "minStorageBufferOffsetAlignment", "minUniformBufferOffsetAlignment"];
export const MATVEC_ROWS = [1, 4, 8];
export const TOPK_SLOTS = 64;  // one topk pipeline (KP = 64) serves every k <= 64
export const FUSE_MAX_ROWS = 16;  // wgpu_backend.FUSE_MAX_ROWS: batches up to this many rows use the fused kernels
const SUBMIT_EVERY = 0;  // one command buffer per step

export class LimitError extends RangeError {}

// ====================================================================== device
export class WebGpuDevice {
  static async create(limitsMode = "adapter", base = "") {
    if (!navigator.gpu) throw new Error("navigator.gpu is missing");
    const adapter = await navigator.gpu.requestAdapter({ powerPreference: "high-performance" });
    if (!adapter) throw new Error("requestAdapter() returned null (no usable GPU or WebGPU disabled)");
    // "adapter": the adapter's best values of the limits the kernels plan with; "default":
    // none requested, i.e. the spec's defaults, as any conformant browser grants (Safari, phones)
    const requiredLimits = {};
    if (limitsMode !== "default") for (const k of LIMIT_KEYS) if (!k.startsWith("min")) requiredLimits[k] = adapter.limits[k];
    // subgroups wherever the adapter has them, for the K+subgroup kernels (runner.Device likewise)
    const requiredFeatures = adapter.features.has("subgroups") ? ["subgroups"] : [];
    const device = await adapter.requestDevice({ requiredLimits, requiredFeatures });
    const gpu = new WebGpuDevice(adapter, device, limitsMode, base);
    // a probe that fails (a driver or compiler that offers subgroups but will not build it) leaves
    // the plain kernels, as no subgroups would: the tab still serves
    gpu._subgroupSize = requiredFeatures.length ? await gpu.probeSubgroups().catch((e) => {
      console.warn(`subgroup probe failed, plain kernels: ${e}`);
      return 0;
    }) : 0;
    return gpu;
  }

  constructor(adapter, device, limitsMode, base) {
    this.adapter = adapter;
    this.device = device;
    this.queue = device.queue;
    this.limitsMode = limitsMode;
    this.base = base;
    this.limits = {};
    for (const k of LIMIT_KEYS) this.limits[k] = device.limits[k];
    this.features = [...device.features].sort();
    this.adapterFeatures = [...adapter.features].sort();
    const info = adapter.info || {};
    this.info = {
      vendor: info.vendor || "", architecture: info.architecture || "", device: info.device || "", description: info.description || "",
      is_fallback: !!(info.isFallbackAdapter ?? adapter.isFallbackAdapter),
    };
    this._sources = new Map();
    this._modules = new Map();
    this._pipelines = new Map();
    this._params = new Map();
    this.lost = null;
    this.dispatches = 0;  // dispatches recorded so far (tests count a step's)
    device.lost.then((l) => { this.lost = `${l.reason}: ${l.message}`; });
  }

  isRealGpu() {
    const text = `${this.info.vendor} ${this.info.architecture} ${this.info.device} ${this.info.description}`.toLowerCase();
    return !this.info.is_fallback && !SOFTWARE_ADAPTERS.some((s) => text.includes(s));
  }

  describe() {
    const i = this.info;
    return {
      adapter: [i.description || i.device || i.architecture || "?", i.vendor && `(${i.vendor}${i.architecture ? ` ${i.architecture}` : ""})`].filter(Boolean).join(" "),
      adapter_info: i, is_fallback: i.is_fallback, is_real_gpu: this.isRealGpu(), features: this.features,
      adapter_features: this.adapterFeatures, limits: this.limits, limits_mode: this.limitsMode,
      f16: this.adapterFeatures.includes("shader-f16"), subgroups: this.adapterFeatures.includes("subgroups"),
      subgroup_size: this.subgroupSize(),
    };
  }

  // The same device, planning with at most `cap` invocations per workgroup (a coordinator
  // setting); pipelines and buffers are shared with this one.
  withWorkgroupCap(cap) {
    const limits = { ...this.limits, maxComputeInvocationsPerWorkgroup: Math.min(cap, this.limits.maxComputeInvocationsPerWorkgroup),
      maxComputeWorkgroupSizeX: Math.min(cap, this.limits.maxComputeWorkgroupSizeX) };
    return Object.create(this, { limits: { value: limits } });
  }

  get maxBinding() { return Math.min(this.limits.maxStorageBufferBindingSize, this.limits.maxBufferSize); }

  workgroupSize(preferred) {
    const cap = Math.min(preferred, this.limits.maxComputeInvocationsPerWorkgroup, this.limits.maxComputeWorkgroupSizeX);
    return 2 ** Math.floor(Math.log2(cap));
  }

  // runner.Device.subgroup_size: lanes of a subgroup that the K+subgroup kernels may count on, 0
  // where they cannot run (no subgroups, or subgroups that are not runs of consecutive invocations
  // of one size); probed once, at create
  subgroupSize() { return this._subgroupSize ?? 0; }

  // runner.Device._probe_subgroups, with the same probe (kernels/probes/subgroup_size.wgsl)
  async probeSubgroups() {
    const wg = this.workgroupSize(1024);
    const module = this.device.createShaderModule({ code: await this.source("probes/subgroup_size"), label: "subgroup_probe" });
    const pipe = await this.device.createComputePipelineAsync({ layout: "auto", label: "subgroup_probe",
      compute: { module, entryPoint: "main", constants: { WG: wg } } });
    const out = this.buffer(8 * wg, "subgroup_probe");
    const read = this.device.createBuffer({ size: out.size, usage: GPUBufferUsage.MAP_READ | GPUBufferUsage.COPY_DST });
    const enc = this.device.createCommandEncoder();
    const pass = enc.beginComputePass();
    pass.setPipeline(pipe);
    pass.setBindGroup(0, this.bindGroup(pipe, [out]));
    pass.dispatchWorkgroups(1);
    pass.end();
    enc.copyBufferToBuffer(out, 0, read, 0, out.size);
    this.queue.submit([enc.finish()]);
    await read.mapAsync(GPUMapMode.READ);
    const words = new Uint32Array(read.getMappedRange().slice(0, 8 * wg));
    read.unmap();
    read.destroy();
    out.destroy();
    const sg = words[1];
    for (let t = 0; t < wg; t++) if (words[2 * t + 1] !== sg || words[2 * t] !== t % sg) return 0;
    return sg >= 1 && (sg & (sg - 1)) === 0 ? sg : 0;
  }

  // ------------------------------------------------------------------ kernels
  async source(kernel) {
    if (!this._sources.has(kernel)) {
      this._sources.set(kernel, fetch(`${this.base}/kernels/${kernel}.wgsl`).then((r) => {
        if (!r.ok) throw new Error(`kernel ${kernel}.wgsl: HTTP ${r.status}`);
        return r.text();
      }));
    }
    return this._sources.get(kernel);
  }

  // kernels/layer_program.py's program, served as /kernels/layer_program.json (fetched once)
  async layerProgram() {
    if (!this._program) {
      this._program = fetch(`${this.base}/kernels/layer_program.json`).then((r) => {
        if (!r.ok) throw new Error(`layer_program.json: HTTP ${r.status}`);
        return r.json();
      });
    }
    return this._program;
  }

  static key(kernel, constants) {
    return kernel + JSON.stringify(Object.entries(constants).sort());
  }

  // Creates (once, asynchronously, in parallel) the pipelines of these [kernel, constants].
  async prepare(list) {
    await Promise.all(list.map(async ([kernel, constants]) => {
      const key = WebGpuDevice.key(kernel, constants);
      if (!this._pipelines.has(key)) {
        this._pipelines.set(key, (async () => {
          const code = await this.source(kernel);
          if (!this._params.has(kernel)) this._params.set(kernel, parseParams(code));
          let module = this._modules.get(kernel);
          if (!module) this._modules.set(kernel, (module = this.device.createShaderModule({ code, label: kernel })));
          const values = {};
          for (const [k, v] of Object.entries(constants)) values[k] = Number(v);
          try {
            return await this.device.createComputePipelineAsync({ layout: "auto", label: key,
              compute: { module, entryPoint: "main", constants: values } });
          } catch (err) {
            throw new LimitError(`${kernel} ${JSON.stringify(constants)}: ${err.message}`);
          }
        })());
      }
      this._pipelines.set(key, await this._pipelines.get(key));
    }));
  }

  pipeline(kernel, constants) {
    const p = this._pipelines.get(WebGpuDevice.key(kernel, constants));
    if (!p || p instanceof Promise) throw new Error(`pipeline ${kernel} ${JSON.stringify(constants)} was not prepared`);
    return p;
  }

  packParams(kernel, values) {
    const fields = this._params.get(kernel);
    const names = fields.map(([n]) => n);
    if ([...names].sort().join() !== Object.keys(values).sort().join()) throw new TypeError(`${kernel} params are ${names}, got ${Object.keys(values)}`);
    const buf = new ArrayBuffer(Math.ceil((fields.length * 4) / 16) * 16 || 16), view = new DataView(buf);
    fields.forEach(([n, t], i) => {
      if (t === "f32") view.setFloat32(4 * i, values[n], true);
      else if (t === "i32") view.setInt32(4 * i, values[n], true);
      else view.setUint32(4 * i, values[n], true);
    });
    return buf;
  }

  // ------------------------------------------------------------------ buffers
  buffer(nbytes, label = "", uniform = false) {
    const size = Math.max(16, Math.ceil(nbytes / 16) * 16);
    if (size > this.limits.maxBufferSize) throw new LimitError(`buffer ${label} of ${size} bytes exceeds maxBufferSize ${this.limits.maxBufferSize}`);
    const U = GPUBufferUsage;
    return this.device.createBuffer({ size, label, usage: (uniform ? U.UNIFORM : U.STORAGE | U.COPY_SRC) | U.COPY_DST });
  }

  upload(array, label = "") {
    const buf = this.buffer(array.byteLength, label);
    if (array.byteLength) this.write(buf, array);
    return buf;
  }

  write(buf, array, offset = 0) {
    let bytes = new Uint8Array(array.buffer, array.byteOffset, array.byteLength);
    if (bytes.byteLength % 4) { const padded = new Uint8Array(Math.ceil(bytes.byteLength / 4) * 4); padded.set(bytes); bytes = padded; }
    this.queue.writeBuffer(buf, offset, bytes);
  }

  bindGroup(pipeline, buffers) {
    return this.device.createBindGroup({ layout: pipeline.getBindGroupLayout(0),
      entries: buffers.map((b, i) => ({ binding: i, resource: { buffer: b } })) });
  }
}

function parseParams(code) {
  const body = /struct\s+Params\s*\{([\s\S]*?)\}/.exec(code.replace(/\/\/[^\n]*/g, ""));
  return body ? [...body[1].matchAll(/(\w+)\s*:\s*(u32|i32|f32)/g)].map((m) => [m[1], m[2]]) : [];
}

// ====================================================================== launchers
export class Launch {
  constructor(dev, kernel, constants, buffers, params) {
    this.dev = dev;
    this.kernel = kernel;
    this.pipeline = dev.pipeline(kernel, constants);
    this.params = params;
    const packed = dev.packParams(kernel, params);
    this.paramsBuffer = dev.buffer(packed.byteLength, `${kernel}.params`, true);
    dev.queue.writeBuffer(this.paramsBuffer, 0, packed);
    this.bindGroup = dev.bindGroup(this.pipeline, [this.paramsBuffer, ...buffers]);
    this.maxGroups = dev.limits.maxComputeWorkgroupsPerDimension;
  }
  set(changes) {
    if (Object.entries(changes).every(([k, v]) => this.params[k] === v)) return;
    this.params = { ...this.params, ...changes };
    this.dev.queue.writeBuffer(this.paramsBuffer, 0, this.dev.packParams(this.kernel, this.params));
  }
  dispatch(pass, x, y = 1, z = 1) {
    if (x > this.maxGroups || y > this.maxGroups || z > this.maxGroups) throw new LimitError(`${this.kernel}: dispatch ${[x, y, z]} exceeds ${this.maxGroups} workgroups per dimension`);
    if (!(x && y && z)) return;
    pass.setPipeline(this.pipeline);
    pass.setBindGroup(0, this.bindGroup);
    pass.dispatchWorkgroups(x, y, z);
    this.dev.dispatches++;
    this.dev.trace?.push([this.kernel, x, y, z]);  // set dev.trace = [] to list a step's dispatches (tests)
  }
}

const quantConstants = (spec) => ({ BITS: spec.bits, GROUP: spec.group, SYMMETRIC: spec.symmetric ? 1 : 0 });

// A packed matrix on the device, split by rows into chunks that each fit one binding
export function uploadQuant(dev, t, label) {
  const wpr = t.q.length / t.n, spr = t.s.length / t.n;
  const rowBytes = Math.max(wpr, spr) * 4;
  const perChunk = Math.min(t.n, Math.floor(dev.maxBinding / rowBytes), dev.limits.maxComputeWorkgroupsPerDimension);
  if (perChunk < 1) throw new LimitError(`one row of ${label} (${rowBytes} bytes) exceeds the binding limit ${dev.maxBinding}`);
  const chunks = [];
  for (let start = 0; start < t.n; start += perChunk) {
    const n = Math.min(perChunk, t.n - start);
    chunks.push({ start, n, q: dev.upload(t.q.subarray(start * wpr, (start + n) * wpr), `${label}.q[${start}]`),
      s: dev.upload(t.s.subarray(start * spr, (start + n) * spr), `${label}.s[${start}]`) });
  }
  return { spec: t.spec, n: t.n, k: t.k, chunks };
}

// runner.matmul_tuning: GPUs want several threads per output, in the interleaved lane layout
// (span/opt 0: by shape, runner.matvec_layout), x staged in workgroup memory (stage: vec4s of a
// row a chunk; batches only where k >= stageRowsMinK, or tall (TALL_N, TALL_K) in tallBatchWg threads where
// the limits allow more than wg), lanes summed by subgroup shuffles where the device has usable
// subgroups (subgroup: their size); CPU rasterisers one thread per output, whole blocks.
const TALL_N = 8192, TALL_K = 4096;
function matmulTuning(dev) {
  if (dev.isRealGpu()) {
    const wg = dev.workgroupSize(256), tall = dev.workgroupSize(512);
    return { wg, maxTpr: 32, span: 0, opt: 0, stage: 512, stageRowsMinK: 8192, tallBatchWg: tall > wg ? tall : 0,
      subgroup: dev.subgroupSize() };
  }
  return { wg: dev.workgroupSize(64), maxTpr: 1, span: 8, opt: 1, stage: 0, stageRowsMinK: 0, tallBatchWg: 0, subgroup: 0 };
}

// runner.matvec_layout: [SPAN, OPT] of an n x k matvec
function matvecLayout(n, k, span, opt) {
  return [span || (k >= 1024 ? 2 : 1), opt || (n >= 8192 ? 4 : 2)];
}

function threadsPerRow(n, k, wg, maxTpr, span = 8) {
  if (span < 8) return Math.min(wg, maxTpr, 2 ** Math.max(0, Math.floor(Math.log2(Math.ceil(k / (4 * span))))));
  const blocks = Math.ceil(k / 32);
  let tpr = Math.min(wg, maxTpr, 2 ** Math.max(0, Math.floor(Math.log2(blocks))));
  while (tpr > 4 && n * tpr > 2 ** 18) tpr /= 2;
  return tpr;
}

const rowsVariant = (rows) => MATVEC_ROWS.find((r) => r >= rows) ?? MATVEC_ROWS[MATVEC_ROWS.length - 1];

// y[:, yCol:] (+)= x @ W.T by qmatvec; as runner.QuantLinear, `prologue` may fold the op before
// it in: {norm: [weight buffer, eps]} RMS-normalises x first (qmatvec_norm), {siluUpCol: c}
// takes silu(x[:, :k]) * x[:, c:c+k] as the input (qmatvec_silu).
export class QuantLinear {
  constructor(dev, w, x, xStride, y, yStride, yCol = 0, accumulate = false, prologue = {}) {
    Object.assign(this, { dev, w, x, xStride, y, yStride, yCol, accumulate: accumulate ? 1 : 0 });
    if (prologue.norm && prologue.siluUpCol !== undefined) throw new TypeError("one prologue at a time: norm or siluUpCol");
    if (prologue.siluUpCol !== undefined && prologue.siluUpCol % 4) throw new RangeError(`siluUpCol ${prologue.siluUpCol} must be a multiple of 4`);
    this.kernel = prologue.norm ? "qmatvec_norm" : prologue.siluUpCol !== undefined ? "qmatvec_silu" : "qmatvec";
    this.extraBuffers = prologue.norm ? [prologue.norm[0]] : [];
    this.extraParams = prologue.norm ? { eps: prologue.norm[1] } : prologue.siluUpCol !== undefined ? { up_col: prologue.siluUpCol } : {};
    const t = matmulTuning(dev);
    if (t.subgroup) this.kernel += "+subgroup";
    this.tuning = t;
    this.wg = t.wg;
    [this.span, this.opt] = matvecLayout(w.n, w.k, t.span, t.opt);
    this.tpr = threadsPerRow(w.n, w.k, t.wg, t.maxTpr, this.span);
    this.stage = this.span !== 8 || this.opt !== 1 ? t.stage : 0;
    this._launches = new Map();
  }
  // runner.QuantLinear._staged / _tpr: vec4s of each row staged a chunk for `rows` rows (0: not staged), threads per output
  tallBatch(rowsPerWg) { return !!this.tuning.tallBatchWg && rowsPerWg > 1 && this.w.n >= TALL_N && this.w.k >= TALL_K; }
  wgFor(rowsPerWg, ch) { return ch && this.tallBatch(rowsPerWg) ? this.tuning.tallBatchWg : this.wg; }
  staged(rowsPerWg, rows) {
    const longRows = this.w.k >= this.tuning.stageRowsMinK || this.tallBatch(rowsPerWg);
    if (!this.stage || (rowsPerWg > 1 && (!longRows || rows > rowsPerWg))) return 0;
    const room = Math.floor((this.dev.limits.maxComputeWorkgroupStorageSize - 64) / 16);
    return Math.min(this.stage, Math.floor(room / rowsPerWg / 8) * 8);
  }
  threads(rowsPerWg, ch) {
    if (!ch) return this.tpr;
    const blocks = Math.min(ch / 8, Math.ceil(this.w.k / 32));
    return Math.min(this.wgFor(rowsPerWg, ch), this.tuning.maxTpr, 2 ** Math.max(0, Math.floor(Math.log2(Math.max(1, Math.floor(blocks / 2))))));
  }
  constants(rowsPerWg, ch) {
    const c = { ...quantConstants(this.w.spec), WG: this.wgFor(rowsPerWg, ch), TPR: this.threads(rowsPerWg, ch), ROWS: rowsPerWg,
      ...(this.tuning.subgroup ? { SG: this.tuning.subgroup } : {}) };
    if (this.span === 8 && this.opt === 1) return c;
    return { ...c, SPAN: this.span, OPT: this.opt, EXACT: this.w.k % 32 === 0 ? 1 : 0, ...(ch ? { XT: ch * rowsPerWg } : {}) };
  }
  pipelinesFor(rows) { const r = rowsVariant(rows); return [[this.kernel, this.constants(r, this.staged(r, rows))]]; }
  record(pass, rows) {
    const r = rowsVariant(rows), ch = this.staged(r, rows), key = `${r}:${ch}`;
    if (!this._launches.has(key)) {
      this._launches.set(key, this.w.chunks.map((c) => [c.n, new Launch(this.dev, this.kernel, this.constants(r, ch), [c.q, c.s, this.x, this.y, ...this.extraBuffers],
        { n: c.n, k: this.w.k, m: 0, x_stride: this.xStride, y_stride: this.yStride, y_col: this.yCol + c.start, accumulate: this.accumulate, ...this.extraParams })]));
    }
    const perWg = this.wgFor(r, ch) / this.threads(r, ch) * this.opt;
    for (const [n, launch] of this._launches.get(key)) {
      launch.set({ m: rows });
      launch.dispatch(pass, Math.ceil(n / perWg), Math.ceil(rows / r));
    }
  }
}

export class ByRows {  // runner.ByRows: the `small` ops (fused decode kernels) up to maxRows rows, else `large`
  constructor(maxRows, small, large) { Object.assign(this, { maxRows, small, large }); }
  pick(rows) { return rows <= this.maxRows ? this.small : this.large; }
  pipelinesFor(rows) { return this.pick(rows).flatMap((op) => op.pipelinesFor(rows)); }
  record(pass, rows) { for (const op of this.pick(rows)) op.record(pass, rows); }
}

// ====================================================================== the layer program
// kernels/layer_program.py's expressions: numbers, names, + - * / // % ==, unary -, cdiv/min/max/sqrt
const PROGRAM_FUNCTIONS = { cdiv: (a, b) => Math.ceil(a / b), min: Math.min, max: Math.max, sqrt: Math.sqrt };

export function evaluate(expr, env) {
  if (typeof expr === "number") return expr;
  const toks = String(expr).match(/\d+(?:\.\d*)?(?:e-?\d+)?|[A-Za-z_]\w*|\/\/|==|[-+*/%(),]/g) || [];
  let i = 0;
  const peek = () => toks[i], next = () => toks[i++];
  const fail = () => { throw new Error(`layer program: cannot evaluate ${expr}`); };
  const primary = () => {
    const t = next();
    if (t === undefined) fail();
    if (t === "(") { const v = compare(); if (next() !== ")") fail(); return v; }
    if (t === "-") return -primary();
    if (/^\d/.test(t)) return Number(t);
    if (PROGRAM_FUNCTIONS[t]) {
      if (next() !== "(") fail();
      const args = [compare()];
      while (peek() === ",") { next(); args.push(compare()); }
      if (next() !== ")") fail();
      return PROGRAM_FUNCTIONS[t](...args);
    }
    if (!(t in env)) throw new Error(`layer program: unknown name ${t} in ${expr}`);
    return env[t];
  };
  const term = () => {
    let v = primary();
    while (["*", "/", "//", "%"].includes(peek())) {
      const op = next(), r = primary();
      v = op === "*" ? v * r : op === "/" ? v / r : op === "//" ? Math.floor(v / r) : v % r;
    }
    return v;
  };
  const sum = () => { let v = term(); while (peek() === "+" || peek() === "-") { const op = next(), r = term(); v = op === "+" ? v + r : v - r; } return v; };
  const compare = () => { let v = sum(); while (peek() === "==") { next(); v = v === sum() ? 1 : 0; } return v; };
  const v = compare();
  if (i !== toks.length) fail();
  return v;
}

// kernels/layer_program.py's names(): the config's numbers, q_dim / kv_dim, scratch strides,
// pool_ctx, rows, and kv_splits (the program's rule for this adapter kind, unless given)
export function programNames(program, config, poolCtx, rows = 0, realGpu = false, kvSplits = undefined) {
  const env = {};
  for (const [k, v] of Object.entries(config)) if (typeof v === "number") env[k] = v;
  env.q_dim = env.n_heads * env.head_dim;
  env.kv_dim = env.n_kv_heads * env.head_dim;
  for (const [name, width] of Object.entries(program.scratch)) env[`stride_${name}`] = round4(evaluate(width, env));
  env.stride_logits = round4(env.vocab);
  env.stride_src = env.stride_h;
  Object.assign(env, { pool_ctx: poolCtx, rows });
  env.kv_splits = kvSplits ?? Math.trunc(evaluate(program.kv_splits[realGpu ? "gpu" : "cpu"], env));
  return env;
}

export function kernelConstants(dev, op, env) {
  const wg = dev.workgroupSize(evaluate(typeof op.wg === "object" ? op.wg[dev.isRealGpu() ? "gpu" : "cpu"] : op.wg, env));
  const out = { WG: wg };
  for (const [k, v] of Object.entries(op.constants)) out[k] = evaluate(v, { ...env, wg });
  return out;
}

export class ProgramKernel {  // a layer program "kernel" op: overrides and params evaluated once, the grid per rows
  constructor(dev, op, env, buffers) {
    this.constants = kernelConstants(dev, op, env);
    this.env = { ...env, wg: this.constants.WG };
    this.op = op;
    this.params = {};
    for (const [k, v] of Object.entries(op.params)) this.params[k] = evaluate(v, this.env);
    this.buffers = op.buffers.map((name) => { if (!buffers[name]) throw new Error(`layer program: no buffer ${name}`); return buffers[name]; });
    this.dev = dev;
    this.launch = null;  // built on first use, once its pipeline is prepared
  }
  pipelinesFor() { return [[this.op.kernel, this.constants]]; }
  record(pass, rows) {
    this.launch ??= new Launch(this.dev, this.op.kernel, this.constants, this.buffers, this.params);
    const env = { ...this.env, rows };
    const [x, y, z = 1] = this.op.grid.map((g) => evaluate(g, env));
    this.launch.dispatch(pass, x, y, z);
  }
}

export function ropeFreqTurns(headDim, base) {
  const lead = (v, bits) => {
    if (v === 0) return 0;
    let e = Math.floor(Math.log2(Math.abs(v))) + 1;
    let m = v / 2 ** e;
    while (Math.abs(m) >= 1) { e += 1; m = v / 2 ** e; }
    while (Math.abs(m) < 0.5) { e -= 1; m = v / 2 ** e; }
    return Math.floor(m * 2 ** bits) * 2 ** (e - bits);
  };
  const out = new Float32Array((headDim / 2) * 4);
  for (let i = 0; i < headDim / 2; i++) {
    const freq = base ** (-(2 * i) / headDim) / (2 * Math.PI);
    const hi = lead(freq, 8), mid = lead(freq - hi, 8);
    out.set([hi, mid, freq - hi - mid, 0], 4 * i);
  }
  return out;
}

export const round4 = (n) => Math.ceil(n / 4) * 4;

// One kernel on given buffers, the way the backend launches it (params uniform at binding 0,
// then the storage buffers in binding order), and every buffer read back: what the browser
// kernel tests use. buffers: typed arrays; grid: [x, y, z] workgroups.
export async function runKernel(gpu, kernel, constants, params, buffers, grid) {
  await gpu.prepare([[kernel, constants]]);
  const bufs = buffers.map((data, i) => gpu.upload(data, `${kernel}.arg${i}`));
  const launch = new Launch(gpu, kernel, constants, bufs, params);
  const enc = gpu.device.createCommandEncoder();
  const pass = enc.beginComputePass();
  launch.dispatch(pass, ...grid);
  pass.end();
  const reads = bufs.map((b) => {
    const rb = gpu.device.createBuffer({ size: b.size, usage: GPUBufferUsage.MAP_READ | GPUBufferUsage.COPY_DST });
    enc.copyBufferToBuffer(b, 0, rb, 0, b.size);
    return rb;
  });
  gpu.queue.submit([enc.finish()]);
  const out = [];
  for (const [i, rb] of reads.entries()) {
    await rb.mapAsync(GPUMapMode.READ);
    out.push(Array.from(new buffers[i].constructor(rb.getMappedRange().slice(0, buffers[i].byteLength))));
    rb.unmap();
    rb.destroy();
    bufs[i].destroy();
  }
  return out;
}
