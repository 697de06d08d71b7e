// The vectorised routines of the CPU kernels: elementwise passes over one row (or one column strip) of a score tile
// (VecOps) and the three tile GEMMs (GemmOps).
//
// The same source (vec_impl.h, gemm_impl.h) is compiled once per instruction set: vec_avx512.cpp (-mavx512f),
// vec_avx2.cpp (-mavx2 -mfma) and vec_base.cpp (the compiler's baseline). vec_ops() picks the widest one the running
// CPU supports, once. All passes work in fp32 on n contiguous floats; n need not be a multiple of the vector width.
//
// NaN handling: the max passes ignore NaN (a NaN compares false), but every statistic is finished by a sum of
// exp(s − m) or of T(s) over the same entries, and that sum is NaN whenever one entry is, so NaN is never lost.
#pragma once

#include <cstdint>

namespace rmi_fast::cpu {

// Row-major fp32 GEMMs on one thread, register-blocked for the instruction set (gemm_impl.h). They exist because a
// vendor BLAS may not use the widest instructions of every CPU (MKL runs AVX2 code on AMD's AVX-512 cores) and its
// per-call overhead is paid once per tile.
struct GemmOps {
  int64_t panel;  // column width of one packed panel of pack()
  int64_t lanes;  // nn and tn need n to be a multiple of this (the vector width)
  // P ← B (n × k, leading dim ldb) as ceil(n / panel) panels of k × panel floats, zero-padded: Bᵀ panel by panel.
  void (*pack)(const float* B, int64_t ldb, int64_t n, int64_t k, float* P);
  // C (m × n, leading dim ldc) = A (m × k, lda) · Bᵀ, B given as pack()'s panels.
  void (*nt)(const float* A, int64_t lda, const float* P, int64_t m, int64_t n, int64_t k, float* C, int64_t ldc);
  // C (m × n) = A (m × k) · B (k × n), or C += A·B with accumulate.
  void (*nn)(const float* A, int64_t lda, const float* B, int64_t ldb, int64_t m, int64_t n, int64_t k, float* C,
             int64_t ldc, bool accumulate);
  // C (m × n) += Aᵀ · B, A (k × m), B (k × n).
  void (*tn)(const float* A, int64_t lda, const float* B, int64_t ldb, int64_t m, int64_t n, int64_t k, float* C,
             int64_t ldc);
};

struct VecOps {
  const char* name;
  // The tile GEMMs, or null where at::mm serves (the portable build: there the vendor BLAS is the better choice).
  const GemmOps* gemm;
  // max_j s_j, ignoring NaN; −inf for n = 0.
  float (*max)(const float* s, int64_t n);
  // Σ_j exp(s_j − m); with store, also s_j ← exp(s_j − m).
  float (*exp_sum)(float* s, int64_t n, float m, bool store);
  // s_j ← a·s_j.
  void (*scale)(float* s, int64_t n, float a);
  // Σ_j a_j·b_j.
  float (*dot)(const float* a, const float* b, int64_t n);
  // y_j ← a·x_j, or y_j ← y_j + a·x_j with accumulate.
  void (*axpy)(float* y, float a, const float* x, int64_t n, bool accumulate);
  // s_j ← w·exp(s_j − r) [+ v_j·exp(s_j − c_j) when c != nullptr]: the row (and column) softmax gradient.
  void (*softmax_grad)(float* s, int64_t n, float r, float w, const float* c, const float* v);
  // s_j ← clamp(s_j, −c, c) (NaN stays NaN).
  void (*clamp)(float* s, int64_t n, float c);
  // s_j ← |s_j| < c ? w·exp(s_j − L) : 0, on the clamped scores T (|T| < c ⟺ |S| < c).
  void (*clipped_softmax_grad)(float* s, int64_t n, float L, float w, float c);
  // Σ_j exp(s_j − 1); with store, s_j ← w·exp(s_j − 1).
  float (*exp_m1)(float* s, int64_t n, float w, bool store);
  // Σ_j softplus(s_j); with store, s_j ← w·sigmoid(s_j).
  float (*softplus)(float* s, int64_t n, float w, bool store);
  // m_j ← max(m_j, s_j) (NaN in s ignored, caught by add_exp).
  void (*max_into)(float* m, const float* s, int64_t n);
  // acc_j ← acc_j·exp(ref(m_old_j) − ref(m_new_j)), where ref(m) = m for finite m, else 0; a zero acc stays zero.
  void (*rescale)(float* acc, const float* m_old, const float* m_new, int64_t n);
  // acc_j ← acc_j + exp(s_j − ref(m_j)).
  void (*add_exp)(float* acc, const float* s, const float* m, int64_t n);
};

// The reference point of a running log-sum-exp: its max when finite, else 0 (so −inf and +inf rows stay exact).
inline float lse_ref(float m) { return (m - m == 0.0f) ? m : 0.0f; }

const VecOps& vec_ops();

// The tile GEMMs for feature size D: vec_ops().gemm where D is a multiple of its vector width, else null (at::mm).
// RMI_FAST_CPU_GEMM=blas makes it null always (to compare with the vendor BLAS).
const GemmOps* tile_gemm(int64_t D);

#define RMI_DECLARE_VEC_OPS(isa) \
  namespace isa {                \
  const VecOps& ops();           \
  const GemmOps& gemm_ops();     \
  }
RMI_DECLARE_VEC_OPS(base)
RMI_DECLARE_VEC_OPS(avx2)
RMI_DECLARE_VEC_OPS(avx512)
#undef RMI_DECLARE_VEC_OPS

}  // namespace rmi_fast::cpu
