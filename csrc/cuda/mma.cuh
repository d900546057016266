// The tensor-core primitive of the fp16/bf16 CUDA kernels: mma.sync m16n8k16, fp32 accumulation.
//
// Fragments as in the PTX ISA's tables (lane = 4·g + c, g = groupID, c = thread in group): A (16 x 16, row)
// a[0] = A[g][2c..2c+1], a[1] = A[g+8][2c..], a[2] = A[g][2c+8..], a[3] = A[g+8][2c+8..]; B (16 x 8, col)
// b0 = B[2c..2c+1][g], b1 = B[2c+8..2c+9][g]; D (16 x 8) d[0..1] = D[g][2c..2c+1], d[2..3] = D[g+8][2c..].
// Each 32-bit register holds two consecutive 16-bit elements, the lower index in the low half.
//
// Under MONARCH_CUDA_SIM (tests/cuda_sim/sim.h) the same call is a warp-collective emulation with these
// fragment layouts, so a kernel's own fragment indexing is what the CPU tests check.
#pragma once

#include <cstdint>

#include <cuda_bf16.h>
#include <cuda_fp16.h>

namespace monarch_cuda {

// d += A·B for the warp's fragments (every lane of the warp must call it, as the instruction requires).
template <typename T>
__device__ __forceinline__ void mma16816(float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1);

#ifdef MONARCH_CUDA_SIM
template <typename T>
__device__ __forceinline__ void mma16816(float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
  sim::mma16816<T>(d, a, b0, b1);
}
#else
template <>
__device__ __forceinline__ void mma16816<__nv_bfloat16>(float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
  asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};"
               : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
               : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

template <>
__device__ __forceinline__ void mma16816<__half>(float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
  asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};"
               : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
               : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}
#endif

}  // namespace monarch_cuda
