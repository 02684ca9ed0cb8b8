// Sigmoid cross-modulation on CPU: argument checks and threading (at::parallel_for over flat
// chunks); the math is in isa/cross_modulation.cpp, built once per CPU capability.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>
#include <torch/types.h>

#include "cpu/cross_modulation.h"

namespace fastvit_ops {
namespace cpu {

PerDtype<CrossModForward> cross_modulation_forward;
PerDtype<CrossModBackward> cross_modulation_backward;
PerDtype<CrossModForwardPartials> cross_modulation_forward_partials;
PerDtype<CrossModScale> cross_modulation_scale;

namespace {
constexpr int64_t kGrain = 16384;  // elements per task: amortizes the OpenMP fork

void check_inputs(const char* op, std::initializer_list<at::Tensor> ts) {
  const at::Tensor& first = *ts.begin();
  for (const auto& t : ts) {
    TORCH_CHECK(t.device().is_cpu(), op, ": expected CPU tensors");
    TORCH_CHECK(t.scalar_type() == first.scalar_type(), op, ": dtypes differ");
    TORCH_CHECK(t.sizes() == first.sizes() && t.strides() == first.strides(), op,
                ": inputs must share shape and strides");
    TORCH_CHECK(t.is_non_overlapping_and_dense(), op, ": inputs must be dense");
  }
}

}  // namespace

at::Tensor cross_modulation_fwd(const at::Tensor& local, const at::Tensor& global, int64_t mode) {
  check_inputs("_cross_modulation_forward", {local, global});
  TORCH_CHECK(mode == 0 || mode == 1, "_cross_modulation_forward: mode must be 0 or 1");
  at::Tensor out = at::empty_like(local);
  const int64_t n = local.numel();
  const bool full = mode == 1;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, local.scalar_type(), "cross_mod_fwd", [&] {
    const auto kernel = cross_modulation_forward.of<scalar_t>().get();
    const scalar_t* l = local.const_data_ptr<scalar_t>();
    const scalar_t* g = global.const_data_ptr<scalar_t>();
    scalar_t* o = out.mutable_data_ptr<scalar_t>();
    at::parallel_for(0, n, kGrain, [&](int64_t begin, int64_t end) {
      kernel(l + begin, g + begin, o + begin, end - begin, full);
    });
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor> cross_modulation_bwd(const at::Tensor& grad, const at::Tensor& local,
                                            const at::Tensor& global, int64_t mode) {
  check_inputs("_cross_modulation_backward", {local, global, grad});
  TORCH_CHECK(mode == 0 || mode == 1, "_cross_modulation_backward: mode must be 0 or 1");
  at::Tensor dlocal = at::empty_like(local);
  at::Tensor dglobal = at::empty_like(local);
  const int64_t n = local.numel();
  const bool full = mode == 1;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, local.scalar_type(), "cross_mod_bwd", [&] {
    const auto kernel = cross_modulation_backward.of<scalar_t>().get();
    const scalar_t* dy = grad.const_data_ptr<scalar_t>();
    const scalar_t* l = local.const_data_ptr<scalar_t>();
    const scalar_t* g = global.const_data_ptr<scalar_t>();
    scalar_t* dl = dlocal.mutable_data_ptr<scalar_t>();
    scalar_t* dg = dglobal.mutable_data_ptr<scalar_t>();
    at::parallel_for(0, n, kGrain, [&](int64_t begin, int64_t end) {
      kernel(dy + begin, l + begin, g + begin, dl + begin, dg + begin, end - begin, full);
    });
  });
  return {dlocal, dglobal};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> cross_modulation_fwd_partials(const at::Tensor& local,
                                                                           const at::Tensor& global, int64_t mode,
                                                                           bool need_local, bool need_global) {
  check_inputs("_cross_modulation_forward", {local, global});
  TORCH_CHECK(mode == 0 || mode == 1, "_cross_modulation_forward: mode must be 0 or 1");
  TORCH_CHECK(local.scalar_type() == at::kFloat || local.scalar_type() == at::kDouble,
              "cross_modulation_fwd_partials: float32 or float64 only");
  at::Tensor out = at::empty_like(local);
  at::Tensor pl = need_local ? at::empty_like(local) : at::Tensor();
  at::Tensor pg = need_global ? at::empty_like(local) : at::Tensor();
  const int64_t n = local.numel();
  const bool full = mode == 1;
  AT_DISPATCH_FLOATING_TYPES(local.scalar_type(), "cross_mod_fwd_partials", [&] {
    const auto kernel = cross_modulation_forward_partials.of<scalar_t>().get();
    const scalar_t* l = local.const_data_ptr<scalar_t>();
    const scalar_t* g = global.const_data_ptr<scalar_t>();
    scalar_t* o = out.mutable_data_ptr<scalar_t>();
    scalar_t* a = need_local ? pl.mutable_data_ptr<scalar_t>() : nullptr;
    scalar_t* b = need_global ? pg.mutable_data_ptr<scalar_t>() : nullptr;
    at::parallel_for(0, n, kGrain, [&](int64_t begin, int64_t end) {
      kernel(l + begin, g + begin, o + begin, a ? a + begin : nullptr, b ? b + begin : nullptr, end - begin, full);
    });
  });
  return {out, pl, pg};
}

std::tuple<at::Tensor, at::Tensor> cross_modulation_bwd_partials(const at::Tensor& grad, const at::Tensor& pl,
                                                                 const at::Tensor& pg) {
  TORCH_CHECK(pl.defined() || pg.defined(), "cross_modulation_bwd_partials: no partial to scale");
  const at::Tensor& like = pl.defined() ? pl : pg;
  if (pl.defined() && pg.defined()) check_inputs("cross_modulation_bwd_partials", {grad, pl, pg});
  else check_inputs("cross_modulation_bwd_partials", {grad, like});
  at::Tensor dl = pl.defined() ? at::empty_like(pl) : at::Tensor();
  at::Tensor dg = pg.defined() ? at::empty_like(pg) : at::Tensor();
  const int64_t n = like.numel();
  AT_DISPATCH_FLOATING_TYPES(like.scalar_type(), "cross_mod_bwd_partials", [&] {
    const auto kernel = cross_modulation_scale.of<scalar_t>().get();
    const scalar_t* dy = grad.const_data_ptr<scalar_t>();
    const scalar_t* a = pl.defined() ? pl.const_data_ptr<scalar_t>() : nullptr;
    const scalar_t* b = pg.defined() ? pg.const_data_ptr<scalar_t>() : nullptr;
    scalar_t* da = pl.defined() ? dl.mutable_data_ptr<scalar_t>() : nullptr;
    scalar_t* db = pg.defined() ? dg.mutable_data_ptr<scalar_t>() : nullptr;
    at::parallel_for(0, n, kGrain, [&](int64_t begin, int64_t end) {
      kernel(dy + begin, a ? a + begin : nullptr, b ? b + begin : nullptr, da ? da + begin : nullptr,
             db ? db + begin : nullptr, end - begin);
    });
  });
  return {dl, dg};
}

TORCH_LIBRARY_IMPL(fastvit_ops, CPU, m) {
  m.impl("_cross_modulation_forward", &cross_modulation_fwd);
  m.impl("_cross_modulation_backward", &cross_modulation_bwd);
}

}  // namespace cpu
}  // namespace fastvit_ops
