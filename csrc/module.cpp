// rmi_fast._C: one pybind11 module for every compiled backend. Each backend folder contributes a bind_* function.
#include <torch/extension.h>

namespace rmi_fast {
void bind_cpu(pybind11::module_& m);
#ifdef RMI_FAST_WITH_CUDA
void bind_cuda(pybind11::module_& m);
#endif
}  // namespace rmi_fast

PYBIND11_MODULE(_C, m) {
  m.doc() = "rmi_fast compiled kernels (C++ CPU; CUDA where built)";
#ifdef RMI_FAST_WITH_CUDA
  m.attr("with_cuda") = true;
  rmi_fast::bind_cuda(m);
#else
  m.attr("with_cuda") = false;
#endif
  rmi_fast::bind_cpu(m);
}
