"""The benchmark's GPU peers compute the function they are timed against, checked on the CPU where they can run.

The bench checks every peer's value and gradients against ours before timing it; these tests run that same check
(``runner.mismatch``) through the adapters of ``rmi_fast.bench.impls`` without a GPU, so a wrong adapter is caught
before a GPU run is spent on it. They skip unless the peer is installed (the test extra installs them).
torch-mist runs on the CPU as it is (scripts/setup.sh installs it). memeff's Triton kernels run under the interpreter
once its CUDA-only guards are lifted; cut-cross-entropy runs its own pure-PyTorch implementation
(``impl="torch_compile"``) of the same function, as its kernels take pointer arguments the interpreter cannot;
inf-cl's kernels use inline PTX, so its row log-sum-exp is computed eagerly here and the rest of its loss (scale,
head split, positives) and our adapter are what is checked.
"""
from __future__ import annotations

import functools

import pytest
import torch

from rmi_fast.bench import impls, runner
from rmi_fast.bench.cases import Case, make_inputs

CASES = [Case("infonce", 64, 32), Case("infonce_loss", 64, 32), Case("infonce_loss", 64, 32, symmetric=True),
         Case("infonce_loss", 48, 512, symmetric=True)]


def _agrees(peer: impls.Impl, case: Case) -> None:
    inputs = make_inputs(case, "cpu")
    ref = runner.ours_reference(case, "cpu", inputs)
    value, grads = runner.evaluate(peer.build(case, inputs, "cpu"), list(inputs.values()), peer.autograd(case))
    assert grads is not None and all(g is not None for g in grads)
    assert runner.mismatch(case, value, grads, *ref) is None


@pytest.mark.skipif(torch.cuda.is_available(), reason="on a GPU the bench itself runs this check")
@pytest.mark.parametrize("case", [c for c in CASES if c.symmetric], ids=lambda c: c.name)
def test_memeff_adapter(case, monkeypatch):
    pytest.importorskip("memeff")
    import memeff._common
    import memeff.clip_loss

    monkeypatch.setattr(memeff.clip_loss, "_validate_features", lambda x, y: None)
    monkeypatch.setattr(memeff._common.torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    _agrees(impls.MemEff(), case)


@pytest.mark.skipif(torch.cuda.is_available(), reason="on a GPU the bench itself runs this check")
@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_cut_cross_entropy_adapter(case, monkeypatch):
    cce = pytest.importorskip("cut_cross_entropy")
    monkeypatch.setattr(cce, "linear_cross_entropy", functools.partial(cce.linear_cross_entropy, impl="torch_compile"))
    _agrees(impls.CutCrossEntropy(), case)


@pytest.mark.skipif(torch.cuda.is_available(), reason="on a GPU the bench itself runs this check")
@pytest.mark.parametrize("case", [c for c in CASES if c.op != "infonce_loss" or c.D == 512], ids=lambda c: c.name)
def test_inf_cl_adapter(case, monkeypatch):
    pytest.importorskip("inf_cl")
    import inf_cl.flash

    def row_lse(q, k):  # (B, heads, head_dim) each → (B,): the log-sum-exp over keys of the head-summed scores
        return torch.einsum("mhd,nhd->mn", q, k).logsumexp(1)

    monkeypatch.setattr(inf_cl.flash.FlashProb, "apply", row_lse)
    _agrees(impls.InfCL(), case)


def test_memeff_refuses_the_one_directional_loss():
    assert "LiT" in impls.MemEff().why_not(Case("infonce_loss", 64, 32), "cpu")


@pytest.mark.parametrize("op", ["infonce", "nwj", "dv", "smile"])
def test_torch_mist_adapter(op):
    pytest.importorskip("torch_mist")
    case = Case(op, 64, 32)
    assert impls.TorchMist().why_not(case, "cpu") is None
    _agrees(impls.TorchMist(), case)


@pytest.mark.parametrize("case, reason", [(Case("jsd", 64, 32), "only to train its critic"),
                                          (Case("dv", 64, 32, G=4), "no groups"),
                                          (Case("nwj", 4096, 128), "B×B×D product")])
def test_torch_mist_declines_what_it_does_not_compute(case, reason):
    assert reason in impls.TorchMist().why_not(case, "cpu")


def test_value_check_tells_neighbouring_conventions_apart():
    """The check before timing catches what a wrong adapter would most likely get wrong: the positive pair counted
    among the negatives, and a gradient left out (a one-tower loss); the same function passes."""
    import rmi_fast as rf
    from rmi_fast.bench.cases import SCALE

    case = Case("dv", 512, 128)
    inputs = make_inputs(case, "cpu")
    x, y = inputs["x"], inputs["y"]
    ref = runner.ours_reference(case, "cpu", inputs)

    def check(fn):
        return runner.mismatch(case, *runner.evaluate(fn, [x, y], True), *ref)

    assert check(lambda: rf.mi_bound(x, y, "dv", scale=SCALE["dv"], backend="torch")) is None
    assert "differs from ours" in check(lambda: rf.mi_bound(x, y, "dv", scale=SCALE["dv"], diagonal="zero"))
    assert check(lambda: rf.mi_bound(x, y.detach(), "dv", scale=SCALE["dv"])) == \
        "no gradient for input 1, where ours has one"
