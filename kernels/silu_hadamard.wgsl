// SiLU gate, then the normalized Walsh-Hadamard transform of each BLOCK consecutive outputs:
// y[r, blk] = (silu(gate[r, blk]) * up[r, blk]) @ H_BLOCK / sqrt(BLOCK). The activation that
// ffn_down reads in a model whose FFN hidden space is rotated (tabshard/rotation.py): H's
// transpose is folded into ffn_down offline, so at run time only this transform remains.
// One workgroup per (block, row): the block sits in workgroup memory, log2(BLOCK) butterfly
// stages pair (i, i + h) for h = 1, 2, 4, ... with a barrier between stages (the order of the
// numpy twin kernels/reference.py:hadamard and of pk_hadamard in packed_kernels.c).

override WG: u32 = 64u;
override BLOCK: u32 = 512u;  // a power of two; BLOCK floats must fit workgroup memory

struct Params {
  src_stride: u32,  // src row stride in f32
  gate_col: u32,
  up_col: u32,
  y_stride: u32,    // y row stride in f32
  scale: f32,       // 1 / sqrt(BLOCK)
}

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> src: array<f32>;
@group(0) @binding(2) var<storage, read_write> y: array<f32>;

var<workgroup> s: array<f32, BLOCK>;

@compute @workgroup_size(WG)
fn main(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_index) t: u32) {
  let r = wid.y;
  let base = wid.x * BLOCK;
  for (var i = t; i < BLOCK; i += WG) {
    let g = src[r * p.src_stride + p.gate_col + base + i];
    let u = src[r * p.src_stride + p.up_col + base + i];
    s[i] = g / (1.0 + exp(-g)) * u;
  }
  workgroupBarrier();
  for (var h = 1u; h < BLOCK; h <<= 1u) {
    for (var j = t; j < BLOCK / 2u; j += WG) {
      let i = (j / h) * 2u * h + j % h;
      let a = s[i];
      let b = s[i + h];
      s[i] = a + b;
      s[i + h] = a - b;
    }
    workgroupBarrier();
  }
  for (var i = t; i < BLOCK; i += WG) {
    y[r * p.y_stride + base + i] = s[i] * p.scale;
  }
}
