// Included (kernels.wgsl_source) inside the `struct Params` of attention.wgsl and
// attention_rope.wgsl: the fields they share, first (attention_rope's k_col, v_col follow).
  n_heads: u32,
  n_kv: u32,
  ctx: u32,         // positions per cache slot
  q_stride: u32,    // q (qkv) row stride in f32
  q_col: u32,       // column of head 0 in q (qkv)
  out_stride: u32,  // out row stride in f32
  scale: f32,       // 1 / sqrt(head_dim)
  splits: u32,      // key splits per row and head (the grid's z); 1: no partials
