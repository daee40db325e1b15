// qmatvec.wgsl with int8 inputs (dot4I8Packed): y[m, y_col + n] (+)= sum_k x8[m, k] * W[n, k], where
// x8 is x quantized per 32-input block to int8 (scale = max |x| / 127, round to nearest even).
// The kernel is include/qmatvec_i8.wgsl (see it for why); Params and the work split (TPR lanes
// an output, ROWS batch rows a workgroup) are qmatvec.wgsl's; W is bound as vec4 words.
// Twin: kernels.reference.qmatvec_i8.

struct Params {
// #include "qmatvec_params.wgsl"
}

// Four inputs at vec4 index i, block input j0; inputs at or past `valid` read as 0.
fn load_x(i: u32, j0: u32, valid: u32, wi: u32) -> vec4<f32> {  // wi: qmatvec_norm_i8's; unused here
  return masked(x[i], j0, valid);
}

fn prologue(t: u32, m0: u32) {}

fn row_scale(quad: u32) -> vec4<f32> {
  return vec4<f32>(1.0);
}

// #include "qmatvec_i8.wgsl"
