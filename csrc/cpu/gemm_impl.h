// The three tile GEMMs of sweep.h (see GemmOps in vec_ops.h), register-blocked for one instruction set: included by
// vec_impl.h, whose vector type vf (W lanes) and load/store helpers it uses. Single-threaded: each partition of a
// sweep calls them on its own tile.
//
// Register blocking. Every kernel keeps an MR × NV block of vector accumulators (MR rows, NV vectors of W columns)
// and, per step of the reduction, loads NV vectors of one operand and broadcasts MR scalars of the other:
// MR·NV FMAs for MR + NV loads. With 32 vector registers (AVX-512) the blocks hold 24 accumulators, with 16 (AVX2)
// 12: enough independent FMA chains to cover the FMA latency on both pipes, with registers left for the operands.
//
//   nt:  C = A·Bᵀ, vectorised along C's columns: B is packed once per group of y (Sweep::pack_group) into panels of
//        NT_NV·W columns (k × panel floats each, columns contiguous), so a step loads NT_NV contiguous vectors of the
//        panel and broadcasts one element of each of MR rows of A. The score tile: A = scale·x (rows × D), B = y.
//   nn:  C (+)= A·B and tn: C += Aᵀ·B, vectorised along C's columns = the feature dimension D, which must be a
//        multiple of W. The reduction runs in blocks of NN_KC steps and the columns in blocks of NN_NV vectors, and
//        each such block of B (NN_KC × NN_NV·W floats, 32 KiB with AVX-512) is first copied contiguous (pack_block),
//        so that it stays in L1 for all of A's rows. tn also packs A (see gemm_tn).
#include <algorithm>
#include <cstring>
#include <memory>
#include <type_traits>

namespace rmi_fast::cpu::RMI_VEC_ISA {
namespace {

#if RMI_VEC_BYTES >= 64
constexpr int kAccumulators = 24;
#else
constexpr int kAccumulators = 12;
#endif
constexpr int NT_NV = 2;                                    // vectors per panel row
constexpr int NT_MR = kAccumulators / NT_NV;                // rows of A per block
constexpr int64_t kPanel = NT_NV * W;                       // panel width in columns
constexpr int64_t NT_KC = 128;                              // nt's reduction block, for accuracy (see nt_block)
constexpr int NN_NV = kAccumulators >= 24 ? 4 : 2;          // widest column block of nn/tn, in vectors
constexpr int NN_MR = kAccumulators / NN_NV;                // rows of a full nn/tn block
constexpr int64_t NN_KC = 128;                              // reduction block: NN_KC × NN_NV·W floats of B in L1

// Rows per block for a column block of nv vectors: about kAccumulators accumulators.
constexpr int rows_for(int nv) { return std::max(1, kAccumulators / nv); }

// Per-thread scratch for packed operands, slot by slot, kept between calls and never zeroed: packing writes every
// element the kernels then read. A fresh zeroed buffer per call cost a memset and, from about 128 KiB on (tn's packed
// B at D = 2048 is 1 MiB), fresh pages from the system each call. What a thread keeps is the largest call's: about one
// row tile × D floats.
template <int Slot>
float* scratch(size_t n) {
  thread_local std::unique_ptr<float[]> buffer;
  thread_local size_t size = 0;
  if (n > size) {
    buffer.reset(new float[n]);
    size = n;
  }
  return buffer.get();
}

// Calls f(std::integral_constant<int, n>) for a runtime n in [1, N].
template <int N, class F>
inline void with_count(int n, F&& f) {
  if constexpr (N > 0) {
    if (n == N) f(std::integral_constant<int, N>{});
    else with_count<N - 1>(n, f);
  }
}

// ------------------------------------------------------------------------------------------------------------ nt

// One stage of an in-register W × W transpose: rows r and r + b (bit b of r clear) trade the lanes whose bit b differs
// from theirs, which swaps bit b of the row index with bit b of the lane index of every element. The stages for
// b = 1, 2, …, W/2 together swap all bits: a transpose in log2(W)·W two-source shuffles, no memory round trip.
template <int b>
inline void transpose_stage(vf* a) {
  vi lo, hi;
  for (int l = 0; l < W; ++l) {
    lo[l] = (l & b) ? W + (l ^ b) : l;  // lane l of row r: its own where bit b is clear, else row r + b's lane l − b
    hi[l] = (l & b) ? W + l : (l | b);  // lane l of row r + b: row r's lane l + b where bit b is clear, else its own
  }
#pragma GCC unroll 16
  for (int r = 0; r < W; ++r) {
    if (r & b) continue;
    const vf x = a[r], y = a[r | b];
    a[r] = __builtin_shuffle(x, y, lo);
    a[r | b] = __builtin_shuffle(x, y, hi);
  }
  if constexpr (2 * b < W) transpose_stage<2 * b>(a);
}

// out[d·ldo + c] = in[c·ldi + d] for a W × W block.
inline void transpose_block(const float* in, int64_t ldi, float* out, int64_t ldo) {
  vf a[W];
#pragma GCC unroll 16
  for (int r = 0; r < W; ++r) a[r] = load(in + r * ldi);
  transpose_stage<1>(a);
#pragma GCC unroll 16
  for (int r = 0; r < W; ++r) store(out + r * ldo, a[r]);
}

void pack_panels(const float* B, int64_t ldb, int64_t n, int64_t k, float* P) {
  for (int64_t j0 = 0; j0 < n; j0 += kPanel) {
    float* panel = P + (j0 / kPanel) * k * kPanel;
    // The panel's columns in slices of W rows of B: whole W × W blocks transposed in registers, the rest (a ragged
    // k, the rows of a last, narrower panel and its zero padding) element by element.
    for (int64_t c0 = 0; c0 < kPanel; c0 += W) {
      const int64_t rows = std::clamp<int64_t>(n - j0 - c0, 0, W);
      const float* src = B + (j0 + c0) * ldb;
      int64_t d0 = 0;
      if (rows == W)
        for (; d0 + W <= k; d0 += W) transpose_block(src + d0, ldb, panel + d0 * kPanel + c0, kPanel);
      for (int64_t d = d0; d < k; ++d)
        for (int64_t c = 0; c < W; ++c) panel[d * kPanel + c0 + c] = c < rows ? src[c * ldb + d] : 0.0f;
    }
  }
}

// One MR × kPanel block of C = A·Bᵀ: rows [0, MR) of A (leading dim lda), one packed panel, `cols` valid columns.
// Each score is a sum of k products. One running fp32 sum over all of them would err by up to about k·eps·Σ|a·b|
// (measured: 25–76 eps·Σ|a·b| at D = 65536); summing blocks of NT_KC products in registers and then the block sums
// bounds it by about (NT_KC + k/NT_KC)·eps·Σ|a·b|, as a BLAS's reduction blocking does. The block sums are added
// outside the inner loop, so the register blocking of the products is unchanged.
template <int MR>
inline void nt_block(const float* A, int64_t lda, const float* panel, int64_t k, float* C, int64_t ldc, int64_t cols) {
  vf acc[MR][NT_NV];
#pragma GCC unroll 32
  for (int i = 0; i < MR; ++i)
#pragma GCC unroll 8
    for (int v = 0; v < NT_NV; ++v) acc[i][v] = splat(0.0f);
  for (int64_t d0 = 0; d0 < k; d0 += NT_KC) {
    const int64_t d1 = std::min(k, d0 + NT_KC);
    vf part[MR][NT_NV];
#pragma GCC unroll 32
    for (int i = 0; i < MR; ++i)
#pragma GCC unroll 8
      for (int v = 0; v < NT_NV; ++v) part[i][v] = splat(0.0f);
    for (int64_t d = d0; d < d1; ++d) {
      vf b[NT_NV];
#pragma GCC unroll 8
      for (int v = 0; v < NT_NV; ++v) b[v] = load(panel + d * kPanel + v * W);
#pragma GCC unroll 32
      for (int i = 0; i < MR; ++i) {
        const vf a = splat(A[i * lda + d]);
#pragma GCC unroll 8
        for (int v = 0; v < NT_NV; ++v) part[i][v] += a * b[v];
      }
    }
#pragma GCC unroll 32
    for (int i = 0; i < MR; ++i)
#pragma GCC unroll 8
      for (int v = 0; v < NT_NV; ++v) acc[i][v] = d0 == 0 ? part[i][v] : acc[i][v] + part[i][v];
  }
#pragma GCC unroll 32
  for (int i = 0; i < MR; ++i)
#pragma GCC unroll 8
    for (int v = 0; v < NT_NV; ++v) {
      const int64_t c0 = v * W;
      if (c0 + W <= cols) store(C + i * ldc + c0, acc[i][v]);
      else if (c0 < cols) store_tail(C + i * ldc + c0, cols - c0, acc[i][v]);
    }
}

void gemm_nt(const float* A, int64_t lda, const float* P, int64_t m, int64_t n, int64_t k, float* C, int64_t ldc) {
  for (int64_t j0 = 0; j0 < n; j0 += kPanel) {
    const float* panel = P + (j0 / kPanel) * k * kPanel;
    const int64_t cols = std::min(kPanel, n - j0);
    int64_t i = 0;
    for (; i + NT_MR <= m; i += NT_MR) nt_block<NT_MR>(A + i * lda, lda, panel, k, C + i * ldc + j0, ldc, cols);
    if (i < m) {
      with_count<NT_MR - 1>(static_cast<int>(m - i), [&](auto mr) {
        nt_block<decltype(mr)::value>(A + i * lda, lda, panel, k, C + i * ldc + j0, ldc, cols);
      });
    }
  }
}

// ------------------------------------------------------------------------------------------------------ nn and tn

// One MR × NV-vector block of C (+)= Σ_{s < k} a(i, s)·B[s, :], with a(i, s) = A[i·ai + s·as]: A itself (nn:
// ai = lda, as = 1) or a packed block of Aᵀ (tn: ai = 1, as = NN_MR). The operand with fewer registers is held
// across the other's loop: MR broadcasts when NV > MR, else NV loads.
template <int MR, int NV>
inline void nn_block(const float* A, int64_t ai, int64_t as, const float* B, int64_t ldb, int64_t k, float* C,
                     int64_t ldc, bool accumulate) {
  vf acc[MR][NV];
#pragma GCC unroll 32
  for (int i = 0; i < MR; ++i)
#pragma GCC unroll 16
    for (int v = 0; v < NV; ++v) acc[i][v] = accumulate ? load(C + i * ldc + v * W) : splat(0.0f);
  for (int64_t s = 0; s < k; ++s) {
    const float* a = A + s * as;
    const float* b = B + s * ldb;
    if constexpr (NV > MR) {
      vf av[MR];
#pragma GCC unroll 32
      for (int i = 0; i < MR; ++i) av[i] = splat(a[i * ai]);
#pragma GCC unroll 16
      for (int v = 0; v < NV; ++v) {
        const vf bv = load(b + v * W);
#pragma GCC unroll 32
        for (int i = 0; i < MR; ++i) acc[i][v] += av[i] * bv;
      }
    } else {
      vf bv[NV];
#pragma GCC unroll 16
      for (int v = 0; v < NV; ++v) bv[v] = load(b + v * W);
#pragma GCC unroll 32
      for (int i = 0; i < MR; ++i) {
        const vf av = splat(a[i * ai]);
#pragma GCC unroll 16
        for (int v = 0; v < NV; ++v) acc[i][v] += av * bv[v];
      }
    }
  }
#pragma GCC unroll 32
  for (int i = 0; i < MR; ++i)
#pragma GCC unroll 16
    for (int v = 0; v < NV; ++v) store(C + i * ldc + v * W, acc[i][v]);
}

// All rows [0, m) of one column block of NV vectors, in blocks of MR rows and one smaller; row block i starts at
// A + i·next (its rows then follow a(i, s) = A[i·ai + s·as] as in nn_block).
template <int MR, int NV>
inline void nn_columns(const float* A, int64_t next, int64_t ai, int64_t as, const float* B, int64_t ldb, int64_t m,
                       int64_t k, float* C, int64_t ldc, bool accumulate) {
  int64_t i = 0;
  for (; i + MR <= m; i += MR) nn_block<MR, NV>(A + i * next, ai, as, B, ldb, k, C + i * ldc, ldc, accumulate);
  if (i < m) {
    with_count<MR - 1>(static_cast<int>(m - i), [&](auto mr) {
      nn_block<decltype(mr)::value, NV>(A + i * next, ai, as, B, ldb, k, C + i * ldc, ldc, accumulate);
    });
  }
}

// Calls f(v0, nv) over the n / W vector columns: blocks of nv = NN_NV vectors, then one narrower (nv a constant).
template <class F>
inline void for_column_blocks(int64_t n, F&& f) {
  const int64_t nvec = n / W;
  int64_t v0 = 0;
  for (; v0 + NN_NV <= nvec; v0 += NN_NV) f(v0, std::integral_constant<int, NN_NV>{});
  if (v0 < nvec) with_count<NN_NV - 1>(static_cast<int>(nvec - v0), [&](auto nv) { f(v0, nv); });
}

// Copies B's block of kc rows × NV vectors into out, contiguous (leading dimension NV·W). B's rows lie ldb apart, and
// at a power-of-two ldb (D = 128: 512 bytes) a block of kc = NN_KC rows falls into a few of L1's 64 sets (8 at
// 512 bytes), far fewer lines than it has: unpacked, it was fetched from L2 again for every block of rows (timed
// alone with AVX2 at B = 512 and 2048, D = 128: nn and tn at 65–70% of nt's rate unpacked, 90–95% packed).
template <int NV>
inline void pack_block(const float* B, int64_t ldb, int64_t kc, float* out) {
  for (int64_t s = 0; s < kc; ++s)
#pragma GCC unroll 16
    for (int v = 0; v < NV; ++v) store(out + (s * NV + v) * W, load(B + s * ldb + v * W));
}

void gemm_nn(const float* A, int64_t lda, const float* B, int64_t ldb, int64_t m, int64_t n, int64_t k, float* C,
             int64_t ldc, bool accumulate) {
  float* block = scratch<0>(NN_KC * NN_NV * W);
  for (int64_t s0 = 0; s0 < k; s0 += NN_KC) {
    const int64_t kc = std::min(NN_KC, k - s0);
    for_column_blocks(n, [&](int64_t v0, auto nv) {
      constexpr int NV = decltype(nv)::value;
      pack_block<NV>(B + s0 * ldb + v0 * W, ldb, kc, block);
      nn_columns<rows_for(NV), NV>(A + s0, lda, lda, 1, block, NV * W, m, kc, C + v0 * W, ldc,
                                   accumulate || s0 > 0);
    });
  }
}

// tn reads A by columns, whose elements lie lda apart (a whole score-tile row): each strip of TN_STRIP columns is
// first packed as blocks of NN_MR columns, each block's k rows of NN_MR contiguous floats (a last, narrower block
// is read only as far as it is filled), so that the kernel's broadcasts stream through L1 instead of touching k
// cache lines at a large power-of-two stride.
constexpr int64_t TN_STRIP = NN_MR * 16;

void gemm_tn(const float* A, int64_t lda, const float* B, int64_t ldb, int64_t m, int64_t n, int64_t k, float* C,
             int64_t ldc) {
  // B (k × n) packed once, column block after column block (see pack_block): the block at vector column v0 starts
  // at v0·W·k, its rows NV·W floats long.
  float* buf = scratch<1>(TN_STRIP * k);
  float* packed = scratch<2>(k * n);
  for_column_blocks(n, [&](int64_t v0, auto nv) {
    constexpr int NV = decltype(nv)::value;
    pack_block<NV>(B + v0 * W, ldb, k, packed + v0 * W * k);
  });
  for (int64_t j0 = 0; j0 < m; j0 += TN_STRIP) {
    const int64_t cols = std::min(TN_STRIP, m - j0);
    for (int64_t s = 0; s < k; ++s) {
      const float* row = A + s * lda + j0;
      float* dst = buf + s * NN_MR;
      // Whole blocks as a memcpy of constant length, which compiles to a few moves; std::copy_n (memmove) stays a
      // library call per block of 6 floats, which was 6% of a fused sweep at B = 8192, D = 128 (AVX2).
      int64_t c0 = 0;
      for (; c0 + NN_MR <= cols; c0 += NN_MR, dst += k * NN_MR) std::memcpy(dst, row + c0, NN_MR * sizeof(float));
      if (c0 < cols) std::copy_n(row + c0, cols - c0, dst);
    }
    for (int64_t s0 = 0; s0 < k; s0 += NN_KC) {
      const int64_t kc = std::min(NN_KC, k - s0);
      for_column_blocks(n, [&](int64_t v0, auto nv) {
        constexpr int NV = decltype(nv)::value;
        nn_columns<NN_MR, NV>(buf + s0 * NN_MR, k, 1, NN_MR, packed + v0 * W * k + s0 * NV * W,
                              NV * W, cols, kc, C + j0 * ldc + v0 * W, ldc, true);
      });
    }
  }
}

}  // namespace

const GemmOps& gemm_ops() {
  static const GemmOps table{kPanel, W, pack_panels, gemm_nt, gemm_nn, gemm_tn};
  return table;
}

}  // namespace rmi_fast::cpu::RMI_VEC_ISA
