// Statistics of the negative part (rmi_fast/ops/spec.py) on the GPU: per-row log-sum-exps and sums of T(S) over a
// score matrix that is recomputed tile by tile on the tensor cores and never stored, and the per-group merge of row
// log-sum-exps into the global one.
#include "pair_common.cuh"

namespace rmi_fast {
namespace cuda {
namespace detail {

// Row statistics, one direction.
//
//   out[g, i] = logsumexp_j T(S_ij)   (lse modes)      or      Σ_j T(S_ij)   (sum modes)
//   S_ij = scale · <own[g, i], other[g, j]>,  j over the other rows; the diagonal entry j = i + diag_offset is
//   dropped (exclude: −inf inside the log-sum-exp, 0 inside the sum) or has S = 0 (zero).
//
// Derivation of the streaming form: the block owns kBM rows and walks the other rows in tiles of kBN. Each lane
// holds, for its two rows (gid, gid + 8), a running pair (m, s) over the columns it sees (two per 8-column tile),
//   m' = max(m, max_tile T),   s' = s·exp(m − m') + Σ_tile exp(T − m'),
// which keeps logsumexp = m + log s exact for any |S| (every exponent is ≤ 0). The four lanes of a quad see
// disjoint columns of the same rows; their pairs merge at the end with the same rule. Sums just add. Per block the
// cost is one kBM × other_rows × D product; memory traffic is the operands only.
template <typename T, Mode M>
__global__ void __launch_bounds__(kThreads) row_stats_kernel(PairOperands p, float* __restrict__ out) {
  __shared__ alignas(16) unsigned char smem[stage_bytes<T>()];
  const int64_t g = blockIdx.y;
  const int64_t i0 = int64_t(blockIdx.x) * kBM;
  const Operands<T> op{static_cast<const T*>(p.own) + g * p.own_gstride,
                       static_cast<const T*>(p.other) + g * p.other_gstride,
                       p.own_rstride, p.other_rstride, p.own_rows, p.other_rows, p.dim, p.vec, p.precise};
  const float scale = *p.scale;

  OnlineLse lse[2];          // rows gid, gid + 8 (lse modes)
  float sum[2] = {0.f, 0.f};  // rows gid, gid + 8 (sum modes)
  float acc[kNT][4];
  for (int64_t j0 = 0; j0 < p.other_rows; j0 += kBN) {
    score_tile<T>(acc, smem, op, i0, j0);

    // T of every entry, with the reduction's identity where the entry does not count.
    float v[kNT][4];
#pragma unroll
    for (int nt = 0; nt < kNT; ++nt)
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int64_t i = i0 + entry_row(e);
        const int64_t j = j0 + nt * 8 + entry_col(e);
        const bool diag = j == i + p.diag_offset;
        const float s = (diag && p.diagonal == Diagonal::zero) ? 0.f : scale * acc[nt][e];
        const bool counts = j < p.other_rows && !(diag && p.diagonal == Diagonal::exclude);
        v[nt][e] = counts ? transform<M>(s, p.clip) : (is_lse<M>() ? kNegInf : 0.f);
      }

#pragma unroll
    for (int h = 0; h < 2; ++h) {  // entries 2h, 2h + 1 belong to row gid + 8h
      if constexpr (is_lse<M>()) {
        float tile_max = kNegInf;
#pragma unroll
        for (int nt = 0; nt < kNT; ++nt) tile_max = fmaxf(tile_max, fmaxf(v[nt][2 * h], v[nt][2 * h + 1]));
        const float m_new = fmaxf(lse[h].m, tile_max);
        const float ref = OnlineLse::ref(m_new);
        float tile_sum = 0.f;
#pragma unroll
        for (int nt = 0; nt < kNT; ++nt) tile_sum += __expf(v[nt][2 * h] - ref) + __expf(v[nt][2 * h + 1] - ref);
        lse[h].s = lse[h].s * OnlineLse::shift(lse[h].m, m_new) + tile_sum;
        lse[h].m = m_new;
      } else {
        float tile_sum = 0.f;  // summed per tile first: shorter fp32 accumulation chains
#pragma unroll
        for (int nt = 0; nt < kNT; ++nt) tile_sum += v[nt][2 * h] + v[nt][2 * h + 1];
        sum[h] += tile_sum;
      }
    }
  }

  // Merge the four lanes of the quad (lanes 4·gid .. 4·gid + 3 hold the same rows).
#pragma unroll
  for (int h = 0; h < 2; ++h)
#pragma unroll
    for (int mask = 1; mask <= 2; mask <<= 1) {
      if constexpr (is_lse<M>()) {
        const float m2 = __shfl_xor_sync(0xffffffffu, lse[h].m, mask);
        const float s2 = __shfl_xor_sync(0xffffffffu, lse[h].s, mask);
        lse[h].merge(m2, s2);
      } else {
        sum[h] += __shfl_xor_sync(0xffffffffu, sum[h], mask);
      }
    }
  if (lane_tig() == 0) {
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      const int64_t i = i0 + entry_row(2 * h);
      if (i < p.own_rows) out[g * p.own_rows + i] = is_lse<M>() ? lse[h].value() : sum[h];
    }
  }
}

constexpr int kMergeThreads = 256;

// out[g] = logsumexp_i rows[g, i]: the global log-sum-exp of a group from its row log-sum-exps
// (logsumexp over all (i, j) = logsumexp_i logsumexp_j). One block per group, fixed reduction order.
__global__ void __launch_bounds__(kMergeThreads) lse_merge_kernel(const float* __restrict__ rows, int64_t n,
                                                                   float* __restrict__ out) {
  __shared__ float warp_m[kMergeThreads / 32], warp_s[kMergeThreads / 32];
  const float* r = rows + int64_t(blockIdx.x) * n;
  OnlineLse acc;
  for (int64_t i = threadIdx.x; i < n; i += kMergeThreads) acc.merge(r[i], 1.f);  // the pair (r_i, 1)
#pragma unroll
  for (int mask = 16; mask >= 1; mask >>= 1) {
    const float m2 = __shfl_xor_sync(0xffffffffu, acc.m, mask);
    const float s2 = __shfl_xor_sync(0xffffffffu, acc.s, mask);
    acc.merge(m2, s2);
  }
  if ((threadIdx.x & 31) == 0) {
    warp_m[threadIdx.x >> 5] = acc.m;
    warp_s[threadIdx.x >> 5] = acc.s;
  }
  __syncthreads();
  if (threadIdx.x == 0) {
    OnlineLse total;
    for (int w = 0; w < kMergeThreads / 32; ++w) total.merge(warp_m[w], warp_s[w]);
    out[blockIdx.x] = total.value();
  }
}

}  // namespace detail

void launch_row_stats(const PairOperands& p, Mode mode, float* out, void* stream) {
  using namespace detail;
  const dim3 grid = checked_grid(ceil_div(p.own_rows, kBM), p.groups, 1);
  const auto s = static_cast<cudaStream_t>(stream);
  dispatch(p.dtype, mode, [&](auto type, auto mode_tag) {
    using T = typename decltype(type)::type;
    row_stats_kernel<T, decltype(mode_tag)::value><<<grid, kThreads, 0, s>>>(p, out);
  });
  check_launch("row_stats");
}

void launch_lse_merge(const float* rows, int64_t groups, int64_t n, float* out, void* stream) {
  using namespace detail;
  const dim3 grid = checked_grid(groups, 1, 1);
  lse_merge_kernel<<<grid, kMergeThreads, 0, static_cast<cudaStream_t>(stream)>>>(rows, n, out);
  check_launch("lse_merge");
}

}  // namespace cuda
}  // namespace rmi_fast
