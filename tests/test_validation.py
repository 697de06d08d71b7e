"""Every bad input of design §6 gets a ValueError/TypeError that names the argument."""
from __future__ import annotations

import warnings

import pytest
import torch

import rmi_fast as rf

x = torch.randn(8, 4)
y = torch.randn(8, 4)


def _forward_mode(f, primal):
    # torch's forward-mode decompositions still go through torch.jit.script, which warns that it is deprecated
    with torch.autograd.forward_ad.dual_level(), warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        return f(torch.autograd.forward_ad.make_dual(primal, torch.ones_like(primal)))


@pytest.mark.parametrize("call, error, words", [
    (lambda: rf.mi_bound(x.numpy(), y), TypeError, "x must be a torch.Tensor"),
    (lambda: rf.mi_bound(x, [1.0]), TypeError, "y must be a torch.Tensor"),
    (lambda: rf.mi_bound(x.to_sparse(), y), TypeError, "x must be a dense (strided) tensor"),
    (lambda: rf.mi_bound(x[0], y), ValueError, "x must have shape"),
    (lambda: rf.mi_bound(x, y.reshape(1, 1, 8, 4)), ValueError, "y must have shape"),
    (lambda: rf.mi_bound(x.int(), y.int()), TypeError, "x must be float32"),
    (lambda: rf.mi_bound(x, y.double()), TypeError, "x and y must have the same dtype"),
    (lambda: rf.mi_bound(x, y[:, :3]), ValueError, "same feature size D"),
    (lambda: rf.mi_bound(x, y[:5]), ValueError, "same batch size B"),
    (lambda: rf.mi_bound(x.expand(2, 8, 4), y.expand(3, 8, 4)), ValueError, "same number of groups"),
    (lambda: rf.mi_bound(x[:0], y[:0]), ValueError, "x is empty"),
    (lambda: rf.mi_bound(x, y, "nope"), ValueError, "bound must be one of"),
    (lambda: rf.mi_bound(x, y, reduction="avg"), ValueError, "reduction must be one of"),
    (lambda: rf.mi_bound(x, y, backend="gpu9000"), ValueError, "backend must be"),
    (lambda: rf.mi_bound(x, y, "dv", diagonal="keep"), ValueError, "diagonal must be one of"),
    (lambda: rf.mi_bound(x, y, "smile", clip=0.0), ValueError, "clip must be a positive"),
    (lambda: rf.mi_bound(x, y, scale="2"), TypeError, "scale must be a float"),
    (lambda: rf.mi_bound(x, y, scale=float("inf")), ValueError, "scale must be finite"),
    (lambda: rf.mi_bound(x, y, scale=torch.ones(2)), ValueError, "scale must be a float or a 0-d"),
    (lambda: rf.mi_bound(x[:1], y[:1], "dv"), ValueError, "needs negatives"),
    (lambda: rf.mi_bound(x[:1], y[:1], "jsd"), ValueError, "at least 2 rows"),
    (lambda: rf.infonce_loss(x, y, temperature=0.0), ValueError, "temperature must be a positive"),
    (lambda: rf.infonce_loss(x, y, temperature=-1.0), ValueError, "temperature must be a positive"),
    (lambda: rf.infonce_loss(x.expand(2, 8, 4), y), ValueError, "za must have shape (B, D)"),
    (lambda: rf.nt_xent_loss(torch.randn(9, 4), n_views=2), ValueError, "not divisible by n_views"),
    (lambda: rf.nt_xent_loss(torch.randn(8, 4), n_views=1), ValueError, "n_views must be an integer"),
    (lambda: rf.nt_xent_loss(torch.randn(8, 4), layout="mixed"), ValueError, "layout must be one of"),
    (lambda: rf.nt_xent_loss(torch.randn(8, 4), temperature=float("nan")), ValueError, "temperature must be"),
    (lambda: rf.MINE(momentum=1.0), ValueError, "momentum must lie in"),
    (lambda: rf.MINE(momentum="0.9"), ValueError, "momentum must lie in"),
    (lambda: rf.MINE(temperature=0.1), TypeError, "MINE takes mi_bound's options"),
    (lambda: rf.MINE()(x, y, mine_ema=1.0), TypeError, "MINE takes mi_bound's options"),
    (lambda: rf.MINE()([1.0], y), TypeError, "x must be a torch.Tensor"),
    (lambda: rf.MINE()(x[:1], y[:1]), ValueError, "needs negatives"),
    (lambda: rf.MINE()(x, y, diagonal="keep"), ValueError, "diagonal must be one of"),
    # MINE's own options are checked when it is made, not at its first batch
    (lambda: rf.MINE(0.9, reduction="bad"), ValueError, "reduction must be one of"),
    (lambda: rf.MINE(0.9, backend="bad"), ValueError, "backend must be 'auto' or one of"),
    (lambda: rf.MINE(0.9, scale="x"), TypeError, "scale must be a float or a 0-d tensor"),
    (lambda: rf.MINE(0.9, deterministic="no"), TypeError, "deterministic must be True or False"),
    (lambda: rf.mi_bound(x, y, "mine", mine_ema=0.0), ValueError, "mine_ema must be a positive finite"),
    (lambda: rf.mi_bound(x, y, "mine", mine_ema=-1.0), ValueError, "mine_ema must be a positive finite"),
    (lambda: rf.mi_bound(x, y, "mine", mine_ema="a"), ValueError, "mine_ema must be a positive finite"),
    (lambda: rf.mi_bound(x, y, "mine", mine_ema=torch.tensor(float("nan"))), ValueError, "mine_ema must be a positive"),
    (lambda: rf.mi_bound(x, y, "mine", mine_ema=torch.ones(2)), ValueError, "mine_ema must be a float or a 0-d"),
    (lambda: rf.mi_bound(x, y, "dv", mine_ema=1.0), ValueError, "mine_ema is the moving average of bound='mine'"),
    (lambda: rf.mi_bound(x, y, scale=torch.tensor(float("inf"))), ValueError, "scale must be finite"),
    (lambda: rf.mi_bound(x, y, scale=1e39), ValueError, "scale overflows the scores' torch.float32"),
    (lambda: rf.mi_bound(x, y, deterministic=None), TypeError, "deterministic must be True or False"),
    (lambda: rf.mi_bound(x, y, "infonce", diagonal="zero"), ValueError, "diagonal='zero' applies to the negatives"),
    (lambda: rf.infonce_loss(x, y, logit_scale=100.0), ValueError, "exp(logit_scale) must be finite"),
    (lambda: rf.infonce_loss(x, y, temperature=1e-320), ValueError, "temperature=1e-320 is too small"),
    (lambda: rf.infonce_loss(x, y, symmetric="no"), TypeError, "symmetric must be True or False"),
    (lambda: rf.nt_xent_loss(torch.randn(8, 4), temperature=1e-300), ValueError, "1/temperature overflows"),
    (lambda: rf.nt_xent_loss(torch.randn(8, 4), normalize="no"), TypeError, "normalize must be True or False"),
    (lambda: torch.func.grad(lambda q: rf.mi_bound(q, y, "dv"))(x), TypeError, "x is a tensor inside a torch.func"),
    (lambda: torch.func.grad(lambda q: rf.infonce_loss(x, q))(y), TypeError, "zb is a tensor inside a torch.func"),
    (lambda: torch.func.vmap(rf.nt_xent_loss)(torch.randn(3, 8, 4)), TypeError, "z is a tensor inside a torch.func"),
    (lambda: torch.func.grad(lambda s: rf.mi_bound(x, y, scale=s))(torch.tensor(1.0)), TypeError,
     "scale is a tensor inside a torch.func"),
    (lambda: _forward_mode(lambda d: rf.mi_bound(d, y, "infonce"), x), TypeError,
     "x carries a forward-mode tangent (torch.autograd.forward_ad)"),
    (lambda: _forward_mode(lambda d: rf.infonce_loss(x, y, logit_scale=d), torch.tensor(2.0)), TypeError,
     "logit_scale carries a forward-mode tangent"),
])
def test_bad_input_names_the_argument(call, error, words):
    with pytest.raises(error) as info:
        call()
    assert words in str(info.value)


def test_explicit_backend_that_cannot_serve_says_why():
    # The triton backend needs a GPU or the interpreter; asking for it otherwise must explain, not crash.
    from rmi_fast import backends

    if backends.get("triton").why_not(x.unsqueeze(0), y.unsqueeze(0), rf.ops.PairSpec("row_lse")) is None:
        pytest.skip("triton can serve CPU tensors here")
    with pytest.raises(rf.BackendUnavailable, match="backend='triton' cannot serve these inputs: .+"):
        rf.mi_bound(x, y, backend="triton")


def test_device_mismatch_is_reported():
    if not torch.cuda.is_available():
        pytest.skip("needs two devices")
    with pytest.raises(ValueError, match="same device"):
        rf.mi_bound(x, y.cuda())
