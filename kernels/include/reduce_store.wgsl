// Included (kernels.wgsl_source) by the kernels that share it: the end of the qmatvec family
// (qmatvec, qmatvec_silu, qmatvec_norm and their f16 twins; needs `partial`, `p`, `y`, WG, TPR,
// ROWS, QUADS). Called from main in uniform control flow, with each thread's sums.

// A thread's sums for batch rows m0..m0+3 (lo) and m0+4..m0+7 (hi).
struct RowSums {
  lo: vec4<f32>,
  hi: vec4<f32>,
}

// Add the TPR lanes of each output together (this thread's sums in `sums`) and store row r's sum
// times scale[r / 4][r % 4] (1 except in qmatvec_norm: each row's inverse RMS) at y, added to y
// when p.accumulate.
fn reduce_store(t: u32, lane: u32, n: u32, m0: u32, sums: RowSums, scale_lo: vec4<f32>, scale_hi: vec4<f32>) {
  let s = sum_partials(t, lane, TPR, sums.lo, sums.hi);
  if (lane == 0u && n < p.n) {
    for (var r = 0u; r < ROWS; r++) {
      let m = m0 + r;
      if (m < p.m) {
        let i = m * p.y_stride + p.y_col + n;
        var previous = 0.0;
        if (p.accumulate != 0u) {
          previous = y[i];
        }
        let scale = select(scale_lo, scale_hi, r >= 4u);
        y[i] = previous + select(s.lo, s.hi, r >= 4u)[r % 4u] * scale[r % 4u];
      }
    }
  }
}

// #include "sum_partials.wgsl"
