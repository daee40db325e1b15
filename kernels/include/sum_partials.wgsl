// Included (kernels.wgsl_source) by reduce_store.wgsl: the lane sums of the qmatvec family and
// inverse_rms.wgsl, in workgroup memory (needs `partial`, WG, QUADS, and reduce_store.wgsl's RowSums). Where the device has
// subgroups, kernels named K+subgroup get sum_partials_subgroup.wgsl instead, whose `partial`
// holds one slot a subgroup: the kernels size it WG * QUADS / SG, SG = 1 here.

// lo and hi summed over groups of `span` consecutive threads (span a power of two; i: this
// thread's index in its group) by a tree in partial[], a barrier a halving: the group's first
// thread gets the sums. Called in uniform control flow, once no thread still reads partial[]
// but from its own slot (each sum reads others' slots only before its last barrier).
fn sum_partials(t: u32, i: u32, span: u32, lo: vec4<f32>, hi: vec4<f32>) -> RowSums {
  if (span == 1u) {  // one thread an output (the CPU rasterisers' tuning): nothing to add, no barrier
    return RowSums(lo, hi);
  }
  partial[t] = lo;
  if (QUADS > 1u) {
    partial[WG + t] = hi;
  }
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
  return RowSums(partial[t], partial[(QUADS - 1u) * WG + t]);  // partial[WG + t], in bounds when QUADS == 1
}
