// CPU capabilities: which build of the SIMD kernels (csrc/cpu/isa/, compiled once per capability
// by setup.py) runs, chosen once when the extension loads, as ATen's DispatchStub does.
//
// A kernel is a function pointer table `CpuKernel<Fn>` with one slot per capability. Each build of
// an isa/ file fills its own slot at load (FASTVIT_REGISTER_CPU_KERNEL), and `kernel.get()` returns
// the slot of the capability in use, or of the best lower one that was built.
#pragma once
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <string>
#include <type_traits>

namespace fastvit_ops {
namespace cpu {

enum class Capability : int { kDefault = 0, kAvx2 = 1, kAvx512 = 2 };
constexpr int kNumCapabilities = 3;

const char* capability_name(Capability c);  // "default", "avx2", "avx512"

struct CapabilityChoice {
  Capability in_use;     // what the kernels run with
  Capability cpu;        // the best this CPU supports
  std::string reason;    // why in_use was chosen (the CPU, FASTVIT_OPS_CPU_CAPABILITY, the build)
  std::string warning;   // non-empty when a requested capability could not be honoured
};

// Decided on first use (the extension's import) from the CPU, the builds present and
// FASTVIT_OPS_CPU_CAPABILITY; never changes afterwards.
const CapabilityChoice& capability_choice();
inline Capability capability() { return capability_choice().in_use; }

// Whether the isa/ kernels were built for `c` (setup.py builds only DEFAULT off x86-64).
bool capability_built(Capability c);
void mark_capability_built(int index);  // called by each isa/ build at load

template <typename Fn>
struct CpuKernel {
  Fn slot[kNumCapabilities];  // zero-initialized before any registration runs (static storage)

  Fn get() const {
    for (int c = static_cast<int>(capability()); c >= 0; --c)
      if (slot[c] != nullptr) return slot[c];
    return nullptr;  // unreachable: the DEFAULT build registers every kernel
  }
};

// One CpuKernel per element type, for kernels templated on it: `Fn` is an alias template of the
// function pointer type, e.g. `template <typename T> using Fwd = void (*)(const T*, T*, int64_t);`.
template <template <typename> class Fn>
struct PerDtype {
  CpuKernel<Fn<float>> f32;
  CpuKernel<Fn<double>> f64;
  CpuKernel<Fn<c10::Half>> f16;
  CpuKernel<Fn<c10::BFloat16>> bf16;

  template <typename T>
  CpuKernel<Fn<T>>& of() {
    if constexpr (std::is_same_v<T, float>) return f32;
    else if constexpr (std::is_same_v<T, double>) return f64;
    else if constexpr (std::is_same_v<T, c10::Half>) return f16;
    else return bf16;
  }
};

}  // namespace cpu
}  // namespace fastvit_ops

// In an isa/ file: fill this build's slot of `table` (a CpuKernel declared in a shared header).
#define FASTVIT_CONCAT_(a, b) a##b
#define FASTVIT_CONCAT(a, b) FASTVIT_CONCAT_(a, b)
#define FASTVIT_REGISTER_CPU_KERNEL(table, fn)                                              \
  static const bool FASTVIT_CONCAT(fastvit_registered_, __LINE__) = [] {                    \
    (table).slot[FASTVIT_OPS_CAPABILITY_INDEX] = (fn);                                      \
    ::fastvit_ops::cpu::mark_capability_built(FASTVIT_OPS_CAPABILITY_INDEX);               \
    return true;                                                                            \
  }()
