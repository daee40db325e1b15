// KV-cache write: row r's keys and values (n_kv * head_dim columns of src, at k_col and
// v_col) go to position positions[r] of cache slot slots[r]. The caches are f32
// [slot][kv head][ctx][head_dim]: one slot per session, so one dispatch serves a batch that
// mixes sessions. Writing a position again overwrites it (a replayed session).

override WG: u32 = 64u;

struct Params {
  n_kv: u32,
  head_dim: u32,
  ctx: u32,         // positions per slot
  src_stride: u32,  // src row stride in f32
  k_col: u32,
  v_col: u32,
}

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> src: array<f32>;
@group(0) @binding(2) var<storage, read> positions: array<u32>;
@group(0) @binding(3) var<storage, read> slots: array<u32>;
@group(0) @binding(4) var<storage, read_write> k_cache: array<f32>;
@group(0) @binding(5) var<storage, read_write> v_cache: array<f32>;

@compute @workgroup_size(WG)
fn main(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_index) t: u32) {
  let r = wid.y;
  let e = wid.x * WG + t;
  if (e >= p.n_kv * p.head_dim) {
    return;
  }
  let head = e / p.head_dim;
  let dst = ((slots[r] * p.n_kv + head) * p.ctx + positions[r]) * p.head_dim + e % p.head_dim;
  k_cache[dst] = src[r * p.src_stride + p.k_col + e];
  v_cache[dst] = src[r * p.src_stride + p.v_col + e];
}
