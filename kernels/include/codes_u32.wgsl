// Included by codes4.wgsl and codes4_f16.wgsl: the unpacking of a kernels/quant.py tensor's codes, 4 at a time (needs `qweight`, BITS, CONTIG3).

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

// The codes (unsigned integers) of inputs j0..j0+3 (j0 a multiple of 4) of the block at qweight[wbase].
fn codes4_u32(wbase: u32, j0: u32) -> vec4<u32> {
  if (BITS == 3u && CONTIG3) {
    return fields3(wbase, j0);
  }
  if (BITS == 3u) {
    // words 0-1: low two bits of inputs 0-15 and 16-31; word 2: the high bit of input j at bit j
    let low = vec4<u32>(qweight[wbase + j0 / 16u]) >> (vec4<u32>(0u, 2u, 4u, 6u) + 2u * (j0 % 16u));
    let high = vec4<u32>(qweight[wbase + 2u]) >> (vec4<u32>(0u, 1u, 2u, 3u) + j0);
    return (low & vec4<u32>(3u)) | ((high & vec4<u32>(1u)) << vec4<u32>(2u));
  }
  // input j sits in word j*BITS/32 at bit j*BITS%32
  let word = vec4<u32>(qweight[wbase + j0 * BITS / 32u]);
  let shifts = vec4<u32>(0u, 1u, 2u, 3u) * BITS + (j0 * BITS) % 32u;
  return (word >> shifts) & vec4<u32>((1u << BITS) - 1u);
}

