"""PGD / APGD against closed forms and brute-force references; state hygiene; the gradient-masking check."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from rmi_fast.attacks import apgd, apgd_checkpoints, eval_mode, gradient_masking_check, pgd


def _linear_problem(n=6, d=10, seed=0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(d, generator=g, dtype=torch.float64)
    x = 0.2 + 0.6 * torch.rand(n, d, generator=g, dtype=torch.float64)  # inside [0, 1] with a 0.2 margin
    return w, x


def _per_sample_norm(v, norm):
    v = v.reshape(v.shape[0], -1)
    return v.abs().amax(1) if norm == "Linf" else v.norm(dim=1)


def _mlp(seed=0, d=8):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(d, 16), nn.Tanh(), nn.Dropout(0.5), nn.Linear(16, 3))


# ----------------------------------------------------------------------------------------------------- closed forms

@pytest.mark.parametrize("per_sample", [False, True])
def test_linf_linear_worst_case_is_exact(per_sample):
    # min over the ℓ∞ ball of <w, x'> is attained at x − ε·sign(w), coordinate by coordinate
    w, x = _linear_problem()
    eps = 0.1
    loss = (lambda z: -(z @ w)) if per_sample else (lambda z: -(z @ w).sum())
    x_adv = pgd(loss, x, eps=eps, alpha=eps / 2, steps=5, clamp=None, per_sample=per_sample)
    torch.testing.assert_close(x_adv, x - eps * w.sign(), rtol=0, atol=1e-12)
    # with the box: the problem is separable, so the worst case is the clamped corner
    x_adv = pgd(loss, x, eps=0.3, alpha=0.15, steps=5, per_sample=per_sample)
    torch.testing.assert_close(x_adv, (x - 0.3 * w.sign()).clamp(0, 1), rtol=0, atol=1e-12)


def test_l2_linear_worst_case_is_exact():
    w, x = _linear_problem()
    eps = 0.25
    x_adv = pgd(lambda z: -(z @ w), x, eps=eps, alpha=0.1, steps=5, norm="L2", per_sample=True, clamp=None)
    torch.testing.assert_close(x_adv, x - eps * w / w.norm(), rtol=0, atol=1e-12)


def test_apgd_linear_worst_case_is_exact():
    w, x = _linear_problem()
    x_adv = apgd(lambda z: -(z @ w), x, eps=0.1, steps=10, clamp=None, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(x_adv, x - 0.1 * w.sign(), rtol=0, atol=1e-12)


@pytest.mark.parametrize("norm, eps", [("Linf", 0.1), ("L2", 0.5)])
@pytest.mark.parametrize("attack", ["pgd", "apgd"])
def test_result_lies_in_ball_and_box(norm, eps, attack):
    model = _mlp()
    g = torch.Generator().manual_seed(1)
    x = torch.rand(32, 8, generator=g)
    x[:4] = 0.0  # samples on the box's faces
    x[4:8] = 1.0
    y = torch.randint(0, 3, (32,), generator=g)
    loss = lambda z: F.cross_entropy(model(z), y, reduction="none")  # noqa: E731
    if attack == "pgd":
        x_adv = pgd(loss, x, eps=eps, alpha=eps / 3, steps=6, norm=norm, random_start=True, restarts=2,
                    per_sample=True, models=[model], generator=g)
    else:
        x_adv = apgd(loss, x, eps=eps, steps=6, norm=norm, restarts=2, models=[model], generator=g)
    assert x_adv.shape == x.shape and x_adv.dtype == x.dtype and not x_adv.requires_grad
    assert (_per_sample_norm(x_adv - x, norm) <= eps + 1e-6).all()
    assert x_adv.min() >= 0 and x_adv.max() <= 1
    assert (x_adv != x).any()


def test_dtype_and_shape_preserved_for_images():
    x = torch.rand(3, 1, 4, 4, dtype=torch.float64)
    x_adv = pgd(lambda z: z.square().sum(), x, eps=0.05, alpha=0.02, steps=3)
    assert x_adv.shape == x.shape and x_adv.dtype == torch.float64


@pytest.mark.parametrize("kwargs", [dict(eps=0.0, steps=5), dict(eps=0.1, steps=0)])
def test_zero_budget_returns_input(kwargs):
    x = torch.rand(4, 3)
    calls = []
    x_adv = pgd(lambda z: calls.append(1) or z.sum(), x, alpha=0.1, **kwargs)
    assert torch.equal(x_adv, x) and not calls
    assert torch.equal(apgd(lambda z: z.sum(1), x, **kwargs), x)


def test_runs_under_no_grad():
    w, x = _linear_problem()
    with torch.no_grad():
        x_adv = pgd(lambda z: -(z @ w).sum(), x, eps=0.1, alpha=0.05, steps=5, clamp=None)
    torch.testing.assert_close(x_adv, x - 0.1 * w.sign(), rtol=0, atol=1e-12)


# ----------------------------------------------------------------------------------------------------- best iterate

def _wavy(z):
    """A nonconvex per-sample objective (N, 2) → (N,) on which fixed-size sign steps overshoot its local maxima."""
    return torch.sin(9.0 * z[:, 0]) * torch.cos(7.0 * z[:, 1]) + 0.3 * z[:, 0]


def _trajectory(x, steps, **kw):
    """Iterates 0..steps of plain PGD, each computed independently as the last iterate of a shorter run."""
    return torch.stack([pgd(lambda z: _wavy(z).sum(), x, steps=k, use_best=False, **kw) for k in range(steps + 1)])


def test_use_best_returns_best_iterate_of_the_trajectory():
    x = torch.tensor([[0.45, 0.5]], dtype=torch.float64)
    kw = dict(eps=0.4, alpha=0.13)
    path = _trajectory(x, 8, **kw)  # (steps + 1, 1, 2)
    values = torch.stack([_wavy(p) for p in path])[:, 0]
    assert values.argmax() < len(values) - 1, "the toy must end below its best iterate"
    best = pgd(lambda z: _wavy(z).sum(), x, steps=8, **kw)
    last = pgd(lambda z: _wavy(z).sum(), x, steps=8, use_best=False, **kw)
    torch.testing.assert_close(best, path[values.argmax()], rtol=0, atol=0)
    torch.testing.assert_close(last, path[-1], rtol=0, atol=0)
    assert _wavy(best) > _wavy(last)


def test_per_sample_best_is_kept_per_sample():
    # the batch objective is the sum of per-sample terms, so all samples share one trajectory either way
    x = torch.tensor([[0.45, 0.5], [0.2, 0.8], [0.7, 0.3], [0.5, 0.55]], dtype=torch.float64)
    kw = dict(eps=0.4, alpha=0.13)
    path = _trajectory(x, 8, **kw)  # (steps + 1, N, 2)
    values = torch.stack([_wavy(p) for p in path])  # (steps + 1, N)
    per_sample = pgd(_wavy, x, steps=8, per_sample=True, **kw)
    expected = path[values.argmax(0), torch.arange(len(x))]
    torch.testing.assert_close(per_sample, expected, rtol=0, atol=0)
    batch = pgd(lambda z: _wavy(z).sum(), x, steps=8, **kw)
    torch.testing.assert_close(batch, path[values.sum(1).argmax()], rtol=0, atol=0)
    assert not torch.equal(per_sample, batch)  # the toy makes the samples peak at different steps
    assert (_wavy(per_sample) >= _wavy(batch)).all()


def test_restarts_keep_the_best_run_and_are_reproducible():
    model = _mlp()
    x = torch.rand(16, 8, generator=torch.Generator().manual_seed(2))
    y = torch.arange(16) % 3
    loss = lambda z: F.cross_entropy(model(z), y, reduction="none")  # noqa: E731
    kw = dict(eps=0.2, alpha=0.05, steps=4, per_sample=True, models=model)
    runs = [pgd(loss, x, random_start=True, restarts=3, generator=torch.Generator().manual_seed(s), **kw)
            for s in (7, 7, 8)]
    assert torch.equal(runs[0], runs[1]) and not torch.equal(runs[0], runs[2])
    single = pgd(loss, x, **kw)  # restart 0 of a non-random-start run is this exact run
    several = pgd(loss, x, restarts=4, generator=torch.Generator().manual_seed(0), **kw)
    with torch.no_grad(), eval_mode(model):
        assert (loss(several) >= loss(single)).all()
    a = apgd(loss, x, eps=0.2, steps=5, restarts=2, models=model, generator=torch.Generator().manual_seed(3))
    b = apgd(loss, x, eps=0.2, steps=5, restarts=2, models=model, generator=torch.Generator().manual_seed(3))
    assert torch.equal(a, b)


# ----------------------------------------------------------------------------------------------------- state hygiene

@pytest.mark.parametrize("attack", ["pgd", "apgd"])
def test_parameters_grads_untouched(attack):
    model = _mlp()
    x, y = torch.rand(8, 8), torch.arange(8) % 3
    loss = lambda z: F.cross_entropy(model(z), y, reduction="none")  # noqa: E731
    if attack == "pgd":
        pgd(loss, x, eps=0.1, alpha=0.03, steps=3, per_sample=True, models=model)
    else:
        apgd(loss, x, eps=0.1, steps=3, models=model)
    assert all(p.grad is None for p in model.parameters())


def test_models_put_in_eval_and_restored_also_on_error():
    model = _mlp()
    model.train()
    model[2].eval()  # a submodule in its own mode must get exactly that mode back
    other = nn.Linear(8, 8).eval()
    seen = []

    def loss(z):
        seen.append((model.training, model[2].training, other.training))
        return model(z).sum()

    pgd(loss, torch.rand(4, 8), eps=0.1, alpha=0.05, steps=2, models=[model, other])
    assert set(seen) == {(False, False, False)}
    assert model.training and model[0].training and not model[2].training and not other.training

    def failing(z):
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        pgd(failing, torch.rand(4, 8), eps=0.1, alpha=0.05, steps=2, models=model)
    assert model.training and not model[2].training


# ----------------------------------------------------------------------------------------------------- APGD

@pytest.fixture(scope="module")
def trained_mlp():
    from rmi_fast.robust.data import load_dataset

    torch.manual_seed(0)
    train, test = load_dataset("digits", "train"), load_dataset("digits", "test")
    model = nn.Sequential(nn.Flatten(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 10))
    opt = torch.optim.Adam(model.parameters(), 1e-2)
    for _ in range(60):  # full-batch Adam: ~97% test accuracy
        opt.zero_grad()
        F.cross_entropy(model(train.images), train.labels).backward()
        opt.step()
    model.eval()
    return model, test.images, test.labels


def test_apgd_at_least_as_strong_as_pgd(trained_mlp):
    model, x, y = trained_mlp
    loss = lambda z: F.cross_entropy(model(z), y, reduction="none")  # noqa: E731
    eps, steps = 0.1, 10
    with torch.no_grad():
        clean = (model(x).argmax(1) == y).float().mean()
    x_pgd = pgd(loss, x, eps=eps, alpha=eps / 4, steps=steps, per_sample=True)
    x_apgd = apgd(loss, x, eps=eps, steps=steps, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        acc_pgd = (model(x_pgd).argmax(1) == y).float().mean()
        acc_apgd = (model(x_apgd).argmax(1) == y).float().mean()
        assert clean > 0.9 and acc_pgd < clean - 0.2  # the attack matters on this model
        assert acc_apgd <= acc_pgd
        assert loss(x_apgd).mean() >= loss(x_pgd).mean()
    assert (x_apgd - x).abs().max() <= eps + 1e-6


@pytest.mark.parametrize("norm, tol", [("Linf", 0.01), ("L2", 0.002)])
def test_apgd_step_size_schedule_converges_to_an_interior_maximum(norm, tol):
    # f(z) = −‖z − c‖² peaks at c inside the ball: PGD's fixed step keeps oscillating around c, APGD's halving closes in
    g = torch.Generator().manual_seed(0)
    x = torch.full((8, 5), 0.5, dtype=torch.float64)
    c = x + 0.4 * torch.rand(8, 5, generator=g, dtype=torch.float64) - 0.2
    loss = lambda z: -(z - c).square().sum(1)  # noqa: E731
    x_apgd = apgd(loss, x, eps=0.3, steps=100, norm=norm, generator=g)
    x_pgd = pgd(loss, x, eps=0.3, alpha=0.075, steps=100, norm=norm, per_sample=True)
    assert _per_sample_norm(x_apgd - c, norm).max() < tol < _per_sample_norm(x_pgd - c, norm).max()


def test_apgd_checkpoints_follow_the_paper():
    # p = 0, 0.22, 0.41, 0.57, 0.70, 0.80, 0.87, 0.93, 0.99, ... → w = ⌈p·N⌉
    assert apgd_checkpoints(100) == [22, 41, 57, 70, 80, 87, 93, 99]
    assert apgd_checkpoints(10) == [3, 5, 6, 7, 8, 9]
    assert apgd_checkpoints(1) == []


# ----------------------------------------------------------------------------------------------------- masking check

def test_gradient_masking_check_flags_inconsistent_results():
    warnings = gradient_masking_check([("natural", 0.90), ("pgd-7", 0.20), ("pgd-50", 0.35), ("apgd", 0.95)])
    assert len(warnings) == 4  # pgd-7 < pgd-50, pgd-7 < apgd, pgd-50 < apgd, apgd above natural
    assert any("'pgd-7'" in w and "'pgd-50'" in w and "gradient masking" in w for w in warnings)
    assert any("'apgd'" in w and "natural" in w for w in warnings)


def test_gradient_masking_check_accepts_consistent_results():
    assert gradient_masking_check([("natural", 96.7), ("pgd-10", 60.6), ("pgd-100", 60.3), ("apgd", 58.1)]) == []
    # differences inside the tolerance are noise, not masking
    assert gradient_masking_check([("pgd", 0.500), ("apgd", 0.508)]) == []
    assert len(gradient_masking_check([("pgd", 0.500), ("apgd", 0.508)], tolerance=0.001)) == 1
    assert len(gradient_masking_check([("pgd", 50.0), ("apgd", 51.5)])) == 1  # percentages: 1 point of slack
    assert gradient_masking_check({"natural": 0.9, "pgd": 0.3, "apgd": 0.2}) == []


def test_gradient_masking_check_compares_only_attacks_of_different_tiers():
    """Peers (one tier) may be ahead of each other by a few samples; a lower tier must not beat a higher one."""
    results = [("natural", 0.90), ("pgd", 0.55), ("pgd-40x5", 0.50), ("apgd-40", 0.52)]
    assert len(gradient_masking_check(results)) == 1  # in list order apgd-40 counts as the stronger of the two
    assert gradient_masking_check(results, tiers={"pgd": 0, "pgd-40x5": 1, "apgd-40": 1}) == []
    (warning,) = gradient_masking_check([("pgd", 0.45), ("pgd-40x5", 0.50), ("apgd-40", 0.44)],
                                        tiers={"pgd": 0, "pgd-40x5": 1, "apgd-40": 1})
    assert "'pgd'" in warning and "'pgd-40x5'" in warning
    with pytest.raises(ValueError, match=r"tiers gives no strength for \['apgd-40'\]"):
        gradient_masking_check(results, tiers={"pgd": 0, "pgd-40x5": 1})
    with pytest.raises(ValueError, match="tiers\\['pgd'\\]"):
        gradient_masking_check(results, tiers={"pgd": -1, "pgd-40x5": 1, "apgd-40": 1})


# ----------------------------------------------------------------------------------------------------- bad inputs

_x = torch.rand(4, 3)
_ok = dict(eps=0.1, alpha=0.05, steps=2)


def _run(**overrides):
    kw = dict(_ok)
    loss_fn = overrides.pop("loss_fn", lambda z: z.sum())
    x = overrides.pop("x", _x)
    kw.update(overrides)
    return pgd(loss_fn, x, **kw)


@pytest.mark.parametrize("call, error, words", [
    (lambda: _run(eps=-0.1), ValueError, "eps must be"),
    (lambda: _run(eps=float("nan")), ValueError, "eps must be"),
    (lambda: _run(eps="0.1"), TypeError, "eps must be a real number"),
    (lambda: _run(alpha=0.0), ValueError, "alpha must be a positive"),
    (lambda: _run(steps=2.5), TypeError, "steps must be an integer"),
    (lambda: _run(steps=-1), ValueError, "steps must be an integer >= 0"),
    (lambda: _run(restarts=0), ValueError, "restarts must be an integer >= 1"),
    (lambda: _run(norm="L1"), ValueError, "norm must be one of"),
    (lambda: _run(clamp=(1.0, 0.0)), ValueError, "clamp must be a (lo, hi) pair with lo < hi"),
    (lambda: _run(clamp=0.5), TypeError, "clamp must be a (lo, hi) pair"),
    (lambda: _run(clamp=iter((0.0, 1.0, 2.0))), TypeError, "clamp must be a (lo, hi) pair"),
    (lambda: _run(models=[lambda z: z]), TypeError, "models must be an nn.Module"),
    (lambda: _run(generator=0), TypeError, "generator must be a torch.Generator"),
    (lambda: _run(loss_fn="ce"), TypeError, "loss_fn must be callable"),
    (lambda: _run(loss_fn=lambda z: z.sum(1)), ValueError, "pass per_sample=True"),
    (lambda: _run(loss_fn=lambda z: z.sum(), per_sample=True), ValueError, "loss_fn must return an (4,) tensor"),
    (lambda: _run(loss_fn=lambda z: 1.0), TypeError, "loss_fn must return a torch.Tensor"),
    (lambda: _run(loss_fn=lambda z: z.sum().detach()), ValueError, "does not depend differentiably"),
    (lambda: _run(x=_x.numpy()), TypeError, "x must be a torch.Tensor"),
    (lambda: _run(x=(_x * 10).long()), TypeError, "x must be a floating-point tensor"),
    (lambda: _run(x=_x + 2), ValueError, "outside clamp"),
    (lambda: _run(x=torch.where(_x > 0.5, float("nan"), _x)), ValueError, "outside clamp"),
    (lambda: apgd(lambda z: z.sum(), _x, eps=0.1, steps=2), ValueError, "per-sample losses"),
    (lambda: apgd(lambda z: z.sum(1), _x, eps=0.1, steps=2, rho=1.5), ValueError, "rho must be in [0, 1]"),
    (lambda: gradient_masking_check([("pgd", "high")]), TypeError, "must be a real number"),
    (lambda: gradient_masking_check([("pgd", 0.1, 0.2)]), TypeError, "results must be (attack_name, accuracy)"),
    (lambda: gradient_masking_check([("pgd", -0.1)]), ValueError, "results['pgd'] must be"),
    (lambda: gradient_masking_check([("pgd", 150.0)]), ValueError, "a percentage in [0, 100]"),
    (lambda: gradient_masking_check(None), TypeError, "results must be (attack_name, accuracy) pairs or a mapping"),
    # a consistent order, but a name given twice would let the later entry stand for the earlier one
    (lambda: gradient_masking_check([("pgd", 0.5), ("apgd", 0.3), ("pgd", 0.2)]), ValueError, "'pgd' appears twice"),
    (lambda: apgd_checkpoints(-1), ValueError, "steps must be an integer >= 0"),
    (lambda: apgd_checkpoints(1.5), TypeError, "steps must be an integer"),
    (lambda: _run(use_best="no"), TypeError, "use_best must be True or False"),
    (lambda: _run(random_start=1), TypeError, "random_start must be True or False"),
    (lambda: _run(per_sample="yes"), TypeError, "per_sample must be True or False"),
    (lambda: _run(models=3), TypeError, "models must be an nn.Module or a sequence of them, got int"),
    (lambda: _run(clamp=(0.0, float("nan"))), ValueError, "clamp must be a finite number"),
])
def test_bad_inputs_name_the_argument(call, error, words):
    with pytest.raises(error) as info:
        call()
    assert words in str(info.value)


@pytest.mark.gpu
def test_attacks_on_cuda():
    w, x = _linear_problem()
    w, x = w.cuda(), x.cuda()
    g = torch.Generator(device="cuda").manual_seed(0)
    x_adv = pgd(lambda z: -(z @ w), x, eps=0.1, alpha=0.05, steps=5, random_start=True, restarts=2, per_sample=True,
                generator=g)
    assert x_adv.device == x.device
    torch.testing.assert_close(x_adv, x - 0.1 * w.sign(), rtol=0, atol=1e-12)
    x_adv = apgd(lambda z: -(z @ w), x, eps=0.1, steps=10, generator=g)
    torch.testing.assert_close(x_adv, x - 0.1 * w.sign(), rtol=0, atol=1e-12)
    with pytest.raises(ValueError, match="generator must be on x's device"):
        pgd(lambda z: -(z @ w).sum(), x, eps=0.1, alpha=0.05, steps=1, generator=torch.Generator())
