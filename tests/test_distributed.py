"""gather=True against the single-process result on the whole batch, with 2 and 3 gloo ranks on loopback.

Every rank holds a slice of one batch (the same seed everywhere). For each loss:
* the mean over ranks of the returned values equals the single-process value on the concatenated batch;
* the gradient reaching a rank's inputs is world_size × the single-process gradient of that value (DDP averages);
* reduction="none" gives the rank's slice of the single-process per-sample terms, and a weighted sum of them
  sends exactly the single-process gradient of the same weighted sum (the non-fused backward).
Also: MINE's moving average over every rank, an encoder under DistributedDataParallel whose averaged gradient is the
whole batch's, and a clear error for local batches of different sizes. Inputs are fp64 so that only the order of
summation differs.
"""
from __future__ import annotations

import datetime
import math

import pytest
import torch
import torch.distributed as dist

import rmi_fast as rf

from conftest import spawn_ranks

B, D, G = 5, 6, 3  # rows per rank, features, groups


def _emb(*shape, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g, dtype=torch.float64) / math.sqrt(shape[-1])


def _labels(n, seed):
    return torch.randint(0, 3, (n,), generator=torch.Generator().manual_seed(seed))


# name -> (inputs for a world of W ranks, the dims they are split along, the dim of the per-sample output, call)
CASES = {
    "infonce": (lambda W: [_emb(W * B, D, seed=1), _emb(W * B, D, seed=2)], (0, 0), 0,
                lambda a, b, **kw: rf.infonce_loss(a, b, temperature=0.4, **kw)),
    "infonce_symmetric_smoothed": (
        lambda W: [_emb(W * B, D, seed=3), _emb(W * B, D, seed=4)], (0, 0), 0,
        lambda a, b, **kw: rf.infonce_loss(a, b, temperature=0.3, symmetric=True, label_smoothing=0.1,
                                           normalize=True, **kw)),
    "nt_xent": (lambda W: [_emb(W * B, 2, D, seed=5)], (0,), 0,
                lambda z, **kw: rf.nt_xent_loss(z, temperature=0.5, **kw)),
    "nt_xent_3views_detached": (lambda W: [_emb(W * B, 3, D, seed=6)], (0,), 0,
                                lambda z, **kw: rf.nt_xent_loss(z, temperature=0.5, detach_keys=True, **kw)),
    "supcon": (lambda W: [_emb(W * B, 2, D, seed=7), _labels(W * B, 8)], (0, 0), 0,
               lambda z, y, **kw: rf.nt_xent_loss(z, labels=y, temperature=0.3, **kw)),
    "infonce_bound": (lambda W: [_emb(W * B, D, seed=9), _emb(W * B, D, seed=10)], (0, 0), 0,
                      lambda x, y, **kw: rf.mi_bound(x, y, "infonce", scale=2.0, **kw)),
    "dv": (lambda W: [_emb(W * B, D, seed=11), _emb(W * B, D, seed=12)], (0, 0), 0,
           lambda x, y, **kw: rf.mi_bound(x, y, "dv", scale=3.0, **kw)),
    "dv_groups_x_broadcast": (lambda W: [_emb(W * B, D, seed=13), _emb(G, W * B, D, seed=14)], (0, 1), 1,
                              lambda x, y, **kw: rf.mi_bound(x, y, "dv", **kw)),
    "smile": (lambda W: [_emb(W * B, D, seed=15), _emb(W * B, D, seed=16)], (0, 0), 0,
              lambda x, y, **kw: rf.mi_bound(x, y, "smile", scale=4.0, clip=1.0, **kw)),
    "jsd": (lambda W: [_emb(W * B, D, seed=17), _emb(W * B, D, seed=18)], (0, 0), 0,
            lambda x, y, **kw: rf.mi_bound(x, y, "jsd", scale=2.0, **kw)),
    "nwj_zero_diagonal": (lambda W: [_emb(W * B, D, seed=19), _emb(W * B, D, seed=20)], (0, 0), 0,
                          lambda x, y, **kw: rf.mi_bound(x, y, "nwj", diagonal="zero", **kw)),
}

TOL = dict(atol=1e-10, rtol=1e-9)


def _part(t, dim, rank, world):
    n = t.shape[dim] // world
    return t.narrow(dim, rank * n, n)


def _leaves(ts):
    return [t.clone().requires_grad_() if t.is_floating_point() else t for t in ts]


def _grads(out, leaves):
    float_leaves = [t for t in leaves if t.is_floating_point()]
    return torch.autograd.grad(out, float_leaves)


def _check_case(name, rank, world):
    make, dims, out_dim, call = CASES[name]
    inputs = make(world)
    full = _leaves(inputs)
    ref = call(*full)
    ref_grads = _grads(ref, full)
    ref_terms = call(*full, reduction="none")
    weights = torch.linspace(0.5, 1.5, ref_terms.numel(), dtype=ref_terms.dtype).reshape(ref_terms.shape)
    ref_weighted_grads = _grads((weights * ref_terms).sum(), full)

    local = _leaves([_part(t, d, rank, world) for t, d in zip(inputs, dims)])
    float_dims = [d for t, d in zip(inputs, dims) if t.is_floating_point()]
    out = call(*local, gather=True)
    mean = out.detach().clone()
    dist.all_reduce(mean)
    torch.testing.assert_close(mean / world, ref.detach(), **TOL, msg=f"{name}: value")
    for g, rg, d in zip(_grads(out, local), ref_grads, float_dims):
        torch.testing.assert_close(g, world * _part(rg, d, rank, world), **TOL, msg=f"{name}: mean gradient")

    terms = call(*local, gather=True, reduction="none")
    torch.testing.assert_close(terms, _part(ref_terms.detach(), out_dim, rank, world), **TOL, msg=f"{name}: terms")
    local_w = _part(weights, out_dim, rank, world)
    for g, rg, d in zip(_grads((local_w * terms).sum(), local), ref_weighted_grads, float_dims):
        torch.testing.assert_close(g, _part(rg, d, rank, world), **TOL, msg=f"{name}: per-sample gradient")


def _check_ddp(rank, world):
    """DistributedDataParallel + gather=True: the averaged parameter gradient is the whole batch's gradient."""
    torch.manual_seed(0)
    encoder = torch.nn.Linear(D, 4).double()
    x = _emb(world * B, 2, D, seed=23)  # two views of W·B samples
    ref_loss = rf.nt_xent_loss(encoder(x), temperature=0.5) + rf.mi_bound(encoder(x[:, 0]), encoder(x[:, 1]), "dv")
    ref_grads = torch.autograd.grad(ref_loss, list(encoder.parameters()))
    ddp = torch.nn.parallel.DistributedDataParallel(encoder)
    local = _part(x, 0, rank, world)
    z = ddp(local)
    loss = rf.nt_xent_loss(z, temperature=0.5, gather=True) + rf.mi_bound(z[:, 0], z[:, 1], "dv", gather=True)
    loss.backward()
    for p, rg in zip(encoder.parameters(), ref_grads):
        torch.testing.assert_close(p.grad, rg, **TOL, msg="DDP-averaged gradient")


def _worker(rank, world, port, names):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=60))
    try:
        for name in names:
            _check_case(name, rank, world)
        # MINE's moving average over every rank's pairs equals the whole batch's
        x, y = _emb(world * B, D, seed=21), _emb(world * B, D, seed=22)
        mine = rf.MINE(momentum=0.5, scale=2.0, gather=True)
        mine(_part(x, 0, rank, world), _part(y, 0, rank, world))
        whole = rf.MINE(momentum=0.5, scale=2.0)
        whole(x, y)
        torch.testing.assert_close(mine.ema, whole.ema, **TOL)
        _check_ddp(rank, world)
        # different local batch sizes: a clear error on every rank, not an abort inside the backend
        z = torch.randn(4 + 2 * rank, 3)
        try:
            rf.nt_xent_loss(z, gather=True)
        except ValueError as exc:
            assert "same shape on every rank" in str(exc)
        else:
            raise AssertionError("mismatched local batches were not reported")
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("world, names", [
    (2, list(CASES)),
    (3, ["infonce", "infonce_symmetric_smoothed", "nt_xent", "supcon", "dv", "jsd"]),  # fewer: 3 processes, 2 cores
])
def test_gather_matches_the_whole_batch(world, names):
    if not dist.is_available():
        pytest.skip("torch.distributed is not available")
    spawn_ranks(_worker, world, lambda port: (world, port, names))
