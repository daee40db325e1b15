// qmatvec_silu.wgsl with int8 inputs: each input silu(gate) * up is formed in f32 as there, then
// quantized per 32-input block to int8 as qmatvec_i8.wgsl does. Twin: kernels.reference.qmatvec_silu_i8.

struct Params {
// #include "qmatvec_params.wgsl"
  up_col: u32,     // column of the up projection in each x row, a multiple of 4
}

// Four inputs silu(gate) * up at vec4 index i of the gate, block input j0; inputs at or past
// `valid` read as 0.
fn load_x(i: u32, j0: u32, valid: u32, wi: u32) -> vec4<f32> {  // wi: qmatvec_norm_i8's; unused here
  let g = x[i];
  return masked(g / (vec4<f32>(1.0) + exp(-g)) * x[i + p.up_col / 4u], j0, valid);
}

fn prologue(t: u32, m0: u32) {}

fn row_scale(quad: u32) -> vec4<f32> {
  return vec4<f32>(1.0);
}

// #include "qmatvec_i8.wgsl"
