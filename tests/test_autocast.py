"""Under torch.autocast the public functions behave as torch.matmul does: fp32/fp16/bf16 embeddings are cast to the
autocast dtype (mixed inputs run in it), fp64 stays fp64, and the statistics stay fp32 on every backend, the eager
``torch`` one included, whose score matmul autocast would otherwise round to bf16."""
from __future__ import annotations

import pytest
import torch

import rmi_fast as rf

from conftest import CPU_BACKENDS

DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)]


def _backends(device: str) -> list[str]:
    return CPU_BACKENDS if device == "cpu" else [b for b in ("triton", "cuda", "torch") if b in rf.available_backends()]


def _leaves(device, *shapes, seed=0):
    """fp32 leaves, then a bf16 copy of each as a fresh leaf (what autocast must reproduce)."""
    g = torch.Generator().manual_seed(seed)
    full = [(torch.randn(s, generator=g) / s[-1] ** 0.5).to(device).requires_grad_() for s in shapes]
    low = [t.detach().bfloat16().requires_grad_() for t in full]
    return full, low


def _mixed_cases(backend):
    """(name, fn of the embeddings, their shapes); deterministic, so that two runs can agree bit for bit on a GPU."""
    o = dict(backend=backend, deterministic=True)
    targets = torch.tensor([0, 3, 1, 1, 2, 0, 3, 2, 1, 0])
    return [
        *[(f"mi_bound[{b}]", lambda x, y, b=b: rf.mi_bound(x, y, b, scale=1.7, **o), [(10, 8), (3, 10, 8)])
          for b in rf.functional.BOUNDS],
        ("MINE", lambda x, y: rf.MINE(**o)(x, y), [(10, 8), (10, 8)]),
        ("infonce_loss targets", lambda za, zb: rf.infonce_loss(za, zb, targets=targets.to(za.device), **o),
         [(10, 8), (4, 8)]),
        ("infonce_loss symmetric", lambda za, zb: rf.infonce_loss(za, zb, symmetric=True, label_smoothing=0.1, **o),
         [(10, 8), (10, 8)]),
        ("nt_xent_loss", lambda z: rf.nt_xent_loss(z, **o), [(12, 8)]),
    ]


@pytest.mark.parametrize("device", DEVICES)
def test_autocast_runs_in_its_dtype_with_fp32_statistics(device):
    """bf16 autocast: the value equals, bit for bit, the same call outside autocast on the embeddings cast to bf16
    (with mixed fp32 and bf16 embeddings, which outside autocast are an error), and the fp32 leaves get those bf16
    gradients in fp32."""
    for backend in _backends(device):
        for name, fn, shapes in _mixed_cases(backend):
            full, low = _leaves(device, *shapes)
            want = fn(*low)
            want.backward()
            given = [full[0]] + low[1:]  # the first embedding in fp32, the others already bf16
            with torch.autocast(device, dtype=torch.bfloat16):
                got = fn(*given)
            assert got.dtype == torch.float32, name
            assert torch.equal(got, want), f"{name} on {backend}: {got.item()} != {want.item()}"
            got.backward()
            assert given[0].grad.dtype == torch.float32, name
            torch.testing.assert_close(given[0].grad, low[0].grad.float(), rtol=0, atol=0, msg=name)


def test_autocast_leaves_fp64_alone_and_mixed_dtypes_outside_it_are_refused():
    x, y = (torch.randn(9, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(s)) for s in (1, 2))
    plain = rf.mi_bound(x, y, "dv")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        under = rf.mi_bound(x, y, "dv")
    assert under.dtype == torch.float64 and torch.equal(under, plain)
    with pytest.raises(TypeError, match="x and y must have the same dtype"):
        rf.mi_bound(x.float(), y.bfloat16(), "dv")


def test_compiled_under_autocast_matches_eager():
    """torch.compile(fullgraph=True) traces the autocast handling: the same value and gradients as eager."""
    fn = lambda x, y: rf.mi_bound(x, y, "dv", scale=2.0)  # noqa: E731
    compiled = torch.compile(fn, fullgraph=True, backend="aot_eager")
    results = []
    for f in (fn, compiled):
        (x, y), _ = _leaves("cpu", (10, 8), (3, 10, 8), seed=4)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            value = f(x, y)
        value.backward()
        results.append((value, x.grad, y.grad))
    for got, want in zip(*results):
        torch.testing.assert_close(got, want)
