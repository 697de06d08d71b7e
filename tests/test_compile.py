"""Models using the losses compile with torch.compile(fullgraph=True), and no fused op syncs with the host.

fullgraph=True fails on any graph break, so a successful compile also shows that the Python around the kernels has
no .item() and no branch on a tensor's value. Meta tensors have shapes but no values, so running every loss and attack
on them shows, on any machine, that nothing reads a value to the host (what would sync a GPU). On a GPU the forward
and backward of every loss run under torch.cuda.set_sync_debug_mode("error") and are captured in a CUDA graph.
"""
from __future__ import annotations

import pytest
import torch

import rmi_fast as rf
from rmi_fast import tracing
from rmi_fast.ops import pairwise
from rmi_fast.attacks import apgd, pgd

N, D_IN, D = 12, 10, 8


class Model(torch.nn.Module):
    """An encoder with a learnable logit scale, and every loss of the package on its embeddings."""

    def __init__(self):
        super().__init__()
        self.encoder = torch.nn.Sequential(torch.nn.Linear(D_IN, 16), torch.nn.ReLU(), torch.nn.Linear(16, D))
        self.logit_scale = torch.nn.Parameter(torch.tensor(2.0))

    def forward(self, x1, x2, class_emb, targets, labels):
        a, b = self.encoder(x1), self.encoder(x2)
        loss = sum(rf.mi_bound(a, b, bound) for bound in ("infonce", "nwj", "dv", "smile", "jsd"))
        loss = loss + rf.mi_bound(a, b.expand(3, *b.shape), "dv", reduction="none").mean()
        loss = loss + rf.infonce_loss(a, b, temperature=0.2, symmetric=True, label_smoothing=0.1)
        loss = loss + rf.infonce_loss(a, class_emb, logit_scale=self.logit_scale, targets=targets, normalize=True)
        loss = loss + rf.infonce_loss(a, b, normalize=True, detach_keys=True, reduction="none").mean()
        loss = loss + rf.nt_xent_loss(torch.stack([a, b], 1), labels=labels)
        loss = loss + rf.nt_xent_loss(torch.cat([a, b]), detach_keys=True, reduction="none").mean()
        return loss


def _inputs(device="cpu", n=N):
    g = torch.Generator().manual_seed(n)
    x1, x2 = torch.rand(n, D_IN, generator=g), torch.rand(n, D_IN, generator=g)
    class_emb = torch.randn(4, D, generator=g)
    targets, labels = torch.randint(0, 4, (n,), generator=g), torch.randint(0, 3, (n,), generator=g)
    return [t.to(device) for t in (x1, x2, class_emb, targets, labels)]


def _value_and_grads(model, fn, inputs):
    model.zero_grad()
    loss = fn(*inputs)
    loss.backward()
    return loss.detach(), [p.grad.clone() for p in model.parameters()]


def _compiled_matches_eager(backend, batches=(N, N), **compile_kwargs):
    """The compiled model's loss and gradients equal eager's for each batch size in turn (a repeated size runs the
    cached graph; a new one recompiles, or reuses a dynamic-shape graph)."""
    torch.manual_seed(0)
    model = Model()
    torch._dynamo.reset()
    compiled = torch.compile(model, fullgraph=True, backend=backend, **compile_kwargs)
    for n in batches:
        inputs = _inputs(n=n)
        ref, ref_grads = _value_and_grads(model, model, inputs)
        out, grads = _value_and_grads(model, compiled, inputs)
        torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
        for g, rg in zip(grads, ref_grads):
            torch.testing.assert_close(g, rg, atol=1e-5, rtol=1e-5)


@pytest.fixture(params=[False, True], ids=["product", "batched"])
def positives(request, monkeypatch):
    """Grouped positive parts as the small (G, B, D) product, or forced onto the batched path of large inputs."""
    if request.param:
        monkeypatch.setattr(pairwise, "_PRODUCT_ELEMENTS", 0)


def test_fullgraph_aot_eager(positives):
    _compiled_matches_eager("aot_eager")


def test_constant_result_marks_a_function_as_torch_does():
    """rmi_fast.tracing sets the attribute of torch.compiler.assume_constant_result without importing the compiler;
    with a torch that marks functions otherwise this fails here (and the fullgraph tests break on the dispatch)."""
    def public():
        return "a"

    def ours():
        return "a"

    assert torch.compiler.assume_constant_result(public) is public
    assert tracing.constant_result(ours) is ours
    assert vars(ours) == vars(public) == {tracing.CONSTANT_RESULT_MARK: True}


@pytest.mark.parametrize("dynamic", [None, True], ids=["automatic", "dynamic"])
def test_fullgraph_dynamic_batch_sizes(dynamic):
    """Batch sizes that change between calls (automatic dynamic shapes after the first change, or dynamic=True from
    the start): the dispatch, by octave of the size, traces into guards, never into a graph break."""
    _compiled_matches_eager("aot_eager", batches=(12, 20, 33, 20), dynamic=dynamic)


def test_fullgraph_inductor_infonce():
    """The default (inductor) backend on a small model: an encoder and a symmetric InfoNCE with a learnable scale."""
    torch.manual_seed(0)
    encoder = torch.nn.Linear(D_IN, D)
    log_scale = torch.nn.Parameter(torch.tensor(1.5))
    x1, x2 = _inputs()[:2]

    def step(a, b):
        return rf.infonce_loss(encoder(a), encoder(b), logit_scale=log_scale, normalize=True, symmetric=True)

    def run(fn):
        encoder.zero_grad()
        log_scale.grad = None
        loss = fn(x1, x2)
        loss.backward()
        return [loss.detach(), encoder.weight.grad.clone(), log_scale.grad.clone()]

    ref = run(step)
    torch._dynamo.reset()
    for a, b in zip(run(torch.compile(step, fullgraph=True)), ref):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_losses_and_attacks_read_no_values_on_meta_tensors(positives):
    """Any .item(), bool(tensor), .tolist() or data-dependent shape raises on a meta tensor."""
    model = Model().to("meta")
    inputs = [t.to("meta") for t in _inputs()]
    model(*inputs).backward()
    assert model.logit_scale.grad is not None and model.logit_scale.grad.is_meta
    x, key = inputs[0], model.encoder(inputs[1]).detach()

    def batch_bound(x_adv):
        return -rf.mi_bound(model.encoder(x_adv), key, "dv")

    def per_sample(x_adv):
        return -rf.mi_bound(model.encoder(x_adv), key, "jsd", reduction="none")

    for norm in ("Linf", "L2"):
        for use_best in (False, True):
            assert pgd(batch_bound, x, eps=0.1, alpha=0.02, steps=2, norm=norm, random_start=True, restarts=2,
                       use_best=use_best, models=model).is_meta
            assert pgd(per_sample, x, eps=0.1, alpha=0.02, steps=2, norm=norm, per_sample=True,
                       use_best=use_best).is_meta
        assert apgd(per_sample, x, eps=0.1, steps=6, norm=norm, restarts=2).is_meta


# ------------------------------------------------------------------------------------------------------- GPU only

def _cuda_backends():
    if not torch.cuda.is_available():
        return ["auto"]
    return [b for b in rf.available_backends() if b in ("torch", "triton", "cuda")] + ["auto"]


@pytest.mark.gpu
@pytest.mark.parametrize("backend", _cuda_backends())
def test_no_host_sync_in_forward_or_backward(backend, positives):
    model = Model().cuda()
    inputs = _inputs("cuda")
    model(*inputs).backward()  # warm-up: lazy initialisation may sync once
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        a = model.encoder(inputs[0])
        b = model.encoder(inputs[1])
        losses = [rf.mi_bound(a, b, bound, backend=backend) for bound in ("infonce", "nwj", "dv", "smile", "jsd")]
        losses += [rf.mi_bound(a, b, "jsd", reduction="none", backend=backend).mean(),
                   rf.infonce_loss(a, b, symmetric=True, label_smoothing=0.1, backend=backend),
                   rf.infonce_loss(a, inputs[2], targets=inputs[3], logit_scale=model.logit_scale, normalize=True,
                                   backend=backend),
                   rf.nt_xent_loss(torch.stack([a, b], 1), labels=inputs[4], backend=backend),
                   rf.nt_xent_loss(torch.cat([a, b]), reduction="none", backend=backend).mean()]
        sum(losses).backward()
    finally:
        torch.cuda.set_sync_debug_mode("default")


@pytest.mark.gpu
def test_cuda_graph_capture_and_replay(positives):
    torch.manual_seed(0)
    encoder = torch.nn.Linear(D_IN, D).cuda()
    x1, x2 = (torch.rand(N, D_IN, device="cuda") for _ in range(2))

    def step():
        a, b = encoder(x1), encoder(x2)
        loss = rf.infonce_loss(a, b, symmetric=True) + rf.mi_bound(a, b, "dv") + rf.nt_xent_loss(torch.cat([a, b]))
        loss.backward()
        return loss

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):
            encoder.zero_grad(set_to_none=False)
            ref = step().detach().clone()
    torch.cuda.current_stream().wait_stream(side)
    ref_grad = encoder.weight.grad.clone()
    graph = torch.cuda.CUDAGraph()
    encoder.zero_grad(set_to_none=False)
    with torch.cuda.graph(graph):
        out = step()
    encoder.weight.grad.zero_()
    graph.replay()
    torch.cuda.synchronize()
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(encoder.weight.grad, ref_grad, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("call, words", [
    (lambda z, v: rf.nt_xent_loss(z, temperature=v), "temperature must be a positive finite number"),
    (lambda z, v: rf.infonce_loss(z, z, label_smoothing=v), "label_smoothing must be a number in [0, 1)"),
], ids=["temperature", "label_smoothing"])
def test_a_bad_traced_number_still_gets_its_message(call, words):
    """Once a float argument has changed between calls torch.compile traces it as a symbol: a bad value must still
    raise with the argument's name, not with the compiler's complaint about formatting the symbol."""
    compiled = torch.compile(call, fullgraph=True)
    z = torch.randn(8, 4)
    for good in (0.25, 0.5):
        compiled(z, good)
    with pytest.raises(Exception) as info:
        compiled(z, -1.0 if "temperature" in words else 1.5)
    explanation = str(info.value).split("from user code")[0]  # not the source lines it quotes (this test's among them)
    assert words in explanation, explanation
