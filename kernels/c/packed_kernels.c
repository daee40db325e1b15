// Packed-weight matmul for every format of kernels/quant.py (2/3/4/8-bit codes, groups of
// 32/64/128, symmetric or asymmetric), the one C source of the CPU workers: compiled natively
// by tab_worker/cpu_kernels.py (scalar, AVX2+FMA+F16C and AVX-512 paths, chosen at run time)
// and to WebAssembly SIMD by tab_worker/web/build.py for the browser tab.
// Longer than the house's ~600 lines on purpose: it is the one source both builds compile, and
// its paths must stay side by side so that they read each format the same way (bit-identical).
//
//   y[r, o] (+)= sum_k x[r, k] * W[o, k],  W[o, k] = scale(o, g) * code(o, k) + min(o, g)
//
// W stays packed: the u32 code words and f16 scale words exactly as quant.py lays them out
// (the same words the WGSL reads). Each 16 codes are unpacked in registers to f32, turned into
// weights with one fma(code, scale, min) (AVX-512, 4 bits: picked from the block's 16 such
// weights, see IOTA16) and multiplied into f32 activations. Each packed word
// is read once per call for all rows of the step: a tile holds up to 4 activation rows and
// NG weight rows, and the dequantized weights are used for every row before moving on.
//
// Why f32 activations and not int8 ones (llama.cpp's Q8 dot products): int8 activations per
// 32-block would move SmolLM2's logits up to 0.91 from Hugging Face's golden ones and change
// the argmax at 4 of 182 teacher-forced steps (benchmarks/bench_q8_activations.py), where f32
// stays within 5e-5 (the golden tests allow 2e-3). At f32 a decode token measured 0.85x
// llama.cpp's Q8 path at the same thread count (benchmarks/bench_generate.py).
//
// Determinism: every output is 16 accumulator lanes (lane t takes inputs 16h + t of a 32-block,
// h = 0 then 1; for 4 bits inputs 2t + h, the nibble order of the block's bytes, so one byte
// unpack gives a whole vector), fma for each weight and each product, the blocks in order,
// then one fixed reduction tree
// (lanes j + 8, then j + 4, j + 2, j + 1). The scalar, AVX2 and AVX-512 paths do exactly
// these operations, so they give the same bits, and a row's result never depends on which
// other rows share the call (batch invariance: concurrency never changes a greedy token).
// The WASM build has no fused multiply-add: mul then add, so it agrees to rounding only.
//
// Activations: x rows of at least k_pad floats (k rounded up to the group), zeros past k.
#include <stddef.h>
#include <stdint.h>

#if defined(__wasm__)
#include <wasm_simd128.h>
#define EXPORT(name) __attribute__((export_name(name)))
#else
#define EXPORT(name)
#endif

#define INLINE static inline __attribute__((always_inline))

// ------------------------------------------------------------------ formats and scales

typedef struct {
  const uint32_t *q, *s;  // code words [n, wpr], scale words [n, spr]
  size_t n, k_pad, wpr, spr, pf_rows;
  int bits, group, sym, group_shift;  // group_shift: log2 of the 32-blocks in a group
} Mat;

#define PF_BYTES 4096

INLINE Mat mat_of(const uint32_t *q, const uint32_t *s, size_t n, size_t k, int bits, int group, int sym) {
  Mat w;
  w.q = q, w.s = s, w.n = n, w.bits = bits, w.group = group, w.sym = sym;
  w.k_pad = (k + group - 1) / group * group;
  w.wpr = w.k_pad / 32 * bits;
  const size_t groups = w.k_pad / group;
  w.spr = sym ? (groups + 1) / 2 : groups;
  w.pf_rows = PF_BYTES / (4 * w.wpr) < 8 ? 8 : PF_BYTES / (4 * w.wpr);
  w.group_shift = group == 128 ? 2 : group == 64 ? 1 : 0;
  return w;
}

// IEEE half to float, exact for every input: exponent and mantissa moved to f32's places and
// rebiased by a multiply by 2^112 (exact, subnormals included), inf and NaN patched; no branch.
INLINE float f16_to_f32(uint32_t h) {
  union { uint32_t u; float f; } v, mag;
  v.u = (h & 0x7fffu) << 13;
  mag.f = v.f * 5.192296858534828e+33f;  // 2^112
  mag.u |= ((h & 0x7c00u) == 0x7c00u) ? 0x7f800000u : 0u;
  mag.u |= (h & 0x8000u) << 16;
  return mag.f;
}

// (scale, min) of group g of one row: w = scale * code + min; symmetric formats store only the
// scale, min = -scale * 2^(bits-1) (exact: a power of two).
INLINE void group_scale(const Mat *w, const uint32_t *srow, size_t g, float *scale, float *mn) {
  if (w->sym) {
    const uint32_t word = srow[g >> 1];
    *scale = f16_to_f32(g & 1 ? word >> 16 : word & 0xffffu);
    *mn = -*scale * (float)(1 << (w->bits - 1));
  } else {
    const uint32_t word = srow[g];
    *scale = f16_to_f32(word & 0xffffu);
    *mn = f16_to_f32(word >> 16);
  }
}

// ------------------------------------------------------------------ portable scalar path
#if !defined(__wasm__)
#include <math.h>

// Code of input i (0..31) of a 32-block whose `bits` words start at wb (quant.py's layout:
// 2/4/8 bits little-endian in word i*bits/32; 3 bits as two low-bit planes and a high-bit word).
INLINE uint32_t code_at(const uint32_t *wb, int bits, int i) {
  if (bits == 3) return ((wb[i >> 4] >> (2 * (i & 15))) & 3u) | (((wb[2] >> i) & 1u) << 2);
  return (wb[(i * bits) >> 5] >> ((i * bits) & 31)) & ((1u << bits) - 1u);
}

// the input of a 32-block that lane t of half h takes (see Determinism above)
INLINE int lane_input(int bits, int h, int t) { return bits == 4 ? 2 * t + h : 16 * h + t; }

// the reduction tree every path uses: lanes j + 8, j + 4, j + 2, j + 1
INLINE float reduce16(const float *a) {
  float t8[8], t4[4], t2[2];
  for (int j = 0; j < 8; j++) t8[j] = a[j] + a[j + 8];
  for (int j = 0; j < 4; j++) t4[j] = t8[j] + t8[j + 4];
  for (int j = 0; j < 2; j++) t2[j] = t4[j] + t4[j + 2];
  return t2[0] + t2[1];
}

static void matmul_scalar(const Mat *w, const float *x, size_t m, size_t ldx, float *y, size_t ldy, int accumulate) {
  const size_t blocks = w->k_pad / 32;
  for (size_t o = 0; o < w->n; o++) {
    const uint32_t *qrow = w->q + o * w->wpr, *srow = w->s + o * w->spr;
    for (size_t r = 0; r < m; r++) {
      float acc[16] = {0};
      const float *xr = x + r * ldx;
      for (size_t b = 0; b < blocks; b++) {
        float sc, mn;
        group_scale(w, srow, b * 32 / w->group, &sc, &mn);
        const uint32_t *wb = qrow + b * w->bits;
        for (int h = 0; h < 2; h++)
          for (int t = 0; t < 16; t++) {
            const int i = lane_input(w->bits, h, t);
            acc[t] = fmaf(fmaf((float)code_at(wb, w->bits, i), sc, mn), xr[b * 32 + i], acc[t]);
          }
      }
      const float s = reduce16(acc);
      float *dst = y + r * ldy + o;
      *dst = accumulate ? *dst + s : s;
    }
  }
}

static void dequantize_scalar(const Mat *w, size_t r0, size_t r1, float *out, size_t ldo) {
  for (size_t o = r0; o < r1; o++) {
    const uint32_t *qrow = w->q + o * w->wpr, *srow = w->s + o * w->spr;
    float *dst = out + (o - r0) * ldo;
    for (size_t b = 0; b < w->k_pad / 32; b++) {
      float sc, mn;
      group_scale(w, srow, b * 32 / w->group, &sc, &mn);
      for (int i = 0; i < 32; i++) dst[b * 32 + i] = fmaf((float)code_at(qrow + b * w->bits, w->bits, i), sc, mn);
    }
  }
}
#endif

// ------------------------------------------------------------------ x86: AVX2 and AVX-512
#if defined(__x86_64__) && !defined(__wasm__)
#include <immintrin.h>

#define T_AVX2 __attribute__((target("avx2,fma,f16c")))
#define T_AVX512 __attribute__((target("avx512f,avx2,fma,f16c")))

// Per (bits, half h of the 32-block), lane j holds input 16h + j: which of the block's words
// and which shift. 3 bits: the low planes (word h, shift 2j); its high bit is word 2, bit 16h + j.
static const int32_t WORD_IDX[9][2][16] = {
    [2] = {{0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0}, {1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1}},
    [3] = {{0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0}, {1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1}},
    [4] = {{0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1}, {2, 2, 2, 2, 2, 2, 2, 2, 3, 3, 3, 3, 3, 3, 3, 3}},
    [8] = {{0, 0, 0, 0, 1, 1, 1, 1, 2, 2, 2, 2, 3, 3, 3, 3}, {4, 4, 4, 4, 5, 5, 5, 5, 6, 6, 6, 6, 7, 7, 7, 7}},
};
static const int32_t SHIFT[9][16] = {
    [2] = {0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30},
    [3] = {0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30},
    [4] = {0, 4, 8, 12, 16, 20, 24, 28, 0, 4, 8, 12, 16, 20, 24, 28},
    [8] = {0, 8, 16, 24, 0, 8, 16, 24, 0, 8, 16, 24, 0, 8, 16, 24},
};

// While a tile computes block b of its rows, it prefetches block b of the rows pf_rows further
// on (PF_BYTES of code words ahead; the scale words once per cache line). Measured on the
// 2-core EPYC, 66 MB of a4g32 weights, CPU time of one pass: the AVX-512 path streamed 2.7 GB/s
// without it and 9.8 GB/s with it (its masked loads do not train the hardware prefetcher);
// the AVX2 path, 7.2 GB/s, is unchanged. Prefetches never fault past the matrix's end.
#define PREFETCH_AHEAD(w, row, b)                                                                  \
  do {                                                                                             \
    const char *pq_ = (const char *)((w)->q + ((row) + (w)->pf_rows) * (w)->wpr + (b) * (w)->bits); \
    _mm_prefetch(pq_, _MM_HINT_T0);                                                                \
    if ((w)->bits == 8) _mm_prefetch(pq_ + 31, _MM_HINT_T0);                                       \
    if (((b) & 15) == 0) _mm_prefetch((const char *)((w)->s + ((row) + (w)->pf_rows) * (w)->spr + (b)), _MM_HINT_T0); \
  } while (0)

// ---- AVX2: a 16-lane value is two __m256 (lanes 0-7, 8-15)
typedef struct { __m256 lo, hi; } V2;
typedef struct { __m256i idx[2][2], sh[2], hsh[2][2], mask; } Unpack2;

T_AVX2 INLINE Unpack2 unpack2_init(int bits) {
  Unpack2 u;
  for (int h = 0; h < 2; h++)
    for (int p = 0; p < 2; p++) {
      u.idx[h][p] = _mm256_loadu_si256((const __m256i *)&WORD_IDX[bits][h][8 * p]);
      u.hsh[h][p] = _mm256_setr_epi32(16 * h + 8 * p, 16 * h + 8 * p + 1, 16 * h + 8 * p + 2, 16 * h + 8 * p + 3,
                                      16 * h + 8 * p + 4, 16 * h + 8 * p + 5, 16 * h + 8 * p + 6, 16 * h + 8 * p + 7);
    }
  for (int p = 0; p < 2; p++) u.sh[p] = _mm256_loadu_si256((const __m256i *)&SHIFT[bits][8 * p]);
  u.mask = _mm256_set1_epi32(bits == 3 ? 3 : (1 << bits) - 1);
  return u;
}

// the 16 codes of half h of the block at wb, as f32
T_AVX2 INLINE V2 codes2(const uint32_t *wb, const int bits, int h, const Unpack2 *u) {
  if (bits == 8 || bits == 4) {  // one byte per lane: zero-extend, then (4 bits) the nibble of half h
    const uint8_t *bytes = (const uint8_t *)wb + (bits == 8 ? 16 * h : 0);
    __m256i c0 = _mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i *)bytes));
    __m256i c1 = _mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i *)(bytes + 8)));
    if (bits == 4) {
      const __m256i nib = _mm256_set1_epi32(15);
      c0 = h ? _mm256_srli_epi32(c0, 4) : _mm256_and_si256(c0, nib);
      c1 = h ? _mm256_srli_epi32(c1, 4) : _mm256_and_si256(c1, nib);
    }
    V2 v = {_mm256_cvtepi32_ps(c0), _mm256_cvtepi32_ps(c1)};
    return v;
  }
  // a block has bits <= 8 words: one 256-bit load (masked for fewer, so no read past a row)
  __m256i words;
  if (bits == 8) words = _mm256_loadu_si256((const __m256i *)wb);
  else if (bits == 4) words = _mm256_castsi128_si256(_mm_loadu_si128((const __m128i *)wb));
  else if (bits == 3) words = _mm256_setr_epi32(wb[0], wb[1], wb[2], 0, 0, 0, 0, 0);
  else words = _mm256_castsi128_si256(_mm_loadl_epi64((const __m128i *)wb));
  __m256i c[2];
  for (int p = 0; p < 2; p++) {
    c[p] = _mm256_and_si256(_mm256_srlv_epi32(_mm256_permutevar8x32_epi32(words, u->idx[h][p]), u->sh[p]), u->mask);
    if (bits == 3) {
      const __m256i high = _mm256_srlv_epi32(_mm256_set1_epi32(wb[2]), u->hsh[h][p]);
      c[p] = _mm256_or_si256(c[p], _mm256_slli_epi32(_mm256_and_si256(high, _mm256_set1_epi32(1)), 2));
    }
  }
  V2 v = {_mm256_cvtepi32_ps(c[0]), _mm256_cvtepi32_ps(c[1])};
  return v;
}

// the activations lane-matched to codes2 (4 bits: the even inputs for h = 0, the odd for h = 1)
T_AVX2 INLINE V2 xs2(const float *xb, const int bits, int h) {
  if (bits != 4) {
    V2 v = {_mm256_loadu_ps(xb + 16 * h), _mm256_loadu_ps(xb + 16 * h + 8)};
    return v;
  }
  V2 v;
  for (int p = 0; p < 2; p++) {
    const __m256 a = _mm256_loadu_ps(xb + 16 * p), b = _mm256_loadu_ps(xb + 16 * p + 8);
    const __m256 sh = h ? _mm256_shuffle_ps(a, b, _MM_SHUFFLE(3, 1, 3, 1)) : _mm256_shuffle_ps(a, b, _MM_SHUFFLE(2, 0, 2, 0));
    const __m256 r = _mm256_castpd_ps(_mm256_permute4x64_pd(_mm256_castps_pd(sh), _MM_SHUFFLE(3, 1, 2, 0)));
    if (p) v.hi = r; else v.lo = r;
  }
  return v;
}

T_AVX2 INLINE float hsum8_avx2(__m256 v) {  // lanes j + 4, j + 2, j + 1 of an 8-lane partial
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

T_AVX2 INLINE void scale2(const Mat *w, const uint32_t *srow, size_t g, float *sc, float *mn) {
  if (w->sym) {
    const uint32_t word = srow[g >> 1];
    *sc = _cvtsh_ss((unsigned short)(g & 1 ? word >> 16 : word & 0xffffu));
    *mn = -*sc * (float)(1 << (w->bits - 1));
  } else {
    const uint32_t word = srow[g];
    *sc = _cvtsh_ss((unsigned short)(word & 0xffffu));
    *mn = _cvtsh_ss((unsigned short)(word >> 16));
  }
}

// RG activation rows x NG weight rows
#define TILE2(RG, NG)                                                                                  \
  T_AVX2 INLINE void tile2_##RG##_##NG(const Mat *w, const int bits, const Unpack2 *u, size_t o0,       \
                                        const float *x, size_t ldx, float *y, size_t ldy, int accumulate) { \
    __m256 lo[RG][NG], hi[RG][NG];                                                                     \
    for (int r = 0; r < RG; r++)                                                                       \
      for (int c = 0; c < NG; c++) lo[r][c] = hi[r][c] = _mm256_setzero_ps();                          \
    const size_t blocks = w->k_pad / 32;                                                               \
    for (size_t b = 0; b < blocks; b++) {                                                              \
      const size_t g = b * 32 / w->group;                                                              \
      __m256 sc[NG], mn[NG];                                                                           \
      for (int c = 0; c < NG; c++) {                                                                   \
        float s_, m_;                                                                                  \
        scale2(w, w->s + (o0 + c) * w->spr, g, &s_, &m_);                                              \
        sc[c] = _mm256_set1_ps(s_), mn[c] = _mm256_set1_ps(m_);                                        \
        PREFETCH_AHEAD(w, o0 + c, b);                                                                  \
      }                                                                                                \
      for (int h = 0; h < 2; h++) {                                                                    \
        V2 wt[NG];                                                                                     \
        for (int c = 0; c < NG; c++) {                                                                 \
          V2 cd = codes2(w->q + (o0 + c) * w->wpr + b * bits, bits, h, u);                             \
          wt[c].lo = _mm256_fmadd_ps(cd.lo, sc[c], mn[c]);                                             \
          wt[c].hi = _mm256_fmadd_ps(cd.hi, sc[c], mn[c]);                                             \
        }                                                                                              \
        for (int r = 0; r < RG; r++) {                                                                 \
          const V2 xv = xs2(x + r * ldx + b * 32, bits, h);                                            \
          const __m256 xlo = xv.lo, xhi = xv.hi;                                                       \
          for (int c = 0; c < NG; c++) {                                                               \
            lo[r][c] = _mm256_fmadd_ps(wt[c].lo, xlo, lo[r][c]);                                       \
            hi[r][c] = _mm256_fmadd_ps(wt[c].hi, xhi, hi[r][c]);                                       \
          }                                                                                            \
        }                                                                                              \
      }                                                                                                \
    }                                                                                                  \
    for (int r = 0; r < RG; r++)                                                                       \
      for (int c = 0; c < NG; c++) {                                                                   \
        const float s = hsum8_avx2(_mm256_add_ps(lo[r][c], hi[r][c]));                                 \
        float *dst = y + r * ldy + o0 + c;                                                             \
        *dst = accumulate ? *dst + s : s;                                                              \
      }                                                                                                \
  }

TILE2(1, 4) TILE2(2, 2) TILE2(3, 1) TILE2(4, 1) TILE2(1, 1) TILE2(2, 1)

T_AVX2 INLINE void matmul_avx2_bits(const Mat *w, const int bits, const float *x, size_t m, size_t ldx, float *y,
                                    size_t ldy, int accumulate) {
  const Unpack2 u = unpack2_init(bits);
  const size_t ng = m == 1 ? 4 : m == 2 ? 2 : 1;
  for (size_t o = 0; o < w->n;) {
    const size_t take = w->n - o >= ng ? ng : 1;
    for (size_t r = 0; r < m; r += 4) {
      const size_t rg = m - r < 4 ? m - r : 4;
      const float *xr = x + r * ldx;
      float *yr = y + r * ldy;
      if (take == 4) tile2_1_4(w, bits, &u, o, xr, ldx, yr, ldy, accumulate);
      else if (take == 2) tile2_2_2(w, bits, &u, o, xr, ldx, yr, ldy, accumulate);
      else if (rg == 4) tile2_4_1(w, bits, &u, o, xr, ldx, yr, ldy, accumulate);
      else if (rg == 3) tile2_3_1(w, bits, &u, o, xr, ldx, yr, ldy, accumulate);
      else if (rg == 2) tile2_2_1(w, bits, &u, o, xr, ldx, yr, ldy, accumulate);
      else tile2_1_1(w, bits, &u, o, xr, ldx, yr, ldy, accumulate);
    }
    o += take;
  }
}

T_AVX2 static void matmul_avx2(const Mat *w, const float *x, size_t m, size_t ldx, float *y, size_t ldy, int accumulate) {
  switch (w->bits) {  // each width its own specialised copy of the loops
    case 2: matmul_avx2_bits(w, 2, x, m, ldx, y, ldy, accumulate); break;
    case 3: matmul_avx2_bits(w, 3, x, m, ldx, y, ldy, accumulate); break;
    case 4: matmul_avx2_bits(w, 4, x, m, ldx, y, ldy, accumulate); break;
    default: matmul_avx2_bits(w, 8, x, m, ldx, y, ldy, accumulate); break;
  }
}

T_AVX2 static void dequantize_avx2(const Mat *w, size_t r0, size_t r1, float *out, size_t ldo) {
  const Unpack2 u = unpack2_init(w->bits);
  for (size_t o = r0; o < r1; o++) {
    float *dst = out + (o - r0) * ldo;
    for (size_t b = 0; b < w->k_pad / 32; b++) {
      float s_, m_;
      scale2(w, w->s + o * w->spr, b * 32 / w->group, &s_, &m_);
      const __m256 sc = _mm256_set1_ps(s_), mn = _mm256_set1_ps(m_);
      V2 wt[2];
      for (int h = 0; h < 2; h++) {
        const V2 cd = codes2(w->q + o * w->wpr + b * w->bits, w->bits, h, &u);
        wt[h].lo = _mm256_fmadd_ps(cd.lo, sc, mn), wt[h].hi = _mm256_fmadd_ps(cd.hi, sc, mn);
      }
      if (w->bits == 4) {  // even and odd inputs back into input order
        for (int p = 0; p < 2; p++) {
          const __m256 e = p ? wt[0].hi : wt[0].lo, od = p ? wt[1].hi : wt[1].lo;
          const __m256 lo = _mm256_unpacklo_ps(e, od), hi = _mm256_unpackhi_ps(e, od);
          _mm256_storeu_ps(dst + b * 32 + 16 * p, _mm256_permute2f128_ps(lo, hi, 0x20));
          _mm256_storeu_ps(dst + b * 32 + 16 * p + 8, _mm256_permute2f128_ps(lo, hi, 0x31));
        }
      } else {
        for (int h = 0; h < 2; h++) {
          _mm256_storeu_ps(dst + b * 32 + 16 * h, wt[h].lo);
          _mm256_storeu_ps(dst + b * 32 + 16 * h + 8, wt[h].hi);
        }
      }
    }
  }
}

// ---- AVX-512: a 16-lane value is one __m512
typedef struct { __m512i idx[2], sh, hsh[2], mask; } Unpack5;

T_AVX512 INLINE Unpack5 unpack5_init(int bits) {
  Unpack5 u;
  for (int h = 0; h < 2; h++) {
    u.idx[h] = _mm512_loadu_si512(WORD_IDX[bits][h]);
    u.hsh[h] = _mm512_add_epi32(_mm512_set1_epi32(16 * h),
                                _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15));
  }
  u.sh = _mm512_loadu_si512(SHIFT[bits]);
  u.mask = _mm512_set1_epi32(bits == 3 ? 3 : (1 << bits) - 1);
  return u;
}

T_AVX512 INLINE __m512 codes5(const uint32_t *wb, const int bits, int h, const Unpack5 *u) {
  if (bits == 8) return _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)wb + h)));
  if (bits == 4) {
    const __m512i v = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)wb));
    return _mm512_cvtepi32_ps(h ? _mm512_srli_epi32(v, 4) : _mm512_and_si512(v, _mm512_set1_epi32(15)));
  }
  const __m512i words = _mm512_maskz_loadu_epi32((__mmask16)((1u << bits) - 1u), wb);
  __m512i c = _mm512_and_si512(_mm512_srlv_epi32(_mm512_permutexvar_epi32(u->idx[h], words), u->sh), u->mask);
  if (bits == 3) {
    const __m512i high = _mm512_srlv_epi32(_mm512_set1_epi32(wb[2]), u->hsh[h]);
    c = _mm512_or_si512(c, _mm512_slli_epi32(_mm512_and_si512(high, _mm512_set1_epi32(1)), 2));
  }
  return _mm512_cvtepi32_ps(c);
}

T_AVX512 INLINE __m512 xs5(const float *xb, const int bits, int h) {
  if (bits != 4) return _mm512_loadu_ps(xb + 16 * h);
  const __m512i idx = _mm512_setr_epi32(h, 2 + h, 4 + h, 6 + h, 8 + h, 10 + h, 12 + h, 14 + h, 16 + h, 18 + h, 20 + h,
                                        22 + h, 24 + h, 26 + h, 28 + h, 30 + h);
  return _mm512_permutex2var_ps(_mm512_loadu_ps(xb), idx, _mm512_loadu_ps(xb + 16));
}

// (scale, min) of up to 16 groups of one row from group g0 (even: a chunk starts at a multiple of
// 16 blocks), converted together, for a tile's blocks to read as broadcasts from memory where
// each block and weight row converted its own scale words and broadcast them from registers.
// The same exact conversion and (symmetric) the same exact product as group_scale: the same bits.
T_AVX512 INLINE void scales16(const Mat *w, const uint32_t *srow, size_t g0, size_t ng, float *sc, float *mn) {
  if (w->sym) {
    const __m512i words = _mm512_maskz_loadu_epi32((__mmask16)((1u << ((ng + 1) / 2)) - 1u), srow + g0 / 2);
    const __m512 s = _mm512_cvtph_ps(_mm512_castsi512_si256(words));
    _mm512_storeu_ps(sc, s);
    _mm512_storeu_ps(mn, _mm512_mul_ps(_mm512_castsi512_ps(_mm512_xor_si512(_mm512_castps_si512(s), _mm512_set1_epi32((int)0x80000000u))),
                                     _mm512_set1_ps((float)(1 << (w->bits - 1)))));
  } else {
    const __m512i words = _mm512_maskz_loadu_epi32((__mmask16)((1u << ng) - 1u), srow + g0);
    _mm512_storeu_ps(sc, _mm512_cvtph_ps(_mm512_cvtepi32_epi16(words)));
    _mm512_storeu_ps(mn, _mm512_cvtph_ps(_mm512_cvtepi32_epi16(_mm512_srli_epi32(words, 16))));
  }
}

// 4-bit codes: a block's 16 possible weights fma(c, scale, min), c = 0..15, made once (the same
// fma as for each code, so the same bits), and each code picks its weight with one permute
// (vpermps reads an index's low 4 bits: the low nibble needs no mask) instead of a convert and
// an fma per 16 codes; the byte unpack is shared by both halves of the block.
#define IOTA16 _mm512_setr_ps(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15)
#define TILE5(RG, NG)                                                                                  \
  T_AVX512 INLINE void tile5_##RG##_##NG(const Mat *w, const int bits, const Unpack5 *u, size_t o0,     \
                                          const float *x, size_t ldx, float *y, size_t ldy, int accumulate) { \
    __m512 acc[RG][NG];                                                                                \
    for (int r = 0; r < RG; r++)                                                                       \
      for (int c = 0; c < NG; c++) acc[r][c] = _mm512_setzero_ps();                                    \
    const size_t blocks = w->k_pad / 32;                                                               \
    float sbuf[NG][16], mbuf[NG][16];                                                                  \
    for (size_t b0 = 0; b0 < blocks; b0 += 16) {                                                       \
      /* the scales of the next 16 blocks, converted before the loop over them: converted */      \
      /* inside it, on a branch, the 4-row tile's accumulators went to the stack every block */     \
      const size_t b1 = b0 + 16 < blocks ? b0 + 16 : blocks, g0 = b0 >> w->group_shift;               \
      for (int c = 0; c < NG; c++)                                                                     \
        scales16(w, w->s + (o0 + c) * w->spr, g0, ((b1 - 1) >> w->group_shift) - g0 + 1, sbuf[c], mbuf[c]); \
      for (size_t b = b0; b < b1; b++) {                                                               \
        const size_t gi = (b - b0) >> w->group_shift;                                                  \
        for (int c = 0; c < NG; c++) PREFETCH_AHEAD(w, o0 + c, b);                                     \
        __m512 tab[NG];                                                                                \
        __m512i nib[NG];                                                                               \
        if (bits == 4)                                                                                 \
          for (int c = 0; c < NG; c++) {                                                               \
            tab[c] = _mm512_fmadd_ps(IOTA16, _mm512_set1_ps(sbuf[c][gi]), _mm512_set1_ps(mbuf[c][gi])); \
            nib[c] = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)(w->q + (o0 + c) * w->wpr + b * 4))); \
          }                                                                                            \
        for (int h = 0; h < 2; h++) {                                                                  \
          __m512 wt[NG];                                                                               \
          for (int c = 0; c < NG; c++)                                                                 \
            wt[c] = bits == 4 ? _mm512_permutexvar_ps(h ? _mm512_srli_epi32(nib[c], 4) : nib[c], tab[c]) \
                              : _mm512_fmadd_ps(codes5(w->q + (o0 + c) * w->wpr + b * bits, bits, h, u), \
                                                _mm512_set1_ps(sbuf[c][gi]), _mm512_set1_ps(mbuf[c][gi])); \
          for (int r = 0; r < RG; r++) {                                                               \
            const __m512 xv = xs5(x + r * ldx + b * 32, bits, h);                                      \
            for (int c = 0; c < NG; c++) acc[r][c] = _mm512_fmadd_ps(wt[c], xv, acc[r][c]);            \
          }                                                                                            \
        }                                                                                              \
      }                                                                                                \
    }                                                                                                  \
    for (int r = 0; r < RG; r++)                                                                       \
      for (int c = 0; c < NG; c++) {                                                                   \
        const __m256 hi8 = _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(acc[r][c]), 1));   \
        const float s = hsum8_avx2(_mm256_add_ps(_mm512_castps512_ps256(acc[r][c]), hi8));             \
        float *dst = y + r * ldy + o0 + c;                                                             \
        *dst = accumulate ? *dst + s : s;                                                              \
      }                                                                                                \
  }

TILE5(1, 4) TILE5(2, 4) TILE5(3, 4) TILE5(4, 4) TILE5(1, 1) TILE5(2, 1) TILE5(3, 1) TILE5(4, 1)

T_AVX512 INLINE void matmul_avx512_bits(const Mat *w, const int bits, const float *x, size_t m, size_t ldx, float *y,
                                        size_t ldy, int accumulate) {
  const Unpack5 u = unpack5_init(bits);
  for (size_t o = 0; o < w->n;) {
    const int wide = w->n - o >= 4;
    for (size_t r = 0; r < m; r += 4) {
      const size_t rg = m - r < 4 ? m - r : 4;
      const float *xr = x + r * ldx;
      float *yr = y + r * ldy;
      if (wide) {
        if (rg == 4) tile5_4_4(w, bits, &u, o, xr, ldx, yr, ldy, accumulate);
        else if (rg == 3) tile5_3_4(w, bits, &u, o, xr, ldx, yr, ldy, accumulate);
        else if (rg == 2) tile5_2_4(w, bits, &u, o, xr, ldx, yr, ldy, accumulate);
        else tile5_1_4(w, bits, &u, o, xr, ldx, yr, ldy, accumulate);
      } else {
        if (rg == 4) tile5_4_1(w, bits, &u, o, xr, ldx, yr, ldy, accumulate);
        else if (rg == 3) tile5_3_1(w, bits, &u, o, xr, ldx, yr, ldy, accumulate);
        else if (rg == 2) tile5_2_1(w, bits, &u, o, xr, ldx, yr, ldy, accumulate);
        else tile5_1_1(w, bits, &u, o, xr, ldx, yr, ldy, accumulate);
      }
    }
    o += wide ? 4 : 1;
  }
}

T_AVX512 static void matmul_avx512(const Mat *w, const float *x, size_t m, size_t ldx, float *y, size_t ldy, int accumulate) {
  switch (w->bits) {
    case 2: matmul_avx512_bits(w, 2, x, m, ldx, y, ldy, accumulate); break;
    case 3: matmul_avx512_bits(w, 3, x, m, ldx, y, ldy, accumulate); break;
    case 4: matmul_avx512_bits(w, 4, x, m, ldx, y, ldy, accumulate); break;
    default: matmul_avx512_bits(w, 8, x, m, ldx, y, ldy, accumulate); break;
  }
}
#endif  // x86

// ------------------------------------------------------------------ Walsh-Hadamard (both builds)
// In place on rows r < m of x (ldx floats apart, n used): each `block` consecutive entries
// (block a power of two dividing n) become their normalized Walsh-Hadamard transform,
// x_blk @ H_block * scale (scale = 1 / sqrt(block), passed in so every side rounds it alike).
// The activation ffn_down reads in a model whose FFN hidden space is rotated
// (tabshard/rotation.py). Butterfly stages pair (i, i + h) for h = 1, 2, 4, ..., then one
// multiply: the order of the numpy twin and of silu_hadamard.wgsl, so all three agree bit for
// bit (adds, subtracts and one multiply: nothing here for a fused multiply-add to change).
EXPORT("pk_hadamard")
void pk_hadamard(float *x, int m, int n, int ldx, int block, float scale) {
  for (int r = 0; r < m; r++) {
    for (int base = 0; base + block <= n; base += block) {
      float *v = x + (size_t)r * ldx + base;
      for (int h = 1; h < block; h <<= 1)
        for (int i0 = 0; i0 < block; i0 += 2 * h)
          for (int i = i0; i < i0 + h; i++) {
            const float a = v[i], b = v[i + h];
            v[i] = a + b;
            v[i + h] = a - b;
          }
      for (int i = 0; i < block; i++) v[i] *= scale;
    }
  }
}

// ------------------------------------------------------------------ native entry points
#if !defined(__wasm__)

// 0: the portable scalar path, 1: AVX2+FMA+F16C, 2: AVX-512 (F) on top of those.
int pk_best_isa(void) {
#if defined(__x86_64__)
  __builtin_cpu_init();
  if (!(__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma"))) return 0;
  // F16C comes with every AVX2 CPU; __builtin_cpu_supports has no name for it on older gcc
  return __builtin_cpu_supports("avx512f") ? 2 : 1;
#else
  return 0;
#endif
}

// ------------------------------------------------------------------ threads (native only)
// A step's output rows are cut into chunks of CHUNK_BYTES of packed words (boundaries a
// multiple of 4 rows, a tile's width, and fixed by the matrix alone), and the threads of the
// call claim chunks one at a time. Each output is still computed alone by the same operations
// in the same order, so the bits never depend on the thread count, nor on which thread took
// which chunk (nor on the batch).
//
// Claiming, not a fixed half per thread: on a shared host a helper may not get a core for a
// while, and the caller then computes the chunks itself instead of waiting (it waits only for
// chunks a helper has begun). At worst a call costs one thread's time plus one chunk.
//
// The threads are a small persistent pool, not threads started per call: a SmolLM2 decode
// token is 121 matmuls of 0.02-0.5 ms, and the Python between them (norms, rope, attention)
// takes tens of microseconds. A helper that has just worked spins for up to SPIN_NS on the job
// word (so the token's next matmul starts at once), then sleeps on a condition variable (an
// idle worker costs no CPU). The caller computes too. The alternative, Python threads each
// running the one-thread kernel on a share of the rows (ctypes drops the GIL), pays a future and
// two thread switches per matmul: at decode sizes it was slower than one thread, where the pool
// was faster (benchmarks/bench_cpu_kernel.py --threads 2 times both, side by side).
// The WASM build has no threads: WebAssembly threads need a SharedArrayBuffer, so a
// crossOriginIsolated page (COOP/COEP headers) and one Web Worker per thread; the tab runs its
// engine in a single Web Worker.
#include <pthread.h>
#include <stdlib.h>
#include <sched.h>
#include <stdatomic.h>
#include <time.h>
#include <unistd.h>

#define POOL_MAX 64
#define SPIN_NS 200000L
#define CHUNK_BYTES 32768
#define MISSES_BEFORE_SLEEP 4

typedef void (*JobFn)(const void *ctx, size_t chunk);

// job word: generation (32 bits) | chunks claimed (16) | chunks in the job (16)
#define JOB_GEN(w) ((uint32_t)((w) >> 32))
#define JOB_NEXT(w) ((uint32_t)(((w) >> 16) & 0xffff))
#define JOB_TOTAL(w) ((uint32_t)((w)&0xffff))

static struct {
  pthread_mutex_t mu, caller;
  pthread_cond_t wake, done;
  int size;  // helper threads started; helper i takes part when the job allows more than i threads
  JobFn fn;
  const void *ctx;
  int threads;
  _Atomic uint64_t job;
  _Atomic uint32_t finished;  // chunks of the current job computed
  _Atomic int sleepers;       // helpers blocked on `wake`
  _Atomic int waiting;        // the caller blocked on `done`
} pool = {.mu = PTHREAD_MUTEX_INITIALIZER, .caller = PTHREAD_MUTEX_INITIALIZER, .wake = PTHREAD_COND_INITIALIZER,
          .done = PTHREAD_COND_INITIALIZER};

INLINE long now_ns(void) {
  struct timespec t;
  clock_gettime(CLOCK_MONOTONIC, &t);
  return t.tv_sec * 1000000000L + t.tv_nsec;
}

// A spinning thread yields the core at every turn: on a host with more runnable threads than
// cores (a shared machine, several workers), a spinner that held its core would take it from
// the very thread it waits for (the caller's Python, or a helper's chunk) for a whole time slice.
INLINE void cpu_relax(void) {
#if defined(__x86_64__) || defined(__i386__)
  __builtin_ia32_pause();
#elif defined(__aarch64__)
  __asm__ __volatile__("yield");
#endif
  sched_yield();
}

// Claim and compute chunks of the job of generation gen until none is left (or the word has
// moved on to a later job). fn and ctx were read after the word showed gen: a successful claim
// proves the job is still that one, and it cannot end before the claimed chunk is finished.
static int take_chunks(uint32_t gen, JobFn fn, const void *ctx) {
  uint64_t w = atomic_load(&pool.job);
  int taken = 0;
  for (;;) {
    if (JOB_GEN(w) != gen || JOB_NEXT(w) >= JOB_TOTAL(w)) return taken;
    if (!atomic_compare_exchange_weak(&pool.job, &w, w + (1u << 16))) continue;  // w reloaded
    fn(ctx, JOB_NEXT(w));
    taken++;
    if (atomic_fetch_add(&pool.finished, 1) + 1 == JOB_TOTAL(w) && atomic_load(&pool.waiting)) {
      pthread_mutex_lock(&pool.mu);
      pthread_cond_signal(&pool.done);
      pthread_mutex_unlock(&pool.mu);
    }
    w = atomic_load(&pool.job);
  }
}

static void *pool_helper(void *arg) {
  // its index, and the generation when it was started (before the job it was started for)
  const int me = (int)((uintptr_t)arg & 0xffff);
  uint32_t seen = (uint32_t)((uintptr_t)arg >> 16);
  // Spin only while this helper computes chunks: one that found every chunk taken when it
  // got a core, MISSES_BEFORE_SLEEP jobs in a row (the host has no core to spare: its spinning
  // would only take time from other work), sleeps until the next job instead, and so does an
  // unused one. One miss alone (a preempted moment) does not stop it.
  int spin = 1, misses = 0;
  const long spin_ns = SPIN_NS;
  for (;;) {
    uint64_t w = atomic_load(&pool.job);
    if (JOB_GEN(w) == seen && spin) {
      const long end = now_ns() + spin_ns;
      for (unsigned i = 1; JOB_GEN(w = atomic_load_explicit(&pool.job, memory_order_acquire)) == seen; i++) {
        cpu_relax();
        if ((i & 7) == 0 && now_ns() > end) break;
      }
    }
    if (JOB_GEN(w) == seen) {
      pthread_mutex_lock(&pool.mu);
      atomic_fetch_add(&pool.sleepers, 1);
      while (JOB_GEN(w = atomic_load(&pool.job)) == seen) pthread_cond_wait(&pool.wake, &pool.mu);
      atomic_fetch_sub(&pool.sleepers, 1);
      pthread_mutex_unlock(&pool.mu);
    }
    seen = JOB_GEN(w);
    const JobFn fn = pool.fn;
    const void *ctx = pool.ctx;
    if (me >= pool.threads) {
      spin = 0;
      continue;
    }
    misses = take_chunks(seen, fn, ctx) > 0 ? 0 : misses + 1;
    spin = misses < MISSES_BEFORE_SLEEP;
  }
  return NULL;
}

// A forked child has none of the helpers (only the forking thread survives fork), and the
// locks and condition variables may be in the state the parent's threads left them in:
// start afresh.
static void pool_after_fork(void) {
  pthread_mutex_init(&pool.mu, NULL);
  pthread_mutex_init(&pool.caller, NULL);
  pthread_cond_init(&pool.wake, NULL);
  pthread_cond_init(&pool.done, NULL);
  pool.size = 0;
  atomic_store(&pool.job, (uint64_t)JOB_GEN(atomic_load(&pool.job)) << 32);  // no chunks outstanding
  atomic_store(&pool.finished, 0);
  atomic_store(&pool.sleepers, 0);
  atomic_store(&pool.waiting, 0);
}

static void pool_register_fork(void) { pthread_atfork(NULL, NULL, pool_after_fork); }

// fn(ctx, c) for every chunk c < chunks, on up to `threads` threads (the caller one of them);
// returns when all are done. A caller finding the pool busy (another Python thread inside a
// call) computes every chunk itself: the same bits, one thread.
static void pool_run(JobFn fn, const void *ctx, size_t chunks, int threads) {
  if (threads > POOL_MAX) threads = POOL_MAX;
  if ((size_t)threads > chunks) threads = (int)chunks;
  if (threads <= 1 || chunks > 0xffff || pthread_mutex_trylock(&pool.caller) != 0) {
    for (size_t c = 0; c < chunks; c++) fn(ctx, c);
    return;
  }
  static pthread_once_t once = PTHREAD_ONCE_INIT;
  pthread_once(&once, pool_register_fork);
  const uint32_t gen = JOB_GEN(atomic_load(&pool.job));
  while (pool.size < threads - 1) {
    pthread_t t;
    pthread_attr_t attr;
    pthread_attr_init(&attr);
    pthread_attr_setstacksize(&attr, 1 << 16);
    pthread_attr_setdetachstate(&attr, PTHREAD_CREATE_DETACHED);
    const int failed = pthread_create(&t, &attr, pool_helper, (void *)(((uintptr_t)gen << 16) | (uintptr_t)(pool.size + 1)));
    pthread_attr_destroy(&attr);
    if (failed) break;
    pool.size++;
  }
  pool.fn = fn, pool.ctx = ctx, pool.threads = threads;
  atomic_store(&pool.finished, 0);
  const uint32_t next = gen + 1;
  atomic_store(&pool.job, (uint64_t)next << 32 | (uint64_t)chunks);  // publishes the job (seq_cst, before the sleepers check)
  if (atomic_load(&pool.sleepers) > 0) {
    pthread_mutex_lock(&pool.mu);
    pthread_cond_broadcast(&pool.wake);
    pthread_mutex_unlock(&pool.mu);
  }
  take_chunks(next, fn, ctx);
  const long end = now_ns() + SPIN_NS;
  for (unsigned i = 1; atomic_load_explicit(&pool.finished, memory_order_acquire) < chunks; i++) {
    cpu_relax();
    if ((i & 7) == 0 && now_ns() > end) {
      pthread_mutex_lock(&pool.mu);
      atomic_store(&pool.waiting, 1);
      while (atomic_load(&pool.finished) < chunks) pthread_cond_wait(&pool.done, &pool.mu);
      atomic_store(&pool.waiting, 0);
      pthread_mutex_unlock(&pool.mu);
      break;
    }
  }
  pthread_mutex_unlock(&pool.caller);
}

// y[r * ldy + col_i + o] (+)= sum_k x[r * ldx + k] * W_i[o, k] for r < m, o < n_i: one fused
// matrix as several packed parts side by side in y (q/k/v, gate/up; formats may differ),
// parts[i] = {q, s, n, k, bits | group << 8 | sym << 16, y column}; isa at most pk_best_isa().
typedef struct { const uint32_t *q, *s; size_t n, k; uint32_t fmt; uint32_t y_col; } Part;

typedef struct {
  int isa, nparts, accumulate;
  const Part *parts;
  const float *x;
  float *y;
  size_t m, ldx, ldy, rows, chunk_rows;
} PartsJob;

static void matmul_isa(int isa, const Mat *w, const float *x, size_t m, size_t ldx, float *y, size_t ldy, int accumulate) {
#if defined(__x86_64__)
  if (isa == 2) return matmul_avx512(w, x, m, ldx, y, ldy, accumulate);
  if (isa == 1) return matmul_avx2(w, x, m, ldx, y, ldy, accumulate);
#endif
  (void)isa;
  matmul_scalar(w, x, m, ldx, y, ldy, accumulate);
}

// chunk c: rows [c * chunk_rows, (c + 1) * chunk_rows) of the fused matrix, in each part they cover
static void parts_chunk(const void *ctx, size_t c) {
  const PartsJob *j = (const PartsJob *)ctx;
  const size_t a = c * j->chunk_rows, b = a + j->chunk_rows < j->rows ? a + j->chunk_rows : j->rows;
  size_t base = 0;
  for (int pi = 0; pi < j->nparts; base += j->parts[pi].n, pi++) {
    const Part *p = &j->parts[pi];
    if (b <= base || a >= base + p->n) continue;
    const size_t lo = a > base ? a - base : 0, hi = b < base + p->n ? b - base : p->n;
    Mat w = mat_of(p->q, p->s, p->n, p->k, p->fmt & 0xff, (p->fmt >> 8) & 0xff, (p->fmt >> 16) & 1);
    w.q += lo * w.wpr, w.s += lo * w.spr, w.n = hi - lo;
    matmul_isa(j->isa, &w, j->x, j->m, j->ldx, j->y + p->y_col + lo, j->ldy, j->accumulate);
  }
}

// threads: how many threads may share the call (1: the caller alone).
void pk_matmul_parts(int isa, const Part *parts, int nparts, const float *x, size_t m, size_t ldx, float *y,
                     size_t ldy, int accumulate, int threads) {
  PartsJob j = {isa, nparts, accumulate, parts, x, y, m, ldx, ldy, 0, 0};
  size_t row_bytes = 4;
  for (int i = 0; i < nparts; i++) {
    const Mat w = mat_of(parts[i].q, parts[i].s, parts[i].n, parts[i].k, parts[i].fmt & 0xff, (parts[i].fmt >> 8) & 0xff,
                         (parts[i].fmt >> 16) & 1);
    j.rows += parts[i].n;
    if (4 * (w.wpr + w.spr) > row_bytes) row_bytes = 4 * (w.wpr + w.spr);
  }
  if (j.rows == 0) return;
  j.chunk_rows = (CHUNK_BYTES / row_bytes + 3) & ~(size_t)3;
  if (j.chunk_rows < 16) j.chunk_rows = 16;
  if (threads <= 1) {  // the caller alone: the whole matrix as one chunk
    j.chunk_rows = j.rows;
    return parts_chunk(&j, 0);
  }
  pool_run(parts_chunk, &j, (j.rows + j.chunk_rows - 1) / j.chunk_rows, threads);
}

// the RMS norm of x's m rows (k floats, ldx apart) into out's rows of k_pad floats, whose
// columns past k the caller has zeroed
static void rmsnorm_rows(const float *x, size_t m, size_t ldx, size_t k, size_t k_pad, const float *w, float eps,
                         float *out) {
  for (size_t r = 0; r < m; r++) {
    const float *xr = x + r * ldx;
    float *h = out + r * k_pad;
    double ss = 0.0;
    for (size_t i = 0; i < k; i++) ss += (double)xr[i] * (double)xr[i];
    const float inv = 1.0f / sqrtf((float)ss / (float)k + eps);
    for (size_t i = 0; i < k; i++) h[i] = xr[i] * inv * w[i];
  }
}

// pk_matmul_parts on the RMS norm of x's rows: x * (1 / sqrt(mean(x^2) + eps)) * w
// (kernels/reference.py's rmsnorm; the sum of squares taken in double, so it agrees to
// rounding), made in this call into a buffer of k_pad floats a row (zeros past k): at decode
// sizes the numpy calls for the norm cost more than its arithmetic, twice a layer. Each row is
// normalized alone, so its bits never depend on the other rows of the call.
void pk_matmul_parts_rmsnorm(int isa, const Part *parts, int nparts, const float *x, size_t m, size_t ldx, size_t k,
                             size_t k_pad, const float *w, float eps, float *y, size_t ldy, int accumulate, int threads) {
  float *in = (float *)calloc(m * k_pad, sizeof(float));
  if (in == NULL) return;
  rmsnorm_rows(x, m, ldx, k, k_pad, w, eps, in);
  pk_matmul_parts(isa, parts, nparts, in, m, k_pad, y, ldy, accumulate, threads);
  free(in);
}

// A decode step's attention (pk_attention_decode below), every session's one row in one call:
// the numpy backend paid ~15 us of numpy calls per session and layer for it, more than its
// arithmetic. Rope as kernels/reference.py's (the same bits); attention softmax(q . K / sqrt(hd)) V
// as its attention to rounding (its own summation order and exp). Each session is computed
// alone, so its bits never depend on the others; they do depend on the path (AVX2 or the
// portable one). 8 floats at a time in GCC's vector extension, hd a multiple of 8.
typedef float v8f __attribute__((vector_size(32)));
typedef int32_t v8i __attribute__((vector_size(32)));
#pragma GCC diagnostic ignored "-Wpsabi"  // (the inline helpers' 32-byte vectors: no call crosses a built ABI)

INLINE v8f v8_load(const float *p) {
  v8f v;
  __builtin_memcpy(&v, p, sizeof v);
  return v;
}

INLINE float v8_sum(v8f v) { return ((v[0] + v[4]) + (v[1] + v[5])) + ((v[2] + v[6]) + (v[3] + v[7])); }

INLINE v8f v8_select(v8i mask, v8f a, v8f b) { return (v8f)((mask & (v8i)a) | (~mask & (v8i)b)); }

// e^x for x <= 0 (Cephes' expf: x = n ln2 + r, |r| <= ln2 / 2, a degree-6 polynomial in r, then
// 2^n in the exponent bits; within 2 ulp of expf; below -87 it is 0, as expf's underflow)
INLINE v8f v8_exp(v8f x) {
  const v8f zero = {0}, one = zero + 1.0f;
  const v8i under = x < -87.0f;
  const v8f c = v8_select(under, zero - 87.0f, x);
  const v8f fx = c * 1.44269504088896341f + 0.5f;
  v8f n = __builtin_convertvector(__builtin_convertvector(fx, v8i), v8f);  // (truncated toward 0: floor below)
  n = n - v8_select(n > fx, one, zero);
  const v8f r = (c - n * 0.693359375f) + n * 2.12194440e-4f;
  v8f p = zero + 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = (p * r) * r + r + 1.0f;
  const v8f two_n = (v8f)((__builtin_convertvector(n, v8i) + 127) << 23);
  return v8_select(under, zero, p * two_n);
}

// one KV head's `group` query heads (GQA) over keys and values [0, len): each key and value row
// is read once for all of them. sc: group rows of `stride` floats (len rounded up to 8).
INLINE void attend_group(const int group, const float *qg, const float *K, const float *V, size_t len, int hd,
                         float scale, float *o, float *sc, size_t stride) {
  const int vecs = hd / 8;
  float top[8];
  for (int j = 0; j < group; j++) top[j] = -INFINITY;
  for (size_t t = 0; t < len; t++) {
    const float *kt = K + t * hd;
    v8f acc[8];
    for (int j = 0; j < group; j++) acc[j] = (v8f){0};
    for (int d = 0; d < vecs; d++) {
      const v8f kv = v8_load(kt + 8 * d);
      for (int j = 0; j < group; j++) acc[j] += v8_load(qg + (size_t)j * hd + 8 * d) * kv;
    }
    for (int j = 0; j < group; j++) {
      const float x = v8_sum(acc[j]) * scale;
      sc[j * stride + t] = x;
      top[j] = x > top[j] ? x : top[j];
    }
  }
  float inv[8];
  for (int j = 0; j < group; j++) {
    float *row = sc + j * stride;
    for (size_t t = len; t < stride; t++) row[t] = -INFINITY;  // (a whole last vector: e^-inf = 0)
    v8f sums = {0};
    for (size_t t = 0; t < stride; t += 8) {
      const v8f e = v8_exp(v8_load(row + t) - top[j]);
      __builtin_memcpy(row + t, &e, sizeof e);
      sums += e;
    }
    inv[j] = 1.0f / v8_sum(sums);
  }
  // the values dv vectors of a row at a time for every head: group x dv accumulators stay in
  // registers, and each value row is read once over the passes
  const int dv = group <= 3 ? 4 : group <= 6 ? 2 : 1;
  for (int d0 = 0; d0 < vecs; d0 += dv) {
    const int w = vecs - d0 < dv ? vecs - d0 : dv;
    v8f acc[8][4];
    for (int j = 0; j < group; j++)
      for (int d = 0; d < dv; d++) acc[j][d] = (v8f){0};
    for (size_t t = 0; t < len; t++) {
      const float *vt = V + t * hd + 8 * d0;
      for (int d = 0; d < dv; d++) {
        if (d >= w) break;
        const v8f vv = v8_load(vt + 8 * d);
        for (int j = 0; j < group; j++) acc[j][d] += sc[j * stride + t] * vv;
      }
    }
    for (int j = 0; j < group; j++)
      for (int d = 0; d < w; d++) {
        const v8f r = acc[j][d] * inv[j];
        __builtin_memcpy(o + (size_t)j * hd + 8 * (d0 + d), &r, sizeof r);
      }
  }
}

// rope on one head's hd floats (llama.cpp's "normal" rope: pairs (2p, 2p + 1) turned by the
// angle whose cos and sin are c[p], s[p]): the products and sums of kernels/reference.py's rope
// in its order, so the same bits
INLINE void rope_head(const float *x, const float *c, const float *s, int hd, float *out) {
  for (int p = 0; p < hd / 2; p++) {
    const float e = x[2 * p], o = x[2 * p + 1];
    out[2 * p] = e * c[p] - o * s[p];
    out[2 * p + 1] = e * s[p] + o * c[p];
  }
}

INLINE void attention_decode_body(int n, int layer, const float *qkv, size_t ldqkv, const float *cos_, const float *sin_,
                                  const int64_t *k_base, const int64_t *v_base, const int64_t *cap, const int64_t *pos,
                                  int n_heads, int n_kv, int hd, float scale, float *out, size_t ldo, float *scores,
                                  float *q_rot) {
  const int group = n_heads / n_kv;
  for (int i = 0; i < n; i++) {
    const size_t plane = (size_t)cap[i] * hd, len = (size_t)pos[i] + 1, stride = (len + 7) & ~(size_t)7;
    const float *row = qkv + i * ldqkv, *c = cos_ + (size_t)i * (hd / 2), *s = sin_ + (size_t)i * (hd / 2);
    float *kc = (float *)(intptr_t)k_base[i] + (size_t)layer * n_kv * plane;
    float *vc = (float *)(intptr_t)v_base[i] + (size_t)layer * n_kv * plane;
    for (int h = 0; h < n_heads; h++) rope_head(row + (size_t)h * hd, c, s, hd, q_rot + (size_t)h * hd);
    for (int g = 0; g < n_kv; g++) {
      rope_head(row + (size_t)(n_heads + g) * hd, c, s, hd, kc + g * plane + (size_t)pos[i] * hd);
      __builtin_memcpy(vc + g * plane + (size_t)pos[i] * hd, row + (size_t)(n_heads + n_kv + g) * hd, hd * sizeof(float));
    }
    for (int g = 0; g < n_kv; g++) {
      const float *qg = q_rot + (size_t)g * group * hd, *K = kc + g * plane, *V = vc + g * plane;
      float *o = out + i * ldo + (size_t)g * group * hd;
      switch (group) {  // (a constant group: its loops unrolled, its accumulators in registers)
        case 1: attend_group(1, qg, K, V, len, hd, scale, o, scores, stride); break;
        case 2: attend_group(2, qg, K, V, len, hd, scale, o, scores, stride); break;
        case 3: attend_group(3, qg, K, V, len, hd, scale, o, scores, stride); break;
        case 4: attend_group(4, qg, K, V, len, hd, scale, o, scores, stride); break;
        default:
          for (int j = 0; j < group; j++)
            attend_group(1, qg + (size_t)j * hd, K, V, len, hd, scale, o + (size_t)j * hd, scores, stride);
      }
    }
  }
}

#if defined(__x86_64__)
T_AVX2 static void attention_decode_avx2(int n, int layer, const float *qkv, size_t ldqkv, const float *cos_,
                                         const float *sin_, const int64_t *k_base, const int64_t *v_base,
                                         const int64_t *cap, const int64_t *pos, int n_heads, int n_kv, int hd,
                                         float scale, float *out, size_t ldo, float *scores, float *q_rot) {
  attention_decode_body(n, layer, qkv, ldqkv, cos_, sin_, k_base, v_base, cap, pos, n_heads, n_kv, hd, scale, out, ldo,
                        scores, q_rot);
}
#endif

// A decode step's attention, every session's one row in one call: session i's row of qkv
// ([q heads | k heads | v heads] x hd floats, unroped, at qkv + i * ldqkv) has its query and
// key roped by the angles of its position (cos_, sin_: hd / 2 floats a row), its key and value
// stored at position pos[i] of its caches (layer `layer` of [layers, n_kv, cap[i], hd] floats at
// k_base[i], v_base[i]), and its query heads attend over positions [0, pos[i]] into out + i * ldo.
// scores: at least 4 x (max(pos) + 8) floats; q_rot: n_heads x hd floats.
void pk_attention_decode(int isa, int n, int layer, const float *qkv, size_t ldqkv, const float *cos_, const float *sin_,
                         const int64_t *k_base, const int64_t *v_base, const int64_t *cap, const int64_t *pos,
                         int n_heads, int n_kv, int hd, float scale, float *out, size_t ldo, float *scores,
                         float *q_rot) {
#if defined(__x86_64__)
  if (isa >= 1)
    return attention_decode_avx2(n, layer, qkv, ldqkv, cos_, sin_, k_base, v_base, cap, pos, n_heads, n_kv, hd, scale,
                                 out, ldo, scores, q_rot);
#endif
  (void)isa;
  attention_decode_body(n, layer, qkv, ldqkv, cos_, sin_, k_base, v_base, cap, pos, n_heads, n_kv, hd, scale, out, ldo,
                        scores, q_rot);
}

// SiLU(gate) * up on m rows (kernels/reference.py's silu_gate to rounding: its own exp): gate and
// up are the halves of each row of gu (2 ffn floats, ldgu apart), the product goes to out (ldo
// apart). gate / (1 + e^-gate) is taken as gate * e / (1 + e) with e = e^gate where gate < 0, so
// that v8_exp only ever sees x <= 0 (and a large negative gate gives -0, as the twin's inf).
INLINE v8f silu_gate8(v8f x, v8f up) {
  const v8i neg = x < 0.0f;
  const v8f e = v8_exp(v8_select(neg, x, -x));
  return v8_select(neg, x * e, x) / ((v8f){0} + 1.0f + e) * up;
}

INLINE void silu_gate_body(const float *gu, size_t m, size_t ldgu, size_t ffn, float *out, size_t ldo) {
  for (size_t r = 0; r < m; r++) {
    const float *g = gu + r * ldgu, *u = g + ffn;
    float *o = out + r * ldo;
    size_t i = 0;
    for (; i + 8 <= ffn; i += 8) {
      const v8f y = silu_gate8(v8_load(g + i), v8_load(u + i));
      __builtin_memcpy(o + i, &y, sizeof y);
    }
    if (i < ffn) {  // the last few: the same arithmetic on a vector padded with zeros
      float gt[8] = {0}, ut[8] = {0}, yt[8];
      __builtin_memcpy(gt, g + i, (ffn - i) * sizeof(float));
      __builtin_memcpy(ut, u + i, (ffn - i) * sizeof(float));
      const v8f y = silu_gate8(v8_load(gt), v8_load(ut));
      __builtin_memcpy(yt, &y, sizeof y);
      __builtin_memcpy(o + i, yt, (ffn - i) * sizeof(float));
    }
  }
}

#if defined(__x86_64__)
T_AVX2 static void silu_gate_avx2(const float *gu, size_t m, size_t ldgu, size_t ffn, float *out, size_t ldo) {
  silu_gate_body(gu, m, ldgu, ffn, out, ldo);
}
#endif

static void silu_gate_rows(int isa, const float *gu, size_t m, size_t ldgu, size_t ffn, float *out, size_t ldo) {
#if defined(__x86_64__)
  if (isa >= 1) return silu_gate_avx2(gu, m, ldgu, ffn, out, ldo);
#endif
  (void)isa;
  silu_gate_body(gu, m, ldgu, ffn, out, ldo);
}

// pk_silu_gate: silu_gate_rows for the tests (the twin's parity) and any caller on its own
void pk_silu_gate(int isa, const float *gu, size_t m, size_t ldgu, size_t ffn, float *out, size_t ldo) {
  silu_gate_rows(isa, gu, m, ldgu, ffn, out, ldo);
}

// One layer's packed matrices and norms (tab_worker/cpu_kernels.py's DecodeLayer mirrors it):
// q/k/v fused, the output projection, gate/up fused, down; each with the k_pad of its input rows.
typedef struct {
  const Part *qkv, *wo, *gate_up, *down;
  int n_qkv, n_wo, n_gate_up, n_down;
  size_t qkv_rows, gate_up_rows, wo_k_pad, down_k_pad;
  const float *attn_norm, *ffn_norm;
} DecodeLayer;

// A decode step through `count` layers in one call: what numpy_backend.forward's layer loop does
// for a step of one row a session (norm, q/k/v, pk_attention_decode's rope, KV store and
// attention, the output projection added onto x, norm, gate/up, SiLU, the Hadamard rotation
// where the model has one, down added onto x), with no per-layer return to Python, whose call
// costs were a sixth of a small step. x: n rows of `hidden` floats, updated in place; the layer
// l of this call is layer l of the sessions' caches. The attention arguments are
// pk_attention_decode's. Each row's bits are those of the same calls made one layer at a time.
void pk_decode_layers(int isa, const DecodeLayer *layers, int count, int n, float *x, size_t hidden, size_t hidden_pad,
                      float eps, size_t ffn, int hadamard_block, float hadamard_scale, const float *cos_,
                      const float *sin_, const int64_t *k_base, const int64_t *v_base, const int64_t *cap,
                      const int64_t *pos, int n_heads, int n_kv, int hd, float scale, float *scores, float *q_rot,
                      int threads) {
  if (count <= 0 || n <= 0) return;
  size_t qkv_max = 0, gu_max = 0, wo_kp = 0, down_kp = 0;
  for (int l = 0; l < count; l++) {
    const DecodeLayer *L = &layers[l];
    if (L->qkv_rows > qkv_max) qkv_max = L->qkv_rows;
    if (L->gate_up_rows > gu_max) gu_max = L->gate_up_rows;
    if (L->wo_k_pad > wo_kp) wo_kp = L->wo_k_pad;
    if (L->down_k_pad > down_kp) down_kp = L->down_k_pad;
  }
  // one block: the normed rows, q/k/v, the attention (wo's input), gate/up and the SiLU product
  // (down's input); zeros past each input's width, which no layer writes
  const size_t sizes[5] = {n * hidden_pad, n * qkv_max, n * wo_kp, n * gu_max, n * down_kp};
  float *block = (float *)calloc(sizes[0] + sizes[1] + sizes[2] + sizes[3] + sizes[4], sizeof(float));
  if (block == NULL) return;
  float *normed = block, *qkv = normed + sizes[0], *attn = qkv + sizes[1], *gu = attn + sizes[2], *act = gu + sizes[3];
  for (int l = 0; l < count; l++) {
    const DecodeLayer *L = &layers[l];
    rmsnorm_rows(x, n, hidden, hidden, hidden_pad, L->attn_norm, eps, normed);
    pk_matmul_parts(isa, L->qkv, L->n_qkv, normed, n, hidden_pad, qkv, L->qkv_rows, 0, threads);
    pk_attention_decode(isa, n, l, qkv, L->qkv_rows, cos_, sin_, k_base, v_base, cap, pos, n_heads, n_kv, hd, scale, attn,
                        wo_kp, scores, q_rot);
    pk_matmul_parts(isa, L->wo, L->n_wo, attn, n, wo_kp, x, hidden, 1, threads);
    rmsnorm_rows(x, n, hidden, hidden, hidden_pad, L->ffn_norm, eps, normed);
    pk_matmul_parts(isa, L->gate_up, L->n_gate_up, normed, n, hidden_pad, gu, L->gate_up_rows, 0, threads);
    silu_gate_rows(isa, gu, n, L->gate_up_rows, ffn, act, down_kp);
    if (hadamard_block > 0) pk_hadamard(act, n, (int)ffn, (int)down_kp, hadamard_block, hadamard_scale);
    pk_matmul_parts(isa, L->down, L->n_down, act, n, down_kp, x, hidden, 1, threads);
  }
  free(block);
}

// f32 rows [r0, r1) of W (k_pad columns each) into out (rows of ldo floats): for BLAS on long
// prefill chunks, a chunk at a time.
void pk_dequantize(int isa, const uint32_t *q, const uint32_t *s, size_t n, size_t k, int bits, int group, int sym,
                   size_t r0, size_t r1, float *out, size_t ldo) {
  const Mat w = mat_of(q, s, n, k, bits, group, sym);
#if defined(__x86_64__)
  if (isa >= 1) return dequantize_avx2(&w, r0, r1, out, ldo);
#endif
  (void)isa;
  dequantize_scalar(&w, r0, r1, out, ldo);
}
#endif  // native

// ------------------------------------------------------------------ WebAssembly SIMD (the tab)
#if defined(__wasm__)
// 4 lanes at a time. The codes of lanes j..j+3 sit in one word (2/4/8 bits; for 3 bits one
// low-plane word and the high-bit word): splat the word once, mask each lane's field where it
// lies and convert: lane l holds code << shift(l), exact in f32, and the shifts of a vector
// depend only on its place p in the word, so a block's products with x are summed per p and
// scaled by 2^-shift (exact) once per block, then by the group's scale; the min term is
// min * (the block's sum of x, computed once per call). Per 4 weights and row: a mask, a
// convert (shared by the rows), a multiply and an add. Without fused multiply-add or variable
// shifts in WASM SIMD this is what measured fastest in headless Chromium (bench_wasm_ab.py).
#define WASM_ROWS 4
#define WASM_MAX_BLOCKS 4096  // k up to 131072
static float xsum_buf[WASM_ROWS * WASM_MAX_BLOCKS];

INLINE float hsum4_wasm(v128_t t) {
  return (wasm_f32x4_extract_lane(t, 0) + wasm_f32x4_extract_lane(t, 2)) +
         (wasm_f32x4_extract_lane(t, 1) + wasm_f32x4_extract_lane(t, 3));
}

// 2^-(shift of lane l) for place p of a word (3 bits: p 0-3 the low plane, 4-7 the high bit)
INLINE v128_t lane_scale(int bits, int p) {
  if (bits == 3) {
    const float b = p < 4 ? 1.0f / (float)(1u << (8 * p)) : 4.0f / (float)(1u << (4 * (p - 4)));
    return p < 4 ? wasm_f32x4_make(b, b / 4, b / 16, b / 64) : wasm_f32x4_make(b, b / 2, b / 4, b / 8);
  }
  const float b = 1.0f / (float)(1u << (4 * bits * p)) , s = 1.0f / (float)(1u << bits);
  return wasm_f32x4_make(b, b * s, b * s * s, b * s * s * s);
}

INLINE v128_t field_mask(int bits, int p) {
  if (bits == 3) return p < 4 ? wasm_u32x4_make(3u << 8 * p, 3u << (8 * p + 2), 3u << (8 * p + 4), 3u << (8 * p + 6))
                              : wasm_u32x4_make(1u << 4 * (p - 4), 2u << 4 * (p - 4), 4u << 4 * (p - 4), 8u << 4 * (p - 4));
  const uint32_t m = (1u << bits) - 1u, sh = 4 * bits * p;
  return wasm_u32x4_make(m << sh, m << (sh + bits), m << (sh + 2 * bits), m << (sh + 3 * bits));
}

// rows [r0, r0 + RG) of x (RG a constant, so every per-row value stays in a local, not in memory)
INLINE void rows_wasm(const Mat *w, const int bits, const int RG, const float *x, int r0, int ldx, float *y, int ldy,
                      int accumulate) {
  const size_t blocks = w->k_pad / 32;
  const int places = bits == 3 ? 8 : 8 / bits;  // vectors per word (3 bits: 4 low-plane + 4 high-bit per half)
  v128_t ls[8], fm[8];
  for (int p = 0; p < places; p++) ls[p] = lane_scale(bits, p), fm[p] = field_mask(bits, p);
  {
    const int rg = RG;
    for (int r = 0; r < rg; r++)
      for (size_t b = 0; b < blocks; b++) {
        const float *xb = x + (size_t)(r0 + r) * ldx + b * 32;
        v128_t t = wasm_v128_load(xb);
        for (int i = 4; i < 32; i += 4) t = wasm_f32x4_add(t, wasm_v128_load(xb + i));
        xsum_buf[r * blocks + b] = hsum4_wasm(t);
      }
    for (size_t o = 0; o < w->n; o++) {
      const uint32_t *qrow = w->q + o * w->wpr, *srow = w->s + o * w->spr;
      v128_t acc[WASM_ROWS];
      float macc[WASM_ROWS];
      for (int r = 0; r < rg; r++) acc[r] = wasm_f32x4_splat(0.f), macc[r] = 0.f;
      for (size_t b = 0; b < blocks; b++) {
        float sc_, mn_;
        group_scale(w, srow, b * 32 / w->group, &sc_, &mn_);
        const uint32_t *wb = qrow + b * bits;
        v128_t d[WASM_ROWS][8];
        for (int r = 0; r < rg; r++)
          for (int p = 0; p < places; p++) d[r][p] = wasm_f32x4_splat(0.f);
        for (int i = 0; i < 32; i += 4) {
          // the word holding inputs i..i+3 and their place in it
          const int p = bits == 3 ? ((i & 15) >> 2) : ((i * bits) & 31) / (4 * bits);
          const v128_t word = wasm_u32x4_splat(bits == 3 ? wb[i >> 4] : wb[(i * bits) >> 5]);
          const v128_t lo = wasm_f32x4_convert_u32x4(wasm_v128_and(word, fm[p]));
          v128_t hi = lo;
          if (bits == 3) hi = wasm_f32x4_convert_u32x4(wasm_v128_and(wasm_u32x4_splat(wb[2] >> (i & 16)), fm[4 + p]));
          for (int r = 0; r < rg; r++) {
            const v128_t xv = wasm_v128_load(x + (size_t)(r0 + r) * ldx + b * 32 + i);
            d[r][p] = wasm_f32x4_add(d[r][p], wasm_f32x4_mul(lo, xv));
            if (bits == 3) d[r][4 + p] = wasm_f32x4_add(d[r][4 + p], wasm_f32x4_mul(hi, xv));
          }
        }
        const v128_t sc = wasm_f32x4_splat(sc_);
        for (int r = 0; r < rg; r++) {
          v128_t t = wasm_f32x4_mul(d[r][0], ls[0]);
          for (int p = 1; p < places; p++) t = wasm_f32x4_add(t, wasm_f32x4_mul(d[r][p], ls[p]));
          acc[r] = wasm_f32x4_add(acc[r], wasm_f32x4_mul(t, sc));
          macc[r] += mn_ * xsum_buf[r * blocks + b];
        }
      }
      for (int r = 0; r < rg; r++) {
        const float s = hsum4_wasm(acc[r]) + macc[r];
        float *dst = y + (size_t)(r0 + r) * ldy + o;
        *dst = accumulate ? *dst + s : s;
      }
    }
  }
}

INLINE void matmul_wasm_bits(const Mat *w, const int bits, const float *x, int m, int ldx, float *y, int ldy,
                             int accumulate) {
  for (int r0 = 0; r0 < m; r0 += WASM_ROWS) {
    switch (m - r0 < WASM_ROWS ? m - r0 : WASM_ROWS) {
      case 1: rows_wasm(w, bits, 1, x, r0, ldx, y, ldy, accumulate); break;
      case 2: rows_wasm(w, bits, 2, x, r0, ldx, y, ldy, accumulate); break;
      case 3: rows_wasm(w, bits, 3, x, r0, ldx, y, ldy, accumulate); break;
      default: rows_wasm(w, bits, 4, x, r0, ldx, y, ldy, accumulate); break;
    }
  }
}

// The tab's qmatvec: y[r * ldy + o] (+)= x[r] . W[o] for r < m (x rows of ldx >= k_pad floats,
// zeros past k). The JS engine (backend_cpu.js) passes the tensor's words as they arrived.
EXPORT("pk_matmul")
void pk_matmul(const uint32_t *q, const uint32_t *s, int n, int k, int bits, int group, int sym, const float *x,
               int m, int ldx, float *y, int ldy, int accumulate) {
  const Mat w = mat_of(q, s, (size_t)n, (size_t)k, bits, group, sym);
  switch (bits) {
    case 2: matmul_wasm_bits(&w, 2, x, m, ldx, y, ldy, accumulate); break;
    case 3: matmul_wasm_bits(&w, 3, x, m, ldx, y, ldy, accumulate); break;
    case 4: matmul_wasm_bits(&w, 4, x, m, ldx, y, ldy, accumulate); break;
    default: matmul_wasm_bits(&w, 8, x, m, ldx, y, ldy, accumulate); break;
  }
}
#endif
