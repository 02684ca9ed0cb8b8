// Schemas of the compiled kernels (internal ops behind the Python custom ops in fastvit_ops/ops)
// and the Python module that loads them. Kernels register per dispatch key in cpu/ and cuda/.
#include <torch/extension.h>
#include <torch/library.h>

#include "cpu/capability.h"

TORCH_LIBRARY_FRAGMENT(fastvit_ops, m) {
  // mode: 0 = "silu" (SiLU(l)·SiLU(g)), 1 = "full" (SiLU(SiLU(l))·SiLU(g)). Inputs share one dense layout.
  m.def("_cross_modulation_forward(Tensor local, Tensor global_, int mode) -> Tensor");
  m.def("_cross_modulation_backward(Tensor grad, Tensor local, Tensor global_, int mode) -> (Tensor, Tensor)");
  // Eager CPU fast path: the forward under a C++ autograd node whose backward is
  // _cross_modulation_backward (no Python custom-op overhead per call).
  m.def("_cross_modulation_autograd(Tensor local, Tensor global_, int mode) -> Tensor");
  // -- depthwise conv (dwconv) schemas below --
  // Depthwise conv (y = act(nn.Conv2d(C, C, k, stride, padding, groups=C)(x)) [+ x]): x (B,C,H,W) any strides, weight (C,1,k,k), k odd ≤ 31, stride 1|2,
  // 0 ≤ padding < k; activation 0 none, 1 SiLU, 2 GELU (exact); residual adds x (stride 1, same size).
  // y = act(conv(x) + bias) [+ x]: NCHW, or channels_last for a channels_last x on CPU (CUDA writes
  // NCHW; the Python op restores x's layout). Backward returns (dx, dweight, dbias) with dx
  // contiguous NCHW; dbias is computed even when bias is None; dx (dweight) is zeros when need_dx
  // (need_dw) is false.
  m.def("_dwconv2d_forward(Tensor x, Tensor weight, Tensor? bias, int stride, int padding, int activation, bool residual) -> Tensor");
  // In place on CPU (inference): x ← act(conv(x) + bias) [+ x] at stride 1, padding k/2, where the
  // fp32 channel-blocked kernel applies (C a multiple of its vector width, k ≤ 13); returns false
  // (x untouched) elsewhere.
  m.def("_dwconv2d_same_(Tensor(a!) x, Tensor weight, Tensor? bias, int activation, bool residual) -> bool");
  // The same conv reading z = x + S'[γ]·c (FCViT's global-context apply fused into the input load):
  // sp (B, G, H, W), c (B, C), G dividing C, γ = channel / (C / G); z is never written.
  m.def("_dwconv2d_gc_forward(Tensor x, Tensor sp, Tensor c, Tensor weight, Tensor? bias, int stride, int padding, int activation) -> Tensor");
  m.def("_dwconv2d_backward(Tensor grad, Tensor x, Tensor weight, Tensor? bias, int stride, int padding, int activation, bool residual, bool need_dx, bool need_dw) -> (Tensor, Tensor, Tensor)");
  // Eager CPU fast path: the forward (ours, or oneDNN's conv + epilogue when onednn) under a C++
  // autograd node whose backward is _dwconv2d_backward (no Python custom-op overhead per call).
  m.def("_dwconv2d_autograd(Tensor x, Tensor weight, Tensor? bias, int stride, int padding, int activation, bool residual, bool onednn) -> Tensor");
  // -- global context schemas below --
  // FCViT global context (see fastvit_ops/ops/global_context.py). x (B,C,H,W); alpha, beta (G,);
  // g (B,C) channel means and stats (B,2) = (mean, std) in the accumulation dtype (fp32; fp64 for
  // fp64 x).
  // The whole op in one call (fc* given → global context, else the similarity): forward → (out, g,
  // stats); backward → (dx, dalpha, dbeta, dfc1_w, dfc1_b, dfc2_w, dfc2_b) (fc grads empty without fc*).
  m.def("_gc_forward_full(Tensor x, Tensor? fc1_w, Tensor? fc1_b, Tensor? fc2_w, Tensor? fc2_b, Tensor alpha, Tensor beta, int groups, float eps, bool residual) -> (Tensor, Tensor, Tensor)");
  m.def("_gc_backward_full(Tensor grad, Tensor x, Tensor g, Tensor stats, Tensor? fc1_w, Tensor? fc1_b, Tensor? fc2_w, Tensor? fc2_b, Tensor alpha, Tensor beta, int groups, float eps, bool residual) -> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)");
  // Eager CPU fast path: _gc_forward_full with a C++ autograd node whose backward is
  // _gc_backward_full (no Python custom-op/autograd overhead per call). Returns out only.
  m.def("_gc_autograd(Tensor x, Tensor? fc1_w, Tensor? fc1_b, Tensor? fc2_w, Tensor? fc2_b, Tensor alpha, Tensor beta, int groups, float eps, bool residual) -> Tensor");
  // -- downsampled attention schemas below --
  // q, gate, out (B, h, N, d) and k, v (B, h, M, d), any strides; lse (B, h, N, 2) contiguous fp32
  // (fp64 for fp64): per query the max of q·k (unscaled) and log2 Σ 2^((q·k − max)·scale·log2 e).
  // out = softmax(scale·q kᵀ) v, then SiLU(out)·gate when gate is given.
  m.def("_downsampled_attention_forward(Tensor q, Tensor k, Tensor v, Tensor? gate, Tensor(a!) out, Tensor(b!) lse, float scale) -> ()");
  m.def("_downsampled_attention_backward(Tensor grad, Tensor q, Tensor k, Tensor v, Tensor? gate, Tensor lse, Tensor(a!) dq, Tensor(b!) dk, Tensor(c!) dv, Tensor(d!) dgate, float scale) -> ()");
  // Eager CPU fast path: the forward (output in `layout`: 0 (B, h, N, d), 1 channels-first, 2
  // tokens) under a C++ autograd node whose backward is _downsampled_attention_backward.
  m.def("_downsampled_attention_autograd(Tensor q, Tensor k, Tensor v, Tensor? gate, float scale, int layout) -> Tensor");
  // -- CvT convolutional projection --
  // x (B, cls + h·w, C) tokens (fp32/fp64); w* (C,1,k,k) one odd k, "same" padding k/2; b* (C,).
  // Returns q (B, cls + h_q·w_q, C) at stride_q and k, v at stride_kv, contiguous tokens; the cls
  // row (cls = 1) is copied through unconvolved.
  m.def("_conv_projection_qkv_forward(Tensor x, Tensor wq, Tensor bq, Tensor wk, Tensor bk, Tensor wv, Tensor bv, int h, int w, int cls, int stride_q, int stride_kv) -> (Tensor, Tensor, Tensor)");
}

static bool cuda_compiled() {
#ifdef FASTVIT_OPS_WITH_CUDA
  return true;
#else
  return false;
#endif
}

// Which build of the CPU kernels runs and why (see cpu/capability.h), for `info` and the tests.
static pybind11::dict cpu_capability() {
  namespace c = fastvit_ops::cpu;
  const c::CapabilityChoice& ch = c::capability_choice();
  pybind11::list built;
  for (int i = 0; i < c::kNumCapabilities; ++i)
    if (c::capability_built(static_cast<c::Capability>(i))) built.append(c::capability_name(static_cast<c::Capability>(i)));
  pybind11::dict d;
  d["in_use"] = c::capability_name(ch.in_use);
  d["cpu"] = c::capability_name(ch.cpu);
  d["built"] = built;
  d["reason"] = ch.reason;
  d["warning"] = ch.warning;
  return d;
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "fastvit_ops compiled kernels (registered under torch.ops.fastvit_ops)";
  m.def("cuda_compiled", &cuda_compiled, "True when the CUDA kernels were compiled in");
  m.def("cpu_capability", &cpu_capability,
        "dict: in_use (the CPU kernels' capability: default, avx2 or avx512), cpu (the best this CPU "
        "supports), built (the capabilities compiled in), reason, warning (non-empty when "
        "FASTVIT_OPS_CPU_CAPABILITY could not be honoured)");
  fastvit_ops::cpu::capability_choice();  // decided (and FASTVIT_OPS_CPU_CAPABILITY read) at import
}
