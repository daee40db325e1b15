// Included (kernels.wgsl_source) by the kernels that share it: 4-bit-at-a-time code unpacking of a kernels/quant.py tensor (needs `qweight`, BITS, CONTIG3).

// #include "codes_u32.wgsl"

// The codes of inputs j0..j0+3 (j0 a multiple of 4) as f32 (offset when SYMMETRIC: see as_f32).
fn codes4(wbase: u32, j0: u32) -> vec4<f32> {
  return as_f32(codes4_u32(wbase, j0));
}

// q as f32, exactly for q < 2^23, less 2^(BITS-1) when SYMMETRIC (w = scale * (q - 2^(BITS-1)):
// the callers then add no min term): the bits of the float 2^23 + q, minus 2^23 (+ the offset,
// still an exact integer). An OR and an add instead of an integer-to-float conversion, which
// GPUs issue at a fraction of the FMA rate.
fn as_f32(q: vec4<u32>) -> vec4<f32> {
  let off = select(0.0, f32(1u << (BITS - 1u)), SYMMETRIC);
  return bitcast<vec4<f32>>(q | vec4<u32>(0x4B000000u)) - vec4<f32>(8388608.0 + off);
}
