// Weight blobs, as protocol/blobs.py makes them: one msgpack map per layer (or head),
// tensors in the wire encoding, identified by their sha256; they arrive in chunks of
// CHUNK_BYTES, each with its own sha256. Same names as weights.py.
import { decodeValue } from "./codec.js";
import { parseSpec } from "./backend_cpu.js";

export const CHUNK_BYTES = 1 << 20;
export const MATRICES = ["wq", "wk", "wv", "wo", "w_gate", "w_up", "w_down"];

export class BlobError extends Error {}

export async function sha256(bytes) {
  // crypto.subtle exists only in secure contexts (https, localhost): a phone on plain http
  // over the LAN gets the JS version
  const digest = globalThis.crypto?.subtle ? new Uint8Array(await crypto.subtle.digest("SHA-256", bytes)) : sha256js(bytes);
  return Array.from(digest, (b) => b.toString(16).padStart(2, "0")).join("");
}

const K = new Uint32Array([
  0x428a2f98, 0x71374491, 0xb5c0fbcf, 0xe9b5dba5, 0x3956c25b, 0x59f111f1, 0x923f82a4, 0xab1c5ed5, 0xd807aa98, 0x12835b01,
  0x243185be, 0x550c7dc3, 0x72be5d74, 0x80deb1fe, 0x9bdc06a7, 0xc19bf174, 0xe49b69c1, 0xefbe4786, 0x0fc19dc6, 0x240ca1cc,
  0x2de92c6f, 0x4a7484aa, 0x5cb0a9dc, 0x76f988da, 0x983e5152, 0xa831c66d, 0xb00327c8, 0xbf597fc7, 0xc6e00bf3, 0xd5a79147,
  0x06ca6351, 0x14292967, 0x27b70a85, 0x2e1b2138, 0x4d2c6dfc, 0x53380d13, 0x650a7354, 0x766a0abb, 0x81c2c92e, 0x92722c85,
  0xa2bfe8a1, 0xa81a664b, 0xc24b8b70, 0xc76c51a3, 0xd192e819, 0xd6990624, 0xf40e3585, 0x106aa070, 0x19a4c116, 0x1e376c08,
  0x2748774c, 0x34b0bcb5, 0x391c0cb3, 0x4ed8aa4a, 0x5b9cca4f, 0x682e6ff3, 0x748f82ee, 0x78a5636f, 0x84c87814, 0x8cc70208,
  0x90befffa, 0xa4506ceb, 0xbef9a3f7, 0xc67178f2]);

export function sha256js(bytes) {
  const n = bytes.byteLength, total = Math.ceil((n + 9) / 64) * 64;
  const buf = new Uint8Array(total);
  buf.set(bytes);
  buf[n] = 0x80;
  const view = new DataView(buf.buffer);
  view.setUint32(total - 8, Math.floor(n / 2 ** 29));
  view.setUint32(total - 4, (n * 8) >>> 0);
  const h = new Uint32Array([0x6a09e667, 0xbb67ae85, 0x3c6ef372, 0xa54ff53a, 0x510e527f, 0x9b05688c, 0x1f83d9ab, 0x5be0cd19]);
  const w = new Uint32Array(64);
  const rotr = (x, r) => (x >>> r) | (x << (32 - r));
  for (let off = 0; off < total; off += 64) {
    for (let i = 0; i < 16; i++) w[i] = view.getUint32(off + 4 * i);
    for (let i = 16; i < 64; i++) {
      const s0 = rotr(w[i - 15], 7) ^ rotr(w[i - 15], 18) ^ (w[i - 15] >>> 3);
      const s1 = rotr(w[i - 2], 17) ^ rotr(w[i - 2], 19) ^ (w[i - 2] >>> 10);
      w[i] = w[i - 16] + s0 + w[i - 7] + s1;
    }
    let [a, b, c, d, e, f, g, hh] = h;
    for (let i = 0; i < 64; i++) {
      const t1 = (hh + (rotr(e, 6) ^ rotr(e, 11) ^ rotr(e, 25)) + ((e & f) ^ (~e & g)) + K[i] + w[i]) >>> 0;
      const t2 = ((rotr(a, 2) ^ rotr(a, 13) ^ rotr(a, 22)) + ((a & b) ^ (a & c) ^ (b & c))) >>> 0;
      hh = g; g = f; f = e; e = (d + t1) >>> 0; d = c; c = b; b = a; a = (t1 + t2) >>> 0;
    }
    h[0] += a; h[1] += b; h[2] += c; h[3] += d; h[4] += e; h[5] += f; h[6] += g; h[7] += hh;
  }
  const out = new Uint8Array(32);
  const ov = new DataView(out.buffer);
  h.forEach((x, i) => ov.setUint32(4 * i, x));
  return out;
}

function unquant(d) {
  return { spec: parseSpec(d.spec), n: Number(d.n), k: Number(d.k), q: d.q.data, s: d.s.data };
}

// -> {kind: "layer" | "head", index, weights}
export function unpack_blob(bytes) {
  let body;
  try {
    body = decodeValue(bytes);
  } catch (err) {
    throw new BlobError(`weight blob does not decode: ${err.message}`);
  }
  if (body.kind === "layer") {
    const w = { attn_norm: body.attn_norm.data, ffn_norm: body.ffn_norm.data };
    for (const m of MATRICES) w[m] = unquant(body[m]);
    return { kind: "layer", index: Number(body.index), weights: w };
  }
  if (body.kind === "head") return { kind: "head", index: null, weights: { output_norm: body.output_norm.data, output: unquant(body.output) } };
  throw new BlobError(`weight blob of unknown kind ${body.kind}`);
}

// Collects a blob's chunks (any order, each checked); `have` lists the chunk indices held.
export class BlobAssembler {
  constructor(info) {
    this.info = info;
    this.buf = new Uint8Array(info.size);
    this.have = new Set();
  }
  async add(index, offset, data, digest) {
    if (!(index >= 0 && index < this.info.chunks) || offset !== index * CHUNK_BYTES) {
      throw new BlobError(`chunk ${index} at offset ${offset} does not belong to blob ${this.info.key}`);
    }
    if (offset + data.byteLength > this.info.size) throw new BlobError(`chunk ${index} of ${this.info.key} overruns the blob size ${this.info.size}`);
    if ((await sha256(data)) !== digest) throw new BlobError(`chunk ${index} of ${this.info.key} fails its checksum`);
    this.buf.set(data, offset);
    this.have.add(index);
    return this.complete;
  }
  get complete() { return this.have.size === this.info.chunks; }
  get received() { return [...this.have].reduce((a, i) => a + Math.min(CHUNK_BYTES, this.info.size - i * CHUNK_BYTES), 0); }
  async result() {
    if ((await sha256(this.buf)) !== this.info.sha256) throw new BlobError(`blob ${this.info.key} fails its checksum after assembly`);
    return this.buf;
  }
}
