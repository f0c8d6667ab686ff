"""The model code every method shares, shipped in every checkpoint beside the method's own
configuration_<name>.py / modeling_<name>.py (which live in pesc/methods/<name>/). Torch and transformers only.
One concern per file: moe_config (the flat config), moe_routing (routing records and losses), moe_dropout,
moe_dispatch (the routed top-k dispatch), moe_sites (sibling sites on linears), moe_causal_lm (the causal LM),
soft_merging (dense soft-merging routers).

Loading a checkpoint of any method through the Auto* factories without remote code:
`pesc.methods.register_auto_classes()` (pesc's commands call it).
"""
