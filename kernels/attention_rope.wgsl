// RoPE, the KV store and attention in one dispatch, for decode batches (the layer program's fused
// path): workgroup (head, r, split) turns query head `head` of row r by RoPE as rope.wgsl does,
// writes the keys (turned) and values that this batch brings to row r's session, at positions up
// to positions[r], into the caches as kv_store.wgsl does, then walks the keys exactly as
// attention.wgsl (include/attention_walk.wgsl). The fused qkv rows are only read: the turned
// query stays in workgroup memory.
//
// No workgroup can wait on another's cache writes, so each writes every key and value it will
// read itself, for its KV head: a row's own, and in a batch that carries several consecutive
// positions of one session (a short prefill or a replay) those of the session's earlier rows. The
// n_heads / n_kv query heads of a KV head (and each split, and later rows of the session) write
// the same bits to the same places: no write leaves another value there, and storageBarrier makes
// a workgroup's own writes visible to its walk. Rows come from num_workgroups.y (the grid is
// (n_heads, rows, splits)).

struct Params {
// #include "attention_params.wgsl"
  k_col: u32,       // first key column of a qkv row
  v_col: u32,       // first value column of a qkv row
}

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> qkv: array<f32>;
@group(0) @binding(2) var<storage, read> positions: array<u32>;
@group(0) @binding(3) var<storage, read> slots: array<u32>;
@group(0) @binding(4) var<storage, read> freq_turns: array<vec4<f32>>;  // (hi, mid, lo, 0) per pair: rope.wgsl's
@group(0) @binding(5) var<storage, read_write> k_cache: array<vec4<f32>>;
@group(0) @binding(6) var<storage, read_write> v_cache: array<vec4<f32>>;
@group(0) @binding(7) var<storage, read_write> out: array<f32>;
// [row][head][split]: LANES vec4s of the split's V sum, then (max, sum, 0, 0)
@group(0) @binding(8) var<storage, read_write> parts: array<vec4<f32>>;

// #include "attention_walk.wgsl"

// x0, x1 of pair i turned by position pos: rope.wgsl's arithmetic, operation for operation
fn turn_pair(x0: f32, x1: f32, pos: u32, i: u32) -> vec2<f32> {
  let fpos = f32(pos);
  let freq = freq_turns[i];
  let turns = fract(fpos * freq.x) + fract(fpos * freq.y) + fpos * freq.z;
  let angle = (turns - round(turns)) * 6.2831853071795864;
  let c = cos(angle);
  let s = sin(angle);
  return vec2<f32>(x0 * c - x1 * s, x0 * s + x1 * c);
}

// dimensions 4 lane .. 4 lane + 3 of the head starting at qkv[at - 4 lane], turned (pairs 2 lane, 2 lane + 1)
fn turned(at: u32, pos: u32, lane: u32) -> vec4<f32> {
  let a = turn_pair(qkv[at], qkv[at + 1u], pos, 2u * lane);
  let b = turn_pair(qkv[at + 2u], qkv[at + 3u], pos, 2u * lane + 1u);
  return vec4<f32>(a, b);
}

@compute @workgroup_size(WG)
fn main(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) grid: vec3<u32>,
        @builtin(local_invocation_index) t: u32) {
  let head = wid.x;
  let r = wid.y;
  let kv_head = head / (p.n_heads / p.n_kv);
  let slot = slots[r];
  let pos = positions[r];
  if (t < LANES) {
    q_head[t] = turned(r * p.q_stride + p.q_col + head * HEAD_DIM + 4u * t, pos, t) * p.scale;
  }
  for (var j = t; j < grid.y * LANES; j += WG) {
    let row = j / LANES;
    let lane = j % LANES;
    let at_pos = positions[row];
    if (slots[row] == slot && at_pos <= pos) {
      let dst = ((slot * p.n_kv + kv_head) * p.ctx + at_pos) * LANES + lane;
      let src = row * p.q_stride + kv_head * HEAD_DIM + 4u * lane;
      k_cache[dst] = turned(src + p.k_col, at_pos, lane);
      let v = src + p.v_col;
      v_cache[dst] = vec4<f32>(qkv[v], qkv[v + 1u], qkv[v + 2u], qkv[v + 3u]);
    }
  }
  storageBarrier();
  workgroupBarrier();
  attend(head, r, wid.z, t);
}
