// qmatvec with silu_gate.wgsl folded into its input load (decode, the FFN down projection):
// y[m, y_col + n] (+)= sum_k silu(x[m, k]) * x[m, up_col + k] * W[n, k], silu(g) = g / (1 + exp(-g)):
// the gate is columns 0..k of each x row and the up projection columns up_col..up_col+k, as the
// fused gate/up matvec writes them. One dispatch instead of silu_gate.wgsl + qmatvec.wgsl.
// Everything below is qmatvec.wgsl's, apart from load_x.
//
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
//
// Per block the thread accumulates (q . x, sum x) per row and applies the group's scale and
// min once: sum_j (scale*q_j + min) x_j = scale*(q . x) + min*(sum x).

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
  up_col: u32,     // column of the up projection in each x row, a multiple of 4
}

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> qweight: array<u32>;
@group(0) @binding(2) var<storage, read> scales: array<u32>;
@group(0) @binding(3) var<storage, read> x: array<vec4<f32>>;
@group(0) @binding(4) var<storage, read_write> y: array<f32>;

override QUADS: u32 = (ROWS + 3u) / 4u;
override SG: u32 = 1u;   // lanes a subgroup sums by shuffles before the sums meet in `partial` (K+subgroup: include/sum_partials_subgroup.wgsl)
// [quad of rows][thread]; in the staged loop first, the chunk of x (include/qmatvec_staged.wgsl)
var<workgroup> partial: array<vec4<f32>, max(max(WG * QUADS / SG, XT), 1u)>;  // at least 1: SG may exceed WG

// #include "scale_min.wgsl"

// #include "codes4.wgsl"

// #include "reduce_store.wgsl"

// #include "row_starts.wgsl"

// Four inputs silu(gate) * up at vec4 index i of the gate, block input j0; inputs at or past `valid` read as 0
// (the last block of a row whose k is not a multiple of 32).
fn load_x(i: u32, j0: u32, valid: u32, wi: u32) -> vec4<f32> {  // wi: qmatvec_norm's; unused here
  let g = x[i];
  let v = g / (vec4<f32>(1.0) + exp(-g)) * x[i + p.up_col / 4u];
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

// #include "qmatvec_main.wgsl"
