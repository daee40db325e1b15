// The tab's CPU backends (WASM SIMD and plain JS) on real weight blobs: prefill then one
// decode step, then the head's top-k. Usage: node THIS DIST DIR (DIR holds config.json,
// layer*.blob, head.blob, x.f32); prints one JSON line per engine. With DIR/formats.json (cases
// {name, spec, n, k, m} and files NAME.q, NAME.s: u32 code and scale words, NAME.x: f32 [m, k])
// it instead prints each engine's qmatvec of every case: {case, engine, y}.
import { existsSync, readFileSync, readdirSync } from "node:fs";
import { join } from "node:path";
import { pathToFileURL } from "node:url";

const [dist, dir] = process.argv.slice(2);
const { unpack_blob } = await import(pathToFileURL(join(dist, "weights.js")));
const { CpuBackend, JsEngine, WasmEngine, parseSpec } = await import(pathToFileURL(join(dist, "backend_cpu.js")));
const bytes = (p) => { const b = readFileSync(p); return new Uint8Array(b.buffer, b.byteOffset, b.byteLength); };
const typed = (T, p) => { const b = bytes(p).slice(); return new T(b.buffer); };
const engines = () => [new WasmEngine(new WebAssembly.Module(readFileSync(join(dist, "kernels.wasm")))), new JsEngine()];

if (existsSync(join(dir, "formats.json"))) {
  for (const c of JSON.parse(readFileSync(join(dir, "formats.json"), "utf8"))) {
    const t = { spec: parseSpec(c.spec), n: c.n, k: c.k, q: typed(Uint32Array, join(dir, `${c.name}.q`)), s: typed(Uint32Array, join(dir, `${c.name}.s`)) };
    const x = typed(Float32Array, join(dir, `${c.name}.x`));
    for (const e of engines()) {
      const y = new Float32Array(c.m * c.n);
      e.matvec(e.upload(t), x, c.m, y, c.n, 0, false);
      console.log(JSON.stringify({ case: c.name, engine: e.name, y: [...y] }));
    }
  }
  process.exit(0);
}

const cfg = JSON.parse(readFileSync(join(dir, "config.json"), "utf8"));
const layers = {};
for (const f of readdirSync(dir).filter((f) => f.startsWith("layer"))) { const b = unpack_blob(bytes(join(dir, f))); layers[b.index] = b.weights; }
const head = unpack_blob(bytes(join(dir, "head.blob"))).weights;
const x = typed(Float32Array, join(dir, "x.f32"));
const H = cfg.hidden, T = x.length / H;
for (const engine of engines()) {
  const be = new CpuBackend(cfg, layers, head, 64, engine);
  const a = await be.forward([{ session_id: "s", start_pos: 0, length: T - 1 }], x.subarray(0, (T - 1) * H));
  const b = await be.forward([{ session_id: "s", start_pos: T - 1, length: 1 }], x.subarray((T - 1) * H));
  const top = await be.head_topk(b, 5);
  // copy_kv: the last layer's KV copied from `be` into a backend of that layer alone, then a
  // decode step there, against the same step after replaying the history on such a backend
  const [first, last] = [layers[0], layers[1]];
  const ids = Object.keys(layers).map(Number).sort((p, q) => p - q);
  const only = (i, withHead) => new CpuBackend(cfg, { [ids[i]]: i ? last : first }, withHead ? head : null, 64, engine);
  const lead = only(0, false), copied = only(1, true), replayed = only(1, true);
  for (const [pos, len] of [[0, T - 1], [T - 1, 1]]) {
    const sl = [{ session_id: "s", start_pos: pos, length: len }];
    await replayed.forward(sl, await lead.forward(sl, x.subarray(pos * H, (pos + len) * H)));
  }
  const { k, v } = be.export_kv("s", ids[1], ids[1] + 1, T);
  copied.import_kv("s", k, v, T);
  const next = [{ session_id: "s", start_pos: T, length: 1 }];
  const h = await lead.forward(next, x.subarray(0, H));
  const afterCopy = await copied.forward(next, h), afterReplay = await replayed.forward(next, h);
  console.log(JSON.stringify({ engine: engine.name, hidden: [...a, ...b], ids: [...top.ids], values: [...top.values],
                               copied: [...afterCopy], replayed: [...afterReplay] }));
}
