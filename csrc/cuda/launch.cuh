// Host-side launch helpers shared by the CUDA kernels' launchers: cached device attributes and occupancy.
#pragma once

#include <cuda_runtime.h>

#include <map>
#include <mutex>
#include <tuple>

namespace monarch_cuda {

struct DeviceInfo {
  int sms = 0, smem_optin = 0, l2_bytes = 0, cooperative = 0;
};

inline const DeviceInfo& device_info(int device) {
  static std::mutex mu;
  static std::map<int, DeviceInfo> cache;
  std::lock_guard<std::mutex> lock(mu);
  auto it = cache.find(device);
  if (it != cache.end()) return it->second;
  DeviceInfo d;
  cudaDeviceGetAttribute(&d.sms, cudaDevAttrMultiProcessorCount, device);
  cudaDeviceGetAttribute(&d.smem_optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, device);
  cudaDeviceGetAttribute(&d.l2_bytes, cudaDevAttrL2CacheSize, device);
  cudaDeviceGetAttribute(&d.cooperative, cudaDevAttrCooperativeLaunch, device);
  return cache.emplace(device, d).first->second;
}

// CTAs of `kernel` resident per SM with `threads` threads and `smem` bytes of dynamic shared memory (0 when it
// cannot launch). Also opts the kernel into the device's largest dynamic shared memory.
inline int resident_ctas(const void* kernel, int device, int threads, int smem) {
  static std::mutex mu;
  static std::map<std::tuple<const void*, int, int, int>, int> cache;
  std::lock_guard<std::mutex> lock(mu);
  const auto key = std::make_tuple(kernel, device, threads, smem);
  auto it = cache.find(key);
  if (it != cache.end()) return it->second;
  int n = 0;
  // the opt-in maximum, not `smem`: a later call with a smaller buffer must not lower the limit of a cached one
  if (cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, device_info(device).smem_optin) !=
          cudaSuccess ||
      cudaOccupancyMaxActiveBlocksPerMultiprocessor(&n, kernel, threads, smem) != cudaSuccess)
    n = 0;
  cudaGetLastError();  // a failed query leaves no sticky error behind
  cache.emplace(key, n);
  return n;
}

}  // namespace monarch_cuda
