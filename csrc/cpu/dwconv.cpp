// Depthwise 2-D convolution on CPU: the op entry points (argument checks, outputs in x's layout,
// which of the three kernels of cpu/dwconv.h runs, the fixed-order reduction of the weight and
// bias gradients over the batch). The kernels themselves are in isa/dwconv_*.cpp, one build per
// CPU capability.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>
#include <torch/types.h>

#include <algorithm>
#include <cctype>
#include <cstdlib>
#include <string>

#include "cpu/dwconv.h"

namespace fastvit_ops {
namespace cpu {

PerDtype<DwForwardFn> dwconv_rows_forward;
PerDtype<DwBackwardFn> dwconv_rows_backward;
PerDtype<DwForwardFn> dwconv_flat_forward;
PerDtype<DwBackwardFn> dwconv_flat_backward;
PerDtype<DwForwardFn> dwconv_cblock_forward;
PerDtype<DwBackwardFn> dwconv_cblock_backward;
CpuKernel<int (*)()> dwconv_cblock_lanes;

namespace {

enum class Path { kAuto, kRows, kFlat, kCBlock };

// FASTVIT_OPS_DWCONV_PATH=rows|flat|cblock runs that kernel wherever it applies (tests and
// benchmarks of each kernel); unset or auto, the measured rule below. Read once, at first use.
Path forced_path() {
  static const Path forced = [] {
    const char* env = std::getenv("FASTVIT_OPS_DWCONV_PATH");
    std::string v = env ? env : "";
    std::transform(v.begin(), v.end(), v.begin(), [](unsigned char c) { return std::tolower(c); });
    if (v == "rows") return Path::kRows;
    if (v == "flat") return Path::kFlat;
    if (v == "cblock") return Path::kCBlock;
    TORCH_CHECK(v.empty() || v == "auto", "FASTVIT_OPS_DWCONV_PATH must be auto, rows, flat or cblock, got '", v, "'");
    return Path::kAuto;
  }();
  return forced;
}

DwShape make_shape(const at::Tensor& x, const at::Tensor& weight, int64_t stride, int64_t padding) {
  DwShape sh;
  sh.B = x.size(0);
  sh.C = x.size(1);
  sh.H = x.size(2);
  sh.W = x.size(3);
  sh.k = static_cast<int>(weight.size(2));
  sh.s = static_cast<int>(stride);
  sh.p = static_cast<int>(padding);
  sh.Ho = (sh.H + 2 * sh.p - sh.k) / sh.s + 1;
  sh.Wo = (sh.W + 2 * sh.p - sh.k) / sh.s + 1;
  return sh;
}

bool cblock_applies(const DwShape& sh, at::ScalarType dtype) {
  return dtype == at::kFloat && sh.k <= 13 && sh.C % dwconv_cblock_lanes.get()() == 0;
}

// Whether the backward takes the cblock kernel (stride 1, fp32), measured against the per-plane
// kernels at the FAT-B0 / FCViT-tiny shapes (batch 8, 2 threads, forward+backward vs eager): with
// 16 lanes (AVX-512) it won on planes up to 14×14 at every k (7×7, k = 3: 0.65x → 0.88x eager;
// k = 9: 4.5x → 6.6x) and lost 5-10% at 28×28 except at k = 3; with 8 lanes (AVX2, 16 registers)
// it won at 7×7 (k = 3: 0.83x → 1.03x; k = 9, 11: +10-20%), broke even at k = 3 on 14×14-28×28 and
// lost 10-25% at k ≥ 5 on 14×14 and up.
bool cblock_backward_wins(const DwShape& sh) {
  const int64_t plane = sh.H * sh.W;
  if (sh.k == 3 && plane <= 28 * 28) return true;
  return plane <= (dwconv_cblock_lanes.get()() >= 16 ? 14 * 14 : 7 * 7);
}

bool flat_applies(at::ScalarType dtype) { return dtype == at::kFloat || dtype == at::kDouble; }

// With 8 lanes (AVX2) and an NCHW input, the cblock forward's transposes in and out (a quarter of
// its time) cost more than its faster convolution saves on planes of 28×28 and up at stride 1,
// where the rows kernel uses all its lanes (Wo a multiple of 16) or the filter is small (k ≤ 5;
// not with GELU, whose erf the rows kernel also runs on its spare lanes); at stride 2 on 56×56
// planes the flat kernel wins. Measured forced per path (batch 8, 2 threads, AVX2 forced on the
// Zen 4 CI machine): (8,384,32,32) k = 3/7/11 rows 0.73–0.85/1.70–1.86/3.58–3.68 ms vs cblock
// 1.08/2.22–2.56/4.39–4.82; FAT-B0 s1 CPE k3 0.20 vs 0.27–0.28, s1 ConvFFN k5 1.59–1.63 vs
// 1.78–1.84, s2 ConvFFN k5 0.86–0.89 vs 1.07–1.17; s1 ConvFFN-down k5/s2 flat 0.57 vs cblock 0.72;
// still cblock: FCViT-tiny's k = 11 on 56×56 (0.95–0.99 vs rows 1.07–1.15) and k = 3 + GELU on
// 56×56 (4.0 vs 4.7–4.9), and every plane below 28×28 (rows 10–80% slower).
Path avx2_nchw_forward(const DwShape& sh, at::ScalarType dtype, int act) {
  if (dwconv_cblock_lanes.get()() != 8 || sh.H * sh.W < 28 * 28) return Path::kCBlock;
  if (sh.s == 1 && (sh.Wo % 16 == 0 || (sh.k <= 5 && act != kActGelu))) return Path::kRows;
  if (sh.s == 2 && sh.H * sh.W >= 56 * 56 && sh.k <= 7 && flat_applies(dtype) &&
      sh.Ho * (sh.Wo + (sh.k - 1) / 2) <= 1024)
    return Path::kFlat;
  return Path::kCBlock;
}

// Which kernel runs a call (without the global-context prologue, which only the rows kernel has).
// Measured on the 2-core Zen 4 CI machine, batch 8, fp32, each kernel against the others:
// * cblock, forward: planes up to 56×56 with k ≤ 13 (AVX-512: 1.1–2.5× the per-plane kernels from
//   7×7 to 56×56 at k = 3–11, both strides, 1.3–1.9× oneDNN); backward: cblock_backward_wins;
// * flat: stride 2 with k ≤ 7 (no de-interleaved row blocks, one register block per plane) and
//   k = 3, and in the backward also k = 5 on planes ≤ 8 wide, on planes of at most 1024 padded
//   outputs; at stride 1 with k ≥ 5 its garbage columns (k − 1 per row) cost more than the rows
//   kernel's spare lanes.
// A forward passes x's layout (x_cl: channels_last, which the cblock kernel reads without a
// transpose) and activation.
Path choose(const DwShape& sh, at::ScalarType dtype, bool forward, bool x_cl = false, int act = kActNone) {
  const Path forced = forced_path();
  const bool cblock = cblock_applies(sh, dtype) && (forward || sh.s == 1);
  if (forced == Path::kRows) return Path::kRows;
  if (forced == Path::kCBlock && cblock) return Path::kCBlock;
  if (forced == Path::kFlat && flat_applies(dtype)) return Path::kFlat;
  if (forward && cblock && sh.H * sh.W <= 56 * 56) return x_cl ? Path::kCBlock : avx2_nchw_forward(sh, dtype, act);
  if (!forward && cblock && cblock_backward_wins(sh)) return Path::kCBlock;
  if (flat_applies(dtype)) {
    const int kmax = sh.s == 2 ? 7 : (!forward && sh.Wo <= 8) ? 5 : 3;
    if (sh.k <= kmax && sh.Ho * (sh.Wo + (sh.k - 1) / sh.s) <= 1024) return Path::kFlat;
  }
  return Path::kRows;
}

template <typename A>
at::Tensor to_acc(const at::Tensor& t) {
  return t.to(std::is_same_v<A, double> ? at::kDouble : at::kFloat).contiguous();
}

Strides4 strides_of(const at::Tensor& t) { return {t.stride(0), t.stride(1), t.stride(2), t.stride(3)}; }

// y must be NCHW unless y_cl (then only the cblock kernel may run).
template <typename T>
void run_forward(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias, T* y,
                 const DwShape& sh, int act, bool residual, bool y_cl, const at::Tensor* sp = nullptr,
                 const at::Tensor* c = nullptr) {
  using A = DwAcc<T>;
  const at::Tensor wa = to_acc<A>(weight);
  at::Tensor ba, spa, ca;
  if (bias.has_value()) ba = to_acc<A>(*bias);
  DwForwardArgs<T> args{sh, x.const_data_ptr<T>(), strides_of(x), wa.const_data_ptr<A>(),
                        bias.has_value() ? ba.const_data_ptr<A>() : nullptr, y, y_cl, act, residual,
                        nullptr, nullptr, 0};
  if (sp != nullptr) {
    spa = to_acc<A>(*sp);
    ca = to_acc<A>(*c);
    args.sp = spa.const_data_ptr<A>();
    args.c = ca.const_data_ptr<A>();
    args.G = sp->size(1);
    return dwconv_rows_forward.of<T>().get()(args);
  }
  switch (choose(sh, x.scalar_type(), true, is_channels_last(x), act)) {
    case Path::kCBlock:
      return dwconv_cblock_forward.of<T>().get()(args);
    case Path::kFlat:
      TORCH_CHECK(!y_cl, "dwconv2d: internal error: channels_last output outside the cblock kernel");
      return dwconv_flat_forward.of<T>().get()(args);
    default:
      TORCH_CHECK(!y_cl, "dwconv2d: internal error: channels_last output outside the cblock kernel");
      return dwconv_rows_forward.of<T>().get()(args);
  }
}

}  // namespace

// Python's validate.is_channels_last: stored channels_last and not also NCHW-contiguous (NCHW wins
// where both hold, as at C == 1 or H == W == 1).
bool is_channels_last(const at::Tensor& t) {
  return !t.is_contiguous() && t.is_contiguous(at::MemoryFormat::ChannelsLast);
}

void dwconv_check_args(const char* op, const at::Tensor& x, const at::Tensor& weight,
                       const std::optional<at::Tensor>& bias, int64_t stride, int64_t padding, int64_t activation,
                       bool residual) {
  TORCH_CHECK(x.dim() == 4, op, ": x must be 4-D (B, C, H, W)");
  TORCH_CHECK(weight.dim() == 4 && weight.size(0) == x.size(1) && weight.size(1) == 1 &&
                  weight.size(2) == weight.size(3),
              op, ": weight must be (C, 1, k, k)");
  TORCH_CHECK(weight.scalar_type() == x.scalar_type(), op, ": weight dtype differs from x");
  if (bias.has_value()) {
    TORCH_CHECK(bias->dim() == 1 && bias->size(0) == x.size(1), op, ": bias must be (C,)");
    TORCH_CHECK(bias->scalar_type() == x.scalar_type(), op, ": bias dtype differs from x");
  }
  TORCH_CHECK(stride == 1 || stride == 2, op, ": stride must be 1 or 2");
  const int64_t k = weight.size(2);
  TORCH_CHECK(k >= 1 && k <= 31 && k % 2 == 1, op, ": kernel size must be odd, 1..31");
  TORCH_CHECK(padding >= 0 && padding < k, op, ": padding must be in [0, k)");
  TORCH_CHECK(activation >= 0 && activation <= 2, op, ": activation must be 0, 1 or 2");
  TORCH_CHECK(x.size(2) + 2 * padding >= k && x.size(3) + 2 * padding >= k, op, ": input smaller than the kernel");
  TORCH_CHECK(!residual || (stride == 1 && 2 * padding == k - 1), op, ": residual needs stride 1 and 'same' padding");
  TORCH_CHECK(x.device().is_cpu(), op, ": expected CPU tensors");
}

at::Tensor dwconv_forward(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                          int64_t stride, int64_t padding, int64_t activation, bool residual) {
  dwconv_check_args("_dwconv2d_forward", x, weight, bias, stride, padding, activation, residual);
  const DwShape sh = make_shape(x, weight, stride, padding);
  // The output takes x's layout (channels_last in, channels_last out), as PyTorch's conv does; the
  // cblock kernel writes channels_last itself, the others write NCHW planes and one copy follows.
  const bool cl = is_channels_last(x);
  const bool direct_cl = cl && choose(sh, x.scalar_type(), true, cl, static_cast<int>(activation)) == Path::kCBlock;
  at::Tensor y = at::empty({sh.B, sh.C, sh.Ho, sh.Wo}, x.options(),
                           direct_cl ? at::MemoryFormat::ChannelsLast : at::MemoryFormat::Contiguous);
  if (y.numel() == 0) return cl ? y.contiguous(at::MemoryFormat::ChannelsLast) : y;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "dwconv2d_fwd", [&] {
    run_forward<scalar_t>(x, weight, bias, y.mutable_data_ptr<scalar_t>(), sh, static_cast<int>(activation), residual,
                          direct_cl);
  });
  return cl && !direct_cl ? y.contiguous(at::MemoryFormat::ChannelsLast) : y;
}

namespace {

// In place, for inference: x ← act(conv(x) + bias) [+ x] at stride 1 and "same" padding, where the
// cblock kernel applies (fp32, C a multiple of its channel block, k ≤ 13; NCHW or channels_last).
// Each task copies its whole channel block of a sample into its tile before writing those same
// channels back, and no other task reads them, so overwriting the input is safe; FAT's ConvFFN
// ``U + DW(U)`` then needs no second hidden-size buffer. Returns false (x untouched) elsewhere.
bool forward_inplace(at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                     int64_t activation, bool residual) {
  TORCH_CHECK(weight.dim() == 4, "_dwconv2d_same_: weight must be (C, 1, k, k)");
  const int64_t padding = weight.size(-1) / 2;
  dwconv_check_args("_dwconv2d_same_", x, weight, bias, 1, padding, activation, residual);
  const DwShape sh = make_shape(x, weight, 1, padding);
  const bool cl = is_channels_last(x);
  if (forced_path() == Path::kRows || forced_path() == Path::kFlat || !cblock_applies(sh, x.scalar_type()) ||
      !(x.is_contiguous() || cl) || x.numel() == 0 ||
      choose(sh, x.scalar_type(), true, cl, static_cast<int>(activation)) != Path::kCBlock)
    return false;
  const at::Tensor wa = to_acc<float>(weight);
  at::Tensor ba;
  if (bias.has_value()) ba = to_acc<float>(*bias);
  const DwForwardArgs<float> args{sh, x.const_data_ptr<float>(), strides_of(x), wa.const_data_ptr<float>(),
                                  bias.has_value() ? ba.const_data_ptr<float>() : nullptr,
                                  x.mutable_data_ptr<float>(), cl, static_cast<int>(activation), residual,
                                  nullptr, nullptr, 0};
  dwconv_cblock_forward.of<float>().get()(args);
  return true;
}

// FCViT's global-context apply fused into the conv's input load: the conv reads z = x + S'[γ]·c
// (sp (B, G, H, W), c (B, C), G dividing C, γ = channel / (C / G)); z is never written.
at::Tensor gc_forward(const at::Tensor& x, const at::Tensor& sp, const at::Tensor& c, const at::Tensor& weight,
                      const std::optional<at::Tensor>& bias, int64_t stride, int64_t padding, int64_t activation) {
  const char* op = "_dwconv2d_gc_forward";
  dwconv_check_args(op, x, weight, bias, stride, padding, activation, false);
  const DwShape sh = make_shape(x, weight, stride, padding);
  TORCH_CHECK(sp.dim() == 4 && sp.size(0) == sh.B && sp.size(2) == sh.H && sp.size(3) == sh.W && sp.size(1) >= 1 &&
                  sh.C % sp.size(1) == 0,
              op, ": sp must be (B, G, H, W) with G dividing C");
  TORCH_CHECK(c.dim() == 2 && c.size(0) == sh.B && c.size(1) == sh.C, op, ": c must be (B, C)");
  at::Tensor y = at::empty({sh.B, sh.C, sh.Ho, sh.Wo}, x.options());
  if (y.numel() == 0) return y;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "dwconv2d_gc_fwd", [&] {
    run_forward<scalar_t>(x, weight, bias, y.mutable_data_ptr<scalar_t>(), sh, static_cast<int>(activation), false,
                          false, &sp, &c);
  });
  return y;
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor> dwconv_backward(const at::Tensor& grad, const at::Tensor& x,
                                                               const at::Tensor& weight,
                                                               const std::optional<at::Tensor>& bias,
                                                               int64_t stride, int64_t padding, int64_t activation,
                                                               bool residual, bool need_dx, bool need_dw) {
  dwconv_check_args("_dwconv2d_backward", x, weight, bias, stride, padding, activation, residual);
  TORCH_CHECK(grad.device().is_cpu(), "_dwconv2d_backward: expected CPU tensors");
  TORCH_CHECK(grad.scalar_type() == x.scalar_type(), "_dwconv2d_backward: grad dtype differs from x");
  const DwShape sh = make_shape(x, weight, stride, padding);
  TORCH_CHECK(grad.dim() == 4 && grad.size(0) == sh.B && grad.size(1) == sh.C && grad.size(2) == sh.Ho &&
                  grad.size(3) == sh.Wo,
              "_dwconv2d_backward: grad must have the output's shape");
  at::Tensor dx = need_dx ? at::empty({sh.B, sh.C, sh.H, sh.W}, x.options())
                          : at::zeros({sh.B, sh.C, sh.H, sh.W}, x.options());
  const int64_t kk = static_cast<int64_t>(sh.k) * sh.k;
  at::Tensor dw, db;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "dwconv2d_bwd", [&] {
    using A = DwAcc<scalar_t>;
    const auto acc_type = std::is_same_v<A, double> ? at::kDouble : at::kFloat;
    const at::Tensor wa = to_acc<A>(weight);
    const at::Tensor wf = wa.flip({2, 3}).contiguous();
    at::Tensor ba;
    if (bias.has_value()) ba = to_acc<A>(*bias);
    at::Tensor dw_part = at::empty({need_dw ? sh.B : 0, sh.C, kk}, x.options().dtype(acc_type));
    at::Tensor db_part = at::empty({sh.B, sh.C}, x.options().dtype(acc_type));
    at::Tensor dw_acc = at::zeros({sh.C, kk}, x.options().dtype(acc_type));
    at::Tensor db_acc = at::zeros({sh.C}, x.options().dtype(acc_type));
    if (sh.B * sh.C > 0 && sh.Ho * sh.Wo > 0) {
      const DwBackwardArgs<scalar_t> args{sh, x.const_data_ptr<scalar_t>(), strides_of(x),
                                          grad.const_data_ptr<scalar_t>(), strides_of(grad), wa.const_data_ptr<A>(),
                                          wf.const_data_ptr<A>(), bias.has_value() ? ba.const_data_ptr<A>() : nullptr,
                                          need_dx ? dx.mutable_data_ptr<scalar_t>() : nullptr,
                                          need_dw ? dw_part.mutable_data_ptr<A>() : nullptr,
                                          db_part.mutable_data_ptr<A>(), static_cast<int>(activation), residual};
      const Path path = choose(sh, x.scalar_type(), false);
      if (path == Path::kCBlock) {
        dwconv_cblock_backward.of<scalar_t>().get()(args);
      } else if (path == Path::kFlat) {
        dwconv_flat_backward.of<scalar_t>().get()(args);
      } else {
        dwconv_rows_backward.of<scalar_t>().get()(args);
      }
      // Second pass: sum the per-plane partials over the batch in a fixed order (deterministic).
      const A* dwp = dw_part.const_data_ptr<A>();
      const A* dbp = db_part.const_data_ptr<A>();
      A* dwa = dw_acc.mutable_data_ptr<A>();
      A* dba = db_acc.mutable_data_ptr<A>();
      at::parallel_for(0, sh.C, 16, [&](int64_t begin, int64_t end) {
        for (int64_t c = begin; c < end; ++c) {
          for (int64_t b = 0; b < sh.B; ++b) {
            if (need_dw) {
              const A* src = dwp + (b * sh.C + c) * kk;
              for (int64_t t = 0; t < kk; ++t) dwa[c * kk + t] += src[t];
            }
            dba[c] += dbp[b * sh.C + c];
          }
        }
      });
    } else if (need_dx && dx.numel() > 0) {
      dx.zero_();
    }
    dw = dw_acc.view({sh.C, 1, sh.k, sh.k}).to(weight.scalar_type());
    db = db_acc.to(x.scalar_type());
  });
  return {dx, dw, db};
}

TORCH_LIBRARY_IMPL(fastvit_ops, CPU, m) {
  m.impl("_dwconv2d_forward", &dwconv_forward);
  m.impl("_dwconv2d_same_", &forward_inplace);
  m.impl("_dwconv2d_gc_forward", &gc_forward);
  m.impl("_dwconv2d_backward", &dwconv_backward);
}

}  // namespace cpu
}  // namespace fastvit_ops
