// row_sum: r_i = Σ_j T(S_ij) with T = exp(S − 1) ("exp_m1", NWJ) or softplus(S) ("softplus", JSD); and gradients.
#include "sweep.h"

namespace rmi_fast::cpu {

// Derivation. The statistic is elementwise in S, so ∂(Σ_i w_i r_i)/∂S_ij = w_i·T'(S_ij) is known the moment S_ij is:
// T' = T for exp_m1 and T' = sigmoid for softplus. One pass over each score tile produces both the row sums and
// the gradient tile (w_i = 1 when fused), which two more GEMMs turn into dx = scale·G·y and dy = scale·Gᵀ·x;
// dscale = Σ_ij G_ij <x_i, y_j>. Statistics alone take one GEMM-sized pass, any gradient three.
Result row_sum(const Problem& pb, Want want, const std::vector<at::Tensor>& stats,
               const std::vector<at::Tensor>& weights) {
  Sweep sw(pb, want);
  const VecOps& ops = sw.ops();
  const bool have_stats = !stats.empty();
  at::Tensor r = have_stats ? stats[0] : at::empty({pb.G, pb.Bx}, pb.x.options());
  const bool softplus = pb.opt.transform == Transform::softplus;
  for (int64_t g = 0; g < pb.G; ++g) {
    float* rg = have_stats ? nullptr : r[g].data_ptr<float>();
    const float* w = weights.empty() ? nullptr : weights[0][g].data_ptr<float>();
    sw.gradient_group(g, [&](int64_t i0, int64_t rows, float* S) {  // the statistic alone when no gradient is wanted
      for (int64_t k = 0; k < rows; ++k) {
        const float wi = w ? w[i0 + k] : 1.0f;
        float* row = S + k * pb.By;
        const float sum = softplus ? ops.softplus(row, pb.By, wi, want.any()) : ops.exp_m1(row, pb.By, wi, want.any());
        if (rg) rg[i0 + k] = sum;
      }
    });
  }
  return {{r}, sw.finish()};
}

}  // namespace rmi_fast::cpu
