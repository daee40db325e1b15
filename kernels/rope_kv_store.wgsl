// rope.wgsl and kv_store.wgsl in one dispatch (decode and prefill): in row r of a fused qkv
// buffer, the n_heads query heads (from column 0) and the n_kv key heads (from k_col) turn by
// RoPE in place, exactly as rope.wgsl turns them, and the turned keys and the values (from
// v_col) go to position positions[r] of cache slot slots[r], as kv_store.wgsl writes them.
// One thread per pair of columns: n_heads * head_dim/2 query pairs, then as many key pairs
// and value pairs per KV head; workgroup_id.y is the row. See rope.wgsl for the angle.

override WG: u32 = 64u;

struct Params {
  n_heads: u32,     // query heads
  n_kv: u32,        // key (and value) heads
  head_dim: u32,
  ctx: u32,         // positions per cache slot
  x_stride: u32,    // x row stride in f32
  k_col: u32,       // first key column (queries start at column 0)
  v_col: u32,       // first value column
}

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read_write> x: array<f32>;
@group(0) @binding(2) var<storage, read> positions: array<u32>;
@group(0) @binding(3) var<storage, read> slots: array<u32>;
@group(0) @binding(4) var<storage, read> freq_turns: array<vec4<f32>>;  // (hi, mid, lo, 0) per pair
@group(0) @binding(5) var<storage, read_write> k_cache: array<f32>;
@group(0) @binding(6) var<storage, read_write> v_cache: array<f32>;

@compute @workgroup_size(WG)
fn main(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_index) t: u32) {
  let r = wid.y;
  let half = p.head_dim / 2u;
  let q_pairs = p.n_heads * half;
  let kv_pairs = p.n_kv * half;
  let pair = wid.x * WG + t;
  if (pair >= q_pairs + 2u * kv_pairs) {
    return;
  }
  let row = r * p.x_stride;
  let pos = positions[r];
  if (pair >= q_pairs + kv_pairs) {  // a value pair: copied to the cache
    let e = 2u * (pair - q_pairs - kv_pairs);
    let dst = ((slots[r] * p.n_kv + e / p.head_dim) * p.ctx + pos) * p.head_dim + e % p.head_dim;
    v_cache[dst] = x[row + p.v_col + e];
    v_cache[dst + 1u] = x[row + p.v_col + e + 1u];
    return;
  }
  let is_key = pair >= q_pairs;
  let kp = select(pair, pair - q_pairs, is_key);  // pair index within the q (or k) heads
  let i = kp % half;
  let fpos = f32(pos);
  let freq = freq_turns[i];
  let turns = fract(fpos * freq.x) + fract(fpos * freq.y) + fpos * freq.z;
  let angle = (turns - round(turns)) * 6.2831853071795864;
  let c = cos(angle);
  let s = sin(angle);
  let at = row + select(0u, p.k_col, is_key) + (kp / half) * p.head_dim + 2u * i;
  let x0 = x[at];
  let x1 = x[at + 1u];
  let y0 = x0 * c - x1 * s;
  let y1 = x0 * s + x1 * c;
  x[at] = y0;
  x[at + 1u] = y1;
  if (is_key) {
    let e = 2u * kp;
    let dst = ((slots[r] * p.n_kv + e / p.head_dim) * p.ctx + pos) * p.head_dim + e % p.head_dim;
    k_cache[dst] = y0;
    k_cache[dst + 1u] = y1;
  }
}
