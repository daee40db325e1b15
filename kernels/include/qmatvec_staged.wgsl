// Included (kernels.wgsl_source) by the f32 kernels of the qmatvec family, inside
// qmatvec_lanes.wgsl: their single-row GPU loop when XT > 0 (needs `p`, `partial`, scale_min,
// row_starts, sum_partials, the kernel's own load_x, and the overrides OPT, EXACT).
//
// Why: in the lanes loop a lane reads one 4-byte word of a block that three other lanes also
// read, so a warp asks memory for a few hundred bytes of weights per step: too little in flight
// to cover DRAM latency (H200, 7B shape: ~0.35 TB/s of the card's ~3.7). Here a lane takes whole
// 32-input blocks, all of their BITS words for each of its OPT outputs, so a warp's step asks
// for 32 lanes x OPT rows x BITS words. The price, x read 128 bytes apart by neighbouring
// lanes, is paid once per workgroup instead: the threads copy XT vec4s of x (XT / ROWS of each
// batch row, through load_x, so the norm and silu prologues run once per input, not once per
// lane and output) into workgroup memory, each block's 8 vec4s rotated by the block's index, so
// that the 8 lanes of a quarter-warp reading vec4 i of 8 consecutive blocks hit 8 different bank
// groups. The chunk lives in `partial`, which the reduction reuses after the loop. The codes of
// a block are unpacked from registers with constant shifts (q4 below), once for all ROWS rows.
//
// Symmetric formats (w = scale * (q - 2^(BITS-1))) get their codes already offset from q4 (the
// offset rides in the fma's addend, still exact), so their terms are scale * ((q - 2^(BITS-1)) . x):
// no sum of x and no min term per block and output (H200, 7B s3g64: see bench_device --breakdown).

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

// The codes of inputs j0..j0+3 of a block whose words are wa (words 0-3) and wb (4-7, 8-bit),
// less 2^(BITS-1) when SYMMETRIC (every addend below stays an integer under 2^24: exact);
// called with j0 a literal, so that every shift and mask below is a constant.
fn q4(wa: vec4<u32>, wb: vec4<u32>, j0: u32) -> vec4<f32> {
  let off = vec4<f32>(select(0.0, f32(1u << (BITS - 1u)), SYMMETRIC));
  let lo_inv = pow2(vec4<i32>(0, -2, -4, -6));
  if (BITS == 3u && CONTIG3) {
    // contiguous codes (kernels.quant.contiguous_3bit): 12 bits from bit 3 * j0, one word but
    // for j0 = 8 and 20 (bits 24-35 and 60-71: the next word's low bits ORed in), 3-bit fields
    // placed as the 4-bit ones are: one shift, then a mask, an OR and an fma a code
    let s = 3u * j0 % 32u;
    var v = wa[3u * j0 / 32u] >> s;
    if (s > 20u) {
      v |= wa[3u * j0 / 32u + 1u] << (32u - s);
    }
    let f = vec4<u32>(v) & vec4<u32>(7u, 56u, 448u, 3584u);
    let inv = pow2(vec4<i32>(0, -3, -6, -9));
    return placed(f, inv, -8388608.0 * inv - off);
  }
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
    let low = placed(lo, lo_inv, -8388608.0 * (lo_inv + hi_inv) - off);
    return fma(bitcast<vec4<f32>>(hi | vec4<u32>(0x4B000000u)), hi_inv, low);
  }
  if (BITS == 2u) {
    let lo = vec4<u32>(wa[j0 / 16u] >> (2u * (j0 % 16u))) & vec4<u32>(3u, 12u, 48u, 192u);
    return placed(lo, lo_inv, -8388608.0 * lo_inv - off);
  }
  if (BITS == 4u) {
    let nib = vec4<u32>(wa[j0 / 8u] >> (4u * (j0 % 8u))) & vec4<u32>(0xFu, 0xF0u, 0xF00u, 0xF000u);
    let inv = pow2(vec4<i32>(0, -4, -8, -12));
    return placed(nib, inv, -8388608.0 * inv - off);
  }
  // 8 bits: word j0 / 4, whose top byte would reach the float's exponent: halves moved down
  let w = select(wb[(j0 / 4u) % 4u], wa[(j0 / 4u) % 4u], j0 < 16u);
  let bytes = vec4<u32>(w, w, w >> 16u, w >> 16u) & vec4<u32>(0xFFu, 0xFF00u, 0xFFu, 0xFF00u);
  let inv = pow2(vec4<i32>(0, -8, 0, -8));
  return placed(bytes, inv, -8388608.0 * inv - off);
}

// Words 0-3 and 4-7 (8-bit only) of the block at qweight[wbase]; words past BITS read as 0.
fn words_a(wbase: u32) -> vec4<u32> {
  var wa = vec4<u32>(qweight[wbase], qweight[wbase + 1u], 0u, 0u);  // BITS >= 2
  if (BITS >= 3u) {
    wa.z = qweight[wbase + 2u];
  }
  if (BITS >= 4u) {
    wa.w = qweight[wbase + 3u];
  }
  return wa;
}

fn words_b(wbase: u32) -> vec4<u32> {
  if (BITS == 8u) {
    return vec4<u32>(qweight[wbase + 4u], qweight[wbase + 5u], qweight[wbase + 6u], qweight[wbase + 7u]);
  }
  return vec4<u32>(0u);
}

// One output's term for one block: scale * (q . x) + min * (sum x), x the block's 8 vec4s
// (columns of xa, xb) and their sum xs.
fn staged_term(wbase: u32, sm: vec2<f32>, xa: mat4x4<f32>, xb: mat4x4<f32>, xs: f32) -> f32 {
  let wa = words_a(wbase);
  let wb = words_b(wbase);
  let d = dot(q4(wa, wb, 0u), xa[0]) + dot(q4(wa, wb, 4u), xa[1]) + dot(q4(wa, wb, 8u), xa[2])
        + dot(q4(wa, wb, 12u), xa[3]) + dot(q4(wa, wb, 16u), xb[0]) + dot(q4(wa, wb, 20u), xb[1])
        + dot(q4(wa, wb, 24u), xb[2]) + dot(q4(wa, wb, 28u), xb[3]);
  if (SYMMETRIC) {
    return sm.x * d;  // q4's codes are offset: no min term
  }
  return sm.x * d + sm.y * xs;
}

// A batch's min terms: min * (sum of x) per row, none when SYMMETRIC (q4's codes are offset).
fn min_terms(m: f32, sx: vec4<f32>) -> vec4<f32> {
  if (SYMMETRIC) {
    return vec4<f32>(0.0);
  }
  return m * sx;
}

// The OPT outputs' terms (rows n, words from w) for block bt of the chunk staged from block first.
fn staged_block(bt: u32, first: u32, groups: u32, n: vec4<u32>, w: vec4<u32>) -> vec4<f32> {
  let s = bt * 8u;
  let xa = mat4x4<f32>(partial[s + bt % 8u], partial[s + (bt + 1u) % 8u], partial[s + (bt + 2u) % 8u],
                       partial[s + (bt + 3u) % 8u]);
  let xb = mat4x4<f32>(partial[s + (bt + 4u) % 8u], partial[s + (bt + 5u) % 8u], partial[s + (bt + 6u) % 8u],
                       partial[s + (bt + 7u) % 8u]);
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

// Several batch rows: OPT outputs' sums, rows m0..m0+3 (lo<o>) and m0+4..m0+7 (hi<o>).
struct OutputSums {
  lo0: vec4<f32>, hi0: vec4<f32>,
  lo1: vec4<f32>, hi1: vec4<f32>,
  lo2: vec4<f32>, hi2: vec4<f32>,
  lo3: vec4<f32>, hi3: vec4<f32>,
}

// The OPT outputs' words of one block (words 0-3 in a<o>, 4-7 in b<o>).
struct BlockWords {
  a0: vec4<u32>, b0: vec4<u32>,
  a1: vec4<u32>, b1: vec4<u32>,
  a2: vec4<u32>, b2: vec4<u32>,
  a3: vec4<u32>, b3: vec4<u32>,
}

// Block bt of each row's chunk (ch vec4s a row) for the OPT outputs (rows n, words at w): their
// words loaded first, then per vec4 of inputs the rows' x read once from workgroup memory for
// all outputs, each output's four codes once for all rows (q * X: X's columns the rows), and
// scale * (q . x) + min * (sum x) per output and row added to acc.
fn staged_rows(bt: u32, ch: u32, first: u32, groups: u32, n: vec4<u32>, w: vec4<u32>, acc: ptr<function, OutputSums>) {
  let b = first + bt;
  let g = b * 32u / GROUP;
  let wb = b * BITS;
  var q = BlockWords(words_a(w.x + wb), words_b(w.x + wb), vec4<u32>(0u), vec4<u32>(0u), vec4<u32>(0u), vec4<u32>(0u),
                     vec4<u32>(0u), vec4<u32>(0u));
  if (OPT > 1u) {
    q.a1 = words_a(w.y + wb);
    q.b1 = words_b(w.y + wb);
  }
  if (OPT > 2u) {
    q.a2 = words_a(w.z + wb);
    q.b2 = words_b(w.z + wb);
    q.a3 = words_a(w.w + wb);
    q.b3 = words_b(w.w + wb);
  }
  let zero = vec4<f32>(0.0);
  var d = OutputSums(zero, zero, zero, zero, zero, zero, zero, zero);
  var sx = OutputSums(zero, zero, zero, zero, zero, zero, zero, zero);  // lo0 / hi0: the rows' sums of x
  rows_at(0u, bt, ch, &q, &d, &sx);
  rows_at(1u, bt, ch, &q, &d, &sx);
  rows_at(2u, bt, ch, &q, &d, &sx);
  rows_at(3u, bt, ch, &q, &d, &sx);
  rows_at(4u, bt, ch, &q, &d, &sx);
  rows_at(5u, bt, ch, &q, &d, &sx);
  rows_at(6u, bt, ch, &q, &d, &sx);
  rows_at(7u, bt, ch, &q, &d, &sx);
  let s0 = scale_min(n.x, g, groups);
  (*acc).lo0 += s0.x * d.lo0 + min_terms(s0.y, sx.lo0);
  (*acc).hi0 += s0.x * d.hi0 + min_terms(s0.y, sx.hi0);
  if (OPT > 1u) {
    let s1 = scale_min(n.y, g, groups);
    (*acc).lo1 += s1.x * d.lo1 + min_terms(s1.y, sx.lo0);
    (*acc).hi1 += s1.x * d.hi1 + min_terms(s1.y, sx.hi0);
  }
  if (OPT > 2u) {
    let s2 = scale_min(n.z, g, groups);
    (*acc).lo2 += s2.x * d.lo2 + min_terms(s2.y, sx.lo0);
    (*acc).hi2 += s2.x * d.hi2 + min_terms(s2.y, sx.hi0);
    let s3 = scale_min(n.w, g, groups);
    (*acc).lo3 += s3.x * d.lo3 + min_terms(s3.y, sx.lo0);
    (*acc).hi3 += s3.x * d.hi3 + min_terms(s3.y, sx.hi0);
  }
}

// vec4 i of block bt of rows 0..ROWS-1 of the chunk times each output's codes, added to d;
// the rows' x to sx. Called with i a literal: the codes' shifts are constants.
fn rows_at(i: u32, bt: u32, ch: u32, q: ptr<function, BlockWords>, d: ptr<function, OutputSums>, sx: ptr<function, OutputSums>) {
  let slot = bt * 8u + (i + bt) % 8u;
  let j0 = i * 4u;
  let xl = mat4x4<f32>(partial[slot], partial[ch + slot], partial[2u * ch + slot], partial[3u * ch + slot]);
  var xh = mat4x4<f32>();
  if (ROWS > 4u) {
    xh = mat4x4<f32>(partial[4u * ch + slot], partial[5u * ch + slot], partial[6u * ch + slot], partial[7u * ch + slot]);
  }
  (*sx).lo0 += vec4<f32>(1.0) * xl;
  (*sx).hi0 += vec4<f32>(1.0) * xh;
  let q0 = q4((*q).a0, (*q).b0, j0);
  (*d).lo0 += q0 * xl;
  (*d).hi0 += q0 * xh;
  if (OPT > 1u) {
    let q1 = q4((*q).a1, (*q).b1, j0);
    (*d).lo1 += q1 * xl;
    (*d).hi1 += q1 * xh;
  }
  if (OPT > 2u) {
    let q2 = q4((*q).a2, (*q).b2, j0);
    (*d).lo2 += q2 * xl;
    (*d).hi2 += q2 * xh;
    let q3 = q4((*q).a3, (*q).b3, j0);
    (*d).lo3 += q3 * xl;
    (*d).hi3 += q3 * xh;
  }
}

// Outputs n0..n0+OPT-1 of batch rows m0..m0+ROWS-1, stored as the lanes loop stores them.
fn qmatvec_staged(t: u32, lane: u32, n0: u32, m0: u32, scale_lo: vec4<f32>, scale_hi: vec4<f32>) {
  let groups = (p.k + GROUP - 1u) / GROUP;
  let words_per_row = groups * GROUP / 32u * BITS;
  let units = (p.k + 3u) / 4u;
  let blocks = (p.k + 31u) / 32u;
  let ch = XT / ROWS;  // vec4s of each row a chunk (a multiple of 8)
  let rows_lo = row_starts(m0);
  let rows_hi = row_starts(m0 + 4u);
  let last = max(p.n, 1u) - 1u;  // outputs past n read the last row (never stored)
  let n = vec4<u32>(min(n0, last), min(n0 + 1u, last), min(n0 + 2u, last), min(n0 + 3u, last));
  let w = n * words_per_row;
  var acc = vec4<f32>(0.0);  // one row: the OPT outputs
  let zero = vec4<f32>(0.0);
  var rows = OutputSums(zero, zero, zero, zero, zero, zero, zero, zero);  // several rows
  for (var c0 = 0u; c0 < units; c0 += ch) {
    workgroupBarrier();  // the previous chunk (or inverse_rms's sums) is read
    for (var v = t; v < XT; v += WG) {
      let r = v / ch;
      let cv = v % ch;
      let u = c0 + cv;
      var xv = vec4<f32>(0.0);
      if (u < units) {
        let b = u / 8u;
        let start = select(rows_lo[r % 4u], rows_hi[r % 4u], r >= 4u);
        xv = load_x(start + u, (u % 8u) * 4u, select(min(32u, p.k - b * 32u), 32u, EXACT), u);
      }
      partial[r * ch + xslot(cv)] = xv;
    }
    workgroupBarrier();
    let first = c0 / 8u;
    let count = min(ch / 8u, blocks - first);
    if (ROWS == 1u) {
      for (var bt = lane; bt < count; bt += TPR) {
        acc += staged_block(bt, first, groups, n, w);
      }
    } else {
      for (var bt = lane; bt < count; bt += TPR) {
        staged_rows(bt, ch, first, groups, n, w, &rows);
      }
    }
  }
  workgroupBarrier();  // the chunk in partial is read: the reduction reuses it
  if (ROWS == 1u) {
    store_outputs(t, lane, n0, m0, acc, scale_lo.x);
    return;
  }
  reduce_store(t, lane, n0, m0, RowSums(rows.lo0, rows.hi0), scale_lo, scale_hi);
  if (OPT > 1u) {
    reduce_store(t, lane, n0 + 1u, m0, RowSums(rows.lo1, rows.hi1), scale_lo, scale_hi);
  }
  if (OPT > 2u) {
    reduce_store(t, lane, n0 + 2u, m0, RowSums(rows.lo2, rows.hi2), scale_lo, scale_hi);
    reduce_store(t, lane, n0 + 3u, m0, RowSums(rows.lo3, rows.hi3), scale_lo, scale_hi);
  }
}
