"""Configuration of a PESC sparse model.

Shipped inside every exported checkpoint beside the shared moe_*.py files (the flat-config machinery
every method shares: imports only torch and transformers).

The config is *flat*, like the published Camelidae checkpoints: every field of the
dense base config (hidden_size, rope settings, ...) sits at the top level next to the
PESC fields, and `base_model_type` names the dense family.
"""

from .moe_config import FlatMoEConfig

# The PESC settings, with their defaults (FlatMoEConfig adds base_model_type, moe_dtype and output_router_logits);
# everything else belongs to the dense family.
PESC_DEFAULTS = {
    "num_experts": 8,
    "num_experts_per_tok": 2,
    "adapter_dim": 512,
    "moe_scaling": 0.25,
    "adapter_dropout": 0.1,
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
        num_experts_per_tok (`int`): experts routed per token (top-k; pesc 0.1.0 and Camelidae name it `topk`).
        adapter_dim (`int`): bottleneck width of each expert adapter.
        moe_scaling (`float`): scale `s` applied to every adapter's output.
        adapter_dropout (`float`): dropout on each adapter's input.
        moe_dtype (`str`, *optional*): dtype the routers and adapters are stored in.
        output_router_logits (`bool`): return router logits and the aux loss by default.
        router_aux_loss_coef (`float`): weight of the load-balancing loss added to the loss.
        kwargs: the dense family's config fields, and the common config fields.
    """

    model_type = "pesc"

    method_defaults = PESC_DEFAULTS
    method_ranges = {"adapter_dim": "positive integer", "moe_scaling": "positive", "adapter_dropout": "fraction",
                     "router_aux_loss_coef": "non-negative"}

    def __init__(self, **kwargs):  # explicit: transformers 5 gives a config class without one a dataclass __init__
        if "topk" in kwargs:  # the name pesc 0.1.0 wrote (and Camelidae's): read, never written again
            kwargs.setdefault("num_experts_per_tok", kwargs.pop("topk"))
        super().__init__(**kwargs)

    def validate_moe_settings(self):
        """Refuse settings that cannot describe a working MoE, naming the field."""
        self.check_top_k()


__all__ = ["PescConfig"]
