// Causal grouped-query attention against the KV cache, for decode and prefill alike.
//
// Workgroup (head, r) = (workgroup_id.x, workgroup_id.y) computes query head `head` of row r,
// which sits at absolute position positions[r] of cache slot slots[r] and attends to cache
// positions [0, positions[r]] (its own key included: kv_store.wgsl ran first). Query head h
// reads KV head h / (n_heads / n_kv). Scores are scaled by 1/sqrt(head_dim) (p.scale).
//
// Keys go in chunks of WG: each thread scores one key of the chunk into workgroup memory;
// then the threads split into PARTS parts of HEAD_DIM threads, part j taking a 1/PARTS slice
// of the chunk and thread d of it the output dimension d, with an online softmax (running
// max and sum, rescaled when the max grows). At the end the parts' partial results combine.
// Only finite sentinels are used (-3e38, not -inf): shader compilers may assume no infinities.

override WG: u32 = 256u;                // keys per chunk; at least HEAD_DIM
override HEAD_DIM: u32 = 64u;           // a multiple of 4
override PARTS: u32 = WG / HEAD_DIM;

struct Params {
  n_heads: u32,
  n_kv: u32,
  ctx: u32,         // positions per cache slot
  q_stride: u32,    // q row stride in f32
  q_col: u32,       // column of head 0 in q
  out_stride: u32,  // out row stride in f32
  scale: f32,       // 1 / sqrt(head_dim)
}

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> q: array<f32>;
@group(0) @binding(2) var<storage, read> positions: array<u32>;
@group(0) @binding(3) var<storage, read> slots: array<u32>;
@group(0) @binding(4) var<storage, read> k_cache: array<vec4<f32>>;
@group(0) @binding(5) var<storage, read> v_cache: array<f32>;
@group(0) @binding(6) var<storage, read_write> out: array<f32>;

const NONE = -3.0e38;

var<workgroup> q_head: array<vec4<f32>, HEAD_DIM / 4u>;
var<workgroup> scores: array<f32, WG>;
var<workgroup> part_max: array<f32, PARTS>;
var<workgroup> part_sum: array<f32, PARTS>;
var<workgroup> part_acc: array<f32, WG>;

@compute @workgroup_size(WG)
fn main(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_index) t: u32) {
  let head = wid.x;
  let r = wid.y;
  let kv_head = head / (p.n_heads / p.n_kv);
  let n_keys = positions[r] + 1u;
  let first_key = (slots[r] * p.n_kv + kv_head) * p.ctx;  // cache row of position 0
  if (t < HEAD_DIM / 4u) {
    let at = r * p.q_stride + p.q_col + head * HEAD_DIM + 4u * t;
    q_head[t] = vec4<f32>(q[at], q[at + 1u], q[at + 2u], q[at + 3u]) * p.scale;
  }
  workgroupBarrier();

  let d = t % HEAD_DIM;
  let part = t / HEAD_DIM;
  let keys_per_part = WG / PARTS;
  var run_max = NONE;
  var run_sum = 0.0;
  var acc = 0.0;
  let chunks = (n_keys + WG - 1u) / WG;
  for (var c = 0u; c < chunks; c++) {
    let chunk_start = c * WG;
    let key = chunk_start + t;
    var s = NONE;
    if (key < n_keys) {
      let kbase = (first_key + key) * (HEAD_DIM / 4u);
      var dot4 = vec4<f32>(0.0);
      for (var i = 0u; i < HEAD_DIM / 4u; i++) {
        dot4 += q_head[i] * k_cache[kbase + i];
      }
      s = dot4.x + dot4.y + dot4.z + dot4.w;
    }
    scores[t] = s;
    workgroupBarrier();
    let lo = part * keys_per_part;
    let hi = min(lo + keys_per_part, n_keys - chunk_start);
    if (part < PARTS && lo < hi) {
      var chunk_max = NONE;
      for (var j = lo; j < hi; j++) {
        chunk_max = max(chunk_max, scores[j]);
      }
      let new_max = max(run_max, chunk_max);
      let rescale = exp(run_max - new_max);
      run_sum *= rescale;
      acc *= rescale;
      for (var j = lo; j < hi; j++) {
        let w = exp(scores[j] - new_max);
        run_sum += w;
        acc += w * v_cache[(first_key + chunk_start + j) * HEAD_DIM + d];
      }
      run_max = new_max;
    }
    workgroupBarrier();  // before the next chunk overwrites `scores`
  }

  if (part < PARTS) {
    part_acc[part * HEAD_DIM + d] = acc;
    if (d == 0u) {
      part_max[part] = run_max;
      part_sum[part] = run_sum;
    }
  }
  workgroupBarrier();
  if (t < HEAD_DIM) {
    var m = NONE;
    for (var j = 0u; j < PARTS; j++) {
      m = max(m, part_max[j]);
    }
    var total = 0.0;
    var o = 0.0;
    for (var j = 0u; j < PARTS; j++) {
      let w = exp(part_max[j] - m);
      total += part_sum[j] * w;
      o += part_acc[j * HEAD_DIM + t] * w;
    }
    out[r * p.out_stride + head * HEAD_DIM + t] = o / total;
  }
}
