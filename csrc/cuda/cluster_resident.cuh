// Many-token square Monarch forward whose factors are spread over a thread-block cluster ("cluster resident"
// kernel): plan and kernel.
//
// out = act(P2·BD(w2)·P1·BD(w1)·x + bias) for square Monarch with c = 1: nb blocks of nb x nb in both factors
// (n = nb², e.g. 4096 features in 64 blocks). Its factors (2 x 512 KiB of bf16 at 4096) do not fit in one SM,
// but 1/C of them does, for a cluster of C = nb / 8 CTAs (8 at 4096): CTA c of a cluster owns stage-1 blocks
// and stage-2 blocks 8c .. 8c + 7, one of each per warp, and each warp holds its two blocks in registers as mma
// B fragments, loaded once (2 x 64 registers at nb = 64; shared memory then carries activations only). With
// c = 1, stage-1 block kk's output column qq is stage-2 block qq's input row kk (P1), so a CTA's stage-1 results
// for one token and one stage-2 block are 8
// consecutive elements (rr = 8c .. 8c + 7): 16 bytes, pushed into the owning CTA's shared memory through the
// cluster's distributed shared memory. HBM traffic is x and the output once, as for the one-CTA resident kernel
// (resident.cuh), and the intermediate never leaves the cluster. Per 32-token tile (two mma row tiles):
//
// * x: this CTA's 8 blocks' columns (8·nb contiguous elements per token row) by cp.async into a double buffer,
//   issued two tiles ahead;
// * stage 1 on mma.sync m16n8k16 with the warp's register-held w1 block, results rounded to the input dtype
//   into a local staging buffer laid out [token][qq][8 own blocks], so that each (token, stage-2 block) is one
//   16-byte chunk;
// * the 16-byte pushes into the owners' intermediate buffers (three, used in turn), then a cluster barrier
//   (arrive now, wait only before the next tile's pushes: stage 2 of the previous tile and stage 1 of the next
//   run while it resolves);
// * stage 2 from the intermediate and the warp's register-held w2 block, bias + activation in fp32, results
//   written to the staging buffer laid out [token][ss][8 own blocks]: output columns ss·nb + 8c .. + 7, i.e.
//   16-byte global stores (the neighbouring CTA writes the other half of each 32-byte sector).
//
// With a.z set (a training forward keeping the intermediate), each CTA also stores its intermediate buffer's
// rows beside stage 2: columns 8c·nb .. 8c·nb + 8·nb − 1 of z in stage 2's order, 16 bytes per store.
//
// The emulation (tests/cuda_sim/sim.h) lets the last CTA of a cluster resume late after every barrier arrive, so
// that a buffer reused too early (two intermediate buffers instead of three) shows as wrong results there.
//
// Clusters walk the tiles (tile = cluster id, += number of clusters). Declines all but: fp16/bf16, k = l = nb,
// p = q = r = s = nb with nb in {16, 32, 64}, n_in = n_out = nb², aligned unit-stride rows, and the buffers within
// shared memory (199,680 bytes at nb = 64).
//
// Plain C++ apart from the CUDA builtins below, so tests/cuda_sim runs this very kernel on a CPU (the CTAs of
// a cluster as concurrent thread groups, distributed shared memory as pointers into each other's buffers).
#pragma once

#include <climits>
#include <cstdint>
#include <cstring>

#include "epilogue.cuh"
#include "mma.cuh"
#include "monarch_kernels.cuh"
#include "resident.cuh"

namespace monarch_cuda {

constexpr int kClusterThreads = 256;  // 8 warps: one stage-1 and one stage-2 block each
constexpr int kClusterRows = 32;      // tokens per tile: two mma row tiles share every weight fragment
constexpr int kClusterZBuffers = 3;   // intermediate buffers: tile it's in it % 3 (the loop's comment says why)
static_assert(kClusterThreads == kResidentThreads, "stage_rows() strides by kResidentThreads");

struct ClusterPlan {
  const void* x;
  const void* w1;
  const void* w2;
  const void* bias;
  void* out;
  void* z;  // the kept intermediate, or null
  int64_t x_ts, out_ts, z_ts, tokens;
  int nb;        // blocks per factor = block side
  int cluster;   // CTAs per cluster (nb / 8)
  int pitch;     // elements per token row of the x, staging and intermediate buffers (8·nb + 8)
  int tiles, clusters, smem, act;
};

// Fills P for `a` on a device with `sms` SMs and `smem_optin` bytes of shared memory per block; false when the
// cluster kernel does not take the call. `itemsize` 2 (fp16/bf16) or 4 (always declined). The launcher caps
// `clusters` by how many the device can co-schedule.
inline bool cluster_plan(const MonarchFwdArgs& a, int itemsize, int sms, int smem_optin, ClusterPlan& P) {
  if (itemsize != 2 || a.tokens < 1) return false;
  const int64_t nb = a.k;
  if ((nb != 16 && nb != 32 && nb != 64) || a.l != nb || a.q != nb || a.p != nb || a.r != nb || a.s != nb)
    return false;
  if (a.n_in != nb * nb || a.n_out != nb * nb) return false;
  if (!rows_vectorizable(a)) return false;
  const int64_t tiles = (a.tokens + kClusterRows - 1) / kClusterRows;
  if (tiles > INT_MAX / 2) return false;
  P = ClusterPlan{};
  P.x = a.x, P.w1 = a.w1, P.w2 = a.w2, P.bias = a.bias, P.out = a.out, P.z = a.z;
  P.x_ts = a.x_ts, P.out_ts = a.out_ts, P.z_ts = a.z_ts, P.tokens = a.tokens, P.act = a.act;
  P.nb = static_cast<int>(nb), P.cluster = P.nb / 8;
  P.pitch = 8 * P.nb + 8;
  // 6 buffers: two for x, the staging / output buffer, three for the intermediate (the weights are in registers)
  const int64_t smem = 2 * (6 * static_cast<int64_t>(kClusterRows) * P.pitch);
  if (smem > smem_optin) return false;
  P.smem = static_cast<int>(smem);
  P.tiles = static_cast<int>(tiles);
  const int most = sms / P.cluster;
  if (most < 1) return false;
  P.clusters = P.tiles < most ? P.tiles : most;
  return true;
}

// ------------------------------------------------------------------------------------ device side

// Two consecutive 16-bit elements of global memory (4-byte aligned), through the read-only path.
__device__ __forceinline__ uint32_t ldg32(const void* p) {
#ifdef MONARCH_CUDA_SIM
  uint32_t v;
  std::memcpy(&v, p, 4);
  return v;
#else
  return __ldg(static_cast<const unsigned int*>(p));
#endif
}

__device__ __forceinline__ unsigned cluster_rank() {
#ifdef MONARCH_CUDA_SIM
  return sim::cluster_rank();
#else
  unsigned r;
  asm volatile("mov.u32 %0, %%cluster_ctarank;" : "=r"(r));
  return r;
#endif
}

// The split cluster barrier: arrive (release: this thread's shared-memory accesses so far are ordered before
// it) and wait (acquire: every thread of the cluster has arrived). Every thread calls both, in turn.
__device__ __forceinline__ void cluster_arrive() {
#ifdef MONARCH_CUDA_SIM
  sim::cluster_arrive();
#else
  asm volatile("barrier.cluster.arrive.release.aligned;" ::: "memory");
#endif
}

__device__ __forceinline__ void cluster_wait() {
#ifdef MONARCH_CUDA_SIM
  sim::cluster_wait();
#else
  asm volatile("barrier.cluster.wait.acquire.aligned;" ::: "memory");
#endif
}

// The address of `p` (in this CTA's shared memory) in the shared memory of cluster rank `rank`.
template <typename T>
__device__ __forceinline__ T* cluster_map(T* p, unsigned rank) {
#ifdef MONARCH_CUDA_SIM
  return sim::map_shared_rank(p, rank);
#else
  const uint64_t local = reinterpret_cast<uint64_t>(p);
  uint64_t remote;
  asm volatile("mapa.u64 %0, %1, %2;" : "=l"(remote) : "l"(local), "r"(rank));
  return reinterpret_cast<T*>(remote);
#endif
}

template <typename T, int NB>
__global__ void __launch_bounds__(kClusterThreads, 1) cluster_kernel(const __grid_constant__ ClusterPlan P) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ < 900
  __trap();  // clusters need sm_90; the launcher never starts it elsewhere
#else
#ifdef MONARCH_CUDA_SIM
  T* smem = reinterpret_cast<T*>(sim::dynamic_smem());
#else
  extern __shared__ __align__(16) unsigned char smem_raw[];
  T* smem = reinterpret_cast<T*>(smem_raw);
#endif
  constexpr int KS = NB / 16, NT = NB / 8;  // k16 steps and 8-column tiles per block
  const int pitch = P.pitch, buf = kClusterRows * pitch;
  T* const stage = smem + 2 * buf;  // [t][qq][8 own stage-1 blocks], then the output tile [t][ss][8 own blocks]
  T* const zbuf = smem + 3 * buf;   // intermediate buffers [t][8 own stage-2 blocks][rr]: tile it in it % 3
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, g = lane >> 2, c = lane & 3;
  const unsigned rank = cluster_rank();
  const int own = 8 * static_cast<int>(rank);  // first block of this CTA in both factors
  const T* x = static_cast<const T*>(P.x);
  T* out = static_cast<T*>(P.out);
  const T* bias = static_cast<const T*>(P.bias);

  // the tiles of this cluster: first + it·step for it < ntiles (the same for every CTA of the cluster)
  const int first = blockIdx.x / P.cluster, step = gridDim.x / P.cluster;
  const int ntiles = first < P.tiles ? (P.tiles - 1 - first) / step + 1 : 0;
  const auto load_x = [&](int it) {  // x columns of this CTA's 8 blocks for the cluster's it-th tile
    const int64_t t0 = static_cast<int64_t>(first + it * step) * kClusterRows;
    stage_rows<T>(smem + (it & 1) * buf, pitch, x + t0 * P.x_ts + own * NB, P.x_ts, kClusterRows, 8 * NB,
                  P.tokens - t0);
  };
  // the first two tiles' x columns (one cp.async group each, possibly empty); the warp's w1 and w2 blocks as B
  // fragments in registers: b1[nt][ks] = w1[own + warp][8nt + g][16ks + 2c (+ 8)], b2 likewise from w2
  if (ntiles > 0) load_x(0);
  cp_async_commit();
  if (ntiles > 1) load_x(1);
  cp_async_commit();
  uint32_t b1[NT][KS][2], b2[NT][KS][2];
  {
    const int64_t block = static_cast<int64_t>(own + warp) * NB * NB;
    const T* w1 = static_cast<const T*>(P.w1) + block;
    const T* w2 = static_cast<const T*>(P.w2) + block;
#pragma unroll
    for (int nt = 0; nt < NT; ++nt)
#pragma unroll
      for (int ks = 0; ks < KS; ++ks) {
        const int at = (8 * nt + g) * NB + 16 * ks + 2 * c;
        b1[nt][ks][0] = ldg32(w1 + at), b1[nt][ks][1] = ldg32(w1 + at + 8);
        b2[nt][ks][0] = ldg32(w2 + at), b2[nt][ks][1] = ldg32(w2 + at + 8);
      }
  }
  cluster_arrive();  // every CTA of the cluster has started before anyone writes into its shared memory
  cluster_wait();

  // Iteration it: stage 1 of tile it, the pushes of tile it, stage 2 of tile it - 1 — one cluster barrier per
  // tile (B_it: arrived after the pushes of tile it, waited for at the top of the next iteration, so stage 2 of
  // tile it - 1 and stage 1 of tile it + 1 run while it resolves). Tile it's intermediate lives in buffer it % 3:
  // pushes into it wait for B_(it-1), by which every CTA has finished stage 2 of tile it - 3 (it ran before that
  // CTA arrived at B_(it-1)), the last reader of that buffer.
  for (int it = 0; it <= ntiles; ++it) {
    if (it < ntiles) {
      cp_async_wait<1>();  // tile it's x columns (all but the newest group)
      __syncthreads();
      const T* cur = smem + (it & 1) * buf;
      // stage 1, block own + warp: u[t][qq] = Σ_pp w1[qq][pp] · x[t][warp·NB + pp] -> stage[t][qq][warp]
#pragma unroll
      for (int m = 0; m < 2; ++m) {
        uint32_t a[KS][4];
        const T* r0 = cur + (16 * m + g) * pitch + warp * NB + 2 * c;
        const T* r8 = r0 + 8 * pitch;
#pragma unroll
        for (int ks = 0; ks < KS; ++ks)
          a[ks][0] = lds32(r0 + 16 * ks), a[ks][1] = lds32(r8 + 16 * ks), a[ks][2] = lds32(r0 + 16 * ks + 8),
          a[ks][3] = lds32(r8 + 16 * ks + 8);
#pragma unroll
        for (int nt = 0; nt < NT; ++nt) {
          float acc[4] = {0.f, 0.f, 0.f, 0.f};
#pragma unroll
          for (int ks = 0; ks < KS; ++ks) mma16816<T>(acc, a[ks], b1[nt][ks][0], b1[nt][ks][1]);
          // element warp of the 16-byte group (t, qq), swizzled with key (qq >> 1) & 3 = c (resident.cuh: swizzle)
          T* s0 = stage + (16 * m + g) * pitch + (8 * nt + 2 * c) * 8 + swizzle(warp, c);
          s0[0] = from_f<T>(acc[0]), s0[8] = from_f<T>(acc[1]);
          s0[8 * pitch] = from_f<T>(acc[2]), s0[8 * pitch + 8] = from_f<T>(acc[3]);
        }
      }
      __syncthreads();  // the staging buffer is complete; tile it's x buffer is free: tile it + 2's columns
      if (it + 2 < ntiles) load_x(it + 2);
      cp_async_commit();
    }
    if (it > 0) cluster_wait();  // B_(it-1): the pushes of tile it - 1 have landed everywhere
    if (it < ntiles) {
      // P1 across the cluster: stage[t][qq][0..7] -> buffer it % 3 of rank qq / 8 at [t][qq % 8][own .. own + 7]
      T* const z = zbuf + (it % kClusterZBuffers) * buf;
      for (int i = threadIdx.x; i < kClusterRows * NB; i += kClusterThreads) {
        const int t = i / NB, qq = i - t * NB;
        T* dst = cluster_map(z + t * pitch + (qq & 7) * NB + own, static_cast<unsigned>(qq >> 3));
        *reinterpret_cast<uint4*>(dst) =
            unswizzle(*reinterpret_cast<const uint4*>(stage + t * pitch + qq * 8), (qq >> 1) & 3);
      }
      cluster_arrive();  // B_it
    }
    if (it == 0) continue;
    __syncthreads();  // every thread's pushes have read the staging buffer: it takes the output tile now

    // stage 2 of tile it - 1, block own + warp: v[t][ss] = Σ_rr w2[ss][rr] · z[t][warp][rr]; bias, activation
    // -> stage[t][ss][warp]
    const T* const z = zbuf + ((it - 1) % kClusterZBuffers) * buf;
    const int64_t t0 = static_cast<int64_t>(first + (it - 1) * step) * kClusterRows;
    uint32_t a2[2][KS][4];
#pragma unroll
    for (int m = 0; m < 2; ++m) {
      const T* r0 = z + (16 * m + g) * pitch + warp * NB + 2 * c;
      const T* r8 = r0 + 8 * pitch;
#pragma unroll
      for (int ks = 0; ks < KS; ++ks)
        a2[m][ks][0] = lds32(r0 + 16 * ks), a2[m][ks][1] = lds32(r8 + 16 * ks),
        a2[m][ks][2] = lds32(r0 + 16 * ks + 8), a2[m][ks][3] = lds32(r8 + 16 * ks + 8);
    }
    if (P.z) {  // the kept intermediate: this CTA's columns own·nb .. + 8·nb of each token row, 16 bytes a store
      T* const kept = static_cast<T*>(P.z) + own * NB;
      for (int i = threadIdx.x; i < kClusterRows * NB; i += kClusterThreads) {
        const int t = i / NB, chunk = i - t * NB;
        if (t0 + t < P.tokens)
          *reinterpret_cast<uint4*>(kept + (t0 + t) * P.z_ts + 8 * chunk) =
              *reinterpret_cast<const uint4*>(z + t * pitch + 8 * chunk);
      }
    }
#pragma unroll
    for (int nt = 0; nt < NT; ++nt) {
      float acc[2][4] = {{0.f, 0.f, 0.f, 0.f}, {0.f, 0.f, 0.f, 0.f}};
#pragma unroll
      for (int ks = 0; ks < KS; ++ks) {
        mma16816<T>(acc[0], a2[0][ks], b2[nt][ks][0], b2[nt][ks][1]);
        mma16816<T>(acc[1], a2[1][ks], b2[nt][ks][0], b2[nt][ks][1]);
      }
#pragma unroll
      for (int j = 0; j < 2; ++j) {
        const int ss = 8 * nt + 2 * c + j, col = ss * P.nb + own + warp;
        const float bv = bias ? to_f(bias[col]) : 0.f;
#pragma unroll
        for (int m = 0; m < 2; ++m) {
          T* y = stage + (16 * m + g) * pitch + ss * 8 + swizzle(warp, c);  // key (ss >> 1) & 3 = c
          y[0] = activate_to<T>(acc[m][j] + bv, P.act);
          y[8 * pitch] = activate_to<T>(acc[m][2 + j] + bv, P.act);
        }
      }
    }
    __syncthreads();

    // output columns ss·nb + own .. + 7 of each token row: one 16-byte store per (t, ss)
    for (int i = threadIdx.x; i < kClusterRows * NB; i += kClusterThreads) {
      const int t = i / NB, ss = i - t * NB;
      if (t0 + t < P.tokens)
        *reinterpret_cast<uint4*>(out + (t0 + t) * P.out_ts + ss * P.nb + own) =
            unswizzle(*reinterpret_cast<const uint4*>(stage + t * pitch + ss * 8), (ss >> 1) & 3);
    }
    // no barrier here: the staging buffer's next writer (stage 1 of the next tile, or at the last iteration
    // stage 2) runs after a __syncthreads of its own, which orders these reads before it
  }
  cp_async_wait<0>();
#endif
}

}  // namespace monarch_cuda
