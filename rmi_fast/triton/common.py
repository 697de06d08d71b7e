"""Tile primitives and launch plumbing shared by the three kernel families.

Conventions of every kernel in this package (see :mod:`rmi_fast.ops.spec` for the math):

* x: (Gx, Bx, D), y: (Gy, By, D) with Gx, Gy ∈ {1, G}. An operand with one group and G > 1 is broadcast by giving
  the kernel a group stride of 0: it is never copied.
* A score tile is S = scale · A·Bᵀ over a (BLOCK_M, BLOCK_N) block of rows of A and rows of B, accumulated in fp32
  over D in BLOCK_K chunks with ``tl.dot`` (tensor cores for bf16/fp16; fp32 follows ``allow_tf32``).
* Row/column/feature offsets are int64, so B·B and B·D may pass 2³¹.
* Statistics, weights and every cross-tile sum are fp32.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import offline

#: streaming multiprocessors of an H100: the launch heuristics aim to give each at least one program
SMS = 132

# Diagonal handling (PairSpec.diagonal) and transforms, as compile-time codes.
INCLUDE = tl.constexpr(0)
EXCLUDE = tl.constexpr(1)
ZERO = tl.constexpr(2)
DIAGONAL_CODE = {"include": 0, "exclude": 1, "zero": 2}

T_NONE = tl.constexpr(0)
T_CLIP = tl.constexpr(1)
T_EXP_M1 = tl.constexpr(2)
T_SOFTPLUS = tl.constexpr(3)
TRANSFORM_CODE = {"none": 0, "clip": 1, "exp_m1": 2, "softplus": 3}


# --------------------------------------------------------------------------------------------------- tile helpers

@triton.jit
def score_tile(a_ptr, b_ptr, offs_a, offs_b, NA, NB, D, stride_an, stride_ad, stride_bn, stride_bd,
               BLOCK_A: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_K: tl.constexpr, PRECISION: tl.constexpr):
    """raw[a, b] = Σ_k A[offs_a[a], k] · B[offs_b[b], k] in fp32; rows past NA / NB read as 0.

    a_ptr / b_ptr already point at the group; offs_* are int64. B is loaded as a (BLOCK_K, BLOCK_B) tile through its
    strides, so no transposed copy exists anywhere.
    """
    acc = tl.zeros((BLOCK_A, BLOCK_B), dtype=tl.float32)
    a_ok = offs_a[:, None] < NA
    b_ok = offs_b[None, :] < NB
    for k0 in range(0, D, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K).to(tl.int64)
        a = tl.load(a_ptr + offs_a[:, None] * stride_an + offs_k[None, :] * stride_ad,
                    mask=a_ok & (offs_k[None, :] < D), other=0.0)
        b = tl.load(b_ptr + offs_b[None, :] * stride_bn + offs_k[:, None] * stride_bd,
                    mask=b_ok & (offs_k[:, None] < D), other=0.0)
        acc = mma(a, b, acc, PRECISION)
    return acc


@triton.jit
def mma(a, b, acc, PRECISION: tl.constexpr):
    """acc + a·b with fp32 accumulation (acc may be None).

    PRECISION is "tf32" / "ieee" for the tensor cores, or "upcast": multiply the same values in fp32 — exact
    products and fp32 sums, as the tensor cores compute bf16 — for Triton's CPU interpreter, whose dot cannot
    multiply bf16.
    """
    if PRECISION == "upcast":
        return tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
    else:
        return tl.dot(a, b, acc, input_precision=PRECISION)


@triton.jit
def diagonal_mask(i2, j2, diag_offset, DIAG: tl.constexpr):
    """True on the positive pairs (i, i + diag_offset); all False when the diagonal is included."""
    if DIAG == INCLUDE:
        return (i2 < 0) & (j2 < 0)  # i, j ≥ 0 always: an all-False mask of the broadcast shape
    else:
        return j2 == i2 + diag_offset


@triton.jit
def lse_ref(m):
    """The reference point of a running log-sum-exp (its partial sum is Σ e^(T − ref)): the max when finite, else 0,
    as torch.logsumexp does, so a line of −∞ stays at (−∞, 0) and one with a +∞ entry gives +∞, never NaN."""
    return tl.where(tl.abs(m) == float("inf"), 0.0, m)


@triton.jit
def lse_shift(m_from, m_to):
    """e^(ref(m_from) − ref(m_to)) for m_to ≥ m_from: moves a partial sum kept relative to m_from to m_to; 0 from an
    empty (−∞) partial, whose sum is 0 (the exponential alone could overflow there)."""
    return tl.where(m_from == float("-inf"), 0.0, tl.exp(lse_ref(m_from) - lse_ref(m_to)))


@triton.jit
def lse_value(m, s):
    """The log-sum-exp of a (max, partial sum) pair."""
    return lse_ref(m) + tl.log(s)


@triton.jit
def tile_lse(T, AXIS: tl.constexpr):
    """(m, s) with m = max T and s = Σ exp(T − ref(m)) along AXIS."""
    m = tl.max(T, axis=AXIS)
    if AXIS == 1:
        s = tl.sum(tl.exp(T - lse_ref(m)[:, None]), axis=1)
    else:
        s = tl.sum(tl.exp(T - lse_ref(m)[None, :]), axis=0)
    return m, s


@triton.jit
def lse_combine(m1, s1, m2, s2):
    """Merge two (max, sum) partials of a log-sum-exp with a running max: Σ = s1·e^(m1−m) + s2·e^(m2−m) (exponents
    from lse_ref)."""
    m = tl.maximum(m1, m2)
    return m, s1 * lse_shift(m1, m) + s2 * lse_shift(m2, m)


@triton.jit
def clamp_keep_nan(S, c):
    """S clamped to [−c, c], a NaN kept (tl.minimum and tl.maximum would replace it by a bound), as torch.clamp."""
    return tl.clamp(S, -c, c, propagate_nan=tl.PropagateNan.ALL)


@triton.jit
def softplus(S):
    """log(1 + e^S) = max(S, 0) + log1p(e^−|S|), with log1p(t) = log(u)·t/(u − 1), u = 1 + t (exact for tiny t)."""
    t = tl.exp(-tl.abs(S))
    u = 1.0 + t
    log1p = tl.where(u == 1.0, t, tl.log(u) * t / (u - 1.0))
    return tl.maximum(S, 0.0) + log1p


@triton.jit
def sigmoid(S):
    """σ(S) without overflow: e^−|S| ≤ 1 on both branches."""
    t = tl.exp(-tl.abs(S))
    return tl.where(S >= 0, 1.0 / (1.0 + t), t / (1.0 + t))


# ------------------------------------------------------------------------------------------------ launch plumbing

def group_layout(x: torch.Tensor, y: torch.Tensor):
    """(G, x's group stride, y's group stride): a single-group operand gets stride 0, i.e. is broadcast."""
    G = max(x.shape[0], y.shape[0])
    return G, (x.stride(0) if x.shape[0] > 1 else 0), (y.stride(0) if y.shape[0] > 1 else 0)


def dot_precision(dtype: torch.dtype, device: torch.device) -> str:
    """PRECISION of :func:`mma`: fp32 operands use TF32 tensor cores only where PyTorch's matmuls would
    (torch.backends.cuda.matmul.allow_tf32); bf16 under the interpreter is multiplied in fp32."""
    if dtype == torch.bfloat16 and interpreted(device):
        return "upcast"
    tf32 = dtype == torch.float32 and not interpreted(device) and torch.backends.cuda.matmul.allow_tf32
    return "tf32" if tf32 else "ieee"


def on_fma_units(dtype: torch.dtype, device: torch.device) -> bool:
    """fp32 products without TF32: on the FMA units, with their operand tiles in registers (fewer left for tiles)."""
    return dtype == torch.float32 and dot_precision(dtype, device) != "tf32"


def interpreted(device: torch.device) -> bool:
    """Whether launches for ``device`` run under Triton's interpreter: any but a CUDA device, except while they are
    compiled for a GPU offline (:mod:`.offline`), which takes the GPU's tile configurations."""
    return device.type != "cuda" and not offline.active()


def tile_config(D: int, device: torch.device, dtype: torch.dtype = torch.bfloat16, atomic: bool = False,
                whole_rows: int = 0) -> dict:
    """Block sizes and launch options of the gradient sweep for operands of ``dtype`` (``atomic``: for the variant
    that also adds the other operand's gradient with atomics; ``whole_rows``: for the "whole" plan's tile of that many
    other rows, see below).

    Under the interpreter: the smallest tiles tl.dot accepts (speed of the CPU emulation). On a GPU, BLOCK_D bounds
    the fp32 gradient accumulator kept in registers (BLOCK_M × BLOCK_D). A D wider than BLOCK_D adds a grid axis over
    feature blocks, and each block recomputes the score tiles over the whole of D: at D = 512 a pass with
    BLOCK_D = 256 costs three GEMM-sized products, with 512 two. So BLOCK_D is as wide as the registers allow
    (sm_90 cubins compiled as launched, by :mod:`.offline`; tests/test_triton.py checks them):
      bf16/fp16: 512, at 232–254 registers without spills. At 256 these sweeps already take 128–166 registers, which
        also leaves room for one 8-warp block per SM only, so the wider block costs no occupancy. The atomic variant
        also holds its BLOCK_M × BLOCK_D operand slice for the other side's product: 256 (at 512 it spills).
      fp32 with TF32: 256 (at 512 it reaches 255 registers and spills).
      fp32 without TF32 (PyTorch's default): the products run on the FMA units with their operand tiles in
        registers: 64, and the atomic variant's score tiles 32 columns wide (at 64 it spills).
    The "whole" plan's tile spans every other row (BLOCK_N ≥ whole_rows, at most :func:`whole_max_rows`) and BLOCK_D
    is then the width of the slices of D it walks, each product leaving the program at once: 64, with two pipeline
    stages, keeps the staged operands within 164 KB of shared memory at 256 rows (sm_90 allows 227 KB a block).
    Their speed is still to be measured on an H100.
    """
    whole_n = max(16, triton.next_power_of_2(whole_rows))
    if interpreted(device):
        return dict(BLOCK_M=16, BLOCK_N=whole_n if whole_rows else 16, BLOCK_K=16, BLOCK_D=16, num_warps=1,
                    num_stages=1)
    if whole_rows:
        return dict(BLOCK_M=64, BLOCK_N=whole_n, BLOCK_K=32, BLOCK_D=64, num_warps=8, num_stages=2)
    fma = on_fma_units(dtype, device)
    if dtype != torch.float32:
        widest = 256 if atomic else 512
    else:
        widest = 64 if fma else 256
    block_d = min(max(triton.next_power_of_2(D), 16), widest)
    narrow = block_d > 128 or (fma and atomic)  # FMA atomic sweeps: 64-wide score tiles spill 32 B
    return dict(BLOCK_M=64, BLOCK_N=32 if narrow else 64, BLOCK_K=32, BLOCK_D=block_d, num_warps=8, num_stages=3)


def whole_max_rows(device: torch.device, dtype: torch.dtype, columns: bool = False) -> int:
    """The most other rows the "whole" plan's tile holds for operands of ``dtype`` (0: none). Its score tile is
    BLOCK_M × BLOCK_N fp32 in registers: compiled as launched for sm_90, bf16/fp16 hold 256 rows without spills
    (512 spill and overflow shared memory), 128 where the gradient also has the column statistics' term
    (``columns``: 256 spill 136 B), TF32 128 (256 spill), and fp32 on the FMA units, which keeps its operand tiles in
    registers too, spills at 128 already."""
    if interpreted(device):
        return 256
    if dtype != torch.float32:
        return 128 if columns else 256
    return 0 if on_fma_units(dtype, device) else 128


def fwd_config(device: torch.device, rows: int = 0, groups: int = 1, dtype: torch.dtype = torch.bfloat16) -> dict:
    """Tiles of the log-sum-exp sweep over ``rows`` rows in each of ``groups`` groups: no gradient accumulator, so
    larger row blocks (128, 8 warps), but blocks of 64 (4 warps) where 128 would leave SMs without a program (the
    paper's critic at B = 128: 64 programs for 132 SMs), and for fp32 on the FMA units, whose 128-row blocks spill
    (32 B with SMILE's clamp). To be tuned on an H100."""
    if interpreted(device):
        return dict(BLOCK_M=16, BLOCK_N=16, BLOCK_K=16, num_warps=1, num_stages=1)
    if on_fma_units(dtype, device) or triton.cdiv(rows, 128) * groups < SMS:
        return dict(BLOCK_M=64, BLOCK_N=64, BLOCK_K=32, num_warps=4, num_stages=3)
    return dict(BLOCK_M=128, BLOCK_N=64, BLOCK_K=32, num_warps=8, num_stages=3)


def stat_buffer(t: torch.Tensor) -> torch.Tensor:
    """An O(G·B) statistic or weight as a contiguous fp32 tensor the kernels index by (group, row)."""
    return t.detach().to(torch.float32).contiguous()
