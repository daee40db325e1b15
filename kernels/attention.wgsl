// Causal grouped-query attention against the KV cache, for decode and prefill alike: query
// head `head` of row r (workgroup (head, r, split)) attends to cache positions
// [0, positions[r]] of slot slots[r], its own key included (kv_store.wgsl ran first). The walk
// over the keys, split-K included, is include/attention_walk.wgsl's, shared with
// attention_rope.wgsl (RoPE and the KV store folded in, for decode batches).

struct Params {
// #include "attention_params.wgsl"
}

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> q: array<f32>;
@group(0) @binding(2) var<storage, read> positions: array<u32>;
@group(0) @binding(3) var<storage, read> slots: array<u32>;
@group(0) @binding(4) var<storage, read> k_cache: array<vec4<f32>>;
@group(0) @binding(5) var<storage, read> v_cache: array<vec4<f32>>;
@group(0) @binding(6) var<storage, read_write> out: array<f32>;
// [row][head][split]: LANES vec4s of the split's V sum, then (max, sum, 0, 0)
@group(0) @binding(7) var<storage, read_write> parts: array<vec4<f32>>;

// #include "attention_walk.wgsl"

@compute @workgroup_size(WG)
fn main(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_index) t: u32) {
  let head = wid.x;
  let r = wid.y;
  if (t < LANES) {
    let at = r * p.q_stride + p.q_col + head * HEAD_DIM + 4u * t;
    q_head[t] = vec4<f32>(q[at], q[at + 1u], q[at + 2u], q[at + 3u]) * p.scale;
  }
  workgroupBarrier();
  attend(head, r, wid.z, t);
}
