// Few-token Monarch forward in one launch without a grid barrier ("row split"): plan and kernel.
//
// out = act(P2·BD(w2)·P1·BD(w1)·x + bias) with fly's layout (monarch_kernels/reference.py): the stage-1 output
// y[t, f], f = kk·q + qq, feeds stage-2 block ll at position rr where f = rr·l + ll (P1). So stage-2 block ll
// consumes exactly the r stage-1 rows f ≡ ll (mod l): w1 row f (p contiguous elements, w1 being (k, q, p)
// contiguous) dotted with x's block kk = f / q. A CTA that owns stage-2 block ll therefore computes those r
// outputs per token itself, keeps them in shared memory (rounded to the input dtype, as every other path
// rounds the intermediate), and runs stage 2 on them: no grid barrier, no scratch, one ordinary launch, and
// across the grid every weight row is read exactly once per stage-2 split (below). What it pays instead:
// every CTA reads the token rows of x it needs (all of x's blocks when k ≤ r, T·n_in elements: from L2 after
// the first CTA), and a CTA's stage-1 rows (1/l of w1) are one CTA's stream, so the plan declines shapes whose
// per-CTA stage-1 bytes exceed kRowsplitStageBytes (few, wide blocks: the cooperative kernel of decode.cu
// takes those).
//
// Grid (l, splits): CTA (ll, j) also computes stage-2 rows ss of block ll in its share [j·s_per, (j+1)·s_per);
// splits > 1 (filling the SMs when l is small) repeats block ll's stage-1 rows in each split, from L2.
// Work inside a CTA: a row (a weight row and its T dot products) is served by a group of 2^a lanes of one
// warp, each lane taking 16-byte chunks (LDG.E.128 streaming loads when the rows allow) and the group summed
// with xor shuffles; all 32 lanes of a warp take part in every shuffle (rows past the end contribute 0).
// fp32 accumulation on CUDA cores: at T ≤ 16 the product is bound by bytes and latency, not by FLOPs.
//
// Each CTA first prefetches its stage-2 rows into L2, so only stage 1 waits for DRAM.
// Not yet measured on a GPU: the extension runs it only when selected (set_decode_kernel("rowsplit")); the
// cooperative kernel stays the default until bench/gpu_profile.py's graph-replay A/B of the two decides.
//
// Plain C++ apart from the CUDA builtins, so tests/cuda_sim runs this very kernel on a CPU (threads for
// CUDA threads) against float64 with MONARCH_CUDA_SIM defined.
#pragma once

#include <climits>
#include <cstdint>

#include "decode.cuh"
#include "epilogue.cuh"

namespace monarch_cuda {

constexpr int kRowsplitThreads = 256, kRowsplitWarps = kRowsplitThreads / 32;
constexpr int kRowsplitMaxTokens = 16;
//: most stage-1 bytes (w1 rows and x rows) one CTA streams; past it the cooperative kernel spreads them better
constexpr int64_t kRowsplitStageBytes = 512 * 1024;

struct RowsplitPlan {
  const void* x;
  const void* w1;
  const void* w2;
  const void* bias;
  void* out;
  int64_t x_ts, x_fs, out_ts;
  int tokens, k, q, p, l, s, r, n_in, n_out, act;
  int a_log2, b_log2;  // lanes per stage-1 row and per stage-2 row (log2)
  int splits, s_per;   // CTAs per stage-2 block, stage-2 rows per CTA
  int zpitch;          // floats per token row of the on-chip intermediate (r rounded up to a 16-byte chunk)
  int smem;            // dynamic shared memory (bytes)
  bool w1_vec, w2_vec, x_vec;  // rows loadable with aligned 16-byte vectors
  bool s1_vec;                 // every stage-1 chunk a whole vector of w1 and of x (w1_vec, x_vec, n_in == k·p)
};

inline int rowsplit_log2_lanes(int chunks) {  // lanes per row: chunks rounded up to a power of two, at most 32
  int a = 0;
  while (a < 5 && (1 << a) < chunks) ++a;
  return a;
}

// Fills P for `a` on a device with `sms` SMs and `smem_optin` bytes of shared memory per block; false when the
// row-split kernel does not take the call (the caller uses the cooperative kernel). `itemsize` 2 or 4.
inline bool rowsplit_plan(const MonarchFwdArgs& a, int itemsize, int sms, int smem_optin, RowsplitPlan& P) {
  if (a.tokens < 1 || a.tokens > kRowsplitMaxTokens || (itemsize != 2 && itemsize != 4)) return false;
  if (a.z) return false;  // keeps no intermediate
  if (a.k < 1 || a.q < 1 || a.p < 1 || a.l < 1 || a.s < 1 || a.r < 1) return false;
  if (a.k * a.q != a.l * a.r || a.k * a.q > INT_MAX / 2 || a.l * a.s > INT_MAX / 2 || a.k * a.p > INT_MAX / 2)
    return false;
  if (a.n_in < 1 || a.n_in > a.k * a.p || a.n_out < 1 || a.n_out > a.l * a.s) return false;
  const int64_t stage_bytes = (a.r * a.p + a.tokens * a.n_in) * static_cast<int64_t>(itemsize);
  if (stage_bytes > kRowsplitStageBytes) return false;
  const int V = 16 / itemsize;
  P = RowsplitPlan{};
  P.x = a.x, P.w1 = a.w1, P.w2 = a.w2, P.bias = a.bias, P.out = a.out;
  P.x_ts = a.x_ts, P.x_fs = a.x_fs, P.out_ts = a.out_ts;
  P.tokens = static_cast<int>(a.tokens);
  P.k = static_cast<int>(a.k), P.q = static_cast<int>(a.q), P.p = static_cast<int>(a.p);
  P.l = static_cast<int>(a.l), P.s = static_cast<int>(a.s), P.r = static_cast<int>(a.r);
  P.n_in = static_cast<int>(a.n_in), P.n_out = static_cast<int>(a.n_out), P.act = a.act;
  P.zpitch = static_cast<int>((a.r + V - 1) / V * V);
  P.smem = P.tokens * P.zpitch * 4;
  if (P.smem > smem_optin) return false;
  P.a_log2 = rowsplit_log2_lanes((P.p + V - 1) / V);
  P.b_log2 = rowsplit_log2_lanes((P.r + V - 1) / V);
  const int64_t fill = (sms + a.l - 1) / a.l, most = (a.s + 15) / 16;  // >= 16 stage-2 rows per CTA
  const int64_t splits = fill < most ? fill : most;
  P.s_per = static_cast<int>((a.s + splits - 1) / splits);
  P.splits = (P.s + P.s_per - 1) / P.s_per;
  if (P.splits > 65535) return false;
  const auto aligned = [](const void* ptr) { return reinterpret_cast<uintptr_t>(ptr) % 16 == 0; };
  P.w1_vec = aligned(a.w1) && P.p % V == 0;
  P.w2_vec = aligned(a.w2) && P.r % V == 0;
  P.x_vec = aligned(a.x) && a.x_fs == 1 && a.x_ts % V == 0 && P.p % V == 0;
  P.s1_vec = P.w1_vec && P.x_vec && P.n_in == P.k * P.p;
  return true;
}

// ------------------------------------------------------------------------------------ device side

__device__ __forceinline__ int imin(int a, int b) { return a < b ? a : b; }

// One 128-byte line into L2 (a hint; nothing in the CPU emulation).
__device__ __forceinline__ void prefetch_l2_line(const void* p) {
#ifdef MONARCH_CUDA_SIM
  (void)p;
#else
  asm volatile("prefetch.global.L2 [%0];" ::"l"(p));
#endif
}

// An element from its raw bits (no local-memory round trip: the loads below stay in registers).
template <typename T>
__device__ __forceinline__ float bits_to_f(uint32_t b);
template <>
__device__ __forceinline__ float bits_to_f<float>(uint32_t b) { return __uint_as_float(b); }
template <>
__device__ __forceinline__ float bits_to_f<__nv_bfloat16>(uint32_t b) { return __uint_as_float(b << 16); }
template <>
__device__ __forceinline__ float bits_to_f<__half>(uint32_t b) {
  __half_raw h;
  h.x = static_cast<unsigned short>(b);
  return __half2float(__half(h));
}

// n ≤ V elements (element stride `stride`) of a row into v[0..V), zeros past n (n may be ≤ 0): one 16-byte load
// when `vec` and n == V (the caller guarantees alignment and unit stride then), element loads otherwise.
// Weights stream (evict-first, kStream); x rows are read by many CTAs and go through the read-only path.
template <typename T, bool kStream>
__device__ __forceinline__ void load_chunk(const T* p, int64_t stride, int n, bool vec, float (&v)[16 / sizeof(T)]) {
  constexpr int V = 16 / sizeof(T);
  if (vec && n == V) {
    const uint4* q = reinterpret_cast<const uint4*>(p);
    const uint4 u = kStream ? __ldcs(q) : __ldg(q);
    const uint32_t w[4] = {u.x, u.y, u.z, u.w};
#pragma unroll
    for (int i = 0; i < V; ++i)
      v[i] = sizeof(T) == 2 ? bits_to_f<T>((w[i >> 1] >> (16 * (i & 1))) & 0xffffu) : bits_to_f<T>(w[i]);
    return;
  }
#pragma unroll
  for (int i = 0; i < V; ++i) {
    uint32_t b = 0;  // +0.0 in every dtype
    if (i < n) {
      if constexpr (sizeof(T) == 2) {
        const unsigned short* q = reinterpret_cast<const unsigned short*>(p + i * stride);
        b = kStream ? __ldcs(q) : __ldg(q);
      } else {
        const unsigned int* q = reinterpret_cast<const unsigned int*>(p + i * stride);
        b = kStream ? __ldcs(q) : __ldg(q);
      }
    }
    v[i] = bits_to_f<T>(b);
  }
}

template <int TB>
__device__ __forceinline__ void group_sum(float (&acc)[TB], int lanes) {
#pragma unroll
  for (int t = 0; t < TB; ++t)
    for (int off = lanes >> 1; off > 0; off >>= 1) acc[t] += __shfl_xor_sync(0xffffffffu, acc[t], off);
}

// Σ_i w[i]·x[i] over one 16-byte chunk of each (raw bits).
template <typename T>
__device__ __forceinline__ float dot_chunk(const uint4& w, const uint4& x) {
  const uint32_t a[4] = {w.x, w.y, w.z, w.w}, b[4] = {x.x, x.y, x.z, x.w};
  float s = 0.f;
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    if constexpr (sizeof(T) == 2) {
      s += bits_to_f<T>(a[i] & 0xffffu) * bits_to_f<T>(b[i] & 0xffffu);
      s += bits_to_f<T>(a[i] >> 16) * bits_to_f<T>(b[i] >> 16);
    } else {
      s += bits_to_f<T>(a[i]) * bits_to_f<T>(b[i]);
    }
  }
  return s;
}

// Rows of one pass handled together by a lane group: more loads in flight per lane with fewer token rows.
template <int TB>
constexpr int kRowsPerGroup = TB <= 4 ? 4 : 2;

// Stage 1 when every chunk is a whole aligned 16-byte vector of w1 and of x (n_in == k·p): no branch around
// a load, so each lane issues its R rows' weight chunks and their x chunks before the first multiply.
template <typename T, int TB>
__device__ __forceinline__ void stage1_vector(const RowsplitPlan& P, float* zs, int ll, int warp, int lane) {
  constexpr int V = 16 / sizeof(T), R = kRowsPerGroup<TB>;
  const int lanes = 1 << P.a_log2, per_warp = 32 >> P.a_log2;
  const int sub = lane & (lanes - 1), grp = lane >> P.a_log2;
  const T* w1 = static_cast<const T*>(P.w1);
  const T* x = static_cast<const T*>(P.x);
  for (int base = warp * per_warp * R; base < P.r; base += kRowsplitWarps * per_warp * R) {  // warp-uniform
    const T* wrow[R];
    const T* xrow[R];
#pragma unroll
    for (int j = 0; j < R; ++j) {
      const int rr = base + j * per_warp + grp, f = (rr < P.r ? rr : 0) * P.l + ll;  // a row past r: row 0, unused
      wrow[j] = w1 + static_cast<int64_t>(f) * P.p;
      xrow[j] = x + (f / P.q) * P.p;
    }
    float acc[R][TB];
#pragma unroll
    for (int j = 0; j < R; ++j)
#pragma unroll
      for (int t = 0; t < TB; ++t) acc[j][t] = 0.f;
#pragma unroll 2
    for (int c = sub * V; c < P.p; c += lanes * V) {
      uint4 w[R];
#pragma unroll
      for (int j = 0; j < R; ++j) w[j] = __ldcs(reinterpret_cast<const uint4*>(wrow[j] + c));
#pragma unroll
      for (int t = 0; t < TB; ++t) {
        if (t < P.tokens) {
#pragma unroll
          for (int j = 0; j < R; ++j)
            acc[j][t] += dot_chunk<T>(w[j], __ldg(reinterpret_cast<const uint4*>(xrow[j] + t * P.x_ts + c)));
        }
      }
    }
#pragma unroll
    for (int j = 0; j < R; ++j) {
      group_sum<TB>(acc[j], lanes);
      const int rr = base + j * per_warp + grp;
      if (sub == 0 && rr < P.r) {
#pragma unroll
        for (int t = 0; t < TB; ++t)
          if (t < P.tokens) zs[t * P.zpitch + rr] = to_f(from_f<T>(acc[j][t]));  // the intermediate's rounding
      }
    }
  }
}

// Stage 1 for any rows: element loads where a chunk is ragged, misaligned or strided, x zero past n_in.
template <typename T, int TB>
__device__ __forceinline__ void stage1_any(const RowsplitPlan& P, float* zs, int ll, int warp, int lane) {
  constexpr int V = 16 / sizeof(T);
  const int lanes = 1 << P.a_log2, per_warp = 32 >> P.a_log2;
  const int sub = lane & (lanes - 1), grp = lane >> P.a_log2;
  const T* w1 = static_cast<const T*>(P.w1);
  const T* x = static_cast<const T*>(P.x);
  for (int base = warp * per_warp; base < P.r; base += kRowsplitWarps * per_warp) {  // warp-uniform
    const int rr = base + grp;
    float acc[TB];
#pragma unroll
    for (int t = 0; t < TB; ++t) acc[t] = 0.f;
    if (rr < P.r) {
      const int f = rr * P.l + ll, kk = f / P.q;
      const T* wrow = w1 + static_cast<int64_t>(f) * P.p;
      for (int c = sub * V; c < P.p; c += lanes * V) {
        float w[V];
        load_chunk<T, true>(wrow + c, 1, imin(P.p - c, V), P.w1_vec, w);
        const int col = kk * P.p + c;  // x column of the chunk's first element
        const int n = imin(imin(P.p - c, P.n_in - col), V);
#pragma unroll
        for (int t = 0; t < TB; ++t) {
          if (t < P.tokens) {
            float xv[V];
            load_chunk<T, false>(x + t * P.x_ts + col * P.x_fs, P.x_fs, n, P.x_vec, xv);
#pragma unroll
            for (int i = 0; i < V; ++i) acc[t] += w[i] * xv[i];
          }
        }
      }
    }
    group_sum<TB>(acc, lanes);
    if (sub == 0 && rr < P.r) {
#pragma unroll
      for (int t = 0; t < TB; ++t)
        if (t < P.tokens) zs[t * P.zpitch + rr] = to_f(from_f<T>(acc[t]));  // the intermediate's rounding
    }
  }
}

// Stage 2 of this CTA's rows ss of block ll: out[t, ss·l + ll] = act(Σ_rr w2[ll, ss, rr] · zs[t, rr] + bias).
// R rows per lane group; the intermediate's chunk (zero-padded to zpitch) is read once per token for all R.
template <typename T, int TB>
__device__ __forceinline__ void stage2(const RowsplitPlan& P, const float* zs, int ll, int warp, int lane) {
  constexpr int V = 16 / sizeof(T), R = kRowsPerGroup<TB>;
  const int lanes = 1 << P.b_log2, per_warp = 32 >> P.b_log2;
  const int sub = lane & (lanes - 1), grp = lane >> P.b_log2;
  const int s0 = blockIdx.y * P.s_per, s1 = imin(P.s, s0 + P.s_per);
  const T* w2 = static_cast<const T*>(P.w2) + static_cast<int64_t>(ll) * P.s * P.r;
  const T* bias = static_cast<const T*>(P.bias);
  T* out = static_cast<T*>(P.out);
  for (int base = s0 + warp * per_warp * R; base < s1; base += kRowsplitWarps * per_warp * R) {  // warp-uniform
    const T* wrow[R];
#pragma unroll
    for (int j = 0; j < R; ++j) {
      const int ss = base + j * per_warp + grp;
      wrow[j] = w2 + static_cast<int64_t>(ss < s1 ? ss : s0) * P.r;  // a row past the share: its first, unused
    }
    float acc[R][TB];
#pragma unroll
    for (int j = 0; j < R; ++j)
#pragma unroll
      for (int t = 0; t < TB; ++t) acc[j][t] = 0.f;
    for (int c = sub * V; c < P.r; c += lanes * V) {
      float w[R][V];
#pragma unroll
      for (int j = 0; j < R; ++j) load_chunk<T, true>(wrow[j] + c, 1, imin(P.r - c, V), P.w2_vec, w[j]);
#pragma unroll
      for (int t = 0; t < TB; ++t) {
        if (t < P.tokens) {
          const float4* z = reinterpret_cast<const float4*>(zs + t * P.zpitch + c);
#pragma unroll
          for (int i = 0; i < V / 4; ++i) {
            const float4 zv = z[i];
#pragma unroll
            for (int j = 0; j < R; ++j)
              acc[j][t] += w[j][4 * i] * zv.x + w[j][4 * i + 1] * zv.y + w[j][4 * i + 2] * zv.z + w[j][4 * i + 3] * zv.w;
          }
        }
      }
    }
#pragma unroll
    for (int j = 0; j < R; ++j) {
      group_sum<TB>(acc[j], lanes);
      const int ss = base + j * per_warp + grp, col = ss * P.l + ll;
      if (sub == 0 && ss < s1 && col < P.n_out) {
        const float b = bias ? to_f(bias[col]) : 0.f;
#pragma unroll
        for (int t = 0; t < TB; ++t)
          if (t < P.tokens) out[t * P.out_ts + col] = activate_to<T>(acc[j][t] + b, P.act);
      }
    }
  }
}

template <typename T, int TB>
__global__ void __launch_bounds__(kRowsplitThreads) rowsplit_kernel(const __grid_constant__ RowsplitPlan P) {
#ifdef MONARCH_CUDA_SIM
  float* zs = reinterpret_cast<float*>(sim::dynamic_smem());
#else
  extern __shared__ __align__(16) float zs[];
#endif
  const int ll = blockIdx.x, lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  // this CTA's stage-2 rows go to L2 now, while stage 1 streams: stage 2 then waits for L2, not DRAM
  {
    const char* w2 = static_cast<const char*>(P.w2) + (static_cast<int64_t>(ll) * P.s + blockIdx.y * P.s_per) *
                                                          P.r * static_cast<int64_t>(sizeof(T));
    const int64_t bytes = static_cast<int64_t>(imin(P.s_per, P.s - blockIdx.y * P.s_per)) * P.r * sizeof(T);
    for (int64_t off = threadIdx.x * 128; off < bytes; off += kRowsplitThreads * 128) prefetch_l2_line(w2 + off);
  }
  // the intermediate's padding columns [r, zpitch) are read by stage 2's last chunk: zero them
  for (int i = threadIdx.x; i < P.tokens * (P.zpitch - P.r); i += kRowsplitThreads) {
    const int t = i / (P.zpitch - P.r);
    zs[t * P.zpitch + P.r + (i - t * (P.zpitch - P.r))] = 0.f;
  }
  // stage 1: zs[t, rr] = Σ_pp w1[f, pp] · x[t, kk·p + pp], f = rr·l + ll, kk = f / q
  if (P.s1_vec)
    stage1_vector<T, TB>(P, zs, ll, warp, lane);
  else
    stage1_any<T, TB>(P, zs, ll, warp, lane);
  __syncthreads();
  stage2<T, TB>(P, zs, ll, warp, lane);
}

}  // namespace monarch_cuda
