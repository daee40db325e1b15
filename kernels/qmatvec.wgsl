// Quantized matrix-vector product (decode): y[m, y_col + n] (+)= sum_k x[m, k] * W[n, k].
//
// W is a kernels/quant.py tensor: rows contiguous along k, every 32 inputs packed into BITS
// u32 words, one f16 scale (and f16 min when asymmetric) per GROUP inputs. Batch row m is
// workgroup_id.y. Each workgroup computes WG / TPR outputs; the TPR threads of one output
// walk its 32-input blocks in turn (neighbouring threads read neighbouring words, so loads
// coalesce), then a workgroup tree reduction sums their partial dot products.
//
// Per block the thread accumulates (q . x, sum x) and applies the group's scale and min
// once: sum_j (scale*q_j + min) x_j = scale*(q . x) + min*(sum x).

override BITS: u32 = 4u;          // 2, 3, 4 or 8
override GROUP: u32 = 32u;        // inputs per scale: 32, 64 or 128
override SYMMETRIC: bool = false; // w = scale*(q - 2^(BITS-1)) instead of scale*q + min
override WG: u32 = 256u;          // threads per workgroup
override TPR: u32 = 16u;          // threads per output row: a power of two dividing WG

struct Params {
  n: u32,          // output rows of W (in this buffer)
  k: u32,          // logical inputs; W rows are padded to a multiple of GROUP
  x_stride: u32,   // x row stride in f32, a multiple of 4
  y_stride: u32,   // y row stride in f32
  y_col: u32,      // first column of y written
  accumulate: u32, // 1: add onto y (the residual stream), 0: overwrite
}

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> qweight: array<u32>;
@group(0) @binding(2) var<storage, read> scales: array<u32>;
@group(0) @binding(3) var<storage, read> x: array<vec4<f32>>;
@group(0) @binding(4) var<storage, read_write> y: array<f32>;

var<workgroup> partial: array<f32, WG>;

// (scale, min) of group g of row n, so that w = scale * q + min.
fn scale_min(n: u32, g: u32, groups: u32) -> vec2<f32> {
  if (SYMMETRIC) {
    let pair = unpack2x16float(scales[n * ((groups + 1u) / 2u) + g / 2u]);
    let s = select(pair.x, pair.y, (g & 1u) == 1u);
    return vec2<f32>(s, -s * f32(1u << (BITS - 1u)));
  }
  return unpack2x16float(scales[n * groups + g]);
}

// Four inputs of x starting at input j0 of the block; inputs at or past `valid` read as 0
// (the last block of a row whose k is not a multiple of 32).
fn load_x(i: u32, j0: u32, valid: u32) -> vec4<f32> {
  let v = x[i];
  if (valid >= 32u) {
    return v;
  }
  return select(vec4<f32>(0.0), v, vec4<u32>(j0) + vec4<u32>(0u, 1u, 2u, 3u) < vec4<u32>(valid));
}

// (q . x, sum x) over one 32-input block whose words start at qweight[wbase] and whose
// inputs start at x[xbase] (a vec4 index).
fn block_dot(wbase: u32, xbase: u32, valid: u32) -> vec2<f32> {
  var qx = vec4<f32>(0.0);
  var xs = vec4<f32>(0.0);
  if (BITS == 3u) {
    // words 0-1: low two bits of inputs 0-15 and 16-31; word 2: the high bit of input j at bit j
    let high = qweight[wbase + 2u];
    for (var plane = 0u; plane < 2u; plane++) {
      let low = qweight[wbase + plane];
      for (var s = 0u; s < 4u; s++) {
        let j0 = plane * 16u + s * 4u;
        let lo2 = (vec4<u32>(low) >> (vec4<u32>(0u, 2u, 4u, 6u) + 8u * s)) & vec4<u32>(3u);
        let hi1 = (vec4<u32>(high) >> (vec4<u32>(0u, 1u, 2u, 3u) + j0)) & vec4<u32>(1u);
        let xv = load_x(xbase + j0 / 4u, j0, valid);
        qx += vec4<f32>(lo2 | (hi1 << vec4<u32>(2u))) * xv;
        xs += xv;
      }
    }
  } else {
    // input j sits in word j*BITS/32 at bit j*BITS%32
    let per_word = 32u / BITS;
    let mask = vec4<u32>((1u << BITS) - 1u);
    let lane_shift = vec4<u32>(0u, 1u, 2u, 3u) * BITS;
    for (var w = 0u; w < BITS; w++) {
      let word = vec4<u32>(qweight[wbase + w]);
      for (var s = 0u; s < per_word / 4u; s++) {
        let j0 = w * per_word + s * 4u;
        let xv = load_x(xbase + j0 / 4u, j0, valid);
        qx += vec4<f32>((word >> (lane_shift + 4u * BITS * s)) & mask) * xv;
        xs += xv;
      }
    }
  }
  let ones = vec4<f32>(1.0);
  return vec2<f32>(dot(qx, ones), dot(xs, ones));
}

@compute @workgroup_size(WG)
fn main(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_index) t: u32) {
  let lane = t % TPR;
  let n = wid.x * (WG / TPR) + t / TPR;
  let m = wid.y;
  let groups = (p.k + GROUP - 1u) / GROUP;
  let words_per_row = groups * GROUP / 32u * BITS;
  let blocks = (p.k + 31u) / 32u;  // blocks made only of padding are skipped
  var acc = 0.0;
  if (n < p.n) {
    for (var b = lane; b < blocks; b += TPR) {
      let qs = block_dot(n * words_per_row + b * BITS, m * (p.x_stride / 4u) + b * 8u, min(32u, p.k - b * 32u));
      let sm = scale_min(n, b * 32u / GROUP, groups);
      acc += sm.x * qs.x + sm.y * qs.y;
    }
  }
  partial[t] = acc;
  workgroupBarrier();
  for (var stride = TPR / 2u; stride > 0u; stride >>= 1u) {
    if (lane < stride) {
      partial[t] += partial[t + stride];
    }
    workgroupBarrier();
  }
  if (lane == 0u && n < p.n) {
    let i = m * p.y_stride + p.y_col + n;
    var previous = 0.0;
    if (p.accumulate != 0u) {
      previous = y[i];
    }
    y[i] = previous + partial[t];
  }
}
