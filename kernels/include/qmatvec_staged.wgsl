// Included (kernels.wgsl_source) by the f32 kernels of the qmatvec family, inside
// qmatvec_lanes.wgsl: their single-row GPU loop when XT > 0 (needs `p`, `partial`, scale_min,
// row_starts, sum_partials, the kernel's own load_x, and the overrides OPT, EXACT).
//
// Why: in the lanes loop a lane reads one 4-byte word of a block that three other lanes also
// read, so a warp asks memory for a few hundred bytes of weights per step: too little in flight
// to cover DRAM latency (H200, 7B shape: ~0.35 TB/s of the card's ~3.7). Here a lane takes whole
// 32-input blocks, all of their BITS words for each of its OPT outputs, so a warp's step asks
// for 32 lanes x OPT rows x BITS words. The price, x read 128 bytes apart by neighbouring
// lanes, is paid once per workgroup instead: the threads copy XT vec4s of x (through load_x,
// so the norm and silu prologues run once per input, not once per lane and output) into
// workgroup memory, each block's 8 vec4s rotated by the block's index, so that the 8 lanes of a
// quarter-warp reading vec4 i of 8 consecutive blocks hit 8 different bank groups.
// The codes of a block are unpacked from registers with constant shifts (q4 below).

var<workgroup> xtile: array<vec4<f32>, XT + 1u>;  // XT: the kernel's override

// The workgroup-memory slot of the chunk's vec4 v: block v / 8, rotated by the block.
fn xslot(v: u32) -> u32 {
  let b = v / 8u;
  return b * 8u + (v + b) % 8u;
}

// Codes as floats without conversions or variable shifts: a field of bits placed at bit p
// (p + width <= 23) ORed into the float 2^23 reads 2^23 + q * 2^p; times 2^-p it is
// 2^(23-p) + q exactly, and the fma's addend takes the 2^(23-p) off: q, exact. `inv` holds 2^-p.
fn placed(v: vec4<u32>, inv: vec4<f32>, addend: vec4<f32>) -> vec4<f32> {
  return fma(bitcast<vec4<f32>>(v | vec4<u32>(0x4B000000u)), inv, addend);
}

fn pow2(e: vec4<i32>) -> vec4<f32> {
  return ldexp(vec4<f32>(1.0), e);
}

// The codes of inputs j0..j0+3 of a block whose words are wa (words 0-3) and wb (4-7, 8-bit);
// called with j0 a literal, so that every shift and mask below is a constant.
fn q4(wa: vec4<u32>, wb: vec4<u32>, j0: u32) -> vec4<f32> {
  let lo_inv = pow2(vec4<i32>(0, -2, -4, -6));
  if (BITS == 3u) {
    // words 0-1: low two bits of inputs 0-15 and 16-31; word 2: the high bit of input j at bit j,
    // moved to bits pos..pos+3 with pos >= 2 so that 4 * 2^-pos <= 1 (see the sum below)
    let lo = vec4<u32>(wa[j0 / 16u] >> (2u * (j0 % 16u))) & vec4<u32>(3u, 12u, 48u, 192u);
    let up = select(0u, 4u, j0 == 0u);
    let down = select(0u, 16u, j0 >= 20u);
    let pos = j0 + up - down;
    let hi = vec4<u32>((wa.z >> down) << up) & (vec4<u32>(1u, 2u, 4u, 8u) << vec4<u32>(pos));
    let hi_inv = pow2(vec4<i32>(2) - vec4<i32>(i32(pos)) - vec4<i32>(0, 1, 2, 3));
    // lo - 2^23 * hi_inv, then + 4 * high: every partial result an integer below 2^24, exact
    let low = placed(lo, lo_inv, -8388608.0 * (lo_inv + hi_inv));
    return fma(bitcast<vec4<f32>>(hi | vec4<u32>(0x4B000000u)), hi_inv, low);
  }
  if (BITS == 2u) {
    let lo = vec4<u32>(wa[j0 / 16u] >> (2u * (j0 % 16u))) & vec4<u32>(3u, 12u, 48u, 192u);
    return placed(lo, lo_inv, -8388608.0 * lo_inv);
  }
  if (BITS == 4u) {
    let nib = vec4<u32>(wa[j0 / 8u] >> (4u * (j0 % 8u))) & vec4<u32>(0xFu, 0xF0u, 0xF00u, 0xF000u);
    let inv = pow2(vec4<i32>(0, -4, -8, -12));
    return placed(nib, inv, -8388608.0 * inv);
  }
  // 8 bits: word j0 / 4, whose top byte would reach the float's exponent: halves moved down
  let w = select(wb[(j0 / 4u) % 4u], wa[(j0 / 4u) % 4u], j0 < 16u);
  let bytes = vec4<u32>(w, w, w >> 16u, w >> 16u) & vec4<u32>(0xFFu, 0xFF00u, 0xFFu, 0xFF00u);
  let inv = pow2(vec4<i32>(0, -8, 0, -8));
  return placed(bytes, inv, -8388608.0 * inv);
}

// One output's term for one block: scale * (q . x) + min * (sum x), x the block's 8 vec4s
// (columns of xa, xb) and their sum xs.
fn staged_term(wbase: u32, sm: vec2<f32>, xa: mat4x4<f32>, xb: mat4x4<f32>, xs: f32) -> f32 {
  var wa = vec4<u32>(qweight[wbase], 0u, 0u, 0u);
  var wb = vec4<u32>(0u);
  if (BITS >= 2u) {
    wa.y = qweight[wbase + 1u];
  }
  if (BITS >= 3u) {
    wa.z = qweight[wbase + 2u];
  }
  if (BITS >= 4u) {
    wa.w = qweight[wbase + 3u];
  }
  if (BITS == 8u) {
    wb = vec4<u32>(qweight[wbase + 4u], qweight[wbase + 5u], qweight[wbase + 6u], qweight[wbase + 7u]);
  }
  let d = dot(q4(wa, wb, 0u), xa[0]) + dot(q4(wa, wb, 4u), xa[1]) + dot(q4(wa, wb, 8u), xa[2])
        + dot(q4(wa, wb, 12u), xa[3]) + dot(q4(wa, wb, 16u), xb[0]) + dot(q4(wa, wb, 20u), xb[1])
        + dot(q4(wa, wb, 24u), xb[2]) + dot(q4(wa, wb, 28u), xb[3]);
  return sm.x * d + sm.y * xs;
}

// The OPT outputs' terms (rows n, words from w) for block bt of the chunk staged from block first.
fn staged_block(bt: u32, first: u32, groups: u32, n: vec4<u32>, w: vec4<u32>) -> vec4<f32> {
  let s = bt * 8u;
  let xa = mat4x4<f32>(xtile[s + bt % 8u], xtile[s + (bt + 1u) % 8u], xtile[s + (bt + 2u) % 8u],
                       xtile[s + (bt + 3u) % 8u]);
  let xb = mat4x4<f32>(xtile[s + (bt + 4u) % 8u], xtile[s + (bt + 5u) % 8u], xtile[s + (bt + 6u) % 8u],
                       xtile[s + (bt + 7u) % 8u]);
  let xs = dot(xa[0] + xa[1] + xa[2] + xa[3] + xb[0] + xb[1] + xb[2] + xb[3], vec4<f32>(1.0));
  let b = first + bt;
  let g = b * 32u / GROUP;
  let wb = b * BITS;
  var out = vec4<f32>(0.0);
  out.x = staged_term(w.x + wb, scale_min(n.x, g, groups), xa, xb, xs);
  if (OPT > 1u) {
    out.y = staged_term(w.y + wb, scale_min(n.y, g, groups), xa, xb, xs);
  }
  if (OPT > 2u) {
    out.z = staged_term(w.z + wb, scale_min(n.z, g, groups), xa, xb, xs);
    out.w = staged_term(w.w + wb, scale_min(n.w, g, groups), xa, xb, xs);
  }
  return out;
}

// Outputs n0..n0+OPT-1 of batch row m0 (ROWS == 1), stored as the lanes loop stores them.
fn qmatvec_staged(t: u32, lane: u32, n0: u32, m0: u32, scale: f32) {
  let groups = (p.k + GROUP - 1u) / GROUP;
  let words_per_row = groups * GROUP / 32u * BITS;
  let units = (p.k + 3u) / 4u;
  let blocks = (p.k + 31u) / 32u;
  let row = row_starts(m0).x;
  let last = max(p.n, 1u) - 1u;  // outputs past n read the last row (never stored)
  let n1 = min(n0 + 1u, last);
  let n2 = min(n0 + 2u, last);
  let n3 = min(n0 + 3u, last);
  let w0 = min(n0, last) * words_per_row;
  let w1 = n1 * words_per_row;
  let w2 = n2 * words_per_row;
  let w3 = n3 * words_per_row;
  var acc = vec4<f32>(0.0);
  for (var c0 = 0u; c0 < units; c0 += XT) {
    workgroupBarrier();  // the previous chunk is read
    for (var v = t; v < XT; v += WG) {
      let u = c0 + v;
      var xv = vec4<f32>(0.0);
      if (u < units) {
        let b = u / 8u;
        xv = load_x(row + u, (u % 8u) * 4u, select(min(32u, p.k - b * 32u), 32u, EXACT), u);
      }
      xtile[xslot(v)] = xv;
    }
    workgroupBarrier();
    let first = c0 / 8u;
    let count = min(XT / 8u, blocks - first);
    // BPS blocks a lane step, all loaded before any is summed: more of each lane's weight
    // words in flight (a block past the chunk re-reads the last one and adds nothing)
    for (var bt = lane; bt < count; bt += TPR * BPS) {
      acc += staged_block(bt, first, groups, vec4<u32>(min(n0, last), n1, n2, n3), vec4<u32>(w0, w1, w2, w3));
      if (BPS > 1u) {
        let more = bt + TPR < count;
        let b2 = staged_block(min(bt + TPR, count - 1u), first, groups, vec4<u32>(min(n0, last), n1, n2, n3),
                              vec4<u32>(w0, w1, w2, w3));
        acc += select(vec4<f32>(0.0), b2, more);
      }
    }
  }
  store_outputs(t, lane, n0, m0, acc, scale);
}
