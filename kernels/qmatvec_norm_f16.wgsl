enable f16;
// qmatvec_norm.wgsl in half precision, for devices with shader-f16: the RMSNorm folded into
// qmatvec_f16.wgsl. The prologue (each row's 1 / sqrt(mean(x^2) + eps)) is qmatvec_norm.wgsl's,
// in f32; each input x * (1/rms) * norm_weight is formed in f32 and then rounded to f16, and
// from there on everything is qmatvec_f16.wgsl's (see it for what is f16 and what is not).
// The normalised input is what is rounded (the f32 kernel scales each row's sum by 1/rms at
// the end instead), so the f16 inputs sit near unit scale whatever the residual stream holds.
// Params, bindings and the work split are qmatvec_norm.wgsl's.

override BITS: u32 = 4u;          // 2, 3, 4 or 8
override GROUP: u32 = 32u;        // inputs per scale: 32, 64 or 128
override SYMMETRIC: bool = false; // w = scale*(q - 2^(BITS-1)) instead of scale*q + min
override WG: u32 = 256u;          // threads per workgroup
override TPR: u32 = 16u;          // threads per output row: a power of two dividing WG
override ROWS: u32 = 1u;          // batch rows per workgroup: 1, 4 or 8

struct Params {
  n: u32,          // output rows of W (in this buffer)
  k: u32,          // logical inputs; W rows are padded to a multiple of GROUP
  m: u32,          // batch rows
  x_stride: u32,   // x row stride in f32, a multiple of 4
  y_stride: u32,   // y row stride in f32
  y_col: u32,      // first column of y written
  accumulate: u32, // 1: add onto y (the residual stream), 0: overwrite
  eps: f32,        // RMSNorm epsilon
}

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> qweight: array<u32>;
@group(0) @binding(2) var<storage, read> scales: array<u32>;
@group(0) @binding(3) var<storage, read> x: array<vec4<f32>>;
@group(0) @binding(4) var<storage, read_write> y: array<f32>;
@group(0) @binding(5) var<storage, read> norm_weight: array<vec4<f32>>;  // k floats (buffer padded to 16 bytes)

override QUADS: u32 = (ROWS + 3u) / 4u;
var<workgroup> partial: array<vec4<f32>, WG * QUADS>;  // [quad of rows][thread]
var<workgroup> inv_rms: array<vec4<f32>, 2>;  // rows m0..m0+3, m0+4..m0+7

// #include "scale_min.wgsl"

// #include "codes4_f16.wgsl"

// #include "reduce_store.wgsl"

// Four inputs x * inv * norm_weight at vec4 index i, block input j0 (norm_weight's vec4 index
// is i's offset within the row: i - row start), inv the row's 1/rms; inputs at or past
// `valid` read as 0.
fn load_x(i: u32, j0: u32, valid: u32, wi: u32, inv: f32) -> vec4<f32> {
  let v = x[i] * inv * norm_weight[wi];
  if (valid >= 32u) {
    return v;
  }
  return select(vec4<f32>(0.0), v, vec4<u32>(j0) + vec4<u32>(0u, 1u, 2u, 3u) < vec4<u32>(valid));
}

// The four rows of x starting at vec4 index xi of rows r0..r3 (vec4 indices of row starts),
// inv their 1/rms.
fn load_quad(r: vec4<u32>, xi: u32, j0: u32, valid: u32, inv: vec4<f32>) -> mat4x4<f32> {
  return mat4x4<f32>(load_x(r.x + xi, j0, valid, xi, inv.x), load_x(r.y + xi, j0, valid, xi, inv.y),
                     load_x(r.z + xi, j0, valid, xi, inv.z), load_x(r.w + xi, j0, valid, xi, inv.w));
}

// x[i] with inputs at or past k (counting from the row's first input, vec4 index c) as 0.
fn x_masked(i: u32, c: u32, k: u32) -> vec4<f32> {
  return select(vec4<f32>(0.0), x[i], vec4<u32>(4u * c) + vec4<u32>(0u, 1u, 2u, 3u) < vec4<u32>(k));
}

@compute @workgroup_size(WG)
fn main(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_index) t: u32) {
  let lane = t % TPR;
  let n = wid.x * (WG / TPR) + t / TPR;
  let m0 = wid.y * ROWS;
  let groups = (p.k + GROUP - 1u) / GROUP;
  let words_per_row = groups * GROUP / 32u * BITS;
  let blocks = (p.k + 31u) / 32u;  // blocks made only of padding are skipped
  // vec4 index of each batch row's start; rows past m re-read the last row (never written)
  let row_vec4s = p.x_stride / 4u;
  let last = p.m - 1u;
  let rows_lo = min(vec4<u32>(m0) + vec4<u32>(0u, 1u, 2u, 3u), vec4<u32>(last)) * row_vec4s;
  let rows_hi = min(vec4<u32>(m0) + vec4<u32>(4u, 5u, 6u, 7u), vec4<u32>(last)) * row_vec4s;
  let ones = vec4<f32>(1.0);
  // prologue: sum of squares of each of the ROWS rows, then 1/rms per row
  var sq_lo = vec4<f32>(0.0);
  var sq_hi = vec4<f32>(0.0);
  for (var c = t; c < (p.k + 3u) / 4u; c += WG) {
    let a0 = x_masked(rows_lo.x + c, c, p.k);
    sq_lo.x += dot(a0, a0);
    if (ROWS > 1u) {
      let a1 = x_masked(rows_lo.y + c, c, p.k);
      let a2 = x_masked(rows_lo.z + c, c, p.k);
      let a3 = x_masked(rows_lo.w + c, c, p.k);
      sq_lo += vec4<f32>(0.0, dot(a1, a1), dot(a2, a2), dot(a3, a3));
    }
    if (ROWS > 4u) {
      let a4 = x_masked(rows_hi.x + c, c, p.k);
      let a5 = x_masked(rows_hi.y + c, c, p.k);
      let a6 = x_masked(rows_hi.z + c, c, p.k);
      let a7 = x_masked(rows_hi.w + c, c, p.k);
      sq_hi += vec4<f32>(dot(a4, a4), dot(a5, a5), dot(a6, a6), dot(a7, a7));
    }
  }
  partial[t] = sq_lo;
  if (QUADS > 1u) {
    partial[WG + t] = sq_hi;
  }
  workgroupBarrier();
  for (var stride = WG / 2u; stride > 0u; stride >>= 1u) {
    if (t < stride) {
      partial[t] += partial[t + stride];
      if (QUADS > 1u) {
        partial[WG + t] += partial[WG + t + stride];
      }
    }
    workgroupBarrier();
  }
  if (t == 0u) {
    inv_rms[0] = inverseSqrt(partial[0] / f32(p.k) + vec4<f32>(p.eps));
    if (QUADS > 1u) {
      inv_rms[1] = inverseSqrt(partial[(QUADS - 1u) * WG] / f32(p.k) + vec4<f32>(p.eps));  // partial[WG], indexed so that it stays in bounds when QUADS == 1
    }
  }
  workgroupBarrier();  // partial is reused below

  let inv_lo = inv_rms[0];
  let inv_hi = inv_rms[1];  // unset (and unused) when ROWS <= 4
  var acc = vec4<f32>(0.0);          // ROWS == 1: four lanes of row m0's sum
  var acc_lo = mat4x4<f32>();        // column r: four lanes of row m0+r's sum
  var acc_hi = mat4x4<f32>();        // rows m0+4..m0+7
  if (n < p.n) {
    for (var b = lane; b < blocks; b += TPR) {
      let wbase = n * words_per_row + b * BITS;
      let valid = min(32u, p.k - b * 32u);
      let sm = scale_min(n, b * 32u / GROUP, groups);
      for (var j0 = 0u; j0 < 32u; j0 += 4u) {
        let w = weights4(wbase, j0, sm);
        if (ROWS == 1u) {
          acc += vec4<f32>(w * vec4<f16>(load_x(rows_lo.x + b * 8u + j0 / 4u, j0, valid, b * 8u + j0 / 4u, inv_lo.x)));
        } else {
          acc_lo += products(w, load_quad(rows_lo, b * 8u + j0 / 4u, j0, valid, inv_lo));
          if (ROWS > 4u) {
            acc_hi += products(w, load_quad(rows_hi, b * 8u + j0 / 4u, j0, valid, inv_hi));
          }
        }
      }
    }
  }
  if (ROWS == 1u) {
    partial[t] = vec4<f32>(dot(acc, ones), 0.0, 0.0, 0.0);
  } else {
    partial[t] = ones * acc_lo;  // row r's sum in component r
  }
  if (QUADS > 1u) {
    partial[WG + t] = ones * acc_hi;
  }
  reduce_store(t, lane, n, m0, vec4<f32>(1.0), vec4<f32>(1.0));
}
