// The AVX2 + FMA build of the elementwise passes and the tile GEMMs (CMake adds -mavx2 -mfma to this file on
// x86-64).
#include "vec_ops.h"
#if defined(__AVX2__) && defined(__FMA__)
#define RMI_VEC_ISA avx2
#define RMI_VEC_BYTES 32
#define RMI_VEC_NAME "avx2"
#define RMI_VEC_GEMM &gemm_ops()
#include "vec_impl.h"
#else
namespace rmi_fast::cpu::avx2 {
const VecOps& ops() { return base::ops(); }
const GemmOps& gemm_ops() { return base::gemm_ops(); }
}  // namespace rmi_fast::cpu::avx2
#endif
