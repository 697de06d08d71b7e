// Closed-form gradients of the negative part (rmi_fast/ops/spec.py) on the GPU: d_own = scale·G·other and
// dscale = Σ G∘<own, other>, with G recomputed tile by tile from the scores and the saved O(B) statistics and
// multiplied into the other operand straight from registers: no B×B matrix, no atomics.
#include "pair_common.cuh"

namespace rmi_fast {
namespace cuda {
namespace detail {

// dacc (this warp's 16 own rows × kDV columns of d_own) += G (16 × kBN, in accumulator layout) · sC (kBN × kDV).
//
// The score accumulator is re-used as the A operand without going through memory. Its entry (row, column) lies at
// lane (gid, tig) as c[0..3] = (gid, 2tig), (gid, 2tig+1), (gid+8, 2tig), (gid+8, 2tig+1) of each 8-column tile.
//   bf16:   the A fragment of m16n8k16 holds (gid, k = 2tig..2tig+1), (gid+8, same), (gid, 8+2tig..), (gid+8, 8+..),
//           i.e. exactly tiles 2p (k < 8) and 2p + 1 (k ≥ 8) of the accumulator, rounded to bf16.
//   fp32, fp16 (TF32): the A fragment of m16n8k8 holds (gid, k = tig), (gid+8, tig), (gid, tig+4), (gid+8, tig+4).
//           Any permutation of k is fine if B follows it: k-slot tig ↔ column 2tig, k-slot tig + 4 ↔ column 2tig + 1,
//           so a = (c[0], c[2], c[1], c[3]) and B's k-slots tig, tig + 4 read rows 2tig, 2tig + 1 of the chunk.
template <typename T>
__device__ __forceinline__ void mma_grad_chunk(float (&dacc)[kND][4], const float (&gm)[kNT][4],
                                               grad_operand_t<T> (*sC)[chunk_ld<grad_operand_t<T>>()],
                                               bool precise) {
  const int gid = lane_gid(), tig = lane_tig();
  if constexpr (std::is_same_v<grad_operand_t<T>, float>) {
    precise = precise && std::is_same_v<T, float>;  // fp16 operands are exact in one TF32 product
#pragma unroll
    for (int nt = 0; nt < kNT; ++nt) {
      uint32_t a_hi[4], a_lo[4];
      split_tf32(gm[nt][0], a_hi[0], a_lo[0]);
      split_tf32(gm[nt][2], a_hi[1], a_lo[1]);
      split_tf32(gm[nt][1], a_hi[2], a_lo[2]);
      split_tf32(gm[nt][3], a_hi[3], a_lo[3]);
#pragma unroll
      for (int nd = 0; nd < kND; ++nd) {
        uint32_t b_hi[2], b_lo[2];
        split_tf32(sC[nt * 8 + 2 * tig][nd * 8 + gid], b_hi[0], b_lo[0]);
        split_tf32(sC[nt * 8 + 2 * tig + 1][nd * 8 + gid], b_hi[1], b_lo[1]);
        mma_f32(dacc[nd], a_hi, a_lo, b_hi, b_lo, precise);
      }
    }
  } else {
    using B16 = __nv_bfloat16;
    static_assert(kNT % 2 == 0, "k steps of 16 take two accumulator tiles");
#pragma unroll
    for (int kp = 0; kp < kNT / 2; ++kp) {
      uint32_t a[4];
      a[0] = pack2(from_float<B16>(gm[2 * kp][0]), from_float<B16>(gm[2 * kp][1]));
      a[1] = pack2(from_float<B16>(gm[2 * kp][2]), from_float<B16>(gm[2 * kp][3]));
      a[2] = pack2(from_float<B16>(gm[2 * kp + 1][0]), from_float<B16>(gm[2 * kp + 1][1]));
      a[3] = pack2(from_float<B16>(gm[2 * kp + 1][2]), from_float<B16>(gm[2 * kp + 1][3]));
      const int j = 16 * kp + 2 * tig;  // B rows (k) 2tig, 2tig + 1 and 2tig + 8, 2tig + 9 of this k step
#pragma unroll
      for (int nd = 0; nd < kND; ++nd) {
        const int d = nd * 8 + gid;  // B column n = gid
        uint32_t b[2];
        b[0] = pack2(sC[j][d], sC[j + 1][d]);
        b[1] = pack2(sC[j + 8][d], sC[j + 9][d]);
        mma16<B16>(dacc[nd], a, b);
      }
    }
  }
}

// Per-row value of an upstream term (statistic or weight) at element (g, r); 0 where absent.
__device__ __forceinline__ float term_value(const float* v, int64_t gstride, int64_t rstride, int64_t g, int64_t r) {
  return v == nullptr ? 0.f : v[g * gstride + r * rstride];
}

// Gradients for the own operand, one direction.
//
//   G_ij = Σ_terms w·∂T-term/∂S_ij   (term_grad: w·exp(T − r)·T' for the lse modes, w·T' for the sums),
//          0 where j = i + diag_offset is excluded or zeroed (a zeroed score no longer depends on x or y)
//   d_own[g, i, :] = scale · Σ_j G_ij · other[g, j, :],      dscale = Σ_ij G_ij · <own_i, other_j>
//
// Since Stat = logsumexp_j T_ij gives ∂Stat/∂S_ij = exp(T_ij − Stat)·T'(S_ij) and Stat = Σ_j T_ij gives T'(S_ij),
// G needs only the O(B) statistics saved by the forward. The block owns kBM own rows and kDV columns of d_own
// (grid.y splits D); per tile of kBN other rows it recomputes the scores (full D), turns them into G in registers,
// loads the other rows' kDV columns and accumulates G · other on the tensor cores. A broadcast own operand sums its
// gradient over the groups inside the block (fixed order, no atomics). dscale comes from the grid.y == 0 blocks as
// one partial per block.
template <typename T, Mode M>
__global__ void __launch_bounds__(kThreads) row_grads_kernel(PairOperands p, RowTerm own_term, RowTerm other_term,
                                                             T* __restrict__ d_own, float* __restrict__ dscale_partial) {
  using GOp = grad_operand_t<T>;
  constexpr int LDC = chunk_ld<GOp>();
  constexpr int kSmem = stage_bytes<T>() > chunk_bytes<T>() ? stage_bytes<T>() : chunk_bytes<T>();
  __shared__ alignas(16) unsigned char smem[kSmem];  // score stages, then the chunk of other (never both at once)
  __shared__ float warp_part[kWarps];
  GOp (*sC)[LDC] = reinterpret_cast<GOp (*)[LDC]>(smem);

  const int64_t i0 = int64_t(blockIdx.x) * kBM;
  const int64_t d0 = int64_t(blockIdx.y) * kDV;
  const bool want_d = d_own != nullptr;
  const bool want_ds = dscale_partial != nullptr && blockIdx.y == 0;
  const int64_t g_begin = p.own_broadcast ? 0 : int64_t(blockIdx.z);
  const int64_t g_end = p.own_broadcast ? p.groups : g_begin + 1;
  const bool has_own = own_term.weight != nullptr;
  const bool has_other = other_term.weight != nullptr;
  const float scale = *p.scale;

  float dacc[kND][4];
#pragma unroll
  for (int nd = 0; nd < kND; ++nd)
#pragma unroll
    for (int e = 0; e < 4; ++e) dacc[nd][e] = 0.f;
  float ds = 0.f;
  float acc[kNT][4];

  for (int64_t g = g_begin; g < g_end; ++g) {
    const Operands<T> op{static_cast<const T*>(p.own) + g * p.own_gstride,
                         static_cast<const T*>(p.other) + g * p.other_gstride,
                         p.own_rstride, p.other_rstride, p.own_rows, p.other_rows, p.dim, p.vec, p.precise};
    // Own-row term of this lane's rows gid (h = 0) and gid + 8 (h = 1).
    float own_r[2] = {0.f, 0.f}, own_w[2] = {0.f, 0.f};
    if (has_own) {
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        const int64_t i = i0 + entry_row(2 * h);
        if (i < p.own_rows) {
          own_r[h] = term_value(own_term.stat, own_term.stat_gstride, own_term.stat_rstride, g, i);
          own_w[h] = term_value(own_term.weight, own_term.weight_gstride, own_term.weight_rstride, g, i);
        }
      }
    }

    for (int64_t j0 = 0; j0 < p.other_rows; j0 += kBN) {
      score_tile<T>(acc, smem, op, i0, j0);

#pragma unroll
      for (int nt = 0; nt < kNT; ++nt) {
        // Other-row term of this lane's columns 2tig (c = 0) and 2tig + 1 (c = 1) of tile nt.
        float oth_r[2] = {0.f, 0.f}, oth_w[2] = {0.f, 0.f};
        if (has_other) {
#pragma unroll
          for (int c = 0; c < 2; ++c) {
            const int64_t j = j0 + nt * 8 + entry_col(c);
            if (j < p.other_rows) {
              oth_r[c] = term_value(other_term.stat, other_term.stat_gstride, other_term.stat_rstride, g, j);
              oth_w[c] = term_value(other_term.weight, other_term.weight_gstride, other_term.weight_rstride, g, j);
            }
          }
        }
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          const int64_t i = i0 + entry_row(e);
          const int64_t j = j0 + nt * 8 + entry_col(e);
          const bool diag = j == i + p.diag_offset;
          const float raw = acc[nt][e];
          const float s = scale * raw;
          float gv = 0.f;
          if (i < p.own_rows && j < p.other_rows && !(diag && p.diagonal != Diagonal::include)) {
            if (has_own) gv += term_grad<M>(s, p.clip, own_r[e >> 1], own_w[e >> 1]);
            if (has_other) gv += term_grad<M>(s, p.clip, oth_r[e & 1], oth_w[e & 1]);
          }
          ds += gv * raw;
          acc[nt][e] = gv;  // the accumulator now holds G
        }
      }

      if (want_d) {
        __syncthreads();  // every warp is done reading the score stages that share smem with the chunk
        load_tile<kBN, kDV, LDC>(sC, op.other, op.other_rstride, j0, op.other_rows, d0, op.dim, op.vec);
        __syncthreads();
        mma_grad_chunk<T>(dacc, acc, sC, p.precise);
      }
    }
  }

  if (want_d) {
    const int64_t g_out = p.own_broadcast ? 0 : int64_t(blockIdx.z);
#pragma unroll
    for (int nd = 0; nd < kND; ++nd)
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int64_t i = i0 + entry_row(e);
        const int64_t d = d0 + nd * 8 + entry_col(e);
        if (i < p.own_rows && d < p.dim) d_own[(g_out * p.own_rows + i) * p.dim + d] = from_float<T>(scale * dacc[nd][e]);
      }
  }

  if (want_ds) {  // block-uniform
#pragma unroll
    for (int mask = 16; mask >= 1; mask >>= 1) ds += __shfl_xor_sync(0xffffffffu, ds, mask);
    if ((threadIdx.x & 31) == 0) warp_part[warp_id()] = ds;
    __syncthreads();
    if (threadIdx.x == 0) {
      float total = 0.f;
      for (int w = 0; w < kWarps; ++w) total += warp_part[w];
      dscale_partial[int64_t(blockIdx.z) * gridDim.x + blockIdx.x] = total;
    }
  }
}

}  // namespace detail

int64_t dscale_partial_count(const PairOperands& p) {
  return (p.own_broadcast ? 1 : p.groups) * detail::ceil_div(p.own_rows, detail::kBM);
}

void launch_row_grads(const PairOperands& p, Mode mode, const RowTerm& own_term, const RowTerm& other_term,
                      void* d_own, float* dscale_partial, void* stream) {
  using namespace detail;
  if (d_own == nullptr && dscale_partial == nullptr) return;
  const bool lse = mode == Mode::lse || mode == Mode::lse_clip;
  if (lse && ((own_term.weight && !own_term.stat) || (other_term.weight && !other_term.stat)))
    throw std::invalid_argument("rmi_fast CUDA row_grads: a log-sum-exp term needs its statistic");
  const dim3 grid = checked_grid(ceil_div(p.own_rows, kBM), d_own ? ceil_div(p.dim, kDV) : 1,
                                 p.own_broadcast ? 1 : p.groups);
  const auto s = static_cast<cudaStream_t>(stream);
  dispatch(p.dtype, mode, [&](auto type, auto mode_tag) {
    using T = typename decltype(type)::type;
    row_grads_kernel<T, decltype(mode_tag)::value>
        <<<grid, kThreads, 0, s>>>(p, own_term, other_term, static_cast<T*>(d_own), dscale_partial);
  });
  check_launch("row_grads");
}

}  // namespace cuda
}  // namespace rmi_fast
