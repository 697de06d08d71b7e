// The portable build of the elementwise passes (the compiler's baseline vector width); its tile GEMMs are the BLAS's.
#define RMI_VEC_ISA base
#define RMI_VEC_BYTES 16
#define RMI_VEC_NAME "base"
#define RMI_VEC_GEMM nullptr  // at::mm (the vendor BLAS) serves the tile GEMMs
#include "vec_impl.h"
