// Included (kernels.wgsl_source) by attention_walk.wgsl and attention_combine.wgsl (needs `p.out_stride`,
// `out` and HEAD_DIM): dimensions 4 lane .. 4 lane + 3 of query head `head`'s output for row r.
fn store_head(r: u32, head: u32, lane: u32, o: vec4<f32>) {
  let at = r * p.out_stride + head * HEAD_DIM + 4u * lane;
  out[at] = o.x;
  out[at + 1u] = o.y;
  out[at + 2u] = o.z;
  out[at + 3u] = o.w;
}
