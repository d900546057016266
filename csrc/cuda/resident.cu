// Launcher of the many-token Monarch forward with both factors resident in shared memory (kernel and plan in
// resident.cuh; contract in monarch_kernels.cuh).
#include <atomic>

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

cudaError_t resident(DType dt, const MonarchFwdArgs& a, int device, cudaStream_t stream, bool execute) {
  if (g_many_token_choice.load(std::memory_order_relaxed) != kManyResident || dt == DType::F32)
    return cudaErrorNotSupported;
  const DeviceInfo& dev = device_info(device);
  ResidentPlan P;
  if (!resident_plan(a, 2, dev.sms, dev.smem_optin, P)) return cudaErrorNotSupported;
  return dt == DType::F16 ? launch_resident<__half>(P, device, stream, execute)
                          : launch_resident<__nv_bfloat16>(P, device, stream, execute);
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
