"""The oracle itself: fp64 gradcheck, textbook identities, and the torch backend's closed-form gradients."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from rmi_fast import reference as R
from rmi_fast.ops.spec import PairSpec


def _pair(B=6, D=4, seed=0, G=None):
    g = torch.Generator().manual_seed(seed)
    shape = (B, D) if G is None else (G, B, D)
    x = torch.randn(shape, generator=g, dtype=torch.float64, requires_grad=True)
    y = torch.randn(B, D, generator=g, dtype=torch.float64, requires_grad=True)
    return x, y


@pytest.mark.parametrize("bound", list(R.BOUNDS))
def test_gradcheck(bound):
    x, y = _pair(G=2)
    scale = torch.tensor(0.7, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda a, b, s: R.BOUNDS[bound](a, b, s), (x, y, scale))


def test_gradcheck_losses():
    x, y = _pair()
    assert torch.autograd.gradcheck(lambda a, b: R.infonce_loss(a, b, 0.3, True), (x, y))
    z = torch.randn(9, 4, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda t: R.nt_xent_loss(t, 3, 0.5, True, "interleaved"), (z,))


def test_textbook_identities():
    x, y = _pair(B=7)
    S = (x @ y.T).detach()
    # InfoNCE loss is cross-entropy; the bound is log B minus it.
    ce = F.cross_entropy(S, torch.arange(7), reduction="none")
    torch.testing.assert_close(R.infonce(x, y).squeeze(0), math.log(7) - ce)
    # DV with every score equal to c: c − log(mean of e^c) = 0.
    c = torch.ones(5, 1, dtype=torch.float64)
    assert R.dv(c, c, 3.0).abs().max().item() < 1e-12
    # NWJ with all scores 1: 1 − e^0 = 0. JSD with all scores 0: 2·log2 − 2·softplus(0) = 0.
    assert R.nwj(c, c, 1.0).abs().max().item() < 1e-12
    assert R.jsd(c, c, 0.0).abs().max().item() < 1e-12
    # SMILE with a clip above every score equals DV.
    torch.testing.assert_close(R.smile(x, y, 1.0, clip=1e3), R.dv(x, y, 1.0))


@pytest.mark.parametrize("spec", [
    PairSpec("row_lse"), PairSpec("row_lse", columns=True), PairSpec("row_lse", diagonal="exclude"),
    PairSpec("global_lse", diagonal="exclude"), PairSpec("global_lse", "clip", clip=0.8, diagonal="zero"),
    PairSpec("row_sum", "exp_m1", diagonal="exclude"), PairSpec("row_sum", "softplus", diagonal="zero"),
    PairSpec("row_lse", diagonal="exclude", diag_offset=3),
], ids=str)
def test_closed_form_gradients_match_autograd(spec):
    """The torch backend's closed-form G (the spec every kernel implements) equals autograd of its statistics."""
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 5, 3, generator=g, dtype=torch.float64, requires_grad=True)
    By = 8 if spec.diag_offset else 5
    y = torch.randn(1, By, 3, generator=g, dtype=torch.float64, requires_grad=True)
    scale = torch.tensor(1.3, dtype=torch.float64, requires_grad=True)
    stats = R.pair_stats(x, y, scale, spec)
    weights = [torch.rand(s.shape, generator=g, dtype=torch.float64) for s in stats]
    auto = torch.autograd.grad(sum((s * w).sum() for s, w in zip(stats, weights)), (x, y, scale))
    closed = R.pair_grads(x, y, scale.detach(), spec, [s.detach() for s in stats], weights, (True, True, True))
    for a, b in zip(closed, auto):
        torch.testing.assert_close(a, b)
