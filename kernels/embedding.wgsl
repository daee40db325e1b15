// Embedding lookup: y[r, :] = dequantized row ids[r] of a quantized [vocab, hidden] table.
//
// A table too big for one storage binding is split by rows into several buffers; each
// dispatch holds rows [row_start, row_start + n_rows) and fills only the ids that fall there.
// One workgroup per id (workgroup_id.x); its threads walk the row's inputs.

override BITS: u32 = 8u;          // 2, 3, 4 or 8
override GROUP: u32 = 32u;        // inputs per scale: 32, 64 or 128
override SYMMETRIC: bool = true;  // w = scale*(q - 2^(BITS-1)) instead of scale*q + min
override CONTIG3: bool = false;   // BITS = 3: codes contiguous (input j at bit 3j of its block's 96 bits), not bit planes
override WG: u32 = 64u;

struct Params {
  k: u32,          // row length (hidden)
  row_start: u32,  // first table row held by this buffer
  n_rows: u32,     // rows held by this buffer
  y_stride: u32,   // y row stride in f32
}

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> ids: array<u32>;
@group(0) @binding(2) var<storage, read> qweight: array<u32>;
@group(0) @binding(3) var<storage, read> scales: array<u32>;
@group(0) @binding(4) var<storage, read_write> y: array<f32>;

// #include "scale_min.wgsl"

// #include "code_at.wgsl"

@compute @workgroup_size(WG)
fn main(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_index) t: u32) {
  let r = wid.x;
  let id = ids[r];
  if (id < p.row_start || id >= p.row_start + p.n_rows) {
    return;
  }
  let n = id - p.row_start;
  let groups = (p.k + GROUP - 1u) / GROUP;
  let words_per_row = groups * GROUP / 32u * BITS;
  for (var i = t; i < p.k; i += WG) {
    let sm = scale_min(n, i / GROUP, groups);
    let q = code_at(n * words_per_row + i / 32u * BITS, i % 32u);
    y[r * p.y_stride + i] = sm.x * f32(q) + sm.y;
  }
}
