// Small-token ("decode") block-diagonal and Monarch products: launcher declarations (kernels in decode.cu).
//
// Pure CUDA, like monarch_kernels.cuh. A product is one or two *stages*; each stage is a block-diagonal map
// whose weights are streamed once with 16-byte loads while the few token rows sit in shared memory. Two stages
// run in one cooperative launch with a grid-wide barrier between them; the T x N intermediate goes through a
// global scratch buffer that stays in L2.
#pragma once

#include <cstdint>

#include "monarch_kernels.cuh"

namespace monarch_cuda {

// out[t, perm(b*n_out + o)] = act(bias[.] + sum_j W_b[o, j] * in[t, b, j]) for block b of one stage.
//
// The weights are a contiguous (nblk, rows, cols) tensor. Without `trans` a block maps its `cols` inputs to its
// `rows` outputs (W_b x); with `trans` it maps `rows` inputs to `cols` outputs (W_bᵀ x), which is how the dX
// products and transposed block-diagonal weights are served without a transposed copy.
struct DecodeStage {
  const void* w;
  int64_t nblk, rows, cols;
  bool trans;
  // input element (t, b, j): in[t*in_ts + (b*in_bs + j*in_js)*in_fs]; zero where b*in_bs + j*in_js >= in_cols
  const void* in;
  int64_t in_ts, in_fs, in_bs, in_js, in_cols;
  // output element (t, b, o): f = b*n_out + o goes to column (f % out_a)*out_b + f / out_a (f itself when
  // out_a == 0) of the row out + t*out_ts, and is dropped when that column is >= out_cols
  void* out;
  int64_t out_ts, out_a, out_b, out_cols;
  const void* bias;  // (out_cols,) or null, indexed by the output column
  int act;           // 0 none, 1 relu, 2 gelu (erf), 3 gelu (tanh)
};

// Most tokens the decode kernels take: 64 for fp16/bf16 (tensor cores), 16 for fp32.
int decode_max_tokens(DType dt);

// Whether decode_run can serve these 1 or 2 stages with `tokens` rows on `device` (token limit, shared memory,
// 32-bit index ranges, cooperative launch); when false the caller takes another path.
bool decode_supported(DType dt, int64_t tokens, const DecodeStage* stages, int nstages, int device);

// Runs the stages (stage 2 reads what stage 1 wrote) in one launch on `stream`.
cudaError_t decode_run(DType dt, int64_t tokens, const DecodeStage* stages, int nstages, int device,
                       cudaStream_t stream);

// Which few-token Monarch forward runs: kDecodeAuto and kDecodeCooperative the cooperative kernel (measured on
// an H200; the row-split kernel has not run on a GPU yet), kDecodeRowsplit the row-split kernel wherever its
// plan takes the call (rowsplit_plan) and the cooperative one elsewhere — for side-by-side measurements.
enum DecodeChoice { kDecodeAuto = 0, kDecodeCooperative = 1, kDecodeRowsplit = 2 };
void set_decode_choice(DecodeChoice c);
DecodeChoice decode_choice();

// Whether the row-split kernel takes `a` on `device` under the current choice (pointers may still be null
// except for their alignment, which the plan reads: pass the real x, w1, w2).
bool decode_rowsplit_supported(DType dt, const MonarchFwdArgs& a, int device);

// Runs it on `stream`; cudaErrorNotSupported where it does not take the call.
cudaError_t decode_rowsplit_run(DType dt, const MonarchFwdArgs& a, int device, cudaStream_t stream);

}  // namespace monarch_cuda
