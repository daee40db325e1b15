// Included (kernels.wgsl_source) by the qmatvec family (needs `p`: m, x_stride): where a
// workgroup's batch rows start in x, for qmatvec_blocks(_f16) and inverse_rms.

// vec4 index of the starts of batch rows first..first+3; rows past m re-read the last row
// (their results are never written).
fn row_starts(first: u32) -> vec4<u32> {
  return min(vec4<u32>(first) + vec4<u32>(0u, 1u, 2u, 3u), vec4<u32>(p.m - 1u)) * (p.x_stride / 4u);
}
