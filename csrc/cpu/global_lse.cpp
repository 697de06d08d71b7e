// global_lse: L = logsumexp_{i,j} T_ij per group, T = S ("none", DV/MINE) or clamp(S, ±c) ("clip", SMILE);
// and its gradient G_ij = w·exp(T_ij − L)·T'(S_ij), T' = 1 or [|S_ij| < c].
#include <cmath>

#include "sweep.h"

namespace rmi_fast::cpu {
namespace {

// Folds one tile into a partition's running log-sum-exp; with `store`, leaves E_ij = exp(T_ij − ref) in the tile
// (ref = the partition's reference after the tile) for the "none" transform. Returns the factor that the partial
// sums kept relative to the old reference must be multiplied by.
float accumulate_tile(const VecOps& ops, LseAcc& acc, float* S, int64_t rows, int64_t n, bool store) {
  float tile_max = -std::numeric_limits<float>::infinity();
  for (int64_t k = 0; k < rows; ++k) {
    const float m = ops.max(S + k * n, n);
    tile_max = m > tile_max ? m : tile_max;
  }
  const float f = acc.raise_to(tile_max);
  const float ref = lse_ref(acc.max);
  for (int64_t k = 0; k < rows; ++k) acc.sum += ops.exp_sum(S + k * n, n, ref, store);
  return f;
}

std::vector<float> partition_factors(const std::vector<LseAcc>& accs, float L) {
  std::vector<float> f;
  for (const auto& a : accs) f.push_back(a.sum == 0.0f ? 0.0f : std::exp(lse_ref(a.max) - L));
  return f;
}

float merged(const std::vector<LseAcc>& accs) {
  LseAcc all;
  for (const auto& a : accs) all.merge(a);  // partition order
  return all.value();
}

at::Tensor stats_sweep(const Problem& pb) {
  Sweep sw(pb, Want{});
  at::Tensor L = at::empty({pb.G}, pb.x.options());
  for (int64_t g = 0; g < pb.G; ++g) {
    std::vector<LseAcc> accs(sw.partitions());
    sw.for_blocks(g, [&](int64_t p, int64_t i0, int64_t rows) {
      accumulate_tile(sw.ops(), accs[p], sw.scores(p, g, i0, rows), rows, pb.By, false);
    });
    L[g] = merged(accs);
  }
  return L;
}

// Gradients for the upstream weight w of each group's L (given): three GEMM-sized passes.
Grads grads_sweep(const Problem& pb, Want want, const at::Tensor& L, const at::Tensor& w) {
  Sweep sw(pb, want);
  const VecOps& ops = sw.ops();
  const bool clip = pb.opt.transform == Transform::clip;
  for (int64_t g = 0; g < pb.G; ++g) {
    const float Lg = L[g].item<float>(), wg = w[g].item<float>();
    sw.gradient_group(g, [&](int64_t, int64_t rows, float* S) {
      for (int64_t k = 0; k < rows; ++k) {
        float* row = S + k * pb.By;
        if (clip) ops.clipped_softmax_grad(row, pb.By, Lg, wg, pb.opt.clip);
        else ops.softmax_grad(row, pb.By, Lg, wg, nullptr, nullptr);
      }
    });
  }
  return sw.finish();
}

// Fused statistic and unit-weight gradient.
//
// Derivation. G_ij = exp(T_ij − L)·T'_ij needs the group's L, known only after every tile. Each partition p
// keeps a running maximum with reference ρ_p and computes its tiles' E_ij = exp(T_ij − ρ_p)·T'_ij instead. Since
// exp(T − L) = E·exp(ρ − L), the gradients follow by rescaling O(B·D) partials once L is known:
//   dx_i  = scale·exp(ρ_b − L)·(E·y)_i          ρ_b: the reference when tile b was computed (kept per tile),
//   dy    = scale·Σ_p exp(ρ_p − L)·dy_p,        dy_p = Σ_b Eᵀ·x_b, multiplied by exp(ρ_old − ρ_new) whenever ρ_p rises,
//   dscale = Σ_b exp(ρ_b − L)·Σ_i <x_i, (E·y)_i>.
// Every E ≤ 1 and every factor ≤ 1, so nothing overflows; what underflows is below fp32 resolution of the result.
// Three GEMM-sized passes, plus an O(Bx·D) buffer for the unscaled E·y.
std::pair<at::Tensor, Grads> fused_sweep(const Problem& pb, Want want) {
  Sweep sw(pb, want);
  const VecOps& ops = sw.ops();
  const bool clip = pb.opt.transform == Transform::clip;
  const bool need_dxraw = want.dx || want.dscale;
  at::Tensor L = at::empty({pb.G}, pb.x.options());
  at::Tensor raw = need_dxraw ? empty_f32({pb.Bx, pb.D}) : at::Tensor();
  const int64_t R = sw.block_rows();
  std::vector<float> tile_max((pb.Bx + R - 1) / R);  // each tile's reference, as its partition's running max
  for (int64_t g = 0; g < pb.G; ++g) {
    std::vector<LseAcc> accs(sw.partitions());
    for (int64_t p = 0; p < sw.partitions(); ++p) sw.begin_group(p);
    sw.for_blocks(g, [&](int64_t p, int64_t i0, int64_t rows) {
      float* S = sw.scores(p, g, i0, rows);
      // Under an empty (−inf) reference every E so far was 0, so the dy partial is still all zeros.
      const bool empty = accs[p].max == -std::numeric_limits<float>::infinity();
      // The clipped transform needs T itself for its indicator, so its E comes from a second pass.
      const float f = accumulate_tile(ops, accs[p], S, rows, pb.By, !clip);
      const float ref = lse_ref(accs[p].max);
      if (clip)
        for (int64_t k = 0; k < rows; ++k) ops.clipped_softmax_grad(S + k * pb.By, pb.By, ref, 1.0f, pb.opt.clip);
      Workspace& w = sw.workspace(p);
      // The partial moves to the new reference. f underflows to 0 when it rose by more than about 104: the partial
      // is then below fp32 resolution of the result and must be zeroed, not kept.
      if (want.dy && f != 1.0f && !empty) ops.scale(w.dy.data_ptr<float>(), pb.By * pb.D, f);
      sw.backprop(p, g, i0, rows, nullptr, need_dxraw ? raw.data_ptr<float>() + i0 * pb.D : nullptr);
      if (need_dxraw) tile_max[i0 / R] = accs[p].max;
    });
    const float Lg = merged(accs);
    L[g] = Lg;
    if (need_dxraw) {
      sw.for_blocks(g, [&](int64_t p, int64_t i0, int64_t rows) {
        const float m = tile_max[i0 / R];  // −inf: the tile held nothing, its E·y is 0
        const float f = m == -std::numeric_limits<float>::infinity() ? 0.0f : std::exp(lse_ref(m) - Lg);
        sw.emit_dx(p, g, i0, rows, f, raw.data_ptr<float>() + i0 * pb.D);
      });
    }
    sw.end_group(g, partition_factors(accs, Lg));
  }
  return {L, sw.finish()};
}

}  // namespace

Result global_lse(const Problem& pb, Want want, const std::vector<at::Tensor>& stats,
                  const std::vector<at::Tensor>& weights) {
  if (!stats.empty()) return {stats, grads_sweep(pb, want, stats[0], weights[0])};
  if (!want.any()) return {{stats_sweep(pb)}, Grads{}};
  auto [L, grads] = fused_sweep(pb, want);
  return {{L}, grads};
}

}  // namespace rmi_fast::cpu
