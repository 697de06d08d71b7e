// The elementwise passes of vec_ops.h, written once with GCC/Clang vector extensions and compiled per instruction
// set: the including file defines RMI_VEC_ISA (namespace) and RMI_VEC_BYTES (vector width in bytes).
//
// exp and log are Cephes-style: range reduction by log 2 and a degree-6 (exp) / degree-8 (log) polynomial,
// about 1–2 ulp over the whole fp32 range; exp(−inf) = 0, exp(+inf) = +inf, NaN passes through.
// A tail shorter than one vector is padded with a neutral value, so every element sees the same arithmetic.
#include <cmath>
#include <cstring>
#include <limits>

#include "vec_ops.h"

namespace rmi_fast::cpu::RMI_VEC_ISA {
namespace {

typedef float vf __attribute__((vector_size(RMI_VEC_BYTES)));
typedef int32_t vi __attribute__((vector_size(RMI_VEC_BYTES)));
constexpr int64_t W = RMI_VEC_BYTES / 4;
constexpr float kInf = std::numeric_limits<float>::infinity();

// A broadcast: through the integer lanes, where adding 0 is the identity the compiler folds away (vf{} + a would
// cost a float add, since −0 + 0 = +0).
inline vf splat(float a) {
  int32_t bits;
  std::memcpy(&bits, &a, sizeof bits);
  return (vf)(vi{} + bits);
}
inline vf load(const float* p) {
  vf v;
  std::memcpy(&v, p, sizeof v);
  return v;
}
inline void store(float* p, vf v) { std::memcpy(p, &v, sizeof v); }
// The first k (< W) elements of p, the rest filled with `pad`.
inline vf load_tail(const float* p, int64_t k, float pad) {
  float tmp[W];
  for (int64_t i = 0; i < W; ++i) tmp[i] = i < k ? p[i] : pad;
  return load(tmp);
}
inline void store_tail(float* p, int64_t k, vf v) {
  float tmp[W];
  store(tmp, v);
  for (int64_t i = 0; i < k; ++i) p[i] = tmp[i];
}
inline vf select(vi mask, vf a, vf b) { return mask ? a : b; }
inline vf vmax(vf a, vf b) { return select(a > b, a, b); }  // keeps b when a is NaN
inline vf vmin(vf a, vf b) { return select(a < b, a, b); }
inline vf vabs(vf a) { return (vf)((vi)a & 0x7fffffff); }
inline vi is_nan(vf a) { return a != a; }
inline vi is_finite(vf a) { return (a - a) == 0.0f; }
inline float hsum(vf v) {
  float t[W];
  store(t, v);
  float s = 0.0f;
  for (int64_t i = 0; i < W; ++i) s += t[i];
  return s;
}
inline float hmax(vf v) {
  float t[W];
  store(t, v);
  float m = -kInf;
  for (int64_t i = 0; i < W; ++i) m = t[i] > m ? t[i] : m;
  return m;
}

// 2^n for integer-valued n in [−252, 254], as two normal factors (2^n itself would leave the exponent range).
inline vf pow2_split(vf n, vf p) {
  vi ni = __builtin_convertvector(n, vi);
  vi h = ni >> 1;
  vf a = (vf)((h + 127) << 23);
  vf b = (vf)((ni - h + 127) << 23);
  return p * a * b;
}

// exp(x): x = n·ln2 + r, |r| ≤ ln2/2, exp(r) by its Taylor-like minimax polynomial, scaled by 2^n.
inline vf vexp(vf x) {
  vf xc = vmin(vmax(x, splat(-104.0f)), splat(89.0f));  // outside: exp underflows to 0 / overflows to inf
  vf n = xc * 1.44269504088896341f;
  n = (n + 12582912.0f) - 12582912.0f;  // round to nearest integer (|n| < 2^22)
  vf r = xc - n * 0.693359375f;
  r = r - n * -2.12194440e-4f;
  vf p = splat(1.9875691500e-4f);
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * (r * r) + r + 1.0f;
  return select(is_nan(x), x, pow2_split(n, p));
}

// log(w) for w in [1, 2] (the argument of log1p below); NaN passes through.
inline vf vlog_1_2(vf w) {
  vi bits = (vi)w;
  vf e = __builtin_convertvector(((bits >> 23) & 0xff) - 126, vf);
  vf m = (vf)((bits & 0x007fffff) | 0x3f000000);  // mantissa in [0.5, 1)
  vi small = m < 0.707106781186547524f;
  e = select(small, e - 1.0f, e);
  m = select(small, m + m - 1.0f, m - 1.0f);
  vf z = m * m;
  vf y = splat(7.0376836292e-2f);
  y = y * m - 1.1514610310e-1f;
  y = y * m + 1.1676998740e-1f;
  y = y * m - 1.2420140846e-1f;
  y = y * m + 1.4249322787e-1f;
  y = y * m - 1.6668057665e-1f;
  y = y * m + 2.0000714765e-1f;
  y = y * m - 2.4999993993e-1f;
  y = y * m + 3.3333331174e-1f;
  y = y * m * z;
  y = y + e * -2.12194440e-4f;
  y = y - 0.5f * z;
  vf out = m + y + e * 0.693359375f;
  return select(is_nan(w), w, out);
}

// log(1 + u) for u in [0, 1], accurate for tiny u: log(w)·u/(w − 1) with w = 1 + u (exact when w rounds to 1).
inline vf vlog1p_01(vf u) {
  vf w = u + 1.0f;
  vf d = w - 1.0f;
  vf ratio = u / select(d == 0.0f, splat(1.0f), d);
  return select(d == 0.0f, u, vlog_1_2(w) * ratio);
}

// ----------------------------------------------------------------------------------------------- the passes

// Applies f(vector, lanes) over [0, n): full vectors, then one padded tail with `pad` in the unused lanes.
template <class F>
inline void for_vectors(int64_t n, F&& f) {
  int64_t j = 0;
  for (; j + W <= n; j += W) f(j, W);
  if (j < n) f(j, n - j);
}

float row_max(const float* s, int64_t n) {
  vf acc = splat(-kInf);
  for_vectors(n, [&](int64_t j, int64_t k) { acc = vmax(k == W ? load(s + j) : load_tail(s + j, k, -kInf), acc); });
  return hmax(acc);
}

float exp_sum(float* s, int64_t n, float m, bool store_exp) {
  vf acc = splat(0.0f);
  const vf vm = splat(m);
  for_vectors(n, [&](int64_t j, int64_t k) {
    vf e = vexp((k == W ? load(s + j) : load_tail(s + j, k, -kInf)) - vm);
    acc += e;
    if (store_exp) k == W ? store(s + j, e) : store_tail(s + j, k, e);
  });
  return hsum(acc);
}

void scale(float* s, int64_t n, float a) {
  for_vectors(n, [&](int64_t j, int64_t k) {
    if (k == W) store(s + j, load(s + j) * a); else store_tail(s + j, k, load_tail(s + j, k, 0.0f) * a);
  });
}

float dot(const float* a, const float* b, int64_t n) {
  vf acc = splat(0.0f);
  for_vectors(n, [&](int64_t j, int64_t k) {
    acc += k == W ? load(a + j) * load(b + j) : load_tail(a + j, k, 0.0f) * load_tail(b + j, k, 0.0f);
  });
  return hsum(acc);
}

void axpy(float* y, float a, const float* x, int64_t n, bool accumulate) {
  const vf va = splat(a);
  for_vectors(n, [&](int64_t j, int64_t k) {
    const vf ax = va * (k == W ? load(x + j) : load_tail(x + j, k, 0.0f));
    const vf out = accumulate ? (k == W ? load(y + j) : load_tail(y + j, k, 0.0f)) + ax : ax;
    k == W ? store(y + j, out) : store_tail(y + j, k, out);
  });
}

void softmax_grad(float* s, int64_t n, float r, float w, const float* c, const float* v) {
  const vf vr = splat(r), vw = splat(w);
  for_vectors(n, [&](int64_t j, int64_t k) {
    vf x = k == W ? load(s + j) : load_tail(s + j, k, -kInf);
    vf g = vw * vexp(x - vr);
    if (c != nullptr) {
      vf cj = k == W ? load(c + j) : load_tail(c + j, k, 0.0f);
      vf vj = k == W ? load(v + j) : load_tail(v + j, k, 0.0f);
      g += vj * vexp(x - cj);
    }
    k == W ? store(s + j, g) : store_tail(s + j, k, g);
  });
}

void clamp(float* s, int64_t n, float c) {
  const vf hi = splat(c), lo = splat(-c);
  for_vectors(n, [&](int64_t j, int64_t k) {
    vf x = k == W ? load(s + j) : load_tail(s + j, k, 0.0f);
    x = select(x > hi, hi, select(x < lo, lo, x));
    k == W ? store(s + j, x) : store_tail(s + j, k, x);
  });
}

void clipped_softmax_grad(float* s, int64_t n, float L, float w, float c) {
  const vf vL = splat(L), vw = splat(w), vc = splat(c);
  for_vectors(n, [&](int64_t j, int64_t k) {
    vf x = k == W ? load(s + j) : load_tail(s + j, k, -kInf);
    vf g = vw * vexp(x - vL);
    g = select(vabs(x) < vc, g, select(is_nan(x), x, splat(0.0f)));
    k == W ? store(s + j, g) : store_tail(s + j, k, g);
  });
}

float exp_m1(float* s, int64_t n, float w, bool store_grad) {
  vf acc = splat(0.0f);
  const vf vw = splat(w);
  for_vectors(n, [&](int64_t j, int64_t k) {
    vf e = vexp((k == W ? load(s + j) : load_tail(s + j, k, -kInf)) - 1.0f);
    acc += e;
    if (store_grad) k == W ? store(s + j, vw * e) : store_tail(s + j, k, vw * e);
  });
  return hsum(acc);
}

// softplus(s) = max(s, 0) + log1p(e) and sigmoid(s) = (s ≥ 0 ? 1 : e)/(1 + e), both from e = exp(−|s|) ∈ (0, 1].
float softplus(float* s, int64_t n, float w, bool store_grad) {
  vf acc = splat(0.0f);
  const vf vw = splat(w);
  for_vectors(n, [&](int64_t j, int64_t k) {
    vf x = k == W ? load(s + j) : load_tail(s + j, k, -kInf);
    vf e = vexp(-vabs(x));
    acc += vmax(x, splat(0.0f)) + vlog1p_01(e);
    if (store_grad) {
      vf sig = select(x >= 0.0f, splat(1.0f), e) / (e + 1.0f);
      sig = select(is_nan(x), x, sig);
      k == W ? store(s + j, vw * sig) : store_tail(s + j, k, vw * sig);
    }
  });
  // NaN: max(NaN, 0) drops it but e = exp(NaN) = NaN carries it into the sum.
  return hsum(acc);
}

void max_into(float* m, const float* s, int64_t n) {
  for_vectors(n, [&](int64_t j, int64_t k) {
    if (k == W) store(m + j, vmax(load(s + j), load(m + j)));
    else store_tail(m + j, k, vmax(load_tail(s + j, k, -kInf), load_tail(m + j, k, -kInf)));
  });
}

inline vf ref(vf m) { return select(is_finite(m), m, splat(0.0f)); }

void rescale(float* acc, const float* m_old, const float* m_new, int64_t n) {
  for_vectors(n, [&](int64_t j, int64_t k) {
    vf a = k == W ? load(acc + j) : load_tail(acc + j, k, 0.0f);
    vf mo = k == W ? load(m_old + j) : load_tail(m_old + j, k, 0.0f);
    vf mn = k == W ? load(m_new + j) : load_tail(m_new + j, k, 0.0f);
    vf f = vexp(ref(mo) - ref(mn));
    a = select((mo == mn) | (a == 0.0f), a, a * f);
    k == W ? store(acc + j, a) : store_tail(acc + j, k, a);
  });
}

void add_exp(float* acc, const float* s, const float* m, int64_t n) {
  for_vectors(n, [&](int64_t j, int64_t k) {
    if (k == W) {
      store(acc + j, load(acc + j) + vexp(load(s + j) - ref(load(m + j))));
    } else {
      vf e = vexp(load_tail(s + j, k, -kInf) - ref(load_tail(m + j, k, 0.0f)));
      store_tail(acc + j, k, load_tail(acc + j, k, 0.0f) + e);
    }
  });
}

}  // namespace
}  // namespace rmi_fast::cpu::RMI_VEC_ISA

#include "gemm_impl.h"

namespace rmi_fast::cpu::RMI_VEC_ISA {

const VecOps& ops() {
  static const VecOps table{
      RMI_VEC_NAME, RMI_VEC_GEMM, row_max,  exp_sum, scale,   dot,     axpy, softmax_grad, clamp,
      clipped_softmax_grad,       exp_m1,   softplus, max_into, rescale, add_exp,
  };
  return table;
}

}  // namespace rmi_fast::cpu::RMI_VEC_ISA
