// The shared tiling of the CPU kernels (see sweep.h): score tiles, gradient GEMMs, per-partition partials.
#include "sweep.h"

#include <algorithm>
#include <cmath>
#include <cstdlib>

#if defined(__linux__)
#include <sys/mman.h>
#endif

namespace rmi_fast::cpu {

Problem::Problem(at::Tensor x_, at::Tensor y_, double scale_, Options opt_)
    : x(std::move(x_)), y(std::move(y_)), scale(static_cast<float>(scale_)), opt(opt_) {
  TORCH_CHECK(x.dim() == 3 && y.dim() == 3, "x and y must be (G, B, D), got ", x.sizes(), " and ", y.sizes());
  TORCH_CHECK(x.scalar_type() == at::kFloat && y.scalar_type() == at::kFloat, "the C++ kernels take float32");
  TORCH_CHECK(x.device().is_cpu() && y.device().is_cpu(), "the C++ kernels take CPU tensors");
  TORCH_CHECK(x.is_contiguous() && y.is_contiguous(), "the C++ kernels take contiguous tensors");
  Gx = x.size(0), Gy = y.size(0), Bx = x.size(1), By = y.size(1), D = x.size(2);
  TORCH_CHECK(y.size(2) == D, "x and y must have the same feature size, got ", D, " and ", y.size(2));
  TORCH_CHECK(Gx == Gy || Gx == 1 || Gy == 1, "group counts must match or be 1, got ", Gx, " and ", Gy);
  TORCH_CHECK(Bx > 0 && By > 0 && D > 0 && Gx > 0 && Gy > 0, "empty inputs");
  G = std::max(Gx, Gy);
  xs = x.mul(static_cast<double>(scale));
  threads = std::max<int64_t>(1, at::get_num_threads());
}

Problem Problem::groups(int64_t g0, int64_t n) const {
  Problem sub = *this;
  if (Gx > 1) sub.x = x.narrow(0, g0, n), sub.xs = xs.narrow(0, g0, n), sub.Gx = n;
  if (Gy > 1) sub.y = y.narrow(0, g0, n), sub.Gy = n;
  sub.G = n;
  sub.threads = 1;
  sub.dx_into = sub.dy_into = at::Tensor();
  return sub;
}

at::Tensor empty_f32(at::IntArrayRef sizes) {
  const auto f32 = at::TensorOptions().dtype(at::kFloat);
#if defined(__linux__) && defined(MADV_HUGEPAGE)
  constexpr size_t kHugePage = size_t{2} << 20;
  size_t bytes = sizeof(float);
  for (const int64_t n : sizes) bytes *= static_cast<size_t>(n);
  void* p = nullptr;
  const size_t length = (bytes + kHugePage - 1) / kHugePage * kHugePage;
  if (bytes >= kHugePage && posix_memalign(&p, kHugePage, length) == 0) {
    madvise(p, length, MADV_HUGEPAGE);  // a request: where refused, the pages are ordinary ones
    return at::from_blob(p, sizes, [](void* q) { std::free(q); }, f32);
  }
#endif
  return at::empty(sizes, f32);
}

Options make_options(const std::string& transform, double clip, const std::string& diagonal, int64_t diag_offset,
                     bool columns) {
  Options o;
  if (transform == "none") o.transform = Transform::none;
  else if (transform == "clip") o.transform = Transform::clip;
  else if (transform == "exp_m1") o.transform = Transform::exp_m1;
  else if (transform == "softplus") o.transform = Transform::softplus;
  else TORCH_CHECK(false, "unknown transform ", transform);
  if (diagonal == "include") o.diagonal = Diagonal::include;
  else if (diagonal == "exclude") o.diagonal = Diagonal::exclude;
  else if (diagonal == "zero") o.diagonal = Diagonal::zero;
  else TORCH_CHECK(false, "unknown diagonal mode ", diagonal);
  o.clip = static_cast<float>(clip);
  o.diag_offset = diag_offset;
  o.columns = columns;
  return o;
}

namespace {

// Rows per tile: about 4 MiB of tile (128 rows at By = 8192), between 16 and kMaxBlockRows rows, and enough blocks
// to give every thread work. Measured at B = 8192, D = 128: with the BLAS, 128 rows beat 64 and 32 by 6–10%; with
// the register-blocked GEMMs (AVX-512, a tile no longer fits L2 either way) by 20–35%, and 16 rows lose 40%: fewer
// tiles mean fewer rank-R updates of the (By × D) dy partial. 256 rows gained nothing more in either.
int64_t choose_block_rows(int64_t Bx, int64_t By, int64_t threads) {
  int64_t r = (4 * 1024 * 1024 / 4) / std::max<int64_t>(By, 1);
  r = std::clamp<int64_t>(r, 16, kMaxBlockRows);
  const int64_t per_thread = (Bx + threads - 1) / threads;
  r = std::min(r, std::max<int64_t>(8, (per_thread + 7) / 8 * 8));
  return std::min(r, Bx);
}

// exp(ref(from) − ref(to)) for to ≥ from: the factor that moves a partial sum kept relative to `from` to `to`.
// Nothing can have been accumulated relative to an empty (−inf) maximum, so that factor is 0.
float shift_factor(float from, float to) {
  if (from == to) return 1.0f;
  if (from == -std::numeric_limits<float>::infinity()) return 0.0f;
  return std::exp(lse_ref(from) - lse_ref(to));
}

}  // namespace

float LseAcc::raise_to(float new_max) {
  if (!(new_max > max)) return 1.0f;
  const float f = shift_factor(max, new_max);
  sum *= f;
  max = new_max;
  return f;
}

void LseAcc::merge(const LseAcc& other) {
  const float m = other.max > max ? other.max : max;
  const float a = sum == 0.0f ? 0.0f : sum * shift_factor(max, m);
  const float b = other.sum == 0.0f ? 0.0f : other.sum * shift_factor(other.max, m);
  max = m;
  sum = a + b;
}

Sweep::Sweep(const Problem& pb, Want want) : pb_(pb), want_(want), ops_(vec_ops()), gemm_(tile_gemm(pb.D)) {
  const int64_t threads = pb.threads;
  R_ = choose_block_rows(pb.Bx, pb.By, threads);
  // Below about 2^20 multiply-adds per thread, waking the other threads costs more than it saves.
  const int64_t work = std::max<int64_t>(1, pb.Bx * pb.By * pb.D >> 20);
  P_ = std::min({threads, (pb.Bx + R_ - 1) / R_, work});
  ws_.resize(P_);
  for (auto& w : ws_) {
    w.S = empty_f32({R_, pb.By});
    if (want.dx || want.dscale) w.dxraw = empty_f32({R_, pb.D});
    if (want.dy) w.xrow = empty_f32({R_, pb.D});
    if (want.dy) w.dy = empty_f32({pb.By, pb.D});
  }
  if (gemm_ != nullptr) ypack_ = empty_f32({(pb.By + gemm_->panel - 1) / gemm_->panel * gemm_->panel * pb.D});
  // A broadcast operand's gradient sums over groups, so it starts at zero and accumulates.
  auto gradient = [&](const at::Tensor& into, const at::Tensor& like, int64_t groups) {
    if (into.defined()) return into;
    at::Tensor t = empty_f32(like.sizes());
    return (groups == 1 && pb.G > 1) ? t.zero_() : t;
  };
  if (want.dx) dx_ = gradient(pb.dx_into, pb.x, pb.Gx);
  if (want.dy) dy_ = gradient(pb.dy_into, pb.y, pb.Gy);
}

void Sweep::pack_group(int64_t g) {
  const int64_t gy = pb_.Gy == 1 ? 0 : g;
  if (gemm_ == nullptr || packed_ == gy) return;
  // Bᵀ for the score GEMM, panel by panel: O(By·D) once per group instead of a transposing pass inside every tile.
  const int64_t panel = gemm_->panel, D = pb_.D;
  const float* y = pb_.y_group(g).data_ptr<float>();
  float* out = ypack_.data_ptr<float>();
  at::parallel_for(0, (pb_.By + panel - 1) / panel, 16, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t)
      gemm_->pack(y + t * panel * D, D, std::min(panel, pb_.By - t * panel), D, out + t * panel * D);
  });
  packed_ = gy;
}

float* Sweep::scores(int64_t p, int64_t g, int64_t i0, int64_t rows) {
  at::Tensor S = ws_[p].S.narrow(0, 0, rows);
  float* s = S.data_ptr<float>();
  const int64_t n = pb_.By, D = pb_.D;
  if (gemm_ != nullptr) {
    TORCH_INTERNAL_ASSERT(packed_ == (pb_.Gy == 1 ? 0 : g), "scores() of group ", g, " outside for_blocks(", g, ")");
    gemm_->nt(pb_.xs_group(g).data_ptr<float>() + i0 * D, D, ypack_.data_ptr<float>(), rows, n, D, s, n);
  } else {
    at::mm_out(S, pb_.xs_group(g).narrow(0, i0, rows), pb_.y_group(g).t());
  }
  for (int64_t k = 0; k < rows; ++k) {
    float* row = s + k * n;
    if (pb_.opt.transform == Transform::clip) ops_.clamp(row, n, pb_.opt.clip);
    const int64_t j = i0 + k + pb_.opt.diag_offset;
    if (pb_.opt.diagonal != Diagonal::include && j >= 0 && j < n)
      row[j] = pb_.opt.diagonal == Diagonal::zero ? 0.0f : -std::numeric_limits<float>::infinity();
  }
  return s;
}

void Sweep::begin_group(int64_t p) {
  if (want_.dy) ws_[p].dy.zero_();
}

void Sweep::backprop(int64_t p, int64_t g, int64_t i0, int64_t rows, const float* row_factor, float* raw) {
  if (!want_.any()) return;
  Workspace& w = ws_[p];
  at::Tensor Gt = w.S.narrow(0, 0, rows);
  if (pb_.opt.diagonal != Diagonal::include) {
    // An excluded or zeroed entry does not depend on x or y.
    float* gp = Gt.data_ptr<float>();
    for (int64_t k = 0; k < rows; ++k) {
      const int64_t j = i0 + k + pb_.opt.diag_offset;
      if (j >= 0 && j < pb_.By) gp[k * pb_.By + j] = 0.0f;
    }
  }
  const int64_t D = pb_.D;
  if (want_.dx || want_.dscale) {
    float* o = raw != nullptr ? raw : w.dxraw.data_ptr<float>();
    if (gemm_ != nullptr) {
      gemm_->nn(Gt.data_ptr<float>(), pb_.By, pb_.y_group(g).data_ptr<float>(), D, rows, D, pb_.By, o, D, false);
    } else {
      at::Tensor out = at::from_blob(o, {rows, D}, w.dxraw.options());
      at::mm_out(out, Gt, pb_.y_group(g));
    }
    if (row_factor != nullptr)
      for (int64_t k = 0; k < rows; ++k) ops_.scale(o + k * D, D, row_factor[k]);
  }
  if (want_.dy) {
    at::Tensor xb = pb_.x_group(g).narrow(0, i0, rows);
    if (row_factor != nullptr) {
      at::Tensor scaled = w.xrow.narrow(0, 0, rows);
      const float* src = xb.data_ptr<float>();
      float* dst = scaled.data_ptr<float>();
      for (int64_t k = 0; k < rows; ++k) ops_.axpy(dst + k * D, row_factor[k], src + k * D, D, false);
      xb = scaled;
    }
    if (gemm_ != nullptr)
      gemm_->tn(Gt.data_ptr<float>(), pb_.By, xb.data_ptr<float>(), D, pb_.By, D, rows, w.dy.data_ptr<float>(), D);
    else
      w.dy.addmm_(Gt.t(), xb);
  }
}

void Sweep::emit_dx(int64_t p, int64_t g, int64_t i0, int64_t rows, float factor, const float* raw) {
  if (!want_.dx && !want_.dscale) return;
  Workspace& w = ws_[p];
  if (raw == nullptr) raw = w.dxraw.data_ptr<float>();
  const int64_t D = pb_.D;
  if (want_.dscale) {
    // Σ_ij G_ij <x_i, y_j> = Σ_i <x_i, (G·y)_i>: O(rows·D) instead of another pass over the tile.
    const float* x = pb_.x_group(g).data_ptr<float>() + i0 * D;
    double acc = 0.0;
    for (int64_t k = 0; k < rows; ++k) acc += ops_.dot(x + k * D, raw + k * D, D);
    w.dscale += static_cast<double>(factor) * acc;
  }
  if (want_.dx) {
    // A broadcast x's gradient sums over the groups.
    float* out = dx_[pb_.Gx == 1 ? 0 : g].data_ptr<float>() + i0 * D;
    ops_.axpy(out, pb_.scale * factor, raw, rows * D, pb_.Gx == 1 && pb_.G > 1);
  }
}

void Sweep::end_group(int64_t g, const std::vector<float>& factors) {
  if (!want_.dy) return;
  float* out = dy_[pb_.Gy == 1 ? 0 : g].data_ptr<float>();
  const bool accumulate = pb_.Gy == 1 && pb_.G > 1;
  std::vector<const float*> parts(P_);
  std::vector<float> f(P_, 1.0f);
  for (int64_t p = 0; p < P_; ++p) {
    parts[p] = ws_[p].dy.data_ptr<float>();
    if (!factors.empty()) f[p] = factors[p];
  }
  // Chunks of 2^16 elements: a small group's sum runs on the calling thread, without waking the others.
  at::parallel_for(0, pb_.By * pb_.D, 1 << 16, [&](int64_t begin, int64_t end) {
    constexpr int64_t kStrip = 1024;  // strip by strip, so the output strip stays in L1 across the partials
    for (int64_t e0 = begin; e0 < end; e0 += kStrip) {
      const int64_t n = std::min(kStrip, end - e0);
      for (int64_t p = 0; p < P_; ++p)  // partition order: deterministic
        ops_.axpy(out + e0, pb_.scale * f[p], parts[p] + e0, n, accumulate || p > 0);
    }
  });
}

namespace {

// The chunks of by_groups: one per thread where the groups divide evenly among them, or are so many that the
// uneven shares cost at most a quarter of a thread; else 1 (every group cut into row blocks across the threads).
int64_t group_chunks(const Problem& pb) {
  const int64_t T = pb.threads;
  if (T < 2 || pb.G < T) return 1;
  return (pb.G % T == 0 || pb.G >= 4 * T) ? T : 1;
}

std::vector<at::Tensor> narrow_all(const std::vector<at::Tensor>& ts, int64_t g0, int64_t n) {
  std::vector<at::Tensor> out;
  for (const auto& t : ts) out.push_back(t.narrow(0, g0, n));
  return out;
}

// Σ_c parts[c].grads.*member in chunk order: the gradient of an operand broadcast over every chunk's groups.
at::Tensor sum_in_order(const std::vector<Result>& parts, at::Tensor Grads::*member) {
  at::Tensor total = parts[0].grads.*member;
  for (size_t c = 1; c < parts.size(); ++c) total.add_(parts[c].grads.*member);
  return total;
}

}  // namespace

Result by_groups(Family family, const Problem& pb, Want want, const std::vector<at::Tensor>& stats,
                 const std::vector<at::Tensor>& weights) {
  const int64_t C = group_chunks(pb);
  if (C == 1) return family(pb, want, stats, weights);
  auto first = [&](int64_t c) { return c * pb.G / C; };  // chunk c: groups [first(c), first(c + 1))
  // A per-group operand's gradient is written in place by its chunk; a broadcast one is summed afterwards.
  const at::Tensor dx = want.dx && pb.Gx > 1 ? empty_f32(pb.x.sizes()) : at::Tensor();
  const at::Tensor dy = want.dy && pb.Gy > 1 ? empty_f32(pb.y.sizes()) : at::Tensor();
  std::vector<Result> parts(C);
  at::parallel_for(0, C, 1, [&](int64_t begin, int64_t end) {
    for (int64_t c = begin; c < end; ++c) {
      const int64_t g0 = first(c), n = first(c + 1) - g0;
      Problem sub = pb.groups(g0, n);
      if (dx.defined()) sub.dx_into = dx.narrow(0, g0, n);
      if (dy.defined()) sub.dy_into = dy.narrow(0, g0, n);
      parts[c] = family(sub, want, narrow_all(stats, g0, n), narrow_all(weights, g0, n));
    }
  });
  Result res;
  if (!stats.empty()) {
    res.stats = stats;
  } else {
    for (size_t s = 0; s < parts[0].stats.size(); ++s) {
      std::vector<at::Tensor> pieces;
      for (const auto& part : parts) pieces.push_back(part.stats[s]);
      res.stats.push_back(at::cat(pieces));
    }
  }
  if (want.dx) res.grads.dx = dx.defined() ? dx : sum_in_order(parts, &Grads::dx);
  if (want.dy) res.grads.dy = dy.defined() ? dy : sum_in_order(parts, &Grads::dy);
  for (const auto& part : parts) res.grads.dscale += part.grads.dscale;
  return res;
}

Grads Sweep::finish() {
  Grads gr;
  gr.dx = dx_;
  gr.dy = dy_;
  for (const auto& w : ws_) gr.dscale += w.dscale;
  return gr;
}

}  // namespace rmi_fast::cpu
