// Included (kernels.wgsl_source) by the kernels that share it: group scales of a kernels/quant.py tensor (needs `scales`, BITS, SYMMETRIC).

// (scale, min) of group g of row n, so that w = scale * q + min.
fn scale_min(n: u32, g: u32, groups: u32) -> vec2<f32> {
  if (SYMMETRIC) {
    let pair = unpack2x16float(scales[n * ((groups + 1u) / 2u) + g / 2u]);
    let s = select(pair.x, pair.y, (g & 1u) == 1u);
    return vec2<f32>(s, -s * f32(1u << (BITS - 1u)));
  }
  return unpack2x16float(scales[n * groups + g]);
}
