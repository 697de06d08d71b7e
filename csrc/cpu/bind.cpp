// Python entry points of the C++ CPU kernels (rmi_fast.cpu.CppBackend calls them).
#include <torch/extension.h>

#include "rows.h"
#include "sweep.h"
#include "vec_ops.h"

namespace rmi_fast {
namespace {

namespace py = pybind11;
using cpu::Want;

// One negative-part reduction of rmi_fast.ops.spec. x: (Gx, Bx, D), y: (Gy, By, D), fp32, contiguous.
//   stats empty, nothing wanted      → statistics only
//   stats empty, some gradient wanted → fused: statistics and the gradients for unit upstream weights
//   stats given                      → the gradients for the upstream `weights` of each statistic
// Returns (stats, dx or None, dy or None, dscale or None).
py::tuple pair_reduce(at::Tensor x, at::Tensor y, double scale, const std::string& family,
                      const std::string& transform, double clip, const std::string& diagonal, int64_t diag_offset,
                      bool columns, std::vector<at::Tensor> stats, std::vector<at::Tensor> weights, bool want_dx,
                      bool want_dy, bool want_dscale) {
  const cpu::Problem pb(x, y, scale, cpu::make_options(transform, clip, diagonal, diag_offset, columns));
  const Want want{want_dx, want_dy, want_dscale};
  TORCH_CHECK(stats.size() == weights.size(), "stats and weights must come in pairs");
  for (auto& t : stats) t = t.to(at::kFloat).contiguous();
  for (auto& t : weights) t = t.to(at::kFloat).contiguous();
  cpu::Result res;
  {
    py::gil_scoped_release no_gil;
    at::AutoDispatchBelowADInplaceOrView no_autograd;  // the custom op owns the autograd; tiles are plain buffers
    cpu::Family run = nullptr;
    if (family == "row_lse") run = cpu::row_lse;
    else if (family == "global_lse") run = cpu::global_lse;
    else if (family == "row_sum") run = cpu::row_sum;
    else TORCH_CHECK(false, "unknown family ", family);
    res = cpu::by_groups(run, pb, want, stats, weights);
  }
  auto opt = [](const at::Tensor& t) -> py::object { return t.defined() ? py::cast(t) : py::none(); };
  py::object dscale = want_dscale ? py::object(py::float_(res.grads.dscale)) : py::object(py::none());
  return py::make_tuple(res.stats, opt(res.grads.dx), opt(res.grads.dy), dscale);
}

}  // namespace

void bind_cpu(py::module_& m) {
  m.def("cpu_pair_reduce", &pair_reduce, "Negative-part reduction on the CPU (see rmi_fast.cpu)", py::arg("x"),
        py::arg("y"), py::arg("scale"), py::arg("family"), py::arg("transform"), py::arg("clip"),
        py::arg("diagonal"), py::arg("diag_offset"), py::arg("columns"), py::arg("stats"), py::arg("weights"),
        py::arg("want_dx"), py::arg("want_dy"), py::arg("want_dscale"));
  m.def("cpu_row_dots",
        [](const at::Tensor& x, const at::Tensor& y) {
          py::gil_scoped_release no_gil;
          return cpu::row_dots(x, y);
        },
        "(G, B) paired dots <x[g, i], y[g, i]> of (G, B, D) fp32 tensors, either side broadcast", py::arg("x"),
        py::arg("y"));
  m.def("cpu_add_weighted_rows",
        [](at::Tensor out, const at::Tensor& w, const at::Tensor& other, bool accumulate, double keep) {
          py::gil_scoped_release no_gil;
          cpu::add_weighted_rows(out, w, other, accumulate, static_cast<float>(keep));
        },
        "out ← keep·out (with accumulate) + w[g, i]·other[g, i] row by row, summed over the groups where out has "
        "one", py::arg("out"), py::arg("w"), py::arg("other"), py::arg("accumulate"), py::arg("keep") = 1.0);
  m.def("cpu_empty", [](std::vector<int64_t> sizes) { return cpu::empty_f32(sizes); },
        "An uninitialised fp32 CPU tensor, on transparent huge pages from 2 MiB on (see rmi_fast.memory)",
        py::arg("sizes"));
  m.def("cpu_isa", []() { return std::string(cpu::vec_ops().name); },
        "The instruction set of the elementwise passes chosen for this CPU");
  m.def("cpu_tile_gemm", []() {
        const cpu::GemmOps* gemm = cpu::tile_gemm(0);  // D = 0: a multiple of every width, so only the ISA decides
        return gemm == nullptr ? std::string("blas") : std::string(cpu::vec_ops().name) + ", D a multiple of " +
                                                           std::to_string(gemm->lanes);
      },
        "Who computes the tile GEMMs: the register-blocked kernels of this instruction set (for D a multiple of the "
        "vector width; else the BLAS) or the BLAS");
}

}  // namespace rmi_fast
