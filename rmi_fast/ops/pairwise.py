"""The negative-part reduction as a ``torch.library`` custom op with a closed-form backward.

``pair_reduce`` returns the statistics of :mod:`rmi_fast.ops.spec` and is differentiable in x, y and scale. Its
backward never differentiates through a B×B matrix: it asks the backend for dx = scale·G·y, dy = scale·Gᵀ·x and
dscale = Σ G∘(x·yᵀ) directly.

Fused mode (``fused=True``): the caller promises that the upstream gradient of every statistic is one and the same
scalar (true whenever the statistics feed a plain mean or sum, i.e. reduction="mean"/"sum"). A fused backend then
computes the gradients for unit weights in the same sweep as the statistics (for the row family one GEMM fewer than
forward + recomputing backward) and the backward only rescales them, as Liger-Kernel does for its losses: in place
when the backward frees the graph (eager calls without retain_graph), into new tensors otherwise.

fp16 inputs always take the unfused backward: the unit-weight gradients are a whole sum's (a row's before the 1/B
of a mean: for NWJ Σ_j e^(S_ij − 1)·y_j), beyond fp16's largest value (65504) long before the gradients are.

Positives (``positives=True``): the op also returns the paired dots <x_i, y_i>, so that the bounds' positive part
and negative part share one autograd node: its backward adds the positives' gradients in place to the statistics'
gradients (in the same pass as their rescale), one x- and one y-sized tensor in all, where two separate nodes would
allocate a second pair and sum them.

The backward is first order: under create_graph it raises (eager calls) rather than return gradients that a second
derivative would silently treat as constants.
"""
from __future__ import annotations

import torch

from .. import backends, memory
from .spec import PairSpec

_EMPTY = (0,)


def _spec(family, transform, clip, diagonal, diag_offset, columns, deterministic) -> PairSpec:
    return PairSpec(family, transform, clip, diagonal, diag_offset, columns, deterministic)


def stat_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype of the statistics (and scores) for inputs like x: fp64 for fp64, else fp32."""
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def _or_empty(t: torch.Tensor | None, like: torch.Tensor) -> torch.Tensor:
    return like.new_empty(_EMPTY) if t is None else t


def _pair_reduce_impl(
    x: torch.Tensor, y: torch.Tensor, scale: torch.Tensor,
    family: str, transform: str, clip: float, diagonal: str, diag_offset: int, columns: bool, deterministic: bool,
    backend: str, fused: bool, want_dx: bool, want_dy: bool, want_dscale: bool, positives: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """→ (stat0, stat1 or empty, dx or empty, dy or empty, dscale or empty, dots or empty); gradients only in fused
    mode, the paired dots <x_i, y_i> (G, B) with positives."""
    spec = _spec(family, transform, clip, diagonal, diag_offset, columns, deterministic)
    impl = backends.get(backend)
    want = (want_dx, want_dy, want_dscale)
    if fused and any(want):
        stats, dx, dy, dscale = impl.stats_and_grads(x, y, scale, spec, want)
    else:
        stats, dx, dy, dscale = impl.stats(x, y, scale, spec), None, None, None
    stat1 = stats[1] if columns else None
    dots = row_dots(x, y, stats[0].dtype) if positives else None
    return (stats[0], _or_empty(stat1, stats[0]), _or_empty(dx, x), _or_empty(dy, y), _or_empty(dscale, scale),
            _or_empty(dots, stats[0]))


_pair_reduce = torch.library.custom_op("rmi_fast::pair_reduce", mutates_args=())(_pair_reduce_impl)


@_pair_reduce.register_fake
def _(x, y, scale, family, transform, clip, diagonal, diag_offset, columns, deterministic, backend, fused,
      want_dx, want_dy, want_dscale, positives):
    spec = _spec(family, transform, clip, diagonal, diag_offset, columns, deterministic)
    G = max(x.shape[0], y.shape[0])
    shapes = spec.stat_shapes(G, x.shape[1], y.shape[1])
    dt = stat_dtype(x)
    stat0 = x.new_empty(shapes[0], dtype=dt)
    stat1 = x.new_empty(shapes[1] if columns else _EMPTY, dtype=dt)
    on = fused and (want_dx or want_dy or want_dscale)
    return (stat0, stat1, x.new_empty(x.shape if on and want_dx else _EMPTY),
            y.new_empty(y.shape if on and want_dy else _EMPTY),
            scale.new_empty(() if on and want_dscale else _EMPTY),
            x.new_empty((G, x.shape[1]) if positives else _EMPTY, dtype=dt))


def _pair_reduce_backward_impl(
    x: torch.Tensor, y: torch.Tensor, scale: torch.Tensor, stat0: torch.Tensor, stat1: torch.Tensor,
    w0: torch.Tensor, w1: torch.Tensor,
    family: str, transform: str, clip: float, diagonal: str, diag_offset: int, columns: bool, deterministic: bool,
    backend: str, want_dx: bool, want_dy: bool, want_dscale: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    spec = _spec(family, transform, clip, diagonal, diag_offset, columns, deterministic)
    stats, weights = ([stat0, stat1], [w0, w1]) if columns else ([stat0], [w0])
    dx, dy, dscale = backends.get(backend).grads(x, y, scale, spec, stats, weights, (want_dx, want_dy, want_dscale))
    return _or_empty(dx, x), _or_empty(dy, y), _or_empty(dscale, scale)


_pair_reduce_backward = torch.library.custom_op("rmi_fast::pair_reduce_backward", mutates_args=())(
    _pair_reduce_backward_impl)


@_pair_reduce_backward.register_fake
def _(x, y, scale, stat0, stat1, w0, w1, family, transform, clip, diagonal, diag_offset, columns, deterministic,
      backend, want_dx, want_dy, want_dscale):
    return (x.new_empty(x.shape if want_dx else _EMPTY), y.new_empty(y.shape if want_dy else _EMPTY),
            scale.new_empty(() if want_dscale else _EMPTY))


_OPTIONS = ("family", "transform", "clip", "diagonal", "diag_offset", "columns", "deterministic", "backend")


def _setup_context(ctx, inputs, output):
    x, y, scale = inputs[:3]
    ctx.options = dict(zip(_OPTIONS, inputs[3:11]))
    ctx.fused = inputs[11] and any(inputs[12:15])
    ctx.positives = inputs[15]
    stat0, stat1, dx, dy, dscale, _ = output
    if ctx.fused:  # x and y only for the positives' gradients
        ctx.save_for_backward(dx, dy, dscale, *((x, y) if ctx.positives else ()))
    else:
        ctx.save_for_backward(x, y, scale, stat0, stat1)


def _grad_zero(g: torch.Tensor | None, like: torch.Tensor) -> torch.Tensor:
    return torch.zeros_like(like) if g is None else g


def _frees_graph() -> bool:
    """Whether the running backward frees the graph after it (no retain_graph, no create_graph): then the saved
    unit gradients are never read again and may be rescaled in place."""
    keep_graph = getattr(torch._C._autograd, "_get_current_graph_task_keep_graph", None)
    return keep_graph is not None and not keep_graph()


def _backward(ctx, g0, g1, _gdx, _gdy, _gdscale, gdots, eager=False):
    want = ctx.needs_input_grad[:3]
    saved = ctx.saved_tensors  # unpacked once: unpacking checks versions, and the fused path may rescale in place
    if g0 is not None or (g1 is not None and ctx.options["columns"]):
        grads, factor = _statistic_grads(ctx, saved, g0, g1, want, eager)
    else:  # no statistic reached a loss (eager calls leave such gradients unmaterialised)
        grads, factor = [None, None, None], None
    pending = [factor is not None] * 3  # which gradients still owe the in-place rescale
    if ctx.positives and gdots is not None:
        # The positives' gradients, added in place to the tensors of the statistics' ones where there are any, in
        # the same pass as their pending rescale.
        x, y = saved[3:5] if ctx.fused else saved[:2]
        for k, (operand, other) in enumerate(((x, y), (y, x))):
            if want[k]:
                grads[k] = _add_weighted_rows(grads[k], gdots, other, operand, factor)
                pending[k] = False
    for g, rescale in zip(grads, pending):
        if rescale and g is not None:
            g.mul_(factor)
    return (*grads,) + (None,) * 13


def _statistic_grads(ctx, saved, g0, g1, want, eager) -> tuple[list[torch.Tensor | None], torch.Tensor | None]:
    """(dx, dy, dscale) of the statistics, each a tensor of their own or None, and the factor they are still to be
    multiplied by in place (or None)."""
    if ctx.fused:
        # Every statistic's upstream gradient is the same scalar w (see module docstring): grads = w · unit grads.
        if ctx.options["columns"] and (g0 is None or g1 is None):
            raise RuntimeError("pair_reduce(fused=True) promises both statistics the same upstream gradient, but only "
                               f"the {'column' if g0 is None else 'row'} statistic reached the loss: call it with "
                               "fused=False")
        w = g0.reshape(-1)[0]
        units = [t if need else None for t, need in zip(saved[:3], want)]
        if eager and _frees_graph():
            # Freed with the graph as soon as this returns, the unit gradients become the gradients, rescaled in
            # place: at the paper's critic shape one 64 MiB tensor fewer at the peak, and autograd can take them over
            # as .grad uncopied.
            return units, w
        return [None if t is None else torch.mul(t, w, out=memory.empty_like(t)) for t in units], None
    x, y, scale, stat0, stat1 = saved
    w1 = _grad_zero(g1, stat1) if ctx.options["columns"] else stat1
    o = ctx.options
    grads_op = _pair_reduce_backward_impl if eager else _pair_reduce_backward
    dx, dy, dscale = grads_op(
        x, y, scale, stat0, stat1, _grad_zero(g0, stat0), w1,
        o["family"], o["transform"], o["clip"], o["diagonal"], o["diag_offset"], o["columns"], o["deterministic"],
        o["backend"], *want)
    return [t if need else None for t, need in zip((dx, dy, dscale), want)], None


_pair_reduce.register_autograd(_backward, setup_context=_setup_context)


class _EagerPairReduce(torch.autograd.Function):
    """The same op for eager calls: forward, context and backward as registered above, without the dispatcher's
    per-call layers (argument normalisation, redispatch, the compile guard), which cost about 0.3 ms a call, as much
    as the whole kernel at B = 256. torch.compile traces the registered op instead."""

    @staticmethod
    def forward(ctx, *inputs):
        output = _pair_reduce_impl(*inputs)
        _setup_context(ctx, inputs, output)
        ctx.mark_non_differentiable(*output[2:5])
        # The unit-gradient outputs never receive a gradient: materialising one would allocate and zero an x- and
        # a y-sized tensor per backward.
        ctx.set_materialize_grads(False)
        return output

    @staticmethod
    def backward(ctx, *grad_outputs):
        if torch.is_grad_enabled():  # create_graph: a second derivative would silently leave out this op's part
            raise RuntimeError("rmi_fast's pair_reduce gives first-order gradients only (its backward runs kernels), "
                               "so create_graph=True cannot differentiate through it: for second derivatives of a "
                               "bound differentiate its eager formula in rmi_fast.reference")
        return _backward(ctx, *grad_outputs, eager=True)


def pair_reduce(x: torch.Tensor, y: torch.Tensor, scale: torch.Tensor, spec: PairSpec, backend: str = "auto",
                fused: bool = False, positives: bool = False):
    """Statistics of the negative part (see :mod:`rmi_fast.ops.spec`), differentiable in x, y and scale.

    x: (Gx, Bx, D), y: (Gy, By, D) with Gx, Gy ∈ {1, G}; scale: 0-d tensor. Returns [r] / [r, c] / [L]; with
    ``positives`` (Bx = By) also the paired dots <x_i, y_i>, (G, B) in the statistics' dtype and differentiable in x
    and y, whose gradients the backward adds in place to the statistics' (one x- and one y-sized tensor in all).
    """
    _check_operands(x, y)
    if positives and x.shape[-2] != y.shape[-2]:
        raise ValueError(f"positives need x and y with the same rows, got {x.shape[-2]} and {y.shape[-2]}")
    impl = backends.select(backend, x, y, spec)
    grad_on = torch.is_grad_enabled()
    want = [grad_on and t.requires_grad for t in (x, y, scale)]
    op = _pair_reduce if torch.compiler.is_compiling() else _EagerPairReduce.apply
    stat0, stat1, _, _, _, dots = op(
        x, y, scale, spec.family, spec.transform, float(spec.clip), spec.diagonal, int(spec.diag_offset),
        spec.columns, spec.deterministic, impl.name, fused and impl.fused and x.dtype != torch.float16, *want,
        positives)
    stats = [stat0, stat1] if spec.columns else [stat0]
    return (stats, dots) if positives else stats


def _check_operands(x: torch.Tensor, y: torch.Tensor) -> None:
    """The contract's operands, checked before any backend sees them (each assumes them)."""
    if x.dim() != 3 or y.dim() != 3:
        raise ValueError(f"x and y must be (G, B, D), got shapes {tuple(x.shape)} and {tuple(y.shape)}")
    if x.device != y.device:
        raise ValueError(f"x and y must be on the same device, got {x.device} and {y.device}")
    if x.dtype != y.dtype:
        raise TypeError(f"x and y must have the same dtype, got {x.dtype} and {y.dtype}")
    if x.shape[2] != y.shape[2]:
        raise ValueError(f"x and y must have the same feature size D, got {x.shape[2]} and {y.shape[2]}")
    if x.shape[0] != y.shape[0] and 1 not in (x.shape[0], y.shape[0]):
        raise ValueError(f"x's and y's group counts must match or be 1, got {x.shape[0]} and {y.shape[0]}")


# ------------------------------------------------------------------------------------------- the paired scores

#: From this many elements of the (G, B, D) product on, the paired dots skip it (see row_dots).
_PRODUCT_ELEMENTS = 1 << 22


def _row_kernels(*tensors: torch.Tensor):
    """The compiled module, where its row kernels (csrc/cpu/rows.h) serve these tensors: contiguous fp32 (G, B, D)
    CPU tensors, none of them to be differentiated through (the kernels are not), outside torch.compile's tracing
    (which must see torch ops); else None."""
    if torch.compiler.is_compiling() or (torch.is_grad_enabled() and any(t.requires_grad for t in tensors)):
        return None
    if not all(t.device.type == "cpu" and t.dtype == torch.float32 and t.dim() == 3 and t.is_contiguous()
               for t in tensors):
        return None
    return memory.compiled_cpu()


def row_dots(x: torch.Tensor, y: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """<x[..., i, :], y[..., i, :]> in ``dtype``, broadcast over the leading dimension: (G, B) for (G, B, D) groups.
    Contiguous fp32 CPU groups row by row in C++; else small inputs through their elementwise product and large
    groups without it, since at the paper's critic shape (G = 64, B = 128, D = 2048) that is a fresh 64 MiB tensor,
    costlier than the dots themselves: a broadcast operand makes each row's dots one matrix-vector product over the
    groups, else einsum's batched contraction."""
    x, y = x.to(dtype), y.to(dtype)
    kernels = _row_kernels(x, y)
    if kernels is not None:
        return kernels.cpu_row_dots(x, y)
    if x.dim() != 3 or y.dim() != 3 or max(x.shape[0], y.shape[0]) * x.shape[1] * x.shape[2] < _PRODUCT_ELEMENTS:
        return (x * y).sum(-1)
    if x.shape[0] == 1 and y.shape[0] > 1:
        x, y = y, x
    if y.shape[0] == 1 and x.shape[0] > 1:  # (B, G, D) @ (B, D, 1): per row i, its G groups against y_i
        return torch.matmul(x.transpose(0, 1), y[0].unsqueeze(-1)).squeeze(-1).transpose(0, 1)
    return torch.einsum("gbd,gbd->gb", x, y)


def _add_weighted_rows(out: torch.Tensor | None, w: torch.Tensor, other: torch.Tensor, operand: torch.Tensor,
                       out_factor: torch.Tensor | None = None) -> torch.Tensor:
    """out·out_factor + ∂(Σ_gi w[g, i]·<operand[g, i], other[g, i]>)/∂operand, the second term w[g, i]·other[g, i]
    summed over the groups where the operand is broadcast; in place when out is given (one pass over it, rescale
    included), else a new tensor like the operand."""
    kernels = _row_kernels(operand, other, *(() if out is None else (out,))) if w.dtype == torch.float32 else None
    if kernels is not None:
        target = memory.empty_like(operand) if out is None else out
        keep = 1.0 if out_factor is None else float(out_factor)
        kernels.cpu_add_weighted_rows(target, w.contiguous(), other, out is not None, keep)
        return target
    if out is not None and out_factor is not None:
        out.mul_(out_factor)
    if operand.shape[0] == 1 and w.shape[0] > 1:
        if other.numel() < _PRODUCT_ELEMENTS:
            part = (w.unsqueeze(-1) * other).sum(0, keepdim=True)
        else:  # (B, 1, G) @ (B, G, D) → (1, B, D), without the (G, B, D) product
            part = torch.matmul(w.t().unsqueeze(1), other.to(w.dtype).transpose(0, 1)).transpose(0, 1)
        return part.to(operand.dtype) if out is None else out.add_(part)
    if out is None:
        return torch.mul(w.unsqueeze(-1), other, out=memory.empty_like(operand))
    return out.addcmul_(w.unsqueeze(-1), other)
