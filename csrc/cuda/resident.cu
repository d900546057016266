// Launcher of the many-token Monarch forward with both factors resident in shared memory: of one CTA per SM
// (resident.cuh) or, for square Monarch whose factors do not fit one SM, of a thread-block cluster
// (cluster_resident.cuh). Contract in monarch_kernels.cuh.
#include <atomic>

#include "cluster_resident.cuh"
#include "launch.cuh"
#include "monarch_kernels.cuh"
#include "resident.cuh"

namespace monarch_cuda {
namespace {

std::atomic<int> g_many_token_choice{kManyResident};

template <typename T>
cudaError_t launch_resident(const ResidentPlan& P, int device, cudaStream_t stream, bool execute) {
  const void* kernel = reinterpret_cast<const void*>(&resident_kernel<T>);
  if (resident_ctas(kernel, device, kResidentThreads, P.smem) < 1) return cudaErrorNotSupported;  // opts in too
  if (!execute) return cudaSuccess;
  resident_kernel<T><<<static_cast<unsigned>(P.ctas), kResidentThreads, static_cast<size_t>(P.smem), stream>>>(P);
  return cudaGetLastError();
}

template <typename T, int NB>
cudaError_t launch_cluster(const ClusterPlan& plan, int device, cudaStream_t stream, bool execute) {
  const void* kernel = reinterpret_cast<const void*>(&cluster_kernel<T, NB>);
  if (resident_ctas(kernel, device, kClusterThreads, plan.smem) < 1) return cudaErrorNotSupported;  // opts in too
  ClusterPlan P = plan;
  cudaLaunchConfig_t config = {};
  cudaLaunchAttribute attr[1];
  attr[0].id = cudaLaunchAttributeClusterDimension;
  attr[0].val.clusterDim.x = static_cast<unsigned>(P.cluster);
  attr[0].val.clusterDim.y = attr[0].val.clusterDim.z = 1;
  config.attrs = attr, config.numAttrs = 1;
  config.blockDim = dim3(kClusterThreads);
  config.dynamicSmemBytes = static_cast<size_t>(P.smem);
  config.gridDim = dim3(static_cast<unsigned>(P.clusters * P.cluster));
  config.stream = stream;
  int active = 0;
  if (cudaOccupancyMaxActiveClusters(&active, &cluster_kernel<T, NB>, &config) != cudaSuccess || active < 1) {
    cudaGetLastError();
    return cudaErrorNotSupported;
  }
  if (!execute) return cudaSuccess;
  if (P.clusters > active) P.clusters = active;  // every cluster resident at once: none waits for another
  config.gridDim = dim3(static_cast<unsigned>(P.clusters * P.cluster));
  return cudaLaunchKernelEx(&config, &cluster_kernel<T, NB>, P);
}

template <typename T>
cudaError_t launch_cluster(const ClusterPlan& P, int device, cudaStream_t stream, bool execute) {
  if (P.nb == 16) return launch_cluster<T, 16>(P, device, stream, execute);
  if (P.nb == 32) return launch_cluster<T, 32>(P, device, stream, execute);
  return launch_cluster<T, 64>(P, device, stream, execute);
}

cudaError_t resident(DType dt, const MonarchFwdArgs& a, int device, cudaStream_t stream, bool execute) {
  if (g_many_token_choice.load(std::memory_order_relaxed) != kManyResident || dt == DType::F32)
    return cudaErrorNotSupported;
  const DeviceInfo& dev = device_info(device);
  const bool half = dt == DType::F16;
  ResidentPlan P;
  if (resident_plan(a, 2, dev.sms, dev.smem_optin, P)) {
    const cudaError_t err = half ? launch_resident<__half>(P, device, stream, execute)
                                 : launch_resident<__nv_bfloat16>(P, device, stream, execute);
    if (err != cudaErrorNotSupported) return err;
  }
  ClusterPlan C;
  if (!cluster_plan(a, 2, dev.sms, dev.smem_optin, C)) return cudaErrorNotSupported;
  return half ? launch_cluster<__half>(C, device, stream, execute)
              : launch_cluster<__nv_bfloat16>(C, device, stream, execute);
}

}  // namespace

void set_many_token_choice(ManyTokenChoice c) { g_many_token_choice.store(c, std::memory_order_relaxed); }
ManyTokenChoice many_token_choice() {
  return static_cast<ManyTokenChoice>(g_many_token_choice.load(std::memory_order_relaxed));
}

bool resident_supported(DType dt, const MonarchFwdArgs& a, int device) {
  return resident(dt, a, device, nullptr, false) == cudaSuccess;
}

cudaError_t resident_run(DType dt, const MonarchFwdArgs& a, int device, cudaStream_t stream) {
  return resident(dt, a, device, stream, true);
}

}  // namespace monarch_cuda
