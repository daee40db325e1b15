// Included (kernels.wgsl_source) by the kernels that share it: 4-bit-at-a-time code unpacking of a kernels/quant.py tensor (needs `qweight`, BITS, CONTIG3).

// Contiguous 3-bit codes (kernels.quant.contiguous_3bit): inputs j0..j0+3 are the 12 bits from
// bit 3 * j0 of the block's three words, in one word but for j0 = 8 and 20 (bits 24-35, 60-71).
// One load (two for those), one shift and a mask per code, as 4-bit codes take.
fn fields3(wbase: u32, j0: u32) -> vec4<u32> {
  let i = wbase + 3u * j0 / 32u;
  let s = 3u * j0 % 32u;
  var v = qweight[i] >> s;
  if (s > 20u) {
    v |= qweight[i + 1u] << (32u - s);
  }
  return (vec4<u32>(v) >> vec4<u32>(0u, 3u, 6u, 9u)) & vec4<u32>(7u);
}

// The codes of inputs j0..j0+3 (j0 a multiple of 4) of the block at qweight[wbase].
fn codes4(wbase: u32, j0: u32) -> vec4<f32> {
  if (BITS == 3u && CONTIG3) {
    return as_f32(fields3(wbase, j0));
  }
  if (BITS == 3u) {
    // words 0-1: low two bits of inputs 0-15 and 16-31; word 2: the high bit of input j at bit j
    let low = vec4<u32>(qweight[wbase + j0 / 16u]) >> (vec4<u32>(0u, 2u, 4u, 6u) + 2u * (j0 % 16u));
    let high = vec4<u32>(qweight[wbase + 2u]) >> (vec4<u32>(0u, 1u, 2u, 3u) + j0);
    return as_f32((low & vec4<u32>(3u)) | ((high & vec4<u32>(1u)) << vec4<u32>(2u)));
  }
  // input j sits in word j*BITS/32 at bit j*BITS%32
  let word = vec4<u32>(qweight[wbase + j0 * BITS / 32u]);
  let shifts = vec4<u32>(0u, 1u, 2u, 3u) * BITS + (j0 * BITS) % 32u;
  return as_f32((word >> shifts) & vec4<u32>((1u << BITS) - 1u));
}

// q as f32, exactly for q < 2^23, less 2^(BITS-1) when SYMMETRIC (w = scale * (q - 2^(BITS-1)):
// the callers then add no min term): the bits of the float 2^23 + q, minus 2^23 (+ the offset,
// still an exact integer). An OR and an add instead of an integer-to-float conversion, which
// GPUs issue at a fraction of the FMA rate.
fn as_f32(q: vec4<u32>) -> vec4<f32> {
  let off = select(0.0, f32(1u << (BITS - 1u)), SYMMETRIC);
  return bitcast<vec4<f32>>(q | vec4<u32>(0x4B000000u)) - vec4<f32>(8388608.0 + off);
}
