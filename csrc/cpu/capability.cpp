// Which build of the SIMD kernels runs (see capability.h): the best capability the CPU supports
// among those built, unless FASTVIT_OPS_CPU_CAPABILITY asks for a lower one. Read once.
#include "cpu/capability.h"

#include <algorithm>
#include <cctype>
#include <cstdlib>

namespace fastvit_ops {
namespace cpu {
namespace {

bool g_built[kNumCapabilities];  // static storage: false until an isa/ build registers

const char* const kNames[kNumCapabilities] = {"default", "avx2", "avx512"};

// What the instructions each build uses need (setup.py's flags): AVX2 = AVX2 + FMA + F16C;
// AVX512 = that + AVX-512 F/BW/VL/DQ. __builtin_cpu_supports also checks that the OS saves the
// vector registers (XCR0).
Capability detect(std::string& what) {
#if (defined(__GNUC__) || defined(__clang__)) && (defined(__x86_64__) || defined(_M_X64))
  __builtin_cpu_init();
  const bool avx2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
                    __builtin_cpu_supports("f16c");
  const bool avx512 = avx2 && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
                      __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq");
  if (avx512) {
    what = "the CPU has AVX-512 F/BW/VL/DQ";
    return Capability::kAvx512;
  }
  if (avx2) {
    what = "the CPU has AVX2 + FMA + F16C but not AVX-512 F/BW/VL/DQ";
    return Capability::kAvx2;
  }
  what = "the CPU lacks AVX2 + FMA + F16C";
  return Capability::kDefault;
#else
  what = "no x86-64 SIMD builds on this platform (the baseline build is the compiler's default ISA)";
  return Capability::kDefault;
#endif
}

Capability best_built_at_most(Capability c) {
  for (int i = static_cast<int>(c); i > 0; --i)
    if (g_built[i]) return static_cast<Capability>(i);
  return Capability::kDefault;
}

CapabilityChoice decide() {
  CapabilityChoice ch;
  std::string what;
  ch.cpu = detect(what);
  Capability want = ch.cpu;
  const char* env = std::getenv("FASTVIT_OPS_CPU_CAPABILITY");
  std::string req = env ? env : "";
  std::transform(req.begin(), req.end(), req.begin(), [](unsigned char c) { return std::tolower(c); });
  if (!req.empty()) {
    int idx = -1;
    for (int i = 0; i < kNumCapabilities; ++i)
      if (req == kNames[i]) idx = i;
    if (idx < 0) {
      ch.warning = "FASTVIT_OPS_CPU_CAPABILITY=" + std::string(env) +
                   " is not one of default, avx2, avx512; ignoring it";
    } else if (idx > static_cast<int>(ch.cpu)) {
      ch.warning = "FASTVIT_OPS_CPU_CAPABILITY=" + req + " asks for more than this CPU supports (" + what +
                   "); using " + kNames[static_cast<int>(ch.cpu)];
    } else {
      want = static_cast<Capability>(idx);
      what = "FASTVIT_OPS_CPU_CAPABILITY=" + req + " (the CPU supports " + kNames[static_cast<int>(ch.cpu)] + ")";
    }
  }
  ch.in_use = best_built_at_most(want);
  ch.reason = what;
  if (ch.in_use != want) {
    const std::string msg = std::string("the extension was built without the ") + kNames[static_cast<int>(want)] +
                            " kernels; using " + kNames[static_cast<int>(ch.in_use)];
    ch.reason += "; " + msg;
    if (!req.empty() && ch.warning.empty()) ch.warning = "FASTVIT_OPS_CPU_CAPABILITY=" + req + ": " + msg;
  }
  return ch;
}

}  // namespace

const char* capability_name(Capability c) { return kNames[static_cast<int>(c)]; }

const CapabilityChoice& capability_choice() {
  static const CapabilityChoice choice = decide();
  return choice;
}

bool capability_built(Capability c) { return g_built[static_cast<int>(c)]; }

void mark_capability_built(int index) {
  if (index >= 0 && index < kNumCapabilities) g_built[index] = true;
}

}  // namespace cpu
}  // namespace fastvit_ops
