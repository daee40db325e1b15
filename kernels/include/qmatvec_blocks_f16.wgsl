// Included (kernels.wgsl_source) by the f16 kernels of the qmatvec family (qmatvec_f16,
// qmatvec_silu_f16, qmatvec_norm_f16; needs `p`, `partial`, weights4 / products, scale_min,
// row_starts and the kernel's own load_x / load_quad, which say what the "x" of x . w is).

// This thread's share of output n's dot products with batch rows m0..m0+ROWS-1 (rows m0..m0+3 in
// .lo, just .lo.x when ROWS == 1; m0+4..m0+7 in .hi), for reduce_store. Each row's inputs are multiplied by its entry of scale_lo / scale_hi before
// they are rounded to f16 (qmatvec_norm_f16: the row's inverse RMS; 1 for the others).
fn qmatvec_blocks(t: u32, lane: u32, n: u32, m0: u32, scale_lo: vec4<f32>, scale_hi: vec4<f32>) -> RowSums {
  let groups = (p.k + GROUP - 1u) / GROUP;
  let words_per_row = groups * GROUP / 32u * BITS;
  let blocks = (p.k + 31u) / 32u;  // blocks made only of padding are skipped
  let rows_lo = row_starts(m0);
  let rows_hi = row_starts(m0 + 4u);
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
          acc += vec4<f32>(w * vec4<f16>(load_x(rows_lo.x + b * 8u + j0 / 4u, j0, valid, b * 8u + j0 / 4u, scale_lo.x)));
        } else {
          acc_lo += products(w, load_quad(rows_lo, b * 8u + j0 / 4u, j0, valid, scale_lo));
          if (ROWS > 4u) {
            acc_hi += products(w, load_quad(rows_hi, b * 8u + j0 / 4u, j0, valid, scale_hi));
          }
        }
      }
    }
  }
  if (ROWS == 1u) {
    return RowSums(vec4<f32>(dot(acc, ones), 0.0, 0.0, 0.0), vec4<f32>(0.0));
  }
  return RowSums(ones * acc_lo, ones * acc_hi);  // row r's sum in component r
}
