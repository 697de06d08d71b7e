// Device building blocks shared by the pair_reduce kernels (pair_stats.cu, pair_grads.cu): tile geometry, global →
// shared tile loads, the tensor-core products of one tile, and the per-entry transforms of the families.
//
// Tile geometry. A thread block of kWarps warps owns kBM = 16·kWarps rows of the own operand; warp w owns rows
// [16w, 16w + 16) of the block. It sweeps the other operand in tiles of kBN rows and computes the score tile
//     acc[i, j] = <own_i, other_j>      (kBM × kBN, unscaled; S = scale · acc)
// in registers with mma.sync, streaming D through shared memory in stages of kBK columns. Nothing of the score
// matrix ever reaches global memory.
//
// Fragment layout (PTX ISA, mma.m16n8k16 / m16n8k8, accumulator of both): lane = 4·gid + tig (gid = lane / 4,
// tig = lane % 4); accumulator c[0..3] of an 8-column tile holds rows (gid, gid, gid + 8, gid + 8) and columns
// (2·tig, 2·tig + 1, 2·tig, 2·tig + 1). Every per-entry loop below uses entry_row / entry_col for this mapping.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <stdexcept>
#include <string>
#include <type_traits>

#include "pair_reduce.h"

#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ < 800
#error "rmi_fast CUDA kernels need sm_80 or newer (mma.sync bf16/tf32); set CMAKE_CUDA_ARCHITECTURES accordingly"
#endif

namespace rmi_fast {
namespace cuda {
namespace detail {

constexpr int kWarps = 4;
constexpr int kThreads = 32 * kWarps;
constexpr int kBM = 16 * kWarps;  // own rows per block (one 16-row mma slab per warp)
constexpr int kBN = 64;           // other rows per score tile
constexpr int kBK = 32;           // D columns per shared-memory stage of the score product
constexpr int kNT = kBN / 8;      // 8-column accumulator tiles per score tile
constexpr int kDV = 128;          // d_own columns per gradient block
constexpr int kND = kDV / 8;      // 8-column accumulator tiles of d_own per warp

static_assert(kBM == 64 && kBN % 16 == 0 && kBK % 16 == 0 && kDV % 8 == 0, "tile sizes must fit the mma shapes");

// Shared-memory row lengths (elements). The padding makes the fragment loads below bank-conflict free:
//   16-bit stage, ld = kBK + 8 = 40 halves = 20 words: 32-bit loads at (row gid, word tig) hit banks 20·gid + tig
//   mod 32, all distinct; fp32 stage, ld = 36 words: banks 4·gid + tig, distinct.
//   gradient chunk (rows j, columns d), loaded at (row 2·tig (+1), column gid): 16-bit ld = kDV + 8 = 136 halves
//   = 68 words → banks 8·tig + gid/2 (+4); fp32 ld = kDV + 4 = 132 words → banks 8·tig + gid.
template <typename E> constexpr int stage_ld() { return sizeof(E) == 4 ? kBK + 4 : kBK + 8; }
template <typename E> constexpr int chunk_ld() { return sizeof(E) == 4 ? kDV + 4 : kDV + 8; }

// Operand type of the gradient product G · other: bf16 for bf16 inputs; fp32 (TF32 products) for fp32 and fp16
// inputs. G ∈ [−|w|, |w|]·T' spans far more than fp16's exponent range (an fp16 G would underflow for small weights
// and overflow for exp(S − 1)), and a bf16 copy of fp16 inputs would drop 3 of their 11 significant bits; TF32 holds
// fp16 values exactly and rounds G to fp16's 11 bits, in fp32's range.
template <typename T>
using grad_operand_t = std::conditional_t<std::is_same_v<T, __nv_bfloat16>, __nv_bfloat16, float>;

template <typename T> constexpr int stage_bytes() { return (kBM + kBN) * stage_ld<T>() * int(sizeof(T)); }
template <typename T> constexpr int chunk_bytes() {
  return kBN * chunk_ld<grad_operand_t<T>>() * int(sizeof(grad_operand_t<T>));
}
static_assert(stage_bytes<float>() <= 48 * 1024 && chunk_bytes<float>() <= 48 * 1024, "static shared memory limit");
static_assert(stage_ld<__half>() * sizeof(__half) % 16 == 0 && stage_ld<float>() * sizeof(float) % 16 == 0 &&
                  chunk_ld<__nv_bfloat16>() * sizeof(__nv_bfloat16) % 16 == 0 &&
                  chunk_ld<float>() * sizeof(float) % 16 == 0,
              "shared rows must keep 16-byte alignment for vector stores");

// ------------------------------------------------------------------------------------------- fragment mapping

__device__ __forceinline__ int lane_gid() { return (threadIdx.x & 31) >> 2; }
__device__ __forceinline__ int lane_tig() { return threadIdx.x & 3; }
__device__ __forceinline__ int warp_id() { return threadIdx.x >> 5; }
// Row within the block and column within the 8-column tile of accumulator entry e (0..3) of this lane.
__device__ __forceinline__ int entry_row(int e) { return 16 * warp_id() + lane_gid() + ((e & 2) ? 8 : 0); }
__device__ __forceinline__ int entry_col(int e) { return 2 * lane_tig() + (e & 1); }

// ------------------------------------------------------------------------------------------- conversions

template <typename E> __device__ __forceinline__ float to_float(E v);
template <> __device__ __forceinline__ float to_float<float>(float v) { return v; }
template <> __device__ __forceinline__ float to_float<__half>(__half v) { return __half2float(v); }
template <> __device__ __forceinline__ float to_float<__nv_bfloat16>(__nv_bfloat16 v) { return __bfloat162float(v); }

template <typename E> __device__ __forceinline__ E from_float(float v);
template <> __device__ __forceinline__ float from_float<float>(float v) { return v; }
template <> __device__ __forceinline__ __half from_float<__half>(float v) { return __float2half_rn(v); }
template <> __device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float v) {
  return __float2bfloat16_rn(v);
}

template <typename E> __device__ __forceinline__ uint16_t bits16(E v) {
  static_assert(sizeof(E) == 2, "16-bit element");
  uint16_t b;
  memcpy(&b, &v, 2);
  return b;
}

// Two 16-bit elements in one 32-bit mma register; the lower k index goes to the low half.
template <typename E> __device__ __forceinline__ uint32_t pack2(E lo, E hi) {
  return uint32_t(bits16(lo)) | (uint32_t(bits16(hi)) << 16);
}

__device__ __forceinline__ uint32_t load_pair(const void* p) { return *static_cast<const uint32_t*>(p); }

__device__ __forceinline__ uint32_t to_tf32(float v) {
  uint32_t r;
  asm("cvt.rna.tf32.f32 %0, %1;\n" : "=r"(r) : "f"(v));
  return r;
}

// Tests on the bits: immune to any fast-math assumption about infinities and NaN.
__device__ __forceinline__ bool is_finite_bits(float v) { return (__float_as_uint(v) & 0x7f800000u) != 0x7f800000u; }
__device__ __forceinline__ bool is_nan_bits(float v) { return (__float_as_uint(v) & 0x7fffffffu) > 0x7f800000u; }

// v = hi + lo with both parts exact TF32 values: the 3xTF32 product hi·hi + hi·lo + lo·hi has about fp32 accuracy.
// An infinite hi (v = ±inf, or |v| rounded past FLT_MAX) gets lo = 0: v − hi would be NaN, and so every product.
__device__ __forceinline__ void split_tf32(float v, uint32_t& hi, uint32_t& lo) {
  hi = to_tf32(v);
  lo = is_finite_bits(__uint_as_float(hi)) ? to_tf32(v - __uint_as_float(hi)) : 0u;
}

// ------------------------------------------------------------------------------------------- mma wrappers

// c (16×8 fp32) += a (16×16) · b (16×8), 16-bit operands.
template <typename E>
__device__ __forceinline__ void mma16(float (&c)[4], const uint32_t (&a)[4], const uint32_t (&b)[2]) {
  if constexpr (std::is_same_v<E, __nv_bfloat16>) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
        "{%0,%1,%2,%3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
  } else {
    static_assert(std::is_same_v<E, __half>, "16-bit mma operand");
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
        "{%0,%1,%2,%3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
  }
}

// c (16×8 fp32) += a (16×8) · b (8×8), TF32 operands.
__device__ __forceinline__ void mma_tf32(float (&c)[4], const uint32_t (&a)[4], const uint32_t (&b)[2]) {
  asm volatile(
      "mma.sync.aligned.m16n8k8.row.col.f32.tf32.tf32.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};\n"
      : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
}

// c += a·b for fp32 values given as (hi, lo) TF32 pairs; precise: 3xTF32, else one TF32 product.
__device__ __forceinline__ void mma_f32(float (&c)[4], const uint32_t (&a_hi)[4], const uint32_t (&a_lo)[4],
                                        const uint32_t (&b_hi)[2], const uint32_t (&b_lo)[2], bool precise) {
  if (precise) {  // small terms first
    mma_tf32(c, a_lo, b_hi);
    mma_tf32(c, a_hi, b_lo);
  }
  mma_tf32(c, a_hi, b_hi);
}

// ------------------------------------------------------------------------------------------- tile loads

// dst[r][c] = src[(row0 + r)·rstride + col0 + c] for r < ROWS, c < COLS, converted to Dst; zero outside
// [0, nrows) × [0, ncols) (zero rows and columns add nothing to a dot product). vec: src, rstride and ncols allow
// 16-byte loads (then a 16-byte chunk is either wholly inside or wholly outside the column range). All threads of
// the block take part; the caller synchronises.
template <int ROWS, int COLS, int LD, typename Src, typename Dst>
__device__ __forceinline__ void load_tile(Dst (*dst)[LD], const Src* __restrict__ src, int64_t rstride,
                                          int64_t row0, int64_t nrows, int64_t col0, int64_t ncols, bool vec) {
  constexpr int kVec = 16 / int(sizeof(Src));  // elements per 16-byte chunk
  static_assert(COLS % kVec == 0, "tile width must be a whole number of 16-byte chunks");
  if (vec) {
    constexpr int kChunksPerRow = COLS / kVec;
    for (int c = threadIdx.x; c < ROWS * kChunksPerRow; c += kThreads) {
      const int r = c / kChunksPerRow;
      const int cc = (c % kChunksPerRow) * kVec;
      const int64_t gr = row0 + r;
      const int64_t gc = col0 + cc;
      uint4 raw = make_uint4(0u, 0u, 0u, 0u);
      if (gr < nrows && gc < ncols) raw = *reinterpret_cast<const uint4*>(src + gr * rstride + gc);
      if constexpr (std::is_same_v<Src, Dst>) {
        *reinterpret_cast<uint4*>(&dst[r][cc]) = raw;
      } else {
        Src v[kVec];
        memcpy(v, &raw, 16);
#pragma unroll
        for (int e = 0; e < kVec; ++e) dst[r][cc + e] = from_float<Dst>(to_float(v[e]));
      }
    }
  } else {
    for (int c = threadIdx.x; c < ROWS * COLS; c += kThreads) {
      const int r = c / COLS;
      const int cc = c % COLS;
      const int64_t gr = row0 + r;
      const int64_t gc = col0 + cc;
      const float v = (gr < nrows && gc < ncols) ? to_float(src[gr * rstride + gc]) : 0.f;
      dst[r][cc] = from_float<Dst>(v);
    }
  }
}

// ------------------------------------------------------------------------------------------- score tile

// acc[nt][·] += own rows of this warp (sA[16w .. 16w+16)[0 .. kBK)) · other rows nt·8 .. nt·8+8 (sB) transposed,
// for one shared-memory stage. B = otherᵀ is "col" (k-contiguous per n) exactly as other is stored row-major.
template <typename T>
__device__ __forceinline__ void mma_score_stage(float (&acc)[kNT][4], T (*sA)[stage_ld<T>()],
                                                T (*sB)[stage_ld<T>()], bool precise) {
  const int gid = lane_gid(), tig = lane_tig();
  const int r0 = 16 * warp_id();
  if constexpr (std::is_same_v<T, float>) {
#pragma unroll
    for (int ks = 0; ks < kBK; ks += 8) {
      // A 16×8 (row): a0 (gid, tig), a1 (gid+8, tig), a2 (gid, tig+4), a3 (gid+8, tig+4).
      uint32_t a_hi[4], a_lo[4];
      split_tf32(sA[r0 + gid][ks + tig], a_hi[0], a_lo[0]);
      split_tf32(sA[r0 + gid + 8][ks + tig], a_hi[1], a_lo[1]);
      split_tf32(sA[r0 + gid][ks + tig + 4], a_hi[2], a_lo[2]);
      split_tf32(sA[r0 + gid + 8][ks + tig + 4], a_hi[3], a_lo[3]);
#pragma unroll
      for (int nt = 0; nt < kNT; ++nt) {
        // B 8×8 (col): b0 (k = tig, n = gid), b1 (k = tig + 4, n = gid); B[k][n] = other[n][k].
        uint32_t b_hi[2], b_lo[2];
        split_tf32(sB[nt * 8 + gid][ks + tig], b_hi[0], b_lo[0]);
        split_tf32(sB[nt * 8 + gid][ks + tig + 4], b_hi[1], b_lo[1]);
        mma_f32(acc[nt], a_hi, a_lo, b_hi, b_lo, precise);
      }
    }
  } else {
#pragma unroll
    for (int ks = 0; ks < kBK; ks += 16) {
      // A 16×16 (row): reg0 (gid, 2tig..+1), reg1 (gid+8, 2tig..+1), reg2 (gid, 2tig+8..+9), reg3 (gid+8, 2tig+8..+9).
      uint32_t a[4];
      a[0] = load_pair(&sA[r0 + gid][ks + 2 * tig]);
      a[1] = load_pair(&sA[r0 + gid + 8][ks + 2 * tig]);
      a[2] = load_pair(&sA[r0 + gid][ks + 2 * tig + 8]);
      a[3] = load_pair(&sA[r0 + gid + 8][ks + 2 * tig + 8]);
#pragma unroll
      for (int nt = 0; nt < kNT; ++nt) {
        // B 16×8 (col): reg0 (k = 2tig..+1, n = gid), reg1 (k = 2tig+8..+9, n = gid); B[k][n] = other[n][k].
        uint32_t b[2];
        b[0] = load_pair(&sB[nt * 8 + gid][ks + 2 * tig]);
        b[1] = load_pair(&sB[nt * 8 + gid][ks + 2 * tig + 8]);
        mma16<T>(acc[nt], a, b);
      }
    }
  }
}

// Operands of one direction, offset to group g by the caller.
template <typename T>
struct Operands {
  const T* own;
  const T* other;
  int64_t own_rstride, other_rstride;
  int64_t own_rows, other_rows, dim;
  bool vec, precise;
};

// acc = <own_i, other_j> for own rows [i0, i0 + kBM) and other rows [j0, j0 + kBN) of one group (0 outside the
// matrices). smem holds the two stage tiles. Starts with a barrier, so the caller may reuse smem freely before.
template <typename T>
__device__ __forceinline__ void score_tile(float (&acc)[kNT][4], unsigned char* smem, const Operands<T>& op,
                                           int64_t i0, int64_t j0) {
  constexpr int LD = stage_ld<T>();
  T (*sA)[LD] = reinterpret_cast<T (*)[LD]>(smem);
  T (*sB)[LD] = sA + kBM;
#pragma unroll
  for (int nt = 0; nt < kNT; ++nt)
#pragma unroll
    for (int e = 0; e < 4; ++e) acc[nt][e] = 0.f;
  for (int64_t k0 = 0; k0 < op.dim; k0 += kBK) {
    __syncthreads();  // every warp is done with the previous contents of smem
    load_tile<kBM, kBK, LD>(sA, op.own, op.own_rstride, i0, op.own_rows, k0, op.dim, op.vec);
    load_tile<kBN, kBK, LD>(sB, op.other, op.other_rstride, j0, op.other_rows, k0, op.dim, op.vec);
    __syncthreads();
    mma_score_stage<T>(acc, sA, sB, op.precise);
  }
}

// ------------------------------------------------------------------------------------------- transforms

constexpr float kNegInf = -INFINITY;

// clamp that keeps NaN (fminf/fmaxf would replace it by a bound).
__device__ __forceinline__ float clamp_keep_nan(float s, float c) {
  return is_nan_bits(s) ? s : fminf(fmaxf(s, -c), c);
}

// σ(s) without overflow: e = exp(−|s|) ∈ (0, 1].
__device__ __forceinline__ float sigmoid(float s) {
  const float e = __expf(-fabsf(s));
  const float p = 1.f / (1.f + e);
  return s >= 0.f ? p : e * p;
}

// softplus(s) = max(s, 0) + log1p(exp(−|s|)): exact for |s| up to 1e4 (no exp overflow). fmaxf drops a NaN, but
// the log1p term keeps it: softplus(NaN) = NaN.
__device__ __forceinline__ float softplus(float s) { return fmaxf(s, 0.f) + log1pf(__expf(-fabsf(s))); }

// T(S) of the family: the value an lse mode puts inside its log-sum-exp, or a sum mode adds.
template <Mode M> __device__ __forceinline__ float transform(float s, float clip) {
  if constexpr (M == Mode::lse) return s;
  if constexpr (M == Mode::lse_clip) return clamp_keep_nan(s, clip);
  if constexpr (M == Mode::exp_m1) return __expf(s - 1.f);
  if constexpr (M == Mode::softplus) return softplus(s);
}

template <Mode M> constexpr bool is_lse() { return M == Mode::lse || M == Mode::lse_clip; }

// dStat/dS_ij · w for one upstream term (statistic r, weight w) at score s:
//   lse:      w·exp(S − r)                 (softmax of the row / of the group)
//   lse_clip: w·exp(clamp(S) − r)·[|S| < clip]   (multiplied, so a NaN stays NaN)
//   exp_m1:   w·exp(S − 1)
//   softplus: w·σ(S)
template <Mode M> __device__ __forceinline__ float term_grad(float s, float clip, float r, float w) {
  if constexpr (M == Mode::lse) return w * __expf(s - r);
  if constexpr (M == Mode::lse_clip) return w * __expf(clamp_keep_nan(s, clip) - r) * (fabsf(s) < clip ? 1.f : 0.f);
  if constexpr (M == Mode::exp_m1) return w * __expf(s - 1.f);
  if constexpr (M == Mode::softplus) return w * sigmoid(s);
}

// Running (max, sum) of a log-sum-exp: s = Σ exp(T − ref(m)), value = ref(m) + log(s). The reference point is m
// when finite, else 0, as torch.logsumexp takes it: nothing seen yet (m = −inf) gives (−inf, 0), never
// exp(−inf − (−inf)) = NaN, and a +inf entry gives +inf, not inf − inf = NaN. A NaN entry makes s NaN for good
// (fmaxf drops it from m, but exp(NaN − ref) is NaN).
struct OnlineLse {
  float m = kNegInf;
  float s = 0.f;
  __device__ __forceinline__ static float ref(float m) { return is_finite_bits(m) ? m : 0.f; }
  // exp(ref(from) − ref(to)) for to ≥ from: moves a sum kept relative to `from` to `to`; 0 from an empty partial.
  __device__ __forceinline__ static float shift(float from, float to) {
    return from == kNegInf ? 0.f : __expf(ref(from) - ref(to));
  }
  // Merge another running pair (the reduction is commutative: a + b == b + a in IEEE arithmetic).
  __device__ __forceinline__ void merge(float m2, float s2) {
    const float mn = fmaxf(m, m2);
    s = s * shift(m, mn) + s2 * shift(m2, mn);
    m = mn;
  }
  __device__ __forceinline__ float value() const { return ref(m) + __logf(s); }
};

// ------------------------------------------------------------------------------------------- host dispatch

template <typename T> struct TypeTag { using type = T; };
template <Mode M> using ModeTag = std::integral_constant<Mode, M>;

// Calls f(TypeTag<T>{}, ModeTag<M>{}) for the runtime dtype and mode: one place that lists the instantiations.
template <typename F> void dispatch(DType dtype, Mode mode, F&& f) {
  auto by_mode = [&](auto type) {
    switch (mode) {
      case Mode::lse: f(type, ModeTag<Mode::lse>{}); return;
      case Mode::lse_clip: f(type, ModeTag<Mode::lse_clip>{}); return;
      case Mode::exp_m1: f(type, ModeTag<Mode::exp_m1>{}); return;
      case Mode::softplus: f(type, ModeTag<Mode::softplus>{}); return;
    }
    throw std::invalid_argument("rmi_fast CUDA: unknown mode");
  };
  switch (dtype) {
    case DType::f32: by_mode(TypeTag<float>{}); return;
    case DType::bf16: by_mode(TypeTag<__nv_bfloat16>{}); return;
    case DType::f16: by_mode(TypeTag<__half>{}); return;
  }
  throw std::invalid_argument("rmi_fast CUDA: unknown dtype");
}

inline dim3 checked_grid(int64_t x, int64_t y, int64_t z) {
  if (x < 1 || x > 0x7fffffff || y < 1 || y > 65535 || z < 1 || z > 65535)
    throw std::invalid_argument("rmi_fast CUDA: problem too large for one launch (grid " + std::to_string(x) + " x " +
                                std::to_string(y) + " x " + std::to_string(z) + ")");
  return dim3(unsigned(x), unsigned(y), unsigned(z));
}

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

}  // namespace detail

inline void check_launch(const char* what) {
  const cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess) throw std::runtime_error(std::string("rmi_fast CUDA ") + what + ": " + cudaGetErrorString(err));
}

}  // namespace cuda
}  // namespace rmi_fast
