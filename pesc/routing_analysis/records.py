"""Reading routing out of a model: the one place `pesc routes` touches a model's routing.

Every method's model emits one `RoutingRecord` per routed site (`"mlp"` for PESC's FFN router, `"q_proj"`,
`"gate_proj"`, ... for methods whose experts sit on a linear) and layer: the router logits [tokens, E]
and the experts chosen ([tokens, k] indices; None for a dense router, where every expert is active).
Everything after this module (counting, figures, files) works on those records alone.
"""

import torch

from pesc.errors import PescError
from pesc.modeling.moe_routing import RoutingRecord


@torch.no_grad()
def routing_records(model, batch: dict) -> list[RoutingRecord]:
    """Run `batch` (input_ids, attention_mask) through `model`; its routing records over the real tokens, on the CPU."""
    outputs = model(**batch, output_routing_records=True, use_cache=False)
    records = getattr(outputs, "routing_records", None)
    if not records:
        raise PescError("the model has no routers (a dense model?): give a PESC model folder, export or training run")
    keep = batch["attention_mask"].reshape(-1).bool()
    return [
        RoutingRecord(
            record.site, record.layer, record.logits[keep.to(record.logits.device)].float().cpu(),
            None if record.selected is None else record.selected[keep.to(record.selected.device)].cpu(),
        )
        for record in records
    ]
