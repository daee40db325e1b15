enable f16;
// qmatvec_silu.wgsl in half precision, for devices with shader-f16: silu_gate.wgsl folded into
// qmatvec_f16.wgsl's input load. Each input silu(gate) * up is formed in f32 and rounded to
// f16; from there on everything is qmatvec_f16.wgsl's (see it for what is f16 and what is
// not). Params, bindings and the work split are qmatvec_silu.wgsl's.

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
  up_col: u32,     // column of the up projection in each x row, a multiple of 4
}

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> qweight: array<u32>;
@group(0) @binding(2) var<storage, read> scales: array<u32>;
@group(0) @binding(3) var<storage, read> x: array<vec4<f32>>;
@group(0) @binding(4) var<storage, read_write> y: array<f32>;

override QUADS: u32 = (ROWS + 3u) / 4u;
var<workgroup> partial: array<vec4<f32>, WG * QUADS>;  // [quad of rows][thread]

// (scale, min) of group g of row n, so that w = scale * q + min.
fn scale_min(n: u32, g: u32, groups: u32) -> vec2<f32> {
  if (SYMMETRIC) {
    let pair = unpack2x16float(scales[n * ((groups + 1u) / 2u) + g / 2u]);
    let s = select(pair.x, pair.y, (g & 1u) == 1u);
    return vec2<f32>(s, -s * f32(1u << (BITS - 1u)));
  }
  return unpack2x16float(scales[n * groups + g]);
}

// The codes of inputs j0..j0+3 (j0 a multiple of 4) of the block at qweight[wbase].
fn codes4(wbase: u32, j0: u32) -> vec4<u32> {
  if (BITS == 3u) {
    // words 0-1: low two bits of inputs 0-15 and 16-31; word 2: the high bit of input j at bit j
    let low = vec4<u32>(qweight[wbase + j0 / 16u]) >> (vec4<u32>(0u, 2u, 4u, 6u) + 2u * (j0 % 16u));
    let high = vec4<u32>(qweight[wbase + 2u]) >> (vec4<u32>(0u, 1u, 2u, 3u) + j0);
    return (low & vec4<u32>(3u)) | ((high & vec4<u32>(1u)) << vec4<u32>(2u));
  }
  // input j sits in word j*BITS/32 at bit j*BITS%32
  let word = vec4<u32>(qweight[wbase + j0 * BITS / 32u]);
  let shifts = vec4<u32>(0u, 1u, 2u, 3u) * BITS + (j0 * BITS) % 32u;
  return (word >> shifts) & vec4<u32>((1u << BITS) - 1u);
}

// The f16 weights of inputs j0..j0+3 of the block at qweight[wbase], group (scale, min) sm:
// scale * q is exact in f32 (11 + 8 bits), so this is one f32 rounding of the sum at most
// (none when symmetric), then the one rounding to f16, fused fma or not. (An f16 fma, unfused
// as on lavapipe, rounds scale * q first: errors up to 255 ulp of w in 8-bit asymmetric.)
fn weights4(wbase: u32, j0: u32, sm: vec2<f32>) -> vec4<f16> {
  return vec4<f16>(fma(vec4<f32>(codes4(wbase, j0)), vec4<f32>(sm.x), vec4<f32>(sm.y)));
}

// Four inputs silu(gate) * up at vec4 index i of the gate, block input j0; inputs at or past `valid` read as 0
// (the last block of a row whose k is not a multiple of 32).
fn load_x(i: u32, j0: u32, valid: u32) -> vec4<f32> {
  let g = x[i];
  let v = g / (vec4<f32>(1.0) + exp(-g)) * x[i + p.up_col / 4u];
  if (valid >= 32u) {
    return v;
  }
  return select(vec4<f32>(0.0), v, vec4<u32>(j0) + vec4<u32>(0u, 1u, 2u, 3u) < vec4<u32>(valid));
}

// The four rows of x starting at vec4 index xi of rows r0..r3 (vec4 indices of row starts).
fn load_quad(r: vec4<u32>, xi: u32, j0: u32, valid: u32) -> mat4x4<f32> {
  return mat4x4<f32>(load_x(r.x + xi, j0, valid), load_x(r.y + xi, j0, valid),
                     load_x(r.z + xi, j0, valid), load_x(r.w + xi, j0, valid));
}

// w times each of four rows of inputs (the columns of xs), rounded to f16, products widened.
fn products(w: vec4<f16>, xs: mat4x4<f32>) -> mat4x4<f32> {
  let h = mat4x4<f16>(xs);
  return mat4x4<f32>(mat4x4<f16>(w * h[0], w * h[1], w * h[2], w * h[3]));
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
          acc += vec4<f32>(w * vec4<f16>(load_x(rows_lo.x + b * 8u + j0 / 4u, j0, valid)));
        } else {
          acc_lo += products(w, load_quad(rows_lo, b * 8u + j0 / 4u, j0, valid));
          if (ROWS > 4u) {
            acc_hi += products(w, load_quad(rows_hi, b * 8u + j0 / 4u, j0, valid));
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
  workgroupBarrier();
  for (var stride = TPR / 2u; stride > 0u; stride >>= 1u) {
    if (lane < stride) {
      partial[t] += partial[t + stride];
      if (QUADS > 1u) {
        partial[WG + t] += partial[WG + t + stride];
      }
    }
    workgroupBarrier();
  }
  if (lane == 0u && n < p.n) {
    for (var r = 0u; r < ROWS; r++) {
      let m = m0 + r;
      if (m < p.m) {
        let i = m * p.y_stride + p.y_col + n;
        var previous = 0.0;
        if (p.accumulate != 0u) {
          previous = y[i];
        }
        y[i] = previous + partial[(r / 4u) * WG + t][r % 4u];
      }
    }
  }
}
