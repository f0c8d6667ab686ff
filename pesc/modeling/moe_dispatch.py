"""Top-k routed dispatch: rows sorted by expert, each expert run on its own rows, summed back per row,
through gather-only autograd functions (no scatter), the experts' input dropout done in the same gather.

Shipped in the checkpoints of the top-k methods: imports only torch.
"""

import torch

from .moe_dropout import dropout_mask, zero_dropped


class GatherRows(torch.autograd.Function):
    """rows[p] = x[source[p]]: each token's row repeated k times, in expert-sorted order, with
    the elements of an optional `drop` mask zeroed (the experts' input dropout, one mask for every
    (token, expert) pair, applied in the same pass; the keep scale is the caller's).

    The backward is the adjoint `CombineRows` (a gather plus a sum over k), so neither
    direction scatters: no zero-filled buffers, no atomics, deterministic on every device.
    """

    @staticmethod
    def forward(ctx, x, source, inverse, top_k, drop=None):
        ctx.save_for_backward(source, inverse, drop)
        ctx.top_k = top_k
        rows = x.index_select(0, source)
        return rows if drop is None else zero_dropped(rows, drop, in_place=True)

    @staticmethod
    def backward(ctx, grad):
        source, inverse, drop = ctx.saved_tensors
        if drop is not None:
            grad = zero_dropped(grad, drop)
        return CombineRows.apply(grad, source, inverse, ctx.top_k), None, None, None, None


class CombineRows(torch.autograd.Function):
    """out[t] = sum_j rows[inverse[t * k + j]]: expert-sorted rows summed back per token."""

    @staticmethod
    def forward(ctx, rows, source, inverse, top_k):
        ctx.save_for_backward(source, inverse)
        ctx.top_k = top_k
        return rows.index_select(0, inverse).view(-1, top_k, rows.shape[-1]).sum(1)

    @staticmethod
    def backward(ctx, grad):
        source, inverse = ctx.saved_tensors
        return GatherRows.apply(grad, source, inverse, ctx.top_k, None), None, None, None


def traced_for_every_shape() -> bool:
    """Whether this runs inside a compiled inference graph that must serve every token count (vLLM traces one so):
    routing there needs fixed shapes, with no host sync and no shape read from the data (`routed_dispatch` has both)."""
    return torch.compiler.is_compiling() and not torch.is_grad_enabled()


def routed_dispatch(rows: torch.Tensor, routing_weights: torch.Tensor, selected: torch.Tensor, experts: list,
                    weighted_expert_output, input_dropout: float | None = None) -> torch.Tensor:
    """sum_j w_j * expert_{s_j}(row) for every row, each expert run on its own rows only (top-k methods share it).

    Rows are sorted by expert (one sort, one gather) and summed back per row (a gather, no
    scatter). `weighted_expert_output(expert, rows, weights [rows, 1])` computes one expert's
    weighted output. With autograd every expert runs, on zero rows if idle, so its parameters
    join the graph (DDP and ZeRO-3 need that); without it idle experts are skipped.

    `input_dropout` p: the experts' input dropout, done here for all of them at once (one mask
    over the gathered rows, each (row, expert) pair its own), much cheaper than a dropout per
    expert; `weighted_expert_output` is then called with `keep_scale=1 / (1 - p)` to apply.
    """
    top_k = selected.shape[-1]
    flat_experts = selected.reshape(-1)
    order = torch.argsort(flat_experts, stable=True)
    inverse = torch.empty_like(order).scatter_(0, order, torch.arange(order.numel(), device=order.device))
    source = order // top_k
    counts = torch.bincount(flat_experts, minlength=len(experts)).tolist()
    weights = routing_weights.reshape(-1)[order].unsqueeze(-1)
    drop, dropout_kwargs = None, {}
    if input_dropout:
        drop, keep_scale = dropout_mask((source.shape[0], rows.shape[-1]), input_dropout, rows.device)
        dropout_kwargs = {"keep_scale": keep_scale}
    gathered = GatherRows.apply(rows, source, inverse, top_k, drop)
    outputs = []
    skip_idle = not torch.is_grad_enabled()
    for expert, expert_rows, expert_weights in zip(experts, gathered.split(counts), weights.split(counts)):
        if skip_idle and expert_rows.shape[0] == 0:
            continue
        outputs.append(weighted_expert_output(expert, expert_rows, expert_weights, **dropout_kwargs))
    return CombineRows.apply(torch.cat(outputs), source, inverse, top_k)
