// Top-k, one stage: each workgroup sorts one segment of SEG candidates of one row in
// workgroup memory (bitonic sort) and writes its best k, best first. Order: larger value
// first, then lower id; NaN and -inf rank as the lowest finite f32 (their values are kept).
// The host repeats stages (each shrinks a row from count to ceil(count / SEG) * k
// candidates) until one segment is left: 49152 logits -> 48*k -> 3*k -> k for SEG = 1024.
//
// Workgroup (segment, row) = (workgroup_id.x, workgroup_id.y). The first stage reads logits
// and takes ids from the column (implicit_ids = 1); later stages read (value, id) pairs.

override WG: u32 = 256u;
override SEG: u32 = 1024u;  // a power of two, at least 2k; SEG*8 bytes of workgroup memory

struct Params {
  count: u32,         // candidates per row in the input
  in_stride: u32,     // input row stride (values and ids)
  k: u32,
  out_stride: u32,    // output row stride: segments * k
  implicit_ids: u32,  // 1: the id of input column c is c
}

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> in_values: array<f32>;
@group(0) @binding(2) var<storage, read> in_ids: array<u32>;
@group(0) @binding(3) var<storage, read_write> out_values: array<f32>;
@group(0) @binding(4) var<storage, read_write> out_ids: array<u32>;

const LOWEST = -0x1.fffffep+127f;  // the lowest finite f32, exactly
const NO_ID = 0xffffffffu;

var<workgroup> values: array<f32, SEG>;
var<workgroup> ids: array<u32, SEG>;

fn rank(v: f32) -> f32 {
  return select(LOWEST, v, v >= LOWEST);  // false for NaN and -inf
}

// Whether candidate a goes before candidate b.
fn before(a: u32, b: u32) -> bool {
  let va = rank(values[a]);
  let vb = rank(values[b]);
  return va > vb || (va == vb && ids[a] < ids[b]);
}

@compute @workgroup_size(WG)
fn main(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_index) t: u32) {
  let segment = wid.x;
  let r = wid.y;
  for (var e = t; e < SEG; e += WG) {
    let c = segment * SEG + e;
    var v = LOWEST;
    var id = NO_ID;
    if (c < p.count) {
      v = in_values[r * p.in_stride + c];
      id = select(in_ids[r * p.in_stride + c], c, p.implicit_ids != 0u);
    }
    values[e] = v;
    ids[e] = id;
  }
  workgroupBarrier();
  // Bitonic sort, best first: pass (size, stride) compares i with i + stride, putting the
  // better one first where bit `size` of i is clear and last where it is set.
  for (var size = 2u; size <= SEG; size <<= 1u) {
    for (var stride = size / 2u; stride > 0u; stride >>= 1u) {
      for (var e = t; e < SEG / 2u; e += WG) {
        let i = (e / stride) * 2u * stride + e % stride;
        let j = i + stride;
        let best_first = (i & size) == 0u;
        if (before(j, i) == best_first) {
          let v = values[i];
          values[i] = values[j];
          values[j] = v;
          let id = ids[i];
          ids[i] = ids[j];
          ids[j] = id;
        }
      }
      workgroupBarrier();
    }
  }
  for (var i = t; i < p.k; i += WG) {
    out_values[r * p.out_stride + segment * p.k + i] = values[i];
    out_ids[r * p.out_stride + segment * p.k + i] = ids[i];
  }
}
