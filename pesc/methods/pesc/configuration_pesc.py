"""Configuration of a PESC sparse model.

Shipped inside every exported checkpoint beside the shared moe_*.py files (the flat-config machinery
every method shares: imports only torch and transformers).

The config is *flat*, like the published Camelidae checkpoints: every field of the
dense base config (hidden_size, rope settings, ...) sits at the top level next to the
PESC fields, and `base_model_type` names the dense family.
"""

from .moe_config import FlatMoEConfig

# The PESC settings, with their defaults; everything else belongs to the dense family.
PESC_DEFAULTS = {
    "base_model_type": "llama",
    "num_experts": 8,
    "topk": 2,
    "adapter_dim": 512,
    "moe_scaling": 0.25,
    "adapter_dropout": 0.1,
    "moe_dtype": None,
    "output_router_logits": False,
    "router_aux_loss_coef": 0.01,
}


class PescConfig(FlatMoEConfig):
    r"""
    A dense decoder (any family whose FFN is `down(act(gate(x)) * up(x))`) turned into
    a sparse PESC MoE: the FFN is shared by every expert, each expert adds a bottleneck
    adapter on the FFN output, a top-k router on the FFN input picks the experts.

    Args:
        base_model_type (`str`): model_type of the dense family (`"llama"`, `"qwen2"`, ...).
        num_experts (`int`): experts per layer.
        topk (`int`): experts routed per token.
        adapter_dim (`int`): bottleneck width of each expert adapter.
        moe_scaling (`float`): scale `s` applied to every adapter's output.
        adapter_dropout (`float`): dropout on each adapter's input.
        moe_dtype (`str`, *optional*): dtype the routers and adapters are stored in.
        output_router_logits (`bool`): return router logits and the aux loss by default.
        router_aux_loss_coef (`float`): weight of the load-balancing loss added to the loss.
        kwargs: the dense family's config fields, and the common config fields.
    """

    model_type = "pesc"
    top_k_field = "topk"

    method_defaults = PESC_DEFAULTS

    def __init__(self, **kwargs):  # explicit: transformers 5 gives a config class without one a dataclass __init__
        super().__init__(**kwargs)

    def validate_moe_settings(self):
        """Refuse settings that cannot describe a working MoE, naming the field."""
        self.require_positive_integers("num_experts", "topk", "adapter_dim")
        if self.topk > self.num_experts:
            raise ValueError(f"topk ({self.topk}) cannot exceed num_experts ({self.num_experts})")
        if not 0.0 <= self.adapter_dropout < 1.0:
            raise ValueError(f"adapter_dropout must be in [0, 1), got {self.adapter_dropout!r}")
        if self.router_aux_loss_coef < 0:
            raise ValueError(f"router_aux_loss_coef must be >= 0, got {self.router_aux_loss_coef!r}")


__all__ = ["PescConfig"]
