// qmatvec with silu_gate.wgsl folded into its input load (decode, the FFN down projection):
// y[m, y_col + n] (+)= sum_k silu(x[m, k]) * x[m, up_col + k] * W[n, k], silu(g) = g / (1 + exp(-g)):
// the gate is columns 0..k of each x row and the up projection columns up_col..up_col+k, as the
// fused gate/up matvec writes them. One dispatch instead of silu_gate.wgsl + qmatvec.wgsl.
// Everything below is qmatvec.wgsl's, apart from load_x.
//
//
// W is a kernels/quant.py tensor: rows contiguous along k, every 32 inputs packed into BITS
// u32 words, one f16 scale (and f16 min when asymmetric) per GROUP inputs. A workgroup
// computes WG / TPR outputs for ROWS batch rows (rows ROWS * workgroup_id.y ...): the TPR
// threads of one output walk its 32-input blocks in turn (neighbouring threads read
// neighbouring words, so loads coalesce), decode each group of 4 codes once and use it for
// all ROWS rows, then a workgroup tree reduction sums their partial dot products.
// (On CPU adapters TPR = 1 is fastest: no reduction, one output per thread.)
//
// Several rows are handled four at a time as a mat4x4 whose columns are the rows' x:
// q * X is then the four rows' dot products. Vectors and matrices stay in registers where
// a private array indexed in a loop may not (it was 8x slower on an NVIDIA GPU).
//
// Per block the thread accumulates (q . x, sum x) per row and applies the group's scale and
// min once: sum_j (scale*q_j + min) x_j = scale*(q . x) + min*(sum x).

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
fn codes4(wbase: u32, j0: u32) -> vec4<f32> {
  if (BITS == 3u) {
    // words 0-1: low two bits of inputs 0-15 and 16-31; word 2: the high bit of input j at bit j
    let low = vec4<u32>(qweight[wbase + j0 / 16u]) >> (vec4<u32>(0u, 2u, 4u, 6u) + 2u * (j0 % 16u));
    let high = vec4<u32>(qweight[wbase + 2u]) >> (vec4<u32>(0u, 1u, 2u, 3u) + j0);
    return vec4<f32>((low & vec4<u32>(3u)) | ((high & vec4<u32>(1u)) << vec4<u32>(2u)));
  }
  // input j sits in word j*BITS/32 at bit j*BITS%32
  let word = vec4<u32>(qweight[wbase + j0 * BITS / 32u]);
  let shifts = vec4<u32>(0u, 1u, 2u, 3u) * BITS + (j0 * BITS) % 32u;
  return vec4<f32>((word >> shifts) & vec4<u32>((1u << BITS) - 1u));
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
  var acc_lo = vec4<f32>(0.0);  // rows m0..m0+3 (just .x when ROWS == 1)
  var acc_hi = vec4<f32>(0.0);  // rows m0+4..m0+7
  if (n < p.n) {
    for (var b = lane; b < blocks; b += TPR) {
      let wbase = n * words_per_row + b * BITS;
      let valid = min(32u, p.k - b * 32u);
      let sm = scale_min(n, b * 32u / GROUP, groups);
      if (ROWS == 1u) {
        var qx = vec4<f32>(0.0);
        var xs = vec4<f32>(0.0);
        for (var j0 = 0u; j0 < 32u; j0 += 4u) {
          let xv = load_x(rows_lo.x + b * 8u + j0 / 4u, j0, valid);
          qx += codes4(wbase, j0) * xv;
          xs += xv;
        }
        acc_lo.x += sm.x * dot(qx, ones) + sm.y * dot(xs, ones);
      } else {
        var qx_lo = vec4<f32>(0.0);
        var xs_lo = vec4<f32>(0.0);
        var qx_hi = vec4<f32>(0.0);
        var xs_hi = vec4<f32>(0.0);
        for (var j0 = 0u; j0 < 32u; j0 += 4u) {
          let q = codes4(wbase, j0);
          let x_lo = load_quad(rows_lo, b * 8u + j0 / 4u, j0, valid);
          qx_lo += q * x_lo;
          xs_lo += ones * x_lo;
          if (ROWS > 4u) {
            let x_hi = load_quad(rows_hi, b * 8u + j0 / 4u, j0, valid);
            qx_hi += q * x_hi;
            xs_hi += ones * x_hi;
          }
        }
        acc_lo += sm.x * qx_lo + sm.y * xs_lo;
        acc_hi += sm.x * qx_hi + sm.y * xs_hi;
      }
    }
  }
  partial[t] = acc_lo;
  if (QUADS > 1u) {
    partial[WG + t] = acc_hi;
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
