// Runs CUDA kernels written in plain C++ on a CPU, for tests: one std::thread per CUDA thread, one CTA at a
// time, __syncthreads() a barrier across the CTA's threads and __shfl_xor_sync an exchange across the warp's.
// Only what the kernels under test use is here (no atomics, no clusters, no warp-divergent shuffles: every
// lane of a warp must reach each shuffle, which CUDA requires of a full-mask shuffle as well). mma.sync
// m16n8k16 is a warp collective too: every lane posts its fragments, then computes its own D elements from the
// PTX ISA's fragment tables (fp32 accumulation in k order; the hardware's order and internal precision differ
// within the tests' tolerances). cp.async (sim::cp_async16 and its commit/wait): the destination is undefined
// from the issue (NaN-poisoned at once) until a wait retires the copy's group (the data lands then), so a read
// before its wait sees NaN, and a copy issued into a buffer another thread still reads is a write that
// ThreadSanitizer sees racing with that read.
// Thread-block clusters (launch_cluster): the CTAs of a cluster run at the same time, the split cluster barrier
// is a barrier across all their threads, and distributed shared memory is a pointer into the other CTA's buffer.
//
// Included before the kernel's header, with MONARCH_CUDA_SIM defined; compiled by the host C++ compiler with
// the CUDA toolkit's include directory (cuda_bf16.h / cuda_fp16.h and vector_types.h are usable from host code).
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <barrier>
#include <chrono>
#include <cmath>
#include <deque>
#include <optional>
#include <cstdint>
#include <cstring>
#include <memory>
#include <thread>
#include <vector>

#ifndef __grid_constant__
#define __grid_constant__
#endif
#ifndef __launch_bounds__
#define __launch_bounds__(...)
#endif

namespace sim {

struct Cta {
  std::barrier<> all;
  std::vector<std::unique_ptr<std::barrier<>>> warps;
  std::vector<uint64_t> lanes;  // one exchange slot per thread
  std::vector<uint32_t> frags;  // mma operands: 6 registers (a0..a3, b0, b1) per thread
  std::vector<unsigned char> smem;
  Cta(int threads, size_t smem_bytes) : all(threads), lanes(threads), frags(6 * threads), smem(smem_bytes + 16) {
    for (int w = 0; w < threads / 32; ++w) warps.emplace_back(std::make_unique<std::barrier<>>(32));
  }
};

inline thread_local Cta* cta = nullptr;

struct Cluster {
  std::barrier<> all;  // every thread of every CTA of the cluster
  std::vector<Cta*> ctas;
  explicit Cluster(int threads) : all(threads) {}
};

inline thread_local Cluster* cluster = nullptr;
inline thread_local unsigned cluster_ctarank = 0;
inline thread_local std::optional<std::barrier<>::arrival_token> cluster_token;

inline void* dynamic_smem_of(Cta* c) {  // 16-byte aligned, like extern __shared__ __align__(16)
  const uintptr_t base = reinterpret_cast<uintptr_t>(c->smem.data());
  return reinterpret_cast<void*>((base + 15) & ~uintptr_t(15));
}

inline void* dynamic_smem() { return dynamic_smem_of(cta); }

inline unsigned cluster_rank() { return cluster_ctarank; }

// A schedule a GPU may run that a fair thread scheduler rarely does: the last CTA of a cluster resumes late after
// each arrive (longer than an emulated tile's work), so its peers run ahead past the barrier — into their next
// tile's pushes — while it still reads what it reads after arriving. A buffer reused one tile too early then
// shows as wrong results.
inline void cluster_arrive() {
  cluster_token.emplace(cluster->all.arrive());
  if (cluster_ctarank + 1 == cluster->ctas.size()) std::this_thread::sleep_for(std::chrono::milliseconds(20));
}

inline void cluster_wait() {
  cluster->all.wait(std::move(*cluster_token));
  cluster_token.reset();
}

// cp.async of 16 bytes: the destination is poisoned now and written when a cp_async_wait retires the group the
// copy was committed in (global memory is read now: the kernels' inputs do not change while they run).
struct AsyncCopy {
  void* dst;
  unsigned char bytes[16];
};
inline thread_local std::vector<AsyncCopy> cp_open;               // issued since the last commit
inline thread_local std::deque<std::vector<AsyncCopy>> cp_groups;  // committed, oldest first

inline void cp_async16(void* dst, const void* src) {
  AsyncCopy c{dst, {}};
  std::memcpy(c.bytes, src, 16);
  std::memset(dst, 0xff, 16);
  cp_open.push_back(c);
}

inline void cp_async_commit() {
  cp_groups.push_back(std::move(cp_open));
  cp_open.clear();
}

// cp.async.wait_group n: every committed group but the newest n has landed (copies not yet committed stay
// pending, as on the device).
inline void cp_async_wait(int n) {
  while (static_cast<int>(cp_groups.size()) > n) {
    for (const AsyncCopy& c : cp_groups.front()) std::memcpy(c.dst, c.bytes, 16);
    cp_groups.pop_front();
  }
}

// `p` (in this CTA's dynamic shared memory) at the same offset in the dynamic shared memory of cluster rank `rank`.
template <typename T>
T* map_shared_rank(T* p, unsigned rank) {
  const auto offset = reinterpret_cast<const unsigned char*>(p) - static_cast<unsigned char*>(dynamic_smem());
  return reinterpret_cast<T*>(static_cast<unsigned char*>(dynamic_smem_of(cluster->ctas.at(rank))) + offset);
}

}  // namespace sim

inline thread_local uint3 threadIdx, blockIdx;
inline dim3 blockDim, gridDim;

inline void __syncthreads() { sim::cta->all.arrive_and_wait(); }

template <typename T>
T __shfl_xor_sync(unsigned, T v, int lane_mask) {
  static_assert(sizeof(T) <= sizeof(uint64_t), "one exchange slot per thread");
  sim::Cta& c = *sim::cta;
  const int t = static_cast<int>(threadIdx.x), warp = t / 32;
  std::memcpy(&c.lanes[t], &v, sizeof(T));
  c.warps[warp]->arrive_and_wait();
  T r;
  std::memcpy(&r, &c.lanes[warp * 32 + ((t % 32) ^ lane_mask)], sizeof(T));
  c.warps[warp]->arrive_and_wait();  // nobody overwrites a slot before every lane has read it
  return r;
}

template <typename T>
T __ldg(const T* p) { return *p; }
template <typename T>
T __ldcs(const T* p) { return *p; }

inline float __uint_as_float(uint32_t b) {
  float f;
  std::memcpy(&f, &b, 4);
  return f;
}

namespace sim {

inline float bits16_to_float(uint16_t b, const __nv_bfloat16*) { return __uint_as_float(uint32_t(b) << 16); }
inline float bits16_to_float(uint16_t b, const __half*) {
  __half_raw h;
  h.x = b;
  return __half2float(__half(h));
}

// Element `half` (0 low, 1 high) of 32-bit fragment register `reg` of lane `lane` of the calling thread's warp.
template <typename T>
float frag_elem(int lane, int reg, int half) {
  const int t = static_cast<int>(threadIdx.x);
  const uint32_t v = cta->frags[6 * ((t / 32) * 32 + lane) + reg];
  return bits16_to_float(static_cast<uint16_t>(half ? v >> 16 : v & 0xffff), static_cast<const T*>(nullptr));
}

// d += A (16 x 16) · B (16 x 8) for the warp, fragments as in mma.sync.aligned.m16n8k16.row.col.f32.T.T.f32.
template <typename T>
void mma16816(float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
  Cta& c = *cta;
  const int t = static_cast<int>(threadIdx.x), warp = t / 32, lane = t % 32;
  uint32_t* mine = &c.frags[6 * t];
  mine[0] = a[0], mine[1] = a[1], mine[2] = a[2], mine[3] = a[3], mine[4] = b0, mine[5] = b1;
  c.warps[warp]->arrive_and_wait();
  const auto A = [](int row, int k) {  // lane 4·(row % 8) + (k % 8) / 2, register (row ≥ 8) + 2·(k ≥ 8)
    return frag_elem<T>(4 * (row % 8) + (k % 8) / 2, (row >= 8) + 2 * (k >= 8), k % 2);
  };
  const auto B = [](int k, int n) {  // lane 4·n + (k % 8) / 2, register 4 + (k ≥ 8)
    return frag_elem<T>(4 * n + (k % 8) / 2, 4 + (k >= 8), k % 2);
  };
  const int g = lane / 4, cc = lane % 4;
  float out[4];
  for (int e = 0; e < 4; ++e) {
    const int row = g + 8 * (e / 2), col = 2 * cc + e % 2;
    float v = d[e];
    for (int k = 0; k < 16; ++k) v = std::fma(A(row, k), B(k, col), v);
    out[e] = v;
  }
  c.warps[warp]->arrive_and_wait();  // nobody overwrites its fragments before every lane has read them
  for (int e = 0; e < 4; ++e) d[e] = out[e];
}

// kernel(args...) on a grid of CTAs of `threads` threads with `smem` bytes of dynamic shared memory.
template <typename Kernel, typename... Args>
void launch(dim3 grid, int threads, size_t smem, Kernel kernel, const Args&... args) {
  gridDim = grid;
  blockDim = dim3(threads);
  for (unsigned z = 0; z < grid.z; ++z)
    for (unsigned y = 0; y < grid.y; ++y)
      for (unsigned x = 0; x < grid.x; ++x) {
        Cta c(threads, smem);
        std::memset(c.smem.data(), 0xff, c.smem.size());  // NaN-poisoned, as uninitialised memory may be
        std::vector<std::thread> pool;
        pool.reserve(threads);
        for (int t = 0; t < threads; ++t)
          pool.emplace_back([&, t] {
            cta = &c;
            threadIdx = make_uint3(t, 0, 0);
            blockIdx = make_uint3(x, y, z);
            kernel(args...);
          });
        for (auto& th : pool) th.join();
      }
}


// kernel(args...) on a 1-D grid of `grid` CTAs in clusters of `cluster_size` consecutive CTAs; the CTAs of a
// cluster run concurrently (one std::thread per CUDA thread of each), clusters one after another.
template <typename Kernel, typename... Args>
void launch_cluster(unsigned grid, unsigned cluster_size, int threads, size_t smem, Kernel kernel,
                    const Args&... args) {
  gridDim = dim3(grid);
  blockDim = dim3(threads);
  for (unsigned first = 0; first < grid; first += cluster_size) {
    Cluster cl(static_cast<int>(cluster_size) * threads);
    std::vector<std::unique_ptr<Cta>> ctas;
    for (unsigned r = 0; r < cluster_size; ++r) {
      ctas.emplace_back(std::make_unique<Cta>(threads, smem));
      std::memset(ctas.back()->smem.data(), 0xff, ctas.back()->smem.size());  // NaN-poisoned
      cl.ctas.push_back(ctas.back().get());
    }
    std::vector<std::thread> pool;
    for (unsigned r = 0; r < cluster_size; ++r)
      for (int t = 0; t < threads; ++t)
        pool.emplace_back([&, r, t] {
          cta = cl.ctas[r];
          cluster = &cl;
          cluster_ctarank = r;
          threadIdx = make_uint3(t, 0, 0);
          blockIdx = make_uint3(first + r, 0, 0);
          kernel(args...);
        });
    for (auto& th : pool) th.join();
  }
}

}  // namespace sim
