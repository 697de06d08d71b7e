// The tiling every CPU kernel shares: score tiles of a block of rows × all columns, computed by a GEMM into a
// per-partition buffer, reduced and turned into a gradient tile in place, then pushed through two more GEMMs.
//
// Work split. Groups run one after another; inside a group the Bx rows are cut into blocks of R rows and the
// blocks into P contiguous *partitions*, one thread each (P = torch's thread count, at most the number of blocks, and
// fewer for small problems: about 2^20 multiply-adds per thread at least). Where the groups divide evenly among the
// threads, by_groups instead gives each thread whole groups, each chunk a sweep with P = 1.
// Per partition:
//   S     (R × By) fp32   the score tile, then the gradient tile G in place          (P·R·By floats)
//   dxraw (R × D)         G·y for the tile                                           (P·R·D)
//   xrow  (R × D)         x_block with per-row factors applied                       (P·R·D, only if dy wanted)
//   dy    (By × D)        Σ over the partition's blocks of Gᵀ·x_block                (P·By·D, only if dy wanted)
// plus scale·x (Bx × D, shared) and, where the tile GEMMs are the register-blocked ones of vec_ops.h, the current
// group's y packed into column panels (By × D, shared, rounded up to whole panels). The extra memory is
// O(P·(R + D)·By + Bx·D): nothing B×B is ever allocated.
//
// Determinism. Each partition visits its blocks in order and the partitions' dy and dscale partials are summed in
// partition order, so the result depends only on the shapes and the thread count, never on scheduling: every
// call is bitwise repeatable for a fixed torch.get_num_threads().
#pragma once

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/cat.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/from_blob.h>
#include <ATen/ops/mm.h>
#include <ATen/ops/ones_like.h>

#include <cmath>
#include <limits>
#include <string>
#include <vector>

#include "vec_ops.h"

namespace rmi_fast::cpu {

enum class Diagonal { include, exclude, zero };
enum class Transform { none, clip, exp_m1, softplus };

struct Options {
  Transform transform = Transform::none;
  float clip = 5.0f;
  Diagonal diagonal = Diagonal::include;
  int64_t diag_offset = 0;  // column of row 0's diagonal entry
  bool columns = false;     // row_lse: also the column log-sum-exps
};

// Largest row tile (see choose_block_rows in sweep.cpp): per-row scratch on the stack is sized by it.
constexpr int64_t kMaxBlockRows = 128;

struct Want {
  bool dx = false, dy = false, dscale = false;
  bool any() const { return dx || dy || dscale; }
};

// One call's inputs: x (Gx, Bx, D), y (Gy, By, D), fp32 and contiguous, Gx, Gy ∈ {1, G}; S = scale·x·yᵀ.
struct Problem {
  at::Tensor x, y;
  at::Tensor xs;  // scale·x: the score GEMM takes it, so no pass over the tile is spent on the scale
  int64_t G, Gx, Gy, Bx, By, D;
  float scale;
  Options opt;
  int64_t threads;          // the partitions' upper bound: torch's thread count, 1 for a chunk of by_groups
  at::Tensor dx_into, dy_into;  // where set, the sweep writes that gradient there instead of allocating it

  Problem(at::Tensor x_, at::Tensor y_, double scale_, Options opt_);
  // Groups [g0, g0 + n) as a problem of their own, for one thread; a broadcast operand stays whole.
  Problem groups(int64_t g0, int64_t n) const;
  at::Tensor x_group(int64_t g) const { return x[Gx == 1 ? 0 : g]; }
  at::Tensor xs_group(int64_t g) const { return xs[Gx == 1 ? 0 : g]; }
  at::Tensor y_group(int64_t g) const { return y[Gy == 1 ? 0 : g]; }
};

// The gradients of one call; dx/dy are undefined tensors where not wanted.
struct Grads {
  at::Tensor dx, dy;
  double dscale = 0.0;
};

// One partition's buffers (see the header comment).
struct Workspace {
  at::Tensor S, dxraw, dy;
  at::Tensor xrow;  // (R × D) x_block with its rows scaled, for backprop's row factors
  double dscale = 0.0;
};

class Sweep {
 public:
  Sweep(const Problem& pb, Want want);

  const Problem& problem() const { return pb_; }
  const VecOps& ops() const { return ops_; }
  int64_t partitions() const { return P_; }
  int64_t block_rows() const { return R_; }
  Workspace& workspace(int64_t p) { return ws_[p]; }

  // Runs body(p, i0, rows) for every row block of group g, partition p's blocks in order on one thread.
  template <class Body>
  void for_blocks(int64_t g, Body&& body) {
    pack_group(g);
    const int64_t nblocks = (pb_.Bx + R_ - 1) / R_;
    at::parallel_for(0, P_, 1, [&](int64_t begin, int64_t end) {
      for (int64_t p = begin; p < end; ++p) {
        for (int64_t b = p * nblocks / P_; b < (p + 1) * nblocks / P_; ++b) {
          const int64_t i0 = b * R_;
          body(p, i0, std::min(R_, pb_.Bx - i0));
        }
      }
    });
  }

  // One group of the plain three-pass gradient sweep: every row tile's scores S (rows × By) are turned into the
  // gradient tile in place by tile(i0, rows, S), which may also read statistics off them, then pushed through the
  // two GEMMs (backprop, emit_dx with factor 1); the partitions' dy partials are summed at the end.
  template <class Tile>
  void gradient_group(int64_t g, Tile&& tile) {
    for (int64_t p = 0; p < P_; ++p) begin_group(p);
    for_blocks(g, [&](int64_t p, int64_t i0, int64_t rows) {
      float* S = scores(p, g, i0, rows);
      tile(i0, rows, S);
      backprop(p, g, i0, rows);
      emit_dx(p, g, i0, rows, 1.0f);
    });
    end_group(g);
  }

  // Partition p's tile of rows [i0, i0 + rows) of group g (inside for_blocks(g, ...)): S = scale·x·yᵀ, clamped for
  // the "clip" transform, the diagonal patched (excluded → −inf, which every reduction and every gradient formula
  // maps to 0; zero → 0).
  // Returns the row-major tile, leading dimension By.
  float* scores(int64_t p, int64_t g, int64_t i0, int64_t rows);

  // Starts a group: clears partition p's dy partial (call inside for_blocks' partition, or before it).
  void begin_group(int64_t p);

  // With the gradient tile G = diag(f)·E, E in workspace(p).S and the row factors f (all 1 when null): when any
  // gradient is wanted, zeroes E on the diagonal (for exclude/zero), then
  //   dxraw = diag(f)·(E·y_g)  (when dx or dscale is wanted)   and   dy_p += Eᵀ·(diag(f)·x_block)  (when dy is),
  // so a per-row factor costs O(rows·D), not a pass over the tile. dxraw is written to `raw` (rows × D) when given,
  // else to workspace(p).dxraw.
  void backprop(int64_t p, int64_t g, int64_t i0, int64_t rows, const float* row_factor = nullptr,
                float* raw = nullptr);

  // Emits the tile's dx from dxraw (or from `raw`, rows × D, when given) multiplied by `factor`:
  //   dx[rows] (+)= scale·factor·raw,   dscale_p += factor·Σ <x_i, raw_i>.
  void emit_dx(int64_t p, int64_t g, int64_t i0, int64_t rows, float factor, const float* raw = nullptr);

  // Ends group g: dy[g] (+)= scale·Σ_p factor_p·dy_p in partition order (factors default to 1).
  void end_group(int64_t g, const std::vector<float>& factors = {});

  // The accumulated gradients (dscale summed in partition order).
  Grads finish();

 private:
  const Problem& pb_;
  Want want_;
  const VecOps& ops_;
  const GemmOps* gemm_;  // the register-blocked tile GEMMs, or null: at::mm
  at::Tensor ypack_;     // with gemm_: one group of y as gemm_->pack's panels
  int64_t packed_ = -1;  // the group of y in ypack_
  int64_t P_, R_;
  std::vector<Workspace> ws_;
  at::Tensor dx_, dy_;

  // Packs group g of y into ypack_ for the score GEMM, unless it is there already (always, when y is broadcast).
  void pack_group(int64_t g);
};

// An uninitialised fp32 tensor for the kernels' outputs and scratch. From 2 MiB on it is backed by transparent huge
// pages where Linux offers them on request (the usual "madvise" setting): a fresh allocation that size comes from
// mmap, and touching it first costs a page fault per 4 KiB, which at the paper's critic shape (a 64 MiB dy) took
// 17 of a fused call's 58 ms; with 2 MiB pages, 1/512 of the faults.
at::Tensor empty_f32(at::IntArrayRef sizes);

// Parses the string options of rmi_fast.ops.spec.PairSpec.
Options make_options(const std::string& transform, double clip, const std::string& diagonal, int64_t diag_offset,
                     bool columns);

// The running log-sum-exp of a stream of blocks: `sum` is relative to lse_ref(max). Merging is exact for any
// mix of finite, −inf (empty) and +inf maxima.
struct LseAcc {
  float max = -std::numeric_limits<float>::infinity();
  float sum = 0.0f;
  // Moves the reference to new_max (≥ max); returns the factor the old partial sums were multiplied by.
  float raise_to(float new_max);
  void merge(const LseAcc& other);
  float value() const { return lse_ref(max) + std::log(sum); }
};

// The three families (one file each). `stats` empty and any gradient wanted → fused: statistics and the
// gradients for unit upstream weights in one sweep. `stats` given → gradients for `weights`.
struct Result {
  std::vector<at::Tensor> stats;
  Grads grads;
};
Result row_lse(const Problem& pb, Want want, const std::vector<at::Tensor>& stats,
               const std::vector<at::Tensor>& weights);
Result global_lse(const Problem& pb, Want want, const std::vector<at::Tensor>& stats,
                  const std::vector<at::Tensor>& weights);
Result row_sum(const Problem& pb, Want want, const std::vector<at::Tensor>& stats,
               const std::vector<at::Tensor>& weights);
using Family = Result (*)(const Problem&, Want, const std::vector<at::Tensor>&, const std::vector<at::Tensor>&);

// Runs a family on pb, cutting the groups across threads where that balances: each thread then sweeps a contiguous
// chunk of whole groups alone (Problem::groups), instead of every thread taking part in every group. Small groups
// (the paper's critic: B = 128 per location) have too few row blocks to keep the threads busy and pay a parallel
// region per group and pass; chunks of groups pay one per call. Deterministic for a fixed thread count: the chunks
// are fixed and a broadcast operand's gradient sums the chunks' in chunk order.
Result by_groups(Family family, const Problem& pb, Want want, const std::vector<at::Tensor>& stats,
                 const std::vector<at::Tensor>& weights);

}  // namespace rmi_fast::cpu
