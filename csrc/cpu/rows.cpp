// The positive part's rows (see rows.h).
#include "rows.h"

#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>

#include <algorithm>

#include "vec_ops.h"

namespace rmi_fast::cpu {
namespace {

void check(const at::Tensor& t, const char* name, int64_t dims) {
  TORCH_CHECK(t.dim() == dims, name, " must have ", dims, " dimensions, got ", t.sizes());
  TORCH_CHECK(t.scalar_type() == at::kFloat && t.device().is_cpu() && t.is_contiguous(), name,
              " must be a contiguous float32 CPU tensor");
}

// Rows per parallel chunk: about 2^16 floats of work each, so a small call stays on the calling thread.
int64_t grain(int64_t D) { return std::max<int64_t>(1, (int64_t{1} << 16) / std::max<int64_t>(D, 1)); }

}  // namespace

at::Tensor row_dots(const at::Tensor& x, const at::Tensor& y) {
  check(x, "x", 3), check(y, "y", 3);
  const int64_t Gx = x.size(0), Gy = y.size(0), B = x.size(1), D = x.size(2), G = std::max(Gx, Gy);
  TORCH_CHECK(y.size(1) == B && y.size(2) == D, "x and y must have the same rows and features, got ", x.sizes(),
              " and ", y.sizes());
  TORCH_CHECK(Gx == Gy || Gx == 1 || Gy == 1, "group counts must match or be 1, got ", Gx, " and ", Gy);
  at::Tensor out = at::empty({G, B}, x.options());
  const float *xp = x.data_ptr<float>(), *yp = y.data_ptr<float>();
  float* op = out.data_ptr<float>();
  const VecOps& ops = vec_ops();
  at::parallel_for(0, G * B, grain(D), [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const int64_t g = r / B, i = r % B;
      op[r] = ops.dot(xp + ((Gx == 1 ? 0 : g) * B + i) * D, yp + ((Gy == 1 ? 0 : g) * B + i) * D, D);
    }
  });
  return out;
}

void add_weighted_rows(at::Tensor& out, const at::Tensor& w, const at::Tensor& other, bool accumulate, float keep) {
  check(out, "out", 3), check(w, "w", 2), check(other, "other", 3);
  const int64_t G = w.size(0), B = w.size(1), D = other.size(2), Go = other.size(0);
  TORCH_CHECK(other.size(1) == B && out.size(1) == B && out.size(2) == D, "w (G, B), other and out (., B, D) must "
              "agree, got ", w.sizes(), ", ", other.sizes(), " and ", out.sizes());
  TORCH_CHECK(Go == 1 || Go == G, "other must have 1 or ", G, " groups, got ", Go);
  const bool summed = out.size(0) == 1 && G > 1;  // a broadcast operand's gradient: each row sums the groups
  TORCH_CHECK(summed || out.size(0) == G, "out must have 1 or ", G, " groups, got ", out.size(0));
  const float *wp = w.data_ptr<float>(), *src = other.data_ptr<float>();
  float* dst = out.data_ptr<float>();
  const VecOps& ops = vec_ops();
  auto other_row = [&](int64_t g, int64_t i) { return src + ((Go == 1 ? 0 : g) * B + i) * D; };
  // The rescale of a row right before its first update, while the row is in L1: no pass of its own.
  auto rescale = [&](float* row) {
    if (accumulate && keep != 1.0f) ops.scale(row, D, keep);
  };
  if (summed) {
    // Groups in order for every row: the same sum whatever the thread count. Each thread's rows stay in cache while
    // it streams the groups' contiguous stretches of those rows past them.
    at::parallel_for(0, B, std::max<int64_t>(1, grain(D) / G), [&](int64_t begin, int64_t end) {
      for (int64_t g = 0; g < G; ++g)
        for (int64_t i = begin; i < end; ++i) {
          if (g == 0) rescale(dst + i * D);
          ops.axpy(dst + i * D, wp[g * B + i], other_row(g, i), D, accumulate || g > 0);
        }
    });
    return;
  }
  at::parallel_for(0, G * B, grain(D), [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      rescale(dst + r * D);
      ops.axpy(dst + r * D, wp[r], other_row(r / B, r % B), D, accumulate);
    }
  });
}

}  // namespace rmi_fast::cpu
