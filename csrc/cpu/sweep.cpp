// The shared tiling of the CPU kernels (see sweep.h): score tiles, gradient GEMMs, per-partition partials.
#include "sweep.h"

#include <algorithm>
#include <cmath>

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
  const int64_t threads = std::max<int64_t>(1, at::get_num_threads());
  R_ = choose_block_rows(pb.Bx, pb.By, threads);
  // Below about 2^20 multiply-adds per thread, waking the other threads costs more than it saves.
  const int64_t work = std::max<int64_t>(1, pb.Bx * pb.By * pb.D >> 20);
  P_ = std::min({threads, (pb.Bx + R_ - 1) / R_, work});
  const auto f32 = pb.x.options();
  ws_.resize(P_);
  for (auto& w : ws_) {
    w.S = at::empty({R_, pb.By}, f32);
    if (want.dx || want.dscale) w.dxraw = at::empty({R_, pb.D}, f32);
    if (want.dy) w.xrow = at::empty({R_, pb.D}, f32);
    if (want.dy) w.dy = at::empty({pb.By, pb.D}, f32);
  }
  if (gemm_ != nullptr) ypack_ = at::empty({(pb.By + gemm_->panel - 1) / gemm_->panel * gemm_->panel * pb.D}, f32);
  // A broadcast operand's gradient sums over groups, so it starts at zero and accumulates.
  if (want.dx) dx_ = (pb.Gx == 1 && pb.G > 1) ? at::zeros_like(pb.x) : at::empty_like(pb.x);
  if (want.dy) dy_ = (pb.Gy == 1 && pb.G > 1) ? at::zeros_like(pb.y) : at::empty_like(pb.y);
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

void Sweep::backprop(int64_t p, int64_t g, int64_t i0, int64_t rows, const float* row_factor) {
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
    at::Tensor out = w.dxraw.narrow(0, 0, rows);
    if (gemm_ != nullptr)
      gemm_->nn(Gt.data_ptr<float>(), pb_.By, pb_.y_group(g).data_ptr<float>(), D, rows, D, pb_.By,
                out.data_ptr<float>(), D, false);
    else
      at::mm_out(out, Gt, pb_.y_group(g));
    if (row_factor != nullptr) {
      float* o = out.data_ptr<float>();
      for (int64_t k = 0; k < rows; ++k) ops_.scale(o + k * D, D, row_factor[k]);
    }
  }
  if (want_.dy) {
    at::Tensor xb = pb_.x_group(g).narrow(0, i0, rows);
    if (row_factor != nullptr) {
      at::Tensor scaled = w.xrow.narrow(0, 0, rows);
      const float* src = xb.data_ptr<float>();
      float* dst = scaled.data_ptr<float>();
      for (int64_t k = 0; k < rows; ++k)
        for (int64_t d = 0; d < D; ++d) dst[k * D + d] = row_factor[k] * src[k * D + d];
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
    for (int64_t k = 0; k < rows; ++k) {
      float dot = 0.0f;
      for (int64_t d = 0; d < D; ++d) dot += x[k * D + d] * raw[k * D + d];
      acc += dot;
    }
    w.dscale += static_cast<double>(factor) * acc;
  }
  if (want_.dx) {
    float* out = dx_[pb_.Gx == 1 ? 0 : g].data_ptr<float>() + i0 * D;
    const float a = pb_.scale * factor;
    if (pb_.Gx == 1 && pb_.G > 1) {
      for (int64_t e = 0; e < rows * D; ++e) out[e] += a * raw[e];
    } else {
      for (int64_t e = 0; e < rows * D; ++e) out[e] = a * raw[e];
    }
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
  const float scale = pb_.scale;
  // Chunks of 2^16 elements: a small group's sum runs on the calling thread, without waking the others.
  at::parallel_for(0, pb_.By * pb_.D, 1 << 16, [&](int64_t begin, int64_t end) {
    constexpr int64_t kStrip = 1024;  // the partials are summed strip by strip, each pass over a strip vectorised
    float acc[kStrip];
    for (int64_t e0 = begin; e0 < end; e0 += kStrip) {
      const int64_t n = std::min(kStrip, end - e0);
      for (int64_t e = 0; e < n; ++e) acc[e] = f[0] * parts[0][e0 + e];
      for (int64_t p = 1; p < P_; ++p)  // partition order: deterministic
        for (int64_t e = 0; e < n; ++e) acc[e] += f[p] * parts[p][e0 + e];
      float* o = out + e0;
      for (int64_t e = 0; e < n; ++e) o[e] = (accumulate ? o[e] : 0.0f) + scale * acc[e];
    }
  });
}

Grads Sweep::finish() {
  Grads gr;
  gr.dx = dx_;
  gr.dy = dy_;
  for (const auto& w : ws_) gr.dscale += w.dscale;
  return gr;
}

}  // namespace rmi_fast::cpu
