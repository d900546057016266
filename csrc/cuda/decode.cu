// Small-token ("decode") block-diagonal and Monarch products (contracts in decode.cuh).
//
// With T <= 64 tokens a Monarch product M = P2·BD(w2)·P1·BD(w1) (Dao et al., "Monarch: Expressive Structured
// Matrices for Efficient and Accurate Training", ICML 2022, §3.1) is bound by reading its two factors once,
// 2·n²/nblocks elements instead of the n² of a dense layer, and at T ≈ 1 by launch latency. So:
//
// * one persistent cooperative launch: stage 1, a grid-wide barrier, stage 2 (no second launch);
// * a *task* is one CTA tile of outputs of one block; the 8 warps of the CTA split the tile's outputs
//   (1 << wr_log2 ways) and its reduction (the remaining 8 >> wr_log2 ways, summed through shared memory);
// * weights are read exactly once, as 16-byte streaming loads (LDG.E.128 with evict-first caching) issued in
//   groups of 4 per thread before any is used; the few token rows of the block's input sit in shared memory;
// * fp16/bf16 multiply on tensor cores (mma.sync m16n8k16, fp32 accumulation): weights are the B operand,
//   tokens the A operand (16-row m-tiles, as many as the tokens need; rows past the tokens are never read
//   back: an mma row depends on its own A row only). Without `trans` a thread's 16-byte load
//   of a weight row holds the B fragments of two k16 steps once the reduction index is permuted the same way
//   in A and B (the sum is order-free); with `trans` (weights used transposed, dX) the loaded 8 x 8 tiles are
//   transposed in registers with movmatrix, and the thread's outputs come out as 8 contiguous columns;
// * fp32 multiplies on CUDA cores with the same task structure (tensor-core TF32 would not be fp32-exact);
// * P1 and P2 are folded into the epilogue's output index (the stage-1 result goes to an L2-resident T x N
//   scratch in stage 2's input order, so stage 2 stages contiguous rows); P2ᵀ of the dX product is folded
//   into the input staging (a strided gather of T x s elements);
// * each thread prefetches its share of the stage-2 weight rows its CTA will read into L2 (evict-last) right
//   after issuing its last stage-1 weight loads: the memory system streams stage 1's weights first, so the
//   grid barrier waits for those alone, and stage 2's weights arrive while the barrier resolves (no second
//   DRAM round trip after it). A factor past 60% of L2 is prefetched in part: the first part of every task.
//
// Index arithmetic is 32-bit inside a block (decode_supported() checks the ranges); per-token row offsets
// are 64-bit. No 64-bit division anywhere on the device.
#include "decode.cuh"

#include <cooperative_groups.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <algorithm>
#include <atomic>
#include <climits>

#include "decode_rowsplit.cuh"
#include "epilogue.cuh"
#include "launch.cuh"
#include "mma.cuh"

namespace monarch_cuda {
namespace {

namespace cg = cooperative_groups;

constexpr int kThreads = 256, kWarps = 8;

struct StageParams {
  DecodeStage s;
  int K, n_o;             // reduction length and outputs per block
  int wr_log2;            // 1 << wr_log2 warps along a task's outputs; 8 >> wr_log2 along its reduction
  int tiles, tasks;       // output tiles per block; tasks = nblk * tiles
  int pitch, red_pitch;   // row pitch of the staged input (elements) and of the partial sums (floats)
  unsigned out_a, out_b;  // output permutation (see DecodeStage)
  bool w_vec, in_vec;     // weight / input rows loadable with 16-byte vectors
};

struct Params {
  StageParams st[2];
  int nstages, tokens;
  int prefetch_share;  // share of each stage-2 task's weights prefetched into L2 at the end of stage 1, in 1/1024
  int xs_bytes;   // offset of the partial-sum buffer in dynamic shared memory
};

// ------------------------------------------------------------------------------------ memory helpers

// 16 bytes of p[0..n) with zeros past n (n may be <= 0): one streaming 128-bit load when `vec` (then n is 0
// or a whole vector), element loads otherwise.
template <typename T>
__device__ __forceinline__ uint4 load_weights16(const T* p, int n, bool vec) {
  uint4 r = make_uint4(0u, 0u, 0u, 0u);
  if (n <= 0) return r;
  if (vec) return __ldcs(reinterpret_cast<const uint4*>(p));
  uint32_t w[4] = {0u, 0u, 0u, 0u};
  if constexpr (sizeof(T) == 2) {
    const unsigned short* q = reinterpret_cast<const unsigned short*>(p);
#pragma unroll
    for (int e = 0; e < 8; ++e)
      if (e < n) w[e >> 1] |= static_cast<uint32_t>(__ldcs(q + e)) << (16 * (e & 1));
  } else {
    const float* q = reinterpret_cast<const float*>(p);
#pragma unroll
    for (int e = 0; e < 4; ++e)
      if (e < n) w[e] = __float_as_uint(__ldcs(q + e));
  }
  return make_uint4(w[0], w[1], w[2], w[3]);
}

// One input element through L2 (the stage-2 input is written by this kernel: never the non-coherent path).
template <typename T>
__device__ __forceinline__ T load_input(const T* p) {
  if constexpr (sizeof(T) == 2) {
    const unsigned short b = __ldcg(reinterpret_cast<const unsigned short*>(p));
    return *reinterpret_cast<const T*>(&b);
  } else {
    return __ldcg(p);
  }
}

__device__ __forceinline__ void prefetch_l2(const void* p) {
  asm volatile("prefetch.global.L2::evict_last [%0];" ::"l"(p));
}

// ------------------------------------------------------------------------------------ tensor-core primitives

// Transposes the 8 x 8 16-bit matrix held one row per 4 lanes (lane = 4·row + column pair).
__device__ __forceinline__ uint32_t transpose8x8(uint32_t v) {
  uint32_t r;
  asm volatile("movmatrix.sync.aligned.m8n8.trans.b16 %0, %1;" : "=r"(r) : "r"(v));
  return r;
}

__device__ __forceinline__ uint32_t word(const uint4& v, int i) { return i == 0 ? v.x : i == 1 ? v.y : i == 2 ? v.z : v.w; }

__device__ __forceinline__ uint32_t lds32(const void* p) { return *reinterpret_cast<const uint32_t*>(p); }

// ------------------------------------------------------------------------------------ warp tiles
//
// A warp tile accumulates kCols outputs of one block for the staged tokens over the reduction chunks
// wk, wk + nwk, ... (kChunk wide each), then writes its fp32 partial sums to red[token][col0 + ...].
// Lane = 4·g + c (g = groupID, c = thread in group, as in the PTX mma fragment tables).

// Weights W[o, k] (k contiguous), streamed by the lane (g, c) of a warp tile: rows o0 + g and o0 + 8 + g (zeros
// past n_o), kLaneK elements (16 bytes) at k = chunk·kChunk + kLaneK·c of each chunk wk, wk + nwk, ... . Every
// group of kGroup chunks is loaded before `hook(last group?)` runs and before any is used; then use(k, v) runs per chunk that
// exists, v[j] holding row j's 16 bytes. Shared by the row-major tiles (tensor-core and fp32).
template <int kChunk, int kGroup, int kLaneK, typename T, class Hook, class Use>
__device__ __forceinline__ void stream_weight_rows(const StageParams& p, const T* w, int o0, int wk, int nwk,
                                                   Hook& hook, Use&& use) {
  const int lane = threadIdx.x & 31, g = lane >> 2, c = lane & 3, K = p.K;
  const int nch = (K + kChunk - 1) / kChunk;
  const T* wrow[2];
  bool row_ok[2];
#pragma unroll
  for (int j = 0; j < 2; ++j) {
    const int o = o0 + 8 * j + g;
    row_ok[j] = o < p.n_o;
    wrow[j] = w + (row_ok[j] ? o : 0) * K;
  }
  for (int base = wk; base < nch; base += nwk * kGroup) {
    uint4 v[kGroup][2];
#pragma unroll
    for (int i = 0; i < kGroup; ++i) {
      const int k = (base + i * nwk) * kChunk + kLaneK * c;
#pragma unroll
      for (int j = 0; j < 2; ++j) v[i][j] = load_weights16(wrow[j] + k, row_ok[j] ? K - k : 0, p.w_vec);
    }
    hook(base + nwk * kGroup >= nch);
#pragma unroll
    for (int i = 0; i < kGroup; ++i) {
      const int ch = base + i * nwk;
      if (ch >= nch) break;  // warp-uniform
      use(ch * kChunk + kLaneK * c, v[i]);
    }
  }
}

// fp16/bf16, weights W[o, k] (k contiguous): outputs o0 + 8j + g for n-tile j. A 16-byte load holds W[o, k0 + 8c
// .. + 8); physical k0 + 8c + 4s + {0,1} is mma step s's logical k 2c + {0,1}, + {2,3} its 2c + 8 + {0,1},
// and the token rows are read with the same mapping, so one 16-byte load feeds two mma steps.
template <typename T, int MT>
struct FwdMma {
  static constexpr int kCols = 16, kChunk = 32, kGroup = 4, kTok = 16 * MT, kRedPad = 8, kPitchMod = 64;
  static constexpr bool kTrans = false, kMma = true;
  float acc[MT][2][4];

  template <class Hook>
  __device__ __forceinline__ void run(const StageParams& p, const T* w, int o0, int wk, int nwk, const T* xs,
                                      int tokens, Hook& hook) {
    const int lane = threadIdx.x & 31, g = lane >> 2, mt = (tokens + 15) >> 4;
#pragma unroll
    for (int m = 0; m < MT; ++m)
#pragma unroll
      for (int j = 0; j < 2; ++j)
#pragma unroll
        for (int e = 0; e < 4; ++e) acc[m][j][e] = 0.f;
    stream_weight_rows<kChunk, kGroup, 8>(p, w, o0, wk, nwk, hook, [&](int k, const uint4 (&v)[2]) {
#pragma unroll
      for (int m = 0; m < MT; ++m) {
        if (m >= mt) break;  // m-tiles without tokens (warp-uniform)
        const uint4 xa = *reinterpret_cast<const uint4*>(xs + (16 * m + g) * p.pitch + k);
        const uint4 xb = *reinterpret_cast<const uint4*>(xs + (16 * m + g + 8) * p.pitch + k);
#pragma unroll
        for (int s = 0; s < 2; ++s) {
          const uint32_t a[4] = {word(xa, 2 * s), word(xb, 2 * s), word(xa, 2 * s + 1), word(xb, 2 * s + 1)};
#pragma unroll
          for (int j = 0; j < 2; ++j) mma16816<T>(acc[m][j], a, word(v[j], 2 * s), word(v[j], 2 * s + 1));
        }
      }
    });
  }

  __device__ __forceinline__ void store(float* red, int rp, int col0, int tokens) const {
    const int lane = threadIdx.x & 31, g = lane >> 2, c = lane & 3, mt = (tokens + 15) >> 4;
#pragma unroll
    for (int m = 0; m < MT; ++m)
#pragma unroll
      for (int j = 0; j < 2; ++j) {
        if (m >= mt) break;
        const int col = col0 + 8 * j + 2 * c;
        *reinterpret_cast<float2*>(red + (16 * m + g) * rp + col) = make_float2(acc[m][j][0], acc[m][j][1]);
        *reinterpret_cast<float2*>(red + (16 * m + g + 8) * rp + col) = make_float2(acc[m][j][2], acc[m][j][3]);
      }
  }
};

// fp16/bf16, weights W[k, o] (o contiguous; the transposed use). Per k16 step a lane loads W[k0 + g][o0 + 8c ..
// + 8) and W[k0 + 8 + g][...]; word j of those is an 8 x 8 tile whose transpose (movmatrix) is the B fragment
// of n-tile j, n = g <-> column o0 + 8(g/2) + 2j + g%2. The accumulator pair (2c, 2c+1) of n-tile j is then
// column o0 + 8c + 2j + {0,1}: each lane ends with 8 contiguous columns per token.
template <typename T, int MT>
struct TransMma {
  static constexpr int kCols = 32, kChunk = 16, kGroup = 4, kTok = 16 * MT, kRedPad = 4, kPitchMod = 16;
  static constexpr bool kTrans = true, kMma = true;
  float acc[MT][4][4];

  template <class Hook>
  __device__ __forceinline__ void run(const StageParams& p, const T* w, int o0, int wk, int nwk, const T* xs,
                                      int tokens, Hook& hook) {
    const int lane = threadIdx.x & 31, g = lane >> 2, c = lane & 3, K = p.K, n_o = p.n_o, mt = (tokens + 15) >> 4;
    const int nch = (K + kChunk - 1) / kChunk, col = o0 + 8 * c, ncol = n_o - col;
#pragma unroll
    for (int m = 0; m < MT; ++m)
#pragma unroll
      for (int j = 0; j < 4; ++j)
#pragma unroll
        for (int e = 0; e < 4; ++e) acc[m][j][e] = 0.f;
    for (int base = wk; base < nch; base += nwk * kGroup) {
      uint4 u[kGroup], v[kGroup];
#pragma unroll
      for (int i = 0; i < kGroup; ++i) {
        const int r0 = (base + i * nwk) * kChunk + g, r1 = r0 + 8;
        u[i] = load_weights16(w + r0 * n_o + col, r0 < K ? ncol : 0, p.w_vec);
        v[i] = load_weights16(w + r1 * n_o + col, r1 < K ? ncol : 0, p.w_vec);
      }
      hook(base + nwk * kGroup >= nch);
#pragma unroll
      for (int i = 0; i < kGroup; ++i) {
        const int ch = base + i * nwk;
        if (ch >= nch) break;  // warp-uniform
        const int k = ch * kChunk + 2 * c;
        uint32_t a[MT][4];
#pragma unroll
        for (int m = 0; m < MT; ++m) {
          if (m >= mt) break;
          const T* r0 = xs + (16 * m + g) * p.pitch + k;
          const T* r1 = xs + (16 * m + g + 8) * p.pitch + k;
          a[m][0] = lds32(r0);
          a[m][1] = lds32(r1);
          a[m][2] = lds32(r0 + 8);
          a[m][3] = lds32(r1 + 8);
        }
#pragma unroll
        for (int j = 0; j < 4; ++j) {
          const uint32_t b0 = transpose8x8(word(u[i], j)), b1 = transpose8x8(word(v[i], j));
#pragma unroll
          for (int m = 0; m < MT; ++m)
            if (m < mt) mma16816<T>(acc[m][j], a[m], b0, b1);
        }
      }
    }
  }

  __device__ __forceinline__ void store(float* red, int rp, int col0, int tokens) const {
    const int lane = threadIdx.x & 31, g = lane >> 2, c = lane & 3, mt = (tokens + 15) >> 4;
#pragma unroll
    for (int m = 0; m < MT; ++m)
#pragma unroll
      for (int j = 0; j < 4; ++j) {
        if (m >= mt) break;
        const int col = col0 + 8 * c + 2 * j;
        *reinterpret_cast<float2*>(red + (16 * m + g) * rp + col) = make_float2(acc[m][j][0], acc[m][j][1]);
        *reinterpret_cast<float2*>(red + (16 * m + g + 8) * rp + col) = make_float2(acc[m][j][2], acc[m][j][3]);
      }
  }
};

// fp32, weights W[o, k]: lane (g, c) owns outputs o0 + 8j + g and k0 + 4c .. + 4 of each 16-wide chunk; the
// four lanes of a row are summed with shuffles at the end.
struct FwdSimt {
  static constexpr int kCols = 16, kChunk = 16, kGroup = 4, kTok = 16, kRedPad = 8, kPitchMod = 0;
  static constexpr bool kTrans = false, kMma = false;
  float acc[2][kTok];

  template <class Hook>
  __device__ __forceinline__ void run(const StageParams& p, const float* w, int o0, int wk, int nwk, const float* xs,
                                      int tokens, Hook& hook) {
#pragma unroll
    for (int j = 0; j < 2; ++j)
#pragma unroll
      for (int t = 0; t < kTok; ++t) acc[j][t] = 0.f;
    stream_weight_rows<kChunk, kGroup, 4>(p, w, o0, wk, nwk, hook, [&](int k, const uint4 (&v)[2]) {
#pragma unroll
      for (int t = 0; t < kTok; ++t) {
        if (t >= tokens) break;
        const float4 x = *reinterpret_cast<const float4*>(xs + t * p.pitch + k);
#pragma unroll
        for (int j = 0; j < 2; ++j) {
          float s = acc[j][t];
          s = fmaf(__uint_as_float(v[j].x), x.x, s);
          s = fmaf(__uint_as_float(v[j].y), x.y, s);
          s = fmaf(__uint_as_float(v[j].z), x.z, s);
          acc[j][t] = fmaf(__uint_as_float(v[j].w), x.w, s);
        }
      }
    });
#pragma unroll
    for (int j = 0; j < 2; ++j)
#pragma unroll
      for (int t = 0; t < kTok; ++t) {
        acc[j][t] += __shfl_xor_sync(0xffffffffu, acc[j][t], 1);
        acc[j][t] += __shfl_xor_sync(0xffffffffu, acc[j][t], 2);
      }
  }

  __device__ __forceinline__ void store(float* red, int rp, int col0, int) const {
    const int lane = threadIdx.x & 31, g = lane >> 2, c = lane & 3;
#pragma unroll
    for (int t = 0; t < kTok; ++t)
      if ((t & 3) == c)
#pragma unroll
        for (int j = 0; j < 2; ++j) red[t * rp + col0 + 8 * j + g] = acc[j][t];
  }
};

// fp32, weights W[k, o]: lane (g, c) owns row k0 + g of each 8-row chunk and columns o0 + 4c .. + 4; the eight
// lanes of a column are summed with shuffles at the end.
struct TransSimt {
  static constexpr int kCols = 16, kChunk = 8, kGroup = 4, kTok = 16, kRedPad = 4, kPitchMod = 0;
  static constexpr bool kTrans = true, kMma = false;
  float acc[4][kTok];

  template <class Hook>
  __device__ __forceinline__ void run(const StageParams& p, const float* w, int o0, int wk, int nwk, const float* xs,
                                      int tokens, Hook& hook) {
    const int lane = threadIdx.x & 31, g = lane >> 2, c = lane & 3, K = p.K, n_o = p.n_o;
    const int nch = (K + kChunk - 1) / kChunk, col = o0 + 4 * c, ncol = n_o - col;
#pragma unroll
    for (int e = 0; e < 4; ++e)
#pragma unroll
      for (int t = 0; t < kTok; ++t) acc[e][t] = 0.f;
    for (int base = wk; base < nch; base += nwk * kGroup) {
      uint4 v[kGroup];
#pragma unroll
      for (int i = 0; i < kGroup; ++i) {
        const int r = (base + i * nwk) * kChunk + g;
        v[i] = load_weights16(w + r * n_o + col, r < K ? ncol : 0, p.w_vec);
      }
      hook(base + nwk * kGroup >= nch);
#pragma unroll
      for (int i = 0; i < kGroup; ++i) {
        const int ch = base + i * nwk;
        if (ch >= nch) break;
        const int r = ch * kChunk + g;
#pragma unroll
        for (int t = 0; t < kTok; ++t) {
          if (t >= tokens) break;
          const float y = xs[t * p.pitch + r];
          acc[0][t] = fmaf(__uint_as_float(v[i].x), y, acc[0][t]);
          acc[1][t] = fmaf(__uint_as_float(v[i].y), y, acc[1][t]);
          acc[2][t] = fmaf(__uint_as_float(v[i].z), y, acc[2][t]);
          acc[3][t] = fmaf(__uint_as_float(v[i].w), y, acc[3][t]);
        }
      }
    }
#pragma unroll
    for (int e = 0; e < 4; ++e)
#pragma unroll
      for (int t = 0; t < kTok; ++t) {
        acc[e][t] += __shfl_xor_sync(0xffffffffu, acc[e][t], 4);
        acc[e][t] += __shfl_xor_sync(0xffffffffu, acc[e][t], 8);
        acc[e][t] += __shfl_xor_sync(0xffffffffu, acc[e][t], 16);
      }
  }

  __device__ __forceinline__ void store(float* red, int rp, int col0, int) const {
    const int lane = threadIdx.x & 31, g = lane >> 2, c = lane & 3;
#pragma unroll
    for (int t = 0; t < kTok; ++t)
      if ((t & 7) == g)
#pragma unroll
        for (int e = 0; e < 4; ++e) red[t * rp + col0 + 4 * c + e] = acc[e][t];
  }
};

// ------------------------------------------------------------------------------------ stage pieces

// This CTA's tasks of a stage: a contiguous range (so consecutive tasks mostly share their block's input),
// the first tasks % gridDim.x CTAs taking one task more; 32-bit arithmetic.
__device__ __forceinline__ int task_begin(int tasks, int cta) {
  const int q = tasks / static_cast<int>(gridDim.x), r = tasks - q * static_cast<int>(gridDim.x);
  return cta * q + min(cta, r);
}

// xs[t][j] = input (t, blk, j) for t < tokens, j < kpad (zero past K and past the input's columns). Each
// thread issues kBatch loads before storing any, so a row's latency is paid once per batch, not per token.
template <typename T>
__device__ void stage_input(const StageParams& p, int blk, int tokens, int kpad, T* xs) {
  constexpr int kBatch = 4;
  const DecodeStage& s = p.s;
  const T* in = static_cast<const T*>(s.in);
  const int64_t c0 = blk * s.in_bs;
  const int K = p.K;
  if (p.in_vec) {  // in_js == in_fs == 1, rows and block starts 16-byte aligned
    constexpr int E = 16 / sizeof(T);
    const int nvec = kpad / E, total = tokens * nvec;
    for (int base = threadIdx.x; base < total; base += kBatch * kThreads) {
      uint4 v[kBatch];
#pragma unroll
      for (int u = 0; u < kBatch; ++u) {
        const int i = base + u * kThreads, t = i / nvec, j = (i - t * nvec) * E;
        const T* src = in + t * s.in_ts + c0 + j;
        const int64_t n = i < total ? min(static_cast<int64_t>(K - j), s.in_cols - c0 - j) : 0;
        if (n >= E) {
          v[u] = __ldcg(reinterpret_cast<const uint4*>(src));
        } else {
          T e[E];
#pragma unroll
          for (int q = 0; q < E; ++q) e[q] = q < n ? load_input(src + q) : from_f<T>(0.f);
          v[u] = *reinterpret_cast<const uint4*>(e);
        }
      }
#pragma unroll
      for (int u = 0; u < kBatch; ++u) {
        const int i = base + u * kThreads, t = i / nvec, j = (i - t * nvec) * E;
        if (i < total) *reinterpret_cast<uint4*>(xs + t * p.pitch + j) = v[u];
      }
    }
  } else {  // strided or gathered (P2ᵀ) input: element loads
    constexpr int kElems = 2 * kBatch;
    const int total = tokens * kpad;
    for (int base = threadIdx.x; base < total; base += kElems * kThreads) {
      T v[kElems];
#pragma unroll
      for (int u = 0; u < kElems; ++u) {
        const int i = base + u * kThreads, t = i / kpad, j = i - t * kpad;
        const int64_t col = c0 + static_cast<int64_t>(j) * s.in_js;
        v[u] = (i < total && j < K && col < s.in_cols) ? load_input(in + t * s.in_ts + col * s.in_fs) : from_f<T>(0.f);
      }
#pragma unroll
      for (int u = 0; u < kElems; ++u) {
        const int i = base + u * kThreads, t = i / kpad, j = i - t * kpad;
        if (i < total) xs[t * p.pitch + j] = v[u];
      }
    }
  }
}

// Sums the partials of a finished task and writes its outputs (bias, activation, permuted column).
template <typename T>
__device__ void finish_task(const StageParams& p, int blk, int o_tile0, int tile_log2, int nwk, int red_slice,
                            const float* red, int tokens) {
  const DecodeStage& s = p.s;
  T* out = static_cast<T*>(s.out);
  const T* bias = static_cast<const T*>(s.bias);
  const int mask = (1 << tile_log2) - 1;
  for (int e = threadIdx.x; e < (tokens << tile_log2); e += kThreads) {
    const int t = e >> tile_log2, col = e & mask, o = o_tile0 + col;
    if (o >= p.n_o) continue;
    float v = 0.f;
    for (int wk = 0; wk < nwk; ++wk) v += red[wk * red_slice + t * p.red_pitch + col];
    const unsigned f = static_cast<unsigned>(blk) * static_cast<unsigned>(p.n_o) + static_cast<unsigned>(o);
    const unsigned idx = p.out_a ? (f % p.out_a) * p.out_b + f / p.out_a : f;
    if (idx >= s.out_cols) continue;
    if (bias) v += to_f(bias[idx]);
    out[t * s.out_ts + idx] = activate_to<T>(v, s.act);
  }
}

template <class Tile>
__device__ __forceinline__ int log2_cols() {
  return Tile::kCols == 32 ? 5 : 4;
}

// Token rows staged in shared memory: whole 16-row mma tiles for fp16/bf16, the fp32 tiles' fixed 16.
template <class Tile>
__host__ __device__ __forceinline__ int token_rows(int tokens) {
  return Tile::kMma ? (tokens + 15) / 16 * 16 : Tile::kTok;
}

// Prefetches into L2 this thread's share of the weights its CTA will read in the next stage (the first `share`
// / 1024 of each task's rows or columns: all of them when the factor fits the L2 budget): once, on the first
// call that is `armed` (the CTA's last task of the stage) and at a warp's `last_group` of weight loads, so the
// stage's own weights are requested first; nothing when `next` is null. One hook type for both stages, so each
// stage loop is compiled once.
template <class Tile, typename T>
struct L2Prefetch {
  const StageParams* next;
  int share;
  bool armed;
  __device__ void operator()(bool last_group = true) {
    if (next == nullptr || !armed || !last_group) return;
    const StageParams& p = *next;
    next = nullptr;
    const DecodeStage& s = p.s;
    const int tile_log2 = log2_cols<Tile>() + p.wr_log2;
    const int end = task_begin(p.tasks, blockIdx.x + 1);
    const char* w = static_cast<const char*>(s.w);
    for (int task = task_begin(p.tasks, blockIdx.x); task < end; ++task) {
      const int blk = task / p.tiles, o_lo = (task - blk * p.tiles) << tile_log2;
      const int o_hi = min(o_lo + (1 << tile_log2), p.n_o);
      const char* base;
      int64_t nseg, seg_bytes, stride;
      if (!Tile::kTrans) {  // rows o_lo .. o_hi of the block: one contiguous range
        base = w + (static_cast<int64_t>(blk) * s.rows + o_lo) * s.cols * sizeof(T);
        nseg = 1;
        seg_bytes = (o_hi - o_lo) * s.cols * static_cast<int64_t>(sizeof(T));
        stride = 0;
      } else {  // columns o_lo .. o_hi of every row of the block
        base = w + (static_cast<int64_t>(blk) * s.rows * s.cols + o_lo) * sizeof(T);
        nseg = s.rows;
        seg_bytes = (o_hi - o_lo) * static_cast<int64_t>(sizeof(T));
        stride = s.cols * static_cast<int64_t>(sizeof(T));
      }
      // 128-byte lines; one more covers a misaligned start. Counts stay below 2^31 (weights < 2^31 elements),
      // so the per-line division is 32-bit.
      int lines = static_cast<int>(seg_bytes / 128) + 2, segs = static_cast<int>(nseg);
      if (segs == 1) {
        lines = (lines * share + 1023) >> 10;  // the first part of the range
      } else {
        segs = (segs * share + 1023) >> 10;  // the first rows
      }
      const int total = segs * lines;
      for (int i = threadIdx.x; i < total; i += kThreads) {
        const int seg = i / lines, l = i - seg * lines;
        prefetch_l2(base + seg * stride + min(static_cast<int64_t>(l) * 128, seg_bytes - 1));
      }
    }
    __syncwarp();  // reconverge before the warp's next mma/movmatrix
  }
};

template <class Tile, typename T, class Hook>
__device__ void run_stage(const StageParams& p, int tokens, T* xs, float* red, Hook& hook) {
  const int warp = threadIdx.x >> 5, wr = warp & ((1 << p.wr_log2) - 1), wk = warp >> p.wr_log2;
  const int nwk = kWarps >> p.wr_log2, tile_log2 = log2_cols<Tile>() + p.wr_log2;
  const int kpad = (p.K + Tile::kChunk - 1) / Tile::kChunk * Tile::kChunk;
  const int red_slice = token_rows<Tile>(tokens) * p.red_pitch;
  const int end = task_begin(p.tasks, blockIdx.x + 1);
  const T* w = static_cast<const T*>(p.s.w);
  const int block_numel = static_cast<int>(p.s.rows * p.s.cols);
  int staged = -1;
  for (int task = task_begin(p.tasks, blockIdx.x); task < end; ++task) {
    const int blk = task / p.tiles, o_tile0 = (task - blk * p.tiles) << tile_log2;
    if (blk != staged) {
      __syncthreads();  // the previous block's input is no longer read
      stage_input<T>(p, blk, tokens, kpad, xs);
      __syncthreads();
      staged = blk;
    }
    const int o0 = o_tile0 + wr * Tile::kCols;
    hook.armed = task + 1 == end;  // prefetch after the CTA's last weight loads of this stage
    if (o0 < p.n_o) {  // warp-uniform
      Tile tile;
      tile.run(p, w + static_cast<int64_t>(blk) * block_numel, o0, wk, nwk, xs, tokens, hook);
      tile.store(red + wk * red_slice, p.red_pitch, wr * Tile::kCols, tokens);
    }
    __syncthreads();
    finish_task<T>(p, blk, o_tile0, tile_log2, nwk, red_slice, red, tokens);
    __syncthreads();  // the partial sums are read before the next task overwrites them
  }
}

template <class Tile, typename T>
__global__ void __launch_bounds__(kThreads, 1) decode_kernel(const __grid_constant__ Params P) {
  extern __shared__ __align__(16) unsigned char smem[];
  T* xs = reinterpret_cast<T*>(smem);
  float* red = reinterpret_cast<float*>(smem + P.xs_bytes);
  L2Prefetch<Tile, T> prefetch{P.nstages == 2 && P.prefetch_share > 0 ? &P.st[1] : nullptr, P.prefetch_share, false};
  run_stage<Tile, T>(P.st[0], P.tokens, xs, red, prefetch);
  if (P.nstages == 2) {
    prefetch.armed = true;
    prefetch();  // threads whose warp had no stage-1 weights to load
    cg::this_grid().sync();  // stage 1's scratch writes are visible to every CTA
    run_stage<Tile, T>(P.st[1], P.tokens, xs, red, prefetch);  // the hook is spent: no prefetch
  }
}

// ------------------------------------------------------------------------------------ host side

int64_t round_up(int64_t a, int64_t b) { return (a + b - 1) / b * b; }

bool aligned16(const void* p) { return reinterpret_cast<uintptr_t>(p) % 16 == 0; }

// Fills the shape, layout and range fields of one stage; false when the stage is outside the kernels' ranges.
template <class Tile, typename T>
bool describe(const DecodeStage& s, StageParams& p) {
  constexpr int64_t E = 16 / sizeof(T), kLimit = INT_MAX;
  if (s.trans != Tile::kTrans || s.nblk < 1 || s.rows < 1 || s.cols < 1) return false;
  if (s.nblk * (s.rows + 64) * (s.cols + 64) > kLimit) return false;  // masked rows/columns stay in range too
  p.s = s;
  p.K = static_cast<int>(Tile::kTrans ? s.rows : s.cols);
  p.n_o = static_cast<int>(Tile::kTrans ? s.cols : s.rows);
  if ((s.nblk - 1) * s.in_bs + (p.K - 1) * s.in_js > kLimit || s.in_cols > kLimit || s.in_bs < 0 || s.in_js < 0)
    return false;
  if (s.out_a < 0 || s.out_b < 0 || s.out_cols < 1 || s.out_cols > kLimit) return false;
  const int64_t flat = s.nblk * p.n_o;  // output index range before the permutation
  if (flat > UINT_MAX || (s.out_a > 0 && (s.out_a - 1) * s.out_b + flat / s.out_a > UINT_MAX)) return false;
  p.out_a = static_cast<unsigned>(s.out_a);
  p.out_b = static_cast<unsigned>(s.out_b);
  const int64_t kpad = round_up(p.K, Tile::kChunk);
  p.pitch = static_cast<int>(Tile::kPitchMod ? round_up(kpad, 128 / sizeof(T)) + Tile::kPitchMod / sizeof(T) : kpad);
  p.w_vec = aligned16(s.w) && s.cols % E == 0;
  p.in_vec = aligned16(s.in) && s.in_js == 1 && s.in_fs == 1 && s.in_ts % E == 0 && s.in_bs % E == 0;
  return true;
}

// Splits a stage's tasks for a grid of `ctas`: the warp layout that minimises the chunks on the critical
// path (tasks per CTA x chunks per warp, plus two chunks' worth of staging and reduction per task).
template <class Tile>
void schedule(StageParams& p, int ctas) {
  const int64_t nch = (p.K + Tile::kChunk - 1) / Tile::kChunk;
  int64_t best = -1;
  for (int w = 0; w <= 3; ++w) {
    const int64_t tiles = (p.n_o + (Tile::kCols << w) - 1) / (Tile::kCols << w), tasks = p.s.nblk * tiles;
    const int64_t cost = (tasks + ctas - 1) / ctas * ((nch + (kWarps >> w) - 1) / (kWarps >> w) + 2);
    if (best < 0 || cost <= best) {
      best = cost;
      p.wr_log2 = w;
      p.tiles = static_cast<int>(tiles);
      p.tasks = static_cast<int>(tasks);
    }
  }
  p.red_pitch = (Tile::kCols << p.wr_log2) + Tile::kRedPad;
}

// Largest partial-sum buffer over the warp layouts (bytes) for `rows` token rows.
template <class Tile>
int red_bytes(int rows) {
  int most = 0;
  for (int w = 0; w <= 3; ++w)
    most = std::max(most, (kWarps >> w) * rows * ((Tile::kCols << w) + Tile::kRedPad) * 4);
  return most;
}

template <class Tile, typename T>
struct Launch {
  Params P{};
  int smem = 0, ctas = 0;

  // false when the stages are outside the kernel's ranges or do not fit the device
  bool plan(int64_t tokens, const DecodeStage* st, int nstages, int device) {
    if (tokens < 1 || tokens > Tile::kTok || nstages < 1 || nstages > 2) return false;
    const DeviceInfo& dev = device_info(device);
    if (nstages == 2 && !dev.cooperative) return false;
    int pitch = 0;
    for (int i = 0; i < nstages; ++i) {
      if (!describe<Tile, T>(st[i], P.st[i])) return false;
      pitch = std::max(pitch, P.st[i].pitch);
    }
    P.nstages = nstages;
    P.tokens = static_cast<int>(tokens);
    const int rows = token_rows<Tile>(P.tokens);
    P.xs_bytes = static_cast<int>(round_up(static_cast<int64_t>(rows) * pitch * sizeof(T), 16));
    smem = P.xs_bytes + red_bytes<Tile>(rows);
    if (smem > dev.smem_optin) return false;
    const int per_sm = resident_ctas(reinterpret_cast<const void*>(&decode_kernel<Tile, T>), device, kThreads, smem);
    if (per_sm < 1) return false;
    const int slots = per_sm * dev.sms;
    int most = 0;
    for (int i = 0; i < nstages; ++i) {
      schedule<Tile>(P.st[i], slots);
      most = std::max(most, P.st[i].tasks);
    }
    ctas = std::min(slots, most);
    const int64_t next_bytes = nstages == 2 ? st[1].nblk * st[1].rows * st[1].cols * static_cast<int64_t>(sizeof(T)) : 0;
    const int64_t budget = static_cast<int64_t>(dev.l2_bytes) * 3 / 5;  // what stage 2 may keep in L2
    P.prefetch_share = nstages < 2 ? 0 : next_bytes <= budget ? 1024 : static_cast<int>(budget * 1024 / next_bytes);
    return true;
  }

  cudaError_t run(cudaStream_t stream) {
    cudaLaunchConfig_t cfg = {};
    cfg.gridDim = dim3(static_cast<unsigned>(ctas));
    cfg.blockDim = dim3(kThreads);
    cfg.dynamicSmemBytes = static_cast<size_t>(smem);
    cfg.stream = stream;
    cudaLaunchAttribute attr[1];
    attr[0].id = cudaLaunchAttributeCooperative;
    attr[0].val.cooperative = 1;
    cfg.attrs = attr;
    cfg.numAttrs = P.nstages == 2 ? 1 : 0;
    return cudaLaunchKernelEx(&cfg, decode_kernel<Tile, T>, P);
  }
};

// Calls fn.template go<Tile, T>() with the kernel for this dtype, orientation and token count.
template <class Fn>
auto with_kernel(DType dt, bool trans, int64_t tokens, Fn& fn) {
  switch (dt) {
    case DType::F32:
      return trans ? fn.template go<TransSimt, float>() : fn.template go<FwdSimt, float>();
    case DType::F16:  // one 16-row m-tile up to 16 tokens (more CTAs per SM), else up to four (as many as needed)
      if (tokens <= 16) return trans ? fn.template go<TransMma<__half, 1>, __half>() : fn.template go<FwdMma<__half, 1>, __half>();
      return trans ? fn.template go<TransMma<__half, 4>, __half>() : fn.template go<FwdMma<__half, 4>, __half>();
    default:
      if (tokens <= 16)
        return trans ? fn.template go<TransMma<__nv_bfloat16, 1>, __nv_bfloat16>() : fn.template go<FwdMma<__nv_bfloat16, 1>, __nv_bfloat16>();
      return trans ? fn.template go<TransMma<__nv_bfloat16, 4>, __nv_bfloat16>() : fn.template go<FwdMma<__nv_bfloat16, 4>, __nv_bfloat16>();
  }
}

struct Request {
  int64_t tokens;
  const DecodeStage* st;
  int nstages, device;
  cudaStream_t stream;
  bool execute;

  template <class Tile, typename T>
  cudaError_t go() {
    Launch<Tile, T> l;
    if (!l.plan(tokens, st, nstages, device)) return cudaErrorNotSupported;
    return execute ? l.run(stream) : cudaSuccess;
  }
};

// ------------------------------------------------------------------------------------ row-split forward

std::atomic<int> g_decode_choice{kDecodeAuto};

int itemsize(DType dt) { return dt == DType::F32 ? 4 : 2; }

template <typename T, int TB>
cudaError_t launch_rowsplit(const RowsplitPlan& P, int device, cudaStream_t stream, bool execute) {
  const void* kernel = reinterpret_cast<const void*>(&rowsplit_kernel<T, TB>);
  // also opts the kernel into the device's largest shared memory
  if (resident_ctas(kernel, device, kRowsplitThreads, P.smem) < 1) return cudaErrorNotSupported;
  if (!execute) return cudaSuccess;
  rowsplit_kernel<T, TB><<<dim3(static_cast<unsigned>(P.l), static_cast<unsigned>(P.splits)), kRowsplitThreads,
                           static_cast<size_t>(P.smem), stream>>>(P);
  return cudaGetLastError();
}

template <typename T>
cudaError_t launch_rowsplit(const RowsplitPlan& P, int device, cudaStream_t stream, bool execute) {
  if (P.tokens <= 1) return launch_rowsplit<T, 1>(P, device, stream, execute);
  if (P.tokens <= 4) return launch_rowsplit<T, 4>(P, device, stream, execute);
  return launch_rowsplit<T, 16>(P, device, stream, execute);
}

cudaError_t rowsplit(DType dt, const MonarchFwdArgs& a, int device, cudaStream_t stream, bool execute) {
  if (g_decode_choice.load(std::memory_order_relaxed) != kDecodeRowsplit) return cudaErrorNotSupported;
  const DeviceInfo& dev = device_info(device);
  RowsplitPlan P;
  if (!rowsplit_plan(a, itemsize(dt), dev.sms, dev.smem_optin, P)) return cudaErrorNotSupported;
  switch (dt) {
    case DType::F32: return launch_rowsplit<float>(P, device, stream, execute);
    case DType::F16: return launch_rowsplit<__half>(P, device, stream, execute);
    default: return launch_rowsplit<__nv_bfloat16>(P, device, stream, execute);
  }
}

}  // namespace

void set_decode_choice(DecodeChoice c) { g_decode_choice.store(c, std::memory_order_relaxed); }
DecodeChoice decode_choice() { return static_cast<DecodeChoice>(g_decode_choice.load(std::memory_order_relaxed)); }

bool decode_rowsplit_supported(DType dt, const MonarchFwdArgs& a, int device) {
  return rowsplit(dt, a, device, nullptr, false) == cudaSuccess;
}

cudaError_t decode_rowsplit_run(DType dt, const MonarchFwdArgs& a, int device, cudaStream_t stream) {
  return rowsplit(dt, a, device, stream, true);
}

int decode_max_tokens(DType dt) { return dt == DType::F32 ? 16 : 64; }

bool decode_supported(DType dt, int64_t tokens, const DecodeStage* stages, int nstages, int device) {
  if (tokens < 1 || tokens > decode_max_tokens(dt) || nstages < 1) return false;
  Request r{tokens, stages, nstages, device, nullptr, false};
  return with_kernel(dt, stages[0].trans, tokens, r) == cudaSuccess;
}

cudaError_t decode_run(DType dt, int64_t tokens, const DecodeStage* stages, int nstages, int device,
                       cudaStream_t stream) {
  if (tokens < 1 || tokens > decode_max_tokens(dt) || nstages < 1) return cudaErrorNotSupported;
  Request r{tokens, stages, nstages, device, stream, true};
  return with_kernel(dt, stages[0].trans, tokens, r);
}

}  // namespace monarch_cuda
