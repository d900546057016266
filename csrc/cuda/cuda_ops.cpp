// torch binding of the CUDA kernels (compiled only in a CUDA build): the CUDA implementations of the
// monarch_kernels_ext ops. Up to decode_max_tokens() tokens (64 for fp16/bf16, 16 for fp32) the forward, dX and
// block-diagonal products run on the decode kernels (decode.cu: one launch, weights streamed once). A larger
// fp16/bf16 forward whose factors fit in shared memory runs the resident kernels (resident.cu: one CTA per SM,
// or a thread-block cluster for square Monarch past one SM's shared memory). Other larger
// calls take the tile kernels (monarch_kernels.cu): fused kernels for fp16/bf16 Monarch products whose blocks
// route evenly (q % l == 0), otherwise the two-kernel path (the block-diagonal kernel with P1/P2 folded into
// its loads and stores). Weight gradients recompute the intermediate and reduce fp32 split-T partials.
#include <torch/extension.h>

#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include <algorithm>

#include "cuda_ops.h"
#include "decode.cuh"
#include "monarch_kernels.cuh"

namespace {

using monarch_cuda::DecodeStage;
using monarch_cuda::DType;
using monarch_cuda::Mat2;
using monarch_cuda::Mat3;
using monarch_cuda::Perm;

DType dtype_of(const at::Tensor& t) {
  switch (t.scalar_type()) {
    case at::kFloat: return DType::F32;
    case at::kHalf: return DType::F16;
    case at::kBFloat16: return DType::BF16;
    default: TORCH_CHECK(false, "monarch cuda kernels support float32, float16 and bfloat16, got ", t.scalar_type());
  }
}

// The tile kernels index columns with 32-bit arithmetic.
constexpr int64_t kMaxColumns = int64_t(1) << 31;

Mat2 mat2(const at::Tensor& t) {
  TORCH_CHECK(t.is_cuda() && t.dim() == 2, "monarch cuda kernels: expected a 2-D CUDA tensor");
  TORCH_CHECK(t.size(1) < kMaxColumns, "monarch cuda kernels: at most 2^31 - 1 features, got ", t.size(1));
  return {t.data_ptr(), t.size(0), t.size(1), t.stride(0), t.stride(1)};
}

// The tile kernels launch one grid row (grid.y) per block and one grid layer (grid.z) per 64 output rows of a
// block; CUDA allows at most 65535 of each.
constexpr int64_t kMaxGridYZ = 65535;

Mat3 mat3(const at::Tensor& t) {
  TORCH_CHECK(t.is_cuda() && t.dim() == 3, "monarch cuda kernels: expected a 3-D CUDA weight");
  TORCH_CHECK(t.size(0) * std::max(t.size(1), t.size(2)) < kMaxColumns,
              "monarch cuda kernels: at most 2^31 - 1 features per factor, got weight of shape ", t.sizes());
  TORCH_CHECK_VALUE(t.size(0) <= kMaxGridYZ && (std::max(t.size(1), t.size(2)) + 63) / 64 <= kMaxGridYZ,
                    "monarch cuda tile kernels: at most 65535 blocks and 4194240 rows per block, got a weight of "
                    "shape ", t.sizes(), "; use backend='triton' or 'torch' for it");
  return {t.data_ptr(), t.size(0), t.size(1), t.size(2), t.stride(0), t.stride(1), t.stride(2)};
}

Perm perm(int64_t a, int64_t b) { return {a, b, true}; }

void check(cudaError_t err, const char* what) {
  TORCH_CHECK(err == cudaSuccess, "monarch cuda kernel ", what, " failed: ", cudaGetErrorString(err));
}

// Called on entry of every op: an error left pending by an earlier, unrelated operation (asynchronous launch
// failures surface at a later API call) would otherwise come back from this op's launch check and be reported
// as this kernel's failure. A real error is peeked, not cleared (it stays for whoever owns it) and raised as
// what it is; cudaErrorNotReady, which a stream or event query leaves behind without anything having failed, is
// cleared (as c10's own stream query does).
void check_no_pending_error() {
  const cudaError_t err = cudaPeekAtLastError();
  if (err == cudaErrorNotReady) {
    (void)cudaGetLastError();
    return;
  }
  TORCH_CHECK(err == cudaSuccess, "monarch cuda kernels: a CUDA error from an earlier operation is pending (not "
              "raised by this op): ", cudaGetErrorString(err));
}

cudaStream_t stream() { return c10::cuda::getCurrentCUDAStream().stream(); }

const void* bias_ptr(const c10::optional<at::Tensor>& bias, at::Tensor& keep) {
  if (!bias.has_value()) return nullptr;
  keep = bias->contiguous();
  return keep.data_ptr();
}

// ------------------------------------------------------------------------------------ decode (few tokens)

bool few_tokens(const at::Tensor& x) {
  return x.size(0) >= 1 && x.size(0) <= monarch_cuda::decode_max_tokens(dtype_of(x));
}

bool decode_supported(const at::Tensor& x, const DecodeStage* st, int n) {
  return monarch_cuda::decode_supported(dtype_of(x), x.size(0), st, n, x.device().index());
}

void run_decode(const at::Tensor& x, const DecodeStage* st, int n) {
  check(monarch_cuda::decode_run(dtype_of(x), x.size(0), st, n, x.device().index(), stream()), "decode");
}

// A row-major (T, cols) operand of a decode stage: base pointer, token stride, column stride, columns. A
// buffer that does not exist yet is described with a null pointer (supplied once the stages are known to run,
// so nothing is allocated for a call the decode kernels decline).
struct Rows {
  void* ptr;
  int64_t ts, fs, cols;
};

Rows rows(const at::Tensor& t) { return {t.data_ptr(), t.stride(0), t.stride(1), t.size(1)}; }
Rows unallocated(int64_t cols) { return {nullptr, cols, 1, cols}; }

// The decode stage reading `in` with the input (t, b, j) at column b*in_bs + j*in_js and writing `out` at
// column (f % out_a)*out_b + f / out_a of flat output f (f when out_a == 0); `w` is (nblk, rows, cols) contiguous.
DecodeStage decode_stage(const at::Tensor& w, bool trans, Rows in, int64_t in_bs, int64_t in_js, Rows out,
                         int64_t out_a, int64_t out_b, const void* bias, int64_t act) {
  return DecodeStage{w.data_ptr(), w.size(0), w.size(1), w.size(2), trans, in.ptr, in.ts, in.fs, in_bs, in_js,
                     in.cols, out.ptr, out.ts, out_a, out_b, out.cols, bias, static_cast<int>(act)};
}

// Y = blockdiag(X, W) with optional permutations on the decode kernels; W may be a transposed view of a
// contiguous tensor (then served as such, without a copy). An input permutation must be a strided gather
// (in_p.a == the block's input width).
bool decode_bd(const at::Tensor& x, const at::Tensor& w, const void* bias, int64_t act, Perm in_p, Perm out_p,
               at::Tensor& y) {
  if (!few_tokens(x)) return false;
  const int64_t p = w.size(2);
  if (in_p.on && in_p.a != p) return false;
  const bool trans = !w.is_contiguous() && w.transpose(1, 2).is_contiguous();
  const at::Tensor ws = trans ? w.transpose(1, 2) : w.contiguous();
  const DecodeStage st = decode_stage(ws, trans, rows(x), in_p.on ? 1 : p, in_p.on ? in_p.b : 1, rows(y),
                                      out_p.on ? out_p.a : 0, out_p.b, bias, act);
  if (!decode_supported(x, &st, 1)) return false;
  run_decode(x, &st, 1);
  return true;
}

// Two stages through a (T, N) scratch: checks that the decode kernels take them, then allocates the scratch
// and the (T, n_out) result, fills in their pointers and runs; an undefined tensor when declined.
at::Tensor decode_two_stages(const at::Tensor& in, DecodeStage (&st)[2], int64_t N, int64_t n_out) {
  if (!decode_supported(in, st, 2)) return at::Tensor();
  auto scratch = at::empty({in.size(0), N}, in.options());
  auto out = at::empty({in.size(0), n_out}, in.options());
  st[0].out = scratch.data_ptr();
  st[1].in = scratch.data_ptr();
  st[1].out = out.data_ptr();
  run_decode(in, st, 2);
  return out;
}

// The arguments of act(P2 BD(w2) P1 BD(w1) x + bias) into a (T, n_out) output allocated later (out null).
monarch_cuda::MonarchFwdArgs fwd_args(const at::Tensor& x, const at::Tensor& w1c, const at::Tensor& w2c,
                                      const void* bias, int64_t act, int64_t n_out) {
  return {x.data_ptr(), x.stride(0), x.stride(1), w1c.data_ptr(), w2c.data_ptr(), bias, nullptr, n_out, x.size(0),
          w1c.size(0), w1c.size(1), w1c.size(2), w2c.size(0), w2c.size(1), w2c.size(2), x.size(1), n_out,
          static_cast<int>(act)};
}

// out = act(P2 BD(w2) P1 BD(w1) x + bias): stage 1 writes the intermediate in stage 2's order (P1) to z.
at::Tensor decode_monarch_fwd(const at::Tensor& x, const at::Tensor& w1, const at::Tensor& w2, const void* bias,
                              int64_t act, int64_t n_out) {
  if (!few_tokens(x)) return at::Tensor();
  const int64_t l = w2.size(0), s = w2.size(1), r = w2.size(2), N = l * r;
  const at::Tensor w1c = w1.contiguous(), w2c = w2.contiguous();
  monarch_cuda::MonarchFwdArgs ra = fwd_args(x, w1c, w2c, bias, act, n_out);
  if (monarch_cuda::decode_rowsplit_supported(dtype_of(x), ra, x.device().index())) {
    auto out = at::empty({x.size(0), n_out}, x.options());
    ra.out = out.data_ptr();
    check(monarch_cuda::decode_rowsplit_run(dtype_of(x), ra, x.device().index(), stream()), "decode_rowsplit");
    return out;
  }
  DecodeStage st[2] = {decode_stage(w1c, false, rows(x), w1.size(2), 1, unallocated(N), l, r, nullptr, 0),
                       decode_stage(w2c, false, unallocated(N), r, 1, unallocated(n_out), s, l, bias, act)};
  return decode_two_stages(x, st, N, n_out);
}

// The same product past the decode kernels, with both factors resident in shared memory (resident.cu), where
// one of its plans takes the call (fp16/bf16, whole mma tiles, factors within one SM's or one cluster's shared
// memory).
at::Tensor resident_monarch_fwd(const at::Tensor& x, const at::Tensor& w1, const at::Tensor& w2, const void* bias,
                                int64_t act, int64_t n_out) {
  const at::Tensor w1c = w1.contiguous(), w2c = w2.contiguous();
  monarch_cuda::MonarchFwdArgs a = fwd_args(x, w1c, w2c, bias, act, n_out);
  if (!monarch_cuda::resident_supported(dtype_of(x), a, x.device().index())) return at::Tensor();
  auto out = at::empty({x.size(0), n_out}, x.options());
  a.out = out.data_ptr();
  check(monarch_cuda::resident_run(dtype_of(x), a, x.device().index(), stream()), "resident monarch forward");
  return out;
}

// dx = BD(w1)ᵀ P1ᵀ BD(w2)ᵀ P2ᵀ g: stage A gathers g through P2ᵀ and writes dy in flat (P1ᵀ) order.
at::Tensor decode_monarch_dx(const at::Tensor& g, const at::Tensor& w1, const at::Tensor& w2, int64_t n_in) {
  if (!few_tokens(g)) return at::Tensor();
  const int64_t l = w2.size(0), r = w2.size(2), N = l * r;
  const at::Tensor w1c = w1.contiguous(), w2c = w2.contiguous();
  DecodeStage st[2] = {decode_stage(w2c, true, rows(g), 1, l, unallocated(N), r, l, nullptr, 0),
                       decode_stage(w1c, true, unallocated(N), w1.size(1), 1, unallocated(n_in), 0, 0, nullptr, 0)};
  return decode_two_stages(g, st, N, n_in);
}

// ------------------------------------------------------------------------------------ tile kernels

// Y = blockdiag(X, W) with optional permutations, into a fresh (T, n_out) tensor.
at::Tensor bd(const at::Tensor& x, const at::Tensor& w, const void* bias, int64_t n_out, int64_t act, Perm in_p,
              Perm out_p) {
  auto y = at::empty({x.size(0), n_out}, x.options());
  if (decode_bd(x, w, bias, act, in_p, out_p, y)) return y;
  check(monarch_cuda::blockdiag_forward(dtype_of(x), mat2(x), mat3(w), bias, y.data_ptr(), n_out, y.stride(0),
                                        y.stride(1), in_p, out_p, static_cast<int>(act), stream()),
        "blockdiag_forward");
  return y;
}

at::Tensor wgrad(const at::Tensor& x, const at::Tensor& g, int64_t k, int64_t q, int64_t p, Perm x_p, Perm g_p) {
  const int64_t T = x.size(0);
  if (T == 0) return at::zeros({k, q, p}, x.options());
  const int64_t tiles = k * ((q + 63) / 64) * ((p + 63) / 64);
  int sms = 0;
  check(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, x.device().index()), "cudaDeviceGetAttribute");
  const int64_t splits = std::max<int64_t>(1, std::min<int64_t>((4 * int64_t(sms) + tiles - 1) / tiles, (T + 255) / 256));
  const int64_t rows = (T + splits - 1) / splits;
  auto partial = at::empty({splits, k, q, p}, x.options().dtype(at::kFloat));
  check(monarch_cuda::blockdiag_weight_grad(dtype_of(x), mat2(x), mat2(g), k, q, p, x_p, g_p,
                                            partial.data_ptr<float>(), splits, rows, stream()),
        "blockdiag_weight_grad");
  return partial.sum(0).to(x.scalar_type());
}

bool fused_ok(const at::Tensor& x, const at::Tensor& w1, const at::Tensor& w2) {
  return x.scalar_type() != at::kFloat && w1.size(1) % w2.size(0) == 0;
}

// ------------------------------------------------------------------------------------ ops

at::Tensor blockdiag_fwd(const at::Tensor& x, const at::Tensor& w, const c10::optional<at::Tensor>& bias,
                         int64_t n_out, int64_t act) {
  const c10::cuda::CUDAGuard guard(x.device());
  check_no_pending_error();
  at::Tensor keep;
  return bd(x, w, bias_ptr(bias, keep), n_out, act, Perm{}, Perm{});
}

at::Tensor blockdiag_wgrad(const at::Tensor& x, const at::Tensor& g, int64_t k, int64_t q, int64_t p) {
  const c10::cuda::CUDAGuard guard(x.device());
  check_no_pending_error();
  return wgrad(x, g, k, q, p, Perm{}, Perm{});
}

at::Tensor monarch_fwd(const at::Tensor& x, const at::Tensor& w1, const at::Tensor& w2,
                       const c10::optional<at::Tensor>& bias, int64_t n_out, int64_t act) {
  const c10::cuda::CUDAGuard guard(x.device());
  check_no_pending_error();
  const int64_t l = w2.size(0), s = w2.size(1), r = w2.size(2);
  at::Tensor keep;
  const void* b = bias_ptr(bias, keep);
  if (auto out = decode_monarch_fwd(x, w1, w2, b, act, n_out); out.defined()) return out;
  if (auto out = resident_monarch_fwd(x, w1, w2, b, act, n_out); out.defined()) return out;
  if (fused_ok(x, w1, w2)) {
    auto out = at::empty({x.size(0), n_out}, x.options());
    check(monarch_cuda::monarch_fused_forward(dtype_of(x), mat2(x), mat3(w1), mat3(w2), b, out.data_ptr(), n_out,
                                              static_cast<int>(act), stream()),
          "monarch_fused_forward");
    return out;
  }
  const auto z = bd(x, w1, nullptr, l * r, 0, Perm{}, perm(l, r));  // P1 folded into the store
  return bd(z, w2, b, n_out, act, Perm{}, perm(s, l));               // P2 folded into the store
}

// dy[t, rr*l + ll] = sum_ss g[t, ss*l + ll] w2[ll, ss, rr]  (gather P2^T, scatter P1^T)
at::Tensor stage2_adjoint(const at::Tensor& g, const at::Tensor& w2) {
  const int64_t l = w2.size(0), s = w2.size(1), r = w2.size(2);
  return bd(g, w2.transpose(1, 2), nullptr, l * r, 0, perm(s, l), perm(r, l));
}

at::Tensor monarch_bwd_input(const at::Tensor& g, const at::Tensor& w1, const at::Tensor& w2, int64_t n_in) {
  const c10::cuda::CUDAGuard guard(g.device());
  check_no_pending_error();
  if (auto dx = decode_monarch_dx(g, w1, w2, n_in); dx.defined()) return dx;
  if (fused_ok(g, w1, w2)) {
    auto dx = at::empty({g.size(0), n_in}, g.options());
    check(monarch_cuda::monarch_fused_dx(dtype_of(g), mat2(g), mat3(w1), mat3(w2), dx.data_ptr(), n_in, stream()),
          "monarch_fused_dx");
    return dx;
  }
  return bd(stage2_adjoint(g, w2), w1.transpose(1, 2), nullptr, n_in, 0, Perm{}, Perm{});
}

std::tuple<at::Tensor, at::Tensor> monarch_bwd_weight(const at::Tensor& x, const at::Tensor& g, const at::Tensor& w1,
                                                      const at::Tensor& w2) {
  const c10::cuda::CUDAGuard guard(x.device());
  check_no_pending_error();
  const int64_t k = w1.size(0), q = w1.size(1), p = w1.size(2), l = w2.size(0), s = w2.size(1), r = w2.size(2);
  const auto z = bd(x, w1, nullptr, l * r, 0, Perm{}, perm(l, r));  // recomputed stage-2 input
  auto dw2 = wgrad(z, g, l, s, r, Perm{}, perm(s, l));
  auto dw1 = wgrad(x, stage2_adjoint(g, w2), k, q, p, Perm{}, Perm{});
  return {dw1, dw2};
}

}  // namespace

namespace monarch_cuda_ops {

std::tuple<at::Tensor, at::Tensor> monarch_fwd_keeping(const at::Tensor& x, const at::Tensor& w1,
                                                       const at::Tensor& w2, const std::optional<at::Tensor>& bias,
                                                       int64_t n_out, int64_t act) {
  const c10::cuda::CUDAGuard guard(x.device());
  check_no_pending_error();
  if (!few_tokens(x)) {  // the decode kernels keep nothing (at a few tokens the recompute is a decode launch)
    at::Tensor keep;
    const at::Tensor w1c = w1.contiguous(), w2c = w2.contiguous();
    monarch_cuda::MonarchFwdArgs a = fwd_args(x, w1c, w2c, bias_ptr(bias, keep), act, n_out);
    auto z = at::empty({x.size(0), w1.size(0) * w1.size(1)}, x.options());
    a.z = z.data_ptr(), a.z_ts = z.size(1);
    if (monarch_cuda::resident_supported(dtype_of(x), a, x.device().index())) {
      auto out = at::empty({x.size(0), n_out}, x.options());
      a.out = out.data_ptr();
      check(monarch_cuda::resident_run(dtype_of(x), a, x.device().index(), stream()), "resident monarch forward");
      return {out, z};
    }
  }
  return {monarch_fwd(x, w1, w2, bias, n_out, act), at::Tensor()};
}

}  // namespace monarch_cuda_ops

TORCH_LIBRARY_IMPL(monarch_kernels_ext, CUDA, m) {
  m.impl("blockdiag_fwd", &blockdiag_fwd);
  m.impl("blockdiag_wgrad", &blockdiag_wgrad);
  m.impl("monarch_fwd", &monarch_fwd);
  m.impl("monarch_bwd_input", &monarch_bwd_input);
  m.impl("monarch_bwd_weight", &monarch_bwd_weight);
}
