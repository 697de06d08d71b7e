// Launchers of the CUDA pair_reduce kernels (pair_stats.cu, pair_grads.cu). Plain C++: no CUDA or torch headers,
// so the host-side binding (bind.cpp) compiles with the C++ compiler against a CPU-only torch as well.
//
// Every kernel sees the problem from one side, the "own" operand, whose rows it owns and writes, while it sweeps the
// rows of the "other" operand. Score S[g, i, j] = scale · <own[g, i], other[g, j]>; the diagonal entry of own row i is
// other row i + diag_offset. Calling with (x, y, diag_offset) gives row quantities, with (y, x, -diag_offset) column
// quantities: one kernel per direction, no atomics, so every result is bitwise repeatable.
#pragma once

#include <cstdint>

namespace rmi_fast {
namespace cuda {

enum class DType : int { f32 = 0, bf16 = 1, f16 = 2 };

// The per-entry transform T(S) of the family, and with it what a row accumulates:
//   lse        T = S                      row log-sum-exp (row_lse, global_lse "none")
//   lse_clip   T = clamp(S, -clip, clip)  row log-sum-exp (global_lse "clip")
//   exp_m1     T = exp(S - 1)             row sum (row_sum, nwj)
//   softplus   T = softplus(S)            row sum (row_sum, jsd)
enum class Mode : int { lse = 0, lse_clip = 1, exp_m1 = 2, softplus = 3 };

enum class Diagonal : int { include = 0, exclude = 1, zero = 2 };

struct PairOperands {
  const void* own;        // (G_own, own_rows, dim), unit stride along dim
  const void* other;      // (G_other, other_rows, dim), unit stride along dim
  int64_t own_gstride;    // elements between groups; 0 when the operand is broadcast over the groups
  int64_t own_rstride;    // elements between rows
  int64_t other_gstride;
  int64_t other_rstride;
  int64_t groups;         // G = max(G_own, G_other)
  int64_t own_rows;
  int64_t other_rows;
  int64_t dim;            // D
  bool own_broadcast;     // own is one (own_rows, dim) matrix shared by all G > 1 groups
  bool vec;               // both operands allow 16-byte loads (aligned base, strides and dim multiples of 16 bytes)
  bool precise;           // fp32 inputs: 3xTF32 (about fp32 accuracy); false: one TF32 product (allow_tf32)
  DType dtype;
  const float* scale;     // device pointer to the fp32 scale (read by the kernel: no host synchronisation)
  float clip;
  Diagonal diagonal;
  int64_t diag_offset;
};

// One upstream term of the gradient: statistic and weight of a row, fp32, element (g, r) at g*gstride + r*rstride
// (rstride 0 for a per-group quantity such as the global log-sum-exp). weight == nullptr: the term is absent.
// stat may be nullptr for the row-sum modes (their gradient needs no statistic).
struct RowTerm {
  const float* stat;
  const float* weight;
  int64_t stat_gstride, stat_rstride;
  int64_t weight_gstride, weight_rstride;
};

// out (G, own_rows) fp32 contiguous: per own row, the log-sum-exp (lse modes) or the sum (exp_m1, softplus) of T
// over the other rows, diagonal handled. Returns nothing; throws std::runtime_error on a launch error.
void launch_row_stats(const PairOperands& p, Mode mode, float* out, void* stream);

// out (G,) = logsumexp over the rows of rows (G, n) contiguous fp32: the global log-sum-exp from row partials.
void launch_lse_merge(const float* rows, int64_t groups, int64_t n, float* out, void* stream);

// The gradient of  Σ w·Stat  for upstream weights w, written for the own operand:
//   G_ij = own_term(i)·dT(S_ij) + other_term(j)·dT(S_ij)     (0 on an excluded or zeroed diagonal)
// where a term (stat r, weight w) contributes w·exp(T − r)·T'(S) in the lse modes and w·T'(S) in the sum modes.
//   d_own[g, i, :] = scale · Σ_j G_ij · other[g, j, :]   (summed over g when own_broadcast), dtype of the inputs,
//                    contiguous (G_own, own_rows, dim); may be nullptr (then only dscale is computed)
//   dscale_partial[k], k < dscale_partial_count(p): partial sums of Σ_ij G_ij·<own_i, other_j>; their sum is
//                    dscale. May be nullptr.
void launch_row_grads(const PairOperands& p, Mode mode, const RowTerm& own_term, const RowTerm& other_term,
                      void* d_own, float* dscale_partial, void* stream);

// Number of fp32 partial sums launch_row_grads writes to dscale_partial (reads groups, own_rows, own_broadcast).
int64_t dscale_partial_count(const PairOperands& p);

}  // namespace cuda
}  // namespace rmi_fast
