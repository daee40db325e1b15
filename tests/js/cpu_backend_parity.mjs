// The tab's CPU backends (WASM SIMD and plain JS) on real weight blobs: prefill then one
// decode step, then the head's top-k. Usage: node THIS DIST DIR (DIR holds config.json,
// layer*.blob, head.blob, x.f32); prints one JSON line per engine.
import { readFileSync, readdirSync } from "node:fs";
import { join } from "node:path";
import { pathToFileURL } from "node:url";

const [dist, dir] = process.argv.slice(2);
const { unpack_blob } = await import(pathToFileURL(join(dist, "weights.js")));
const { CpuBackend, JsEngine, WasmEngine } = await import(pathToFileURL(join(dist, "backend_cpu.js")));
const cfg = JSON.parse(readFileSync(join(dir, "config.json"), "utf8"));
const bytes = (p) => { const b = readFileSync(p); return new Uint8Array(b.buffer, b.byteOffset, b.byteLength); };
const layers = {};
for (const f of readdirSync(dir).filter((f) => f.startsWith("layer"))) { const b = unpack_blob(bytes(join(dir, f))); layers[b.index] = b.weights; }
const head = unpack_blob(bytes(join(dir, "head.blob"))).weights;
const xb = bytes(join(dir, "x.f32")), x = new Float32Array(xb.slice().buffer);
const H = cfg.hidden, T = x.length / H;
for (const engine of [new WasmEngine(new WebAssembly.Module(readFileSync(join(dist, "kernels.wasm")))), new JsEngine()]) {
  const be = new CpuBackend(cfg, layers, head, 64, engine);
  const a = await be.forward([{ session_id: "s", start_pos: 0, length: T - 1 }], x.subarray(0, (T - 1) * H));
  const b = await be.forward([{ session_id: "s", start_pos: T - 1, length: 1 }], x.subarray((T - 1) * H));
  const top = await be.head_topk(b, 5);
  console.log(JSON.stringify({ engine: engine.name, hidden: [...a, ...b], ids: [...top.ids], values: [...top.values] }));
}
