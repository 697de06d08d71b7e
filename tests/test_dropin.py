"""rmi_fast as a drop-in loss for other robust contrastive trainers, and the loss options they need.

Part 1 writes each method's loss in plain PyTorch on the materialised score matrix, from the method's definition, and
checks that the rmi_fast call that replaces it gives the same value and input gradients (fp32, within 1e-5).
Part 2 checks the options (targets, label smoothing, SupCon labels, logit_scale, normalize, detach_keys, the (N, V, D)
views layout) against the fp64 oracle of rmi_fast.reference. Part 3: their argument validation.
"""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

import rmi_fast as rf
from rmi_fast import reference as R

from conftest import tolerance

TIGHT = dict(atol=1e-5, rtol=1e-5)


def _emb(*shape, seed=0, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    return (scale * torch.randn(*shape, generator=g)).requires_grad_()


def _same(ours, theirs, leaves):
    """Equal values and equal gradients for every leaf (None where neither reaches it)."""
    torch.testing.assert_close(ours, theirs, **TIGHT)
    g_ours = torch.autograd.grad(ours, leaves, allow_unused=True, retain_graph=True)
    g_theirs = torch.autograd.grad(theirs, leaves, allow_unused=True)
    for a, b in zip(g_ours, g_theirs):
        assert (a is None) == (b is None)
        if a is not None:
            torch.testing.assert_close(a, b, **TIGHT)


# ----------------------------------------------------------------------------------------------------------------
# Part 1: each method's loss, written here from its definition.
# ----------------------------------------------------------------------------------------------------------------

def _simclr_pair_loss(h1, h2, tau):
    """NT-Xent of SimCLR for two views (N, D): anchor a's positive is its partner view, its denominator every other
    of the 2N rows; cosine similarity; mean over the 2N anchors."""
    h = F.normalize(torch.cat([h1, h2]), dim=1)
    n = h1.shape[0]
    sim = h @ h.t() / tau
    sim = sim.masked_fill(torch.eye(2 * n, dtype=torch.bool), float("-inf"))
    partner = torch.cat([torch.arange(n, 2 * n), torch.arange(0, n)])
    return F.cross_entropy(sim, partner)


def test_acl_dual_stream(backend):
    """ACL (Jiang et al. 2020), dual stream: NT-Xent over the two natural views plus NT-Xent over the two adversarial
    views (separate batch-norm streams in the encoder), averaged."""
    n, d, tau = 32, 64, 0.5
    nat1, nat2, adv1, adv2 = (_emb(n, d, seed=s) for s in range(4))
    theirs = 0.5 * (_simclr_pair_loss(nat1, nat2, tau) + _simclr_pair_loss(adv1, adv2, tau))
    ours = 0.5 * (rf.nt_xent_loss(torch.cat([nat1, nat2]), temperature=tau, backend=backend)
                  + rf.nt_xent_loss(torch.stack([adv1, adv2], 1), temperature=tau, backend=backend))
    _same(ours, theirs, [nat1, nat2, adv1, adv2])


def test_rocl(backend):
    """RoCL (Kim et al. 2020): the views t(x), t'(x) and the instance-wise adversarial t(x)^adv; each is an anchor
    whose other two views are positives. As in its released objective the similarity's key side is a stop-gradient
    (sim = ẑ·stop_grad(ẑ)ᵀ/τ) and every ordered positive pair contributes −log p, summed and divided by the 3N rows."""
    n, d, tau = 24, 48, 0.5
    t1, t2, adv = (_emb(n, d, seed=10 + s) for s in range(3))
    h = F.normalize(torch.cat([t1, t2, adv]), dim=1)
    sim = (h @ h.detach().t() / tau).masked_fill(torch.eye(3 * n, dtype=torch.bool), float("-inf"))
    neg_log_p = -torch.log_softmax(sim, dim=1)
    theirs = sum(neg_log_p[i * n:(i + 1) * n, j * n:(j + 1) * n].diagonal().sum()
                 for i in range(3) for j in range(3) if i != j) / (3 * n)
    ours = 2 * rf.nt_xent_loss(torch.cat([t1, t2, adv]), n_views=3, temperature=tau, detach_keys=True,
                               backend=backend)
    _same(ours, theirs, [t1, t2, adv])


def test_rocl_instance_attack_loss(backend):
    """RoCL's attack objective L_con(t(x)+δ, {t'(x)}, {negatives}): the adversarial view against the precomputed,
    fixed embedding of the other view (an InfoNCE over the other view's batch), per sample for the attack."""
    n, d, tau = 20, 32, 0.2
    adv, other = _emb(n, d, seed=20), _emb(n, d, seed=21).detach()
    logits = F.normalize(adv, dim=1) @ F.normalize(other, dim=1).t() / tau
    theirs = F.cross_entropy(logits, torch.arange(n), reduction="none").sum()
    ours = rf.infonce_loss(adv, other, temperature=tau, normalize=True, reduction="none", backend=backend).sum()
    _same(ours, theirs, [adv])


def _supcon(features, tau, base_tau, labels=None):
    """SupCon (Khosla et al. 2020) on features (N, V, D) (already normalised): anchor a's positives P(a) are the other
    rows of its class (of its sample when unlabelled); loss_a = −(τ/τ_base)·mean_{p∈P(a)} log softmax_{k≠a}(S_a)[p]."""
    n, v, _ = features.shape
    flat = features.transpose(0, 1).reshape(n * v, -1)
    owner = torch.arange(n).repeat(v) if labels is None else labels.repeat(v)
    not_self = ~torch.eye(n * v, dtype=torch.bool)
    sim = (flat @ flat.t() / tau).masked_fill(~not_self, float("-inf"))
    log_p = torch.log_softmax(sim, dim=1)
    pos = (owner[:, None] == owner[None, :]) & not_self
    mean_log_p = log_p.masked_fill(~pos, 0.0).sum(1) / pos.sum(1)
    return -(tau / base_tau) * mean_log_p.mean()


def test_advcl(backend):
    """AdvCL (Fan et al. 2021): one contrastive loss over four views per image (the adversarial view, two
    augmentations and the high-frequency component), each view's positives being the other three, in the SupCon
    form with its τ/τ_base factor. (AdvCL's pseudo-label cross-entropy is an ordinary classification loss.)"""
    n, d, tau, base_tau = 16, 40, 0.5, 0.07
    views = [_emb(n, d, seed=30 + s) for s in range(4)]
    features = F.normalize(torch.stack(views, 1), dim=2)
    theirs = _supcon(features, tau, base_tau)
    ours = (tau / base_tau) * rf.nt_xent_loss(features, temperature=tau, normalize=False, backend=backend)
    _same(ours, theirs, views)


def test_supcon_with_labels(backend):
    n, d, tau = 30, 24, 0.1
    a, b = _emb(n, d, seed=40), _emb(n, d, seed=41)
    labels = torch.randint(0, 6, (n,), generator=torch.Generator().manual_seed(0))
    features = F.normalize(torch.stack([a, b], 1), dim=2)
    theirs = _supcon(features, tau, tau, labels)
    ours = rf.nt_xent_loss(features, temperature=tau, normalize=False, labels=labels, backend=backend)
    _same(ours, theirs, [a, b])


def test_tecoa(backend):
    """TeCoA (Mao et al. 2023): cross-entropy of the (adversarial) image embeddings against the class-text
    embeddings, cosine similarity times CLIP's learnable logit scale exp(s)."""
    n, c, d = 40, 10, 64
    image, text = _emb(n, d, seed=50), _emb(c, d, seed=51)
    log_scale = torch.tensor(math.log(1 / 0.07), requires_grad=True)
    y = torch.randint(0, c, (n,), generator=torch.Generator().manual_seed(1))
    logits = log_scale.exp() * F.normalize(image, dim=1) @ F.normalize(text, dim=1).t()
    theirs = F.cross_entropy(logits, y)
    ours = rf.infonce_loss(image, text, targets=y, logit_scale=log_scale, normalize=True, backend=backend)
    _same(ours, theirs, [image, text, log_scale])


# ----------------------------------------------------------------------------------------------------------------
# Part 2: the options against the fp64 oracle (non-uniform upstream weights for the per-sample outputs).
# ----------------------------------------------------------------------------------------------------------------

def _against_oracle(ours, oracle, leaves, mean_call=None):
    w = torch.linspace(0.2, 1.8, ours.numel()).reshape(ours.shape)
    grads = torch.autograd.grad((ours * w).sum(), leaves, allow_unused=True)
    leaves64 = [t.detach().double().requires_grad_() for t in leaves]
    ref = oracle(*leaves64)
    ref_grads = torch.autograd.grad((ref * w.double()).sum(), leaves64, allow_unused=True, retain_graph=True)
    tol = tolerance(torch.float32)
    torch.testing.assert_close(ours.double(), ref.detach(), **tol)
    for a, b in zip(grads, ref_grads):
        if b is None:
            assert a is None or not a.any()
        else:
            torch.testing.assert_close(a.double(), b, **tol)
    if mean_call is not None:  # the fused (reduction="mean") path: value and gradients
        mean = mean_call()
        torch.testing.assert_close(mean.double(), ref.detach().mean(), **tol)
        for a, b in zip(torch.autograd.grad(mean, leaves, allow_unused=True),
                        torch.autograd.grad(ref.mean(), leaves64, allow_unused=True)):
            if b is not None:
                torch.testing.assert_close(a.double(), b, **tol)


@pytest.mark.parametrize("smoothing", [0.0, 0.1])
@pytest.mark.parametrize("B,C", [(37, 5), (8, 64)])
def test_targets_against_oracle(backend, B, C, smoothing):
    za, zb = _emb(B, 16, seed=1), _emb(C, 16, seed=2)
    t = torch.randint(0, C, (B,), generator=torch.Generator().manual_seed(3))
    kw = dict(temperature=0.3, targets=t, label_smoothing=smoothing, backend=backend)
    out = rf.infonce_loss(za, zb, reduction="none", **kw)
    assert out.shape == (B,)
    _against_oracle(out, lambda a, b: R.infonce_loss(a, b, 0.3, targets=t, label_smoothing=smoothing), [za, zb],
                    lambda: rf.infonce_loss(za, zb, **kw))


@pytest.mark.parametrize("symmetric", [False, True])
def test_label_smoothing_against_oracle(backend, symmetric):
    za, zb = _emb(29, 12, seed=4), _emb(29, 12, seed=5)
    kw = dict(temperature=0.5, label_smoothing=0.2, symmetric=symmetric, backend=backend)
    out = rf.infonce_loss(za, zb, reduction="none", **kw)
    _against_oracle(out, lambda a, b: R.infonce_loss(a, b, 0.5, symmetric, label_smoothing=0.2), [za, zb],
                    lambda: rf.infonce_loss(za, zb, **kw))


@pytest.mark.parametrize("symmetric", [False, True])
def test_logit_scale_normalize_detach_keys_against_oracle(backend, symmetric):
    za, zb = _emb(33, 20, seed=6), _emb(33, 20, seed=7)
    log_scale = torch.tensor(2.5, requires_grad=True)
    kw = dict(logit_scale=log_scale, normalize=True, detach_keys=True, symmetric=symmetric, backend=backend)
    out = rf.infonce_loss(za, zb, reduction="none", **kw)

    def oracle(a, b, ls):
        return R.infonce_loss(F.normalize(a, dim=1), F.normalize(b, dim=1).detach(), 1 / ls.exp(), symmetric)

    _against_oracle(out, oracle, [za, zb, log_scale], lambda: rf.infonce_loss(za, zb, **kw))


@pytest.mark.parametrize("layout", ["blocked", "interleaved", "views"])
@pytest.mark.parametrize("n_views", [1, 2, 3])
def test_supcon_labels_against_oracle(backend, layout, n_views):
    n, d = 21, 10
    labels = torch.randint(0, 7, (n,), generator=torch.Generator().manual_seed(8))
    labels[0] = 100  # a class of one sample: with a single view that anchor has no positive
    z = _emb(n * n_views, d, seed=9)
    kw = dict(temperature=0.4, labels=labels, backend=backend)
    if layout == "views":  # (N, V, D) is the interleaved row order
        call = lambda red: rf.nt_xent_loss(z.view(n, n_views, d), reduction=red, **kw).flatten()  # noqa: E731
        ref_layout = "interleaved"
    else:
        call = lambda red: rf.nt_xent_loss(z, n_views=n_views, layout=layout, reduction=red, **kw)  # noqa: E731
        ref_layout = layout
    out = call("none")
    assert out.shape == (n * n_views,)
    _against_oracle(out, lambda t: R.nt_xent_loss(t, n_views, 0.4, True, ref_layout, labels=labels), [z],
                    lambda: call("mean").squeeze())


def test_supcon_deterministic_class_sums_agree(backend):
    """deterministic=True sums each class by prefix sums (no atomics): same value and gradient, twice the same bits."""
    z = _emb(40, 3, 6, seed=14)
    labels = torch.randint(0, 5, (40,), generator=torch.Generator().manual_seed(15))
    runs = [rf.nt_xent_loss(z, labels=labels, reduction="none", deterministic=det, backend=backend)
            for det in (False, True, True)]
    grads = [torch.autograd.grad(r.sum(), z)[0] for r in runs]
    torch.testing.assert_close(runs[1], runs[0], atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(grads[1], grads[0], atol=1e-6, rtol=1e-6)
    assert torch.equal(runs[1], runs[2]) and torch.equal(grads[1], grads[2])


def test_views_tensor_and_detach_keys_against_oracle(backend):
    n, v, d = 15, 3, 8
    z = _emb(n, v, d, seed=11)
    out = rf.nt_xent_loss(z, temperature=0.3, detach_keys=True, reduction="none", backend=backend)
    assert out.shape == (n, v)

    def oracle(t):
        # stop-gradient on the key side: S = ẑ·stop_grad(ẑ)ᵀ; written as ẑ·ẑᵀ with the key side detached
        zf = F.normalize(t.reshape(n * v, d), dim=1)
        S = zf @ zf.detach().t() / 0.3
        mask = torch.eye(n * v, dtype=torch.bool)
        log_p = torch.log_softmax(S.masked_fill(mask, -math.inf), dim=1)
        sample = R.views_index(n, v, "interleaved")
        pos = (sample[:, None] == sample[None, :]) & ~mask
        return (-(log_p.masked_fill(~pos, 0.0).sum(1)) / (v - 1)).view(n, v)

    _against_oracle(out, oracle, [z],
                    lambda: rf.nt_xent_loss(z, temperature=0.3, detach_keys=True, backend=backend))


def test_large_scores_stay_finite(backend):
    za, zb = _emb(16, 8, seed=12, scale=30.0), _emb(4, 8, seed=13, scale=30.0)
    t = torch.arange(16) % 4
    out = rf.infonce_loss(za, zb, temperature=0.01, targets=t, label_smoothing=0.1, backend=backend)
    ref = R.infonce_loss(za.double(), zb.double(), 0.01, targets=t, label_smoothing=0.1).mean()
    assert torch.isfinite(out)
    torch.testing.assert_close(out.double(), ref, rtol=1e-5, atol=1e-3)


# ----------------------------------------------------------------------------------------------------------------
# Part 3: validation of the new arguments.
# ----------------------------------------------------------------------------------------------------------------

za, zb, cls = torch.randn(8, 4), torch.randn(8, 4), torch.randn(3, 4)


@pytest.mark.parametrize("call, error, words", [
    (lambda: rf.infonce_loss(za, zb, temperature=0.1, logit_scale=2.0), ValueError,
     "give either temperature (scale = 1/temperature) or logit_scale"),
    (lambda: rf.infonce_loss(za, zb, logit_scale=torch.ones(2)), ValueError, "logit_scale must be a float or a 0-d"),
    (lambda: rf.infonce_loss(za, cls), ValueError, "same batch size B"),
    (lambda: rf.infonce_loss(za, cls, targets=torch.zeros(8)), TypeError, "targets must be an integer tensor"),
    (lambda: rf.infonce_loss(za, cls, targets=[0] * 8), TypeError, "targets must be a torch.Tensor"),
    (lambda: rf.infonce_loss(za, cls, targets=torch.zeros(7, dtype=torch.long)), ValueError,
     "targets must have shape (8,)"),
    (lambda: rf.infonce_loss(za, cls, targets=torch.full((8,), 3)), ValueError, "targets must lie in [0, C) = [0, 3)"),
    (lambda: rf.infonce_loss(za, cls, targets=torch.full((8,), -1)), ValueError, "targets must lie in"),
    (lambda: rf.infonce_loss(za, cls, targets=torch.zeros(8, dtype=torch.long), symmetric=True), ValueError,
     "symmetric=True is not defined with targets"),
    (lambda: rf.infonce_loss(za, zb, label_smoothing=1.0), ValueError, "label_smoothing must be a number in [0, 1)"),
    (lambda: rf.infonce_loss(za, zb, label_smoothing=-0.1), ValueError, "label_smoothing must be"),
    (lambda: rf.infonce_loss(za, zb, gather="yes"), TypeError, "gather must be a bool or a torch.distributed"),
    (lambda: rf.infonce_loss(za, zb, gather=True), RuntimeError, "gather=True needs an initialised"),
    (lambda: rf.mi_bound(za, zb, "dv", gather=True), RuntimeError, "init_process_group"),
    (lambda: rf.nt_xent_loss(za, gather=True), RuntimeError, "gather=True needs an initialised"),
    (lambda: rf.nt_xent_loss(torch.randn(4, 2, 3), layout="blocked"), ValueError, "layout applies to a 2-D z only"),
    (lambda: rf.nt_xent_loss(torch.randn(4, 2, 3), n_views=3), ValueError, "n_views=3 contradicts z of shape"),
    (lambda: rf.nt_xent_loss(torch.randn(4, 1, 3)), ValueError, "n_views must be an integer ≥ 2"),
    (lambda: rf.nt_xent_loss(za, labels=torch.zeros(8, dtype=torch.long)), ValueError, "labels must have shape (4,)"),
    (lambda: rf.nt_xent_loss(za, labels=torch.zeros(4)), TypeError, "labels must be an integer tensor"),
    (lambda: rf.nt_xent_loss(za[:1], n_views=1, labels=torch.zeros(1, dtype=torch.long)), ValueError,
     "at least 2 rows"),
])
def test_bad_option_names_the_argument(call, error, words):
    with pytest.raises(error) as info:
        call()
    assert words in str(info.value)


def test_single_view_supcon_is_allowed():
    z = torch.randn(6, 4)
    loss = rf.nt_xent_loss(z, n_views=1, labels=torch.tensor([0, 0, 1, 1, 2, 3]), reduction="none")
    assert loss.shape == (6,) and (loss[4:] == 0).all() and (loss[:4] > 0).all()
