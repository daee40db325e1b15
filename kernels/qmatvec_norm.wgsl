// qmatvec with the RMSNorm before it folded in (decode): y[m, y_col + n] (+)= sum_k xn[m, k] * W[n, k]
// where xn = rmsnorm(x, norm_weight, eps), for a few batch rows m. One dispatch instead of
// rmsnorm.wgsl + qmatvec.wgsl: every workgroup first sums the squares of its ROWS rows of x
// (k is small: the hidden size), then runs qmatvec.wgsl's loop on x * norm_weight and scales
// each row's result by 1 / sqrt(mean(x^2) + eps) at the end (the norm is linear in x * weight).
// The block loop is qmatvec.wgsl's (include/qmatvec_blocks.wgsl, reading x through this
// kernel's load_x) and the prologue is shared with qmatvec_norm_f16 (include/inverse_rms.wgsl).
//
// W is a kernels/quant.py tensor: rows contiguous along k, every 32 inputs packed into BITS
// u32 words, one f16 scale (and f16 min when asymmetric) per GROUP inputs. A workgroup
// computes WG / TPR outputs for ROWS batch rows (rows ROWS * workgroup_id.y ...): the TPR
// threads of one output walk its 32-input blocks in turn (neighbouring threads read
// neighbouring words, so loads coalesce), decode each group of 4 codes once and use it for
// all ROWS rows, then a workgroup tree reduction sums their partial dot products.
// (On CPU adapters TPR = 1 is fastest: no reduction, one output per thread.)
//
// Several rows are handled four at a time as a mat4x4 whose columns are the rows' x:
// q * X is then the four rows' dot products. Vectors and matrices stay in registers where
// a private array indexed in a loop may not (it was 8x slower on an NVIDIA GPU).

override BITS: u32 = 4u;          // 2, 3, 4 or 8
override GROUP: u32 = 32u;        // inputs per scale: 32, 64 or 128
override SYMMETRIC: bool = false; // w = scale*(q - 2^(BITS-1)) instead of scale*q + min
override CONTIG3: bool = false;   // BITS = 3: codes contiguous (input j at bit 3j of its block's 96 bits), not bit planes
override WG: u32 = 256u;          // threads per workgroup
override TPR: u32 = 16u;          // threads per output row: a power of two dividing WG
override ROWS: u32 = 1u;          // batch rows per workgroup: 1, 4 or 8
override SPAN: u32 = 8u;          // vec4s of inputs a lane takes at a time: 8 (whole blocks, CPU) or 1, 2, 4 (GPU)
override OPT: u32 = 1u;           // outputs per thread: 1, 2 or 4 (> 1 or SPAN < 8: include/qmatvec_lanes.wgsl)
override EXACT: bool = false;     // k is a multiple of 32 (lanes loop: no masking, no tail)
override XT: u32 = 0u;            // vec4s of x staged a chunk, XT / ROWS of each row (include/qmatvec_staged.wgsl; 0: none)

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
// [quad of rows][thread]; in the staged loop first, the chunk of x (include/qmatvec_staged.wgsl)
var<workgroup> partial: array<vec4<f32>, max(max(WG * QUADS / SG, XT), 1u)>;  // at least 1: SG may exceed WG
var<workgroup> inv_rms: array<vec4<f32>, 2>;  // rows m0..m0+3, m0+4..m0+7

// #include "scale_min.wgsl"

// #include "codes4.wgsl"

// #include "reduce_store.wgsl"

// #include "row_starts.wgsl"

// Four inputs of x * norm_weight at vec4 index i, block input j0 (norm_weight's vec4 index is
// i's offset within the row: i - row start); inputs at or past `valid` read as 0.
fn load_x(i: u32, j0: u32, valid: u32, wi: u32) -> vec4<f32> {
  let v = x[i] * norm_weight[wi];
  if (valid >= 32u) {
    return v;
  }
  return select(vec4<f32>(0.0), v, vec4<u32>(j0) + vec4<u32>(0u, 1u, 2u, 3u) < vec4<u32>(valid));
}

// The four rows of x starting at vec4 index xi of rows r0..r3 (vec4 indices of row starts).
fn load_quad(r: vec4<u32>, xi: u32, j0: u32, valid: u32) -> mat4x4<f32> {
  return mat4x4<f32>(load_x(r.x + xi, j0, valid, xi), load_x(r.y + xi, j0, valid, xi),
                     load_x(r.z + xi, j0, valid, xi), load_x(r.w + xi, j0, valid, xi));
}

// #include "qmatvec_blocks.wgsl"

// #include "qmatvec_lanes.wgsl"

// #include "qmatvec_staged.wgsl"

// #include "inverse_rms.wgsl"

@compute @workgroup_size(WG)
fn main(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_index) t: u32) {
  let lane = t % TPR;
  let n = wid.x * (WG / TPR) + t / TPR;
  let m0 = wid.y * ROWS;
  inverse_rms(t, m0);
  if (SPAN == 8u && OPT == 1u) {
    reduce_store(t, lane, n, m0, qmatvec_blocks(t, lane, n, m0), inv_rms[0], inv_rms[1]);
  } else {
    qmatvec_lanes(t, lane, n * OPT, m0, inv_rms[0], inv_rms[1]);
  }
}
