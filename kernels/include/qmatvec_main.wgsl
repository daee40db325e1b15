// Included (kernels.wgsl_source) by the kernels that share it: the body of qmatvec and qmatvec_silu: they differ only in load_x / load_quad.

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
  reduce_store(t, lane, n, m0, vec4<f32>(1.0), vec4<f32>(1.0));
}
