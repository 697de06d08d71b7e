"""Global negatives across data-parallel ranks: the collectives behind ``gather=True``.

Each rank holds B local anchors and B local candidates; the loss of its anchors is taken against the candidates of
every rank. Only embeddings travel:

* :func:`all_gather_rows` concatenates the candidate rows of all ranks in rank order, (…, B, D) → (…, W·B, D). Its
  backward all-reduces (sums) the incoming gradient and returns the owner's slice, so the candidate gradient that
  reaches a rank is the sum of what every rank's loss asks of its rows.
* :func:`all_reduce_logsumexp` combines per-rank log-sum-exp statistics into the global one, stably (all-reduce the
  max, then the sum of exp). Its backward is again an all-reduce of the incoming gradient, times the local softmax
  weight exp(L_r − L).

With both, every rank's returned value is the loss of its own anchors against the global candidate set, so the mean
over ranks is the single-process loss of the whole batch, and the gradient reaching a rank's local inputs is the
gradient of Σ_r (rank r's value) = W × that whole-batch loss: exactly what DDP's gradient *averaging* turns into the
global gradient.

Every rank must hold tensors of the same shape (as torch.distributed's all_gather requires). This is checked before
each gather with one small collective, which costs a host sync on a GPU: set ``rmi_fast.distributed.check_shapes =
False`` for sync-free steps (CUDA graphs); the check is skipped while torch.compile traces.
"""
from __future__ import annotations

import torch
import torch.distributed as dist


#: Compare the shapes of all ranks before gathering (see the module docstring).
check_shapes = True


def process_group(gather):
    """``gather`` (True or a ProcessGroup) → (group, rank, world size); raises when no process group is initialised."""
    if not (dist.is_available() and dist.is_initialized()):
        raise RuntimeError("gather=True needs an initialised torch.distributed process group "
                           "(call torch.distributed.init_process_group first), or pass gather=False")
    group = None if gather is True else gather
    return group, dist.get_rank(group), dist.get_world_size(group)


class _AllGatherRows(torch.autograd.Function):
    """(…, B, D) on every rank → (…, W·B, D) in rank order; backward: all-reduce, keep the own slice."""

    @staticmethod
    def forward(ctx, t: torch.Tensor, group, rank: int, world: int) -> torch.Tensor:
        ctx.group, ctx.rank, ctx.rows = group, rank, t.shape[-2]
        t = t.contiguous()
        parts = [torch.empty_like(t) for _ in range(world)]
        dist.all_gather(parts, t, group=group)
        return torch.cat(parts, dim=-2)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        grad = grad.contiguous().clone()
        dist.all_reduce(grad, op=dist.ReduceOp.SUM, group=ctx.group)
        return grad.narrow(-2, ctx.rank * ctx.rows, ctx.rows), None, None, None


class _AllReduceLogSumExp(torch.autograd.Function):
    """L_r (any shape, same on every rank) → L = log Σ_r exp L_r; backward: all-reduce, times exp(L_r − L)."""

    @staticmethod
    def forward(ctx, local: torch.Tensor, group) -> torch.Tensor:
        ctx.group = group
        peak = local.detach().clone()
        dist.all_reduce(peak, op=dist.ReduceOp.MAX, group=group)
        peak = torch.where(torch.isfinite(peak), peak, torch.zeros_like(peak))
        total = torch.exp(local.detach() - peak)
        dist.all_reduce(total, op=dist.ReduceOp.SUM, group=group)
        out = peak + torch.log(total)
        ctx.save_for_backward(local, out)
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        local, out = ctx.saved_tensors
        grad = grad.contiguous().clone()
        dist.all_reduce(grad, op=dist.ReduceOp.SUM, group=ctx.group)
        return grad * torch.exp(local - out), None


def _check_same_shape(t: torch.Tensor, group, world: int) -> None:
    if not check_shapes or torch.compiler.is_compiling():
        return
    shape = torch.tensor([t.dim(), *t.shape, *[0] * (3 - t.dim())], dtype=torch.int64, device=t.device)
    shapes = [torch.empty_like(shape) for _ in range(world)]
    dist.all_gather(shapes, shape, group=group)
    found = [tuple(s[1:1 + int(s[0])].tolist()) for s in shapes]
    if len(set(found)) > 1:
        raise ValueError(f"gather=True needs inputs of the same shape on every rank (the same local batch), got "
                         f"{found} on ranks 0..{world - 1}")


def all_gather_rows(t: torch.Tensor, gather=True) -> torch.Tensor:
    """Rows (dim −2) of every rank, concatenated in rank order: (…, B, D) → (…, W·B, D), differentiable.

    The gradient returned to ``t`` is the sum over ranks of the gradient each rank's result sends to t's rows.
    Integer tensors (labels) are gathered too, without autograd.
    """
    group, rank, world = process_group(gather)
    _check_same_shape(t, group, world)
    if not t.requires_grad:
        parts = [torch.empty_like(t.contiguous()) for _ in range(world)]
        dist.all_gather(parts, t.contiguous(), group=group)
        return torch.cat(parts, dim=-2 if t.dim() >= 2 else 0)
    return _AllGatherRows.apply(t, group, rank, world)


def all_reduce_logsumexp(local: torch.Tensor, gather=True) -> torch.Tensor:
    """log Σ_ranks exp(local), elementwise, on every rank (stable), differentiable (see module docstring)."""
    group, _, _ = process_group(gather)
    return _AllReduceLogSumExp.apply(local, group)
