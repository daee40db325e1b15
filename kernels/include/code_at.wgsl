// Included (kernels.wgsl_source) by the kernels that share it: one code of a kernels/quant.py tensor (needs `qweight`, BITS).

// The code of input j (0-31) of the block whose words start at qweight[wbase].
fn code_at(wbase: u32, j: u32) -> u32 {
  if (BITS == 3u) {
    let low = (qweight[wbase + j / 16u] >> (2u * (j % 16u))) & 3u;
    let high = (qweight[wbase + 2u] >> j) & 1u;
    return low | (high << 2u);
  }
  return (qweight[wbase + j * BITS / 32u] >> (j * BITS % 32u)) & ((1u << BITS) - 1u);
}
