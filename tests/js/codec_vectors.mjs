// The JS codec (tab_worker/web/dist/codec.js) against the golden frames of tests/vectors:
// every valid message encodes to exactly the file's bytes and decodes back to the message;
// every invalid frame is refused with the same code and field as wire.py. Run: node THIS [DIST]
import { readFileSync } from "node:fs";
import { dirname, join, resolve } from "node:path";
import { fileURLToPath, pathToFileURL } from "node:url";

const here = dirname(fileURLToPath(import.meta.url));
const dist = resolve(process.argv[2] || join(here, "..", "..", "tab_worker", "web", "dist"));
const { encode, decode, Tensor, DTYPES, ProtocolError, f16ToNumber } = await import(pathToFileURL(join(dist, "codec.js")));
const vectors = join(here, "..", "vectors");
const index = JSON.parse(readFileSync(join(vectors, "index.json"), "utf8"));

function f16Bits(x) {  // round to nearest even, enough for the vectors' values
  const f = new Float32Array([x]), u = new Uint32Array(f.buffer)[0];
  const sign = (u >>> 16) & 0x8000, exp = ((u >>> 23) & 0xff) - 127 + 15, mant = u & 0x7fffff;
  if (exp <= 0) return sign | Math.round(Math.abs(x) / 2 ** -24);  // subnormal
  if (exp >= 31) return sign | 0x7c00;
  let h = sign | (exp << 10) | (mant >> 13);
  const rest = mant & 0x1fff;
  if (rest > 0x1000 || (rest === 0x1000 && (h & 1))) h += 1;
  return h;
}

function fromJson(v) {
  if (Array.isArray(v)) return v.map(fromJson);
  if (v !== null && typeof v === "object") {
    if ("$tensor" in v) {
      const { dtype, shape, values } = v.$tensor;
      const T = DTYPES[dtype];
      const data = dtype === "f16" ? Uint16Array.from(values, f16Bits)
        : dtype === "i64" ? BigInt64Array.from(values, (x) => BigInt(x)) : T.from(values);
      return new Tensor(dtype, shape, data);
    }
    if ("$bytes" in v) return Uint8Array.from(v.$bytes.match(/../g) || [], (h) => parseInt(h, 16));
    const out = {};
    for (const [k, x] of Object.entries(v)) out[k] = fromJson(x);
    return out;
  }
  return v;
}

function same(a, b, path) {
  if (a instanceof Tensor || b instanceof Tensor) {
    if (!(a instanceof Tensor && b instanceof Tensor) || a.dtype !== b.dtype || String(a.shape) !== String(b.shape)) throw new Error(`${path}: tensor differs`);
    const x = a.dtype === "f16" ? Array.from(a.data, f16ToNumber) : Array.from(a.data);
    const y = b.dtype === "f16" ? Array.from(b.data, f16ToNumber) : Array.from(b.data);
    x.forEach((v, i) => { if (!Object.is(v, y[i]) && !(v === y[i])) throw new Error(`${path}[${i}]: ${v} != ${y[i]}`); });
    return;
  }
  if (a instanceof Uint8Array) {
    if (!(b instanceof Uint8Array) || Buffer.compare(Buffer.from(a), Buffer.from(b))) throw new Error(`${path}: bytes differ`);
    return;
  }
  if (a !== null && typeof a === "object") {
    const ka = Object.keys(a), kb = Object.keys(b || {});
    if (String(ka) !== String(kb)) throw new Error(`${path}: keys ${ka} != ${kb}`);
    ka.forEach((k) => same(a[k], b[k], `${path}.${k}`));
    return;
  }
  if (a !== b) throw new Error(`${path}: ${a} != ${b}`);
}

let failures = 0, passed = 0;
for (const v of index.valid) {
  try {
    const frame = new Uint8Array(readFileSync(join(vectors, v.file)));
    const msg = fromJson(v.message);
    const mine = encode(msg);
    if (Buffer.compare(Buffer.from(mine), Buffer.from(frame))) throw new Error(`encode differs: ${Buffer.from(mine).toString("hex")} vs ${Buffer.from(frame).toString("hex")}`);
    same(decode(frame), msg, "message");
    passed++;
  } catch (err) {
    failures++;
    console.log(`FAIL valid ${v.file}: ${err.message}`);
  }
}
for (const v of index.invalid) {
  const frame = new Uint8Array(readFileSync(join(vectors, v.file)));
  try {
    decode(frame);
    failures++;
    console.log(`FAIL invalid ${v.file}: accepted`);
  } catch (err) {
    if (!(err instanceof ProtocolError) || err.code !== v.error.code || (err.field ?? null) !== v.error.field) {
      failures++;
      console.log(`FAIL invalid ${v.file}: got ${err.code}/${err.field} (${err.message}), want ${v.error.code}/${v.error.field}`);
    } else passed++;
  }
}
console.log(`${passed} passed, ${failures} failed`);
process.exit(failures ? 1 : 0);
