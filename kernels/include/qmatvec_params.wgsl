// Included (kernels.wgsl_source) inside the `struct Params` of every qmatvec-family kernel
// (qmatvec, qmatvec_norm, qmatvec_silu and their _f16 and _i8 variants): the fields they all
// have, first; a kernel's own field (eps, up_col) follows them.
  n: u32,          // output rows of W (in this buffer)
  k: u32,          // logical inputs; W rows are padded to a multiple of GROUP
  m: u32,          // batch rows
  x_stride: u32,   // x row stride in f32, a multiple of 4
  y_stride: u32,   // y row stride in f32
  y_col: u32,      // first column of y written
  accumulate: u32, // 1: add onto y (the residual stream), 0: overwrite
