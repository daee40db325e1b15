// Included (kernels.wgsl_source) by the f32 kernels of the qmatvec family (qmatvec, qmatvec_silu,
// qmatvec_norm; needs `p`, `partial`, codes4, scale_min, row_starts and the kernel's own load_x /
// load_quad, which say what the "x" of x . w is: x itself, silu(gate) * up, or x * norm_weight).

// This thread's share of output n's dot products with batch rows m0..m0+ROWS-1 (rows m0..m0+3 in
// .lo, just .lo.x when ROWS == 1; m0+4..m0+7 in .hi), for reduce_store. Per block the thread accumulates (q . x, sum x) per row and applies the
// group's scale and min once: sum_j (scale*q_j + min) x_j = scale*(q . x) + min*(sum x).
fn qmatvec_blocks(t: u32, lane: u32, n: u32, m0: u32) -> RowSums {
  let groups = (p.k + GROUP - 1u) / GROUP;
  let words_per_row = groups * GROUP / 32u * BITS;
  let blocks = (p.k + 31u) / 32u;  // blocks made only of padding are skipped
  let rows_lo = row_starts(m0);
  let rows_hi = row_starts(m0 + 4u);
  let ones = vec4<f32>(1.0);
  var acc_lo = vec4<f32>(0.0);
  var acc_hi = vec4<f32>(0.0);
  if (n < p.n) {
    for (var b = lane; b < blocks; b += TPR) {
      let wbase = n * words_per_row + b * BITS;
      let valid = min(32u, p.k - b * 32u);
      let sm = scale_min(n, b * 32u / GROUP, groups);
      if (ROWS == 1u) {
        var qx = vec4<f32>(0.0);
        var xs = vec4<f32>(0.0);
        for (var j0 = 0u; j0 < 32u; j0 += 4u) {
          let xv = load_x(rows_lo.x + b * 8u + j0 / 4u, j0, valid, b * 8u + j0 / 4u);
          qx += codes4(wbase, j0) * xv;
          xs += xv;
        }
        acc_lo.x += sm.x * dot(qx, ones);
        if (!SYMMETRIC) {  // symmetric codes come offset from codes4: no min term
          acc_lo.x += sm.y * dot(xs, ones);
        }
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
        acc_lo += sm.x * qx_lo;
        acc_hi += sm.x * qx_hi;
        if (!SYMMETRIC) {
          acc_lo += sm.y * xs_lo;
          acc_hi += sm.y * xs_hi;
        }
      }
    }
  }
  return RowSums(acc_lo, acc_hi);
}
