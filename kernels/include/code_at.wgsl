// Included (kernels.wgsl_source) by the kernels that share it: one code of a kernels/quant.py tensor (needs `qweight`, BITS, CONTIG3).

// The code of input j (0-31) of the block whose words start at qweight[wbase].
fn code_at(wbase: u32, j: u32) -> u32 {
  if (BITS == 3u && CONTIG3) {
    // input j at bit 3j of the block's three words (kernels.quant.contiguous_3bit)
    let i = wbase + 3u * j / 32u;
    let s = 3u * j % 32u;
    var v = qweight[i] >> s;
    if (s > 29u) {
      v |= qweight[i + 1u] << (32u - s);
    }
    return v & 7u;
  }
  if (BITS == 3u) {
    let low = (qweight[wbase + j / 16u] >> (2u * (j % 16u))) & 3u;
    let high = (qweight[wbase + 2u] >> j) & 1u;
    return low | (high << 2u);
  }
  return (qweight[wbase + j * BITS / 32u] >> (j * BITS % 32u)) & ((1u << BITS) - 1u);
}
