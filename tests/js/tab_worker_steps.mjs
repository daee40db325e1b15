// TabWorker's protocol steps without a browser (node): memory-aware refusal of an assignment,
// hello/heartbeat shapes, the message names worker.py uses, and copy_kv's routing between
// the ranges held. Usage: node THIS DIST
import { join } from "node:path";
import { pathToFileURL } from "node:url";

const dist = process.argv[2];
const { TabWorker, EXPANSION } = await import(pathToFileURL(join(dist, "worker.js")));
const { encode, decode, Tensor } = await import(pathToFileURL(join(dist, "codec.js")));
const check = (cond, what) => { if (!cond) { console.log(`FAIL ${what}`); process.exitCode = 1; } };

const w = new TabWorker("t", { memoryBytes: 10 << 20 });
w.caps = { kind: "browser", backend: "wasm", memory_bytes: w.memory_budget };
w.backend_name = "wasm";
w.on_welcome({ worker_id: "w1", epoch: 3, heartbeat_ms: 200 });
const chunks = [{ key: "layer:0", sha256: "a".repeat(64), size: 3 << 20, chunks: 3 }, { key: "layer:1", sha256: "b".repeat(64), size: 3 << 20, chunks: 3 }];
const out = await w.on_assign({ type: "assign", assignment_id: 7, layer_start: 0, layer_end: 2, include_head: false, model: {}, chunks });
check(out.length === 1 && out[0].type === "refuse" && out[0].reason === "memory", "assignment beyond the budget is refused");
check(out[0].detail.assignment_id === 7 && out[0].detail.budget === 10 << 20 && out[0].detail.needed === Math.round((6 << 20) * EXPANSION.wasm), "refusal names assignment, need and budget");
decode(encode(out[0]));  // a valid wire message
const ok = await w.on_assign({ type: "assign", assignment_id: 8, layer_start: 0, layer_end: 1, include_head: false, model: {}, chunks: chunks.slice(0, 1) });
check(ok.length === 1 && ok[0].type === "load_progress" && ok[0].total_bytes === 3 << 20 && ok[0].received_bytes === 0, "accepted assignment reports load progress");
const hello = decode(encode(w.hello()));
check(hello.type === "hello" && hello.resume.worker_id === "w1" && hello.resume.partial["a".repeat(64)].length === 0, "hello resumes with partial blobs");
check(decode(encode(w.heartbeat(5))).seq === 5, "heartbeat");
const unexpected = await w.handle({ v: 1, type: "token" });
check(unexpected[0].type === "error" && unexpected[0].code === "unexpected_type", "unexpected message type answered with an error");
// a speculative step: the head returns the top-k of each of a session's last topk_rows rows (a
// stand-in backend: layers are the identity, a row's top id is its first value); a rejected
// draft's truncate_session reaches every range's backend
const truncated = [];
const stub = {
  forward: async (slices, x) => x,
  head_topk: async (rows, k) => ({ ids: Int32Array.from({ length: (rows.length / 2) * k }, (_, i) => rows[Math.floor(i / k) * 2]),
    values: new Float32Array((rows.length / 2) * k) }),
  truncate_session: (id, n) => truncated.push(`${id}:${n}`),
};
w.ranges.set("0,2", stub);
w.range_heads.set("0,2", true);
const [r] = await w.on_step({ step_id: 1, epoch: 3, layer_start: 0, layer_end: 2, want_topk: 1,
  sessions: [{ session_id: "a", start_pos: 0, length: 2 }, { session_id: "b", start_pos: 7, length: 3, topk_rows: 3 }],
  hidden: new Tensor("f32", [5, 2], Float32Array.from([0, 0, 1, 1, 2, 2, 3, 3, 4, 4])) });
check(r.topk_ids.shape[0] === 4 && Array.from(r.topk_ids.data).join() === "1,2,3,4", "top-k of the last row of a and of b's 3 rows");
decode(encode(r));
w.on_truncate_session({ session_id: "b", length: 8 });
check(truncated.join() === "b:8", "truncate_session reaches the backend");
// copy_kv: layers [1, 2) of a session's KV go from the range [0, 2) held here to the range
// [1, 2) held here (stand-ins that record what they were asked); a copy that fails, or names
// a range not held, is answered ok: false (the coordinator replays those positions instead)
const imported = [];
stub.export_kv = async (id, start, end, n) => {
  if (n > 9) throw new RangeError(`session ${id} holds 9 positions, cannot copy ${n}`);
  return { k: new Float32Array([start, end, n]), v: new Float32Array([n]) };
};
w.ranges.set("1,2", { import_kv: (id, k, v, n) => imported.push(`${id}:${[...k]}:${[...v]}:${n}`) });
const copy = (n, sourceEnd = 2) => w.handle({ v: 1, type: "copy_kv", session_id: "a", source_start: 0, source_end: sourceEnd, layer_start: 1, layer_end: 2, length: n });
const [done] = await copy(9);
check(done.type === "kv_copied" && done.ok && done.length === 9 && imported.join() === "a:1,2,9:9:9", "copy_kv copies between the ranges held");
const [refused] = await copy(12);
check(!refused.ok && refused.error.includes("cannot copy 12") && imported.length === 1, "a failed copy_kv is answered ok: false");
const [unheld] = await copy(4, 3);
check(!unheld.ok && unheld.error.includes("not both held"), "copy_kv from a range not held is refused");
for (const m of [done, refused, unheld]) decode(encode(m));
console.log(process.exitCode ? "failed" : "ok");
