// Operator schemas of the compiled extension (namespace monarch_kernels_ext) and the Python module
// monarch_kernels._C. The CPU kernels register in monarch_cpu.cpp, the CUDA kernels (when built) in
// cuda/cuda_ops.cpp; monarch_kernels/ext.py wraps them as the `cpu` and `cuda` backends.
#include <torch/extension.h>

TORCH_LIBRARY(monarch_kernels_ext, m) {
  m.def("blockdiag_fwd(Tensor x, Tensor w, Tensor? bias, int n_out, int act) -> Tensor");
  m.def("blockdiag_wgrad(Tensor x, Tensor g, int k, int q, int p) -> Tensor");
  m.def("monarch_fwd(Tensor x, Tensor w1, Tensor w2, Tensor? bias, int n_out, int act) -> Tensor");
  m.def("monarch_bwd_input(Tensor g, Tensor w1, Tensor w2, int n_in) -> Tensor");
  m.def("monarch_bwd_weight(Tensor x, Tensor g, Tensor w1, Tensor w2) -> (Tensor, Tensor)");
  // (dx, dw1, dw2) in one pass; CPU kernel only (other devices compose monarch_bwd_input + monarch_bwd_weight)
  m.def("monarch_bwd(Tensor x, Tensor g, Tensor w1, Tensor w2, int n_in) -> (Tensor, Tensor, Tensor)");
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "monarch-kernels compiled kernels (ops registered under torch.ops.monarch_kernels_ext)";
#ifdef MONARCH_WITH_CUDA
  m.attr("with_cuda") = true;
#else
  m.attr("with_cuda") = false;
#endif
#ifdef _OPENMP
  m.attr("with_openmp") = true;
#else
  m.attr("with_openmp") = false;
#endif
}
