// qmatvec_norm.wgsl with int8 inputs: the RMSNorm folded in as there (each row's sum of squares
// first, the result scaled by 1 / sqrt(mean(x^2) + eps) at the end), and x * norm_weight
// quantized per 32-input block to int8 as qmatvec_i8.wgsl does. Twin: kernels.reference.qmatvec_norm_i8.

struct Params {
// #include "qmatvec_params.wgsl"
  eps: f32,        // RMSNorm epsilon
}

// Four inputs of x * norm_weight at vec4 index i, block input j0 (norm_weight's vec4 index wi);
// inputs at or past `valid` read as 0.
fn load_x(i: u32, j0: u32, valid: u32, wi: u32) -> vec4<f32> {
  return masked(x[i] * norm_weight[wi], j0, valid);
}

// #include "qmatvec_i8.wgsl"

// (after the include: naga 29 panics compiling a pipeline whose workgroup variables or
// functions that reach them come before the overrides they depend on)
@group(0) @binding(5) var<storage, read> norm_weight: array<vec4<f32>>;  // k floats (buffer padded to 16 bytes)
var<workgroup> inv_rms: array<vec4<f32>, 2>;  // rows m0..m0+3, m0+4..m0+7

fn prologue(t: u32, m0: u32) {
  inverse_rms(t, m0);
}

fn row_scale(quad: u32) -> vec4<f32> {
  return inv_rms[quad];
}

// #include "inverse_rms.wgsl"
