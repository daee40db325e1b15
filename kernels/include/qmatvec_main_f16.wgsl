// Included (kernels.wgsl_source) by the kernels that share it: the body of qmatvec_f16 and qmatvec_silu_f16: they differ only in load_x / load_quad.

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
  reduce_store(t, lane, n, m0, vec4<f32>(1.0), vec4<f32>(1.0));
}
