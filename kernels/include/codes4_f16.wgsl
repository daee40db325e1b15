// Included (kernels.wgsl_source) by the kernels that share it: code unpacking and f16 products of the *_f16 matvecs (needs `qweight`, BITS, CONTIG3).

// #include "codes_u32.wgsl"

// The f16 weights of inputs j0..j0+3 of the block at qweight[wbase], group (scale, min) sm:
// scale * q is exact in f32 (11 + 8 bits), so this is one f32 rounding of the sum at most
// (none when symmetric), then the one rounding to f16, fused fma or not. (An f16 fma, unfused
// as on lavapipe, rounds scale * q first: errors up to 255 ulp of w in 8-bit asymmetric.)
fn weights4(wbase: u32, j0: u32, sm: vec2<f32>) -> vec4<f16> {
  return vec4<f16>(fma(vec4<f32>(codes4_u32(wbase, j0)), vec4<f32>(sm.x), vec4<f32>(sm.y)));
}

// w times each of four rows of inputs (the columns of xs), rounded to f16, products widened.
fn products(w: vec4<f16>, xs: mat4x4<f32>) -> mat4x4<f32> {
  let h = mat4x4<f16>(xs);
  return mat4x4<f32>(mat4x4<f16>(w * h[0], w * h[1], w * h[2], w * h[3]));
}
