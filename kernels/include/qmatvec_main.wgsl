// Included (kernels.wgsl_source) by qmatvec and qmatvec_silu, after qmatvec_blocks.wgsl,
// qmatvec_lanes.wgsl and reduce_store.wgsl: their entry point (the two differ only in load_x / load_quad).

@compute @workgroup_size(WG)
fn main(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_index) t: u32) {
  let lane = t % TPR;
  let n = wid.x * (WG / TPR) + t / TPR;
  let m0 = wid.y * ROWS;
  if (SPAN == 8u && OPT == 1u) {
    reduce_store(t, lane, n, m0, qmatvec_blocks(t, lane, n, m0), vec4<f32>(1.0), vec4<f32>(1.0));
  } else {
    qmatvec_lanes(t, lane, n * OPT, m0, vec4<f32>(1.0), vec4<f32>(1.0));
  }
}
