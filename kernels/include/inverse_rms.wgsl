// Included (kernels.wgsl_source) by qmatvec_norm and qmatvec_norm_f16 (needs `p`, `x`, `partial`,
// `inv_rms`, row_starts, sum_partials, WG, ROWS, QUADS). Called from main in uniform control flow.

// x[i] with inputs at or past k (counting from the row's first input, vec4 index c) as 0.
fn x_masked(i: u32, c: u32, k: u32) -> vec4<f32> {
  return select(vec4<f32>(0.0), x[i], vec4<u32>(4u * c) + vec4<u32>(0u, 1u, 2u, 3u) < vec4<u32>(k));
}

// inv_rms[0] / inv_rms[1] = 1 / sqrt(mean(x^2) + eps) of batch rows m0..m0+3 / m0+4..m0+7: every
// workgroup sums the squares of its ROWS rows itself (k is small: the hidden size).
fn inverse_rms(t: u32, m0: u32) {
  let rows_lo = row_starts(m0);
  let rows_hi = row_starts(m0 + 4u);
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
  let s = sum_partials(t, t, WG, sq_lo, sq_hi);
  if (t == 0u) {
    inv_rms[0] = inverseSqrt(s.lo / f32(p.k) + vec4<f32>(p.eps));
    if (QUADS > 1u) {
      inv_rms[1] = inverseSqrt(s.hi / f32(p.k) + vec4<f32>(p.eps));
    }
  }
  workgroupBarrier();  // inv_rms is read after, and partial reused
}
