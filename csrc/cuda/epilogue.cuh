// Element conversions and the fused activations shared by every CUDA kernel's epilogue.
//
// The activations reproduce torch's CUDA kernels exactly on special values: ReLU keeps NaN (relu(NaN) = NaN,
// unlike fmaxf), GELU is 0.5·v·(1 + erf(v/√2)) (so gelu(-inf) = NaN, as in torch), the tanh form likewise.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

namespace monarch_cuda {

__device__ __forceinline__ float to_f(float v) { return v; }
__device__ __forceinline__ float to_f(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_f(__nv_bfloat16 v) { return __bfloat162float(v); }

template <typename T> __device__ __forceinline__ T from_f(float v);
template <> __device__ __forceinline__ float from_f<float>(float v) { return v; }
template <> __device__ __forceinline__ __half from_f<__half>(float v) { return __float2half_rn(v); }
template <> __device__ __forceinline__ __nv_bfloat16 from_f<__nv_bfloat16>(float v) { return __float2bfloat16_rn(v); }

// act codes as in monarch_kernels.activations.CODES: 0 none, 1 relu, 2 gelu (erf), 3 gelu (tanh)
__device__ __forceinline__ float activate(float v, int act) {
  switch (act) {
    case 1: return v < 0.f ? 0.f : v;  // NaN < 0 is false: NaN passes through
    case 2: return 0.5f * v * (1.f + erff(v * 0.70710678118654752f));
    case 3: return 0.5f * v * (1.f + tanhf(0.79788456080286536f * (v + 0.044715f * v * v * v)));
    default: return v;
  }
}

// The stored output act(v) for the fp32 pre-activation v (accumulator + bias). act(F.linear(...)) rounds the
// linear output to T before the activation: an fp16 pre-activation past ±65504 is ±inf there, so gelu gives NaN
// for it (not -0) and relu 0. Rounding first keeps that; without an activation the value is rounded once.
template <typename T>
__device__ __forceinline__ T activate_to(float v, int act) {
  return from_f<T>(activate(act ? to_f(from_f<T>(v)) : v, act));
}

}  // namespace monarch_cuda
