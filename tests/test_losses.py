"""Contrastive losses on every CPU backend against the fp64 oracle: InfoNCE (plain, symmetric/CLIP) and NT-Xent."""
from __future__ import annotations

import math

import pytest
import torch

import rmi_fast as rf
from rmi_fast import reference as R

from conftest import tolerance


def _z(*shape, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g).requires_grad_()


def _check(out, ref, leaves):
    """Value and gradients (non-uniform upstream weights for per-sample outputs) against the oracle."""
    w = torch.linspace(0.2, 1.8, out.numel()).reshape(out.shape)
    grads = torch.autograd.grad((out * w).sum(), leaves)
    leaves64 = [t.detach().double().requires_grad_() for t in leaves]
    ref_out = ref(*leaves64)
    ref_grads = torch.autograd.grad((ref_out * w.double()).sum(), leaves64)
    tol = tolerance(torch.float32)
    torch.testing.assert_close(out.double(), ref_out.detach(), **tol)
    for a, b in zip(grads, ref_grads):
        torch.testing.assert_close(a.double(), b, **tol)


@pytest.mark.parametrize("symmetric", [False, True])
@pytest.mark.parametrize("B,D", [(2, 3), (33, 17), (130, 64)])
def test_infonce_loss(backend, symmetric, B, D):
    za, zb = _z(B, D), _z(B, D, seed=1)
    out = rf.infonce_loss(za, zb, temperature=0.2, symmetric=symmetric, reduction="none", backend=backend)
    assert out.shape == (B,)
    _check(out, lambda a, b: R.infonce_loss(a, b, 0.2, symmetric), [za, zb])
    mean = rf.infonce_loss(za, zb, temperature=0.2, symmetric=symmetric, backend=backend)
    torch.testing.assert_close(mean, out.mean(), atol=1e-6, rtol=1e-6)


def test_infonce_loss_is_log_b_minus_the_bound(backend):
    za, zb = _z(40, 8), _z(40, 8, seed=2)
    loss = rf.infonce_loss(za, zb, temperature=0.5, backend=backend)
    bound = rf.mi_bound(za, zb, "infonce", scale=2.0, backend=backend)
    torch.testing.assert_close(loss, math.log(40) - bound, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("layout", ["blocked", "interleaved"])
@pytest.mark.parametrize("n_views", [2, 3])
@pytest.mark.parametrize("normalize", [True, False])
def test_nt_xent(backend, layout, n_views, normalize):
    z = _z(n_views * 19, 12, seed=3)
    out = rf.nt_xent_loss(z, n_views=n_views, temperature=0.3, normalize=normalize, layout=layout,
                          reduction="none", backend=backend)
    assert out.shape == (n_views * 19,)
    _check(out, lambda t: R.nt_xent_loss(t, n_views, 0.3, normalize, layout), [z])


def test_learnable_temperature_gets_its_gradient(backend):
    """A learnable logit scale as a 0-d tensor: d loss / d scale against the oracle."""
    za, zb = _z(25, 6), _z(25, 6, seed=4)
    scale = torch.tensor(3.0, requires_grad=True)
    bound = rf.mi_bound(za, zb, "infonce", scale=scale, backend=backend)
    (g,) = torch.autograd.grad(bound, scale)
    s64 = torch.tensor(3.0, dtype=torch.float64, requires_grad=True)
    (rg,) = torch.autograd.grad(R.infonce(za.detach().double(), zb.detach().double(), s64).mean(), s64)
    torch.testing.assert_close(g.double(), rg, atol=1e-4, rtol=1e-4)
