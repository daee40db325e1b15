// Residual add: y[r, i] += x[r, i]. (The layer's own residual adds are fused into its
// output matmuls through their `accumulate` flag; this kernel serves everyone else.)

override WG: u32 = 64u;

struct Params {
  n: u32,         // columns
  x_stride: u32,  // x row stride in f32
  y_stride: u32,  // y row stride in f32
}

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> x: array<f32>;
@group(0) @binding(2) var<storage, read_write> y: array<f32>;

@compute @workgroup_size(WG)
fn main(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_index) t: u32) {
  let r = wid.y;
  let i = wid.x * WG + t;
  if (i < p.n) {
    y[r * p.y_stride + i] += x[r * p.x_stride + i];
  }
}
