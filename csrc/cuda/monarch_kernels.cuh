// CUDA kernels for block-diagonal and Monarch products: launcher declarations.
//
// Pure CUDA (no torch headers), so `nvcc -c` checks them for sm_80 and sm_90 without a CUDA build of
// torch; csrc/cuda/cuda_ops.cpp binds them to the torch ops. Pointers are raw device pointers, sizes and
// strides are in elements. Conventions are those of monarch_kernels.reference (fly layout).
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

namespace monarch_cuda {

enum class DType { F32 = 0, F16 = 1, BF16 = 2 };

// A view-transpose of a row of width A*B: logical column f <-> physical column (f % A) * B + f / A.
struct Perm {
  int64_t a = 1, b = 1;
  bool on = false;
};

struct Mat2 {  // a strided 2-D operand
  const void* ptr;
  int64_t rows, cols, s0, s1;
};

struct Mat3 {  // a strided 3-D weight (blocks, rows, cols)
  const void* ptr;
  int64_t n0, n1, n2, s0, s1, s2;
};

// Y[t, perm_out(kk*q + n)] = act(sum_j X[t, perm_in(kk*p + j)] * W[kk, n, j] + bias[...]) for the columns
// that exist (physical column < n_in on loads, < n_out on stores). fp16/bf16 use tensor cores (WMMA),
// fp32 a SIMT path with fp32 products. Y is (T, n_out) with strides (syt, syf).
cudaError_t blockdiag_forward(DType dt, Mat2 x, Mat3 w, const void* bias, void* y, int64_t n_out, int64_t syt,
                              int64_t syf, Perm in_perm, Perm out_perm, int act, cudaStream_t stream);

// partial[sp, kk, n, j] = sum over rows of split sp of G[t, perm_g(kk*q + n)] * X[t, perm_x(kk*p + j)],
// fp32 partials of shape (splits, k, q, p), contiguous; rows_per_split rows per split.
cudaError_t blockdiag_weight_grad(DType dt, Mat2 x, Mat2 g, int64_t k, int64_t q, int64_t p, Perm x_perm,
                                  Perm g_perm, float* partial, int64_t splits, int64_t rows_per_split,
                                  cudaStream_t stream);

// Fused Monarch forward (fp16/bf16, q % l == 0, c = q / l): out[t, ss*l + ll] = act(bias + sum_kk
// (X_kk W1[kk, ll::l, :]^T) W2[ll, ss, kk*c:(kk+1)*c]^T); the stage-1 tile stays in shared memory.
cudaError_t monarch_fused_forward(DType dt, Mat2 x, Mat3 w1, Mat3 w2, const void* bias, void* out, int64_t n_out,
                                  int act, cudaStream_t stream);

// Fused Monarch dX (fp16/bf16, q % l == 0): dx[t, kk*p + pp] = sum_ll (G_ll W2[ll][:, kk*c:(kk+1)*c])
// W1[kk, ll::l, pp], with G_ll[t, ss] = g[t, ss*l + ll].
cudaError_t monarch_fused_dx(DType dt, Mat2 g, Mat3 w1, Mat3 w2, void* dx, int64_t n_in, cudaStream_t stream);

// A Monarch forward out = act(P2 BD(w2) P1 BD(w1) x + bias) for the kernels planned from one struct (the
// row-split few-token kernel, decode_rowsplit.cuh; the resident many-token kernels, resident.cuh and
// cluster_resident.cuh). w1 (k, q, p)
// and w2 (l, s, r) contiguous, x (tokens, n_in) with strides (x_ts, x_fs), out (tokens, n_out) with row stride
// out_ts, bias (n_out,) or null; act as in epilogue.cuh. z, when not null (the resident kernels only; the others
// decline such a call): the stage-1 intermediate is kept there too, (tokens, k·q) rows of stride z_ts in stage 2's
// input order (column ll·r + rr), as the backward reads it.
struct MonarchFwdArgs {
  const void* x;
  int64_t x_ts, x_fs;
  const void* w1;
  const void* w2;
  const void* bias;
  void* out;
  int64_t out_ts;
  int64_t tokens, k, q, p, l, s, r, n_in, n_out;
  int act;
  void* z = nullptr;
  int64_t z_ts = 0;
};

// Which many-token Monarch forward the extension runs past the decode kernels: kManyResident the resident
// kernels (resident.cu: both factors in shared memory of one persistent CTA per SM, or, for square Monarch with
// 16/32/64 blocks past one SM, of a thread-block cluster) wherever their plans take the call and the tile
// kernels above elsewhere; kManyTiles always the tile kernels (for side-by-side measurements).
enum ManyTokenChoice { kManyResident = 0, kManyTiles = 1 };
void set_many_token_choice(ManyTokenChoice c);
ManyTokenChoice many_token_choice();

// Whether a resident kernel takes `a` on `device` under the current choice (out may be null: its alignment
// is assumed, the caller allocates it) — and runs it on `stream` (cudaErrorNotSupported where it does not).
bool resident_supported(DType dt, const MonarchFwdArgs& a, int device);
cudaError_t resident_run(DType dt, const MonarchFwdArgs& a, int device, cudaStream_t stream);

}  // namespace monarch_cuda
