// Sigmoid cross-modulation on CUDA (FASA's bidirectional gate, the fused op sigmoid_cross_modulation): one grid-stride elementwise kernel per direction,
// fp32 math for half types (fp64 for fp64), on the current stream under a device guard.
#include <ATen/Dispatch.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>
#include <torch/types.h>

namespace fastvit_ops {
namespace {

template <typename T> struct Acc { using type = float; };
template <> struct Acc<double> { using type = double; };

template <typename A>
__device__ __forceinline__ A sigm(A x) { return A(1) / (A(1) + exp(-x)); }

// σ(x) and 1 − σ(x): the complement from e = exp(−x) for x ≥ 0 (1 − σ rounded cancels, and
// SiLU' multiplies that error by x); for x < 0, σ < ½ and 1 − σ is exact enough (e·σ = inf·0 there).
template <typename A>
__device__ __forceinline__ void sigm_c(A x, A& s, A& c) {
  const A e = exp(-x);
  s = A(1) / (A(1) + e);
  c = x >= A(0) ? e * s : A(1) - s;
}

template <typename T, bool kFull>
__global__ void forward_kernel(const T* __restrict__ l, const T* __restrict__ g, T* __restrict__ out, int64_t n) {
  using A = typename Acc<T>::type;
  for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < n; i += (int64_t)gridDim.x * blockDim.x) {
    A lv = static_cast<A>(l[i]), gv = static_cast<A>(g[i]);
    A a = lv * sigm(lv);
    if (kFull) a = a * sigm(a);
    out[i] = static_cast<T>(a * gv * sigm(gv));
  }
}

template <typename T, bool kFull>
__global__ void backward_kernel(const T* __restrict__ dy, const T* __restrict__ l, const T* __restrict__ g,
                                T* __restrict__ dl, T* __restrict__ dg, int64_t n) {
  using A = typename Acc<T>::type;
  for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < n; i += (int64_t)gridDim.x * blockDim.x) {
    A d = static_cast<A>(dy[i]), lv = static_cast<A>(l[i]), gv = static_cast<A>(g[i]);
    A sl, cl, sg, cg;
    sigm_c(lv, sl, cl);
    sigm_c(gv, sg, cg);
    A a = lv * sl;
    A da = sl * (A(1) + lv * cl);
    if (kFull) {
      A sa, ca;
      sigm_c(a, sa, ca);
      da = da * sa * (A(1) + a * ca);
      a = a * sa;
    }
    dl[i] = static_cast<T>(d * gv * sg * da);
    dg[i] = static_cast<T>(d * a * sg * (A(1) + gv * cg));
  }
}

void check_inputs(const char* op, std::initializer_list<at::Tensor> ts) {
  const at::Tensor& first = *ts.begin();
  for (const auto& t : ts) {
    TORCH_CHECK(t.is_cuda() && t.device() == first.device(), op, ": expected CUDA tensors on one device");
    TORCH_CHECK(t.scalar_type() == first.scalar_type(), op, ": dtypes differ");
    TORCH_CHECK(t.sizes() == first.sizes() && t.strides() == first.strides(), op,
                ": inputs must share shape and strides");
    TORCH_CHECK(t.is_non_overlapping_and_dense(), op, ": inputs must be dense");
  }
}

dim3 grid_for(int64_t n) {
  const int64_t blocks = (n + 255) / 256;
  return dim3(static_cast<unsigned>(std::min<int64_t>(blocks, 65535LL * 8)));
}

at::Tensor forward(const at::Tensor& local, const at::Tensor& global, int64_t mode) {
  check_inputs("_cross_modulation_forward", {local, global});
  TORCH_CHECK(mode == 0 || mode == 1, "_cross_modulation_forward: mode must be 0 or 1");
  const c10::cuda::CUDAGuard guard(local.device());
  at::Tensor out = at::empty_like(local);
  const int64_t n = local.numel();
  if (n == 0) return out;
  auto stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, local.scalar_type(), "cross_mod_fwd_cuda", [&] {
    auto kernel = mode == 1 ? forward_kernel<scalar_t, true> : forward_kernel<scalar_t, false>;
    kernel<<<grid_for(n), 256, 0, stream>>>(local.const_data_ptr<scalar_t>(), global.const_data_ptr<scalar_t>(),
                                           out.mutable_data_ptr<scalar_t>(), n);
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

std::tuple<at::Tensor, at::Tensor> backward(const at::Tensor& grad, const at::Tensor& local,
                                            const at::Tensor& global, int64_t mode) {
  check_inputs("_cross_modulation_backward", {local, global, grad});
  TORCH_CHECK(mode == 0 || mode == 1, "_cross_modulation_backward: mode must be 0 or 1");
  const c10::cuda::CUDAGuard guard(local.device());
  at::Tensor dlocal = at::empty_like(local), dglobal = at::empty_like(local);
  const int64_t n = local.numel();
  if (n == 0) return {dlocal, dglobal};
  auto stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, local.scalar_type(), "cross_mod_bwd_cuda", [&] {
    auto kernel = mode == 1 ? backward_kernel<scalar_t, true> : backward_kernel<scalar_t, false>;
    kernel<<<grid_for(n), 256, 0, stream>>>(grad.const_data_ptr<scalar_t>(), local.const_data_ptr<scalar_t>(),
                                           global.const_data_ptr<scalar_t>(), dlocal.mutable_data_ptr<scalar_t>(),
                                           dglobal.mutable_data_ptr<scalar_t>(), n);
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {dlocal, dglobal};
}

}  // namespace

TORCH_LIBRARY_IMPL(fastvit_ops, CUDA, m) {
  m.impl("_cross_modulation_forward", &forward);
  m.impl("_cross_modulation_backward", &backward);
}

}  // namespace fastvit_ops
