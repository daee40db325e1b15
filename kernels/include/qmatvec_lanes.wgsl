// Included (kernels.wgsl_source) by the f32 kernels of the qmatvec family (qmatvec, qmatvec_silu,
// qmatvec_norm; needs `p`, `partial`, codes4, scale_min, row_starts, reduce_store, the kernel's
// own load_x / load_quad, and the overrides SPAN, OPT and EXACT): their GPU loop, chosen when SPAN < 8
// or OPT > 1 (qmatvec_blocks.wgsl stays the CPU rasterisers' loop, SPAN = 8 and OPT = 1).
// With XT > 0 it hands over to qmatvec_staged.wgsl (whole blocks a lane, x staged in workgroup memory).
//
// Why another loop: in qmatvec_blocks each of an output's TPR lanes walks whole 32-input
// blocks, so neighbouring lanes read x 128 bytes apart: on a GPU every x load of a warp touches
// 32 cache lines, and a decode step spends its time in L1 wavefronts for x, not in reading
// weights. Here lane l takes the SPAN consecutive vec4s of inputs starting at vec4 l * SPAN,
// then steps by TPR * SPAN: a warp's x loads are one contiguous run, and the weight words of
// neighbouring lanes are neighbours too. Each thread computes OPT consecutive outputs from the
// same x registers (the loads of x, the dominant L1 traffic with several batch rows, are
// divided by OPT), and each output's group scale and min are applied per vec4 of inputs:
// sum_j (scale*q_j + min) x_j = scale*(q . x) + min*(sum x), with sum x shared by the OPT outputs.

// acc plus output n's (rows m0..m0+3) share of one vec4 of inputs: qs . x per row (qs: the codes
// times the group's scale, once for all rows), plus min * sum x; every product fused into the
// running sums (16 fmas for 4 rows: scaling each row's q . x instead took 8 more operations).
fn lanes_acc(acc: vec4<f32>, sm: vec2<f32>, qs: vec4<f32>, xq: mat4x4<f32>, xs: vec4<f32>) -> vec4<f32> {
  let xt = transpose(xq);  // xt[i]: input i of the four rows
  var a = acc;
  if (!SYMMETRIC) {
    a = fma(vec4<f32>(sm.y), xs, a);  // codes4's codes are offset when SYMMETRIC: no min term
  }
  a = fma(vec4<f32>(qs.x), xt[0], a);
  a = fma(vec4<f32>(qs.y), xt[1], a);
  a = fma(vec4<f32>(qs.z), xt[2], a);
  return fma(vec4<f32>(qs.w), xt[3], a);
}

fn lanes_term1(sm: vec2<f32>, q: vec4<f32>, xv: vec4<f32>, xs: f32) -> f32 {
  if (SYMMETRIC) {
    return sm.x * dot(q, xv);
  }
  return sm.x * dot(q, xv) + sm.y * xs;
}

// Outputs n0..n0+OPT-1 for batch rows m0..m0+ROWS-1: accumulate, then reduce and store each
// (reduce_store, scaling row r by scale_lo / scale_hi as qmatvec_blocks' callers do). Called
// from main in uniform control flow.
fn qmatvec_lanes(t: u32, lane: u32, n0: u32, m0: u32, scale_lo: vec4<f32>, scale_hi: vec4<f32>) {
  if (XT > 0u) {
    qmatvec_staged(t, lane, n0, m0, scale_lo, scale_hi);
    return;
  }
  let groups = (p.k + GROUP - 1u) / GROUP;
  let words_per_row = groups * GROUP / 32u * BITS;
  let units = (p.k + 3u) / 4u;  // vec4s of inputs; the last one's tail is masked by load_x
  let rows_lo = row_starts(m0);
  let rows_hi = row_starts(m0 + 4u);
  let ones = vec4<f32>(1.0);
  // rows past n read the last row (their results are never stored)
  let last = max(p.n, 1u) - 1u;
  let n1 = min(n0 + 1u, last);
  let n2 = min(n0 + 2u, last);
  let n3 = min(n0 + 3u, last);
  let w0 = min(n0, last) * words_per_row;
  let w1 = n1 * words_per_row;
  let w2 = n2 * words_per_row;
  let w3 = n3 * words_per_row;
  var a0 = vec4<f32>(0.0);  // output n0+o: rows m0..m0+3 in a<o>, m0+4..m0+7 in h<o>
  var a1 = vec4<f32>(0.0);
  var a2 = vec4<f32>(0.0);
  var a3 = vec4<f32>(0.0);
  var h0 = vec4<f32>(0.0);
  var h1 = vec4<f32>(0.0);
  var h2 = vec4<f32>(0.0);
  var h3 = vec4<f32>(0.0);
  for (var u0 = lane * SPAN; u0 < units; u0 += TPR * SPAN) {
    let b = u0 / 8u;  // SPAN divides 8: the SPAN vec4s share one block and one group
    let g = b * 32u / GROUP;
    let valid = select(min(32u, p.k - b * 32u), 32u, EXACT);  // EXACT: a constant, and load_x's mask folds away
    let wb = b * BITS;
    let s0 = scale_min(min(n0, last), g, groups);
    var s1 = vec2<f32>(0.0);
    var s2 = vec2<f32>(0.0);
    var s3 = vec2<f32>(0.0);
    if (OPT > 1u) {
      s1 = scale_min(n1, g, groups);
    }
    if (OPT > 2u) {
      s2 = scale_min(n2, g, groups);
      s3 = scale_min(n3, g, groups);
    }
    for (var s = 0u; s < SPAN; s++) {
      let u = u0 + s;
      if (EXACT || u < units) {
        let j0 = (u % 8u) * 4u;
        if (ROWS == 1u) {
          let xv = load_x(rows_lo.x + u, j0, valid, u);
          let xs = dot(xv, ones);
          a0.x += lanes_term1(s0, codes4(w0 + wb, j0), xv, xs);
          if (OPT > 1u) {
            a1.x += lanes_term1(s1, codes4(w1 + wb, j0), xv, xs);
          }
          if (OPT > 2u) {
            a2.x += lanes_term1(s2, codes4(w2 + wb, j0), xv, xs);
            a3.x += lanes_term1(s3, codes4(w3 + wb, j0), xv, xs);
          }
        } else {
          let q0 = s0.x * codes4(w0 + wb, j0);
          var q1 = vec4<f32>(0.0);
          var q2 = vec4<f32>(0.0);
          var q3 = vec4<f32>(0.0);
          if (OPT > 1u) {
            q1 = s1.x * codes4(w1 + wb, j0);
          }
          if (OPT > 2u) {
            q2 = s2.x * codes4(w2 + wb, j0);
            q3 = s3.x * codes4(w3 + wb, j0);
          }
          let xl = load_quad(rows_lo, u, j0, valid);
          let xsl = ones * xl;
          a0 = lanes_acc(a0, s0, q0, xl, xsl);
          if (OPT > 1u) {
            a1 = lanes_acc(a1, s1, q1, xl, xsl);
          }
          if (OPT > 2u) {
            a2 = lanes_acc(a2, s2, q2, xl, xsl);
            a3 = lanes_acc(a3, s3, q3, xl, xsl);
          }
          if (ROWS > 4u) {
            let xh = load_quad(rows_hi, u, j0, valid);
            let xsh = ones * xh;
            h0 = lanes_acc(h0, s0, q0, xh, xsh);
            if (OPT > 1u) {
              h1 = lanes_acc(h1, s1, q1, xh, xsh);
            }
            if (OPT > 2u) {
              h2 = lanes_acc(h2, s2, q2, xh, xsh);
              h3 = lanes_acc(h3, s3, q3, xh, xsh);
            }
          }
        }
      }
    }
  }
  if (ROWS == 1u && OPT > 1u) {
    store_outputs(t, lane, n0, m0, vec4<f32>(a0.x, a1.x, a2.x, a3.x), scale_lo.x);
    return;
  }
  reduce_store(t, lane, n0, m0, RowSums(a0, h0), scale_lo, scale_hi);
  if (OPT > 1u) {
    reduce_store(t, lane, n0 + 1u, m0, RowSums(a1, h1), scale_lo, scale_hi);
  }
  if (OPT > 2u) {
    reduce_store(t, lane, n0 + 2u, m0, RowSums(a2, h2), scale_lo, scale_hi);
    reduce_store(t, lane, n0 + 3u, m0, RowSums(a3, h3), scale_lo, scale_hi);
  }
}

// One row's OPT outputs n0.. (this lane's sums in acc): reduced together, one vec4 per thread,
// then stored times scale (1, or the row's inverse RMS), added to y when p.accumulate.
fn store_outputs(t: u32, lane: u32, n0: u32, m0: u32, acc: vec4<f32>, scale: f32) {
  let s = sum_partials(t, lane, TPR, acc, vec4<f32>(0.0));
  if (lane == 0u) {
    for (var o = 0u; o < OPT; o++) {
      let n = n0 + o;
      if (n < p.n) {
        let i = m0 * p.y_stride + p.y_col + n;
        var previous = 0.0;
        if (p.accumulate != 0u) {
          previous = y[i];
        }
        y[i] = previous + s.lo[o] * scale;
      }
    }
  }
}
