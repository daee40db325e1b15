// Included (kernels.wgsl_source) by reduce_store.wgsl in the kernels named K+subgroup, for devices
// with subgroups: sum_partials.wgsl's sums without a barrier a step. The lanes of one subgroup
// add their sums by shuffles; where a group of lanes spans several subgroups, the subgroups' sums
// meet once in workgroup memory, one slot a subgroup (`partial`: WG * QUADS / SG slots). Needs
// `partial`, WG, QUADS, SG and reduce_store.wgsl's RowSums.
//
// Why: the tree in workgroup memory waits on a barrier for each halving (10 for a 1024-thread
// inverse RMS, 4-5 for an output's lanes), and a decode matvec is short enough for those waits
// to show; shuffles are register moves. And qmatvec_i8 gets the workgroup memory the tree took
// (16 bytes a thread and quad of rows) for quantized x.
//
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

// As sum_partials.wgsl: lo and hi summed over groups of `span` consecutive threads (span a power
// of two; i: this thread's index in its group), the group's first thread getting the sums.
// Called in uniform control flow.
fn sum_partials(t: u32, i: u32, span: u32, lo: vec4<f32>, hi: vec4<f32>) -> RowSums {
  let lanes = min(span, SG);
  var s = RowSums(butterfly(lo, lanes), vec4<f32>(0.0));
  if (QUADS > 1u) {
    s.hi = butterfly(hi, lanes);
  }
  if (span <= SG) {
    return s;
  }
  // several subgroups a group: each subgroup's sums to its slot
  let slots = WG / SG;
  workgroupBarrier();  // the slots' last readers (an earlier sum, a staged chunk of x) are done
  if (t % SG == 0u) {
    partial[t / SG] = s.lo;
    if (QUADS > 1u) {
      partial[slots + t / SG] = s.hi;
    }
  }
  workgroupBarrier();
  let count = span / SG;  // slots of a group
  let first = (t - i) / SG;
  if (count <= SG) {  // lane j of every subgroup takes the group's slot j: one more butterfly
    let j = t % SG;
    let src = first + min(j, count - 1u);
    s.lo = butterfly(select(vec4<f32>(0.0), partial[src], j < count), count);
    if (QUADS > 1u) {
      s.hi = butterfly(select(vec4<f32>(0.0), partial[slots + src], j < count), count);
    }
    return s;
  }
  // more slots than lanes (small subgroups, wide groups): a tree over the slots, thread t taking slot t
  let c = t % count;
  for (var stride = count / 2u; stride > 0u; stride >>= 1u) {
    if (t < slots && c < stride) {
      partial[t] += partial[t + stride];
      if (QUADS > 1u) {
        partial[slots + t] += partial[slots + t + stride];
      }
    }
    workgroupBarrier();
  }
  return RowSums(partial[first], partial[(QUADS - 1u) * slots + first]);
}
