// SiLU gate: y[r, i] = silu(gate[r, i]) * up[r, i], silu(g) = g / (1 + exp(-g)). Gate and up
// are column ranges of one src row (the fused gate/up matmul writes both).

override WG: u32 = 64u;

struct Params {
  n: u32,           // columns
  src_stride: u32,  // src row stride in f32
  gate_col: u32,
  up_col: u32,
  y_stride: u32,    // y row stride in f32
}

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> src: array<f32>;
@group(0) @binding(2) var<storage, read_write> y: array<f32>;

@compute @workgroup_size(WG)
fn main(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_index) t: u32) {
  let r = wid.y;
  let i = wid.x * WG + t;
  if (i >= p.n) {
    return;
  }
  let g = src[r * p.src_stride + p.gate_col + i];
  let u = src[r * p.src_stride + p.up_col + i];
  y[r * p.y_stride + i] = g / (1.0 + exp(-g)) * u;
}
