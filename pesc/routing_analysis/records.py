"""Reading routing out of a model: the one place `pesc routes` touches a model's routing.

Every method's model emits one `RoutingRecord` per routed site (`"mlp"` for PESC's FFN router, `"q_proj"`,
`"gate_proj"`, ... for methods whose experts sit on a linear) and layer: the router logits [tokens, E]
and the experts chosen ([tokens, k] indices; None for a dense router, where every expert is active).
Everything after this module (counting, figures, files) works on those records alone.

An encoder-decoder's (T5's) sites are named by their stack and attention (`encoder.self_attn.k.head0`,
`decoder.cross_attn.v`, `decoder.ffn.act`, the block as the layer): the encoder's and the cross-attention's keys and
values read the encoder's tokens (the source), every other decoder site the decoder's (the answer).
"""

import re

import torch

from pesc.data.masking import IGNORE_INDEX
from pesc.errors import PescError
from pesc.modeling.moe_routing import RoutingRecord

# The sites of an encoder-decoder whose rows are the encoder's tokens: the cross-attention's keys and values too.
_ENCODER_TOKENS = re.compile(r"^(encoder\.|decoder\.cross_attn\.[kv](\.|$))")
# How the report groups an encoder-decoder's sites: (name prefix, part); a decoder-only model's sites have no part.
SITE_PARTS = (("encoder.", "encoder"), ("decoder.cross_attn.", "cross-attention"), ("decoder.", "decoder"))


def site_part(site: str) -> str | None:
    """"encoder", "decoder" or "cross-attention" for an encoder-decoder's site, None for a decoder-only model's."""
    return next((part for prefix, part in SITE_PARTS if site.startswith(prefix)), None)


def reads_encoder_tokens(site: str) -> bool:
    """Whether the site's rows are the encoder's tokens (a decoder-only model's sites: its one stack's)."""
    return site_part(site) is None or bool(_ENCODER_TOKENS.match(site))


def real_token_rows(site: str, rows: int, attention_mask, labels) -> torch.Tensor | None:
    """Which of a site's `rows` routed rows are real tokens ([rows] bool), or None where no mask covers them (a packed
    batch): the attention mask's for a decoder-only model's sites and an encoder-decoder's sites on the encoder's
    tokens; the labels' (not -100) for its sites on the decoder's, whose input at position i is real where label i is
    (the labels shifted right behind the start token). Training's expert-load logs and `pesc routes` both mask so."""
    if site_part(site) is not None and not reads_encoder_tokens(site):
        mask = None if labels is None else labels != IGNORE_INDEX
    else:
        mask = attention_mask if attention_mask is not None and attention_mask.dim() == 2 else None
    return None if mask is None or mask.numel() != rows else mask.reshape(-1).bool()


@torch.no_grad()
def routing_records(model, batch: dict) -> list[RoutingRecord]:
    """Run `batch` (input_ids, attention_mask; an encoder-decoder's with `labels`, its answers) through `model`; its
    routing records over the real tokens, on the CPU: the source's for the encoder's sites, the answer's for the
    decoder's."""
    outputs = model(**batch, output_routing_records=True, use_cache=False)
    records = getattr(outputs, "routing_records", None)
    if not records:
        raise PescError("the model has no routers (a dense model?): give a PESC model folder, export or training run")
    kept = []
    for record in records:
        keep = real_token_rows(record.site, record.logits.shape[0], batch["attention_mask"], batch.get("labels"))
        if keep is None:
            raise ValueError(f"site {record.site!r} routed {record.logits.shape[0]} rows, which no mask of the batch "
                             "covers")
        kept.append(RoutingRecord(
            record.site, record.layer, record.logits[keep.to(record.logits.device)].float().cpu(),
            None if record.selected is None else record.selected[keep.to(record.selected.device)].cpu(),
        ))
    return kept
