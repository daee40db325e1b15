enable f16;
// qmatvec_norm.wgsl in half precision, for devices with shader-f16: the RMSNorm folded into
// qmatvec_f16.wgsl. The prologue (each row's 1 / sqrt(mean(x^2) + eps)) is qmatvec_norm.wgsl's,
// in f32; each input x * (1/rms) * norm_weight is formed in f32 and then rounded to f16, and
// from there on everything is qmatvec_f16.wgsl's (see it for what is f16 and what is not).
// The normalised input is what is rounded (the f32 kernel scales each row's sum by 1/rms at
// the end instead), so the f16 inputs sit near unit scale whatever the residual stream holds.
// Params, bindings and the work split are qmatvec_norm.wgsl's.

override BITS: u32 = 4u;          // 2, 3, 4 or 8
override GROUP: u32 = 32u;        // inputs per scale: 32, 64 or 128
override SYMMETRIC: bool = false; // w = scale*(q - 2^(BITS-1)) instead of scale*q + min
override CONTIG3: bool = false;   // BITS = 3: codes contiguous (input j at bit 3j of its block's 96 bits), not bit planes
override WG: u32 = 256u;          // threads per workgroup
override TPR: u32 = 16u;          // threads per output row: a power of two dividing WG
override ROWS: u32 = 1u;          // batch rows per workgroup: 1, 4 or 8

struct Params {
// #include "qmatvec_params.wgsl"
  eps: f32,        // RMSNorm epsilon
}

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> qweight: array<u32>;
@group(0) @binding(2) var<storage, read> scales: array<u32>;
@group(0) @binding(3) var<storage, read> x: array<vec4<f32>>;
@group(0) @binding(4) var<storage, read_write> y: array<f32>;
@group(0) @binding(5) var<storage, read> norm_weight: array<vec4<f32>>;  // k floats (buffer padded to 16 bytes)

override QUADS: u32 = (ROWS + 3u) / 4u;
override SG: u32 = 1u;   // lanes a subgroup sums by shuffles before the sums meet in `partial` (K+subgroup: include/sum_partials_subgroup.wgsl)
var<workgroup> partial: array<vec4<f32>, max(WG * QUADS / SG, 1u)>;  // [quad of rows][thread, or subgroup where SG > 1]; SG may exceed WG
var<workgroup> inv_rms: array<vec4<f32>, 2>;  // rows m0..m0+3, m0+4..m0+7

// #include "scale_min.wgsl"

// #include "codes4_f16.wgsl"

// #include "reduce_store.wgsl"

// #include "row_starts.wgsl"

// Four inputs x * inv * norm_weight at vec4 index i, block input j0 (norm_weight's vec4 index
// is i's offset within the row: i - row start), inv the row's 1/rms; inputs at or past
// `valid` read as 0.
fn load_x(i: u32, j0: u32, valid: u32, wi: u32, inv: f32) -> vec4<f32> {
  let v = x[i] * inv * norm_weight[wi];
  if (valid >= 32u) {
    return v;
  }
  return select(vec4<f32>(0.0), v, vec4<u32>(j0) + vec4<u32>(0u, 1u, 2u, 3u) < vec4<u32>(valid));
}

// The four rows of x starting at vec4 index xi of rows r0..r3 (vec4 indices of row starts),
// inv their 1/rms.
fn load_quad(r: vec4<u32>, xi: u32, j0: u32, valid: u32, inv: vec4<f32>) -> mat4x4<f32> {
  return mat4x4<f32>(load_x(r.x + xi, j0, valid, xi, inv.x), load_x(r.y + xi, j0, valid, xi, inv.y),
                     load_x(r.z + xi, j0, valid, xi, inv.z), load_x(r.w + xi, j0, valid, xi, inv.w));
}

// #include "qmatvec_blocks_f16.wgsl"

// #include "inverse_rms.wgsl"

@compute @workgroup_size(WG)
fn main(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_index) t: u32) {
  let lane = t % TPR;
  let n = wid.x * (WG / TPR) + t / TPR;
  let m0 = wid.y * ROWS;
  inverse_rms(t, m0);
  reduce_store(t, lane, n, m0, qmatvec_blocks(t, lane, n, m0, inv_rms[0], inv_rms[1]), vec4<f32>(1.0), vec4<f32>(1.0));
}
