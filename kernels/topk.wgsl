// Top-k of each row of logits: the k largest, best first, ties to the lower id; NaN and -inf
// rank as the lowest finite f32 (their values are returned as given). One workgroup per row
// (workgroup_id.x); ids are column indices.
//
// Radix select, then a small sort, so no pass sorts the whole row:
// 1. Each logit maps to a u32 key that orders like its value (-0 and +0 share one). Up to
//    four rounds histogram the next 8 bits of the keys inside the current bucket and move
//    to the bucket holding the k-th largest. The search ends early once the whole bucket
//    is needed (usually after two rounds).
// 2. One pass collects keys above the bucket (fewer than k), and from the bucket either all
//    of it or, when its keys are equal and too many, the lowest ids: each thread walks a
//    contiguous range of ids, so an exclusive scan of per-thread counts ranks them by id.
// 3. A bitonic sort of the k candidates (KP slots) orders them.
// KP = 1 (k = 1) takes argmax's one pass instead.

override WG: u32 = 256u;   // a power of two; a GPU wants many (one workgroup does a whole row)
override KP: u32 = 64u;    // candidate slots: a power of two >= k

struct Params {
  count: u32,       // logits per row
  in_stride: u32,   // logits row stride
  k: u32,
  out_stride: u32,  // output row stride (>= k)
}

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> logits: array<f32>;
@group(0) @binding(2) var<storage, read_write> out_values: array<f32>;
@group(0) @binding(3) var<storage, read_write> out_ids: array<u32>;

const LOWEST = -0x1.fffffep+127f;  // the lowest finite f32, exactly
const NO_ID = 0xffffffffu;

var<workgroup> histogram: array<atomic<u32>, 256>;
// the bucket holding the k-th largest key: (lowest key, keys still needed from it, keys in
// it, bits below the resolved prefix)
var<workgroup> bucket: vec4<u32>;
var<workgroup> n_above: atomic<u32>;
var<workgroup> ranked_before: array<u32, WG>;
var<workgroup> cand_values: array<f32, KP>;
var<workgroup> cand_ids: array<u32, KP>;

fn rank(v: f32) -> f32 {
  return select(LOWEST, v, v >= LOWEST);  // false for NaN and -inf
}

fn key_of(v: f32) -> u32 {
  let r = rank(v);
  let bits = select(bitcast<u32>(r), 0u, r == 0.0);
  return select(bits | 0x80000000u, ~bits, (bits & 0x80000000u) != 0u);
}

// Whether candidate slot a goes before slot b.
fn before(a: u32, b: u32) -> bool {
  let va = rank(cand_values[a]);
  let vb = rank(cand_values[b]);
  return va > vb || (va == vb && cand_ids[a] < cand_ids[b]);
}

// k = 1 (greedy decoding): the largest key in one pass, no select rounds nor sort. Each thread
// walks ids t, t + WG, ... (eight loads in flight a step), keeping its largest key and, among
// equal keys, its lowest id; the workgroup then takes the largest key (atomicMax) and the lowest
// id holding it (atomicMin), in histogram[0] and histogram[1].
fn argmax(r: u32, t: u32) {
  let row = r * p.in_stride;
  let n = p.count;
  if (t == 0u) {
    atomicStore(&histogram[0], 0u);
    atomicStore(&histogram[1], NO_ID);
  }
  workgroupBarrier();
  var best = 0u;
  var best_id = NO_ID;
  for (var i0 = t; i0 < n; i0 += 8u * WG) {
    var keys: array<u32, 8>;
    for (var j = 0u; j < 8u; j++) {
      let i = min(i0 + j * WG, n - 1u);  // past the row: the last logit again, its id never lower
      keys[j] = key_of(logits[row + i]);
    }
    for (var j = 0u; j < 8u; j++) {
      let i = i0 + j * WG;
      if (i < n && (keys[j] > best || best_id == NO_ID)) {
        best = keys[j];
        best_id = i;
      }
    }
  }
  atomicMax(&histogram[0], best);
  workgroupBarrier();
  if (best_id != NO_ID && best == atomicLoad(&histogram[0])) {
    atomicMin(&histogram[1], best_id);
  }
  workgroupBarrier();
  if (t == 0u) {
    let id = atomicLoad(&histogram[1]);
    out_values[r * p.out_stride] = logits[row + id];
    out_ids[r * p.out_stride] = id;
  }
}

@compute @workgroup_size(WG)
fn main(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_index) t: u32) {
  let row = wid.x * p.in_stride;
  let n = p.count;
  if (KP == 1u) {
    argmax(wid.x, t);
    return;
  }
  if (t == 0u) {
    bucket = vec4<u32>(0u, p.k, n, 32u);
    atomicStore(&n_above, 0u);
  }
  for (var i = t; i < KP; i += WG) {
    cand_values[i] = LOWEST;
    cand_ids[i] = NO_ID;
  }
  workgroupBarrier();

  // 1. radix select
  for (var round = 0u; round < 4u; round++) {
    // (a uniform value, so leaving the loop keeps the barriers in uniform control flow)
    let b = workgroupUniformLoad(&bucket);
    if (b.z == b.y) {
      break;  // every key of the bucket is needed
    }
    let shift = 24u - 8u * round;
    for (var i = t; i < 256u; i += WG) {
      atomicStore(&histogram[i], 0u);
    }
    workgroupBarrier();
    let high_mask = select(~((1u << (shift + 8u)) - 1u), 0u, round == 0u);
    for (var i = t; i < n; i += WG) {
      let key = key_of(logits[row + i]);
      if ((key & high_mask) == b.x) {
        atomicAdd(&histogram[(key >> shift) & 255u], 1u);
      }
    }
    workgroupBarrier();
    if (t == 0u) {
      var need = b.y;
      var digit = 255u;
      loop {
        let c = atomicLoad(&histogram[digit]);
        if (c >= need) {
          bucket = vec4<u32>(b.x | (digit << shift), need, c, shift);
          break;
        }
        need -= c;
        digit -= 1u;
      }
    }
    workgroupBarrier();
  }

  // 2. collect the k candidates
  let b = workgroupUniformLoad(&bucket);
  let take_all = b.z == b.y;
  let bucket_hi = select(b.x | ((1u << b.w) - 1u), 0xffffffffu, b.w >= 32u);
  let per_thread = (n + WG - 1u) / WG;
  let first = min(n, t * per_thread);
  let last = min(n, first + per_thread);
  var mine = 0u;  // bucket keys in my range that compete for the last places
  for (var i = first; i < last; i++) {
    let v = logits[row + i];
    let key = key_of(v);
    if (key > bucket_hi || (take_all && key >= b.x)) {
      let slot = atomicAdd(&n_above, 1u);
      cand_values[slot] = v;
      cand_ids[slot] = i;
    } else if (key >= b.x) {
      mine += 1u;
    }
  }
  if (!take_all) {
    // the bucket is one key (all 32 bits resolved) held by more ids than places are left:
    // the lowest ids win, ranked by an exclusive scan of the per-thread counts
    ranked_before[t] = mine;
    workgroupBarrier();
    if (t == 0u) {
      var total = 0u;
      for (var i = 0u; i < WG; i++) {
        let c = ranked_before[i];
        ranked_before[i] = total;
        total += c;
      }
    }
    workgroupBarrier();
    var rank_in_bucket = ranked_before[t];
    let above = p.k - b.y;
    for (var i = first; i < last && rank_in_bucket < b.y; i++) {
      let v = logits[row + i];
      if (key_of(v) == b.x) {
        cand_values[above + rank_in_bucket] = v;
        cand_ids[above + rank_in_bucket] = i;
        rank_in_bucket += 1u;
      }
    }
  }
  workgroupBarrier();

  // 3. bitonic sort of the candidates, best first
  for (var size = 2u; size <= KP; size <<= 1u) {
    for (var stride = size / 2u; stride > 0u; stride >>= 1u) {
      for (var e = t; e < KP / 2u; e += WG) {
        let i = (e / stride) * 2u * stride + e % stride;
        let j = i + stride;
        if (before(j, i) == ((i & size) == 0u)) {
          let v = cand_values[i];
          cand_values[i] = cand_values[j];
          cand_values[j] = v;
          let id = cand_ids[i];
          cand_ids[i] = cand_ids[j];
          cand_ids[j] = id;
        }
      }
      workgroupBarrier();
    }
  }
  for (var i = t; i < p.k; i += WG) {
    out_values[wid.x * p.out_stride + i] = cand_values[i];
    out_ids[wid.x * p.out_stride + i] = cand_ids[i];
  }
}
