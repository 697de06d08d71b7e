"""Seeded random configurations of every bound against the fp64 oracle.

Each configuration draws everything at once: bound, groups and which side is broadcast, batch and feature sizes
(row tiles of 128 and ragged SIMD tails included), strides, dtype, reduction (a random upstream weight for "none"),
diagonal mode, a learnable scale, and a score range over three orders of magnitude. Row norms spread over two orders
of magnitude, so that row tiles see very different maxima: a running reference that rises by more than fp32's exp
range between tiles is exercised, which hand-picked cases with scores of a few units never reach.

The criterion is the one the GPU tests hold low precision to, here for every dtype: the error against the fp64
oracle (largest absolute difference over the largest reference entry) is at most 4× that of the same formula in eager
PyTorch in the input dtype, plus a floor: the dtype's resolution of the result, and fp32's resolution of the largest
score, since a kernel that recomputes the scores in its backward (in another tile order than its forward) sees them
differently rounded there, where eager reuses one rounded matrix; for the value also the fp32 rounding of its terms'
parts, and for a gradient the input dtype's rounding of its positive and negative parts, which may cancel. A failure
names its configuration, which reproduces it alone.
"""
from __future__ import annotations

import math
import random

import pytest
import torch
import torch.nn.functional as F

import rmi_fast as rf
from rmi_fast import backends
from rmi_fast import reference as R

from conftest import CPU_BACKENDS

BOUNDS = ["infonce", "nwj", "dv", "smile", "jsd"]
SEEDS, CASES_PER_SEED = 8, 24
#: Triton's CPU interpreter takes about a second a case at B ≤ 64: fewer and smaller draws (also on a GPU).
TRITON_SEEDS, TRITON_CASES, TRITON_MAX_B, TRITON_MAX_G = 3, 6, 64, 3
#: The relative error that rounding the result to the dtype alone may cause.
FLOOR = {torch.float32: 1e-5, torch.bfloat16: 1e-2}
#: NWJ's exp(S − 1) leaves fp32's range near S = 89: its configurations keep the scores below this.
NWJ_MAX_SCORE = 60.0


def _draw(rng: random.Random) -> dict:
    G = rng.choice([1, 1, 2, 3, 8])
    sides = rng.choice(["x", "y", "both"]) if G > 1 else "none"  # which operand carries the groups
    return dict(
        bound=rng.choice(BOUNDS), G=G, sides=sides, B=rng.choice([2, 3, 17, 64, 130, 300]),
        D=rng.choice([1, 3, 8, 16, 33, 64]), strided=rng.random() < 0.3,
        dtype=rng.choice([torch.float32, torch.float32, torch.bfloat16]),
        reduction=rng.choice(["mean", "sum", "none"]), diagonal=rng.choice(["exclude", "zero"]),
        scale=rng.choice([-1, 1]) * math.exp(rng.uniform(math.log(0.05), math.log(50.0))),
        learn_scale=rng.random() < 0.4, clip=rng.choice([1.0, 5.0, 20.0]), seed=rng.randrange(2**31))


def _operand(cfg: dict, grouped: bool, g: torch.Generator) -> torch.Tensor:
    """Unit-variance directions times row norms log-uniform in [0.1, 10], fp64, rounded to the input dtype."""
    shape = (cfg["G"], cfg["B"], cfg["D"]) if grouped else (cfg["B"], cfg["D"])
    t = torch.randn(shape, generator=g, dtype=torch.float64) / math.sqrt(cfg["D"])
    t = t * torch.exp(torch.empty(shape[:-1] + (1,), dtype=torch.float64).uniform_(math.log(0.1), math.log(10.0),
                                                                                   generator=g))
    return t.to(cfg["dtype"]).double()


def _run(cfg: dict, x64: torch.Tensor, y64: torch.Tensor, scale: float, weights: torch.Tensor, dtype, backend=None,
         device="cpu"):
    """(value, dx, dy, dscale) on the CPU, of the bound: the oracle formula in ``dtype`` when backend is None, else
    rmi_fast's on ``device``."""
    x = x64.to(device, dtype)
    y = y64.to(device, dtype)
    if cfg["strided"] and backend is not None:  # every other column of a buffer twice as wide
        x = torch.stack([x, torch.zeros_like(x)], -1).flatten(-2)[..., ::2]
        y = torch.stack([y, torch.zeros_like(y)], -1).flatten(-2)[..., ::2]
    x.requires_grad_()
    y.requires_grad_()
    stat = torch.float64 if dtype == torch.float64 else torch.float32
    s = torch.tensor(scale, dtype=stat, device=device, requires_grad=True)
    bound, reduction = cfg["bound"], cfg["reduction"]
    if backend is None:
        kw = {} if bound == "infonce" else {"diagonal": cfg["diagonal"]}
        if bound == "smile":
            kw["clip"] = cfg["clip"]
        t = R.BOUNDS[bound](x, y, s, **kw)
        if x.dim() == 2 and y.dim() == 2:
            t = t.squeeze(0)
        value = {"mean": t.mean(), "sum": t.sum(), "none": t}[reduction]
    else:
        value = rf.mi_bound(x, y, bound, scale=s if cfg["learn_scale"] else scale, reduction=reduction,
                            backend=backend, diagonal="exclude" if bound == "infonce" else cfg["diagonal"],
                            clip=cfg["clip"])
    out = (value * weights.to(device, value.dtype)).sum() if reduction == "none" else value
    wrt = (x, y, s) if backend is None or cfg["learn_scale"] else (x, y)
    grads = torch.autograd.grad(out, wrt)
    return tuple(t.detach().cpu() for t in (value, *grads))


def _positive_grads(cfg: dict, x64: torch.Tensor, y64: torch.Tensor, scale: float, weights: torch.Tensor):
    """fp64 (dx, dy, dscale) of the bound's positive part alone: the terms of the paired scores."""
    x, y = x64.clone().requires_grad_(), y64.clone().requires_grad_()
    s = torch.tensor(scale, dtype=torch.float64, requires_grad=True)
    pos = s * (x * y).sum(-1)
    if cfg["bound"] == "jsd":
        pos = -F.softplus(-pos)
    value = {"mean": pos.mean(), "sum": pos.sum(), "none": pos}[cfg["reduction"]]
    return torch.autograd.grad((value * weights).sum() if cfg["reduction"] == "none" else value, (x, y, s))


def _error(got: torch.Tensor, ref: torch.Tensor) -> float:
    return ((got.double() - ref).abs().max() / ref.abs().max().clamp_min(1e-30)).item()


def _check(cfg: dict, backend: str, device: str = "cpu") -> None:
    g = torch.Generator().manual_seed(cfg["seed"])
    x64 = _operand(cfg, cfg["sides"] in ("x", "both"), g)
    y64 = _operand(cfg, cfg["sides"] in ("y", "both"), g)
    scale = cfg["scale"]
    if cfg["bound"] == "nwj":  # keep exp(S − 1) inside fp32
        reach = abs(scale) * x64.norm(dim=-1).max().item() * y64.norm(dim=-1).max().item()
        scale *= min(1.0, NWJ_MAX_SCORE / reach)
    terms_shape = (cfg["B"],) if cfg["sides"] == "none" else (cfg["G"], cfg["B"])
    weights = torch.randn(terms_shape, generator=g, dtype=torch.float64)
    oracle = _run(cfg, x64, y64, scale, weights, torch.float64)
    eager = _run(cfg, x64, y64, scale, weights, cfg["dtype"])
    ours = _run(cfg, x64, y64, scale, weights, cfg["dtype"], backend, device)
    eps = torch.finfo(torch.float32).eps
    largest_score = R.scores(x64, y64, scale).abs().max().item()
    floor = FLOOR[cfg["dtype"]] + eps * largest_score
    # A term adds a score, a statistic and a constant such as log B, which may cancel: rounding those parts to fp32
    # moves the value by about eps·(their size) however small it is, an absolute floor of its own.
    summed = math.prod(terms_shape) if cfg["reduction"] == "sum" else 1
    value_floor = 4 * eps * (largest_score + 2 * math.log(cfg["B"]) + 2) * summed
    # The positive and the negative part's gradients are each rounded to the input dtype and then added, where eager
    # rounds their sum: where the two nearly cancel, rounding each part is the floor.
    positive = _positive_grads(cfg, x64, y64, scale, weights)
    names = ["value", "dx", "dy", "dscale"]
    for k, (name, got, ref, base) in enumerate(zip(names, ours, oracle, eager)):
        assert torch.isfinite(got).all(), f"{name} is not finite"
        allowed = 4 * _error(base, ref) + floor
        if name == "value":
            allowed += value_floor / ref.abs().max().clamp_min(1e-30).item()
        else:
            parts = positive[k - 1].abs().max() + (ref - positive[k - 1]).abs().max()
            allowed += torch.finfo(cfg["dtype"]).eps * (parts / ref.abs().max().clamp_min(1e-30)).item()
        assert _error(got, ref) <= allowed, f"{name}: error {_error(got, ref):.3g} > {allowed:.3g}"


def _draws(backend: str, seed: int, cases: int, max_B: int = 10**9, max_G: int = 10**9):
    """The configurations of one seed, B and G capped."""
    rng = random.Random(f"{backend}-{seed}")
    for _ in range(cases):
        cfg = _draw(rng)
        cfg.update(B=min(cfg["B"], max_B), G=min(cfg["G"], max_G))
        yield cfg


def _check_draws(backend: str, *args, device: str = "cpu") -> None:
    for cfg in _draws(backend, *args):
        try:
            _check(cfg, backend, device)
        except AssertionError as exc:
            raise AssertionError(f"{exc}\nconfiguration: {cfg}") from None


@pytest.mark.parametrize("seed", range(SEEDS))
def test_random_configurations(backend, seed):
    _check_draws(backend, seed, CASES_PER_SEED)


@pytest.mark.filterwarnings("ignore::RuntimeWarning:triton.runtime.interpreter")
@pytest.mark.skipif(backends.get("triton").unavailable() is not None,
                    reason=f"triton backend unavailable: {backends.get('triton').unavailable()}")
@pytest.mark.parametrize("seed", range(TRITON_SEEDS))
def test_random_configurations_triton(seed):
    """On a GPU where there is one, else under the interpreter (tests/conftest.py)."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    _check_draws("triton", seed, TRITON_CASES, TRITON_MAX_B, TRITON_MAX_G, device=device)


def test_the_draw_covers_the_options():
    """The seeds above draw every bound, dtype, reduction, diagonal mode and broadcast side, several row tiles and
    scales beyond ±20 (a test of the draw, so that a narrowed generator cannot pass silently)."""
    draws = [cfg for backend in CPU_BACKENDS for seed in range(SEEDS)
             for cfg in _draws(backend, seed, CASES_PER_SEED)]
    for key in ("bound", "dtype", "reduction", "diagonal", "sides", "strided", "learn_scale"):
        assert len({d[key] for d in draws}) >= 2, key
    assert {d["bound"] for d in draws} == set(BOUNDS)
    assert any(d["B"] > 128 for d in draws) and any(abs(d["scale"]) > 20 for d in draws)
