// Entry points of the CUDA binding (cuda_ops.cpp) that are not torch ops: called from the Python module in
// ops.cpp after its argument checks.
#pragma once

#include <ATen/ATen.h>

#include <optional>
#include <tuple>

namespace monarch_cuda_ops {

// The forward of a training call, act(P2 BD(w2) P1 BD(w1) x + bias), that also keeps the stage-1 intermediate
// for the backward: (out, z) with z (T, k·q) contiguous in stage 2's column order (ll·r + rr) where a resident
// kernel runs the call (it stores z beside out at no extra arithmetic); elsewhere (few tokens, fp32, shapes its
// plans decline, the "tiles" choice) the forward monarch_fwd runs and an undefined z (None in Python).
std::tuple<at::Tensor, at::Tensor> monarch_fwd_keeping(const at::Tensor& x, const at::Tensor& w1,
                                                       const at::Tensor& w2, const std::optional<at::Tensor>& bias,
                                                       int64_t n_out, int64_t act);

}  // namespace monarch_cuda_ops
