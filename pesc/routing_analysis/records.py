"""Routing records: the neutral form every routed site of every method is read into.

A record is one site (`"mlp"` for PESC's FFN router) in one layer, over the real tokens of one batch:
the router logits [tokens, E] and the experts chosen ([tokens, k] indices; None for a dense router,
where every expert is active). `routing_records` is the only code here that knows how a model
exposes its routing; today that is PESC's `output_router_logits` (one [tokens, E] tensor per layer,
top-k = config.topk), later the method interface's own routing records.
"""

from dataclasses import dataclass

import torch

from pesc.errors import PescError

PESC_SITE = "mlp"


@dataclass
class RoutingRecord:
    site: str
    layer: int
    logits: torch.Tensor  # [tokens, E], padding removed
    selected: torch.Tensor | None  # [tokens, k] expert indices; None: dense router, every expert active


@torch.no_grad()
def routing_records(model, batch: dict) -> list[RoutingRecord]:
    """Run `batch` (input_ids, attention_mask) through `model`; one record per routed site and layer."""
    outputs = model(**batch, output_router_logits=True, use_cache=False)
    if getattr(outputs, "router_logits", None) is None:
        raise PescError("the model has no routers (a dense model?): give a PESC model folder, export or training run")
    keep = batch["attention_mask"].reshape(-1).bool()
    top_k = model.config.topk
    records = []
    for layer, logits in enumerate(outputs.router_logits):
        logits = logits[keep.to(logits.device)].float().cpu()
        records.append(RoutingRecord(PESC_SITE, layer, logits, torch.topk(logits, top_k, dim=-1).indices))
    return records
