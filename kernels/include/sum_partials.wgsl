// Included (kernels.wgsl_source) by reduce_store.wgsl: the lane sums of the qmatvec family and
// inverse_rms.wgsl, in workgroup memory (needs `partial`, WG, QUADS). Where the device has
// subgroups, kernels named K+subgroup get sum_partials_subgroup.wgsl instead.

// Tree-sum partial[] over groups of `span` consecutive threads (span a power of two; i: this
// thread's index in its group): the group's first thread ends with the sum, for rows m0..m0+3
// (partial[t]) and m0+4..m0+7 (partial[WG + t]). Called in uniform control flow.
fn sum_partials(t: u32, i: u32, span: u32) {
  workgroupBarrier();
  for (var stride = span / 2u; stride > 0u; stride >>= 1u) {
    if (i < stride) {
      partial[t] += partial[t + stride];
      if (QUADS > 1u) {
        partial[WG + t] += partial[WG + t + stride];
      }
    }
    workgroupBarrier();
  }
}
