// Schemas of the compiled kernels (internal ops behind the Python custom ops in fastvit_ops/ops)
// and the Python module that loads them. Kernels register per dispatch key in cpu/ and cuda/.
#include <torch/extension.h>
#include <torch/library.h>

TORCH_LIBRARY_FRAGMENT(fastvit_ops, m) {
  // mode: 0 = "silu" (SiLU(l)·SiLU(g)), 1 = "full" (SiLU(SiLU(l))·SiLU(g)). Inputs share one dense layout.
  m.def("_cross_modulation_forward(Tensor local, Tensor global_, int mode) -> Tensor");
  m.def("_cross_modulation_backward(Tensor grad, Tensor local, Tensor global_, int mode) -> (Tensor, Tensor)");
  // -- depthwise conv (dwconv) schemas below --
  // -- global context schemas below --
  // -- downsampled attention schemas below --
}

static bool cuda_compiled() {
#ifdef FASTVIT_OPS_WITH_CUDA
  return true;
#else
  return false;
#endif
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "fastvit_ops compiled kernels (registered under torch.ops.fastvit_ops)";
  m.def("cuda_compiled", &cuda_compiled, "True when the CUDA kernels were compiled in");
}
