enable f16;
// qmatvec.wgsl in half precision, for devices with the shader-f16 feature (the f32 file stays
// the one every browser loads): y[m, y_col + n] (+)= sum_k x[m, k] * W[n, k].
//
// What is f16 here, and what is not:
// * each weight is dequantized to f16: scale * q + min (f16 scale and min as stored, small
//   integer codes) rounded once to f16 (see weights4);
// * each input is rounded from its f32 buffer to f16 and multiplied by its weight in f16;
// * every product is widened to f32 and accumulated in f32 (the lane's sum, the workgroup
//   reduction, the accumulate onto y): no sum is ever rounded to f16, so the error is that of
//   three f16 roundings per term, not one growing with k.
// Buffers (x, y, the residual stream) stay f32. Inputs beyond f16's range (|x| > 65504) are
// outside what this variant computes: the f32 kernel is the one for such models.
// Layout, bindings, Params and the work split are qmatvec.wgsl's; see its comments.

override BITS: u32 = 4u;          // 2, 3, 4 or 8
override GROUP: u32 = 32u;        // inputs per scale: 32, 64 or 128
override SYMMETRIC: bool = false; // w = scale*(q - 2^(BITS-1)) instead of scale*q + min
override CONTIG3: bool = false;   // BITS = 3: codes contiguous (input j at bit 3j of its block's 96 bits), not bit planes
override WG: u32 = 256u;          // threads per workgroup
override TPR: u32 = 16u;          // threads per output row: a power of two dividing WG
override ROWS: u32 = 1u;          // batch rows per workgroup: 1, 4 or 8

struct Params {
// #include "qmatvec_params.wgsl"
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

// Four inputs of x at vec4 index i, block input j0; inputs at or past `valid` read as 0
// (the last block of a row whose k is not a multiple of 32).
fn load_x(i: u32, j0: u32, valid: u32, wi: u32, scale: f32) -> vec4<f32> {  // wi, scale: qmatvec_norm_f16's; unused here
  let v = x[i];
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
