// Schemas of the compiled kernels (internal ops behind the Python custom ops in fastvit_ops/ops)
// and the Python module that loads them. Kernels register per dispatch key in cpu/ and cuda/.
#include <torch/extension.h>
#include <torch/library.h>

TORCH_LIBRARY_FRAGMENT(fastvit_ops, m) {
  // mode: 0 = "silu" (SiLU(l)·SiLU(g)), 1 = "full" (SiLU(SiLU(l))·SiLU(g)). Inputs share one dense layout.
  m.def("_cross_modulation_forward(Tensor local, Tensor global_, int mode) -> Tensor");
  m.def("_cross_modulation_backward(Tensor grad, Tensor local, Tensor global_, int mode) -> (Tensor, Tensor)");
  // -- depthwise conv (dwconv) schemas below --
  // Depthwise conv (SPEC §1.1): x (B,C,H,W) any strides, weight (C,1,k,k), k odd ≤ 31, stride 1|2,
  // 0 ≤ padding < k; activation 0 none, 1 SiLU, 2 GELU (exact); residual adds x (stride 1, same size).
  // y = act(conv(x) + bias) [+ x]: NCHW, or channels_last for a channels_last x on CPU (CUDA writes
  // NCHW; the Python op restores x's layout). Backward returns (dx, dweight, dbias) with dx
  // contiguous NCHW; dbias is computed even when bias is None; dx (dweight) is zeros when need_dx
  // (need_dw) is false.
  m.def("_dwconv2d_forward(Tensor x, Tensor weight, Tensor? bias, int stride, int padding, int activation, bool residual) -> Tensor");
  // In place on CPU (inference): x ← act(conv(x) + bias) [+ x] at stride 1, padding k/2, where the
  // fp32 channel-blocked kernel runs; returns false (x untouched) elsewhere.
  m.def("_dwconv2d_same_(Tensor(a!) x, Tensor weight, Tensor? bias, int activation, bool residual) -> bool");
  // The same conv reading z = x + S'[γ]·c (FCViT's global-context apply fused into the input load):
  // sp (B, G, H, W), c (B, C), G dividing C, γ = channel / (C / G); z is never written.
  m.def("_dwconv2d_gc_forward(Tensor x, Tensor sp, Tensor c, Tensor weight, Tensor? bias, int stride, int padding, int activation) -> Tensor");
  m.def("_dwconv2d_backward(Tensor grad, Tensor x, Tensor weight, Tensor? bias, int stride, int padding, int activation, bool residual, bool need_dx, bool need_dw) -> (Tensor, Tensor, Tensor)");
  // Eager CPU fast path: the forward (ours, or oneDNN's conv + epilogue when onednn) under a C++
  // autograd node whose backward is _dwconv2d_backward (no Python custom-op overhead per call).
  m.def("_dwconv2d_autograd(Tensor x, Tensor weight, Tensor? bias, int stride, int padding, int activation, bool residual, bool onednn) -> Tensor");
  // -- global context schemas below --
  // FCViT global context (SPEC §1.2), see fastvit_ops/ops/global_context.py. x (B,C,H,W); g, c
  // (B,C), alpha, beta (G,), stats (B,2) = (mean, std) in the accumulation dtype (fp32; fp64 for
  // fp64 x). Forward: c given → [x] + S'·c (B,C,H,W), else S' (B,G,H,W); contiguous, x.dtype.
  m.def("_gc_forward(Tensor x, Tensor g, Tensor? c, Tensor alpha, Tensor beta, int groups, float eps, bool residual) -> (Tensor, Tensor)");
  // grad: dL/d out (B,C,H,W) when c is given, else dL/dS' (B,G,H,W). Returns Ŝ, dS' (B,G,N) and the
  // per-sample sums chan (B,3,C) = [Σ dS'(x−g), Σ Ŝ(x−g), dc], grp (B,3,G) = [Σ dS', Σ dS'Ŝ, Σ Ŝ].
  m.def("_gc_backward_reduce(Tensor grad, Tensor x, Tensor g, Tensor? c, Tensor alpha, Tensor beta, Tensor stats, int groups, float eps) -> (Tensor, Tensor, Tensor, Tensor)");
  // dx = [grad] + gs·(a1·dS' + a0 + a2·Ŝ) + bias, coef (B,G,3) = (a1, a0, a2); dx contiguous, x.dtype.
  m.def("_gc_backward_apply(Tensor x, Tensor? grad, Tensor shat, Tensor dsp, Tensor coef, Tensor gs, Tensor bias) -> Tensor");
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

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "fastvit_ops compiled kernels (registered under torch.ops.fastvit_ops)";
  m.def("cuda_compiled", &cuda_compiled, "True when the CUDA kernels were compiled in");
}
