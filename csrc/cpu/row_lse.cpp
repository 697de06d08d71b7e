// row_lse: r_i = logsumexp_j S_ij and, with `columns`, c_j = logsumexp_i S_ij, S = scale·x·yᵀ; and their gradients.
#include <cmath>

#include "sweep.h"

namespace rmi_fast::cpu {
namespace {

// Partition-private running column log-sum-exps: sum_j is relative to lse_ref(max_j).
struct ColumnLse {
  std::vector<float> max, sum, next;
  explicit ColumnLse(int64_t n)
      : max(n, -std::numeric_limits<float>::infinity()), sum(n, 0.0f), next(n) {}

  // Folds the rows of one tile in: first the tile's column maxima, then one rescale of the running sums, then one
  // exp per entry (an online update per row would cost two).
  void update(const VecOps& ops, const float* S, int64_t rows, int64_t n) {
    next = max;
    for (int64_t k = 0; k < rows; ++k) ops.max_into(next.data(), S + k * n, n);
    ops.rescale(sum.data(), max.data(), next.data(), n);
    max.swap(next);
    for (int64_t k = 0; k < rows; ++k) ops.add_exp(sum.data(), S + k * n, max.data(), n);
  }
};

// Statistics only: r (and c). One GEMM-sized pass.
std::vector<at::Tensor> stats_sweep(const Problem& pb) {
  Sweep sw(pb, Want{});
  const auto f32 = pb.x.options();
  at::Tensor r = at::empty({pb.G, pb.Bx}, f32);
  at::Tensor c = pb.opt.columns ? at::empty({pb.G, pb.By}, f32) : at::Tensor();
  std::vector<ColumnLse> cols;
  if (pb.opt.columns) cols.assign(sw.partitions(), ColumnLse(pb.By));
  const VecOps& ops = sw.ops();
  for (int64_t g = 0; g < pb.G; ++g) {
    float* rg = r[g].data_ptr<float>();
    if (pb.opt.columns) for (auto& cl : cols) cl = ColumnLse(pb.By);
    sw.for_blocks(g, [&](int64_t p, int64_t i0, int64_t rows) {
      float* S = sw.scores(p, g, i0, rows);
      for (int64_t k = 0; k < rows; ++k) {
        float* row = S + k * pb.By;
        const float ref = lse_ref(ops.max(row, pb.By));
        rg[i0 + k] = ref + std::log(ops.exp_sum(row, pb.By, ref, false));
      }
      if (pb.opt.columns) cols[p].update(ops, S, rows, pb.By);
    });
    if (pb.opt.columns) {
      float* cg = c[g].data_ptr<float>();
      for (int64_t j = 0; j < pb.By; ++j) {
        LseAcc acc;
        for (const auto& cl : cols) acc.merge(LseAcc{cl.max[j], cl.sum[j]});  // partition order
        cg[j] = acc.value();
      }
    }
  }
  return pb.opt.columns ? std::vector<at::Tensor>{r, c} : std::vector<at::Tensor>{r};
}

// Gradients for upstream weights w (rows) and v (columns), statistics r and c given:
//   G_ij = w_i·exp(S_ij − r_i) + v_j·exp(S_ij − c_j).
// Three GEMM-sized passes: the score tile, G·y, Gᵀ·x.
Grads grads_sweep(const Problem& pb, Want want, const std::vector<at::Tensor>& stats,
                  const std::vector<at::Tensor>& weights) {
  Sweep sw(pb, want);
  const VecOps& ops = sw.ops();
  for (int64_t g = 0; g < pb.G; ++g) {
    const float* r = stats[0][g].data_ptr<float>();
    const float* w = weights[0][g].data_ptr<float>();
    const float* c = pb.opt.columns ? stats[1][g].data_ptr<float>() : nullptr;
    const float* v = pb.opt.columns ? weights[1][g].data_ptr<float>() : nullptr;
    sw.gradient_group(g, [&](int64_t i0, int64_t rows, float* S) {
      for (int64_t k = 0; k < rows; ++k) ops.softmax_grad(S + k * pb.By, pb.By, r[i0 + k], w[i0 + k], c, v);
    });
  }
  return sw.finish();
}

// Fused statistics and unit-weight gradients (rows only).
//
// Derivation. r_i = log Σ_j exp S_ij, so ∂(Σ_i r_i)/∂S_ij = exp(S_ij − r_i) = P_ij, the row softmax. With
// m_i = max_j S_ij and e_ij = exp(S_ij − m_i) ∈ [0, 1]:  r_i = m_i + log Σ_j e_ij  and  P_ij = e_ij / Σ_j e_ij,
// so a single exp per entry yields the statistic and the gradient tile, which is final as soon as its own row is
// reduced (a whole row lies in the tile). Then dx_i = scale·Σ_j P_ij y_j (the tile times y) and
// dy_j = scale·Σ_i P_ij x_i (accumulated over the tiles), dscale = Σ_ij P_ij <x_i, y_j>. Three GEMM-sized passes
// instead of four (forward + recomputing backward), and no B×B buffer: only the R × By tile per thread. The row
// normalisation 1/Σ_j e_ij is applied to the R × D operands (y-products and x rows), not to the R × By tile.
std::pair<at::Tensor, Grads> fused_sweep(const Problem& pb, Want want) {
  Sweep sw(pb, want);
  const VecOps& ops = sw.ops();
  at::Tensor r = at::empty({pb.G, pb.Bx}, pb.x.options());
  for (int64_t g = 0; g < pb.G; ++g) {
    float* rg = r[g].data_ptr<float>();
    for (int64_t p = 0; p < sw.partitions(); ++p) sw.begin_group(p);
    sw.for_blocks(g, [&](int64_t p, int64_t i0, int64_t rows) {
      float* S = sw.scores(p, g, i0, rows);
      float inv_sum[kMaxBlockRows];
      for (int64_t k = 0; k < rows; ++k) {
        float* row = S + k * pb.By;
        const float ref = lse_ref(ops.max(row, pb.By));
        const float sum = ops.exp_sum(row, pb.By, ref, true);  // row ← e
        rg[i0 + k] = ref + std::log(sum);
        inv_sum[k] = 1.0f / sum;
      }
      sw.backprop(p, g, i0, rows, inv_sum);  // P = diag(1/Σe)·e, applied to the O(rows·D) GEMM operands
      sw.emit_dx(p, g, i0, rows, 1.0f);
    });
    sw.end_group(g);
  }
  return {r, sw.finish()};
}

}  // namespace

Result row_lse(const Problem& pb, Want want, const std::vector<at::Tensor>& stats,
               const std::vector<at::Tensor>& weights) {
  if (!stats.empty()) return {stats, grads_sweep(pb, want, stats, weights)};
  if (!want.any()) return {stats_sweep(pb), Grads{}};
  if (!pb.opt.columns) {
    auto [r, grads] = fused_sweep(pb, want);
    return {{r}, grads};
  }
  // Columns: a column's normaliser needs every row, so the gradient tiles cannot be final within one sweep of
  // row tiles: statistics first, then the three-pass gradient sweep (four GEMM-sized passes in all).
  auto st = stats_sweep(pb);
  std::vector<at::Tensor> ones{at::ones_like(st[0]), at::ones_like(st[1])};
  return {st, grads_sweep(pb, want, st, ones)};
}

}  // namespace rmi_fast::cpu
