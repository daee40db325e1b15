// Included (kernels.wgsl_source) by the i8 kernels of the qmatvec family (qmatvec_i8,
// qmatvec_norm_i8, qmatvec_silu_i8): everything but their Params, load_x and two hooks,
// prologue(t, m0) (before the loop, in uniform control flow) and row_scale(quad) (each row's
// result times it: 1, or qmatvec_norm_i8's inverse RMS).
//
// Why: on a GPU the f32 matvecs spend their time on instructions, not on bytes (H200, 7B shape,
// one row: 2-, 3- and 4-bit steps take the same time; bench_device --breakdown). Here the inputs
// are quantized to int8 per 32-input block (scale = max |x| / 127, as llama.cpp's q8_1), and
// four codes times four inputs is one dot4I8Packed: a 4-bit block of 32 codes is 8 of them and
// 12 bit operations, where the f32 loop spends several instructions a code.
//
// The 3-bit bit planes cost more: each code word's high bits are spread with ten more bit
// operations (a layout made for this loop, written on upload, would save them).
//
// Each workgroup quantizes XB blocks of each of its ROWS rows at a time into workgroup memory
// (xq: a block's 32 codes as 8 words, packed in the order the weights' codes come out of their
// words; xd: the block's x scale and the sum of its codes), then every lane takes whole blocks
// of its output, TPR lanes an output, and decodes each block's codes once for all rows.

override BITS: u32 = 4u;          // 2, 3 (bit planes), 4 or 8
override GROUP: u32 = 32u;        // inputs per scale: 32, 64 or 128
override SYMMETRIC: bool = false; // w = scale*(q - 2^(BITS-1)) instead of scale*q + min
override SPREAD3: bool = false;   // BITS = 3: the high plane spread to the code words' bytes (kernels.quant.spread_3bit)
override WG: u32 = 256u;          // threads per workgroup
override TPR: u32 = 16u;          // threads per output row: a power of two dividing WG
override ROWS: u32 = 1u;          // batch rows per workgroup: 1, 4 or 8
override XB: u32 = 32u;           // 32-input blocks of each row quantized into workgroup memory a chunk
override OPT: u32 = 1u;           // outputs a thread: 1, 2 or 4 (they share each load of x from workgroup memory)

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> qweight: array<vec4<u32>>;  // the words of every row, 4 at a time
@group(0) @binding(2) var<storage, read> scales: array<u32>;
@group(0) @binding(3) var<storage, read> x: array<vec4<f32>>;
@group(0) @binding(4) var<storage, read_write> y: array<f32>;

override QUADS: u32 = (ROWS + 3u) / 4u;
override SG: u32 = 1u;   // lanes a subgroup sums by shuffles before the sums meet in `partial` (K+subgroup: include/sum_partials_subgroup.wgsl)
var<workgroup> partial: array<vec4<f32>, max(WG * QUADS / SG, 1u)>;  // [quad of rows][thread, or subgroup where SG > 1]; SG may exceed WG
var<workgroup> xq: array<vec4<u32>, 2u * XB * ROWS>;   // [row][block]: 32 int8 inputs in 8 words
var<workgroup> xd: array<vec2<f32>, XB * ROWS>;        // [row][block]: (x scale, sum of the int8 inputs)

// #include "scale_min.wgsl"

// #include "reduce_store.wgsl"

// #include "row_starts.wgsl"

// v (block inputs j0..j0+3) with inputs at or past `valid` as 0 (the last block of a row whose k
// is not a multiple of 32).
fn masked(v: vec4<f32>, j0: u32, valid: u32) -> vec4<f32> {
  if (valid >= 32u) {
    return v;
  }
  return select(vec4<f32>(0.0), v, vec4<u32>(j0) + vec4<u32>(0u, 1u, 2u, 3u) < vec4<u32>(valid));
}

// How a block's 32 int8 inputs are packed: word i of the block holds, byte b, the input whose
// weight code code_word puts in byte b of its word i: 8w + h + 2b for 4-bit (i = 2w + h: word w,
// nibble half h), 16w + s + 4b for 2- and 3-bit (i = 4w + s: word w, 2-bit field s), 4i + b for
// 8-bit. q0..q7 are the block's inputs 4j..4j+3 as integers; every index below is a constant.
fn pack_halves(a: vec4<i32>, b: vec4<i32>) -> vec2<u32> {  // 4-bit: inputs 8w + h + 2b of q[2w], q[2w+1]
  return vec2<u32>(pack4xI8(vec4<i32>(a.x, a.z, b.x, b.z)), pack4xI8(vec4<i32>(a.y, a.w, b.y, b.w)));
}

fn pack_fields(a: vec4<i32>, b: vec4<i32>, c: vec4<i32>, d: vec4<i32>) -> vec4<u32> {  // 2/3-bit: the transpose
  return vec4<u32>(pack4xI8(vec4<i32>(a.x, b.x, c.x, d.x)), pack4xI8(vec4<i32>(a.y, b.y, c.y, d.y)),
                   pack4xI8(vec4<i32>(a.z, b.z, c.z, d.z)), pack4xI8(vec4<i32>(a.w, b.w, c.w, d.w)));
}

// Codes of a block as four bytes, those of word i of the packed inputs, from its words
// a (0-3) and b (4-7, 8-bit); 8-bit codes are offset by 128 to fit a signed byte.
fn code_word(a: vec4<u32>, b: vec4<u32>, i: u32) -> u32 {
  if (BITS == 4u) {
    return (a[i / 2u] >> (4u * (i % 2u))) & 0x0F0F0F0Fu;
  }
  if (BITS == 8u) {
    return select(b[i % 4u], a[i], i < 4u) ^ 0x80808080u;
  }
  let lo = (a[i / 4u] >> (2u * (i % 4u))) & 0x03030303u;
  if (BITS == 2u) {
    return lo;
  }
  if (SPREAD3) {
    // the high bits of code word i's four inputs sit at bit i of word 2's bytes: to bit 2
    return lo | (select(a.z >> (max(i, 2u) - 2u), a.z << (2u - min(i, 2u)), i < 2u) & 0x04040404u);
  }
  // 3-bit bit planes: the high bits of inputs 16w + s + 4b sit at bits 16w + s + 4b of word 2;
  // spread from 4 apart to 8 apart and lifted to bit 2 of each byte
  let h = (a.z >> (16u * (i / 4u) + i % 4u)) & 0x1111u;
  let h01 = h & 0x11u;
  let h23 = h & 0x1100u;
  let spread = ((h01 | (h01 << 4u)) & 0x101u) | (((h23 << 8u) | (h23 << 12u)) & 0x01010000u);
  return lo | (spread << 2u);
}

// The block at word offset w of qweight: words 0-3 (a) and 4-7 (b), from aligned vec4 loads
// (a 2- or 3-bit block shares its vec4s with its neighbours: the cache serves the overlap).
struct Block {
  a: vec4<u32>,
  b: vec4<u32>,
}

fn load_block(w: u32) -> Block {
  let v = qweight[w / 4u];
  if (BITS == 4u) {
    return Block(v, vec4<u32>(0u));
  }
  if (BITS == 8u) {
    return Block(v, qweight[w / 4u + 1u]);
  }
  if (BITS == 2u) {
    return Block(select(v.xyxy, v.zwzw, (w % 4u) == 2u), vec4<u32>(0u));
  }
  // 3-bit: three words from offset w % 4 of v and the vec4 after it, by selects (a private
  // array indexed by w % 4 may not stay in registers)
  let next = qweight[w / 4u + 1u];
  let s = w % 4u;
  let early = select(v.xyz, v.yzw, s == 1u);                                        // s = 0, 1
  let late = select(vec3<u32>(v.zw, next.x), vec3<u32>(v.w, next.xy), s == 3u);    // s = 2, 3
  return Block(vec4<u32>(select(early, late, s >= 2u), 0u), vec4<u32>(0u));
}

// Quantize block u (0..XB*ROWS-1: row u / XB, block first + u % XB) of the chunk into xq / xd,
// all in registers (a private array indexed in a loop may not stay there).
fn quantize_block(u: u32, first: u32, blocks: u32, rows_lo: vec4<u32>, rows_hi: vec4<u32>) {
  let r = u / XB;
  let b = first + u % XB;
  let start = select(rows_lo[r % 4u], rows_hi[r % 4u], r >= 4u) + b * 8u;
  let valid = select(0u, min(32u, p.k - min(b * 32u, p.k)), b < blocks);  // past the row: all 0
  let v0 = load_x(start, 0u, valid, b * 8u);
  let v1 = load_x(start + 1u, 4u, valid, b * 8u + 1u);
  let v2 = load_x(start + 2u, 8u, valid, b * 8u + 2u);
  let v3 = load_x(start + 3u, 12u, valid, b * 8u + 3u);
  let v4 = load_x(start + 4u, 16u, valid, b * 8u + 4u);
  let v5 = load_x(start + 5u, 20u, valid, b * 8u + 5u);
  let v6 = load_x(start + 6u, 24u, valid, b * 8u + 6u);
  let v7 = load_x(start + 7u, 28u, valid, b * 8u + 7u);
  let m = max(max(max(abs(v0), abs(v1)), max(abs(v2), abs(v3))), max(max(abs(v4), abs(v5)), max(abs(v6), abs(v7))));
  let amax = max(max(m.x, m.y), max(m.z, m.w));
  let scale = amax / 127.0;
  let inv = select(0.0, 1.0 / scale, amax > 0.0);
  let q0 = vec4<i32>(round(v0 * inv));
  let q1 = vec4<i32>(round(v1 * inv));
  let q2 = vec4<i32>(round(v2 * inv));
  let q3 = vec4<i32>(round(v3 * inv));
  let q4 = vec4<i32>(round(v4 * inv));
  let q5 = vec4<i32>(round(v5 * inv));
  let q6 = vec4<i32>(round(v6 * inv));
  let q7 = vec4<i32>(round(v7 * inv));
  let qs = q0 + q1 + q2 + q3 + q4 + q5 + q6 + q7;
  var lo: vec4<u32>;
  var hi: vec4<u32>;
  if (BITS == 4u) {
    lo = vec4<u32>(pack_halves(q0, q1), pack_halves(q2, q3));
    hi = vec4<u32>(pack_halves(q4, q5), pack_halves(q6, q7));
  } else if (BITS == 8u) {
    lo = vec4<u32>(pack4xI8(q0), pack4xI8(q1), pack4xI8(q2), pack4xI8(q3));
    hi = vec4<u32>(pack4xI8(q4), pack4xI8(q5), pack4xI8(q6), pack4xI8(q7));
  } else {
    lo = pack_fields(q0, q1, q2, q3);
    hi = pack_fields(q4, q5, q6, q7);
  }
  xq[2u * u] = lo;
  xq[2u * u + 1u] = hi;
  xd[u] = vec2<f32>(scale, f32(qs.x + qs.y + qs.z + qs.w));
}

// The sum of code * x code over one block, from its 8 code words and the block's x codes (xa, xb:
// chunk slot u's xq[2u], xq[2u + 1]).
fn block_dot(c: array<u32, 8>, xa: vec4<u32>, xb: vec4<u32>) -> i32 {
  return dot4I8Packed(c[0], xa.x) + dot4I8Packed(c[1], xa.y) + dot4I8Packed(c[2], xa.z)
       + dot4I8Packed(c[3], xa.w) + dot4I8Packed(c[4], xb.x) + dot4I8Packed(c[5], xb.y)
       + dot4I8Packed(c[6], xb.z) + dot4I8Packed(c[7], xb.w);
}

// One row's term of a block from its dot product qx: x scale * (w scale * sum(q x) + w min * sum(x))
// in the block's integers (xs: the slot's xd), symmetric codes offset by 2^(BITS-1) in integers
// first (exact).
fn block_term(qx: i32, xs: vec2<f32>, sm: vec2<f32>) -> f32 {
  var d = qx;
  let sx = i32(xs.y);
  if (BITS == 8u) {
    d += 128i * sx;  // code_word's bytes are q - 128
  }
  if (SYMMETRIC) {
    return xs.x * sm.x * f32(d - i32(1u << (BITS - 1u)) * sx);
  }
  return xs.x * (sm.x * f32(d) + sm.y * xs.y);
}

// Quantize chunk blocks first.. of the workgroup's rows into xq / xd (all threads, in uniform
// control flow).
fn quantize_chunk(t: u32, first: u32, blocks: u32, m0: u32) {
  let rows_lo = row_starts(m0);
  let rows_hi = row_starts(m0 + 4u);
  workgroupBarrier();  // the previous chunk is read
  for (var u = t; u < XB * ROWS; u += WG) {
    quantize_block(u, first, blocks, rows_lo, rows_hi);
  }
  workgroupBarrier();
}

// A block's 8 code words (code_word) from its loaded words.
fn block_codes(blk: Block) -> array<u32, 8> {
  return array<u32, 8>(code_word(blk.a, blk.b, 0u), code_word(blk.a, blk.b, 1u), code_word(blk.a, blk.b, 2u),
                       code_word(blk.a, blk.b, 3u), code_word(blk.a, blk.b, 4u), code_word(blk.a, blk.b, 5u),
                       code_word(blk.a, blk.b, 6u), code_word(blk.a, blk.b, 7u));
}

// A block of the thread's OPT outputs as loaded: their words (w0..w3) and scale/min (s0..s3);
// outputs past OPT repeat the first (never used).
struct Loaded {
  w0: Block, w1: Block, w2: Block, w3: Block,
  s0: vec2<f32>, s1: vec2<f32>, s2: vec2<f32>, s3: vec2<f32>,
}

// Load block b of weight rows `rows` (the thread's outputs, clamped to the last row).
fn load_outputs(rows: vec4<u32>, b: u32, groups: u32, words_per_row: u32) -> Loaded {
  let g = b * 32u / GROUP;
  var l: Loaded;
  l.w0 = load_block(rows.x * words_per_row + b * BITS);
  l.s0 = scale_min(rows.x, g, groups);
  l.w1 = l.w0; l.w2 = l.w0; l.w3 = l.w0;
  l.s1 = l.s0; l.s2 = l.s0; l.s3 = l.s0;
  if (OPT > 1u) {
    l.w1 = load_block(rows.y * words_per_row + b * BITS);
    l.s1 = scale_min(rows.y, g, groups);
  }
  if (OPT > 2u) {
    l.w2 = load_block(rows.z * words_per_row + b * BITS);
    l.s2 = scale_min(rows.z, g, groups);
    l.w3 = load_block(rows.w * words_per_row + b * BITS);
    l.s3 = scale_min(rows.w, g, groups);
  }
  return l;
}

// A block's codes of the thread's outputs.
struct Codes {
  c0: array<u32, 8>, c1: array<u32, 8>, c2: array<u32, 8>, c3: array<u32, 8>,
}

// The terms of a block of one batch row (chunk slot u) for the thread's outputs (.x the first,
// .y .z .w the others where OPT > 1, 0 past OPT); the slot's x is loaded once for all of them.
fn slot_terms(c: Codes, l: Loaded, u: u32) -> vec4<f32> {
  let xa = xq[2u * u];
  let xb = xq[2u * u + 1u];
  let xs = xd[u];
  var terms = vec4<f32>(block_term(block_dot(c.c0, xa, xb), xs, l.s0), 0.0, 0.0, 0.0);
  if (OPT > 1u) {
    terms.y = block_term(block_dot(c.c1, xa, xb), xs, l.s1);
  }
  if (OPT > 2u) {
    terms.z = block_term(block_dot(c.c2, xa, xb), xs, l.s2);
    terms.w = block_term(block_dot(c.c3, xa, xb), xs, l.s3);
  }
  return terms;
}

// A thread's sums, one RowSums an output (a the first; b, c, d where OPT > 1).
struct OutputSums {
  a: RowSums,
  b: RowSums,
  c: RowSums,
  d: RowSums,
}

fn no_sums() -> OutputSums {
  let zero = RowSums(vec4<f32>(0.0), vec4<f32>(0.0));
  return OutputSums(zero, zero, zero, zero);
}

// Add a loaded block's terms (chunk block bt) for rows m0..m0+3 (.lo) and m0+4..m0+7 (.hi) of
// the workgroup to *acc: r0..r3 hold each row's terms by output, and the transposes go to the
// outputs' sums.
fn add_terms(l: Loaded, bt: u32, acc: ptr<function, OutputSums>) {
  var c: Codes;
  c.c0 = block_codes(l.w0);
  c.c1 = c.c0; c.c2 = c.c0; c.c3 = c.c0;
  if (OPT > 1u) {
    c.c1 = block_codes(l.w1);
  }
  if (OPT > 2u) {
    c.c2 = block_codes(l.w2);
    c.c3 = block_codes(l.w3);
  }
  let r0 = slot_terms(c, l, bt);
  if (ROWS == 1u) {
    (*acc).a.lo.x += r0.x;
    (*acc).b.lo.x += r0.y;
    (*acc).c.lo.x += r0.z;
    (*acc).d.lo.x += r0.w;
    return;
  }
  let lo = transpose(mat4x4<f32>(r0, slot_terms(c, l, XB + bt), slot_terms(c, l, 2u * XB + bt), slot_terms(c, l, 3u * XB + bt)));
  (*acc).a.lo += lo[0];
  (*acc).b.lo += lo[1];
  (*acc).c.lo += lo[2];
  (*acc).d.lo += lo[3];
  if (ROWS > 4u) {
    let hi = transpose(mat4x4<f32>(slot_terms(c, l, 4u * XB + bt), slot_terms(c, l, 5u * XB + bt),
                                   slot_terms(c, l, 6u * XB + bt), slot_terms(c, l, 7u * XB + bt)));
    (*acc).a.hi += hi[0];
    (*acc).b.hi += hi[1];
    (*acc).c.hi += hi[2];
    (*acc).d.hi += hi[3];
  }
}

// The thread's outputs n0..n0+OPT-1's terms over the chunk's blocks first..first+count-1 (this
// lane's share; weight rows past the last read the last, never stored), added to *acc.
fn chunk_terms(lane: u32, n0: u32, first: u32, count: u32, acc: ptr<function, OutputSums>) {
  let groups = (p.k + GROUP - 1u) / GROUP;
  let words_per_row = groups * GROUP / 32u * BITS;
  let last = max(p.n, 1u) - 1u;
  let rows = min(vec4<u32>(n0) + vec4<u32>(0u, 1u, 2u, 3u), vec4<u32>(last));
  for (var bt = lane; bt < count; bt += TPR) {
    add_terms(load_outputs(rows, first + bt, groups, words_per_row), bt, acc);
  }
}

// Outputs n0..n0+OPT-1 of rows m0..m0+ROWS-1, XB blocks of x quantized at a time, the chunk's
// terms after each.
fn qmatvec_i8(t: u32, lane: u32, n0: u32, m0: u32, blocks: u32) -> OutputSums {
  var acc = no_sums();
  for (var first = 0u; first < blocks; first += XB) {
    quantize_chunk(t, first, blocks, m0);
    chunk_terms(lane, n0, first, min(XB, blocks - first), &acc);
  }
  return acc;
}

// Reduce and store the thread's outputs n0..n0+OPT-1.
fn store_outputs(t: u32, lane: u32, n0: u32, m0: u32, acc: OutputSums) {
  reduce_store(t, lane, n0, m0, acc.a, row_scale(0u), row_scale(1u));
  if (OPT > 1u) {
    reduce_store(t, lane, n0 + 1u, m0, acc.b, row_scale(0u), row_scale(1u));
  }
  if (OPT > 2u) {
    reduce_store(t, lane, n0 + 2u, m0, acc.c, row_scale(0u), row_scale(1u));
    reduce_store(t, lane, n0 + 3u, m0, acc.d, row_scale(0u), row_scale(1u));
  }
}

// Where a row's blocks all fit one chunk (XB >= blocks), x is quantized once and the workgroup
// takes output groups wid.x, wid.x + the grid's width, ...: a grid narrower than the outputs
// (QuantLinear's i8_max_groups) quantizes x fewer times; else one output group a workgroup.
@compute @workgroup_size(WG)
fn main(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) grid: vec3<u32>,
        @builtin(local_invocation_index) t: u32) {
  let lane = t % TPR;
  let m0 = wid.y * ROWS;
  let blocks = (p.k + 31u) / 32u;
  let per_group = WG / TPR * OPT;  // outputs of a group
  prologue(t, m0);
  if (XB < blocks) {
    let n0 = wid.x * per_group + t / TPR * OPT;
    store_outputs(t, lane, n0, m0, qmatvec_i8(t, lane, n0, m0, blocks));
    return;
  }
  quantize_chunk(t, 0u, blocks, m0);
  for (var g = wid.x; g * per_group < p.n; g += grid.x) {
    let n0 = g * per_group + t / TPR * OPT;
    var acc = no_sums();
    chunk_terms(lane, n0, 0u, blocks, &acc);
    store_outputs(t, lane, n0, m0, acc);
  }
}
