// CPU kernels for block-diagonal and Monarch products (the `cpu` backend).
//
// Conventions (fly layout): x (T, n_in) with n_in <= k*p (missing columns read as zero), w1 (k, q, p),
// w2 (l, s, r) with l*r == k*q, out (T, n_out) with n_out <= l*s and out[t, ss*l + ll].
//
// Design: a Monarch product is two block-diagonal GEMM stages with a permutation after each; on a tile of
// token rows every step is a dense pass over cache-resident buffers:
//  * stage GEMMs write into a tile buffer in block order ((T, k*q) for stage 1, (T, l*s) for stage 2);
//  * each permutation is, per token row, the transpose of a small matrix: P1 views the k*q stage-1 outputs as
//    (r, l) and transposes, P2 views the l*s stage-2 outputs as (l, s) and transposes. They run as blocked
//    16 x 16 in-register transposes (AVX-512) that read and write whole cache lines, instead of element-wise
//    scatters with stride l that touch a new cache line per element (those cost more than the GEMMs at 32-64
//    blocks);
//  * the token dimension is cut into row tiles processed independently in parallel (at::parallel_for); the
//    Monarch intermediate of a tile never leaves the thread's scratch buffers, so x is read once and the
//    output written once (the CPU analogue of the fused GPU kernel). With fewer tiles than threads the
//    schedule is parallel over blocks instead, step by step over all rows;
//  * GEMMs keep an MR x NR accumulator block in registers and run over the contiguous N dimension: an AVX-512
//    kernel for float (built with -march=native) that broadcasts op(A) from where it lies, so a transposed A
//    costs nothing (the weight gradients dw = gᵀ x read both operands in place), and a portable kernel
//    otherwise. Forward products C = A wᵀ pack the weights transposed once per call with many tokens and,
//    with few tokens, stream them in place through a dot-product kernel (no copy); backward products C = A w
//    use the weights as stored;
//  * the fused backward recomputes the stage-1 intermediate of a tile (and, with an activation, the
//    pre-activation with one stage-2 GEMM) instead of saving it, and computes dx, dw1, dw2 and the bias
//    gradient from one output-gradient tile;
//  * weight gradients reduce over tokens into one accumulator per chunk of row tiles, summed at the end in
//    chunk order (deterministic for a given thread count).
// Accumulation precision is float for fp32/bf16/fp16 and double for fp64. GELU epilogues and derivatives
// call ATen's own vectorised kernels on the tile buffers, so NaN/Inf behave as in `act(F.linear(...))`.
#include <torch/extension.h>

#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <memory>
#include <type_traits>
#include <vector>

#if defined(__AVX512F__)
#include <immintrin.h>
#endif

namespace monarch_cpu {

constexpr int64_t NC = 256;                // N-blocking of the GEMM B operand (keeps a K x NC panel in L2)
constexpr int64_t PACK_MIN_TOKENS = 256;   // fewest tokens for which forward weights are packed transposed
constexpr int64_t FEW_TILE_ROWS = 32;      // fewer than this many rows per thread: block-parallel schedule
constexpr int64_t FWD_TILE_BYTES = 256 << 10;  // forward row tile: about this much per tile buffer
constexpr int64_t BWD_TILE_BYTES = 512 << 10;  // backward row tile: about this much per tile buffer
constexpr int64_t MIN_TILE_ROWS = 8, MAX_FWD_ROWS = 64, MAX_BWD_ROWS = 256;

enum Act : int64_t { NONE = 0, RELU = 1, GELU = 2, GELU_TANH = 3 };

inline int64_t cdiv(int64_t a, int64_t b) { return (a + b - 1) / b; }

template <typename acc_t>
constexpr at::ScalarType acc_type() {
  return std::is_same_v<acc_t, double> ? at::kDouble : at::kFloat;
}

// Thread-local scratch buffer number `slot` with room for n elements, kept across calls (no page faults from
// fresh allocations in the hot loop). Slots are distinct per role so nested steps never share one.
template <typename T>
T* scratch(int slot, int64_t n) {
  thread_local std::vector<T> bufs[7];
  auto& b = bufs[slot];
  if (int64_t(b.size()) < n) b.resize(n);
  return b.data();
}
enum Slot { S_PANEL = 0, S_X = 1, S_G = 2, S_A = 3, S_B = 4, S_C = 5, S_D = 6 };

// ------------------------------------------------------------------------------------------ GEMM kernels
// C[M,N] = (accumulate ? C : 0) + op(A)[M,K] * B[K,N], row-major with leading dimensions, where op(A) is A
// stored (M, K) or, with trans_a, Aᵀ for A stored (K, M).

template <typename T, int MR, int NR>
inline void micro_full(int64_t K, const T* A, int64_t lda, const T* B, int64_t ldb, T* C, int64_t ldc) {
  T acc[MR][NR];
  for (int r = 0; r < MR; ++r)
    for (int c = 0; c < NR; ++c) acc[r][c] = C[r * ldc + c];
  for (int64_t kk = 0; kk < K; ++kk) {
    const T* b = B + kk * ldb;
    for (int r = 0; r < MR; ++r) {
      const T a = A[r * lda + kk];
#pragma omp simd
      for (int c = 0; c < NR; ++c) acc[r][c] += a * b[c];
    }
  }
  for (int r = 0; r < MR; ++r)
    for (int c = 0; c < NR; ++c) C[r * ldc + c] = acc[r][c];
}

template <typename T>
inline void micro_edge(int64_t mr, int64_t nr, int64_t K, const T* A, int64_t lda, const T* B, int64_t ldb, T* C,
                       int64_t ldc) {
  for (int64_t r = 0; r < mr; ++r) {
    T* c_row = C + r * ldc;
    for (int64_t kk = 0; kk < K; ++kk) {
      const T a = A[r * lda + kk];
      const T* b = B + kk * ldb;
#pragma omp simd
      for (int64_t c = 0; c < nr; ++c) c_row[c] += a * b[c];
    }
  }
}

// Portable GEMM (double everywhere; float without AVX-512): op(A) made row-major first when transposed.
template <typename T>
void gemm_portable(int64_t M, int64_t N, int64_t K, const T* A, int64_t lda, bool trans_a, const T* B, int64_t ldb,
                   T* C, int64_t ldc, bool accumulate) {
  if (trans_a) {
    T* At = scratch<T>(S_PANEL, M * K);
    for (int64_t kk = 0; kk < K; ++kk)
      for (int64_t i = 0; i < M; ++i) At[i * K + kk] = A[kk * lda + i];
    A = At;
    lda = K;
  }
  if (!accumulate)
    for (int64_t i = 0; i < M; ++i) std::fill(C + i * ldc, C + i * ldc + N, T(0));
  constexpr int MR = 4;
  constexpr int NR = 64 / sizeof(T) * 2;  // two 512-bit vectors (32 floats / 16 doubles)
  for (int64_t n0 = 0; n0 < N; n0 += NC) {
    const int64_t nc = std::min(NC, N - n0);
    for (int64_t i = 0; i < M; i += MR) {
      const int64_t mr = std::min<int64_t>(MR, M - i);
      for (int64_t j = 0; j < nc; j += NR) {
        const int64_t nr = std::min<int64_t>(NR, nc - j);
        const T* a = A + i * lda;
        const T* b = B + n0 + j;
        T* c = C + i * ldc + n0 + j;
        if (mr == MR && nr == NR)
          micro_full<T, MR, NR>(K, a, lda, b, ldb, c, ldc);
        else
          micro_edge<T>(mr, nr, K, a, lda, b, ldb, c, ldc);
      }
    }
  }
}

#if defined(__AVX512F__)
inline __mmask16 mask16(int64_t n) { return n >= 16 ? __mmask16(0xFFFF) : __mmask16((1u << std::max<int64_t>(n, 0)) - 1); }

// C[MR, nr] (+)= op(A)[MR, K] * B[K, nr] for nr <= 32 columns (two 16-float vectors, masked at the edges), with
// element (r, kk) of op(A) at A[r * sa + kk * sk]: (sa, sk) = (lda, 1) for A stored (M, K), (1, lda) for Aᵀ.
// op(A) is read in place, one broadcast per element (no packed copy): MR row streams plus B stay in L1.
template <int MR>
inline void micro_avx512(int64_t K, const float* A, int64_t sa, int64_t sk, const float* B, int64_t ldb, float* C,
                         int64_t ldc, int nr, bool accumulate) {
  const __mmask16 m0 = mask16(nr), m1 = mask16(nr - 16);
  __m512 c0[MR], c1[MR];
#pragma GCC unroll 8
  for (int r = 0; r < MR; ++r) {
    c0[r] = accumulate ? _mm512_maskz_loadu_ps(m0, C + r * ldc) : _mm512_setzero_ps();
    c1[r] = accumulate ? _mm512_maskz_loadu_ps(m1, C + r * ldc + 16) : _mm512_setzero_ps();
  }
  for (int64_t kk = 0; kk < K; ++kk) {
    const __m512 b0 = _mm512_maskz_loadu_ps(m0, B + kk * ldb);
    const __m512 b1 = _mm512_maskz_loadu_ps(m1, B + kk * ldb + 16);
    const float* a = A + kk * sk;
#pragma GCC unroll 8
    for (int r = 0; r < MR; ++r) {
      const __m512 av = _mm512_set1_ps(a[r * sa]);
      c0[r] = _mm512_fmadd_ps(av, b0, c0[r]);
      c1[r] = _mm512_fmadd_ps(av, b1, c1[r]);
    }
  }
#pragma GCC unroll 8
  for (int r = 0; r < MR; ++r) {
    _mm512_mask_storeu_ps(C + r * ldc, m0, c0[r]);
    _mm512_mask_storeu_ps(C + r * ldc + 16, m1, c1[r]);
  }
}

// Panels of 8 rows of C (16 accumulators in registers) and a shorter panel for the last M % 8 rows.
template <int MR>
void gemm_rows_avx512(int64_t N, int64_t K, const float* A, int64_t sa, int64_t sk, const float* B, int64_t ldb,
                      float* C, int64_t ldc, bool accumulate) {
  for (int64_t n0 = 0; n0 < N; n0 += NC) {
    const int64_t nc = std::min(NC, N - n0);
    for (int64_t j = 0; j < nc; j += 32)
      micro_avx512<MR>(K, A, sa, sk, B + n0 + j, ldb, C + n0 + j, ldc, int(std::min<int64_t>(32, nc - j)), accumulate);
  }
}

void gemm_avx512(int64_t M, int64_t N, int64_t K, const float* A, int64_t lda, bool trans_a, const float* B,
                 int64_t ldb, float* C, int64_t ldc, bool accumulate) {
  const int64_t sa = trans_a ? 1 : lda, sk = trans_a ? lda : 1;
  int64_t i = 0;
  for (; i + 8 <= M; i += 8) gemm_rows_avx512<8>(N, K, A + i * sa, sa, sk, B, ldb, C + i * ldc, ldc, accumulate);
  const float* a = A + i * sa;
  float* c = C + i * ldc;
  switch (M - i) {
    case 7: gemm_rows_avx512<7>(N, K, a, sa, sk, B, ldb, c, ldc, accumulate); break;
    case 6: gemm_rows_avx512<6>(N, K, a, sa, sk, B, ldb, c, ldc, accumulate); break;
    case 5: gemm_rows_avx512<5>(N, K, a, sa, sk, B, ldb, c, ldc, accumulate); break;
    case 4: gemm_rows_avx512<4>(N, K, a, sa, sk, B, ldb, c, ldc, accumulate); break;
    case 3: gemm_rows_avx512<3>(N, K, a, sa, sk, B, ldb, c, ldc, accumulate); break;
    case 2: gemm_rows_avx512<2>(N, K, a, sa, sk, B, ldb, c, ldc, accumulate); break;
    case 1: gemm_rows_avx512<1>(N, K, a, sa, sk, B, ldb, c, ldc, accumulate); break;
    default: break;
  }
}
#endif

template <typename T>
void gemm(int64_t M, int64_t N, int64_t K, const T* A, int64_t lda, bool trans_a, const T* B, int64_t ldb, T* C,
          int64_t ldc, bool accumulate) {
  if (M <= 0 || N <= 0) return;
#if defined(__AVX512F__)
  if constexpr (std::is_same_v<T, float>) {
    gemm_avx512(M, N, K, A, lda, trans_a, B, ldb, C, ldc, accumulate);
    return;
  }
#endif
  gemm_portable<T>(M, N, K, A, lda, trans_a, B, ldb, C, ldc, accumulate);
}

#if defined(__AVX512F__)
// Per 128-bit lane L: [Σ_L a, Σ_L b, Σ_L c, Σ_L d] (four partial sums of each vector's lane L).
inline __m512 lane_sums4(__m512 a, __m512 b, __m512 c, __m512 d) {
  const __m512 ab = _mm512_add_ps(_mm512_unpacklo_ps(a, b), _mm512_unpackhi_ps(a, b));
  const __m512 cd = _mm512_add_ps(_mm512_unpacklo_ps(c, d), _mm512_unpackhi_ps(c, d));
  return _mm512_add_ps(_mm512_shuffle_ps(ab, cd, _MM_SHUFFLE(1, 0, 1, 0)), _mm512_shuffle_ps(ab, cd, _MM_SHUFFLE(3, 2, 3, 2)));
}

// The 16 horizontal sums of v[0..15], in order, in one vector (~45 shuffles/adds instead of 16 reductions).
inline __m512 hsum16(const __m512* v) {
  const __m512 u0 = lane_sums4(v[0], v[1], v[2], v[3]), u1 = lane_sums4(v[4], v[5], v[6], v[7]);
  const __m512 u2 = lane_sums4(v[8], v[9], v[10], v[11]), u3 = lane_sums4(v[12], v[13], v[14], v[15]);
  const __m512 w01 = _mm512_add_ps(_mm512_shuffle_f32x4(u0, u1, _MM_SHUFFLE(2, 0, 2, 0)),
                                   _mm512_shuffle_f32x4(u0, u1, _MM_SHUFFLE(3, 1, 3, 1)));
  const __m512 w23 = _mm512_add_ps(_mm512_shuffle_f32x4(u2, u3, _MM_SHUFFLE(2, 0, 2, 0)),
                                   _mm512_shuffle_f32x4(u2, u3, _MM_SHUFFLE(3, 1, 3, 1)));
  return _mm512_add_ps(_mm512_shuffle_f32x4(w01, w23, _MM_SHUFFLE(2, 0, 2, 0)),
                       _mm512_shuffle_f32x4(w01, w23, _MM_SHUFFLE(3, 1, 3, 1)));
}

// C[mi, nj] (+)= A[mi, K] B[nj, K]^T for mi <= MI rows of A and nj <= NJ rows of B (MI * NJ = 16 dot products,
// vectorised over the contiguous K, masked tail), reduced together by hsum16.
template <int MI, int NJ>
inline void dot_block_avx512(int64_t K, const float* A, int64_t lda, const float* B, int64_t ldb, float* C, int64_t ldc,
                             int mi, int nj, bool accumulate) {
  static_assert(MI * NJ == 16, "16 accumulators");
  __m512 acc[16];
  for (int i = 0; i < 16; ++i) acc[i] = _mm512_setzero_ps();
  for (int64_t k = 0; k < K; k += 16) {
    const __mmask16 mk = mask16(K - k);
    __m512 a[MI], b[NJ];
#pragma GCC unroll 16
    for (int j = 0; j < NJ; ++j) b[j] = j < nj ? _mm512_maskz_loadu_ps(mk, B + j * ldb + k) : _mm512_setzero_ps();
#pragma GCC unroll 4
    for (int i = 0; i < MI; ++i) a[i] = i < mi ? _mm512_maskz_loadu_ps(mk, A + i * lda + k) : _mm512_setzero_ps();
#pragma GCC unroll 4
    for (int i = 0; i < MI; ++i)
#pragma GCC unroll 16
      for (int j = 0; j < NJ; ++j) acc[i * NJ + j] = _mm512_fmadd_ps(a[i], b[j], acc[i * NJ + j]);
  }
  alignas(64) float sums[16];
  _mm512_store_ps(sums, hsum16(acc));
  for (int i = 0; i < mi; ++i)
    for (int j = 0; j < nj; ++j) C[i * ldc + j] = (accumulate ? C[i * ldc + j] : 0.f) + sums[i * NJ + j];
}
#endif

// C[M,N] = (accumulate ? C : 0) + A[M,K] * B[N,K]^T, both operands row-major with contiguous K (dot
// products). Used with the weights in place as B when there are few tokens: no transposed copy is made.
template <typename T>
void gemm_nt(int64_t M, int64_t N, int64_t K, const T* A, int64_t lda, const T* B, int64_t ldb, T* C, int64_t ldc,
             bool accumulate) {
#if defined(__AVX512F__)
  if constexpr (std::is_same_v<T, float>) {
    for (int64_t j = 0; j < N; j += 16) {
      const int nj = int(std::min<int64_t>(16, N - j));
      int64_t i = 0;
      for (; i + 4 <= M; i += 4)  // 4 rows of A x 4 rows of B, four times: each B row is loaded once per 4 A rows
        for (int64_t j4 = j; j4 < j + nj; j4 += 4)
          dot_block_avx512<4, 4>(K, A + i * lda, lda, B + j4 * ldb, ldb, C + i * ldc + j4, ldc, 4,
                                 int(std::min<int64_t>(4, j + nj - j4)), accumulate);
      for (; i < M; ++i)  // remaining rows: 1 x 16
        dot_block_avx512<1, 16>(K, A + i * lda, lda, B + j * ldb, ldb, C + i * ldc + j, ldc, 1, nj, accumulate);
    }
    return;
  }
#endif
  for (int64_t i = 0; i < M; ++i)
    for (int64_t j = 0; j < N; ++j) {
      const T* a = A + i * lda;
      const T* b = B + j * ldb;
      T sum = 0;
#pragma omp simd reduction(+ : sum)
      for (int64_t k = 0; k < K; ++k) sum += a[k] * b[k];
      C[i * ldc + j] = (accumulate ? C[i * ldc + j] : T(0)) + sum;
    }
}

// ------------------------------------------------------------------------------------------ permutations

#if defined(__AVX512F__)
// dst[c * ldd + r] = src[r * lds + c] for r < nr, c < nc (nr, nc <= 16): one 16 x 16 block, loaded and stored as
// whole (masked) rows. Unpack pairs of rows, then 4 x 4 shuffles within 128-bit lanes, then lane shuffles.
inline void transpose16(const float* src, int64_t lds, float* dst, int64_t ldd, int nr, int nc) {
  const __mmask16 mc = mask16(nc), mr = mask16(nr);
  __m512 a[16], b[16];
#pragma GCC unroll 16
  for (int i = 0; i < 16; ++i) a[i] = i < nr ? _mm512_maskz_loadu_ps(mc, src + i * lds) : _mm512_setzero_ps();
#pragma GCC unroll 8
  for (int i = 0; i < 8; ++i) {
    b[2 * i] = _mm512_unpacklo_ps(a[2 * i], a[2 * i + 1]);
    b[2 * i + 1] = _mm512_unpackhi_ps(a[2 * i], a[2 * i + 1]);
  }
  // a[4g + c], lane L = rows 4g..4g+3 at column 4L + c
#pragma GCC unroll 4
  for (int g = 0; g < 4; ++g) {
    a[4 * g + 0] = _mm512_shuffle_ps(b[4 * g + 0], b[4 * g + 2], 0x44);
    a[4 * g + 1] = _mm512_shuffle_ps(b[4 * g + 0], b[4 * g + 2], 0xEE);
    a[4 * g + 2] = _mm512_shuffle_ps(b[4 * g + 1], b[4 * g + 3], 0x44);
    a[4 * g + 3] = _mm512_shuffle_ps(b[4 * g + 1], b[4 * g + 3], 0xEE);
  }
#pragma GCC unroll 4
  for (int c = 0; c < 4; ++c) {
    const __m512 v = _mm512_shuffle_f32x4(a[c], a[4 + c], 0x88), v2 = _mm512_shuffle_f32x4(a[c], a[4 + c], 0xDD);
    const __m512 w = _mm512_shuffle_f32x4(a[8 + c], a[12 + c], 0x88), w2 = _mm512_shuffle_f32x4(a[8 + c], a[12 + c], 0xDD);
    b[c] = _mm512_shuffle_f32x4(v, w, 0x88);
    b[8 + c] = _mm512_shuffle_f32x4(v, w, 0xDD);
    b[4 + c] = _mm512_shuffle_f32x4(v2, w2, 0x88);
    b[12 + c] = _mm512_shuffle_f32x4(v2, w2, 0xDD);
  }
#pragma GCC unroll 16
  for (int j = 0; j < 16; ++j)
    if (j < nc) _mm512_mask_storeu_ps(dst + j * ldd, mr, b[j]);
}
#endif

// For each of m token rows: view the row of src as an (R, C) matrix and write its transpose (C, R) as the row
// of dst: dst[t*ldd + c*R + r] = src[t*lds + r*C + c]. P1 is (R, C) = (r, l), P2 is (l, s); their adjoints
// swap the two.
template <typename T>
void transpose_rows(int64_t m, int64_t R, int64_t C, const T* src, int64_t lds, T* dst, int64_t ldd) {
#if defined(__AVX512F__)
  if constexpr (std::is_same_v<T, float>) {
    for (int64_t t = 0; t < m; ++t) {
      const float* s = src + t * lds;
      float* d = dst + t * ldd;
      for (int64_t r0 = 0; r0 < R; r0 += 16)
        for (int64_t c0 = 0; c0 < C; c0 += 16)
          transpose16(s + r0 * C + c0, C, d + c0 * R + r0, R, int(std::min<int64_t>(16, R - r0)),
                      int(std::min<int64_t>(16, C - c0)));
    }
    return;
  }
#endif
  constexpr int64_t BS = 8;
  for (int64_t t = 0; t < m; ++t) {
    const T* s = src + t * lds;
    T* d = dst + t * ldd;
    for (int64_t r0 = 0; r0 < R; r0 += BS)
      for (int64_t c0 = 0; c0 < C; c0 += BS)
        for (int64_t c = c0; c < std::min(C, c0 + BS); ++c)
          for (int64_t r = r0; r < std::min(R, r0 + BS); ++r) d[c * R + r] = s[r * C + c];
  }
}

// ------------------------------------------------------------------------------------------ epilogues

// ATen's elementwise kernels on a strided (m, n) view of a scratch buffer: the same vectorised code and the
// same NaN/Inf behaviour as the unfused torch ops.
template <typename acc_t>
at::Tensor view_of(acc_t* p, int64_t m, int64_t n, int64_t ld) {
  return at::from_blob(p, {m, n}, {ld, 1}, at::TensorOptions().dtype(acc_type<acc_t>()));
}

inline c10::string_view gelu_approximation(int64_t act) { return act == GELU_TANH ? "tanh" : "none"; }

// v[t, j] += bias[j] (bias may be null), then, with an activation and a storage dtype narrower than the
// accumulator, v rounded to the storage dtype: act(F.linear(...)) activates the stored pre-activation, so an
// fp16 pre-activation beyond ±65504 is ±inf there (and gelu(-inf) is NaN), not a finite fp32 value.
template <typename scalar_t, typename acc_t>
void bias_round_rows(acc_t* v, int64_t ld, int64_t m, int64_t n, const acc_t* bias, int64_t act) {
  if (bias)
    for (int64_t t = 0; t < m; ++t) {
      acc_t* row = v + t * ld;
#pragma omp simd
      for (int64_t j = 0; j < n; ++j) row[j] += bias[j];
    }
  if constexpr (!std::is_same_v<scalar_t, acc_t>)
    if (act != NONE)
      for (int64_t t = 0; t < m; ++t) {
        acc_t* row = v + t * ld;
        for (int64_t j = 0; j < n; ++j) row[j] = static_cast<acc_t>(static_cast<scalar_t>(row[j]));
      }
}

// v[t, j] = act(v[t, j] + bias[j]) in place for t < m, j < n (bias may be null; pre-activation rounded to scalar_t).
template <typename scalar_t, typename acc_t>
void bias_act_rows(acc_t* v, int64_t ld, int64_t m, int64_t n, const acc_t* bias, int64_t act) {
  bias_round_rows<scalar_t, acc_t>(v, ld, m, n, bias, act);
  if (act == RELU) {
    for (int64_t t = 0; t < m; ++t) {
      acc_t* row = v + t * ld;
      for (int64_t j = 0; j < n; ++j) row[j] = row[j] < acc_t(0) ? acc_t(0) : row[j];  // NaN stays NaN
    }
  } else if (act == GELU || act == GELU_TANH) {
    at::AutoDispatchBelowADInplaceOrView guard;
    auto t = view_of(v, m, n, ld);
    at::gelu_(t, gelu_approximation(act));
  }
}

// g[t, j] = g[t, j] · act'(pre[t, j] + bias[j]) in place (the vector-Jacobian product of the activation): ReLU
// passes g where pre > 0 or pre is NaN (as torch's threshold_backward), GELU uses ATen's gelu_backward. pre is
// overwritten with the biased pre-activation, rounded to scalar_t as the forward activated it.
template <typename scalar_t, typename acc_t>
void act_backward_rows(acc_t* g, int64_t ldg, acc_t* pre, int64_t ldp, int64_t m, int64_t n, const acc_t* bias,
                       int64_t act) {
  bias_round_rows<scalar_t, acc_t>(pre, ldp, m, n, bias, act);
  if (act == RELU) {
    for (int64_t t = 0; t < m; ++t)
      for (int64_t j = 0; j < n; ++j)
        if (pre[t * ldp + j] <= acc_t(0)) g[t * ldg + j] = acc_t(0);
  } else if (act == GELU || act == GELU_TANH) {
    at::AutoDispatchBelowADInplaceOrView guard;
    auto gt = view_of(g, m, n, ldg);
    at::gelu_backward_out(gt, gt, view_of(pre, m, n, ldp), gelu_approximation(act));
  }
}

// dst[t, j] = src[t, j] converted, for t < m, j < n.
template <typename scalar_t, typename acc_t>
void store_rows(const acc_t* src, int64_t lds, int64_t m, int64_t n, scalar_t* dst, int64_t ldd) {
  for (int64_t t = 0; t < m; ++t) {
    const acc_t* s = src + t * lds;
    scalar_t* d = dst + t * ldd;
    for (int64_t j = 0; j < n; ++j) d[j] = static_cast<scalar_t>(s[j]);
  }
}

// ------------------------------------------------------------------------------------------ operands

// Pack w (nb, rows, cols) into a dense tensor of accumulation precision, transposed to (nb, cols, rows) or as is
// (no copy for a contiguous tensor that already has it). Not cached across calls: frameworks such as FSDP
// rewrite parameter storage without bumping version counters, so no key short of the data proves a copy current.
at::Tensor pack(const at::Tensor& w, at::ScalarType acc, bool transpose) {
  return (transpose ? w.transpose(1, 2) : w).to(acc).contiguous();
}

// Block weights w (nb, rows, cols) in accumulation precision, used two ways:
//  * forward products C[M, rows] = A[M, cols] · w[b]ᵀ (apply): with many tokens through a transposed
//    (nb, cols, rows) copy and the register-blocked kernel, with few tokens in place by the dot-product kernel;
//  * backward products C[M, cols] = A[M, rows] · w[b] (block): the weights as stored.
template <typename acc_t>
struct BlockWeights {
  at::Tensor natural, transposed;
  const acc_t* w;
  const acc_t* wt = nullptr;
  int64_t rows, cols;
  BlockWeights(const at::Tensor& weights, int64_t tokens, bool forward)
      : natural(pack(weights, acc_type<acc_t>(), false)),
        w(natural.data_ptr<acc_t>()),
        rows(weights.size(1)),
        cols(weights.size(2)) {
    if (forward && tokens >= PACK_MIN_TOKENS) {
      transposed = pack(weights, acc_type<acc_t>(), true);
      wt = transposed.data_ptr<acc_t>();
    }
  }
  const acc_t* block(int64_t b) const { return w + b * rows * cols; }
  void apply(int64_t M, const acc_t* A, int64_t lda, int64_t b, acc_t* C, int64_t ldc) const {
    if (wt)
      gemm<acc_t>(M, rows, cols, A, lda, false, wt + b * rows * cols, rows, C, ldc, false);
    else
      gemm_nt<acc_t>(M, rows, cols, A, lda, block(b), cols, C, ldc, false);
  }
};

// Rows [t0, t0+m) of a 2-D tensor as an (m, width) operand in accumulation precision: a pointer into the tensor
// itself when it already is one (same dtype, unit column stride, exactly `width` columns), else a converted
// copy in `buf` with columns past the tensor's width zero (implicit zero padding). Sets ld.
template <typename scalar_t, typename acc_t>
const acc_t* rows_of(const at::Tensor& t, int64_t t0, int64_t m, int64_t width, acc_t* buf, int64_t& ld) {
  const scalar_t* base = t.data_ptr<scalar_t>();
  const int64_t st = t.stride(0), sf = t.stride(1), n = t.size(1);
  if constexpr (std::is_same_v<scalar_t, acc_t>) {
    if (sf == 1 && n == width) {
      ld = st;
      return base + t0 * st;
    }
  }
  const int64_t lim = std::min(width, n);
  for (int64_t i = 0; i < m; ++i) {
    const scalar_t* row = base + (t0 + i) * st;
    acc_t* d = buf + i * width;
    for (int64_t f = 0; f < lim; ++f) d[f] = static_cast<acc_t>(row[f * sf]);
    std::fill(d + lim, d + width, acc_t(0));
  }
  ld = width;
  return buf;
}

// Whether rows_of reads the tensor in place (no buffer needed).
template <typename scalar_t, typename acc_t>
bool direct_rows(const at::Tensor& t, int64_t width) {
  return std::is_same_v<scalar_t, acc_t> && t.stride(1) == 1 && t.size(1) == width;
}

template <typename acc_t>
std::vector<acc_t> bias_vec(const c10::optional<at::Tensor>& bias, int64_t n) {
  std::vector<acc_t> out(n, acc_t(0));
  if (bias.has_value() && bias->defined()) {
    const auto b = bias->to(acc_type<acc_t>()).contiguous();
    const acc_t* src = b.template data_ptr<acc_t>();
    std::copy(src, src + std::min<int64_t>(n, b.numel()), out.begin());
  }
  return out;
}

inline bool has_bias(const c10::optional<at::Tensor>& bias) { return bias.has_value() && bias->defined(); }

struct Dims {
  int64_t k, q, p, l, s, r;
  Dims(const at::Tensor& w1, const at::Tensor& w2)
      : k(w1.size(0)), q(w1.size(1)), p(w1.size(2)), l(w2.size(0)), s(w2.size(1)), r(w2.size(2)) {}
  int64_t n_in() const { return k * p; }   // padded input width
  int64_t n_mid() const { return k * q; }  // stage-1 outputs
  int64_t n_out() const { return l * s; }  // padded output width
  int64_t widest() const { return std::max({n_in(), n_mid(), n_out()}); }
};

// Block-parallel schedule (each step over all rows, parallel over blocks) when the row tiles would not give
// every thread one.
inline bool few_tiles(int64_t T) { return cdiv(T, FEW_TILE_ROWS) < at::get_num_threads(); }

// Rows per tile: about `bytes` per (rows, widest) buffer, a multiple of 8 in [MIN_TILE_ROWS, max_rows].
inline int64_t tile_rows(const Dims& d, int64_t elem, int64_t bytes, int64_t max_rows) {
  const int64_t rows = bytes / (d.widest() * elem);
  return std::clamp<int64_t>(rows / 8 * 8, MIN_TILE_ROWS, max_rows);
}

// Runs f(b, e) over [0, n) in parallel when `parallel`, else as one range on this thread.
template <typename F>
void maybe_parallel(bool parallel, int64_t n, int64_t grain, const F& f) {
  if (parallel)
    at::parallel_for(0, n, grain, f);
  else if (n > 0)
    f(0, n);
}

// ------------------------------------------------------------------------------------------ Monarch steps
// Each step works on m rows held in row-major buffers (leading dimension given) and on a range of blocks
// [b, e); the row-tile schedule calls it with all blocks of one tile, the block schedule in parallel over
// blocks with all rows.

// Y[:, kk*q ...] = X[:, kk*p ...] · w1[kk]ᵀ (stage 1, block order = natural stage-1 order).
template <typename acc_t>
void stage1(const Dims& d, const BlockWeights<acc_t>& W1, int64_t m, const acc_t* X, int64_t ldx, acc_t* Y,
            int64_t ldy, int64_t b, int64_t e) {
  for (int64_t kk = b; kk < e; ++kk) W1.apply(m, X + kk * d.p, ldx, kk, Y + kk * d.q, ldy);
}

// O[:, ll*s ...] = Z[:, ll*r ...] · w2[ll]ᵀ (stage 2 in block order; P2 follows).
template <typename acc_t>
void stage2(const Dims& d, const BlockWeights<acc_t>& W2, int64_t m, const acc_t* Z, int64_t ldz, acc_t* O,
            int64_t ldo, int64_t b, int64_t e) {
  for (int64_t ll = b; ll < e; ++ll) W2.apply(m, Z + ll * d.r, ldz, ll, O + ll * d.s, ldo);
}

// ------------------------------------------------------------------------------------------ Monarch forward

at::Tensor monarch_fwd(const at::Tensor& x, const at::Tensor& w1, const at::Tensor& w2,
                       const c10::optional<at::Tensor>& bias, int64_t n_out, int64_t act) {
  TORCH_CHECK(x.device().is_cpu() && x.dim() == 2, "monarch_fwd (cpu): x must be a 2-D CPU tensor");
  const Dims d(w1, w2);
  TORCH_CHECK(d.l * d.r == d.k * d.q, "monarch_fwd (cpu): l*r must equal k*q");
  const int64_t T = x.size(0);
  auto out = at::empty({T, n_out}, x.options());
  if (T == 0) return out;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "monarch_fwd_cpu", [&] {
    using acc_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
    const auto bvec = bias_vec<acc_t>(bias, d.n_out());
    const acc_t* bp = has_bias(bias) ? bvec.data() : nullptr;
    const BlockWeights<acc_t> W1(w1, T, true), W2(w2, T, true);
    scalar_t* op = out.data_ptr<scalar_t>();
    // P2 straight into the output when it has the accumulation type and no truncated columns
    const bool out_direct = std::is_same_v<scalar_t, acc_t> && n_out == d.n_out();
    const int64_t nm = d.n_mid(), no = d.n_out();
    // P2, bias, activation and conversion of rows [t0, t0+m) from O (block order) in `tmp`
    auto finish = [&](int64_t t0, int64_t m, const acc_t* O, acc_t* tmp) {
      if (out_direct) {
        acc_t* dst = reinterpret_cast<acc_t*>(op) + t0 * n_out;
        transpose_rows(m, d.l, d.s, O, no, dst, n_out);
        bias_act_rows<scalar_t, acc_t>(dst, n_out, m, n_out, bp, act);
      } else {
        transpose_rows(m, d.l, d.s, O, no, tmp, no);
        bias_act_rows<scalar_t, acc_t>(tmp, no, m, n_out, bp, act);
        store_rows(tmp, no, m, n_out, op + t0 * n_out, n_out);
      }
    };
    if (few_tiles(T)) {
      auto buf = [&](int64_t n) { return std::unique_ptr<acc_t[]>(new acc_t[T * n]); };
      auto xb = direct_rows<scalar_t, acc_t>(x, d.n_in()) ? nullptr : buf(d.n_in());
      auto Y = buf(d.widest()), Z = buf(nm), O = buf(no);
      int64_t ldx;
      const acc_t* X = rows_of<scalar_t, acc_t>(x, 0, T, d.n_in(), xb.get(), ldx);
      const int64_t grain = std::max<int64_t>(1, 16384 / d.widest());  // rows per job of the row-wise steps
      at::parallel_for(0, d.k, 1, [&](int64_t b, int64_t e) { stage1(d, W1, T, X, ldx, Y.get(), nm, b, e); });
      at::parallel_for(0, T, grain, [&](int64_t b, int64_t e) {
        transpose_rows(e - b, d.r, d.l, Y.get() + b * nm, nm, Z.get() + b * nm, nm);
      });
      at::parallel_for(0, d.l, 1, [&](int64_t b, int64_t e) { stage2(d, W2, T, Z.get(), nm, O.get(), no, b, e); });
      at::parallel_for(0, T, grain, [&](int64_t b, int64_t e) { finish(b, e - b, O.get() + b * no, Y.get() + b * no); });  // Y: scratch
      return;
    }
    const int64_t tm = tile_rows(d, sizeof(acc_t), FWD_TILE_BYTES, MAX_FWD_ROWS);
    at::parallel_for(0, cdiv(T, tm), 1, [&](int64_t begin, int64_t end) {
      acc_t* xb = scratch<acc_t>(S_X, tm * d.n_in());
      acc_t* A = scratch<acc_t>(S_A, tm * d.widest());
      acc_t* B = scratch<acc_t>(S_B, tm * d.widest());
      for (int64_t tile = begin; tile < end; ++tile) {  // the intermediate of a row tile never leaves cache
        const int64_t t0 = tile * tm, m = std::min(tm, T - t0);
        int64_t ldx;
        const acc_t* X = rows_of<scalar_t, acc_t>(x, t0, m, d.n_in(), xb, ldx);
        stage1(d, W1, m, X, ldx, A, nm, 0, d.k);  // Y in A
        transpose_rows(m, d.r, d.l, A, nm, B, nm);  // Z = P1 Y in B
        stage2(d, W2, m, B, nm, A, no, 0, d.l);   // O in A
        finish(t0, m, A, B);
      }
    });
  });
  return out;
}

// ------------------------------------------------------------------------------------------ Monarch backward
//
// For output gradients g of out = act(P2 BD(w2) P1 BD(w1) x + bias), per set of rows:
//   Z   = P1 BD(w1) x                   (recomputed; when dw or the activation needs it)
//   g'  = g · act'(P2 BD(w2) Z + bias)  (activation only: one stage-2 GEMM gives the pre-activation)
//   db  = Σ_t g'
//   Gb  = P2ᵀ g'                        (block order of stage 2)
//   dw2[ll] += Gb_llᵀ Z_ll,   dZ_ll = Gb_ll w2[ll],   dY = P1ᵀ dZ
//   dw1[kk] += dY_kkᵀ x_kk,   dx_kk = dY_kk w1[kk]

template <typename scalar_t, typename acc_t>
struct Backward {
  const Dims& d;
  const at::Tensor* x;  // null when only dx is wanted
  const at::Tensor& g;
  const BlockWeights<acc_t>&W1, &W2;
  const acc_t* bias;  // natural order, n_out() long; null without bias
  int64_t act, n_in, n_out;
  scalar_t* dx;  // null when not wanted
  bool want_dw, want_db;

  bool dx_direct() const { return std::is_same_v<scalar_t, acc_t> && n_in == d.n_in(); }

  // Gb (m, n_out()) = P2ᵀ g' for rows [t0, t0+m); db (+)= Σ g' when wanted. Z (block-order stage-2 input) is
  // needed with an activation. Buffers: gbuf (m, n_out()) for a converted g, P (m, n_out()) scratch.
  void output_grad(int64_t t0, int64_t m, const acc_t* Z, acc_t* Gb, acc_t* gbuf, acc_t* P, acc_t* db,
                   bool first) const {
    const int64_t no = d.n_out();
    int64_t ldg;
    const acc_t* G = rows_of<scalar_t, acc_t>(g, t0, m, no, gbuf, ldg);
    if (act != NONE) {  // pre-activation from one stage-2 GEMM, g' = g · act'(pre) in natural order
      stage2(d, W2, m, Z, d.n_mid(), Gb, no, 0, d.l);
      transpose_rows(m, d.l, d.s, Gb, no, P, no);
      if (G != gbuf) {
        for (int64_t t = 0; t < m; ++t) std::copy(G + t * ldg, G + t * ldg + no, gbuf + t * no);
        G = gbuf, ldg = no;
      }
      act_backward_rows<scalar_t, acc_t>(gbuf, no, P, no, m, n_out, bias, act);  // columns past n_out stay 0
    }
    if (want_db)
      for (int64_t t = 0; t < m; ++t) {
        const acc_t* row = G + t * ldg;
        if (first && t == 0)
          std::copy(row, row + n_out, db);
        else
          for (int64_t j = 0; j < n_out; ++j) db[j] += row[j];
      }
    transpose_rows(m, d.s, d.l, G, ldg, Gb, no);
  }

  // dw2[ll] (+)= Gb_llᵀ Z_ll and dZ_ll = Gb_ll w2[ll] for blocks [b, e).
  void stage2_adjoint(int64_t m, const acc_t* Gb, const acc_t* Z, acc_t* dZ, acc_t* dw2, bool first, int64_t b,
                      int64_t e) const {
    const int64_t no = d.n_out(), nm = d.n_mid();
    for (int64_t ll = b; ll < e; ++ll) {
      if (want_dw) gemm<acc_t>(d.s, d.r, m, Gb + ll * d.s, no, true, Z + ll * d.r, nm, dw2 + ll * d.s * d.r, d.r, !first);
      gemm<acc_t>(m, d.r, d.s, Gb + ll * d.s, no, false, W2.block(ll), d.r, dZ + ll * d.r, nm, false);
    }
  }

  // dw1[kk] (+)= dY_kkᵀ X_kk and dx rows [t0, t0+m) of block kk = dY_kk w1[kk] for blocks [b, e). dxb is an
  // (m, n_in()) buffer for dx of another dtype or width.
  void stage1_adjoint(int64_t t0, int64_t m, const acc_t* dY, const acc_t* X, int64_t ldx, acc_t* dw1, acc_t* dxb,
                      bool first, int64_t b, int64_t e) const {
    const int64_t nm = d.n_mid();
    for (int64_t kk = b; kk < e; ++kk) {
      if (want_dw) gemm<acc_t>(d.q, d.p, m, dY + kk * d.q, nm, true, X + kk * d.p, ldx, dw1 + kk * d.q * d.p, d.p, !first);
      if (!dx) continue;
      if (dx_direct()) {
        gemm<acc_t>(m, d.p, d.q, dY + kk * d.q, nm, false, W1.block(kk), d.p,
                    reinterpret_cast<acc_t*>(dx) + t0 * n_in + kk * d.p, n_in, false);
      } else {
        gemm<acc_t>(m, d.p, d.q, dY + kk * d.q, nm, false, W1.block(kk), d.p, dxb + kk * d.p, d.n_in(), false);
        const int64_t lim = std::min(d.p, n_in - kk * d.p);
        if (lim > 0) store_rows(dxb + kk * d.p, d.n_in(), m, lim, dx + t0 * n_in + kk * d.p, n_in);
      }
    }
  }

  bool needs_x() const { return want_dw || act != NONE; }

  // All steps for rows [t0, t0+m) on this thread; dw1/dw2/db accumulators are overwritten when `first`.
  void tile(int64_t t0, int64_t m, acc_t* dw1, acc_t* dw2, acc_t* db, bool first) const {
    const int64_t nm = d.n_mid(), no = d.n_out(), w = d.widest();
    acc_t* A = scratch<acc_t>(S_A, m * w);
    acc_t* Z = scratch<acc_t>(S_B, m * nm);
    acc_t* Gb = scratch<acc_t>(S_C, m * no);
    acc_t* P = scratch<acc_t>(S_D, m * w);
    const acc_t* X = nullptr;
    int64_t ldx = 0;
    if (needs_x()) {
      X = rows_of<scalar_t, acc_t>(*x, t0, m, d.n_in(), scratch<acc_t>(S_X, m * d.n_in()), ldx);
      stage1(d, W1, m, X, ldx, A, nm, 0, d.k);
      transpose_rows(m, d.r, d.l, A, nm, Z, nm);
    }
    output_grad(t0, m, Z, Gb, scratch<acc_t>(S_G, m * no), P, db, first);
    stage2_adjoint(m, Gb, Z, A, dw2, first, 0, d.l);  // dZ in A
    transpose_rows(m, d.l, d.r, A, nm, Z, nm);          // dY = P1ᵀ dZ in Z
    stage1_adjoint(t0, m, Z, X, ldx, dw1, P, first, 0, d.k);
  }

  // Block-parallel schedule over all T rows (few tokens): every block of dw1/dw2 belongs to one job.
  void blocks(int64_t T, acc_t* dw1, acc_t* dw2, acc_t* db) const {
    const int64_t nm = d.n_mid(), no = d.n_out();
    auto buf = [&](int64_t n) { return std::unique_ptr<acc_t[]>(new acc_t[std::max<int64_t>(T * n, 1)]); };
    auto A = buf(d.widest()), Z = buf(nm), Gb = buf(no), P = buf(d.widest()), gbuf = buf(no);
    auto xb = needs_x() && !direct_rows<scalar_t, acc_t>(*x, d.n_in()) ? buf(d.n_in()) : nullptr;
    const int64_t grain = std::max<int64_t>(1, 16384 / d.widest());
    const acc_t* X = nullptr;
    int64_t ldx = 0;
    if (needs_x()) {
      X = rows_of<scalar_t, acc_t>(*x, 0, T, d.n_in(), xb.get(), ldx);
      at::parallel_for(0, d.k, 1, [&](int64_t b, int64_t e) { stage1(d, W1, T, X, ldx, A.get(), nm, b, e); });
      at::parallel_for(0, T, grain, [&](int64_t b, int64_t e) {
        transpose_rows(e - b, d.r, d.l, A.get() + b * nm, nm, Z.get() + b * nm, nm);
      });
    }
    output_grad(0, T, Z.get(), Gb.get(), gbuf.get(), P.get(), db, true);
    at::parallel_for(0, d.l, 1, [&](int64_t b, int64_t e) { stage2_adjoint(T, Gb.get(), Z.get(), A.get(), dw2, true, b, e); });
    at::parallel_for(0, T, grain, [&](int64_t b, int64_t e) {
      transpose_rows(e - b, d.l, d.r, A.get() + b * nm, nm, Z.get() + b * nm, nm);
    });
    at::parallel_for(0, d.k, 1, [&](int64_t b, int64_t e) { stage1_adjoint(0, T, Z.get(), X, ldx, dw1, P.get(), true, b, e); });
  }
};

// Sum per-chunk accumulators (in chunk order) into a tensor of the output dtype; parts[0] may be the output
// itself when it has the accumulation type.
template <typename scalar_t, typename acc_t>
void reduce_into(const std::vector<acc_t*>& parts, at::Tensor& out) {
  scalar_t* o = out.data_ptr<scalar_t>();
  const int64_t n = out.numel();
  const bool in_place = std::is_same_v<scalar_t, acc_t> && parts[0] == reinterpret_cast<acc_t*>(o);
  if (in_place && parts.size() == 1) return;
  at::parallel_for(0, n, 4096, [&](int64_t b, int64_t e) {
    for (int64_t i = b; i < e; ++i) {
      acc_t sum = parts[0][i];
      for (size_t c = 1; c < parts.size(); ++c) sum += parts[c][i];
      o[i] = static_cast<scalar_t>(sum);
    }
  });
}

// The backward of ⟨g, act(M x + bias)⟩: fills whichever of dx (T, n_in), dw1, dw2, db (n_out) are defined.
void backward_into(const at::Tensor* x, const at::Tensor& g, const at::Tensor& w1, const at::Tensor& w2,
                   const c10::optional<at::Tensor>& bias, int64_t act, at::Tensor* dx, at::Tensor* dw1,
                   at::Tensor* dw2, at::Tensor* db) {
  const Dims d(w1, w2);
  const int64_t T = g.size(0), n_out = g.size(1);
  const bool want_dw = dw1 != nullptr;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, g.scalar_type(), "monarch_bwd_cpu", [&] {
    using acc_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
    constexpr bool same = std::is_same_v<scalar_t, acc_t>;
    const auto bvec = bias_vec<acc_t>(bias, d.n_out());
    const BlockWeights<acc_t> W1(w1, T, want_dw || act != NONE), W2(w2, T, act != NONE);
    const Backward<scalar_t, acc_t> B{d, x, g, W1, W2, has_bias(bias) ? bvec.data() : nullptr, act,
                                      dx ? dx->size(1) : 0, n_out, dx ? dx->data_ptr<scalar_t>() : nullptr,
                                      want_dw, db != nullptr};
    // accumulator of chunk c for an output (weight-sized): the output itself for chunk 0 when it has the
    // accumulation type, else a buffer of its own
    const int64_t nw1 = w1.numel(), nw2 = w2.numel();
    std::vector<std::unique_ptr<acc_t[]>> owned;
    auto accumulator = [&](at::Tensor* t, int64_t n, int64_t c) -> acc_t* {
      if (!t) return nullptr;
      if (same && c == 0) return reinterpret_cast<acc_t*>(t->data_ptr<scalar_t>());
      owned.emplace_back(new acc_t[std::max<int64_t>(n, 1)]);
      return owned.back().get();
    };
    if (few_tiles(T)) {
      std::vector<acc_t*> a1{accumulator(dw1, nw1, 0)}, a2{accumulator(dw2, nw2, 0)}, ab{accumulator(db, n_out, 0)};
      B.blocks(T, a1[0], a2[0], ab[0]);
      if (dw1) reduce_into<scalar_t, acc_t>(a1, *dw1), reduce_into<scalar_t, acc_t>(a2, *dw2);
      if (db) reduce_into<scalar_t, acc_t>(ab, *db);
      return;
    }
    // row tiles as tall as the thread count allows (within the buffer budget): every accumulation into a
    // weight-sized dw block then carries K = tile rows of work
    const int64_t nthreads = at::get_num_threads();
    const int64_t tm = std::min(tile_rows(d, sizeof(acc_t), BWD_TILE_BYTES, MAX_BWD_ROWS),
                                std::max<int64_t>(MIN_TILE_ROWS, cdiv(T, nthreads)));
    const int64_t ntiles = cdiv(T, tm), nch = (want_dw || db) ? std::min<int64_t>(nthreads, ntiles) : ntiles;
    std::vector<acc_t*> a1, a2, ab;
    for (int64_t c = 0; c < nch; ++c) {
      a1.push_back(accumulator(dw1, nw1, c));
      a2.push_back(accumulator(dw2, nw2, c));
      ab.push_back(accumulator(db, n_out, c));
    }
    at::parallel_for(0, nch, 1, [&](int64_t cb, int64_t ce) {
      for (int64_t ch = cb; ch < ce; ++ch)
        for (int64_t tile = ch * ntiles / nch; tile < (ch + 1) * ntiles / nch; ++tile) {
          const int64_t t0 = tile * tm;
          B.tile(t0, std::min(tm, T - t0), a1[ch], a2[ch], ab[ch], tile == ch * ntiles / nch);
        }
    });
    if (dw1) reduce_into<scalar_t, acc_t>(a1, *dw1), reduce_into<scalar_t, acc_t>(a2, *dw2);
    if (db) reduce_into<scalar_t, acc_t>(ab, *db);
  });
}

at::Tensor monarch_bwd_input(const at::Tensor& g, const at::Tensor& w1, const at::Tensor& w2, int64_t n_in) {
  TORCH_CHECK(g.device().is_cpu() && g.dim() == 2, "monarch_bwd_input (cpu): g must be a 2-D CPU tensor");
  auto dx = at::empty({g.size(0), n_in}, g.options());
  if (g.size(0) > 0) backward_into(nullptr, g, w1, w2, c10::nullopt, NONE, &dx, nullptr, nullptr, nullptr);
  return dx;
}

std::tuple<at::Tensor, at::Tensor> monarch_bwd_weight(const at::Tensor& x, const at::Tensor& g, const at::Tensor& w1,
                                                      const at::Tensor& w2) {
  TORCH_CHECK(x.device().is_cpu() && x.dim() == 2, "monarch_bwd_weight (cpu): x must be a 2-D CPU tensor");
  if (x.size(0) == 0) return {at::zeros(w1.sizes(), w1.options()), at::zeros(w2.sizes(), w2.options())};
  auto dw1 = at::empty(w1.sizes(), w1.options());
  auto dw2 = at::empty(w2.sizes(), w2.options());
  backward_into(&x, g, w1, w2, c10::nullopt, NONE, nullptr, &dw1, &dw2, nullptr);
  return {dw1, dw2};
}

// (dx, dw1, dw2) of ⟨g, M x⟩ in one pass: the stage-1 intermediate recomputed per row tile, dy shared by dx and dw1.
std::tuple<at::Tensor, at::Tensor, at::Tensor> monarch_bwd(const at::Tensor& x, const at::Tensor& g,
                                                           const at::Tensor& w1, const at::Tensor& w2, int64_t n_in) {
  TORCH_CHECK(x.device().is_cpu() && x.dim() == 2, "monarch_bwd (cpu): x must be a 2-D CPU tensor");
  const int64_t T = x.size(0);
  auto dx = at::empty({T, n_in}, g.options());
  if (T == 0) return {dx, at::zeros(w1.sizes(), w1.options()), at::zeros(w2.sizes(), w2.options())};
  auto dw1 = at::empty(w1.sizes(), w1.options());
  auto dw2 = at::empty(w2.sizes(), w2.options());
  backward_into(&x, g, w1, w2, c10::nullopt, NONE, &dx, &dw1, &dw2, nullptr);
  return {dx, dw1, dw2};
}

// (dx, dw1, dw2, db) of ⟨g, act(M x + bias)⟩ in one pass: per row tile the intermediate once and the
// pre-activation from one stage-2 GEMM (no separate forward); db is Σ_t g·act'(pre), also without a bias.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> monarch_bwd_act(
    const at::Tensor& x, const at::Tensor& g, const at::Tensor& w1, const at::Tensor& w2,
    const c10::optional<at::Tensor>& bias, int64_t n_in, int64_t act) {
  TORCH_CHECK(x.device().is_cpu() && x.dim() == 2, "monarch_bwd_act (cpu): x must be a 2-D CPU tensor");
  const int64_t T = x.size(0);
  auto dx = at::empty({T, n_in}, g.options());
  if (T == 0)
    return {dx, at::zeros(w1.sizes(), w1.options()), at::zeros(w2.sizes(), w2.options()),
            at::zeros({g.size(1)}, g.options())};
  auto dw1 = at::empty(w1.sizes(), w1.options());
  auto dw2 = at::empty(w2.sizes(), w2.options());
  auto db = at::empty({g.size(1)}, g.options());
  backward_into(&x, g, w1, w2, bias, act, &dx, &dw1, &dw2, &db);
  return {dx, dw1, dw2, db};
}

// ------------------------------------------------------------------------------------------ block-diagonal

at::Tensor blockdiag_fwd(const at::Tensor& x, const at::Tensor& w, const c10::optional<at::Tensor>& bias,
                         int64_t n_out, int64_t act) {
  TORCH_CHECK(x.device().is_cpu() && x.dim() == 2, "blockdiag_fwd (cpu): x must be a 2-D CPU tensor");
  const int64_t k = w.size(0), q = w.size(1), p = w.size(2), T = x.size(0);
  auto out = at::empty({T, n_out}, x.options());
  if (T == 0) return out;
  const int64_t kb = std::min(k, cdiv(n_out, q));  // blocks with at least one kept output
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "blockdiag_fwd_cpu", [&] {
    using acc_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
    const auto bvec = bias_vec<acc_t>(bias, k * q);
    const acc_t* bp = has_bias(bias) ? bvec.data() : nullptr;
    const BlockWeights<acc_t> W(w, T, true);
    scalar_t* op = out.data_ptr<scalar_t>();
    const bool out_direct = std::is_same_v<scalar_t, acc_t> && n_out == k * q;
    const int64_t TM = 32, ntiles = cdiv(T, TM);
    at::parallel_for(0, ntiles * kb, 1, [&](int64_t begin, int64_t end) {  // (row tile, block) pairs are independent
      acc_t* xb = scratch<acc_t>(S_X, TM * k * p);
      acc_t* yb = scratch<acc_t>(S_A, TM * q);
      for (int64_t job = begin; job < end; ++job) {
        const int64_t t0 = (job / kb) * TM, kk = job % kb, m = std::min(TM, T - t0);
        int64_t ldx;
        const acc_t* X = rows_of<scalar_t, acc_t>(x, t0, m, k * p, xb, ldx);
        const int64_t lim = std::min(q, n_out - kk * q);
        if (out_direct) {
          acc_t* dst = reinterpret_cast<acc_t*>(op) + t0 * n_out + kk * q;
          W.apply(m, X + kk * p, ldx, kk, dst, n_out);
          bias_act_rows<scalar_t, acc_t>(dst, n_out, m, lim, bp ? bp + kk * q : nullptr, act);
        } else {
          W.apply(m, X + kk * p, ldx, kk, yb, q);
          bias_act_rows<scalar_t, acc_t>(yb, q, m, lim, bp ? bp + kk * q : nullptr, act);
          store_rows(yb, q, m, lim, op + t0 * n_out + kk * q, n_out);
        }
      }
    });
  });
  return out;
}

at::Tensor blockdiag_wgrad(const at::Tensor& x, const at::Tensor& g, int64_t k, int64_t q, int64_t p) {
  TORCH_CHECK(x.device().is_cpu() && x.dim() == 2, "blockdiag_wgrad (cpu): x must be a 2-D CPU tensor");
  const int64_t T = x.size(0);
  if (T == 0) return at::zeros({k, q, p}, x.options());
  auto dw = at::empty({k, q, p}, x.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "blockdiag_wgrad_cpu", [&] {
    using acc_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
    // parallel over (block, token chunk); each job accumulates dw[kk] = Σ_t g_kkᵀ x_kk over its chunk
    const int64_t TM = 256, ntiles = cdiv(T, TM);
    const int64_t nch = std::max<int64_t>(1, std::min(ntiles, cdiv(at::get_num_threads(), k)));
    std::vector<std::unique_ptr<acc_t[]>> owned;
    std::vector<acc_t*> parts;
    for (int64_t c = 0; c < nch; ++c) {
      if (std::is_same_v<scalar_t, acc_t> && c == 0) {
        parts.push_back(reinterpret_cast<acc_t*>(dw.data_ptr<scalar_t>()));
      } else {
        owned.emplace_back(new acc_t[k * q * p]);
        parts.push_back(owned.back().get());
      }
    }
    at::parallel_for(0, k * nch, 1, [&](int64_t begin, int64_t end) {
      acc_t* xb = scratch<acc_t>(S_X, TM * k * p);
      acc_t* gb = scratch<acc_t>(S_G, TM * k * q);
      for (int64_t job = begin; job < end; ++job) {
        const int64_t kk = job / nch, ch = job % nch;
        for (int64_t tile = ch * ntiles / nch; tile < (ch + 1) * ntiles / nch; ++tile) {
          const int64_t t0 = tile * TM, m = std::min(TM, T - t0);
          int64_t ldx, ldg;
          const acc_t* X = rows_of<scalar_t, acc_t>(x, t0, m, k * p, xb, ldx);
          const acc_t* G = rows_of<scalar_t, acc_t>(g, t0, m, k * q, gb, ldg);
          gemm<acc_t>(q, p, m, G + kk * q, ldg, true, X + kk * p, ldx, parts[ch] + kk * q * p, p,
                      tile != ch * ntiles / nch);
        }
      }
    });
    reduce_into<scalar_t, acc_t>(parts, dw);
  });
  return dw;
}

}  // namespace monarch_cpu

TORCH_LIBRARY_IMPL(monarch_kernels_ext, CPU, m) {
  m.impl("blockdiag_fwd", &monarch_cpu::blockdiag_fwd);
  m.impl("blockdiag_wgrad", &monarch_cpu::blockdiag_wgrad);
  m.impl("monarch_fwd", &monarch_cpu::monarch_fwd);
  m.impl("monarch_bwd_input", &monarch_cpu::monarch_bwd_input);
  m.impl("monarch_bwd_weight", &monarch_cpu::monarch_bwd_weight);
  m.impl("monarch_bwd", &monarch_cpu::monarch_bwd);
  m.impl("monarch_bwd_act", &monarch_cpu::monarch_bwd_act);
}
