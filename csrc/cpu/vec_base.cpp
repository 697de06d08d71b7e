// The portable build of the elementwise passes (the compiler's baseline vector width).
#define RMI_VEC_ISA base
#define RMI_VEC_BYTES 16
#define RMI_VEC_NAME "base"
#include "vec_impl.h"
