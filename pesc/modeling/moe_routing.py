"""Routing records and the losses taken over them: each routed site emits a `RoutingRecord` into the sink
that the causal LM's forward opens (compile-safe); the Switch balance loss, the padding mask over the
records' token rows and the per-sample values spread to those rows are what a method's aux losses read.

Shipped in every checkpoint: imports only torch.
"""

from contextlib import contextmanager
from contextvars import ContextVar
from typing import NamedTuple

import torch


# ---------------------------------------------------------------------------------------
# Routing records are gathered through a context variable rather than returned by each
# layer, so the dense family's decoder layers run unchanged. Only the forward pass of
# MoEForCausalLM opens a sink; a gradient-checkpointing recompute (outside it) records
# nothing twice.
# ---------------------------------------------------------------------------------------
class _CompileSafeContextVar:
    """A ContextVar (thread- and context-safe) whose value a compiled graph reads from a plain attribute.

    Dynamo cannot trace `ContextVar.get` (transformers' own output capture makes the same
    switch), so every `set` also stores the value where a graph can read it; that copy
    alone is shared by threads.
    """

    def __init__(self, name: str):
        self._context_var: ContextVar = ContextVar(name, default=None)
        self._for_graphs = None

    def get(self):
        return self._for_graphs if torch.compiler.is_compiling() else self._context_var.get()

    def set(self, value) -> tuple:
        previous, self._for_graphs = self._for_graphs, value
        return previous, None if torch.compiler.is_compiling() else self._context_var.set(value)

    def reset(self, handle: tuple) -> None:
        self._for_graphs, token = handle
        if token is not None:
            self._context_var.reset(token)


_ROUTING_SINK = _CompileSafeContextVar("pesc_routing_records")


class RoutingRecord(NamedTuple):
    """What one routed site did on one forward, for the aux losses and the expert-load statistics.

    site: the site's name ("mlp", "q_proj", ...); layer: its decoder layer; logits: router logits
    [tokens, experts] (dense routers too); selected: [tokens, k] expert indices, or None when every
    expert is active (dense softmax); extras: whatever a method's loss needs besides (or None).
    """

    site: str
    layer: int
    logits: torch.Tensor
    selected: torch.Tensor | None = None
    extras: dict | None = None


@contextmanager
def record_routing():
    """Collect, in call order, the `RoutingRecord` of every routed site run inside the block."""
    sink: list = []
    token = _ROUTING_SINK.set(sink)
    try:
        yield sink
    finally:
        _ROUTING_SINK.reset(token)


def emit_routing_record(site: str, layer: int, logits: torch.Tensor, selected=None, extras=None) -> None:
    """Record one site's routing, when a causal LM's forward is collecting (else nothing happens)."""
    sink = _ROUTING_SINK.get()
    if sink is not None:
        sink.append(RoutingRecord(site, layer, logits, selected, extras))


def token_mask(attention_mask: torch.Tensor | None, rows: int) -> torch.Tensor | None:
    """Which of the `rows` token rows of the flattened batch are not padding ([rows] bool), or None (no mask known).

    A 2-D attention mask [batch, keys] covers the rows when their number is a multiple of the batch (the
    last rows // batch keys are the tokens; a packed batch has no mask)."""
    if attention_mask is None or attention_mask.dim() != 2:
        return None
    batch = attention_mask.shape[0]
    mask = attention_mask[:, -(rows // batch) :] if rows % batch == 0 else None
    return mask.reshape(-1).bool() if mask is not None and mask.numel() == rows else None


def load_balancing_loss(
    router_logits: tuple[torch.Tensor, ...] | list[torch.Tensor],
    num_experts: int,
    top_k: int,
    attention_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Switch-style balance loss E * sum_i f_i * P_i, per layer, averaged over layers.

    f_i: share of the top-k assignments that went to expert i (sums to 1); P_i: mean
    full-softmax probability of expert i. Both are taken over non-padding tokens only.
    Perfect balance gives 1.0; the caller multiplies by `router_aux_loss_coef`.
    """
    if not router_logits:
        raise ValueError("load_balancing_loss needs the router logits of at least one layer")
    device = router_logits[0].device
    mask = token_mask(attention_mask, router_logits[0].shape[0])
    token_weight = None if mask is None else mask.reshape(-1, 1).to(device=device, dtype=torch.float32)
    layer_losses = []
    for logits in router_logits:
        logits = logits.to(device).float()
        probs = torch.softmax(logits, dim=-1)
        chosen = torch.zeros_like(probs).scatter_(1, torch.topk(logits, top_k, dim=-1).indices, 1.0)
        if token_weight is None:
            tokens = probs.new_tensor(float(probs.shape[0]))
            chosen_sum, prob_sum = chosen.sum(0), probs.sum(0)
        else:
            tokens = token_weight.sum().clamp_min(1.0)
            chosen_sum, prob_sum = (chosen * token_weight).sum(0), (probs * token_weight).sum(0)
        fraction_routed = chosen_sum / (tokens * top_k)
        mean_probability = prob_sum / tokens
        layer_losses.append(num_experts * torch.sum(fraction_routed * mean_probability))
    return torch.stack(layer_losses).mean()


def per_token(values: torch.Tensor, tokens: int, attention_mask=None, position_ids=None) -> torch.Tensor:
    """One value per sample spread to one per token row of the flattened batch.

    Padded batches: `values` [batch], one row per sequence. Packed batches ([1, total], no attention
    mask): one value per packed sequence, the sequences told apart by position_ids restarting at 0.
    """
    values = values.reshape(-1)
    if attention_mask is None and position_ids is not None and position_ids.shape[0] == 1 and values.numel() > 1:
        starts = (position_ids.reshape(-1) == 0).to(torch.long)
        return values[(starts.cumsum(0) - 1).clamp_min(0)]
    return values.repeat_interleave(tokens // values.numel())
