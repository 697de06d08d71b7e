"""Every implementation a case is timed with: ours (one per backend), eager PyTorch, ``torch.compile`` of the same
math, peer libraries, and a GEMM reference.

An :class:`Impl` says whether it applies to a case at all (:meth:`Impl.relevant`: a peer that offers no such
function is not listed), and if it applies but cannot run here, why (:meth:`Impl.why_not`: the runner records that
as a row with the reason). :meth:`Impl.build` returns a zero-argument callable; for autograd impls it returns the
case's value (a 0-d tensor on the same scale as ours, so values can be compared), whose backward is the timed
backward pass.
"""
from __future__ import annotations

import fnmatch

import importlib
import importlib.metadata
import math
from typing import Callable

import torch
import torch.nn.functional as F

from .. import backends, reference
from .cases import BOUNDS, SCALE, Case

Fn = Callable[[], object]


def _is_cuda(device: str) -> bool:
    return device.startswith("cuda")


def dist_version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


class Impl:
    name = "?"
    #: computes the case's negative part without a B×B matrix (its fwd+bwd rows get a "% of GEMM" figure)
    fused = False

    def relevant(self, case: Case, device: str) -> bool:
        return case.op != "train_step"

    def why_not(self, case: Case, device: str) -> str | None:
        return None

    def passes(self, case: Case) -> tuple[str, ...]:
        return case.passes

    def autograd(self, case: Case) -> bool:
        """True: build() returns the value and the bwd / fwd+bwd passes call its backward. False: the callable is
        timed as a whole for each of :meth:`passes`."""
        return case.op != "train_step"

    def build(self, case: Case, inputs: dict[str, torch.Tensor], device: str) -> Fn:
        raise NotImplementedError

    def version(self) -> str | None:
        return None


# ------------------------------------------------------------------------------------------------------------ ours

def _ours(case: Case, inputs: dict, backend: str) -> Fn:
    import rmi_fast as rf

    s = SCALE.get(case.op, 1.0)
    if case.op in BOUNDS:
        x, y = inputs["x"], inputs["y"]
        return lambda: rf.mi_bound(x, y, case.op, scale=s, backend=backend)
    if case.op == "infonce_loss":
        x, y = inputs["x"], inputs["y"]
        return lambda: rf.infonce_loss(x, y, temperature=1.0 / s, symmetric=case.symmetric, backend=backend)
    z = inputs["z"]
    return lambda: rf.nt_xent_loss(z, n_views=2, temperature=1.0 / s, backend=backend)


def _worst_case_step_factory():
    """rmi_fast.robust.training.make_worst_case_step, or the reason it is not there."""
    try:
        module = importlib.import_module("rmi_fast.robust.training")
    except Exception as exc:  # the paper's system may be absent or broken: record why
        return None, f"rmi_fast.robust.training cannot be imported: {type(exc).__name__}: {exc}"
    factory = getattr(module, "make_worst_case_step", None)
    if factory is None:
        return None, "rmi_fast.robust.training has no make_worst_case_step"
    return factory, None


class Ours(Impl):
    """rmi_fast through the public API with an explicit backend: "rmi_fast[cpp]", "rmi_fast[torch]", ...

    For the training-step case: make_worst_case_step(dataset="cifar10", batch_size=B, backend=..., device=...,
    seed=0), a zero-argument callable doing one worst-case-MI training step.
    """

    def __init__(self, backend: str):
        self.backend = backend
        self.name = f"rmi_fast[{backend}]"
        self.fused = backend != "torch"

    def relevant(self, case, device):  # train_step too
        return self.backend in backends.preference("cuda" if _is_cuda(device) else "cpu")

    def why_not(self, case, device):
        reason = backends.get(self.backend).unavailable()
        if reason is None and case.op == "train_step":
            reason = _worst_case_step_factory()[1]
        return reason

    def build(self, case, inputs, device):
        if case.op == "train_step":
            factory, reason = _worst_case_step_factory()
            if factory is None:
                raise RuntimeError(reason)
            return factory(dataset="cifar10", batch_size=case.B, backend=self.backend, device=device, seed=0)
        return _ours(case, inputs, self.backend)

    def version(self):
        import rmi_fast

        return rmi_fast.__version__


# ------------------------------------------------------------------------------------------- eager and compiled

def eager_math(case: Case, inputs: dict) -> tuple[Callable, tuple]:
    """The textbook formula on a materialised score matrix, as a function of the input tensors."""
    s = SCALE.get(case.op, 1.0)
    if case.op == "infonce" and case.G == 1:
        log_b = math.log(case.B)

        def infonce(x, y):  # log B − CE(S, diag): the familiar contrastive form
            logits = (x @ y.T) * s
            return log_b - F.cross_entropy(logits, torch.arange(x.shape[0], device=x.device))

        return infonce, (inputs["x"], inputs["y"])
    if case.op in BOUNDS:
        bound = reference.BOUNDS[case.op]
        return (lambda x, y: bound(x, y, s).mean()), (inputs["x"], inputs["y"])
    if case.op == "infonce_loss":
        sym = case.symmetric
        return (lambda x, y: reference.infonce_loss(x, y, 1.0 / s, sym).mean()), (inputs["x"], inputs["y"])
    return (lambda z: reference.nt_xent_loss(z, 2, 1.0 / s).mean()), (inputs["z"],)


class Eager(Impl):
    name = "eager"

    def build(self, case, inputs, device):
        fn, args = eager_math(case, inputs)
        return lambda: fn(*args)

    def version(self):
        return torch.__version__


class Compiled(Impl):
    name = "torch.compile"

    def build(self, case, inputs, device):
        fn, args = eager_math(case, inputs)
        torch.compiler.reset()  # a fresh cache per case: no recompile limit, no memory held for older shapes
        compiled = torch.compile(fn, dynamic=False)
        return lambda: compiled(*args)

    def version(self):
        return torch.__version__


# ----------------------------------------------------------------------------------------------------------- peers

class Peer(Impl):
    """A third-party package; ``ops`` are the ops it offers, ``cuda_only`` when its kernels need a GPU."""

    module = dist = ""
    ops: tuple[str, ...] = ()
    cuda_only = True

    def relevant(self, case, device):
        return case.op in self.ops and (_is_cuda(device) or not self.cuda_only)

    def import_error(self) -> str | None:
        try:
            importlib.import_module(self.module)
        except Exception as exc:
            return f"{self.dist} is not importable ({type(exc).__name__}: {exc}); `pip install {self.dist}`"
        return None

    def why_not(self, case, device):
        return self.import_error()

    def version(self):
        return dist_version(self.dist)


class MemEff(Peer):
    """memeff.MemoryEfficientCLIPLoss(temperature, normalized_inputs=True, stable=False)(x, y): the mean symmetric
    CLIP loss on unit-norm features (its kernels shift the scores by 1/τ, which assumes ‖x‖ = ‖y‖ = 1)."""

    name, module, dist, ops = "memeff", "memeff", "memeff", ("infonce_loss",)

    def why_not(self, case, device):
        if not case.symmetric:
            return "memeff's one-directional loss is LiT (only one tower gets a gradient): not the same function"
        return self.import_error()

    def build(self, case, inputs, device):
        import memeff

        loss = memeff.MemoryEfficientCLIPLoss(temperature=1.0 / SCALE[case.op], normalized_inputs=True, stable=False)
        x, y = inputs["x"], inputs["y"]
        return lambda: loss(x, y)


class InfCL(Peer):
    """inf_cl.cal_flash_loss(q, k, labels=None, scale, head_dim) → per-row CE (B,), computed in fp32 (it upcasts);
    the feature dim is split into heads of ``head_dim`` whose dot products are summed."""

    name, module, dist, ops = "inf-cl", "inf_cl", "inf-cl", ("infonce", "infonce_loss")

    @staticmethod
    def head_dim(D: int) -> int | None:
        if D <= 256:
            return D
        return 256 if D % 256 == 0 else None

    def why_not(self, case, device):
        if self.head_dim(case.D) is None:
            return f"inf-cl splits D into heads of at most 256: D={case.D} is not a multiple of 256"
        return self.import_error()

    def build(self, case, inputs, device):
        from inf_cl import cal_flash_loss

        s, h = SCALE[case.op], self.head_dim(case.D)
        x, y = inputs["x"], inputs["y"]
        if case.op == "infonce":
            log_b = math.log(case.B)
            return lambda: log_b - cal_flash_loss(x, y, scale=s, head_dim=h).mean()
        if case.symmetric:
            return lambda: 0.5 * (cal_flash_loss(x, y, scale=s, head_dim=h).mean()
                                  + cal_flash_loss(y, x, scale=s, head_dim=h).mean())
        return lambda: cal_flash_loss(x, y, scale=s, head_dim=h).mean()


class CutCrossEntropy(Peer):
    """cut_cross_entropy.linear_cross_entropy(e, c, targets, filter_eps=None): CE of e·cᵀ against targets without
    the logit matrix; filter_eps=None keeps its gradient exact (the default filters small softmax entries)."""

    name, module, dist, ops = "cut-cross-entropy", "cut_cross_entropy", "cut-cross-entropy", ("infonce", "infonce_loss")

    def build(self, case, inputs, device):
        from cut_cross_entropy import linear_cross_entropy

        s = SCALE[case.op]
        x, y = inputs["x"], inputs["y"]
        target = torch.arange(case.B, device=x.device)

        def ce(a, b):
            return linear_cross_entropy(a * s, b, target, filter_eps=None)

        if case.op == "infonce":
            log_b = math.log(case.B)
            return lambda: log_b - ce(x, y)
        if case.symmetric:
            return lambda: 0.5 * (ce(x, y) + ce(y, x))
        return lambda: ce(x, y)


class TorchMist(Peer):
    """torch-mist's discriminative estimators with a SeparableCritic (identity features, temperature 1/scale) and
    every other batch row as a negative (neg_samples=-1; InfoNCE: 0, the whole batch). A fresh estimator per call:
    torch-mist caches results per input tensor, which would turn repeated timing calls into cache hits."""

    name, module, dist, cuda_only = "torch-mist", "torch_mist", "torch-mist", False
    ops = ("infonce", "nwj", "dv", "smile", "jsd")  # jsd: listed with the reason it differs
    #: its SeparableCritic multiplies broadcast (B, B, D) operands elementwise: a B·B·D tensor per call
    max_product_mib = 256

    def why_not(self, case, device):
        if case.G > 1:
            return "torch-mist's critics take one (B, D) batch per call: no groups"
        if case.op == "jsd":
            return ("torch-mist's JS uses the Jensen-Shannon loss only to train its critic and reports another "
                    "estimate (a log ratio with a constant baseline, over sampled negatives): not the function jsd")
        product_mib = case.B * case.B * case.D * torch.empty((), dtype=case.torch_dtype).element_size() / 2**20
        if product_mib > self.max_product_mib:
            return (f"torch-mist's SeparableCritic materialises a B×B×D product ({product_mib:.0f} MiB here): run "
                    f"only up to {self.max_product_mib} MiB")
        reason = self.import_error()
        if reason:
            reason += " (it pins numpy<2: pip install --no-deps -r benchmarks/requirements-torch-mist.txt)"
        return reason

    def build(self, case, inputs, device):
        from torch_mist.critic import SeparableCritic
        from torch_mist.estimators.discriminative import implementations as est

        x, y = inputs["x"], inputs["y"]
        temperature = 1.0 / SCALE[case.op]
        make = {
            "infonce": lambda c: est.InfoNCE(c, neg_samples=0),
            "nwj": lambda c: est.NWJ(c, neg_samples=-1),
            "dv": lambda c: est.MINE(c, neg_samples=-1),  # its evaluation baseline (batch log-mean-exp) is DV
            "smile": lambda c: est.SMILE(c, neg_samples=-1, tau=5.0),
        }[case.op]

        def run():
            return make(SeparableCritic(temperature=temperature)).mutual_information(x, y)

        return run


# ------------------------------------------------------------------------------------------------------ reference

class GemmReference(Impl):
    """The 4 necessary GEMMs of a forward+backward (S = x·yᵀ twice, G·y, Gᵀ·x) with a materialised B×B matrix, in
    the case's dtype through the vendor BLAS: the machine's attainable GEMM rate at this shape."""

    name = "gemm-x4"

    def passes(self, case):
        return ("fwd+bwd",)

    def autograd(self, case):
        return False

    def build(self, case, inputs, device):
        if case.op == "nt_xent":
            x = y = inputs["z"].detach()
        else:
            x, y = inputs["x"].detach(), inputs["y"].detach()
        yt = y.transpose(-1, -2)

        def run():
            S = torch.matmul(x, yt)
            torch.matmul(S, y)
            torch.matmul(S.transpose(-1, -2), x)
            return torch.matmul(x, yt)

        return run

    def version(self):
        return torch.__version__


def _ours_all() -> list[Impl]:
    return [Ours(name) for name in backends.names()]


def registry() -> list[Impl]:
    """Every implementation, in table order: ours (backend preference order), eager, compiled, peers, reference."""
    return [*_ours_all(), Eager(), Compiled(), MemEff(), InfCL(), CutCrossEntropy(), TorchMist(), GemmReference()]


def for_case(case: Case, device: str) -> list[Impl]:
    impls = [i for i in registry() if i.relevant(case, device)]
    order = backends.preference("cuda" if _is_cuda(device) else "cpu")
    ours = sorted((i for i in impls if isinstance(i, Ours)), key=lambda i: order.index(i.backend))
    return ours + [i for i in impls if not isinstance(i, Ours)]


def matches(name: str, patterns) -> bool:
    """Whether an implementation name is selected by --impls patterns: the exact name, or a glob (the exact name
    first, since "rmi_fast[cpp]" is also a glob whose brackets match a single character)."""
    return any(name == p or fnmatch.fnmatchcase(name, p) for p in patterns)


def find(name: str) -> Impl:
    for impl in registry():
        if impl.name == name:
            return impl
    raise ValueError(f"unknown implementation {name!r}; known: {[i.name for i in registry()]}")


def baseline_name(case: Case) -> str:
    """The implementation speedups are measured against: eager PyTorch (a training step: our torch backend)."""
    return "rmi_fast[torch]" if case.op == "train_step" else "eager"


def peer_versions() -> dict[str, str | None]:
    return {p.dist: p.version() for p in (MemEff(), InfCL(), CutCrossEntropy(), TorchMist())}
