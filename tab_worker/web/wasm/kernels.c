// qmatvec for the WASM fallback: y[m, y_col + n] (+)= sum_k x[m, k] * W[n, k], W packed as
// kernels/quant.py packs it (the same words qmatvec.wgsl reads). Scales arrive pre-decoded
// to f32 (scale, min) pairs per group (w = scale * q + min; symmetric formats fold their
// offset into min), so the inner loop is integer unpacking and f32 multiply-adds.
//
// Per 32-input block: sum_j (s*q_j + m) x_j = s*(q . x) + m*(sum x). The block sums of x are
// computed once per call (xsum), the codes of a block once per output row and used for up to
// MAX_ROWS batch rows. 4- and 8-bit codes unpack with SIMD masks: a u32 word splatted to
// four lanes, AND (0xF, 0xF0, 0xF00, 0xF000), converted to f32 and scaled by (1, 2^-4,
// 2^-8, 2^-12) is exact. Other widths take the scalar path.
//
// Build (tab_worker/web/build.py): clang --target=wasm32 -O3 -msimd128 -nostdlib
//   -Wl,--no-entry -Wl,--import-memory -Wl,--export-dynamic -Wl,--export=__heap_base
// (JS allocates weights and scratch from __heap_base up: below it are the C data and stack)
#include <stdint.h>
#include <wasm_simd128.h>

#define EXPORT(name) __attribute__((export_name(name)))
#define MAX_ROWS 8

static inline float hsum(v128_t v) {
  return wasm_f32x4_extract_lane(v, 0) + wasm_f32x4_extract_lane(v, 1) + wasm_f32x4_extract_lane(v, 2) +
         wasm_f32x4_extract_lane(v, 3);
}

// The 32 codes of one block as 8 f32x4 vectors.
static inline void codes_block(const uint32_t *w, int bits, v128_t c[8]) {
  if (bits == 4) {
    const v128_t mask = wasm_u32x4_make(0xF, 0xF0, 0xF00, 0xF000);
    const v128_t scale = wasm_f32x4_make(1.0f, 1.0f / 16, 1.0f / 256, 1.0f / 4096);
    for (int i = 0; i < 4; i++) {
      v128_t word = wasm_u32x4_splat(w[i]);
      c[2 * i] = wasm_f32x4_mul(wasm_f32x4_convert_u32x4(wasm_v128_and(word, mask)), scale);
      c[2 * i + 1] = wasm_f32x4_mul(wasm_f32x4_convert_u32x4(wasm_v128_and(wasm_u32x4_shr(word, 16), mask)), scale);
    }
  } else if (bits == 8) {
    const v128_t mask = wasm_u32x4_make(0xFF, 0xFF00, 0xFF0000, 0xFF000000u);
    const v128_t scale = wasm_f32x4_make(1.0f, 1.0f / 256, 1.0f / 65536, 1.0f / 16777216);
    for (int i = 0; i < 8; i++) {
      c[i] = wasm_f32x4_mul(wasm_f32x4_convert_u32x4(wasm_v128_and(wasm_u32x4_splat(w[i]), mask)), scale);
    }
  } else {
    float f[32];
    for (int j = 0; j < 32; j++) {
      uint32_t q;
      if (bits == 3) {
        q = ((w[j / 16] >> (2 * (j % 16))) & 3u) | (((w[2] >> j) & 1u) << 2);
      } else {
        q = (w[j * bits / 32] >> (j * bits % 32)) & ((1u << bits) - 1u);
      }
      f[j] = (float)q;
    }
    for (int i = 0; i < 8; i++) c[i] = wasm_v128_load(f + 4 * i);
  }
}

// xsum[m * blocks + b] = sum of x[m, 32b : 32b+32] (zero past k); x rows padded to blocks*32
// floats by the caller (xp: rows of blocks*32 floats, zeros past k).
EXPORT("block_sums")
void block_sums(const float *xp, int rows, int blocks, float *xsum) {
  for (int m = 0; m < rows; m++) {
    for (int b = 0; b < blocks; b++) {
      const float *x = xp + (m * blocks + b) * 32;
      v128_t s = wasm_f32x4_splat(0.0f);
      for (int i = 0; i < 8; i++) s = wasm_f32x4_add(s, wasm_v128_load(x + 4 * i));
      xsum[m * blocks + b] = hsum(s);
    }
  }
}

// q: u32 [n, words_per_row]; sm: f32 [n, groups, 2]; xp: f32 [rows, blocks*32] (zero-padded);
// xsum from block_sums; y: f32 rows of y_stride, written at columns y_col..y_col+n.
EXPORT("qmatvec")
void qmatvec(const uint32_t *q, const float *sm, int n, int k, int bits, int group, const float *xp,
             const float *xsum, int rows, float *y, int y_stride, int y_col, int accumulate) {
  const int groups = (k + group - 1) / group;
  const int blocks = (k + 31) / 32;
  const int words_per_row = groups * group / 32 * bits;
  for (int r0 = 0; r0 < rows; r0 += MAX_ROWS) {
    const int nr = rows - r0 < MAX_ROWS ? rows - r0 : MAX_ROWS;
    for (int o = 0; o < n; o++) {
      const uint32_t *w = q + (int64_t)o * words_per_row;
      const float *s = sm + (int64_t)o * groups * 2;
      double acc[MAX_ROWS] = {0};  // double: s*(q.x) + m*(sum x) cancels (m ~ -8s)
      for (int b = 0; b < blocks; b++) {
        v128_t c[8];
        codes_block(w + b * bits, bits, c);
        const int g = b * 32 / group;
        const float scale = s[2 * g], mn = s[2 * g + 1];
        for (int r = 0; r < nr; r++) {
          const float *x = xp + ((r0 + r) * blocks + b) * 32;
          v128_t d = wasm_f32x4_mul(c[0], wasm_v128_load(x));
          for (int i = 1; i < 8; i++) d = wasm_f32x4_add(d, wasm_f32x4_mul(c[i], wasm_v128_load(x + 4 * i)));
          acc[r] += (double)scale * hsum(d) + (double)mn * xsum[(r0 + r) * blocks + b];
        }
      }
      for (int r = 0; r < nr; r++) {
        float *dst = y + (r0 + r) * y_stride + y_col + o;
        *dst = accumulate ? (float)(*dst + acc[r]) : (float)acc[r];
      }
    }
  }
}
