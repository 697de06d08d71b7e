// The AVX-512 build of the elementwise passes and the tile GEMMs (CMake adds -mavx512f -mavx512dq -mfma to this
// file on x86-64).
#include "vec_ops.h"
#if defined(__AVX512F__)
#define RMI_VEC_ISA avx512
#define RMI_VEC_BYTES 64
#define RMI_VEC_NAME "avx512"
#define RMI_VEC_GEMM &gemm_ops()
#include "vec_impl.h"
#else
namespace rmi_fast::cpu::avx512 {
const VecOps& ops() { return avx2::ops(); }
const GemmOps& gemm_ops() { return avx2::gemm_ops(); }
}  // namespace rmi_fast::cpu::avx512
#endif
