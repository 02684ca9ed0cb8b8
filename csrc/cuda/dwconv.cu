// Depthwise 2-D convolution on CUDA (the fused op dwconv2d: FAT/FCViT depthwise convs): forward with a fused epilogue, dgrad, wgrad.
// Direct convolution, kept simple:
//   forward: one block = one (b, c) plane × a 32×8 output tile, one output per thread; the input
//            window the tile needs ((8−1)·s + k rows × (32−1)·s + k columns) and the k×k filter are
//            staged in shared memory (zero padding written there, so the tap loop has no branches).
//            The filter width is a template constant for k = 3, 5, 7, 9, 11 (unrolled taps).
//            GRAD_MODE writes g = dy · act'(pre) (fp32) instead of y, for the backward.
//   dgrad:   one thread per dx element, gathering g over the taps that reach it.
//   wgrad:   one block per (b, c) plane, a block reduction per tap into partials[c, b, tap]; the
//            partials are summed over b afterwards (fixed order: deterministic, no atomics).
// Accumulation in fp32 (fp64 for fp64), on the current stream under a device guard.
#include <ATen/Dispatch.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>
#include <torch/types.h>

namespace fastvit_ops {
namespace {

template <typename T> struct Acc { using type = float; };
template <> struct Acc<double> { using type = double; };

constexpr int kTileW = 32;
constexpr int kTileH = 8;
constexpr int kThreads = kTileW * kTileH;

template <typename A>
__device__ __forceinline__ A act_fwd(A y, int act) {
  if (act == 1) return y / (A(1) + exp(-y));
  if (act == 2) return A(0.5) * y * (A(1) + erf(y * A(0.70710678118654752)));
  return y;
}

template <typename A>
__device__ __forceinline__ A act_grad(A y, int act) {
  if (act == 1) {
    // 1 − σ from e = exp(−y) for y ≥ 0, where 1 − σ rounded cancels (cross_modulation.cu sigm_c).
    const A e = exp(-y), s = A(1) / (A(1) + e);
    return s * (A(1) + y * (y >= A(0) ? e * s : A(1) - s));
  }
  if (act == 2) {
    return A(0.5) * (A(1) + erf(y * A(0.70710678118654752))) + y * exp(A(-0.5) * y * y) * A(0.39894228040143268);
  }
  return A(1);
}

struct Dims {
  int C, H, W, Ho, Wo, k, s, p;
};

// KF > 0: the filter width is fixed at compile time; KF == 0: runtime d.k.
template <typename T, int KF>
__global__ void forward_kernel(const T* __restrict__ x, const T* __restrict__ w, const T* __restrict__ bias,
                               const T* __restrict__ dy, T* __restrict__ y, typename Acc<T>::type* __restrict__ g,
                               Dims d, int tiles_w, int act, bool residual, bool grad_mode) {
  using A = typename Acc<T>::type;
  extern __shared__ unsigned char smem_raw[];
  A* tile = reinterpret_cast<A*>(smem_raw);
  const int k = KF > 0 ? KF : d.k;
  const int s = d.s;
  const int th = (kTileH - 1) * s + k;
  const int tw = (kTileW - 1) * s + k;
  A* wsm = tile + th * tw;

  const int64_t plane = blockIdx.x;
  const int c = static_cast<int>(plane % d.C);
  const int oh0 = (blockIdx.y / tiles_w) * kTileH;
  const int ow0 = (blockIdx.y % tiles_w) * kTileW;
  const int ih0 = oh0 * s - d.p;
  const int iw0 = ow0 * s - d.p;
  const T* xp = x + plane * d.H * d.W;
  const int tid = threadIdx.y * kTileW + threadIdx.x;

  for (int idx = tid; idx < th * tw; idx += kThreads) {
    const int ih = ih0 + idx / tw;
    const int iw = iw0 + idx % tw;
    tile[idx] = (ih >= 0 && ih < d.H && iw >= 0 && iw < d.W) ? static_cast<A>(xp[ih * d.W + iw]) : A(0);
  }
  for (int idx = tid; idx < k * k; idx += kThreads) wsm[idx] = static_cast<A>(w[c * k * k + idx]);
  __syncthreads();

  const int oh = oh0 + threadIdx.y;
  const int ow = ow0 + threadIdx.x;
  if (oh >= d.Ho || ow >= d.Wo) return;
  A acc = bias != nullptr ? static_cast<A>(bias[c]) : A(0);
  const A* base = tile + threadIdx.y * s * tw + threadIdx.x * s;
#pragma unroll
  for (int u = 0; u < k; ++u) {
#pragma unroll
    for (int v = 0; v < k; ++v) acc += wsm[u * k + v] * base[u * tw + v];
  }
  const int64_t o = plane * d.Ho * d.Wo + static_cast<int64_t>(oh) * d.Wo + ow;
  if (grad_mode) {
    g[o] = static_cast<A>(dy[o]) * act_grad(acc, act);
  } else {
    A out = act_fwd(acc, act);
    if (residual) out += static_cast<A>(xp[oh * d.W + ow]);  // stride 1, same size
    y[o] = static_cast<T>(out);
  }
}

// dx[ih, iw] = Σ_{u,v} w[u, v] · g[(ih + p − u) / s, (iw + p − v) / s], over the divisible, in-range taps.
template <typename T>
__global__ void dgrad_kernel(const typename Acc<T>::type* __restrict__ g, const T* __restrict__ w,
                             const T* __restrict__ dy, T* __restrict__ dx, Dims d, int64_t n, bool residual) {
  using A = typename Acc<T>::type;
  for (int64_t idx = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; idx < n;
       idx += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int iw = static_cast<int>(idx % d.W);
    const int ih = static_cast<int>((idx / d.W) % d.H);
    const int64_t plane = idx / (static_cast<int64_t>(d.H) * d.W);
    const int c = static_cast<int>(plane % d.C);
    const A* gp = g + plane * d.Ho * d.Wo;
    const T* wp = w + c * d.k * d.k;
    A acc = 0;
    for (int u = 0; u < d.k; ++u) {
      const int th = ih + d.p - u;
      if (th < 0 || th % d.s != 0 || th / d.s >= d.Ho) continue;
      const int oh = th / d.s;
      for (int v = 0; v < d.k; ++v) {
        const int tw = iw + d.p - v;
        if (tw < 0 || tw % d.s != 0 || tw / d.s >= d.Wo) continue;
        acc += static_cast<A>(wp[u * d.k + v]) * gp[oh * d.Wo + tw / d.s];
      }
    }
    if (residual) acc += static_cast<A>(dy[idx]);
    dx[idx] = static_cast<T>(acc);
  }
}

template <typename A>
__device__ A block_sum(A v, A* red) {
  for (int off = 16; off > 0; off >>= 1) v += __shfl_down_sync(0xffffffffu, v, off);
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  if (lane == 0) red[warp] = v;
  __syncthreads();
  A total = 0;
  if (threadIdx.x == 0) {
    for (int i = 0; i < kThreads / 32; ++i) total += red[i];  // fixed order
  }
  __syncthreads();
  return total;
}

// partial[(c·B + b), tap] for tap < k·k: Σ_{i,j} g[i, j] · x[s·i + u − p, s·j + v − p]; tap k·k: Σ g.
// One block per (b, c) plane on grid axis x (up to 2^31 − 1 blocks; axis y would cap B·C's
// factor at 65,535).
template <typename T>
__global__ void wgrad_kernel(const typename Acc<T>::type* __restrict__ g, const T* __restrict__ x,
                             typename Acc<T>::type* __restrict__ partial, Dims d, int B) {
  using A = typename Acc<T>::type;
  __shared__ A red[kThreads / 32];
  const int64_t plane = blockIdx.x;
  const int c = static_cast<int>(plane % d.C), b = static_cast<int>(plane / d.C);
  const A* gp = g + plane * d.Ho * d.Wo;
  const T* xp = x + plane * d.H * d.W;
  A* out = partial + (static_cast<int64_t>(c) * B + b) * (d.k * d.k + 1);
  const int n = d.Ho * d.Wo;
  for (int t = 0; t <= d.k * d.k; ++t) {
    const int u = t / d.k, v = t % d.k;
    A acc = 0;
    for (int idx = threadIdx.x; idx < n; idx += kThreads) {
      const int oh = idx / d.Wo, ow = idx % d.Wo;
      if (t == d.k * d.k) {
        acc += gp[idx];
      } else {
        const int ih = oh * d.s + u - d.p, iw = ow * d.s + v - d.p;
        if (ih >= 0 && ih < d.H && iw >= 0 && iw < d.W) acc += gp[idx] * static_cast<A>(xp[ih * d.W + iw]);
      }
    }
    const A total = block_sum(acc, red);
    if (threadIdx.x == 0) out[t] = total;
  }
}

Dims make_dims(const at::Tensor& x, const at::Tensor& w, int64_t stride, int64_t padding) {
  Dims d;
  d.C = static_cast<int>(x.size(1));
  d.H = static_cast<int>(x.size(2));
  d.W = static_cast<int>(x.size(3));
  d.k = static_cast<int>(w.size(2));
  d.s = static_cast<int>(stride);
  d.p = static_cast<int>(padding);
  d.Ho = (d.H + 2 * d.p - d.k) / d.s + 1;
  d.Wo = (d.W + 2 * d.p - d.k) / d.s + 1;
  return d;
}

void check_args(const char* op, const at::Tensor& x, const at::Tensor& w, const c10::optional<at::Tensor>& bias,
                int64_t stride, int64_t padding, int64_t act, bool residual) {
  TORCH_CHECK(x.is_cuda() && w.device() == x.device(), op, ": expected CUDA tensors on one device");
  TORCH_CHECK(x.dim() == 4, op, ": x must be 4-D (B, C, H, W)");
  TORCH_CHECK(w.dim() == 4 && w.size(0) == x.size(1) && w.size(1) == 1 && w.size(2) == w.size(3), op,
              ": weight must be (C, 1, k, k)");
  TORCH_CHECK(w.scalar_type() == x.scalar_type(), op, ": weight dtype differs from x");
  if (bias.has_value()) {
    TORCH_CHECK(bias->device() == x.device() && bias->scalar_type() == x.scalar_type() && bias->numel() == x.size(1),
                op, ": bias must be (C,) with x's dtype and device");
  }
  const int64_t k = w.size(2);
  TORCH_CHECK(k >= 1 && k <= 31 && k % 2 == 1, op, ": kernel size must be odd, 1..31");
  TORCH_CHECK(stride == 1 || stride == 2, op, ": stride must be 1 or 2");
  TORCH_CHECK(padding >= 0 && padding < k, op, ": padding must be in [0, k)");
  TORCH_CHECK(act >= 0 && act <= 2, op, ": activation must be 0, 1 or 2");
  TORCH_CHECK(x.size(2) + 2 * padding >= k && x.size(3) + 2 * padding >= k, op, ": input smaller than the kernel");
  TORCH_CHECK(!residual || (stride == 1 && 2 * padding == k - 1), op, ": residual needs stride 1 and same padding");
}

// Every grid of a call is checked here, before the first launch: a too-large input is an error
// before any work starts. Forward: planes on x (≤ 2^31 − 1), output tiles on y (≤ 65,535);
// dgrad: a grid-stride loop (any size); wgrad: planes on x.
void check_grids(const char* op, const Dims& d, int64_t planes) {
  const int64_t tiles = ((d.Ho + kTileH - 1) / kTileH) * static_cast<int64_t>((d.Wo + kTileW - 1) / kTileW);
  TORCH_CHECK(tiles <= 65535, op, " (cuda): an output plane of ", d.Ho, "x", d.Wo, " needs ", tiles,
              " tiles, over CUDA's grid limit of 65535");
  TORCH_CHECK(planes <= 2147483647LL, op, " (cuda): ", planes, " planes (B·C) exceed CUDA's grid limit of 2^31 − 1");
}

template <typename T>
void launch_forward(const at::Tensor& x, const at::Tensor& w, const T* bias, const T* dy, T* y,
                    typename Acc<T>::type* g, const Dims& d, int64_t planes, int act, bool residual, bool grad_mode) {
  using A = typename Acc<T>::type;
  const int tiles_h = (d.Ho + kTileH - 1) / kTileH, tiles_w = (d.Wo + kTileW - 1) / kTileW;
  const int th = (kTileH - 1) * d.s + d.k, tw = (kTileW - 1) * d.s + d.k;
  const size_t smem = sizeof(A) * (static_cast<size_t>(th) * tw + d.k * d.k);
  const dim3 grid(static_cast<unsigned>(planes), static_cast<unsigned>(tiles_h * tiles_w));
  const dim3 block(kTileW, kTileH);
  auto stream = at::cuda::getCurrentCUDAStream();
  const T* xp = x.const_data_ptr<T>();
  const T* wp = w.const_data_ptr<T>();
#define DW_LAUNCH(KF) \
  forward_kernel<T, KF><<<grid, block, smem, stream>>>(xp, wp, bias, dy, y, g, d, tiles_w, act, residual, grad_mode)
  switch (d.k) {
    case 3: DW_LAUNCH(3); break;
    case 5: DW_LAUNCH(5); break;
    case 7: DW_LAUNCH(7); break;
    case 9: DW_LAUNCH(9); break;
    case 11: DW_LAUNCH(11); break;
    default: DW_LAUNCH(0); break;
  }
#undef DW_LAUNCH
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

at::Tensor forward(const at::Tensor& x_in, const at::Tensor& w_in, const c10::optional<at::Tensor>& bias,
                   int64_t stride, int64_t padding, int64_t activation, bool residual) {
  check_args("_dwconv2d_forward", x_in, w_in, bias, stride, padding, activation, residual);
  const c10::cuda::CUDAGuard guard(x_in.device());
  const at::Tensor x = x_in.contiguous(), w = w_in.contiguous();
  const Dims d = make_dims(x, w, stride, padding);
  at::Tensor y = at::empty({x.size(0), d.C, d.Ho, d.Wo}, x.options());
  if (y.numel() == 0) return y;
  check_grids("_dwconv2d_forward", d, x.size(0) * d.C);
  at::Tensor b;
  if (bias.has_value()) b = bias->contiguous();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "dwconv2d_fwd_cuda", [&] {
    launch_forward<scalar_t>(x, w, bias.has_value() ? b.const_data_ptr<scalar_t>() : nullptr, nullptr,
                             y.mutable_data_ptr<scalar_t>(), nullptr, d, x.size(0) * d.C,
                             static_cast<int>(activation), residual, false);
  });
  return y;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> backward(const at::Tensor& grad_in, const at::Tensor& x_in,
                                                        const at::Tensor& w_in, const c10::optional<at::Tensor>& bias,
                                                        int64_t stride, int64_t padding, int64_t activation,
                                                        bool residual, bool need_dx, bool need_dw) {
  check_args("_dwconv2d_backward", x_in, w_in, bias, stride, padding, activation, residual);
  TORCH_CHECK(grad_in.device() == x_in.device() && grad_in.scalar_type() == x_in.scalar_type(),
              "_dwconv2d_backward: grad must match x's dtype and device");
  const c10::cuda::CUDAGuard guard(x_in.device());
  const at::Tensor x = x_in.contiguous(), w = w_in.contiguous(), grad = grad_in.contiguous();
  const Dims d = make_dims(x, w, stride, padding);
  const int64_t B = x.size(0);
  TORCH_CHECK(grad.dim() == 4 && grad.size(0) == B && grad.size(1) == d.C && grad.size(2) == d.Ho &&
                  grad.size(3) == d.Wo,
              "_dwconv2d_backward: grad must have the output's shape");
  const auto acc_type = x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  at::Tensor dx = need_dx ? at::empty_like(x) : at::zeros_like(x);
  const int kk = d.k * d.k;
  if (B * d.C == 0) {
    return {dx, at::zeros_like(w), at::zeros({d.C}, x.options())};
  }
  check_grids("_dwconv2d_backward", d, B * d.C);
  at::Tensor b;
  if (bias.has_value()) b = bias->contiguous();
  at::Tensor partial = at::empty({d.C, B, kk + 1}, x.options().dtype(acc_type));
  at::Tensor g;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "dwconv2d_bwd_cuda", [&] {
    using A = typename Acc<scalar_t>::type;
    auto stream = at::cuda::getCurrentCUDAStream();
    if (activation != 0) {  // g = dy · act'(pre), pre recomputed
      g = at::empty(grad.sizes(), grad.options().dtype(acc_type));
      launch_forward<scalar_t>(x, w, bias.has_value() ? b.const_data_ptr<scalar_t>() : nullptr,
                               grad.const_data_ptr<scalar_t>(), nullptr, g.mutable_data_ptr<A>(), d, B * d.C,
                               static_cast<int>(activation), false, true);
    } else {
      g = grad.to(acc_type);
    }
    const int64_t n = need_dx ? dx.numel() : 0;
    const int blocks = static_cast<int>(std::min<int64_t>((n + 255) / 256, 65535LL * 8));
    if (n > 0) dgrad_kernel<scalar_t><<<blocks, 256, 0, stream>>>(g.const_data_ptr<A>(), w.const_data_ptr<scalar_t>(),
                                                      grad.const_data_ptr<scalar_t>(),
                                                      dx.mutable_data_ptr<scalar_t>(), d, n, residual);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    // (dbias comes from the same partials, so the wgrad pass also runs when only dbias is needed.)
    wgrad_kernel<scalar_t><<<static_cast<unsigned>(B * d.C), kThreads, 0, stream>>>(
        g.const_data_ptr<A>(), x.const_data_ptr<scalar_t>(), partial.mutable_data_ptr<A>(), d, static_cast<int>(B));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  const at::Tensor total = partial.sum(1);  // second pass, fixed order
  // Copies: views of `total` would alias each other (an op's outputs must not).
  at::Tensor dw = total.narrow(1, 0, kk).reshape({d.C, 1, d.k, d.k}).to(w.scalar_type(), false, true);
  at::Tensor db = total.select(1, kk).to(x.scalar_type(), false, true);
  return {dx, dw.contiguous(), db.contiguous()};
}

}  // namespace

TORCH_LIBRARY_IMPL(fastvit_ops, CUDA, m) {
  m.impl("_dwconv2d_forward", &forward);
  m.impl("_dwconv2d_backward", &backward);
}

}  // namespace fastvit_ops
