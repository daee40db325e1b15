// The second half of split-K attention (attention.wgsl with p.splits > 1): workgroup
// (head, r) folds row r's `splits` partials of query head `head` (each an unnormalised V sum
// with its running max and sum of weights) into the attention output:
// out = sum_s acc_s exp(m_s - m) / sum_s l_s exp(m_s - m), m the largest m_s. A split that
// saw no key has m_s = -3e38 and l_s = 0: its weight exp(m_s - m) is 0.

override WG: u32 = 32u;
override HEAD_DIM: u32 = 64u;  // a multiple of 4
override LANES: u32 = HEAD_DIM / 4u;

struct Params {
  n_heads: u32,
  splits: u32,
  out_stride: u32,  // out row stride in f32
}

@group(0) @binding(0) var<uniform> p: Params;
// [row][head][split]: LANES vec4s of the split's V sum, then (max, sum, 0, 0)
@group(0) @binding(1) var<storage, read> parts: array<vec4<f32>>;
@group(0) @binding(2) var<storage, read_write> out: array<f32>;

const NONE = -3.0e38;

// #include "store_head.wgsl"

@compute @workgroup_size(WG)
fn main(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_index) t: u32) {
  let head = wid.x;
  let r = wid.y;
  let first = (r * p.n_heads + head) * p.splits * (LANES + 1u);
  var m = NONE;
  for (var s = 0u; s < p.splits; s++) {
    m = max(m, parts[first + s * (LANES + 1u) + LANES].x);
  }
  for (var lane = t; lane < LANES; lane += WG) {
    var sum = 0.0;
    var acc = vec4<f32>(0.0);
    for (var s = 0u; s < p.splits; s++) {
      let at = first + s * (LANES + 1u);
      let info = parts[at + LANES];
      let w = exp(info.x - m);
      sum += info.y * w;
      acc += parts[at + lane] * w;
    }
    store_head(r, head, lane, acc / sum);
  }
}
