// Included (kernels.wgsl_source) by attention.wgsl and attention_rope.wgsl, which declare
// Params (n_heads, n_kv, ctx, out_stride, splits), the bindings positions, slots, k_cache,
// v_cache (vec4 views), out and parts, and load query head `head` of row r, scaled, into
// q_head before calling attend(): the walk over the keys, the fold and the store.
//
// Workgroup (head, r) = (workgroup_id.x, workgroup_id.y) computes query head `head` of row r,
// which sits at absolute position positions[r] of cache slot slots[r] and attends to cache
// positions [0, positions[r]] (its own key included: kv_store.wgsl ran first). Query head h
// reads KV head h / (n_heads / n_kv). Scores are scaled by 1/sqrt(head_dim) (p.scale).
//
// Keys go in chunks of WG: each thread scores one key of the chunk into workgroup memory;
// then the threads split into PARTS parts of LANES = HEAD_DIM / 4 threads, part j taking
// keys j, j + PARTS, j + 2 PARTS... of the chunk and lane l of it output dimensions 4l..4l+3
// (V read as vec4), with an online softmax (running max and sum, rescaled when the max grows).
// The walk over a part's keys is the serial path (each step waits on its V loads: a part
// takes KEYS_AT_ONCE keys a step, their loads in flight together): vec4 lanes
// make parts 4x more numerous than a thread per dimension would, and taking keys in turn
// (not a contiguous 1/PARTS slice each) spreads a short context over all parts: at 20 keys
// 20 parts walk one key each instead of one part walking 20. At the end the parts'
// partial results fold pairwise in workgroup memory (half the parts at a time: the folding
// buffer is half the size a one-shot combine would need, which keeps WG = 1024 inside
// WebGPU's default 16 KiB of workgroup storage).
// Only finite sentinels are used (-3e38, not -inf): shader compilers may assume no infinities.
//
// Split-K (flash decoding): with p.splits > 1 the grid has a third dimension, and workgroup
// (head, r, s) takes only split s of the row's keys (runs of cdiv(keys, splits), the last
// shorter or empty), so a long context is walked by many workgroups at once instead of one per
// head. Each leaves its unnormalised partial (V sum, running max and sum) in `parts`;
// attention_combine.wgsl folds them. With p.splits = 1 the workgroup writes `out` itself.

override WG: u32 = 256u;                // keys per chunk; at least HEAD_DIM / 4
override HEAD_DIM: u32 = 64u;           // a multiple of 4
override LANES: u32 = HEAD_DIM / 4u;
override PARTS: u32 = WG / LANES;
override KEYS_AT_ONCE: u32 = 4u;      // keys a part walks per step: 4 (V loads in flight together) or 1

const NONE = -3.0e38;

// #include "store_head.wgsl"

var<workgroup> q_head: array<vec4<f32>, LANES>;
var<workgroup> scores: array<f32, WG>;
var<workgroup> fold_max: array<f32, (PARTS + 1u) / 2u>;
var<workgroup> fold_sum: array<f32, (PARTS + 1u) / 2u>;
var<workgroup> fold_acc: array<vec4<f32>, (PARTS + 1u) / 2u * LANES>;

fn attend(head: u32, r: u32, split: u32, t: u32) {
  let kv_head = head / (p.n_heads / p.n_kv);
  let row_keys = positions[r] + 1u;
  let per_split = (row_keys + p.splits - 1u) / p.splits;
  let split_start = min(row_keys, split * per_split);
  let n_keys = min(row_keys - split_start, per_split);  // this split's keys (0 for a split past the end)
  let first_key = (slots[r] * p.n_kv + kv_head) * p.ctx + split_start;  // cache row of the split's first key
  let lane = t % LANES;
  let part = t / LANES;
  var run_max = NONE;
  var run_sum = 0.0;
  var acc = vec4<f32>(0.0);
  let chunks = (n_keys + WG - 1u) / WG;
  for (var c = 0u; c < chunks; c++) {
    let chunk_start = c * WG;
    let key = chunk_start + t;
    var s = NONE;
    if (key < n_keys) {
      let kbase = (first_key + key) * LANES;
      var dot4 = vec4<f32>(0.0);
      for (var i = 0u; i < LANES; i++) {
        dot4 += q_head[i] * k_cache[kbase + i];
      }
      s = dot4.x + dot4.y + dot4.z + dot4.w;
    }
    scores[t] = s;
    workgroupBarrier();
    let count = min(WG, n_keys - chunk_start);
    if (part < PARTS && part < count) {
      var chunk_max = NONE;
      for (var j = part; j < count; j += PARTS) {
        chunk_max = max(chunk_max, scores[j]);
      }
      let new_max = max(run_max, chunk_max);
      let rescale = exp(run_max - new_max);
      run_sum *= rescale;
      acc *= rescale;
      var j = part;
      if (KEYS_AT_ONCE == 4u) {
        // four keys a step: their V loads issue together instead of each waiting on the one
        // before (the same sums in the same order as one key a step: the same bits)
        for (; j + 3u * PARTS < count; j += 4u * PARTS) {
          let at = (first_key + chunk_start + j) * LANES + lane;
          let v0 = v_cache[at];
          let v1 = v_cache[at + PARTS * LANES];
          let v2 = v_cache[at + 2u * PARTS * LANES];
          let v3 = v_cache[at + 3u * PARTS * LANES];
          let w0 = exp(scores[j] - new_max);
          let w1 = exp(scores[j + PARTS] - new_max);
          let w2 = exp(scores[j + 2u * PARTS] - new_max);
          let w3 = exp(scores[j + 3u * PARTS] - new_max);
          run_sum += w0;
          acc += w0 * v0;
          run_sum += w1;
          acc += w1 * v1;
          run_sum += w2;
          acc += w2 * v2;
          run_sum += w3;
          acc += w3 * v3;
        }
      }
      for (; j < count; j += PARTS) {
        let w = exp(scores[j] - new_max);
        run_sum += w;
        acc += w * v_cache[(first_key + chunk_start + j) * LANES + lane];
      }
      run_max = new_max;
    }
    workgroupBarrier();  // before the next chunk overwrites `scores`
  }

  // fold parts [half, n) into [0, n - half) until one is left (a part that saw no key has
  // run_max = NONE and run_sum = 0: its weight exp(NONE - m) is 0)
  var n = PARTS;
  loop {
    if (n <= 1u) {
      break;
    }
    let half = (n + 1u) / 2u;
    if (part >= half && part < n) {
      fold_acc[(part - half) * LANES + lane] = acc;
      if (lane == 0u) {
        fold_max[part - half] = run_max;
        fold_sum[part - half] = run_sum;
      }
    }
    workgroupBarrier();
    if (part < n - half) {
      let other_max = fold_max[part];
      let m = max(run_max, other_max);
      let a = exp(run_max - m);
      let b = exp(other_max - m);
      run_sum = run_sum * a + fold_sum[part] * b;
      acc = acc * a + fold_acc[part * LANES + lane] * b;
      run_max = m;
    }
    workgroupBarrier();
    n = half;
  }
  if (part == 0u && p.splits > 1u) {
    let at = ((r * p.n_heads + head) * p.splits + split) * (LANES + 1u);
    parts[at + lane] = acc;
    if (lane == 0u) {
      parts[at + LANES] = vec4<f32>(run_max, run_sum, 0.0, 0.0);
    }
  } else if (part == 0u) {
    store_head(r, head, lane, acc / run_sum);
  }
}
