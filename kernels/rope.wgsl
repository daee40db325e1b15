// RoPE, llama.cpp "normal" mode, in place: in each of the first n_heads heads of row r
// (starting at column x_col), the adjacent pair (x[2i], x[2i+1]) turns by the angle
// positions[r] * base^(-2i/head_dim). One thread per pair; workgroup_id.y is the row.
//
// The angle is computed in turns and reduced to [-1/2, 1/2] before sin/cos, because GPU
// sin/cos are only accurate near zero. A plain f32 pos * freq would be off by ~pos * 6e-8
// turns (1.5e-3 rad at position 4096), so the host (runner.rope_freq_turns) splits each
// freq = base^(-2i/head_dim) / (2*pi), computed in float64, into hi + mid + lo with 8-bit
// mantissas in hi and mid: pos * hi and pos * mid are then exact for pos < 2^16 and so are
// their fractions, leaving an angle error of ~1e-6 rad.

override WG: u32 = 64u;

struct Params {
  n_heads: u32,   // heads rotated per row (the q heads then the k heads of a fused qkv row)
  head_dim: u32,
  x_stride: u32,  // x row stride in f32
  x_col: u32,     // column of the first rotated head
}

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read_write> x: array<f32>;
@group(0) @binding(2) var<storage, read> positions: array<u32>;
@group(0) @binding(3) var<storage, read> freq_turns: array<vec4<f32>>;  // (hi, mid, lo, 0) per pair

@compute @workgroup_size(WG)
fn main(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_index) t: u32) {
  let r = wid.y;
  let half = p.head_dim / 2u;
  let pair = wid.x * WG + t;
  if (pair >= p.n_heads * half) {
    return;
  }
  let i = pair % half;
  let pos = f32(positions[r]);
  let freq = freq_turns[i];
  let turns = fract(pos * freq.x) + fract(pos * freq.y) + pos * freq.z;
  let angle = (turns - round(turns)) * 6.2831853071795864;
  let c = cos(angle);
  let s = sin(angle);
  let at = r * p.x_stride + p.x_col + (pair / half) * p.head_dim + 2u * i;
  let x0 = x[at];
  let x1 = x[at + 1u];
  x[at] = x0 * c - x1 * s;
  x[at + 1u] = x0 * s + x1 * c;
}
