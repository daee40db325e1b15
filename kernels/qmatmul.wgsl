// Quantized matrix-matrix product (prefill): y[m, y_col + n] (+)= sum_k x[m, k] * W[n, k]
// for m < p.m rows at once. Same weight format as qmatvec.wgsl.
//
// A workgroup computes a TILE x TILE block of y (TILE batch rows x TILE weight rows), each
// of its TILE*TILE/16 threads a 4x4 piece. The k loop steps one 32-input block at a time:
// the threads stage that block of x and of W (dequantized once, here) in workgroup memory,
// stored k-major so a thread reads its 4 rows and its 4 columns as one vec4 each (two loads
// of workgroup memory for 16 multiply-adds); so each weight is decoded once per workgroup
// instead of once per output.

override BITS: u32 = 4u;          // 2, 3, 4 or 8
override GROUP: u32 = 32u;        // inputs per scale: 32, 64 or 128
override SYMMETRIC: bool = false; // w = scale*(q - 2^(BITS-1)) instead of scale*q + min
override CONTIG3: bool = false;   // BITS = 3: codes contiguous (input j at bit 3j of its block's 96 bits), not bit planes
override TILE: u32 = 64u;         // 64 needs 256 threads and 16 KiB of workgroup memory
override THREADS: u32 = TILE * TILE / 16u;
override PER_THREAD: u32 = 32u * TILE / THREADS;  // staged values per thread and block

struct Params {
  n: u32,          // output rows of W (in this buffer)
  k: u32,          // logical inputs; W rows are padded to a multiple of GROUP
  m: u32,          // batch rows
  x_stride: u32,   // x row stride in f32
  y_stride: u32,   // y row stride in f32
  y_col: u32,      // first column of y written
  accumulate: u32, // 1: add onto y (the residual stream), 0: overwrite
}

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> qweight: array<u32>;
@group(0) @binding(2) var<storage, read> scales: array<u32>;
@group(0) @binding(3) var<storage, read> x: array<f32>;
@group(0) @binding(4) var<storage, read_write> y: array<f32>;

var<workgroup> x_tile: array<vec4<f32>, 8u * TILE>;  // [input of the block][batch row / 4][batch row % 4]
var<workgroup> w_tile: array<vec4<f32>, 8u * TILE>;  // [input of the block][weight row / 4][weight row % 4]

// #include "scale_min.wgsl"

// #include "code_at.wgsl"

@compute @workgroup_size(THREADS)
fn main(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_index) t: u32) {
  let n0 = wid.x * TILE;
  let m0 = wid.y * TILE;
  let groups = (p.k + GROUP - 1u) / GROUP;
  let words_per_row = groups * GROUP / 32u * BITS;
  let blocks = (p.k + 31u) / 32u;
  // staging: thread t fills PER_THREAD consecutive inputs of one row of each tile
  let stage_row = t * PER_THREAD / 32u;
  let stage_j0 = t * PER_THREAD % 32u;
  // compute: thread t owns batch rows 4*ty.. and weight rows 4*tx..
  let tx = t % (TILE / 4u);
  let ty = t / (TILE / 4u);
  var acc: array<vec4<f32>, 4>;
  for (var i = 0u; i < 4u; i++) {
    acc[i] = vec4<f32>(0.0);
  }

  for (var b = 0u; b < blocks; b++) {
    let k0 = b * 32u;
    let xm = m0 + stage_row;
    let wn = n0 + stage_row;
    var sm = vec2<f32>(0.0);
    if (wn < p.n) {
      sm = scale_min(wn, k0 / GROUP, groups);
    }
    for (var i = 0u; i < PER_THREAD; i++) {
      let j = stage_j0 + i;
      var xv = 0.0;
      if (xm < p.m && k0 + j < p.k) {
        xv = x[xm * p.x_stride + k0 + j];
      }
      let at = j * TILE + stage_row;
      x_tile[at / 4u][at % 4u] = xv;
      var wv = 0.0;
      if (wn < p.n) {
        wv = sm.x * f32(code_at(wn * words_per_row + b * BITS, j)) + sm.y;
      }
      w_tile[at / 4u][at % 4u] = wv;
    }
    workgroupBarrier();
    for (var j = 0u; j < 32u; j++) {
      let xv = x_tile[j * (TILE / 4u) + ty];
      let wv = w_tile[j * (TILE / 4u) + tx];
      acc[0] += xv.x * wv;
      acc[1] += xv.y * wv;
      acc[2] += xv.z * wv;
      acc[3] += xv.w * wv;
    }
    workgroupBarrier();
  }

  for (var i = 0u; i < 4u; i++) {
    let m = m0 + ty * 4u + i;
    if (m >= p.m) {
      break;
    }
    for (var c = 0u; c < 4u; c++) {
      let n = n0 + tx * 4u + c;
      if (n < p.n) {
        let idx = m * p.y_stride + p.y_col + n;
        var previous = 0.0;
        if (p.accumulate != 0u) {
          previous = y[idx];
        }
        y[idx] = previous + acc[i][c];
      }
    }
  }
}
