// Few-row matmul for the numpy backend's decode steps: y[m, n] = sum_k x[m, k] * w[n, k], with
// w the dequantized f32 weight in its natural [out, in] layout (row n is output n's weights).
//
// Why not BLAS here: OpenBLAS sgemm packs the weight matrix on every call, so at 2-8 rows it
// costs 2.5-4.3x a 1-row gemv although the weights come from memory once either way, and a
// decode step is 1 row per session. Here each group of 8 weight rows is streamed from memory once and
// used for every x row while it sits in L1/L2 (x rows in groups of up to 4 in registers).
// Long prefill chunks still go to BLAS (tab_worker/cpu_kernels.py picks by row count).
//
// Every output is computed the same way whatever the number of rows and the tile it lands in:
// LANES (8 AVX2, 16 AVX-512) of fused multiply-adds over k in order, one fixed horizontal sum,
// then fmaf over the k % LANES tail. So a session's row gives bit-identical results alone or in
// a batch of 32 (batch-invariant decode: concurrency never changes a greedy token).
//
// Built by tab_worker/cpu_kernels.py with the host's C compiler (gcc or clang, -O3 -shared);
// the AVX-512 or AVX2+FMA code is chosen at run time, so the library loads on any x86-64 and
// reports whether it can serve (rows_matmul_available).
#include <math.h>
#include <stddef.h>

#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>

#define TARGET_avx2 __attribute__((target("avx2,fma")))
#define TARGET_avx512 __attribute__((target("avx512f,avx2,fma")))

TARGET_avx2 static inline float hsum_avx2(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

TARGET_avx512 static inline float hsum_avx512(__m512 v) {
  const __m256 hi = _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(v), 1));
  return hsum_avx2(_mm256_add_ps(_mm512_castps512_ps256(v), hi));
}

// Weight rows ahead of a tile that it prefetches into L2 while it computes, so memory and
// arithmetic overlap (measured on a 48 KiB-L1 / 2 MiB-L2 Xeon: 16 rows into L2 streamed 8-row
// batches ~1.25x faster than no prefetch or prefetching the next tile into L1).
#define PF_ROWS 16

// Outputs y[r * ldy + c] for RG x rows and NG weight rows: RG*NG independent accumulator
// chains, so one row (memory-bound) streams 8 weight rows at once and four rows (FMA-bound)
// share each weight load four times. Each k step prefetches as many bytes as it reads, from
// PF_ROWS rows past the tile's own.
#define DEFINE_TILE(ISA, VEC, LANES, ZERO, LOAD, FMA, HSUM, RG, NG)                                \
  TARGET_##ISA static void tile_##ISA##_##RG##_##NG(const float *x, size_t K, const float *w, float *y,     \
                                           size_t ldy) {                                           \
    VEC acc[RG][NG];                                                                               \
    for (int r = 0; r < RG; r++)                                                                   \
      for (int c = 0; c < NG; c++) acc[r][c] = ZERO();                                             \
    const float *next = w + (NG + PF_ROWS) * K;                                                    \
    const size_t kv = K - K % LANES;                                                               \
    for (size_t k = 0; k < kv; k += LANES) {                                                       \
      for (int j = 0; j < NG * LANES; j += 16) _mm_prefetch((const char *)(next + k * NG + j), _MM_HINT_T1); \
      VEC wv[NG];                                                                                  \
      for (int c = 0; c < NG; c++) wv[c] = LOAD(w + c * K + k);                                    \
      for (int r = 0; r < RG; r++) {                                                               \
        const VEC xv = LOAD(x + r * K + k);                                                        \
        for (int c = 0; c < NG; c++) acc[r][c] = FMA(wv[c], xv, acc[r][c]);                        \
      }                                                                                            \
    }                                                                                              \
    for (int r = 0; r < RG; r++)                                                                   \
      for (int c = 0; c < NG; c++) {                                                               \
        float s = HSUM(acc[r][c]);                                                                 \
        for (size_t k = kv; k < K; k++) s = fmaf(x[r * K + k], w[c * K + k], s);                   \
        y[r * ldy + c] = s;                                                                        \
      }                                                                                            \
  }

#define TILES(ISA, VEC, LANES, ZERO, LOAD, FMA, HSUM, NG4)             \
  DEFINE_TILE(ISA, VEC, LANES, ZERO, LOAD, FMA, HSUM, 1, 8)            \
  DEFINE_TILE(ISA, VEC, LANES, ZERO, LOAD, FMA, HSUM, 2, 4)            \
  DEFINE_TILE(ISA, VEC, LANES, ZERO, LOAD, FMA, HSUM, 3, NG4)          \
  DEFINE_TILE(ISA, VEC, LANES, ZERO, LOAD, FMA, HSUM, 4, NG4)          \
  DEFINE_TILE(ISA, VEC, LANES, ZERO, LOAD, FMA, HSUM, 1, 1)            \
  DEFINE_TILE(ISA, VEC, LANES, ZERO, LOAD, FMA, HSUM, 2, 1)            \
  DEFINE_TILE(ISA, VEC, LANES, ZERO, LOAD, FMA, HSUM, 3, 1)            \
  DEFINE_TILE(ISA, VEC, LANES, ZERO, LOAD, FMA, HSUM, 4, 1)            \
  /* rows [0, rg) of x against weight rows [n0, n1): wide tiles, then one weight row at a time */ \
  TARGET_##ISA static void row_group_##ISA(const float *x, size_t K, const float *w, float *y, size_t N,     \
                                  size_t rg, size_t n0, size_t n1) {                               \
    const size_t wide = rg == 1 ? 8 : rg == 2 ? 4 : NG4;                                           \
    size_t n = n0;                                                                                 \
    for (; n + wide <= n1; n += wide) {                                                            \
      switch (rg) {                                                                                \
        case 1: tile_##ISA##_1_8(x, K, w + n * K, y + n, N); break;                               \
        case 2: tile_##ISA##_2_4(x, K, w + n * K, y + n, N); break;                               \
        case 3: tile_##ISA##_3_##NG4(x, K, w + n * K, y + n, N); break;                           \
        default: tile_##ISA##_4_##NG4(x, K, w + n * K, y + n, N); break;                          \
      }                                                                                            \
    }                                                                                              \
    for (; n < n1; n++) {                                                                          \
      switch (rg) {                                                                                \
        case 1: tile_##ISA##_1_1(x, K, w + n * K, y + n, N); break;                               \
        case 2: tile_##ISA##_2_1(x, K, w + n * K, y + n, N); break;                               \
        case 3: tile_##ISA##_3_1(x, K, w + n * K, y + n, N); break;                               \
        default: tile_##ISA##_4_1(x, K, w + n * K, y + n, N); break;                              \
      }                                                                                            \
    }                                                                                              \
  }                                                                                                \
  /* 8 weight rows (<= 8 * K floats) at a time, used by every row group before moving on */        \
  TARGET_##ISA static void rows_matmul_##ISA(const float *x, size_t M, size_t K, const float *w, size_t N,  \
                                    float *y) {                                                    \
    for (size_t n0 = 0; n0 < N; n0 += 8) {                                                         \
      const size_t n1 = n0 + 8 < N ? n0 + 8 : N;                                                   \
      for (size_t m = 0; m < M; m += 4)                                                            \
        row_group_##ISA(x + m * K, K, w, y + m * N, N, M - m < 4 ? M - m : 4, n0, n1);             \
    }                                                                                              \
  }

TILES(avx2, __m256, 8, _mm256_setzero_ps, _mm256_loadu_ps, _mm256_fmadd_ps, hsum_avx2, 2)
TILES(avx512, __m512, 16, _mm512_setzero_ps, _mm512_loadu_ps, _mm512_fmadd_ps, hsum_avx512, 4)

// 2: AVX-512 (16 lanes), 1: AVX2+FMA (8 lanes), 0: neither (the numpy backend keeps BLAS).
// A host always takes its best path, so its results are reproducible run to run (the two
// paths sum in different lane orders; tests run both on an AVX-512 host).
int rows_matmul_available(void) {
  __builtin_cpu_init();
  if (__builtin_cpu_supports("avx512f")) return 2;
  return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") ? 1 : 0;
}

// x: [M, K] f32 C-contiguous; w: [N, K] f32 C-contiguous; y: [M, N] f32, written (not added).
// isa: 2 or 1, at most what rows_matmul_available() returned (the caller checks).
void rows_matmul(int isa, const float *x, size_t M, size_t K, const float *w, size_t N, float *y) {
  if (isa == 2) rows_matmul_avx512(x, M, K, w, N, y);
  else rows_matmul_avx2(x, M, K, w, N, y);
}

#else
// No AVX2 kernel on this architecture: the numpy backend keeps BLAS for every step.
int rows_matmul_available(void) { return 0; }
#endif
