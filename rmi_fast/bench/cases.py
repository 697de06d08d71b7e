"""The benchmark case registry, shared by ``rmi-fast bench`` and the pytest-benchmark files in ``benchmarks/``.

A :class:`Case` is one problem (an op, its shapes and dtype); a *suite* is a named list of cases. Inputs are made
deterministically from a seed, so every implementation of a case sees the same tensors.
"""
from __future__ import annotations

import fnmatch
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F

#: the MI bounds of ``rf.mi_bound`` that have their own benchmark file
BOUNDS = ("infonce", "nwj", "dv", "smile", "jsd")
#: every op a case can run; "train_step" is one worst-case-MI training step of the paper's system
OPS = BOUNDS + ("infonce_loss", "nt_xent", "train_step")
#: timed passes of the kernel ops; a training step has the single pass "step"
PASSES = ("fwd", "bwd", "fwd+bwd")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16, "fp64": torch.float64}

#: critic scale of each op (1/τ): unit-norm embeddings with a typical contrastive temperature
SCALE = {"infonce": 10.0, "nwj": 5.0, "dv": 5.0, "smile": 5.0, "jsd": 5.0, "infonce_loss": 10.0, "nt_xent": 2.0}


@dataclass(frozen=True)
class Case:
    """One benchmark problem.

    op:          one of :data:`OPS`
    B, D:        rows and feature size (NT-Xent: B = n_views·N rows of z)
    G:           groups (y is (G, B, D); x is (B, D) broadcast over them when ``broadcast_x``)
    dtype:       "fp32" | "bf16" | "fp16" | "fp64"
    symmetric:   infonce_loss: the CLIP loss (row and column cross-entropy averaged)
    """

    op: str
    B: int
    D: int
    G: int = 1
    dtype: str = "fp32"
    symmetric: bool = False
    broadcast_x: bool = False

    def __post_init__(self):
        if self.op not in OPS:
            raise ValueError(f"op must be one of {OPS}, got {self.op!r}")
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {list(DTYPES)}, got {self.dtype!r}")

    @property
    def bound(self) -> str:
        """The function computed, as the JSON's "bound" column names it."""
        if self.op == "infonce_loss" and self.symmetric:
            return "clip"
        return self.op

    @property
    def name(self) -> str:
        if self.op == "train_step":
            return f"train_step/cifar10/B{self.B}"
        rows = f"G{self.G}xB{self.B}" if self.G > 1 else f"B{self.B}"
        name = f"{self.bound}/{rows}/D{self.D}/{self.dtype}"
        return name + ("/xbcast" if self.broadcast_x else "")

    @property
    def passes(self) -> tuple[str, ...]:
        return ("step",) if self.op == "train_step" else PASSES

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype]

    def gemm_flops(self) -> float:
        """FLOPs of one B×B score GEMM: 2·G·B²·D (the unit of the nominal pass counts below)."""
        return 2.0 * self.G * self.B * self.B * self.D

    def flops(self, pass_: str) -> float | None:
        """Nominal FLOPs of a pass: the GEMMs a memory-frugal implementation needs.

        fwd: 1 score GEMM; bwd: 3 (recompute S, dx = G·y, dy = Gᵀ·x); fwd+bwd: the 4 necessary GEMMs. The same
        count is used for every implementation, so TFLOP/s compares like with like.
        """
        if self.op == "train_step":
            return None
        return self.gemm_flops() * {"fwd": 1, "bwd": 3, "fwd+bwd": 4}[pass_]

    def as_dict(self) -> dict:
        return asdict(self)


def case_from_dict(d: dict) -> Case:
    return Case(**d)


# --------------------------------------------------------------------------------------------------------- suites

def _grid(ops, shapes, dtype="fp32", **kw) -> list[Case]:
    return [Case(op, B, D, dtype=dtype, **kw) for op in ops for B, D in shapes]


_CONTRASTIVE = ("infonce_loss",)
#: CPU: what a 2-core box finishes in minutes; the design's bar case is infonce B=8192 D=128 fp32.
_CPU_SHAPES = [(1024, 128), (4096, 128), (8192, 128)]
_GPU_BOUND_SHAPES = [(8192, 128), (65536, 128)]

SUITES: dict[str, list[Case]] = {
    "cpu": (
        _grid(BOUNDS, _CPU_SHAPES)
        + _grid(_CONTRASTIVE, _CPU_SHAPES)
        + _grid(_CONTRASTIVE, _CPU_SHAPES, symmetric=True)
        + _grid(("nt_xent",), _CPU_SHAPES)
        + [Case("dv", 128, 256, G=16, broadcast_x=True), Case("dv", 512, 256, G=16, broadcast_x=True),
           Case("dv", 128, 2048, G=64, broadcast_x=True)]  # the paper's critic shape (64 locations), in fp32
        + _grid(BOUNDS, [(512, 128)])  # small enough for torch-mist, which materialises B·B·D
        + [Case("train_step", 128, 0)]
    ),
    "cpu-quick": [Case("infonce", 2048, 128), Case("nwj", 2048, 128)],
    "cuda": (
        # the design's GPU bars
        [Case("infonce_loss", 65536, 512, dtype="bf16", symmetric=True),
         Case("nwj", 65536, 768, dtype="bf16"), Case("jsd", 65536, 768, dtype="bf16"),
         Case("dv", 128, 2048, G=64, dtype="bf16", broadcast_x=True),
         Case("dv", 512, 2048, G=64, dtype="bf16", broadcast_x=True),
         Case("train_step", 128, 0)]
        # the rest of the ops, where eager still fits in memory and where it does not
        + _grid(("infonce", "smile"), _GPU_BOUND_SHAPES, dtype="bf16")
        + [Case("infonce", 16384, 128, dtype="fp32")]
        + _grid(_CONTRASTIVE, [(16384, 512)], dtype="bf16")
        + [Case("nt_xent", 16384, 128, dtype="bf16")]
    ),
    # scaling curves: time and memory against B (D fixed) and against D (B fixed)
    "cpu-scaling": (_grid(("infonce",), [(B, 128) for B in (256, 512, 1024, 2048, 4096, 8192)])
                    + _grid(("infonce",), [(2048, D) for D in (32, 64, 256, 512)])),
    "cuda-scaling": (_grid(("infonce_loss",), [(B, 512) for B in (1024, 2048, 4096, 8192, 16384, 32768, 65536)],
                           dtype="bf16", symmetric=True)
                     + _grid(("infonce_loss",), [(16384, D) for D in (64, 128, 256, 1024, 2048)],
                             dtype="bf16", symmetric=True)),
}


def suite_name(device: str, *, quick: bool = False, scaling: bool = False) -> str:
    kind = "cuda" if device.startswith("cuda") else "cpu"
    if scaling:
        return f"{kind}-scaling"
    if quick:
        if kind != "cpu":
            raise ValueError("--quick is the short CPU run; use --cases to shorten a GPU run")
        return "cpu-quick"
    return kind


def select(cases: list[Case], patterns: list[str] | None) -> list[Case]:
    """The cases whose name matches any of the glob patterns, or starts with one up to a "/" (so "infonce" is the
    infonce cases, not infonce_loss's); all when no pattern is given."""
    if not patterns:
        return list(cases)

    def matches(name: str, p: str) -> bool:
        return fnmatch.fnmatchcase(name, p) or name == p or name.startswith(p.rstrip("/") + "/")

    return [c for c in cases if any(matches(c.name, p) for p in patterns)]


def for_op(op: str, symmetric: bool | None = None) -> list[tuple[str, Case]]:
    """(device kind, case) for every non-scaling suite case of an op (the pytest-benchmark parametrisation)."""
    out = []
    for kind in ("cpu", "cuda"):
        out += [(kind, c) for c in SUITES[kind]
                if c.op == op and (symmetric is None or c.symmetric == symmetric)]
    return out


# --------------------------------------------------------------------------------------------------------- inputs

def make_inputs(case: Case, device: str, seed: int = 0) -> dict[str, torch.Tensor]:
    """Leaf tensors that require grad, made on ``device`` in the case's dtype.

    Embeddings are unit-norm (as contrastive models produce them, and as some peers assume), with the positives
    correlated so the bounds are informative: y = normalize(x + 0.5·noise).
    mi_bound: {"x": (B, D) or (G, B, D), "y": (G, B, D) or (B, D)}; infonce_loss: {"x", "y"} (B, D); nt_xent: {"z"}.
    """
    if case.op == "train_step":
        return {}
    gen = torch.Generator(device="cpu").manual_seed(seed)
    dt = case.torch_dtype

    def leaf(t: torch.Tensor) -> torch.Tensor:
        return t.to(device=device, dtype=dt).requires_grad_(True)

    if case.op == "nt_xent":
        n = case.B // 2
        base = torch.randn(n, case.D, generator=gen)
        views = [base + 0.5 * torch.randn(n, case.D, generator=gen) for _ in range(2)]
        return {"z": leaf(F.normalize(torch.cat(views), dim=-1))}
    xs = (case.B, case.D) if (case.G == 1 or case.broadcast_x) else (case.G, case.B, case.D)
    x = F.normalize(torch.randn(*xs, generator=gen), dim=-1)
    noise = torch.randn(case.G, case.B, case.D, generator=gen) if case.G > 1 else torch.randn(*xs, generator=gen)
    y = F.normalize(x + 0.5 * noise, dim=-1)
    return {"x": leaf(x), "y": leaf(y)}

