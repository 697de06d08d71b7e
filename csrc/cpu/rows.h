// The bounds' positive part on the CPU: the paired dots <x_i, y_i> and their gradients, row by row.
//
// At the paper's critic shape (64 locations × B = 128 × D = 2048, one side broadcast over the locations) these are
// passes over a 64 MiB operand that BLAS serves as 128 matrix-vector products with a 1 MiB row stride, at a fifth of
// the memory bandwidth; here every row is one contiguous dot or axpy, the rows split across threads.
#pragma once

#include <ATen/core/Tensor.h>

namespace rmi_fast::cpu {

// (G, B): <x[gx, i], y[gy, i]> for x (Gx, B, D), y (Gy, B, D), fp32 and contiguous, Gx, Gy ∈ {1, G}.
at::Tensor row_dots(const at::Tensor& x, const at::Tensor& y);

// out[go, i] ← keep·out[go, i] + Σ w[g, i]·other[g', i] (with `accumulate`; else out is overwritten, unread), the
// sum over the groups g that map to go: all of them where out is (1, B, D) and w has G > 1 rows (a broadcast
// operand's gradient), else go = g. w (G, B); other (Go', B, D) with Go' ∈ {1, G}; every tensor fp32 and
// contiguous. One pass over out, its rescale included.
void add_weighted_rows(at::Tensor& out, const at::Tensor& w, const at::Tensor& other, bool accumulate, float keep);

}  // namespace rmi_fast::cpu
