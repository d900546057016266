// Operator schemas of the compiled extension (namespace monarch_kernels_ext), their argument checks and
// autograd, and the Python module monarch_kernels._C. The CPU kernels register in monarch_cpu.cpp, the CUDA
// kernels (when built) in cuda/cuda_ops.cpp; monarch_kernels/ext.py wraps them as the `cpu` and `cuda` backends.
//
// Every op passes, in order:
//  * an Autograd-key kernel (a torch::autograd::Function) whose backward is written with the same ops, so any
//    derivative order works (the formulas of monarch_kernels/ops.py, real dtypes only); monarch_bwd_act, the
//    first-order backward with an activation, instead refuses to be differentiated;
//  * a BackendSelect-key kernel that validates the arguments (shapes, dtypes, devices, bias length, n_out,
//    n_in, activation code) and raises ValueError/TypeError naming the argument before any kernel runs.
//    BackendSelect is in every call's key set (inference mode included) right above the device kernels;
//  * the device kernel.
//
// Shapes (T tokens): x (T, n_in) with 1 <= n_in <= k*p (missing columns read as zero), g (T, n_out) with
// 1 <= n_out <= l*s, w1/w (k, q, p), w2 (l, s, r) with l*r == k*q, bias (n_out,).
//
// Built without MONARCH_KERNELS_NO_PYTHON_MODULE this file also defines the Python module; with it, a plain
// shared library that torch.ops.load_library can load (tests/csrc/test_cpu_portable_kernels.py).
#include <ATen/ATen.h>
#include <torch/csrc/autograd/custom_function.h>
#include <torch/library.h>

#ifndef MONARCH_KERNELS_NO_PYTHON_MODULE
#include <torch/extension.h>
#endif
#ifdef MONARCH_WITH_CUDA
#include "cuda/cuda_ops.h"  // monarch_fwd_keeping
#include "cuda/decode.cuh"  // the kernel choices (set_decode_choice, set_many_token_choice)
#endif

#include <algorithm>
#include <functional>
#include <optional>
#include <string>
#include <tuple>
#include <vector>

namespace monarch_ops {
namespace {

using at::Tensor;
using OptTensor = std::optional<Tensor>;
using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

enum Act : int64_t { NONE = 0, RELU = 1, GELU = 2, GELU_TANH = 3 };

// ------------------------------------------------------------------------------------------ validation

void check_dtype(const char* fn, const char* name, const Tensor& t) {
  const auto st = t.scalar_type();
  TORCH_CHECK_TYPE(st == at::kFloat || st == at::kDouble || st == at::kHalf || st == at::kBFloat16, fn, ": ", name,
                   " has dtype ", st, "; the compiled kernels take float16, bfloat16, float32 or float64");
}

void check_like(const char* fn, const char* name, const Tensor& t, const char* ref_name, const Tensor& ref) {
  TORCH_CHECK_TYPE(t.scalar_type() == ref.scalar_type(), fn, ": ", name, " has dtype ", t.scalar_type(), " but ",
                   ref_name, " has dtype ", ref.scalar_type(), "; they must match");
  TORCH_CHECK_VALUE(t.device() == ref.device(), fn, ": ", name, " is on ", t.device(), " but ", ref_name, " is on ",
                    ref.device(), "; they must match");
}

// t is (T, n) with 1 <= n <= width
void check_rows(const char* fn, const char* name, const Tensor& t, int64_t width) {
  TORCH_CHECK_VALUE(t.dim() == 2 && t.size(1) >= 1 && t.size(1) <= width, fn, ": ", name, " has shape ", t.sizes(),
                    "; expected (tokens, n) with 1 <= n <= ", width);
  check_dtype(fn, name, t);
}

void check_factor(const char* fn, const char* name, const Tensor& w) {
  TORCH_CHECK_VALUE(w.dim() == 3 && w.size(0) >= 1 && w.size(1) >= 1 && w.size(2) >= 1, fn, ": ", name,
                    " must be 3-D (nblocks, out_block, in_block) with no empty dimension, got shape ", w.sizes());
  check_dtype(fn, name, w);
}

void check_range(const char* fn, const char* name, int64_t v, int64_t lo, int64_t hi) {
  TORCH_CHECK_VALUE(v >= lo && v <= hi, fn, ": ", name, "=", v, " must lie in [", lo, ", ", hi, "]");
}

void check_same_tokens(const char* fn, const Tensor& x, const Tensor& g) {
  TORCH_CHECK_VALUE(x.size(0) == g.size(0), fn, ": x has shape ", x.sizes(), " and g has shape ", g.sizes(),
                    "; they must have the same number of rows (one gradient row per input row)");
}

void check_bias(const char* fn, const OptTensor& bias, int64_t n_out, const Tensor& x) {
  if (!bias.has_value()) return;
  TORCH_CHECK_VALUE(bias->dim() == 1 && bias->size(0) == n_out, fn, ": bias has shape ", bias->sizes(),
                    ", expected (", n_out, ",)");
  check_like(fn, "bias", *bias, "x", x);
}

void check_act(const char* fn, int64_t act) {
  TORCH_CHECK_VALUE(act >= NONE && act <= GELU_TANH, fn, ": act=", act,
                    " must be an activation code 0 (none), 1 (relu), 2 (gelu) or 3 (gelu_tanh)");
}

struct MonarchSizes {
  int64_t k, q, p, l, s, r;
};

MonarchSizes check_monarch_factors(const char* fn, const Tensor& w1, const Tensor& w2) {
  check_factor(fn, "w1", w1);
  check_factor(fn, "w2", w2);
  check_like(fn, "w2", w2, "w1", w1);
  const MonarchSizes d{w1.size(0), w1.size(1), w1.size(2), w2.size(0), w2.size(1), w2.size(2)};
  TORCH_CHECK_VALUE(d.l * d.r == d.k * d.q, fn, ": w1 of shape ", w1.sizes(), " produces k*q = ", d.k * d.q,
                    " intermediate features but w2 of shape ", w2.sizes(), " consumes l*r = ", d.l * d.r,
                    "; they must be equal");
  return d;
}

void validate_blockdiag_fwd(const Tensor& x, const Tensor& w, const OptTensor& bias, int64_t n_out, int64_t act) {
  const char* fn = "monarch_kernels_ext::blockdiag_fwd";
  check_factor(fn, "w", w);
  check_rows(fn, "x", x, w.size(0) * w.size(2));
  check_like(fn, "x", x, "w", w);
  check_range(fn, "n_out", n_out, 1, w.size(0) * w.size(1));
  check_bias(fn, bias, n_out, x);
  check_act(fn, act);
}

void validate_blockdiag_wgrad(const Tensor& x, const Tensor& g, int64_t k, int64_t q, int64_t p) {
  const char* fn = "monarch_kernels_ext::blockdiag_wgrad";
  constexpr int64_t most = int64_t(1) << 31;
  check_range(fn, "k", k, 1, most);
  check_range(fn, "q", q, 1, most);
  check_range(fn, "p", p, 1, most);
  check_rows(fn, "x", x, k * p);
  check_rows(fn, "g", g, k * q);
  check_like(fn, "g", g, "x", x);
  check_same_tokens(fn, x, g);
}

void validate_monarch_fwd(const Tensor& x, const Tensor& w1, const Tensor& w2, const OptTensor& bias, int64_t n_out,
                          int64_t act, const char* fn = "monarch_kernels_ext::monarch_fwd") {
  const auto d = check_monarch_factors(fn, w1, w2);
  check_rows(fn, "x", x, d.k * d.p);
  check_like(fn, "x", x, "w1", w1);
  check_range(fn, "n_out", n_out, 1, d.l * d.s);
  check_bias(fn, bias, n_out, x);
  check_act(fn, act);
}

void validate_monarch_bwd_input(const Tensor& g, const Tensor& w1, const Tensor& w2, int64_t n_in) {
  const char* fn = "monarch_kernels_ext::monarch_bwd_input";
  const auto d = check_monarch_factors(fn, w1, w2);
  check_rows(fn, "g", g, d.l * d.s);
  check_like(fn, "g", g, "w1", w1);
  check_range(fn, "n_in", n_in, 1, d.k * d.p);
}

void validate_monarch_bwd_weight(const char* fn, const Tensor& x, const Tensor& g, const Tensor& w1,
                                 const Tensor& w2) {
  const auto d = check_monarch_factors(fn, w1, w2);
  check_rows(fn, "x", x, d.k * d.p);
  check_rows(fn, "g", g, d.l * d.s);
  check_like(fn, "x", x, "w1", w1);
  check_like(fn, "g", g, "w1", w1);
  check_same_tokens(fn, x, g);
}

// ------------------------------------------------------------------------------------------ op handles

template <typename Sig>
c10::TypedOperatorHandle<Sig> handle(const char* name) {
  return c10::Dispatcher::singleton().findSchemaOrThrow(name, "").typed<Sig>();
}

using BlockdiagFwdSig = Tensor(const Tensor&, const Tensor&, const OptTensor&, int64_t, int64_t);
using BlockdiagWgradSig = Tensor(const Tensor&, const Tensor&, int64_t, int64_t, int64_t);
using MonarchFwdSig = Tensor(const Tensor&, const Tensor&, const Tensor&, const OptTensor&, int64_t, int64_t);
using MonarchBwdInputSig = Tensor(const Tensor&, const Tensor&, const Tensor&, int64_t);
using MonarchBwdWeightSig = std::tuple<Tensor, Tensor>(const Tensor&, const Tensor&, const Tensor&, const Tensor&);
using MonarchBwdSig = std::tuple<Tensor, Tensor, Tensor>(const Tensor&, const Tensor&, const Tensor&, const Tensor&,
                                                         int64_t);
using MonarchBwdActSig = std::tuple<Tensor, Tensor, Tensor, Tensor>(const Tensor&, const Tensor&, const Tensor&,
                                                                    const Tensor&, const OptTensor&, int64_t, int64_t);

const auto& blockdiag_fwd_op() {
  static const auto h = handle<BlockdiagFwdSig>("monarch_kernels_ext::blockdiag_fwd");
  return h;
}
const auto& blockdiag_wgrad_op() {
  static const auto h = handle<BlockdiagWgradSig>("monarch_kernels_ext::blockdiag_wgrad");
  return h;
}
const auto& monarch_fwd_op() {
  static const auto h = handle<MonarchFwdSig>("monarch_kernels_ext::monarch_fwd");
  return h;
}
const auto& monarch_bwd_input_op() {
  static const auto h = handle<MonarchBwdInputSig>("monarch_kernels_ext::monarch_bwd_input");
  return h;
}
const auto& monarch_bwd_weight_op() {
  static const auto h = handle<MonarchBwdWeightSig>("monarch_kernels_ext::monarch_bwd_weight");
  return h;
}
const auto& monarch_bwd_op() {
  static const auto h = handle<MonarchBwdSig>("monarch_kernels_ext::monarch_bwd");
  return h;
}
const auto& monarch_bwd_act_op() {
  static const auto h = handle<MonarchBwdActSig>("monarch_kernels_ext::monarch_bwd_act");
  return h;
}

// ------------------------------------------------------------------------------------------ BackendSelect: checks

constexpr auto kBelowBackendSelect = c10::DispatchKeySet(c10::DispatchKeySet::FULL_AFTER, c10::DispatchKey::BackendSelect);

Tensor blockdiag_fwd_checked(c10::DispatchKeySet ks, const Tensor& x, const Tensor& w, const OptTensor& bias,
                             int64_t n_out, int64_t act) {
  validate_blockdiag_fwd(x, w, bias, n_out, act);
  return blockdiag_fwd_op().redispatch(ks & kBelowBackendSelect, x, w, bias, n_out, act);
}

Tensor blockdiag_wgrad_checked(c10::DispatchKeySet ks, const Tensor& x, const Tensor& g, int64_t k, int64_t q,
                               int64_t p) {
  validate_blockdiag_wgrad(x, g, k, q, p);
  return blockdiag_wgrad_op().redispatch(ks & kBelowBackendSelect, x, g, k, q, p);
}

Tensor monarch_fwd_checked(c10::DispatchKeySet ks, const Tensor& x, const Tensor& w1, const Tensor& w2,
                           const OptTensor& bias, int64_t n_out, int64_t act) {
  validate_monarch_fwd(x, w1, w2, bias, n_out, act);
  return monarch_fwd_op().redispatch(ks & kBelowBackendSelect, x, w1, w2, bias, n_out, act);
}

Tensor monarch_bwd_input_checked(c10::DispatchKeySet ks, const Tensor& g, const Tensor& w1, const Tensor& w2,
                                 int64_t n_in) {
  validate_monarch_bwd_input(g, w1, w2, n_in);
  return monarch_bwd_input_op().redispatch(ks & kBelowBackendSelect, g, w1, w2, n_in);
}

std::tuple<Tensor, Tensor> monarch_bwd_weight_checked(c10::DispatchKeySet ks, const Tensor& x, const Tensor& g,
                                                      const Tensor& w1, const Tensor& w2) {
  validate_monarch_bwd_weight("monarch_kernels_ext::monarch_bwd_weight", x, g, w1, w2);
  return monarch_bwd_weight_op().redispatch(ks & kBelowBackendSelect, x, g, w1, w2);
}

std::tuple<Tensor, Tensor, Tensor> monarch_bwd_checked(c10::DispatchKeySet ks, const Tensor& x, const Tensor& g,
                                                       const Tensor& w1, const Tensor& w2, int64_t n_in) {
  const char* fn = "monarch_kernels_ext::monarch_bwd";
  validate_monarch_bwd_weight(fn, x, g, w1, w2);
  check_range(fn, "n_in", n_in, 1, w1.size(0) * w1.size(2));
  return monarch_bwd_op().redispatch(ks & kBelowBackendSelect, x, g, w1, w2, n_in);
}

std::tuple<Tensor, Tensor, Tensor, Tensor> monarch_bwd_act_checked(c10::DispatchKeySet ks, const Tensor& x,
                                                                   const Tensor& g, const Tensor& w1, const Tensor& w2,
                                                                   const OptTensor& bias, int64_t n_in, int64_t act) {
  const char* fn = "monarch_kernels_ext::monarch_bwd_act";
  validate_monarch_bwd_weight(fn, x, g, w1, w2);
  check_range(fn, "n_in", n_in, 1, w1.size(0) * w1.size(2));
  check_bias(fn, bias, g.size(1), x);
  check_act(fn, act);
  return monarch_bwd_act_op().redispatch(ks & kBelowBackendSelect, x, g, w1, w2, bias, n_in, act);
}

// ------------------------------------------------------------------------------------------ Autograd

// g · act'(pre) in g's dtype, evaluated in float32 for half-precision storage (ATen's own derivatives, as the
// unfused act(F.linear(...)) would use; they are differentiable again)
Tensor act_backward(int64_t act, const Tensor& pre, const Tensor& g) {
  const bool half = pre.scalar_type() == at::kHalf || pre.scalar_type() == at::kBFloat16;
  const Tensor pw = half ? pre.to(at::kFloat) : pre, gw = half ? g.to(at::kFloat) : g;
  const Tensor out = act == RELU ? at::threshold_backward(gw, pw, 0)
                                 : at::gelu_backward(gw, pw, act == GELU ? "none" : "tanh");
  return out.to(g.scalar_type());
}

bool any_requires_grad(std::initializer_list<const Tensor*> ts) {
  if (!at::GradMode::is_enabled()) return false;
  for (const Tensor* t : ts)
    if (t && t->defined() && t->requires_grad()) return true;
  return false;
}

Tensor sum_defined(const Tensor& a, const Tensor& b) { return !a.defined() ? b : !b.defined() ? a : a + b; }

OptTensor as_opt(const Tensor& t) { return t.defined() ? OptTensor(t) : std::nullopt; }

// Pullbacks shared by several ops (conventions of monarch_kernels/ops.py: _vjp_bwd_input, _vjp_bwd_weight).
// a = Mᵀ g with cotangent h: ⟨h, a⟩ = ⟨g, M h⟩, so d/dg = M h and d/dw = ∇_w ⟨g, M h⟩.
std::tuple<Tensor, Tensor, Tensor> vjp_bwd_input(const Tensor& g, const Tensor& w1, const Tensor& w2, const Tensor& h,
                                                 bool need_g, bool need_w) {
  Tensor dg, dw1, dw2;
  if (!h.defined()) return {dg, dw1, dw2};
  if (need_g) dg = monarch_fwd_op().call(h, w1, w2, std::nullopt, g.size(1), NONE);
  if (need_w) std::tie(dw1, dw2) = monarch_bwd_weight_op().call(h, g, w1, w2);
  return {dg, dw1, dw2};
}

// (dw1, dw2) = ∇ ⟨g, M(w1, w2) x⟩ with cotangents (h1, h2): the pairing is ⟨g, M(h1, w2) x⟩ + ⟨g, M(w1, h2) x⟩.
std::tuple<Tensor, Tensor, Tensor, Tensor> vjp_bwd_weight(const Tensor& x, const Tensor& g, const Tensor& w1,
                                                          const Tensor& w2, const Tensor& h1, const Tensor& h2,
                                                          const bool need[4]) {
  Tensor dx, dg, dw1, dw2;
  std::vector<std::pair<Tensor, Tensor>> pairs;
  if (h1.defined()) pairs.emplace_back(h1, w2);
  if (h2.defined()) pairs.emplace_back(w1, h2);
  for (const auto& [a, c] : pairs) {
    if (need[0]) dx = sum_defined(dx, monarch_bwd_input_op().call(g, a, c, x.size(1)));
    if (need[1]) dg = sum_defined(dg, monarch_fwd_op().call(x, a, c, std::nullopt, g.size(1), NONE));
  }
  if (need[2] && h2.defined()) dw1 = std::get<0>(monarch_bwd_weight_op().call(x, g, w1, h2));
  if (need[3] && h1.defined()) dw2 = std::get<1>(monarch_bwd_weight_op().call(x, g, h1, w2));
  return {dx, dg, dw1, dw2};
}

struct BlockdiagFwd : public torch::autograd::Function<BlockdiagFwd> {
  static Tensor forward(AutogradContext* ctx, const Tensor& x, const Tensor& w, const OptTensor& bias, int64_t n_out,
                        int64_t act) {
    at::AutoDispatchBelowADInplaceOrView guard;
    ctx->save_for_backward({x, w, bias.value_or(Tensor())});
    ctx->saved_data["n_out"] = n_out;
    ctx->saved_data["act"] = act;
    return blockdiag_fwd_op().call(x, w, bias, n_out, act);
  }
  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const auto saved = ctx->get_saved_variables();
    const Tensor &x = saved[0], &w = saved[1], &bias = saved[2];
    const int64_t n_out = ctx->saved_data["n_out"].toInt(), act = ctx->saved_data["act"].toInt();
    Tensor g = grads[0], dx, dw, db;
    if (g.defined()) {
      if (act != NONE) g = act_backward(act, blockdiag_fwd_op().call(x, w, as_opt(bias), n_out, NONE), g);
      if (ctx->needs_input_grad(0)) dx = blockdiag_fwd_op().call(g, w.transpose(1, 2), std::nullopt, x.size(1), NONE);
      if (ctx->needs_input_grad(1)) dw = blockdiag_wgrad_op().call(x, g, w.size(0), w.size(1), w.size(2));
      if (bias.defined() && ctx->needs_input_grad(2)) db = g.sum(0);
    }
    return {dx, dw, db, Tensor(), Tensor()};
  }
};

struct BlockdiagWgrad : public torch::autograd::Function<BlockdiagWgrad> {
  static Tensor forward(AutogradContext* ctx, const Tensor& x, const Tensor& g, int64_t k, int64_t q, int64_t p) {
    at::AutoDispatchBelowADInplaceOrView guard;
    ctx->save_for_backward({x, g});
    return blockdiag_wgrad_op().call(x, g, k, q, p);
  }
  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    // dw[kk] = Σ_t g_kk x_kkᵀ  =>  d/dx = BD(h)ᵀ g,  d/dg = BD(h) x
    const auto saved = ctx->get_saved_variables();
    const Tensor &x = saved[0], &g = saved[1], &h = grads[0];
    Tensor dx, dg;
    if (h.defined() && ctx->needs_input_grad(0))
      dx = blockdiag_fwd_op().call(g, h.transpose(1, 2), std::nullopt, x.size(1), NONE);
    if (h.defined() && ctx->needs_input_grad(1)) dg = blockdiag_fwd_op().call(x, h, std::nullopt, g.size(1), NONE);
    return {dx, dg, Tensor(), Tensor(), Tensor()};
  }
};

struct MonarchFwd : public torch::autograd::Function<MonarchFwd> {
  static Tensor forward(AutogradContext* ctx, const Tensor& x, const Tensor& w1, const Tensor& w2,
                        const OptTensor& bias, int64_t n_out, int64_t act) {
    at::AutoDispatchBelowADInplaceOrView guard;
    ctx->save_for_backward({x, w1, w2, bias.value_or(Tensor())});  // the intermediate is recomputed, not saved
    ctx->saved_data["n_out"] = n_out;
    ctx->saved_data["act"] = act;
    return monarch_fwd_op().call(x, w1, w2, bias, n_out, act);
  }
  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const auto saved = ctx->get_saved_variables();
    const Tensor &x = saved[0], &w1 = saved[1], &w2 = saved[2], &bias = saved[3];
    const int64_t n_out = ctx->saved_data["n_out"].toInt(), act = ctx->saved_data["act"].toInt();
    Tensor g = grads[0], dx, dw1, dw2, db;
    if (g.defined()) {
      const bool need_x = ctx->needs_input_grad(0), need_w = ctx->needs_input_grad(1) || ctx->needs_input_grad(2);
      if (act != NONE && need_w && !at::GradMode::is_enabled() && x.device().is_cpu()) {
        // first-order backward with an activation on CPU: one pass, the pre-activation from one stage-2 GEMM
        // (cheaper than the forward it replaces even when dx is not wanted)
        std::tie(dx, dw1, dw2, db) = monarch_bwd_act_op().call(x, g, w1, w2, as_opt(bias), x.size(1), act);
        const auto keep = [&](const Tensor& t, int64_t i) { return ctx->needs_input_grad(i) ? t : Tensor(); };
        return {keep(dx, 0), keep(dw1, 1), keep(dw2, 2), bias.defined() ? keep(db, 3) : Tensor(), Tensor(), Tensor()};
      }
      if (act != NONE) g = act_backward(act, monarch_fwd_op().call(x, w1, w2, as_opt(bias), n_out, NONE), g);
      if (need_x && need_w && !at::GradMode::is_enabled()) {  // first-order backward: one fused call
        std::tie(dx, dw1, dw2) = monarch_bwd_op().call(x, g, w1, w2, x.size(1));
      } else {
        if (need_x) dx = monarch_bwd_input_op().call(g, w1, w2, x.size(1));
        if (need_w) std::tie(dw1, dw2) = monarch_bwd_weight_op().call(x, g, w1, w2);
      }
      if (bias.defined() && ctx->needs_input_grad(3)) db = g.sum(0);
    }
    return {dx, dw1, dw2, db, Tensor(), Tensor()};
  }
};

struct MonarchBwdInput : public torch::autograd::Function<MonarchBwdInput> {
  static Tensor forward(AutogradContext* ctx, const Tensor& g, const Tensor& w1, const Tensor& w2, int64_t n_in) {
    at::AutoDispatchBelowADInplaceOrView guard;
    ctx->save_for_backward({g, w1, w2});
    return monarch_bwd_input_op().call(g, w1, w2, n_in);
  }
  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const auto saved = ctx->get_saved_variables();
    auto [dg, dw1, dw2] = vjp_bwd_input(saved[0], saved[1], saved[2], grads[0], ctx->needs_input_grad(0),
                                        ctx->needs_input_grad(1) || ctx->needs_input_grad(2));
    return {dg, dw1, dw2, Tensor()};
  }
};

struct MonarchBwdWeight : public torch::autograd::Function<MonarchBwdWeight> {
  static variable_list forward(AutogradContext* ctx, const Tensor& x, const Tensor& g, const Tensor& w1,
                               const Tensor& w2) {
    at::AutoDispatchBelowADInplaceOrView guard;
    ctx->save_for_backward({x, g, w1, w2});
    auto [dw1, dw2] = monarch_bwd_weight_op().call(x, g, w1, w2);
    return {dw1, dw2};
  }
  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const auto s = ctx->get_saved_variables();
    const bool need[4] = {ctx->needs_input_grad(0), ctx->needs_input_grad(1), ctx->needs_input_grad(2),
                          ctx->needs_input_grad(3)};
    auto [dx, dg, dw1, dw2] = vjp_bwd_weight(s[0], s[1], s[2], s[3], grads[0], grads[1], need);
    return {dx, dg, dw1, dw2};
  }
};

struct MonarchBwd : public torch::autograd::Function<MonarchBwd> {
  static variable_list forward(AutogradContext* ctx, const Tensor& x, const Tensor& g, const Tensor& w1,
                               const Tensor& w2, int64_t n_in) {
    at::AutoDispatchBelowADInplaceOrView guard;
    ctx->save_for_backward({x, g, w1, w2});
    auto [dx, dw1, dw2] = monarch_bwd_op().call(x, g, w1, w2, n_in);
    return {dx, dw1, dw2};
  }
  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    // (dx, dw1, dw2) = (monarch_bwd_input(g, ...), *monarch_bwd_weight(x, g, ...)): the sum of both pullbacks
    const auto s = ctx->get_saved_variables();
    const bool need[4] = {ctx->needs_input_grad(0), ctx->needs_input_grad(1), ctx->needs_input_grad(2),
                          ctx->needs_input_grad(3)};
    auto [dg_a, dw1_a, dw2_a] = vjp_bwd_input(s[1], s[2], s[3], grads[0], need[1], need[2] || need[3]);
    auto [dx, dg_b, dw1_b, dw2_b] = vjp_bwd_weight(s[0], s[1], s[2], s[3], grads[1], grads[2], need);
    const Tensor dw1 = need[2] ? sum_defined(dw1_a, dw1_b) : Tensor();
    const Tensor dw2 = need[3] ? sum_defined(dw2_a, dw2_b) : Tensor();
    return {dx, sum_defined(dg_a, dg_b), dw1, dw2, Tensor()};
  }
};

// Autograd-key kernels: record the Function when something requires grad, else go straight below autograd.
Tensor blockdiag_fwd_autograd(const Tensor& x, const Tensor& w, const OptTensor& bias, int64_t n_out, int64_t act) {
  if (any_requires_grad({&x, &w, bias ? &*bias : nullptr})) return BlockdiagFwd::apply(x, w, bias, n_out, act);
  at::AutoDispatchBelowADInplaceOrView guard;
  return blockdiag_fwd_op().call(x, w, bias, n_out, act);
}

Tensor blockdiag_wgrad_autograd(const Tensor& x, const Tensor& g, int64_t k, int64_t q, int64_t p) {
  if (any_requires_grad({&x, &g})) return BlockdiagWgrad::apply(x, g, k, q, p);
  at::AutoDispatchBelowADInplaceOrView guard;
  return blockdiag_wgrad_op().call(x, g, k, q, p);
}

Tensor monarch_fwd_autograd(const Tensor& x, const Tensor& w1, const Tensor& w2, const OptTensor& bias, int64_t n_out,
                            int64_t act) {
  if (any_requires_grad({&x, &w1, &w2, bias ? &*bias : nullptr})) return MonarchFwd::apply(x, w1, w2, bias, n_out, act);
  at::AutoDispatchBelowADInplaceOrView guard;
  return monarch_fwd_op().call(x, w1, w2, bias, n_out, act);
}

Tensor monarch_bwd_input_autograd(const Tensor& g, const Tensor& w1, const Tensor& w2, int64_t n_in) {
  if (any_requires_grad({&g, &w1, &w2})) return MonarchBwdInput::apply(g, w1, w2, n_in);
  at::AutoDispatchBelowADInplaceOrView guard;
  return monarch_bwd_input_op().call(g, w1, w2, n_in);
}

std::tuple<Tensor, Tensor> monarch_bwd_weight_autograd(const Tensor& x, const Tensor& g, const Tensor& w1,
                                                       const Tensor& w2) {
  if (any_requires_grad({&x, &g, &w1, &w2})) {
    const auto out = MonarchBwdWeight::apply(x, g, w1, w2);
    return {out[0], out[1]};
  }
  at::AutoDispatchBelowADInplaceOrView guard;
  return monarch_bwd_weight_op().call(x, g, w1, w2);
}

// monarch_bwd_act serves first-order backwards only: differentiating it is an error that names the ops to use.
std::tuple<Tensor, Tensor, Tensor, Tensor> monarch_bwd_act_autograd(const Tensor& x, const Tensor& g, const Tensor& w1,
                                                                    const Tensor& w2, const OptTensor& bias,
                                                                    int64_t n_in, int64_t act) {
  TORCH_CHECK(!any_requires_grad({&x, &g, &w1, &w2, bias ? &*bias : nullptr}),
              "monarch_kernels_ext::monarch_bwd_act is a first-order backward kernel and is not differentiable; "
              "for higher derivatives use monarch_fwd, monarch_bwd_input and monarch_bwd_weight");
  at::AutoDispatchBelowADInplaceOrView guard;
  return monarch_bwd_act_op().call(x, g, w1, w2, bias, n_in, act);
}

std::tuple<Tensor, Tensor, Tensor> monarch_bwd_autograd(const Tensor& x, const Tensor& g, const Tensor& w1,
                                                        const Tensor& w2, int64_t n_in) {
  if (any_requires_grad({&x, &g, &w1, &w2})) {
    const auto out = MonarchBwd::apply(x, g, w1, w2, n_in);
    return {out[0], out[1], out[2]};
  }
  at::AutoDispatchBelowADInplaceOrView guard;
  return monarch_bwd_op().call(x, g, w1, w2, n_in);
}

}  // namespace
}  // namespace monarch_ops

TORCH_LIBRARY(monarch_kernels_ext, m) {
  m.def("blockdiag_fwd(Tensor x, Tensor w, Tensor? bias, int n_out, int act) -> Tensor");
  m.def("blockdiag_wgrad(Tensor x, Tensor g, int k, int q, int p) -> Tensor");
  m.def("monarch_fwd(Tensor x, Tensor w1, Tensor w2, Tensor? bias, int n_out, int act) -> Tensor");
  m.def("monarch_bwd_input(Tensor g, Tensor w1, Tensor w2, int n_in) -> Tensor");
  m.def("monarch_bwd_weight(Tensor x, Tensor g, Tensor w1, Tensor w2) -> (Tensor, Tensor)");
  // (dx, dw1, dw2) in one pass; CPU kernel only (other devices compose monarch_bwd_input + monarch_bwd_weight)
  m.def("monarch_bwd(Tensor x, Tensor g, Tensor w1, Tensor w2, int n_in) -> (Tensor, Tensor, Tensor)");
  // (dx, dw1, dw2, db) of <g, act(M x + bias)> in one pass (first order only); CPU kernel only
  m.def("monarch_bwd_act(Tensor x, Tensor g, Tensor w1, Tensor w2, Tensor? bias, int n_in, int act) -> "
        "(Tensor, Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(monarch_kernels_ext, BackendSelect, m) {
  m.impl("blockdiag_fwd", TORCH_FN(monarch_ops::blockdiag_fwd_checked));
  m.impl("blockdiag_wgrad", TORCH_FN(monarch_ops::blockdiag_wgrad_checked));
  m.impl("monarch_fwd", TORCH_FN(monarch_ops::monarch_fwd_checked));
  m.impl("monarch_bwd_input", TORCH_FN(monarch_ops::monarch_bwd_input_checked));
  m.impl("monarch_bwd_weight", TORCH_FN(monarch_ops::monarch_bwd_weight_checked));
  m.impl("monarch_bwd", TORCH_FN(monarch_ops::monarch_bwd_checked));
  m.impl("monarch_bwd_act", TORCH_FN(monarch_ops::monarch_bwd_act_checked));
}

TORCH_LIBRARY_IMPL(monarch_kernels_ext, Autograd, m) {
  m.impl("blockdiag_fwd", TORCH_FN(monarch_ops::blockdiag_fwd_autograd));
  m.impl("blockdiag_wgrad", TORCH_FN(monarch_ops::blockdiag_wgrad_autograd));
  m.impl("monarch_fwd", TORCH_FN(monarch_ops::monarch_fwd_autograd));
  m.impl("monarch_bwd_input", TORCH_FN(monarch_ops::monarch_bwd_input_autograd));
  m.impl("monarch_bwd_weight", TORCH_FN(monarch_ops::monarch_bwd_weight_autograd));
  m.impl("monarch_bwd", TORCH_FN(monarch_ops::monarch_bwd_autograd));
  m.impl("monarch_bwd_act", TORCH_FN(monarch_ops::monarch_bwd_act_autograd));
}

#ifndef MONARCH_KERNELS_NO_PYTHON_MODULE
#ifdef MONARCH_WITH_CUDA
// A setter of one of the extension's process-wide kernel choices, by name (the enum's values in `names` order);
// returns the previous name.
template <typename Choice>
std::function<std::string(const std::string&)> choice_setter(const char* fn, std::vector<std::string> names,
                                                             Choice (*get)(), void (*set)(Choice)) {
  return [fn, names, get, set](const std::string& name) {
    const auto it = std::find(names.begin(), names.end(), name);
    std::string all;
    for (const auto& n : names) all += (all.empty() ? "'" : ", '") + n + "'";
    TORCH_CHECK_VALUE(it != names.end(), fn, ": name=", name, " must be one of ", all);
    const std::string before = names[static_cast<size_t>(get())];
    set(static_cast<Choice>(it - names.begin()));
    return before;
  };
}
#endif

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "monarch-kernels compiled kernels (ops registered under torch.ops.monarch_kernels_ext)";
#ifdef MONARCH_WITH_CUDA
  m.attr("with_cuda") = true;
  m.def("set_decode_kernel",
        choice_setter<monarch_cuda::DecodeChoice>("set_decode_kernel", {"auto", "cooperative", "rowsplit"},
                                                  monarch_cuda::decode_choice, monarch_cuda::set_decode_choice),
        "Selects the few-token Monarch forward kernel ('auto', 'cooperative', 'rowsplit'); returns the previous.");
  m.def("set_many_token_kernel",
        choice_setter<monarch_cuda::ManyTokenChoice>("set_many_token_kernel", {"resident", "tiles"},
                                                     monarch_cuda::many_token_choice,
                                                     monarch_cuda::set_many_token_choice),
        "Selects the many-token Monarch forward ('resident' where its plans take the call, or 'tiles'); returns "
        "the previous.");
  m.def(
      "monarch_fwd_keeping",
      [](const at::Tensor& x, const at::Tensor& w1, const at::Tensor& w2, const std::optional<at::Tensor>& bias,
         int64_t n_out, int64_t act) {
        monarch_ops::validate_monarch_fwd(x, w1, w2, bias, n_out, act, "monarch_kernels._C.monarch_fwd_keeping");
        TORCH_CHECK_VALUE(x.is_cuda(), "monarch_kernels._C.monarch_fwd_keeping: x must be a CUDA tensor, got one on ", x.device());
        return monarch_cuda_ops::monarch_fwd_keeping(x, w1, w2, bias, n_out, act);
      },
      "(out, z): the Monarch forward of a training call, keeping the intermediate z (T, k*q) in stage 2's column "
      "order where a resident kernel runs it (else z is None).");
#else
  m.attr("with_cuda") = false;
#endif
#ifdef _OPENMP
  m.attr("with_openmp") = true;
#else
  m.attr("with_openmp") = false;
#endif
}
#endif
