// CPU kernels for block-diagonal and Monarch products (the `cpu` backend).
//
// Conventions (fly layout): x (T, n_in) with n_in <= k*p (missing columns read as zero), w1 (k, q, p),
// w2 (l, s, r) with l*r == k*q, out (T, n_out) with n_out <= l*s and out[t, ss*l + ll].
//
// Design: every product is a sequence of small GEMMs C[M,N] += A[M,K] * B[K,N] on cache-resident tiles:
//  * weights are packed once per call into accumulation precision (float for fp32/bf16/fp16, double for
//    fp64), as (K, N) row-major blocks; with few tokens they are used in place instead by a dot-product
//    kernel (C += A Bᵀ), which streams them once without the transposed copy (BlockWeights);
//  * the token dimension is cut into row tiles of TILE_M rows that are processed independently in
//    parallel (at::parallel_for); within a tile the Monarch intermediate stays in a thread-local buffer
//    (cache), so x is read once and out written once (the CPU analogue of the fused GPU kernel);
//  * the permutations P1, P2 are folded into the scatter from a GEMM result tile into the next stage's
//    input tile;
//  * the micro-kernel keeps an MR x NR accumulator block in registers and runs over the contiguous N
//    dimension: for float on hosts with AVX-512 (built with -march=native) an intrinsics kernel with the A
//    panel packed K-major and masked edges (~1.8x the portable kernel); otherwise a portable kernel the
//    compiler vectorises (-O3);
//  * weight gradients reduce over tokens into per-chunk accumulators summed at the end (deterministic).
#include <torch/extension.h>

#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <type_traits>
#include <vector>

#if defined(__AVX512F__)
#include <immintrin.h>
#endif

namespace monarch_cpu {

constexpr int64_t TILE_M = 32;   // token rows per tile
constexpr int64_t TILE_W = 256;  // most token rows per tile of the weight-gradient schedule
constexpr int64_t NC = 256;     // N-blocking of the packed B operand (keeps a K x NC panel in L2)

enum Act : int64_t { NONE = 0, RELU = 1, GELU = 2, GELU_TANH = 3 };

template <typename T>
inline T activate(T v, int64_t act) {
  switch (act) {
    case RELU:
      return v < T(0) ? T(0) : v;  // NaN stays NaN, as in torch.relu
    case GELU:
      return T(0.5) * v * (T(1) + std::erf(v * T(0.70710678118654752)));
    case GELU_TANH: {
      const T inner = T(0.79788456080286536) * (v + T(0.044715) * v * v * v);
      return T(0.5) * v * (T(1) + std::tanh(inner));
    }
    default:
      return v;
  }
}

// Calls f(std::integral_constant<int64_t, act>) so that `activate(v, decltype(tag)::value)` in f's loops is
// resolved at compile time instead of switching per element.
template <typename F>
inline void with_activation(int64_t act, F&& f) {
  switch (act) {
    case RELU: f(std::integral_constant<int64_t, RELU>{}); break;
    case GELU: f(std::integral_constant<int64_t, GELU>{}); break;
    case GELU_TANH: f(std::integral_constant<int64_t, GELU_TANH>{}); break;
    default: f(std::integral_constant<int64_t, NONE>{});
  }
}

// ------------------------------------------------------------------------------------------ micro-kernel

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

#if defined(__AVX512F__)
// C[mr, nr] += Ap[K, MR]^T-panel * B[K, nr] for mr <= MR rows and nr <= 32 columns (two 16-float vectors,
// masked at the edges). Ap holds MR consecutive rows of A packed K-major (Ap[kk*MR + r]), zero past mr.
template <int MR>
inline void micro_avx512(int64_t K, const float* Ap, const float* B, int64_t ldb, float* C, int64_t ldc, int mr, int nr) {
  const __mmask16 m0 = nr >= 16 ? __mmask16(0xFFFF) : __mmask16((1u << nr) - 1);
  const __mmask16 m1 = nr >= 32 ? __mmask16(0xFFFF) : nr > 16 ? __mmask16((1u << (nr - 16)) - 1) : __mmask16(0);
  __m512 c0[MR], c1[MR];
#pragma GCC unroll 16
  for (int r = 0; r < MR; ++r) {
    c0[r] = r < mr ? _mm512_maskz_loadu_ps(m0, C + r * ldc) : _mm512_setzero_ps();
    c1[r] = r < mr ? _mm512_maskz_loadu_ps(m1, C + r * ldc + 16) : _mm512_setzero_ps();
  }
  for (int64_t kk = 0; kk < K; ++kk) {
    const __m512 b0 = _mm512_maskz_loadu_ps(m0, B + kk * ldb);
    const __m512 b1 = _mm512_maskz_loadu_ps(m1, B + kk * ldb + 16);
    const float* a = Ap + kk * MR;
#pragma GCC unroll 16
    for (int r = 0; r < MR; ++r) {
      const __m512 av = _mm512_set1_ps(a[r]);
      c0[r] = _mm512_fmadd_ps(av, b0, c0[r]);
      c1[r] = _mm512_fmadd_ps(av, b1, c1[r]);
    }
  }
#pragma GCC unroll 16
  for (int r = 0; r < MR; ++r) {
    if (r < mr) {
      _mm512_mask_storeu_ps(C + r * ldc, m0, c0[r]);
      _mm512_mask_storeu_ps(C + r * ldc + 16, m1, c1[r]);
    }
  }
}

// MR = 8 rows per panel (16 accumulators); 4 when M is small, where the zero rows of a taller panel would
// cost more than the extra passes over B.
template <int MR>
void gemm_acc_avx512(int64_t M, int64_t N, int64_t K, const float* A, int64_t lda, const float* B, int64_t ldb,
                     float* C, int64_t ldc) {
  thread_local std::vector<float> panel;
  panel.resize(K * MR);
  float* Ap = panel.data();
  for (int64_t n0 = 0; n0 < N; n0 += NC) {
    const int64_t nc = std::min(NC, N - n0);
    for (int64_t i = 0; i < M; i += MR) {
      const int mr = int(std::min<int64_t>(MR, M - i));
      for (int64_t kk = 0; kk < K; ++kk)
        for (int r = 0; r < MR; ++r) Ap[kk * MR + r] = r < mr ? A[(i + r) * lda + kk] : 0.f;
      for (int64_t j = 0; j < nc; j += 32)
        micro_avx512<MR>(K, Ap, B + n0 + j, ldb, C + i * ldc + n0 + j, ldc, mr, int(std::min<int64_t>(32, nc - j)));
    }
  }
}
#endif

// C[M,N] += A[M,K] * B[K,N], row-major with leading dimensions.
template <typename T>
void gemm_acc(int64_t M, int64_t N, int64_t K, const T* A, int64_t lda, const T* B, int64_t ldb, T* C, int64_t ldc) {
#if defined(__AVX512F__)
  if constexpr (std::is_same_v<T, float>) {
    if (M >= 8)
      gemm_acc_avx512<8>(M, N, K, A, lda, B, ldb, C, ldc);
    else
      gemm_acc_avx512<4>(M, N, K, A, lda, B, ldb, C, ldc);
    return;
  }
#endif
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

// C[mi, nj] += A[mi, K] B[nj, K]^T for mi <= MI rows of A and nj <= NJ rows of B (MI * NJ = 16 dot products,
// vectorised over the contiguous K, masked tail), reduced together by hsum16.
template <int MI, int NJ>
inline void dot_block_avx512(int64_t K, const float* A, int64_t lda, const float* B, int64_t ldb, float* C, int64_t ldc,
                             int mi, int nj) {
  static_assert(MI * NJ == 16, "16 accumulators");
  __m512 acc[16];
  for (int i = 0; i < 16; ++i) acc[i] = _mm512_setzero_ps();
  for (int64_t k = 0; k < K; k += 16) {
    const __mmask16 mk = K - k >= 16 ? __mmask16(0xFFFF) : __mmask16((1u << (K - k)) - 1);
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
    for (int j = 0; j < nj; ++j) C[i * ldc + j] += sums[i * NJ + j];
}
#endif

// C[M,N] += A[M,K] * B[N,K]^T, both operands row-major with contiguous K (dot products). Used with the weights
// in place as B when there are few tokens: no transposed copy of the weights is made.
template <typename T>
void gemm_nt_acc(int64_t M, int64_t N, int64_t K, const T* A, int64_t lda, const T* B, int64_t ldb, T* C, int64_t ldc) {
#if defined(__AVX512F__)
  if constexpr (std::is_same_v<T, float>) {
    for (int64_t j = 0; j < N; j += 16) {
      const int nj = int(std::min<int64_t>(16, N - j));
      int64_t i = 0;
      for (; i + 4 <= M; i += 4)  // 4 rows of A x 4 rows of B, four times: each B row is loaded once per 4 A rows
        for (int64_t j4 = j; j4 < j + nj; j4 += 4)
          dot_block_avx512<4, 4>(K, A + i * lda, lda, B + j4 * ldb, ldb, C + i * ldc + j4, ldc, 4,
                                 int(std::min<int64_t>(4, j + nj - j4)));
      for (; i < M; ++i)  // remaining rows: 1 x 16
        dot_block_avx512<1, 16>(K, A + i * lda, lda, B + j * ldb, ldb, C + i * ldc + j, ldc, 1, nj);
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
      C[i * ldc + j] += sum;
    }
}

// ------------------------------------------------------------------------------------------ helpers

// Pack w (nb, rows, cols) into a dense tensor of accumulation precision, transposed to (nb, cols, rows) or
// as is (a vectorised ATen copy). Not cached across calls: frameworks such as FSDP rewrite parameter storage
// without bumping version counters, so no key short of the data itself proves a packed copy current.
at::Tensor pack(const at::Tensor& w, at::ScalarType acc, bool transpose) {
  return (transpose ? w.transpose(1, 2) : w).to(acc).contiguous();
}

template <typename acc_t>
constexpr at::ScalarType acc_type() {
  return std::is_same_v<acc_t, double> ? at::kDouble : at::kFloat;
}

// Fewest tokens for which the weights are packed transposed for the register-blocked kernel (below: used in
// place by the dot-product kernel; the copy would cost more than it saves).
constexpr int64_t PACK_MIN_TOKENS = 256;

// Weights w (nb, rows, cols) applied per block as C[M, rows] += A[M, cols] · w[b]ᵀ: packed transposed to
// (nb, cols, rows) for gemm_acc, or, with few tokens, kept as (nb, rows, cols) for gemm_nt_acc (no copy for
// fp32/fp64; converted to the accumulation type otherwise).
template <typename acc_t>
struct BlockWeights {
  at::Tensor packed;
  const acc_t* data;
  int64_t rows, cols;
  bool transposed;
  BlockWeights(const at::Tensor& w, int64_t tokens)
      : packed(pack(w, acc_type<acc_t>(), tokens >= PACK_MIN_TOKENS)),
        data(packed.data_ptr<acc_t>()),
        rows(w.size(1)),
        cols(w.size(2)),
        transposed(tokens >= PACK_MIN_TOKENS) {}
  void apply(int64_t M, const acc_t* A, int64_t lda, int64_t b, acc_t* C, int64_t ldc) const {
    const acc_t* w = data + b * rows * cols;
    if (transposed)
      gemm_acc<acc_t>(M, rows, cols, A, lda, w, rows, C, ldc);
    else
      gemm_nt_acc<acc_t>(M, rows, cols, A, lda, w, cols, C, ldc);
  }
};

// Rows [t0, t0+m), columns [c0, c0+width) of a strided 2-D tensor into a dense (m, width) tile;
// columns >= n read as 0 (implicit zero padding of ragged inputs).
template <typename scalar_t, typename acc_t>
void load_tile(const scalar_t* src, int64_t st, int64_t sf, int64_t n, int64_t t0, int64_t m, int64_t c0,
               int64_t width, acc_t* dst) {
  const int64_t lim = std::max<int64_t>(0, std::min(width, n - c0));
  for (int64_t t = 0; t < m; ++t) {
    const scalar_t* row = src + (t0 + t) * st + c0 * sf;
    acc_t* d = dst + t * width;
    for (int64_t f = 0; f < lim; ++f) d[f] = static_cast<acc_t>(row[f * sf]);
    for (int64_t f = lim; f < width; ++f) d[f] = acc_t(0);
  }
}

// Rows of g gathered in stage-2 block order for block ll: dst[t, ss] = g[t0 + t, ss*l + ll] (0 past n).
template <typename scalar_t, typename acc_t>
void load_out_grad_block(const scalar_t* g, int64_t st, int64_t sf, int64_t n, int64_t t0, int64_t m, int64_t l,
                         int64_t ll, int64_t s, acc_t* dst) {
  for (int64_t t = 0; t < m; ++t) {
    const scalar_t* row = g + (t0 + t) * st;
    for (int64_t ss = 0; ss < s; ++ss) {
      const int64_t c = ss * l + ll;
      dst[t * s + ss] = c < n ? static_cast<acc_t>(row[c * sf]) : acc_t(0);
    }
  }
}

struct Dims {
  int64_t k, q, p, l, s, r;
  // P1 as a table (no integer division in the scatter loops): flat stage-1 index f = kk*q + qq = rr*l + ll
  // -> position ll*r + rr in the stage-2 layout
  std::vector<int64_t> to_stage2;
  Dims(const at::Tensor& w1, const at::Tensor& w2)
      : k(w1.size(0)), q(w1.size(1)), p(w1.size(2)), l(w2.size(0)), s(w2.size(1)), r(w2.size(2)), to_stage2(k * q) {
    for (int64_t f = 0; l > 0 && f < k * q; ++f) to_stage2[f] = (f % l) * r + f / l;
  }
  int64_t n_mid() const { return k * q; }
};

inline int64_t cdiv(int64_t a, int64_t b) { return (a + b - 1) / b; }

// Few row tiles: parallelise over blocks instead (two phases with the intermediate in a full buffer).
inline bool few_tiles(int64_t T) { return cdiv(T, TILE_M) < at::get_num_threads(); }

// Stage 1 for rows [t0, t0+m) and block kk: z[t, to_stage2(kk*q + qq)] = Σ_pp w1[kk,qq,pp] x[t, kk*p + pp].
template <typename scalar_t, typename acc_t>
void stage1_block(const Dims& d, const at::Tensor& x, int64_t t0, int64_t m, int64_t kk, const BlockWeights<acc_t>& w1, acc_t* xa,
                  acc_t* ybuf, acc_t* z, int64_t z_row0) {
  load_tile(x.data_ptr<scalar_t>(), x.stride(0), x.stride(1), x.size(1), t0, m, kk * d.p, d.p, xa);
  std::fill(ybuf, ybuf + m * d.q, acc_t(0));
  w1.apply(m, xa, d.p, kk, ybuf, d.q);
  const int64_t* dst = d.to_stage2.data() + kk * d.q;
  for (int64_t t = 0; t < m; ++t) {
    acc_t* zr = z + (z_row0 + t) * d.n_mid();
    const acc_t* yr = ybuf + t * d.q;
    for (int64_t qq = 0; qq < d.q; ++qq) zr[dst[qq]] = yr[qq];
  }
}

// Adjoint of stage 2 for rows [t0, t0+m) and block ll: dy[t, rr*l + ll] = Σ_ss g[t, ss*l + ll] w2[ll, ss, rr].
// Also leaves the gathered output gradient of the block in `go` (m, s).
template <typename scalar_t, typename acc_t>
void stage2_adjoint_block(const Dims& d, const at::Tensor& g, int64_t t0, int64_t m, int64_t ll, const acc_t* w2p,
                          acc_t* go, acc_t* dzbuf, acc_t* dy, int64_t dy_row0) {
  load_out_grad_block(g.data_ptr<scalar_t>(), g.stride(0), g.stride(1), g.size(1), t0, m, d.l, ll, d.s, go);
  std::fill(dzbuf, dzbuf + m * d.r, acc_t(0));
  gemm_acc<acc_t>(m, d.r, d.s, go, d.s, w2p + ll * d.s * d.r, d.r, dzbuf, d.r);
  for (int64_t t = 0; t < m; ++t) {
    acc_t* dyr = dy + (dy_row0 + t) * d.n_mid() + ll;
    const acc_t* dzr = dzbuf + t * d.r;
    for (int64_t rr = 0; rr < d.r; ++rr) dyr[rr * d.l] = dzr[rr];
  }
}

// Adjoint of stage 1 for rows [t0, t0+m) and block kk, written into dx (T, n_in) of the output dtype:
// dx[t0 + t, kk*p + pp] = Σ_qq dy[t, kk*q + qq] w1[kk, qq, pp] (columns past n_in dropped); dy points at the
// tile's first row, w1p is w1 in accumulation precision, (k, q, p).
template <typename scalar_t, typename acc_t>
void stage1_adjoint_block(const Dims& d, const acc_t* dy, int64_t t0, int64_t m, int64_t kk, const acc_t* w1p,
                          acc_t* dxb, scalar_t* dxp, int64_t n_in) {
  std::fill(dxb, dxb + m * d.p, acc_t(0));
  gemm_acc<acc_t>(m, d.p, d.q, dy + kk * d.q, d.n_mid(), w1p + kk * d.q * d.p, d.p, dxb, d.p);
  const int64_t lim = std::min(d.p, n_in - kk * d.p);
  for (int64_t t = 0; t < m; ++t) {
    scalar_t* row = dxp + (t0 + t) * n_in + kk * d.p;
    for (int64_t pp = 0; pp < lim; ++pp) row[pp] = static_cast<scalar_t>(dxb[t * d.p + pp]);
  }
}

template <typename acc_t>
std::vector<acc_t> bias_vec(const c10::optional<at::Tensor>& bias, int64_t n) {
  std::vector<acc_t> out(n, acc_t(0));
  if (bias.has_value()) {
    const auto b = bias->to(acc_type<acc_t>()).contiguous();
    const acc_t* src = b.template data_ptr<acc_t>();
    std::copy(src, src + n, out.begin());
  }
  return out;
}

// ------------------------------------------------------------------------------------------ Monarch

at::Tensor monarch_fwd(const at::Tensor& x, const at::Tensor& w1, const at::Tensor& w2,
                       const c10::optional<at::Tensor>& bias, int64_t n_out, int64_t act) {
  TORCH_CHECK(x.device().is_cpu() && x.dim() == 2, "monarch_fwd (cpu): x must be a 2-D CPU tensor");
  const Dims d(w1, w2);
  TORCH_CHECK(d.l * d.r == d.k * d.q, "monarch_fwd (cpu): l*r must equal k*q");
  const int64_t T = x.size(0), n_mid = d.n_mid();
  auto out = at::empty({T, n_out}, x.options());
  if (T == 0) return out;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "monarch_fwd_cpu", [&] {
    using acc_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
    const auto bvec = bias_vec<acc_t>(bias, n_out);
    const BlockWeights<acc_t> W1(w1, T), W2(w2, T);
    scalar_t* op = out.data_ptr<scalar_t>();
    // stage 2 of block ll for rows [t0, t0+m) of z (row z_row0 = first), epilogue and P2 scatter into out
    auto stage2 = [&](const acc_t* z, int64_t z_row0, int64_t t0, int64_t m, int64_t ll, acc_t* obuf) {
      std::fill(obuf, obuf + m * d.s, acc_t(0));
      W2.apply(m, z + z_row0 * n_mid + ll * d.r, n_mid, ll, obuf, d.s);
      const int64_t s_lim = std::min(d.s, cdiv(n_out - ll, d.l));  // outputs ss*l + ll < n_out
      with_activation(act, [&](auto a) {
        for (int64_t t = 0; t < m; ++t) {
          scalar_t* orow = op + (t0 + t) * n_out + ll;
          const acc_t* ob = obuf + t * d.s;
          const acc_t* bv = bvec.data() + ll;
          for (int64_t ss = 0; ss < s_lim; ++ss)
            orow[ss * d.l] = static_cast<scalar_t>(activate<acc_t>(ob[ss] + bv[ss * d.l], decltype(a)::value));
        }
      });
    };
    if (few_tiles(T)) {
      std::vector<acc_t> z(T * n_mid);
      at::parallel_for(0, d.k, 1, [&](int64_t b, int64_t e) {
        std::vector<acc_t> xa(TILE_M * d.p), ybuf(TILE_M * d.q);
        for (int64_t kk = b; kk < e; ++kk)
          for (int64_t t0 = 0; t0 < T; t0 += TILE_M)
            stage1_block<scalar_t, acc_t>(d, x, t0, std::min(TILE_M, T - t0), kk, W1, xa.data(), ybuf.data(),
                                          z.data(), t0);
      });
      at::parallel_for(0, d.l, 1, [&](int64_t b, int64_t e) {
        std::vector<acc_t> obuf(TILE_M * d.s);
        for (int64_t ll = b; ll < e; ++ll)
          for (int64_t t0 = 0; t0 < T; t0 += TILE_M) stage2(z.data(), t0, t0, std::min(TILE_M, T - t0), ll, obuf.data());
      });
      return;
    }
    at::parallel_for(0, cdiv(T, TILE_M), 1, [&](int64_t begin, int64_t end) {
      std::vector<acc_t> xa(TILE_M * d.p), ybuf(TILE_M * d.q), z(TILE_M * n_mid), obuf(TILE_M * d.s);
      for (int64_t tile = begin; tile < end; ++tile) {  // the intermediate of a row tile never leaves cache
        const int64_t t0 = tile * TILE_M, m = std::min(TILE_M, T - t0);
        for (int64_t kk = 0; kk < d.k; ++kk)
          stage1_block<scalar_t, acc_t>(d, x, t0, m, kk, W1, xa.data(), ybuf.data(), z.data(), 0);
        for (int64_t ll = 0; ll < d.l; ++ll) stage2(z.data(), 0, t0, m, ll, obuf.data());
      }
    });
  });
  return out;
}

at::Tensor monarch_bwd_input(const at::Tensor& g, const at::Tensor& w1, const at::Tensor& w2, int64_t n_in) {
  TORCH_CHECK(g.device().is_cpu() && g.dim() == 2, "monarch_bwd_input (cpu): g must be a 2-D CPU tensor");
  const Dims d(w1, w2);
  const int64_t T = g.size(0), n_mid = d.n_mid();
  auto dx = at::empty({T, n_in}, g.options());
  if (T == 0) return dx;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, g.scalar_type(), "monarch_bwd_input_cpu", [&] {
    using acc_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
    const auto w2p_ = pack(w2, acc_type<acc_t>(), false);  // (l, s, r)
    const auto w1p_ = pack(w1, acc_type<acc_t>(), false);  // (k, q, p)
    const acc_t* w2p = w2p_.data_ptr<acc_t>();
    const acc_t* w1p = w1p_.data_ptr<acc_t>();
    scalar_t* dxp = dx.data_ptr<scalar_t>();
    if (few_tiles(T)) {
      std::vector<acc_t> dy(T * n_mid);
      at::parallel_for(0, d.l, 1, [&](int64_t b, int64_t e) {
        std::vector<acc_t> go(TILE_M * d.s), dz(TILE_M * d.r);
        for (int64_t ll = b; ll < e; ++ll)
          for (int64_t t0 = 0; t0 < T; t0 += TILE_M)
            stage2_adjoint_block<scalar_t, acc_t>(d, g, t0, std::min(TILE_M, T - t0), ll, w2p, go.data(), dz.data(),
                                                  dy.data(), t0);
      });
      at::parallel_for(0, d.k, 1, [&](int64_t b, int64_t e) {
        std::vector<acc_t> dxb(TILE_M * d.p);
        for (int64_t kk = b; kk < e; ++kk)
          for (int64_t t0 = 0; t0 < T; t0 += TILE_M)
            stage1_adjoint_block<scalar_t, acc_t>(d, dy.data() + t0 * n_mid, t0, std::min(TILE_M, T - t0), kk, w1p,
                                                  dxb.data(), dxp, n_in);
      });
      return;
    }
    at::parallel_for(0, cdiv(T, TILE_M), 1, [&](int64_t begin, int64_t end) {
      std::vector<acc_t> go(TILE_M * d.s), dz(TILE_M * d.r), dy(TILE_M * n_mid), dxb(TILE_M * d.p);
      for (int64_t tile = begin; tile < end; ++tile) {
        const int64_t t0 = tile * TILE_M, m = std::min(TILE_M, T - t0);
        for (int64_t ll = 0; ll < d.l; ++ll)
          stage2_adjoint_block<scalar_t, acc_t>(d, g, t0, m, ll, w2p, go.data(), dz.data(), dy.data(), 0);
        for (int64_t kk = 0; kk < d.k; ++kk)
          stage1_adjoint_block<scalar_t, acc_t>(d, dy.data(), t0, m, kk, w1p, dxb.data(), dxp, n_in);
      }
    });
  });
  return dx;
}

// Sum per-chunk accumulators into a tensor of the output dtype (added to what it holds if `accumulate`).
template <typename scalar_t, typename acc_t>
void reduce_into(const std::vector<std::vector<acc_t>>& parts, at::Tensor& out, bool accumulate) {
  if (parts.empty()) return;
  scalar_t* o = out.data_ptr<scalar_t>();
  const int64_t n = out.numel();
  at::parallel_for(0, n, 4096, [&](int64_t b, int64_t e) {
    for (int64_t i = b; i < e; ++i) {
      acc_t sum = accumulate ? static_cast<acc_t>(o[i]) : acc_t(0);
      for (const auto& part : parts) sum += part[i];
      o[i] = static_cast<scalar_t>(sum);
    }
  });
}

// Weight gradients (dw1, dw2) of ⟨g, M x⟩, and, when `dx` is given (row-tile schedule only), also the input
// gradient dx = Mᵀ g from the same per-tile dy: one pass instead of monarch_bwd_input + monarch_bwd_weight,
// which each recompute dy.
void bwd_weight_into(const at::Tensor& x, const at::Tensor& g, const at::Tensor& w1, const at::Tensor& w2,
                     at::Tensor& dw1, at::Tensor& dw2, at::Tensor* dx) {
  const Dims d(w1, w2);
  const int64_t T = x.size(0), n_mid = d.n_mid();
  if (T == 0) return;
  TORCH_CHECK(dx == nullptr || !few_tiles(T), "bwd_weight_into: dx only in the row-tile schedule");
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "monarch_bwd_weight_cpu", [&] {
    using acc_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
    const BlockWeights<acc_t> W1(w1, T);
    const auto w2p_ = pack(w2, acc_type<acc_t>(), false);
    const acc_t* w2p = w2p_.data_ptr<acc_t>();
    const auto w1p_ = dx ? pack(w1, acc_type<acc_t>(), false) : at::Tensor();  // (k, q, p) for dx
    const acc_t* w1p = dx ? w1p_.data_ptr<acc_t>() : nullptr;
    scalar_t* dxp = dx ? dx->data_ptr<scalar_t>() : nullptr;
    const int64_t n_in = dx ? dx->size(1) : 0;
    // dw2[ll] += go_llᵀ z_ll and dw1[kk] += dy_kkᵀ x_kk over rows [t0, t0+m): transposed tiles feed the GEMM
    auto dw2_block = [&](const acc_t* go, const acc_t* z, int64_t m, int64_t ll, acc_t* goT, acc_t* a2) {
      for (int64_t ss = 0; ss < d.s; ++ss)
        for (int64_t t = 0; t < m; ++t) goT[ss * m + t] = go[t * d.s + ss];
      gemm_acc<acc_t>(d.s, d.r, m, goT, m, z + ll * d.r, n_mid, a2 + ll * d.s * d.r, d.r);
    };
    auto dw1_block = [&](const acc_t* dy, int64_t t0, int64_t m, int64_t kk, acc_t* dyT, acc_t* xa, acc_t* a1) {
      for (int64_t qq = 0; qq < d.q; ++qq)
        for (int64_t t = 0; t < m; ++t) dyT[qq * m + t] = dy[t * n_mid + kk * d.q + qq];
      load_tile(x.data_ptr<scalar_t>(), x.stride(0), x.stride(1), x.size(1), t0, m, kk * d.p, d.p, xa);
      gemm_acc<acc_t>(d.q, d.p, m, dyT, m, xa, d.p, a1 + kk * d.q * d.p, d.p);
    };
    if (few_tiles(T)) {  // full buffers for z and dy, then one parallel loop per factor over its blocks
      // each block of dw1/dw2 belongs to one job: accumulate straight into the zeroed outputs when they have
      // the accumulation type (no partial buffers, no reduction pass over weight-sized memory)
      constexpr bool direct = std::is_same_v<scalar_t, acc_t>;
      std::vector<acc_t> z(T * n_mid), dy(T * n_mid), a1_(direct ? 0 : w1.numel(), acc_t(0)), a2_(direct ? 0 : w2.numel(), acc_t(0));
      acc_t* a1 = direct ? reinterpret_cast<acc_t*>(dw1.data_ptr<scalar_t>()) : a1_.data();
      acc_t* a2 = direct ? reinterpret_cast<acc_t*>(dw2.data_ptr<scalar_t>()) : a2_.data();
      at::parallel_for(0, d.k, 1, [&](int64_t b, int64_t e) {
        std::vector<acc_t> xa(TILE_M * d.p), ybuf(TILE_M * d.q);
        for (int64_t kk = b; kk < e; ++kk)
          for (int64_t t0 = 0; t0 < T; t0 += TILE_M)
            stage1_block<scalar_t, acc_t>(d, x, t0, std::min(TILE_M, T - t0), kk, W1, xa.data(), ybuf.data(), z.data(), t0);
      });
      at::parallel_for(0, d.l, 1, [&](int64_t b, int64_t e) {
        std::vector<acc_t> go(TILE_M * d.s), dz(TILE_M * d.r), goT(d.s * TILE_M);
        for (int64_t ll = b; ll < e; ++ll)
          for (int64_t t0 = 0; t0 < T; t0 += TILE_M) {
            const int64_t m = std::min(TILE_M, T - t0);
            stage2_adjoint_block<scalar_t, acc_t>(d, g, t0, m, ll, w2p, go.data(), dz.data(), dy.data(), t0);
            dw2_block(go.data(), z.data() + t0 * n_mid, m, ll, goT.data(), a2);
          }
      });
      at::parallel_for(0, d.k, 1, [&](int64_t b, int64_t e) {
        std::vector<acc_t> dyT(d.q * TILE_M), xa(TILE_M * d.p);
        for (int64_t kk = b; kk < e; ++kk)
          for (int64_t t0 = 0; t0 < T; t0 += TILE_M)
            dw1_block(dy.data() + t0 * n_mid, t0, std::min(TILE_M, T - t0), kk, dyT.data(), xa.data(), a1);
      });
      if constexpr (!direct) {
        reduce_into<scalar_t, acc_t>({a1_}, dw1, false);
        reduce_into<scalar_t, acc_t>({a2_}, dw2, false);
      }
      return;
    }
    // row tiles as tall as the thread count allows (up to TILE_W rows): every accumulation into a weight-sized
    // dw block then carries K = tile rows of work, instead of re-reading and re-writing the block every 32 rows
    const int64_t nthreads = at::get_num_threads();
    const int64_t tm = std::clamp<int64_t>(cdiv(T, nthreads), TILE_M, TILE_W);
    const int64_t ntiles = cdiv(T, tm), nch = std::min<int64_t>(nthreads, ntiles);
    // chunk 0 accumulates straight into the zeroed outputs when they have the accumulation type; the other
    // chunks into partial buffers, added at the end in chunk order (deterministic)
    constexpr bool direct = std::is_same_v<scalar_t, acc_t>;
    const int64_t first = direct ? 1 : 0;
    std::vector<std::vector<acc_t>> acc1(nch - first, std::vector<acc_t>(w1.numel(), acc_t(0)));
    std::vector<std::vector<acc_t>> acc2(nch - first, std::vector<acc_t>(w2.numel(), acc_t(0)));
    auto part = [&](std::vector<std::vector<acc_t>>& parts, at::Tensor& out, int64_t ch) -> acc_t* {
      if (direct && ch == 0) return reinterpret_cast<acc_t*>(out.data_ptr<scalar_t>());
      return parts[ch - first].data();
    };
    at::parallel_for(0, nch, 1, [&](int64_t cb, int64_t ce) {
      std::vector<acc_t> xa(tm * d.p), ybuf(tm * d.q), z(tm * n_mid), go(tm * d.s), dz(tm * d.r), dy(tm * n_mid),
          goT(d.s * tm), dyT(d.q * tm), dxb(dx ? tm * d.p : 0);
      for (int64_t ch = cb; ch < ce; ++ch)
        for (int64_t tile = ch * ntiles / nch; tile < (ch + 1) * ntiles / nch; ++tile) {
          const int64_t t0 = tile * tm, m = std::min(tm, T - t0);
          for (int64_t kk = 0; kk < d.k; ++kk)  // z recomputed, never saved
            stage1_block<scalar_t, acc_t>(d, x, t0, m, kk, W1, xa.data(), ybuf.data(), z.data(), 0);
          for (int64_t ll = 0; ll < d.l; ++ll) {
            stage2_adjoint_block<scalar_t, acc_t>(d, g, t0, m, ll, w2p, go.data(), dz.data(), dy.data(), 0);
            dw2_block(go.data(), z.data(), m, ll, goT.data(), part(acc2, dw2, ch));
          }
          for (int64_t kk = 0; kk < d.k; ++kk) {
            dw1_block(dy.data(), t0, m, kk, dyT.data(), xa.data(), part(acc1, dw1, ch));
            if (dx) stage1_adjoint_block<scalar_t, acc_t>(d, dy.data(), t0, m, kk, w1p, dxb.data(), dxp, n_in);
          }
        }
    });
    reduce_into<scalar_t, acc_t>(acc1, dw1, direct);
    reduce_into<scalar_t, acc_t>(acc2, dw2, direct);
  });
}

std::tuple<at::Tensor, at::Tensor> monarch_bwd_weight(const at::Tensor& x, const at::Tensor& g, const at::Tensor& w1,
                                                      const at::Tensor& w2) {
  TORCH_CHECK(x.device().is_cpu() && x.dim() == 2, "monarch_bwd_weight (cpu): x must be a 2-D CPU tensor");
  auto dw1 = at::zeros(w1.sizes(), w1.options());
  auto dw2 = at::zeros(w2.sizes(), w2.options());
  bwd_weight_into(x, g, w1, w2, dw1, dw2, nullptr);
  return {dw1, dw2};
}

// (dx, dw1, dw2) together: with row tiles one pass sharing the recomputed intermediate and dy; with few tiles
// (block-parallel schedules) the two separate kernels.
std::tuple<at::Tensor, at::Tensor, at::Tensor> monarch_bwd(const at::Tensor& x, const at::Tensor& g, const at::Tensor& w1,
                                                           const at::Tensor& w2, int64_t n_in) {
  TORCH_CHECK(x.device().is_cpu() && x.dim() == 2, "monarch_bwd (cpu): x must be a 2-D CPU tensor");
  if (few_tiles(x.size(0))) {
    auto [dw1, dw2] = monarch_bwd_weight(x, g, w1, w2);
    return {monarch_bwd_input(g, w1, w2, n_in), dw1, dw2};
  }
  auto dx = at::empty({x.size(0), n_in}, g.options());
  auto dw1 = at::zeros(w1.sizes(), w1.options());
  auto dw2 = at::zeros(w2.sizes(), w2.options());
  bwd_weight_into(x, g, w1, w2, dw1, dw2, &dx);
  return {dx, dw1, dw2};
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
    const auto bvec = bias_vec<acc_t>(bias, n_out);
    const BlockWeights<acc_t> W(w, T);
    scalar_t* op = out.data_ptr<scalar_t>();
    const int64_t ntiles = cdiv(T, TILE_M);
    at::parallel_for(0, ntiles * kb, 1, [&](int64_t begin, int64_t end) {  // (row tile, block) pairs are independent
      std::vector<acc_t> xa(TILE_M * p), ybuf(TILE_M * q);
      for (int64_t job = begin; job < end; ++job) {
        const int64_t t0 = (job / kb) * TILE_M, kk = job % kb, m = std::min(TILE_M, T - t0);
        load_tile(x.data_ptr<scalar_t>(), x.stride(0), x.stride(1), x.size(1), t0, m, kk * p, p, xa.data());
        std::fill(ybuf.begin(), ybuf.begin() + m * q, acc_t(0));
        W.apply(m, xa.data(), p, kk, ybuf.data(), q);
        const int64_t lim = std::min(q, n_out - kk * q);
        with_activation(act, [&](auto a) {
          for (int64_t t = 0; t < m; ++t) {
            scalar_t* orow = op + (t0 + t) * n_out + kk * q;
            const acc_t* yr = ybuf.data() + t * q;
            const acc_t* bv = bvec.data() + kk * q;
            for (int64_t qq = 0; qq < lim; ++qq)
              orow[qq] = static_cast<scalar_t>(activate<acc_t>(yr[qq] + bv[qq], decltype(a)::value));
          }
        });
      }
    });
  });
  return out;
}

at::Tensor blockdiag_wgrad(const at::Tensor& x, const at::Tensor& g, int64_t k, int64_t q, int64_t p) {
  TORCH_CHECK(x.device().is_cpu() && x.dim() == 2, "blockdiag_wgrad (cpu): x must be a 2-D CPU tensor");
  const int64_t T = x.size(0);
  auto dw = at::zeros({k, q, p}, x.options());
  if (T == 0) return dw;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "blockdiag_wgrad_cpu", [&] {
    using acc_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
    // parallel over (block, token chunk); each job accumulates dw[kk] over its chunk
    const int64_t ntiles = cdiv(T, TILE_M);
    const int64_t nch = std::max<int64_t>(1, std::min(ntiles, cdiv(at::get_num_threads(), k)));
    std::vector<std::vector<acc_t>> parts(nch, std::vector<acc_t>(k * q * p, acc_t(0)));
    at::parallel_for(0, k * nch, 1, [&](int64_t begin, int64_t end) {
      std::vector<acc_t> xa(TILE_M * p), ga(TILE_M * q), gT(q * TILE_M);
      for (int64_t job = begin; job < end; ++job) {
        const int64_t kk = job / nch, ch = job % nch;
        for (int64_t tile = ch * ntiles / nch; tile < (ch + 1) * ntiles / nch; ++tile) {
          const int64_t t0 = tile * TILE_M, m = std::min(TILE_M, T - t0);
          load_tile(x.data_ptr<scalar_t>(), x.stride(0), x.stride(1), x.size(1), t0, m, kk * p, p, xa.data());
          load_tile(g.data_ptr<scalar_t>(), g.stride(0), g.stride(1), g.size(1), t0, m, kk * q, q, ga.data());
          for (int64_t qq = 0; qq < q; ++qq)
            for (int64_t t = 0; t < m; ++t) gT[qq * m + t] = ga[t * q + qq];
          gemm_acc<acc_t>(q, p, m, gT.data(), m, xa.data(), p, parts[ch].data() + kk * q * p, p);
        }
      }
    });
    reduce_into<scalar_t, acc_t>(parts, dw, false);
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
}
