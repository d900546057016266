// Many-token Monarch forward with both factors resident in shared memory ("resident" kernel): plan and kernel.
//
// out = act(P2·BD(w2)·P1·BD(w1)·x + bias) (layout as in monarch_kernels/reference.py). When both factors fit in
// one SM's shared memory (e.g. 1024 features in 32 blocks: 2 x 64 KiB of bf16), the product needs no HBM
// traffic beyond reading x and writing out once, 2·T·n·2 bytes, against four passes for the two-kernel path
// and the 2·T·n² FLOPs of a dense layer. So one persistent CTA per SM:
//
// * loads w1 and w2 once (cp.async, 16-byte chunks) into padded rows (pitch p + 8 / r + 8 elements: the
//   32-bit fragment loads of 8 rows x 4 lanes then hit 32 different banks);
// * walks 16-token tiles (tile = blockIdx.x, += gridDim.x), double-buffered: the next tile's x rows are in
//   flight (cp.async) while the current one is multiplied;
// * stage 1 on tensor cores (mma.sync m16n8k16, fp32 accumulation), x tile rows as A, w1 rows as B: each warp
//   owns a contiguous run of 8-column output tiles and keeps their accumulators in registers; once every warp
//   has read the x tile, the results (rounded to the input dtype, as every path rounds the intermediate) are
//   written into the same buffer in stage 2's order (P1 folded into the shared-memory index, swizzled against
//   bank conflicts: swizzle());
// * stage 2 the same way from that buffer and w2, then bias + activation in fp32, and the results written in
//   output order (P2, swizzled too) into the buffer again;
// * the tile's output rows leave with 16-byte stores (whole 32-byte sectors; rows past the tokens not stored).
//
// Bytes from HBM: x and out once, the factors once per CTA (from L2 after the first). FLOPs: exactly the
// useful ones plus the padding of the last token tile. Declines (the caller takes another path) fp32, blocks
// whose sides are not whole mma tiles (p, r multiples of 16; q, s of 8; p, r ≤ 64), ragged feature counts
// (n_in ≠ k·p or n_out ≠ l·s), more than kResidentMaxUnits 8-column tiles per warp in a stage (k·q or l·s
// above 1024), misaligned or non-unit-stride rows, and factors that do not fit in shared memory.
//
// With a.z set (a training forward that keeps the intermediate for the backward), each tile's intermediate rows
// also leave, from the shared-memory buffer stage 2 reads, by 16-byte stores into z (stage 2's column order):
// T·k·q more bytes written, no more arithmetic.
//
// Plain C++ apart from the CUDA builtins below, so tests/cuda_sim runs this very kernel on a CPU (threads for
// CUDA threads, a warp-collective emulation of mma.sync) against float64 with MONARCH_CUDA_SIM defined.
#pragma once

#include <climits>
#include <cstdint>
#include <cstring>

#include "decode.cuh"
#include "epilogue.cuh"
#include "mma.cuh"

namespace monarch_cuda {

constexpr int kResidentThreads = 256, kResidentWarps = kResidentThreads / 32;
constexpr int kResidentRows = 16;      // tokens per tile: one mma row tile
constexpr int kResidentMaxUnits = 16;  // 8-column output tiles per warp and stage (accumulators in registers)
constexpr int kResidentMaxKSteps = 4;  // k16 steps per block (p, r ≤ 64): A fragments kept in registers

struct ResidentPlan {
  const void* x;
  const void* w1;
  const void* w2;
  const void* bias;
  void* out;
  void* z;  // the kept intermediate, or null
  int64_t x_ts, out_ts, z_ts;
  int64_t tokens;
  int k, q, p, l, s, r, n_in, n_out, act;
  int w1_pitch, w2_pitch;  // elements per weight row in shared memory (p + 8, r + 8)
  int pitch;               // elements per token row of the two tile buffers
  int units1, units2;      // 8-column output tiles per warp in stage 1 / stage 2
  int tiles, ctas, smem;   // 16-token tiles, CTAs (≤ one per SM), dynamic shared memory (bytes)
};

// Elements per token row of a tile buffer: room for x, the intermediate and out, plus 8 (16 bytes) so that
// consecutive rows start 4 banks apart (odd multiple of 4 words): conflict-free 32-bit fragment loads.
inline int resident_pitch(int n_in, int mid, int n_out) {
  int m = n_in > mid ? n_in : mid;
  m = m > n_out ? m : n_out;
  return (m + 15) / 16 * 16 + 8;
}

// Whether x, w1, w2 and out are 16-byte aligned and x and out have unit-stride rows whose pitch is a multiple of
// 8 elements and at least their width: rows that cp.async and 16-byte stores can move whole (16-bit dtypes);
// the kept intermediate's rows (k·q wide) too, where there is one.
inline bool rows_vectorizable(const MonarchFwdArgs& a) {
  const auto aligned = [](const void* ptr) { return reinterpret_cast<uintptr_t>(ptr) % 16 == 0; };
  const bool z_ok = !a.z || (aligned(a.z) && a.z_ts % 8 == 0 && a.z_ts >= a.k * a.q);
  return aligned(a.x) && aligned(a.w1) && aligned(a.w2) && aligned(a.out) && a.x_fs == 1 && a.x_ts % 8 == 0 &&
         a.out_ts % 8 == 0 && a.x_ts >= a.n_in && a.out_ts >= a.n_out && z_ok;
}

// Fills P for `a` on a device with `sms` SMs and `smem_optin` bytes of shared memory per block; false when the
// resident kernel does not take the call. `itemsize` 2 (fp16/bf16) or 4 (always declined).
inline bool resident_plan(const MonarchFwdArgs& a, int itemsize, int sms, int smem_optin, ResidentPlan& P) {
  if (itemsize != 2 || a.tokens < 1 || sms < 1) return false;
  if (a.k < 1 || a.q < 1 || a.p < 1 || a.l < 1 || a.s < 1 || a.r < 1) return false;
  if (a.p % 16 || a.r % 16 || a.q % 8 || a.s % 8 || a.p > 16 * kResidentMaxKSteps || a.r > 16 * kResidentMaxKSteps)
    return false;
  if (a.k * a.q != a.l * a.r || a.n_in != a.k * a.p || a.n_out != a.l * a.s) return false;
  const int64_t units1 = (a.k * a.q / 8 + kResidentWarps - 1) / kResidentWarps;
  const int64_t units2 = (a.l * a.s / 8 + kResidentWarps - 1) / kResidentWarps;
  if (units1 > kResidentMaxUnits || units2 > kResidentMaxUnits) return false;
  if (!rows_vectorizable(a)) return false;
  const int64_t tiles = (a.tokens + kResidentRows - 1) / kResidentRows;
  if (tiles > INT_MAX / 2) return false;  // tile + gridDim.x stays in int
  P = ResidentPlan{};
  P.x = a.x, P.w1 = a.w1, P.w2 = a.w2, P.bias = a.bias, P.out = a.out, P.z = a.z;
  P.x_ts = a.x_ts, P.out_ts = a.out_ts, P.z_ts = a.z_ts, P.tokens = a.tokens;
  P.k = static_cast<int>(a.k), P.q = static_cast<int>(a.q), P.p = static_cast<int>(a.p);
  P.l = static_cast<int>(a.l), P.s = static_cast<int>(a.s), P.r = static_cast<int>(a.r);
  P.n_in = static_cast<int>(a.n_in), P.n_out = static_cast<int>(a.n_out), P.act = a.act;
  P.w1_pitch = P.p + 8, P.w2_pitch = P.r + 8;
  P.pitch = resident_pitch(P.n_in, P.k * P.q, P.n_out);
  P.units1 = static_cast<int>(units1), P.units2 = static_cast<int>(units2);
  const int64_t smem =
      2 * (static_cast<int64_t>(2) * kResidentRows * P.pitch + static_cast<int64_t>(P.k) * P.q * P.w1_pitch +
           static_cast<int64_t>(P.l) * P.s * P.w2_pitch);
  if (smem > smem_optin) return false;
  P.smem = static_cast<int>(smem);
  P.tiles = static_cast<int>(tiles);
  P.ctas = P.tiles < sms ? P.tiles : sms;
  return true;
}

// ------------------------------------------------------------------------------------ device side

// 16 bytes global -> shared without a register round trip (cp.async, L2 only), and its group bookkeeping.
__device__ __forceinline__ void cp_async16(void* smem, const void* gmem) {
#ifdef MONARCH_CUDA_SIM
  sim::cp_async16(smem, gmem);
#else
  const unsigned dst = static_cast<unsigned>(__cvta_generic_to_shared(smem));
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16;" ::"r"(dst), "l"(gmem));
#endif
}

__device__ __forceinline__ void cp_async_commit() {
#ifdef MONARCH_CUDA_SIM
  sim::cp_async_commit();
#else
  asm volatile("cp.async.commit_group;");
#endif
}

template <int N>
__device__ __forceinline__ void cp_async_wait() {  // all but the newest N groups complete
#ifdef MONARCH_CUDA_SIM
  sim::cp_async_wait(N);
#else
  asm volatile("cp.async.wait_group %0;" ::"n"(N));
#endif
}

// Two consecutive 16-bit elements of shared memory (4-byte aligned: even row pitches and columns).
__device__ __forceinline__ uint32_t lds32(const void* p) {
#ifdef MONARCH_CUDA_SIM
  uint32_t v;
  std::memcpy(&v, p, 4);
  return v;
#else
  return *static_cast<const uint32_t*>(p);
#endif
}

// rows x cols elements (cols % 8 == 0) of a row-major global matrix (row stride `ld`) into shared rows of
// `pitch` elements, 16 bytes per thread and step; rows at and past `valid` are zero-filled instead.
template <typename T>
__device__ __forceinline__ void stage_rows(T* dst, int pitch, const T* src, int64_t ld, int rows, int cols,
                                          int64_t valid) {
  const int chunks = cols / 8;
  for (int i = threadIdx.x; i < rows * chunks; i += kResidentThreads) {
    const int row = i / chunks, c = (i - row * chunks) * 8;
    if (row < valid)
      cp_async16(dst + row * pitch + c, src + row * ld + c);
    else
      *reinterpret_cast<uint4*>(dst + row * pitch + c) = make_uint4(0, 0, 0, 0);
  }
}

// Shared-memory swizzle of the 16-bit scatters (P1 into the intermediate, P2 into the output rows): element e of
// a row is stored at e ^ (key << 1), i.e. the 4-byte words of each aligned group of 8 elements are permuted by
// key (0..3), with key = (lo >> 1) & 3 for the intermediate's block lo and (ss >> 1) & 3 for output column
// ss·l + ll (when l % 8 == 0, else 0). The 4 lanes of an mma fragment that store one row's elements 2·r (or 2·l)
// apart — one bank apart for r = 32 — then hit 4 different banks: conflict-free scatters at the target shapes,
// where the unswizzled stores were 4-way conflicts. Readers apply the same key (a word stays whole).
__device__ __forceinline__ int swizzle(int e, int key) { return e ^ (key << 1); }

// The 8 elements of a 16-byte group stored with `key`, in logical order.
__device__ __forceinline__ uint4 unswizzle(const uint4& v, int key) {
  const uint32_t a = key & 1 ? v.y : v.x, b = key & 1 ? v.x : v.y, c = key & 1 ? v.w : v.z, d = key & 1 ? v.z : v.w;
  return key & 2 ? make_uint4(c, d, a, b) : make_uint4(a, b, c, d);
}

// One stage on the 16 staged token rows: acc[i] = D tile of this warp's i-th 8-column output tile u =
// warp·units + i (valid while u < total), output columns f = 8u .. 8u + 7 of the stage's nblk·rows outputs,
// block b = 8u / rows: D[t][f] = Σ_j in[t][b·K + j] · w[f][j] (in rows `in_pitch` apart, w rows `w_pitch`).
// A warp's tiles are consecutive, so its A fragments are reloaded only when the block changes. `swizzled`: the
// input is the intermediate, stored with key (b >> 1) & 3 (see swizzle()).
template <typename T>
__device__ __forceinline__ void stage_tiles(const T* in, int in_pitch, const T* w, int w_pitch, int rows, int K,
                                            int units, int total, int warp, int lane, bool swizzled,
                                            float (&acc)[kResidentMaxUnits][4]) {
  const int g = lane >> 2, c = lane & 3;
  const int ksteps = K / 16;
  uint32_t a[kResidentMaxKSteps][4];
  int block = -1;
#pragma unroll
  for (int i = 0; i < kResidentMaxUnits; ++i) {
    acc[i][0] = acc[i][1] = acc[i][2] = acc[i][3] = 0.f;
    const int u = warp * units + i;
    if (i < units && u < total) {
      const int f0 = 8 * u, b = f0 / rows;
      if (b != block) {  // A fragments of block b: rows g and g + 8, columns b·K + 16·ks + 2c (+ 8)
        block = b;
        const T* r0 = in + g * in_pitch + b * K + 2 * (swizzled ? c ^ ((b >> 1) & 3) : c);
        const T* r8 = r0 + 8 * in_pitch;
#pragma unroll
        for (int ks = 0; ks < kResidentMaxKSteps; ++ks)
          if (ks < ksteps) {
            a[ks][0] = lds32(r0 + 16 * ks), a[ks][1] = lds32(r8 + 16 * ks);
            a[ks][2] = lds32(r0 + 16 * ks + 8), a[ks][3] = lds32(r8 + 16 * ks + 8);
          }
      }
      const T* wrow = w + (f0 + g) * w_pitch + 2 * c;  // B fragment: column g of the tile is weight row f0 + g
#pragma unroll
      for (int ks = 0; ks < kResidentMaxKSteps; ++ks)
        if (ks < ksteps) mma16816<T>(acc[i], a[ks], lds32(wrow + 16 * ks), lds32(wrow + 16 * ks + 8));
    }
  }
}

template <typename T>
__global__ void __launch_bounds__(kResidentThreads, 1) resident_kernel(const __grid_constant__ ResidentPlan P) {
#ifdef MONARCH_CUDA_SIM
  T* smem = reinterpret_cast<T*>(sim::dynamic_smem());
#else
  extern __shared__ __align__(16) unsigned char smem_raw[];
  T* smem = reinterpret_cast<T*>(smem_raw);
#endif
  const int buf_elems = kResidentRows * P.pitch;  // two tile buffers: tile i in buffer i % 2
  T* const w1s = smem + 2 * kResidentRows * P.pitch;
  T* const w2s = w1s + P.k * P.q * P.w1_pitch;
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, g = lane >> 2, c = lane & 3;
  const T* x = static_cast<const T*>(P.x);
  T* out = static_cast<T*>(P.out);
  const T* bias = static_cast<const T*>(P.bias);
  const int total1 = P.k * P.q / 8, total2 = P.l * P.s / 8;
  const bool swz_out = P.l % 8 == 0;  // output rows swizzled (an 8-element group then lies in one ss)

  // the factors, once per CTA, and the first tile's x rows: one cp.async group
  stage_rows<T>(w1s, P.w1_pitch, static_cast<const T*>(P.w1), P.p, P.k * P.q, P.p, INT_MAX);
  stage_rows<T>(w2s, P.w2_pitch, static_cast<const T*>(P.w2), P.r, P.l * P.s, P.r, INT_MAX);
  int tile = blockIdx.x;
  stage_rows<T>(smem, P.pitch, x + static_cast<int64_t>(tile) * kResidentRows * P.x_ts, P.x_ts, kResidentRows,
                P.n_in, P.tokens - static_cast<int64_t>(tile) * kResidentRows);
  cp_async_commit();

  float acc[kResidentMaxUnits][4];
  for (int it = 0; tile < P.tiles; tile += gridDim.x, ++it) {
    T* const cur = smem + (it & 1) * buf_elems;
    const int64_t t0 = static_cast<int64_t>(tile) * kResidentRows;
    const int next = tile + gridDim.x;  // its buffer was last read by the previous tile's stores (barrier below)
    if (next < P.tiles)
      stage_rows<T>(smem + ((it + 1) & 1) * buf_elems, P.pitch, x + static_cast<int64_t>(next) * kResidentRows * P.x_ts,
                    P.x_ts, kResidentRows, P.n_in, P.tokens - static_cast<int64_t>(next) * kResidentRows);
    cp_async_commit();  // possibly empty: the wait below always leaves exactly the newest group in flight
    cp_async_wait<1>();
    __syncthreads();

    // stage 1: u[t][f] = Σ_pp w1[f][pp] · x[t][kk·p + pp], f = kk·q + qq
    stage_tiles<T>(cur, P.pitch, w1s, P.w1_pitch, P.q, P.p, P.units1, total1, warp, lane, false, acc);
    __syncthreads();  // every warp has read the x tile: the intermediate overwrites it
    // P1: u[t][f] goes to stage 2's input position (f % l)·r + f / l (one division per tile of 8 columns)
#pragma unroll
    for (int i = 0; i < kResidentMaxUnits; ++i) {
      const int u = warp * P.units1 + i;
      if (i < P.units1 && u < total1) {
        const int f0 = 8 * u + 2 * c, hi0 = f0 / P.l, lo0 = f0 - hi0 * P.l;
#pragma unroll
        for (int j = 0; j < 2; ++j) {
          int hi = hi0, lo = lo0 + j;
          if (lo >= P.l) lo -= P.l, ++hi;  // lo0 < l and j ≤ 1
          const int pos = swizzle(lo * P.r + hi, (lo >> 1) & 3);
          cur[g * P.pitch + pos] = from_f<T>(acc[i][j]);
          cur[(g + 8) * P.pitch + pos] = from_f<T>(acc[i][2 + j]);
        }
      }
    }
    __syncthreads();
    if (P.z) {  // the kept intermediate: its rows, 16 bytes per thread and step (read beside stage 2's loads)
      T* const zout = static_cast<T*>(P.z);
      const int chunks = P.k * P.q / 8;
      for (int i = threadIdx.x; i < kResidentRows * chunks; i += kResidentThreads) {
        const int row = i / chunks, col = (i - row * chunks) * 8, lo = col / P.r;
        if (t0 + row < P.tokens)
          *reinterpret_cast<uint4*>(zout + (t0 + row) * P.z_ts + col) =
              unswizzle(*reinterpret_cast<const uint4*>(cur + row * P.pitch + col), (lo >> 1) & 3);
      }
    }

    // stage 2: v[t][f] = Σ_rr w2[f][rr] · z[t][ll·r + rr], f = ll·s + ss; then bias and activation
    stage_tiles<T>(cur, P.pitch, w2s, P.w2_pitch, P.s, P.r, P.units2, total2, warp, lane, true, acc);
    __syncthreads();  // every warp has read the intermediate: the output overwrites it
    // P2: v[t][f] goes to output column (f % s)·l + f / s; a tile of 8 columns lies in one block (s % 8 == 0)
#pragma unroll
    for (int i = 0; i < kResidentMaxUnits; ++i) {
      const int u = warp * P.units2 + i;
      if (i < P.units2 && u < total2) {
        const int ll = 8 * u / P.s, ss0 = 8 * u - ll * P.s + 2 * c;
#pragma unroll
        for (int j = 0; j < 2; ++j) {
          const int col = (ss0 + j) * P.l + ll, at = swizzle(col, swz_out ? ((ss0 + j) >> 1) & 3 : 0);
          const float b = bias ? to_f(bias[col]) : 0.f;
          cur[g * P.pitch + at] = activate_to<T>(acc[i][j] + b, P.act);
          cur[(g + 8) * P.pitch + at] = activate_to<T>(acc[i][2 + j] + b, P.act);
        }
      }
    }
    __syncthreads();

    // the tile's output rows, 16 bytes per thread and step
    const int chunks = P.n_out / 8;
    for (int i = threadIdx.x; i < kResidentRows * chunks; i += kResidentThreads) {
      const int row = i / chunks, col = (i - row * chunks) * 8;
      if (t0 + row < P.tokens)
        *reinterpret_cast<uint4*>(out + (t0 + row) * P.out_ts + col) = unswizzle(
            *reinterpret_cast<const uint4*>(cur + row * P.pitch + col), swz_out ? ((col / P.l) >> 1) & 3 : 0);
    }
    __syncthreads();  // the buffer is refilled by the cp.async issued at the top of the next iteration
  }
  cp_async_wait<0>();
}

}  // namespace monarch_cuda
