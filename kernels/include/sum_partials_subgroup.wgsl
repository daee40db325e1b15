// Included (kernels.wgsl_source) by reduce_store.wgsl in the kernels named K+subgroup, for devices
// with subgroups: sum_partials.wgsl's sums without a barrier a step. The lanes of one subgroup
// add their sums by shuffles; where a group of lanes spans several subgroups, the subgroups' sums
// meet once in workgroup memory. Needs `partial`, WG, QUADS.
//
// Why: the tree in workgroup memory waits on a barrier for each halving (10 for a 1024-thread
// inverse RMS, 4-5 for an output's lanes), and a decode matvec is short enough for those waits
// to show; shuffles are register moves.

// SG: lanes of a subgroup, as Device.subgroup_size() measured them (a divisor of them works too);
// that probe also checked that subgroups are runs of consecutive local_invocation_index, which
// the shuffles below rely on (WGSL does not promise it; Vulkan, Metal and D3D12 drivers lay 1-D
// workgroups out so). Each kernel declares SG beside its other overrides: naga 29 panics on an
// override declared after a workgroup array sized by overrides.

// v summed over each run of `lanes` consecutive lanes of the subgroup (lanes a power of two, at
// most SG): every lane of the run ends with the run's sum.
fn butterfly(v: vec4<f32>, lanes: u32) -> vec4<f32> {
  var s = v;
  for (var mask = lanes / 2u; mask > 0u; mask >>= 1u) {
    s += subgroupShuffleXor(s, mask);
  }
  return s;
}

// As sum_partials.wgsl: partial[] summed over groups of `span` consecutive threads (span a power
// of two; i: this thread's index in its group), the group's first thread ending with the sum
// (partial[t]: rows m0..m0+3, partial[WG + t]: rows m0+4..m0+7). Called in uniform control flow.
fn sum_partials(t: u32, i: u32, span: u32) {
  let lanes = min(span, SG);
  let lo = butterfly(partial[t], lanes);
  var hi = vec4<f32>(0.0);
  if (QUADS > 1u) {
    hi = butterfly(partial[WG + t], lanes);
  }
  partial[t] = lo;  // each thread reads and writes only its own slot so far: no barrier
  if (QUADS > 1u) {
    partial[WG + t] = hi;
  }
  if (span <= SG) {
    return;
  }
  workgroupBarrier();  // every subgroup's sum is in its lanes' slots
  let subgroups = span / SG;
  if (subgroups > SG) {  // too many for one subgroup (small subgroups, wide groups): the tree, from SG apart
    for (var stride = span / 2u; stride >= SG; stride >>= 1u) {
      if (i < stride) {
        partial[t] += partial[t + stride];
        if (QUADS > 1u) {
          partial[WG + t] += partial[WG + t + stride];
        }
      }
      workgroupBarrier();
    }
    return;
  }
  // lane j of each subgroup takes the group's subgroup j's sum, and one more butterfly adds them
  let j = i % SG;
  let src = t - i + min(j, subgroups - 1u) * SG;
  let total_lo = butterfly(select(vec4<f32>(0.0), partial[src], j < subgroups), subgroups);
  var total_hi = vec4<f32>(0.0);
  if (QUADS > 1u) {
    total_hi = butterfly(select(vec4<f32>(0.0), partial[WG + src], j < subgroups), subgroups);
  }
  workgroupBarrier();  // every subgroup's sum is read before the first thread's slot takes the total
  if (i == 0u) {
    partial[t] = total_lo;
    if (QUADS > 1u) {
      partial[WG + t] = total_hi;
    }
  }
  workgroupBarrier();
}
