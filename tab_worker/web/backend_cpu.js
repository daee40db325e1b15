// The CPU backends of a browser tab: WebAssembly SIMD or, as the last resort, plain JS. Same
// interface and behaviour as tab_worker/numpy_backend.py (whose math, kernels/reference.py,
// is what this computes): forward(slices, hidden) -> hidden, head_topk(rows, k) -> {ids,
// values}, sessions(), drop_session, fork_session, export_kv, import_kv.
//
// Weights stay packed (kernels/quant.py's words, as the WGSL reads them). The WASM engine runs
// kernels/c/packed_kernels.c, the same C source the Python worker compiles natively, on the
// words and f16 scale words as they arrived; the JS engine decodes the scales once to f32
// (scale, min) pairs. The engines differ only in qmatvec.

export function f16ToF32(h) {
  const s = h & 0x8000 ? -1 : 1, e = (h >> 10) & 0x1f, f = h & 0x3ff;
  if (e === 0) return s * f * 2 ** -24;
  if (e === 31) return f ? NaN : s * Infinity;
  return s * (1 + f / 1024) * 2 ** (e - 15);
}

const F16 = new Float32Array(65536);
for (let i = 0; i < 65536; i++) F16[i] = f16ToF32(i);

// (scale, min) per group of each row as f32 [n, groups, 2]: w = scale * q + min.
export function decodeScales(t) {
  const { bits, group, symmetric } = t.spec;
  const groups = Math.ceil(t.k / group);
  const out = new Float32Array(t.n * groups * 2);
  const s = t.s;
  if (symmetric) {
    const perRow = Math.ceil(groups / 2), offset = 2 ** (bits - 1);
    for (let r = 0; r < t.n; r++) {
      for (let g = 0; g < groups; g++) {
        const word = s[r * perRow + (g >> 1)];
        const sc = F16[g & 1 ? word >>> 16 : word & 0xffff];
        out[(r * groups + g) * 2] = sc;
        out[(r * groups + g) * 2 + 1] = -sc * offset;
      }
    }
  } else {
    for (let i = 0; i < t.n * groups; i++) {
      const word = s[i];
      out[2 * i] = F16[word & 0xffff];
      out[2 * i + 1] = F16[word >>> 16];
    }
  }
  return out;
}

export function parseSpec(name) {
  const m = /^([as])(\d)g(\d+)$/.exec(name);
  if (!m) throw new Error(`bad quant spec ${name}`);
  return { name, symmetric: m[1] === "s", bits: +m[2], group: +m[3] };
}

// x rows (k floats each) padded with zeros to blocks*32 floats, and their 32-block sums
function padRows(x, rows, k, blocks, xp, xsum) {
  const width = blocks * 32;
  xp.fill(0, 0, rows * width);
  for (let r = 0; r < rows; r++) xp.set(x.subarray(r * k, r * k + k), r * width);
  for (let i = 0; i < rows * blocks; i++) {
    let s = 0;
    for (let j = 0; j < 32; j++) s += xp[i * 32 + j];
    xsum[i] = s;
  }
}

// ------------------------------------------------------------------ plain JS engine
// In place on rows of n floats: each `block` entries' normalized Walsh-Hadamard transform (the
// numpy twin kernels/reference.py:hadamard, butterflies (i, i + h) for h = 1, 2, 4, ..., then one
// scale): a rotated FFN's activation before ffn_down (config.ffn_hadamard).
export function hadamard(x, rows, n, block) {
  const scale = Math.fround(1 / Math.sqrt(block));
  for (let base = 0; base < rows * n; base += block) {
    for (let h = 1; h < block; h <<= 1) {
      for (let i0 = base; i0 < base + block; i0 += 2 * h) {
        for (let i = i0; i < i0 + h; i++) { const a = x[i], b = x[i + h]; x[i] = a + b; x[i + h] = a - b; }
      }
    }
    for (let i = base; i < base + block; i++) x[i] *= scale;
  }
}

export class JsEngine {
  constructor() { this.name = "js"; }
  hadamard(x, rows, n, block) { hadamard(x, rows, n, block); }
  upload(t) { return { spec: t.spec, n: t.n, k: t.k, q: t.q, sm: decodeScales(t), bytes: t.q.byteLength + t.s.byteLength }; }
  matvec(h, x, rows, y, yStride, yCol, accumulate) {
    const { bits, group } = h.spec, k = h.k, n = h.n;
    const blocks = Math.ceil(k / 32), groups = Math.ceil(k / group), wpr = groups * group / 32 * bits;
    const xp = new Float32Array(rows * blocks * 32), xsum = new Float32Array(rows * blocks);
    padRows(x, rows, k, blocks, xp, xsum);
    const codes = new Float32Array(32), q = h.q, sm = h.sm, acc = new Float64Array(rows);
    const mask = (1 << bits) - 1;
    for (let o = 0; o < n; o++) {
      acc.fill(0);
      const wbase = o * wpr;
      for (let b = 0; b < blocks; b++) {
        const w = wbase + b * bits;
        if (bits === 4) {
          for (let i = 0; i < 4; i++) {
            const word = q[w + i];
            for (let j = 0; j < 8; j++) codes[i * 8 + j] = (word >>> (4 * j)) & 15;
          }
        } else if (bits === 8) {
          for (let i = 0; i < 8; i++) {
            const word = q[w + i];
            codes[i * 4] = word & 255; codes[i * 4 + 1] = (word >>> 8) & 255;
            codes[i * 4 + 2] = (word >>> 16) & 255; codes[i * 4 + 3] = word >>> 24;
          }
        } else if (bits === 3) {
          for (let j = 0; j < 32; j++) codes[j] = ((q[w + (j >> 4)] >>> (2 * (j & 15))) & 3) | (((q[w + 2] >>> j) & 1) << 2);
        } else {
          for (let j = 0; j < 32; j++) codes[j] = (q[w + ((j * bits) >> 5)] >>> ((j * bits) & 31)) & mask;
        }
        const g = ((b * 32) / group) | 0, scale = sm[(o * groups + g) * 2], mn = sm[(o * groups + g) * 2 + 1];
        for (let r = 0; r < rows; r++) {
          const xb = (r * blocks + b) * 32;
          let d = 0;
          for (let j = 0; j < 32; j++) d += codes[j] * xp[xb + j];
          acc[r] += scale * d + mn * xsum[r * blocks + b];
        }
      }
      for (let r = 0; r < rows; r++) {
        const i = r * yStride + yCol + o;
        y[i] = accumulate ? y[i] + acc[r] : acc[r];
      }
    }
  }
}

// ------------------------------------------------------------------ WASM SIMD engine
export class WasmEngine {
  // `module`: a compiled WebAssembly.Module of kernels.wasm
  constructor(module) {
    this.name = "wasm";
    this.memory = new WebAssembly.Memory({ initial: 256 });  // 16 MiB, grows
    this.instance = new WebAssembly.Instance(module, { env: { memory: this.memory } });
    this.k = this.instance.exports;
    // bump allocator above the C data and stack (wasm-ld puts the stack below __heap_base)
    this.top = this.k.__heap_base ? Number(this.k.__heap_base.value) : 1 << 20;
    this.scratch = { ptr: 0, bytes: 0 };
  }

  static async load(url) {
    const mod = await WebAssembly.compileStreaming(fetch(url));
    return new WasmEngine(mod);
  }

  static supported() {
    // a function returning i8x16.popcnt(i8x16.splat(0)): validates only where SIMD does
    const probe = new Uint8Array([0, 97, 115, 109, 1, 0, 0, 0, 1, 5, 1, 96, 0, 1, 123, 3, 2, 1, 0, 10, 10, 1, 8, 0, 65, 0,
      253, 15, 253, 98, 11]);
    try { return typeof WebAssembly === "object" && WebAssembly.validate(probe); } catch { return false; }
  }

  alloc(bytes) {
    const ptr = (this.top + 15) & ~15;
    this.top = ptr + bytes;
    const need = this.top - this.memory.buffer.byteLength;
    if (need > 0) this.memory.grow(Math.ceil(need / 65536));
    return ptr;
  }

  put(array) {
    const ptr = this.alloc(array.byteLength);
    new Uint8Array(this.memory.buffer, ptr, array.byteLength).set(new Uint8Array(array.buffer, array.byteOffset, array.byteLength));
    return ptr;
  }

  upload(t) {
    return { spec: t.spec, n: t.n, k: t.k, qPtr: this.put(t.q), sPtr: this.put(t.s), bytes: t.q.byteLength + t.s.byteLength };
  }

  // pk_hadamard of packed_kernels.c on a copy of x in the module's memory
  hadamard(x, rows, n, block) {
    const ptr = this._scratch(rows * n * 4), view = new Float32Array(this.memory.buffer, ptr, rows * n);
    view.set(x.subarray(0, rows * n));
    this.k.pk_hadamard(ptr, rows, n, n, block, Math.fround(1 / Math.sqrt(block)));
    x.set(new Float32Array(this.memory.buffer, ptr, rows * n));
  }

  _scratch(bytes) {
    if (this.scratch.bytes < bytes) this.scratch = { ptr: this.alloc(bytes), bytes };
    return this.scratch.ptr;
  }

  matvec(h, x, rows, y, yStride, yCol, accumulate) {
    const { bits, group, symmetric } = h.spec, k = h.k, n = h.n, kPad = Math.ceil(k / group) * group;
    const xBytes = rows * kPad * 4, yBytes = rows * n * 4;
    const xPtr = this._scratch(xBytes + yBytes + 16), yPtr = (xPtr + xBytes + 15) & ~15;
    // the kernel reads rows of k_pad floats, zeros past k
    const xp = new Float32Array(this.memory.buffer, xPtr, rows * kPad);
    if (kPad !== k) xp.fill(0);
    for (let r = 0; r < rows; r++) xp.set(x.subarray(r * k, r * k + k), r * kPad);
    this.k.pk_matmul(h.qPtr, h.sPtr, n, k, bits, group, symmetric ? 1 : 0, xPtr, rows, kPad, yPtr, n, 0);
    const out = new Float32Array(this.memory.buffer, yPtr, rows * n);
    for (let r = 0; r < rows; r++) {
      const row = out.subarray(r * n, r * n + n), at = r * yStride + yCol;
      if (accumulate) for (let i = 0; i < n; i++) y[at + i] += row[i];
      else y.set(row, at);
    }
  }
}

// ------------------------------------------------------------------ the numpy twins
export function rmsnorm(x, rows, n, weight, eps, out) {
  for (let r = 0; r < rows; r++) {
    let ss = 0;
    for (let i = 0; i < n; i++) ss += x[r * n + i] * x[r * n + i];
    const inv = 1 / Math.sqrt(ss / n + eps);
    for (let i = 0; i < n; i++) out[r * n + i] = x[r * n + i] * inv * weight[i];
  }
  return out;
}

export function ropeInvFreq(headDim, base) {
  const inv = new Float32Array(headDim / 2);
  for (let i = 0; i < headDim / 2; i++) inv[i] = 1 / base ** ((2 * i) / headDim);
  return inv;
}

// in place: heads [col, col + nHeads*headDim) of each row of width `stride`
function rope(x, rows, stride, col, nHeads, headDim, positions, invFreq) {
  for (let r = 0; r < rows; r++) {
    for (let i = 0; i < headDim / 2; i++) {
      const angle = Math.fround(positions[r] * invFreq[i]), c = Math.cos(angle), s = Math.sin(angle);
      for (let h = 0; h < nHeads; h++) {
        const at = r * stride + col + h * headDim + 2 * i, x0 = x[at], x1 = x[at + 1];
        x[at] = x0 * c - x1 * s;
        x[at + 1] = x0 * s + x1 * c;
      }
    }
  }
}

// k and v hold `floats` values each, and `length` positions fit the context (import_kv)
export function checkKv(k, v, floats, length, maxCtx) {
  if (k.length !== floats || v.length !== floats) throw new RangeError(`KV of ${k.length} and ${v.length} values does not fit the ${floats} of the layers held`);
  if (length > maxCtx) throw new RangeError(`${length} positions exceed the context of ${maxCtx}`);
}

class KVCache {
  constructor(nLayers, nKv, headDim, capacity) {
    Object.assign(this, { nLayers, nKv, headDim, capacity, length: 0 });
    this.k = new Float32Array(nLayers * nKv * capacity * headDim);
    this.v = new Float32Array(this.k.length);
  }
  ensure(needed) {
    if (needed <= this.capacity) return;
    const cap = Math.max(needed, 2 * this.capacity), hd = this.headDim;
    for (const name of ["k", "v"]) {
      const old = this[name], grown = new Float32Array(this.nLayers * this.nKv * cap * hd);
      for (let run = 0; run < this.nLayers * this.nKv; run++) {
        grown.set(old.subarray(run * this.capacity * hd, (run + 1) * this.capacity * hd), run * cap * hd);
      }
      this[name] = grown;
    }
    this.capacity = cap;
  }
  at(layer, head, pos) { return ((layer * this.nKv + head) * this.capacity + pos) * this.headDim; }
}

export class CpuBackend {
  // layers: {index: LayerWeights (tensors as {spec, n, k, q, s})}, head: HeadWeights or null
  constructor(config, layers, head, maxCtx, engine) {
    this.name = engine.name;
    this.config = config;
    this.engine = engine;
    this.layerIds = Object.keys(layers).map(Number).sort((a, b) => a - b);
    this.maxCtx = maxCtx;
    const up = (t) => engine.upload(t);
    this._layers = this.layerIds.map((i) => {
      const w = layers[i];
      return {
        attn_norm: w.attn_norm, ffn_norm: w.ffn_norm, wq: up(w.wq), wk: up(w.wk), wv: up(w.wv), wo: up(w.wo),
        w_gate: up(w.w_gate), w_up: up(w.w_up), w_down: up(w.w_down),
      };
    });
    this._head = head ? { norm: head.output_norm, output: up(head.output) } : null;
    this._sessions = new Map();
    const c = config;
    this.qDim = c.n_heads * c.head_dim;
    this.kvDim = c.n_kv_heads * c.head_dim;
    this.invFreq = ropeInvFreq(c.head_dim, c.rope_base);
  }

  sessions() { return [...this._sessions.keys()]; }
  session_length(id) { return this._sessions.get(id)?.length ?? 0; }
  drop_session(id) { this._sessions.delete(id); }
  // keep positions [0, length): a speculative step's rejected drafts go (longer: no-op)
  truncate_session(id, length) { const c = this._sessions.get(id); if (c) c.length = Math.min(c.length, Math.max(0, length)); }

  fork_session(src, dst, length) {
    const cache = this._sessions.get(src);
    if (length > cache.length) throw new Error(`session ${src} holds ${cache.length} positions, cannot fork ${length}`);
    const c = this.config, copy = new KVCache(this._layers.length, c.n_kv_heads, c.head_dim, cache.capacity);
    copy.k.set(cache.k);
    copy.v.set(cache.v);
    copy.length = length;
    this._sessions.set(dst, copy);
  }

  // the session's keys and values of layers [layerStart, layerEnd) (within the held range),
  // positions [0, length): {k, v} f32 [layers][kv heads][length][head_dim] (copy_kv)
  export_kv(id, layerStart, layerEnd, length) {
    const cache = this._sessions.get(id), held = cache?.length ?? 0;
    if (length > held) throw new RangeError(`session ${id} holds ${held} positions, cannot copy ${length}`);
    const c = this.config, lo = layerStart - this.layerIds[0], run = length * c.head_dim;
    const k = new Float32Array((layerEnd - layerStart) * c.n_kv_heads * run), v = new Float32Array(k.length);
    for (let l = 0; l < layerEnd - layerStart; l++) {
      for (let h = 0; h < c.n_kv_heads; h++) {
        const at = cache.at(lo + l, h, 0), to = (l * c.n_kv_heads + h) * run;
        k.set(cache.k.subarray(at, at + run), to);
        v.set(cache.v.subarray(at, at + run), to);
      }
    }
    return { k, v };
  }

  // the session's KV becomes {k, v} (every held layer, `length` positions, as export_kv gives them)
  import_kv(id, k, v, length) {
    const c = this.config, n = this._layers.length, run = length * c.head_dim;
    checkKv(k, v, n * c.n_kv_heads * run, length, this.maxCtx);
    const cache = new KVCache(n, c.n_kv_heads, c.head_dim, Math.max(16, length));
    for (let l = 0; l < n; l++) {
      for (let h = 0; h < c.n_kv_heads; h++) {
        const from = (l * c.n_kv_heads + h) * run, at = cache.at(l, h, 0);
        cache.k.set(k.subarray(from, from + run), at);
        cache.v.set(v.subarray(from, from + run), at);
      }
    }
    cache.length = length;
    this._sessions.set(id, cache);
  }

  _cacheFor(sl) {
    const end = sl.start_pos + sl.length;
    if (end > this.maxCtx) throw new RangeError(`session ${sl.session_id}: position ${end} exceeds the context of ${this.maxCtx}`);
    let cache = this._sessions.get(sl.session_id);
    if (!cache) {
      if (sl.start_pos !== 0) throw new RangeError(`session ${sl.session_id} is unknown here and starts at ${sl.start_pos}, not 0`);
      const c = this.config;
      cache = new KVCache(this._layers.length, c.n_kv_heads, c.head_dim, Math.max(16, end));
      this._sessions.set(sl.session_id, cache);
    } else if (sl.start_pos > cache.length) {
      throw new RangeError(`session ${sl.session_id}: start ${sl.start_pos} leaves a gap after length ${cache.length}`);
    }
    cache.ensure(end);
    return cache;
  }

  // hidden: Float32Array [total * hidden] -> a new Float32Array of the same shape
  async forward(slices, hidden) {
    const c = this.config, H = c.hidden, hd = c.head_dim, total = slices.reduce((a, s) => a + s.length, 0);
    if (hidden.length !== total * H) throw new RangeError(`hidden has ${hidden.length} floats; expected ${total} x ${H}`);
    const caches = slices.map((s) => this._cacheFor(s));
    const x = Float32Array.from(hidden);
    const positions = new Uint32Array(total);
    let r0 = 0;
    for (const s of slices) for (let i = 0; i < s.length; i++) positions[r0++] = s.start_pos + i;
    const qkvW = this.qDim + 2 * this.kvDim;
    const h = new Float32Array(total * H), qkv = new Float32Array(total * qkvW), attn = new Float32Array(total * this.qDim);
    const gu = new Float32Array(total * 2 * c.ffn), act = new Float32Array(total * c.ffn);
    const group = c.n_heads / c.n_kv_heads, scale = 1 / Math.sqrt(hd);
    const e = this.engine;
    for (let li = 0; li < this._layers.length; li++) {
      const L = this._layers[li];
      rmsnorm(x, total, H, L.attn_norm, c.rms_eps, h);
      e.matvec(L.wq, h, total, qkv, qkvW, 0, false);
      e.matvec(L.wk, h, total, qkv, qkvW, this.qDim, false);
      e.matvec(L.wv, h, total, qkv, qkvW, this.qDim + this.kvDim, false);
      rope(qkv, total, qkvW, 0, c.n_heads + c.n_kv_heads, hd, positions, this.invFreq);
      let row = 0;
      for (let si = 0; si < slices.length; si++) {
        const sl = slices[si], cache = caches[si];
        for (let t = 0; t < sl.length; t++, row++) {
          const pos = sl.start_pos + t;
          for (let kh = 0; kh < c.n_kv_heads; kh++) {
            const at = cache.at(li, kh, pos), src = row * qkvW + this.qDim + kh * hd;
            cache.k.set(qkv.subarray(src, src + hd), at);
            cache.v.set(qkv.subarray(src + this.kvDim, src + this.kvDim + hd), at);
          }
          const scores = new Float64Array(pos + 1);
          for (let head = 0; head < c.n_heads; head++) {
            const kh = (head / group) | 0, qo = row * qkvW + head * hd;
            let m = -Infinity;
            for (let p = 0; p <= pos; p++) {
              const ko = cache.at(li, kh, p);
              let d = 0;
              for (let i = 0; i < hd; i++) d += qkv[qo + i] * cache.k[ko + i];
              scores[p] = d * scale;
              if (scores[p] > m) m = scores[p];
            }
            let sum = 0;
            for (let p = 0; p <= pos; p++) { scores[p] = Math.exp(scores[p] - m); sum += scores[p]; }
            const out = row * this.qDim + head * hd;
            for (let i = 0; i < hd; i++) attn[out + i] = 0;
            for (let p = 0; p <= pos; p++) {
              const w = scores[p] / sum, vo = cache.at(li, kh, p);
              for (let i = 0; i < hd; i++) attn[out + i] += w * cache.v[vo + i];
            }
          }
        }
      }
      e.matvec(L.wo, attn, total, x, H, 0, true);
      rmsnorm(x, total, H, L.ffn_norm, c.rms_eps, h);
      e.matvec(L.w_gate, h, total, gu, 2 * c.ffn, 0, false);
      e.matvec(L.w_up, h, total, gu, 2 * c.ffn, c.ffn, false);
      for (let r = 0; r < total; r++) {
        for (let i = 0; i < c.ffn; i++) {
          const g = gu[r * 2 * c.ffn + i], u = gu[r * 2 * c.ffn + c.ffn + i];
          act[r * c.ffn + i] = (g / (1 + Math.exp(-g))) * u;
        }
      }
      if (c.ffn_hadamard) e.hadamard(act, total, c.ffn, c.ffn_hadamard);  // ffn_down's input side was rotated offline
      e.matvec(L.w_down, act, total, x, H, 0, true);
    }
    slices.forEach((s, i) => { caches[i].length = s.start_pos + s.length; });
    return x;
  }

  // rows: Float32Array [n * hidden] -> {ids: Int32Array [n*k], values: Float32Array [n*k]}
  async head_topk(rows, k) {
    if (!this._head) throw new Error("this backend holds no head");
    const c = this.config, n = rows.length / c.hidden;
    const h = rmsnorm(rows, n, c.hidden, this._head.norm, c.rms_eps, new Float32Array(rows.length));
    const logits = new Float32Array(n * c.vocab);
    this.engine.matvec(this._head.output, h, n, logits, c.vocab, 0, false);
    return topk(logits, n, c.vocab, k);
  }
}

const LOWEST = -3.4028234663852886e38;

// per row the k largest, best first, ties to the lower id; NaN and -inf rank as LOWEST
export function topk(logits, rows, count, k) {
  k = Math.min(k, count);
  const ids = new Int32Array(rows * k), values = new Float32Array(rows * k);
  for (let r = 0; r < rows; r++) {
    const bestId = new Int32Array(k).fill(-1), bestRank = new Float64Array(k).fill(-Infinity);
    for (let i = 0; i < count; i++) {
      const v = logits[r * count + i], rank = v >= LOWEST ? v : LOWEST;
      if (bestId[k - 1] !== -1 && rank <= bestRank[k - 1]) continue;
      let j = k - 1;
      while (j > 0 && (bestId[j - 1] === -1 || rank > bestRank[j - 1])) {
        bestRank[j] = bestRank[j - 1]; bestId[j] = bestId[j - 1]; j--;
      }
      bestRank[j] = rank; bestId[j] = i;
    }
    for (let j = 0; j < k; j++) { ids[r * k + j] = bestId[j]; values[r * k + j] = logits[r * count + bestId[j]]; }
  }
  return { ids, values };
}
