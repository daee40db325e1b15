// RMSNorm: y[r, i] = x[r, i] / sqrt(mean_i(x[r, :]^2) + eps) * weight[i].
// One workgroup per row (workgroup_id.x); a tree reduction sums the squares.

override WG: u32 = 256u;  // a power of two

struct Params {
  n: u32,         // row length
  x_stride: u32,  // x row stride in f32
  y_stride: u32,  // y row stride in f32
  eps: f32,
}

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> x: array<f32>;
@group(0) @binding(2) var<storage, read> weight: array<f32>;
@group(0) @binding(3) var<storage, read_write> y: array<f32>;

var<workgroup> partial: array<f32, WG>;

@compute @workgroup_size(WG)
fn main(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_index) t: u32) {
  let xrow = wid.x * p.x_stride;
  var squares = 0.0;
  for (var i = t; i < p.n; i += WG) {
    let v = x[xrow + i];
    squares += v * v;
  }
  partial[t] = squares;
  workgroupBarrier();
  for (var stride = WG / 2u; stride > 0u; stride >>= 1u) {
    if (t < stride) {
      partial[t] += partial[t + stride];
    }
    workgroupBarrier();
  }
  let inv_rms = inverseSqrt(partial[0] / f32(p.n) + p.eps);
  let yrow = wid.x * p.y_stride;
  for (var i = t; i < p.n; i += WG) {
    y[yrow + i] = x[xrow + i] * inv_rms * weight[i];
  }
}
