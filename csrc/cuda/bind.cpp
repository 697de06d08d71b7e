// Python binding of the CUDA pair_reduce kernels (host C++ only: compiles against a CPU-only torch). The caller
// (rmi_fast/cuda.py) allocates every output with torch on the current device and passes the current stream as an
// integer; this file checks shapes, dtypes and layouts, fills the launch descriptors and calls the launchers.
//
// Tensors: own (G_own, rows, D), other (G_other, rows', D) with unit stride along D and G_own, G_other ∈ {1, G};
// scale: one fp32 element on the device; statistics, weights and partials fp32.
#include <torch/extension.h>

#include <algorithm>
#include <cstdint>
#include <optional>
#include <string>

#include "cuda/pair_reduce.h"

namespace rmi_fast {
namespace {

namespace rc = rmi_fast::cuda;

rc::DType dtype_of(const at::Tensor& t) {
  switch (t.scalar_type()) {
    case at::kFloat: return rc::DType::f32;
    case at::kBFloat16: return rc::DType::bf16;
    case at::kHalf: return rc::DType::f16;
    default: TORCH_CHECK(false, "rmi_fast CUDA kernels take float32, bfloat16 or float16, got ", t.scalar_type());
  }
}

rc::Mode mode_of(const std::string& m) {
  if (m == "lse") return rc::Mode::lse;
  if (m == "lse_clip") return rc::Mode::lse_clip;
  if (m == "exp_m1") return rc::Mode::exp_m1;
  if (m == "softplus") return rc::Mode::softplus;
  TORCH_CHECK(false, "mode must be one of lse, lse_clip, exp_m1, softplus, got ", m);
}

rc::Diagonal diagonal_of(const std::string& d) {
  if (d == "include") return rc::Diagonal::include;
  if (d == "exclude") return rc::Diagonal::exclude;
  if (d == "zero") return rc::Diagonal::zero;
  TORCH_CHECK(false, "diagonal must be one of include, exclude, zero, got ", d);
}

void* stream_of(int64_t handle) { return reinterpret_cast<void*>(static_cast<uintptr_t>(handle)); }

void check_device(const at::Tensor& t, const at::Tensor& like, const char* name) {
  TORCH_CHECK(t.device() == like.device(), name, " must be on ", like.device(), ", got ", t.device());
}

// 16-byte loads are possible when the base is 16-byte aligned and every row starts 16 bytes apart from the next.
bool vector_ok(const at::Tensor& t) {
  const int64_t e = t.element_size();
  const auto addr = reinterpret_cast<uintptr_t>(t.data_ptr());
  return addr % 16 == 0 && (t.size(2) * e) % 16 == 0 && (t.stride(1) * e) % 16 == 0 &&
         (t.size(0) == 1 || (t.stride(0) * e) % 16 == 0);
}

rc::PairOperands operands(const at::Tensor& own, const at::Tensor& other, const at::Tensor& scale, double clip,
                          const std::string& diagonal, int64_t diag_offset, bool precise) {
  TORCH_CHECK(own.is_cuda(), "own must be a CUDA tensor, got ", own.device());
  check_device(other, own, "other");
  check_device(scale, own, "scale");
  TORCH_CHECK(own.dim() == 3 && other.dim() == 3, "own and other must be 3-D (G, B, D), got ", own.sizes(), " and ",
              other.sizes());
  TORCH_CHECK(own.scalar_type() == other.scalar_type(), "own and other must have one dtype, got ",
              own.scalar_type(), " and ", other.scalar_type());
  TORCH_CHECK(own.size(2) == other.size(2), "own and other must have the same D, got ", own.size(2), " and ",
              other.size(2));
  TORCH_CHECK(own.size(2) >= 1 && own.size(1) >= 1 && other.size(1) >= 1, "empty operands");
  TORCH_CHECK((own.stride(2) == 1 || own.size(2) == 1) && (other.stride(2) == 1 || other.size(2) == 1),
              "own and other must have unit stride along D");
  const int64_t G = std::max(own.size(0), other.size(0));
  TORCH_CHECK((own.size(0) == 1 || own.size(0) == G) && (other.size(0) == 1 || other.size(0) == G),
              "group counts must be 1 or G, got ", own.size(0), " and ", other.size(0));
  TORCH_CHECK(scale.scalar_type() == at::kFloat && scale.numel() == 1, "scale must be one float32 element");

  rc::PairOperands p{};
  p.own = own.data_ptr();
  p.other = other.data_ptr();
  p.own_gstride = own.size(0) == 1 ? 0 : own.stride(0);
  p.own_rstride = own.stride(1);
  p.other_gstride = other.size(0) == 1 ? 0 : other.stride(0);
  p.other_rstride = other.stride(1);
  p.groups = G;
  p.own_rows = own.size(1);
  p.other_rows = other.size(1);
  p.dim = own.size(2);
  p.own_broadcast = own.size(0) == 1 && G > 1;
  p.vec = vector_ok(own) && vector_ok(other);
  p.precise = precise;
  p.dtype = dtype_of(own);
  p.scale = scale.data_ptr<float>();
  p.clip = static_cast<float>(clip);
  p.diagonal = diagonal_of(diagonal);
  p.diag_offset = diag_offset;
  return p;
}

float* checked_f32(const at::Tensor& t, const at::Tensor& like, const char* name, at::IntArrayRef shape) {
  check_device(t, like, name);
  TORCH_CHECK(t.scalar_type() == at::kFloat && t.is_contiguous() && t.sizes() == shape, name,
              " must be a contiguous float32 tensor of shape ", shape, ", got ", t.scalar_type(), " ", t.sizes());
  return t.data_ptr<float>();
}

// A term (statistic, weight) indexed (g, r): shape (G, rows) or (G,) (per group), any strides.
rc::RowTerm term(const std::optional<at::Tensor>& stat, const std::optional<at::Tensor>& weight, int64_t G,
                 int64_t rows, const at::Tensor& like, const char* name) {
  rc::RowTerm t{};
  auto fill = [&](const at::Tensor& v, const float*& ptr, int64_t& gs, int64_t& rs) {
    check_device(v, like, name);
    TORCH_CHECK(v.scalar_type() == at::kFloat, name, " terms must be float32, got ", v.scalar_type());
    const bool per_row = v.dim() == 2 && v.size(0) == G && v.size(1) == rows;
    const bool per_group = v.dim() == 1 && v.size(0) == G;
    TORCH_CHECK(per_row || per_group, name, " terms must have shape (", G, ", ", rows, ") or (", G, ",), got ",
                v.sizes());
    ptr = v.data_ptr<float>();
    gs = v.stride(0);
    rs = per_row ? v.stride(1) : 0;
  };
  if (weight.has_value()) {
    fill(*weight, t.weight, t.weight_gstride, t.weight_rstride);
    if (stat.has_value()) fill(*stat, t.stat, t.stat_gstride, t.stat_rstride);
  }
  return t;
}

void row_stats(const at::Tensor& own, const at::Tensor& other, const at::Tensor& scale, const std::string& mode,
               double clip, const std::string& diagonal, int64_t diag_offset, bool precise, const at::Tensor& out,
               int64_t stream) {
  const rc::PairOperands p = operands(own, other, scale, clip, diagonal, diag_offset, precise);
  float* o = checked_f32(out, own, "out", {p.groups, p.own_rows});
  rc::launch_row_stats(p, mode_of(mode), o, stream_of(stream));
}

void lse_merge(const at::Tensor& rows, const at::Tensor& out, int64_t stream) {
  TORCH_CHECK(rows.is_cuda() && rows.dim() == 2, "rows must be a 2-D CUDA tensor");
  const float* r = checked_f32(rows, rows, "rows", rows.sizes());
  float* o = checked_f32(out, rows, "out", {rows.size(0)});
  rc::launch_lse_merge(r, rows.size(0), rows.size(1), o, stream_of(stream));
}

void row_grads(const at::Tensor& own, const at::Tensor& other, const at::Tensor& scale, const std::string& mode,
               double clip, const std::string& diagonal, int64_t diag_offset, bool precise,
               const std::optional<at::Tensor>& own_stat, const std::optional<at::Tensor>& own_weight,
               const std::optional<at::Tensor>& other_stat, const std::optional<at::Tensor>& other_weight,
               const std::optional<at::Tensor>& d_own, const std::optional<at::Tensor>& dscale_partial, int64_t stream) {
  const rc::PairOperands p = operands(own, other, scale, clip, diagonal, diag_offset, precise);
  const rc::RowTerm ot = term(own_stat, own_weight, p.groups, p.own_rows, own, "own");
  const rc::RowTerm xt = term(other_stat, other_weight, p.groups, p.other_rows, own, "other");
  void* d = nullptr;
  if (d_own.has_value()) {
    check_device(*d_own, own, "d_own");
    TORCH_CHECK(d_own->scalar_type() == own.scalar_type() && d_own->is_contiguous() && d_own->sizes() == own.sizes(),
                "d_own must be a contiguous ", own.scalar_type(), " tensor of shape ", own.sizes());
    d = d_own->data_ptr();
  }
  float* ds = nullptr;
  if (dscale_partial.has_value())
    ds = checked_f32(*dscale_partial, own, "dscale_partial", {rc::dscale_partial_count(p)});
  rc::launch_row_grads(p, mode_of(mode), ot, xt, d, ds, stream_of(stream));
}

int64_t partial_count(const at::Tensor& own, const at::Tensor& other) {
  TORCH_CHECK(own.dim() == 3 && other.dim() == 3, "own and other must be 3-D (G, B, D)");
  rc::PairOperands p{};  // only the grid geometry matters here
  p.groups = std::max(own.size(0), other.size(0));
  p.own_rows = own.size(1);
  p.own_broadcast = own.size(0) == 1 && p.groups > 1;
  return rc::dscale_partial_count(p);
}

}  // namespace

void bind_cuda(pybind11::module_& m) {
  namespace py = pybind11;
  m.def("cuda_row_stats", &row_stats, "out (G, rows) fp32 = per-row log-sum-exp or sum of T(S), S = scale·own·otherᵀ",
        py::arg("own"), py::arg("other"), py::arg("scale"), py::arg("mode"), py::arg("clip"), py::arg("diagonal"),
        py::arg("diag_offset"), py::arg("precise"), py::arg("out"), py::arg("stream"));
  m.def("cuda_lse_merge", &lse_merge, "out (G,) = logsumexp over the rows of rows (G, n)", py::arg("rows"),
        py::arg("out"), py::arg("stream"));
  m.def("cuda_row_grads", &row_grads,
        "d_own = scale·G·other and per-block partial sums of dscale = Σ G∘(own·otherᵀ) for upstream terms",
        py::arg("own"), py::arg("other"), py::arg("scale"), py::arg("mode"), py::arg("clip"), py::arg("diagonal"),
        py::arg("diag_offset"), py::arg("precise"), py::arg("own_stat"), py::arg("own_weight"),
        py::arg("other_stat"), py::arg("other_weight"), py::arg("d_own"), py::arg("dscale_partial"),
        py::arg("stream"));
  m.def("cuda_dscale_partial_count", &partial_count, "length of the dscale_partial buffer of cuda_row_grads",
        py::arg("own"), py::arg("other"));
}

}  // namespace rmi_fast
