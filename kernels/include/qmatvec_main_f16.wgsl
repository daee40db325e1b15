// Included (kernels.wgsl_source) by qmatvec_f16 and qmatvec_silu_f16, after
// qmatvec_blocks_f16.wgsl and reduce_store.wgsl: their entry point (the two differ only in
// load_x / load_quad).

@compute @workgroup_size(WG)
fn main(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_index) t: u32) {
  let lane = t % TPR;
  let n = wid.x * (WG / TPR) + t / TPR;
  let m0 = wid.y * ROWS;
  reduce_store(t, lane, n, m0, qmatvec_blocks(t, lane, n, m0, vec4<f32>(1.0), vec4<f32>(1.0)), vec4<f32>(1.0),
               vec4<f32>(1.0));
}
