// Runtime choice of the elementwise build: the widest instruction set this CPU supports (checked once).
#include <cstdlib>
#include <cstring>

#include "vec_ops.h"

namespace rmi_fast::cpu {

namespace {
const VecOps& pick() {
  // RMI_FAST_CPU_ISA=base|avx2|avx512 caps the choice (for testing the narrower builds on a wide machine).
  const char* cap = std::getenv("RMI_FAST_CPU_ISA");
  auto allowed = [cap](const char* isa) { return cap == nullptr || std::strcmp(cap, isa) == 0 ||
                                                 (std::strcmp(cap, "avx512") == 0 && std::strcmp(isa, "avx2") == 0); };
#if defined(__x86_64__) || defined(_M_X64)
  __builtin_cpu_init();
  if (allowed("avx512") && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512dq")) return avx512::ops();
  if (allowed("avx2") && __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) return avx2::ops();
#else
  (void)allowed;
#endif
  return base::ops();
}
}  // namespace

const VecOps& vec_ops() {
  static const VecOps& chosen = pick();
  return chosen;
}

const GemmOps* tile_gemm(int64_t D) {
  static const GemmOps* chosen = [] {
    const char* choice = std::getenv("RMI_FAST_CPU_GEMM");
    return choice != nullptr && std::strcmp(choice, "blas") == 0 ? nullptr : vec_ops().gemm;
  }();
  return chosen != nullptr && D % chosen->lanes == 0 ? chosen : nullptr;
}

}  // namespace rmi_fast::cpu
