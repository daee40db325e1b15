enable f16;
// qmatvec_silu.wgsl in half precision, for devices with shader-f16: silu_gate.wgsl folded into
// qmatvec_f16.wgsl's input load. Each input silu(gate) * up is formed in f32 and rounded to
// f16; from there on everything is qmatvec_f16.wgsl's (see it for what is f16 and what is
// not). Params, bindings and the work split are qmatvec_silu.wgsl's.

override BITS: u32 = 4u;          // 2, 3, 4 or 8
override GROUP: u32 = 32u;        // inputs per scale: 32, 64 or 128
override SYMMETRIC: bool = false; // w = scale*(q - 2^(BITS-1)) instead of scale*q + min
override CONTIG3: bool = false;   // BITS = 3: codes contiguous (input j at bit 3j of its block's 96 bits), not bit planes
override WG: u32 = 256u;          // threads per workgroup
override TPR: u32 = 16u;          // threads per output row: a power of two dividing WG
override ROWS: u32 = 1u;          // batch rows per workgroup: 1, 4 or 8

struct Params {
// #include "qmatvec_params.wgsl"
  up_col: u32,     // column of the up projection in each x row, a multiple of 4
}

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> qweight: array<u32>;
@group(0) @binding(2) var<storage, read> scales: array<u32>;
@group(0) @binding(3) var<storage, read> x: array<vec4<f32>>;
@group(0) @binding(4) var<storage, read_write> y: array<f32>;

override QUADS: u32 = (ROWS + 3u) / 4u;
override SG: u32 = 1u;   // lanes a subgroup sums by shuffles before the sums meet in `partial` (K+subgroup: include/sum_partials_subgroup.wgsl)
var<workgroup> partial: array<vec4<f32>, max(WG * QUADS / SG, 1u)>;  // [quad of rows][thread, or subgroup where SG > 1]; SG may exceed WG

// #include "scale_min.wgsl"

// #include "codes4_f16.wgsl"

// #include "reduce_store.wgsl"

// #include "row_starts.wgsl"

// Four inputs silu(gate) * up at vec4 index i of the gate, block input j0; inputs at or past `valid` read as 0
// (the last block of a row whose k is not a multiple of 32).
fn load_x(i: u32, j0: u32, valid: u32, wi: u32, scale: f32) -> vec4<f32> {  // wi, scale: qmatvec_norm_f16's; unused here
  let g = x[i];
  let v = g / (vec4<f32>(1.0) + exp(-g)) * x[i + p.up_col / 4u];
  if (valid >= 32u) {
    return v;
  }
  return select(vec4<f32>(0.0), v, vec4<u32>(j0) + vec4<u32>(0u, 1u, 2u, 3u) < vec4<u32>(valid));
}

// The four rows of x starting at vec4 index xi of rows r0..r3 (vec4 indices of row starts).
fn load_quad(r: vec4<u32>, xi: u32, j0: u32, valid: u32, scale: vec4<f32>) -> mat4x4<f32> {
  return mat4x4<f32>(load_x(r.x + xi, j0, valid, xi, scale.x), load_x(r.y + xi, j0, valid, xi, scale.y),
                     load_x(r.z + xi, j0, valid, xi, scale.z), load_x(r.w + xi, j0, valid, xi, scale.w));
}

// #include "qmatvec_blocks_f16.wgsl"

// #include "qmatvec_main_f16.wgsl"
