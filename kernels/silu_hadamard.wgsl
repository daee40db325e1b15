// SiLU gate, then the normalized Walsh-Hadamard transform of each BLOCK consecutive outputs:
// y[r, blk] = (silu(gate[r, blk]) * up[r, blk]) @ H_BLOCK / sqrt(BLOCK). The activation that
// ffn_down reads in a model whose FFN hidden space is rotated (tabshard/rotation.py): H's
// transpose is folded into ffn_down offline, so at run time only this transform remains.
//
// One workgroup per (block, row); the block sits in workgroup memory. Butterfly stage h pairs
// (i, i + h), for h = 1, 2, 4, ... (the order of the numpy twin kernels/reference.py:hadamard
// and of pk_hadamard in packed_kernels.c: the same adds in the same order, the same bits).
// P threads (the largest power of two <= WG, BLOCK) each own E = BLOCK / P entries twice over:
// a contiguous run t*E.. for the stages h < E, which never leave the thread, then the strided
// set t, t + P, ... for the stages h >= P, which never leave it either. Only stages with
// E <= h < P mix threads, one barrier each; with P*P <= BLOCK (the program's CPU workgroup of
// 16 for SmolLM2's 512) there are none, and the whole transform costs one barrier: barriers are
// what a CPU rasteriser (lavapipe, SwiftShader) pays most for.

override WG: u32 = 16u;
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

fn butterfly(i: u32, h: u32) {
  let a = s[i];
  let b = s[i + h];
  s[i] = a + b;
  s[i + h] = a - b;
}

@compute @workgroup_size(WG)
fn main(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_index) t: u32) {
  let r = wid.y;
  let base = wid.x * BLOCK;
  let threads = 1u << firstLeadingBit(min(WG, BLOCK));
  let e = BLOCK / threads;
  let owner = t < threads;
  if (owner) {
    let c = t * e;
    for (var j = 0u; j < e; j++) {
      let g = src[r * p.src_stride + p.gate_col + base + c + j];
      let u = src[r * p.src_stride + p.up_col + base + c + j];
      s[c + j] = g / (1.0 + exp(-g)) * u;
    }
    for (var h = 1u; h < e; h <<= 1u) {
      for (var j = 0u; j < e / 2u; j++) {
        butterfly(c + (j / h) * 2u * h + j % h, h);
      }
    }
  }
  workgroupBarrier();
  for (var h = e; h < threads; h <<= 1u) {
    if (owner) {
      for (var j = t; j < BLOCK / 2u; j += threads) {
        butterfly((j / h) * 2u * h + j % h, h);
      }
    }
    workgroupBarrier();
  }
  if (owner) {
    for (var h = max(e, threads); h < BLOCK; h <<= 1u) {
      let hm = h / threads;  // the pair's distance in the thread's strided set
      for (var j = 0u; j < e / 2u; j++) {
        butterfly(t + threads * ((j / hm) * 2u * hm + j % hm), h);
      }
    }
    for (var m = 0u; m < e; m++) {
      let i = t + threads * m;
      y[r * p.y_stride + base + i] = s[i] * p.scale;
    }
  }
}
