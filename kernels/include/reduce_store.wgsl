// Included (kernels.wgsl_source) by the kernels that share it: the end of the qmatvec family
// (qmatvec, qmatvec_silu, qmatvec_norm and their f16 twins; needs `partial`, `p`, `y`, WG, TPR,
// ROWS, QUADS). Called from main in uniform control flow, once each thread has written its
// partial sums (partial[t]: rows m0..m0+3, partial[WG + t]: rows m0+4..m0+7).

// Add the TPR lanes of each output together and store row r's sum times scale[r / 4][r % 4]
// (1 except in qmatvec_norm: each row's inverse RMS) at y, added to y when p.accumulate.
fn reduce_store(t: u32, lane: u32, n: u32, m0: u32, scale_lo: vec4<f32>, scale_hi: vec4<f32>) {
  sum_partials(t, lane, TPR);
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
        y[i] = previous + partial[(r / 4u) * WG + t][r % 4u] * scale[r % 4u];
      }
    }
  }
}

// #include "sum_partials.wgsl"
