// RoPE, llama.cpp "normal" mode, in place: in each of the first n_heads heads of row r
// (starting at column x_col), the adjacent pair (x[2i], x[2i+1]) turns by the angle
// positions[r] * base^(-2i/head_dim). One thread per pair; workgroup_id.y is the row.
//
// freq_turns[i] = base^(-2i/head_dim) / (2*pi) comes from the host, computed in float64.
// The angle in turns is reduced to [-1/2, 1/2] before sin/cos, because GPU sin/cos are only
// accurate near zero; what remains is the f32 rounding of pos * freq (~pos * 6e-8 turns).

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
@group(0) @binding(3) var<storage, read> freq_turns: array<f32>;

@compute @workgroup_size(WG)
fn main(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_index) t: u32) {
  let r = wid.y;
  let half = p.head_dim / 2u;
  let pair = wid.x * WG + t;
  if (pair >= p.n_heads * half) {
    return;
  }
  let i = pair % half;
  let turns = f32(positions[r]) * freq_turns[i];
  let angle = (turns - round(turns)) * 6.2831853071795864;
  let c = cos(angle);
  let s = sin(angle);
  let at = r * p.x_stride + p.x_col + (pair / half) * p.head_dim + 2u * i;
  let x0 = x[at];
  let x1 = x[at + 1u];
  x[at] = x0 * c - x1 * s;
  x[at + 1u] = x0 * s + x1 * c;
}
