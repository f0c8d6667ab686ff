"""Configuration of a PESC sparse model.

Shipped inside every exported checkpoint: imports only transformers. It runs on
transformers 4.46.3 and later: where the API differs between releases, it asks what the
installed release has (a name, an attribute), never which version it is.

The config is *flat*, like the published Camelidae checkpoints: every field of the
dense base config (hidden_size, rope settings, ...) sits at the top level next to the
PESC fields, and `base_model_type` names the dense family. The dense family's own
config class validates and completes the base fields, so derived fields (head_dim,
layer_types, rope settings) are always present.

The class has an explicit `__init__` (the form every transformers release accepts for
remote code) rather than dataclass fields, which older releases do not know.
"""

try:
    from transformers import PreTrainedConfig
except ImportError:  # transformers 4.x spells it PretrainedConfig
    from transformers import PretrainedConfig as PreTrainedConfig
from transformers import CONFIG_MAPPING

# Keys that describe the checkpoint rather than the base architecture: never copied
# from the dense family's config into ours.
_NOT_BASE_FIELDS = {"model_type", "architectures", "auto_map", "transformers_version"}
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


def _rope_fields_for(family_config_class: type, fields: dict) -> dict:
    """`fields` with transformers 5's `rope_parameters` turned into the `rope_theta` / `rope_scaling` of a
    family config that predates it (transformers 4.x), so the rotary embedding is the one the checkpoint
    was made with, not the family's default."""
    rope = fields.get("rope_parameters")
    if not isinstance(rope, dict) or hasattr(family_config_class(), "rope_parameters"):
        return fields
    fields = {k: v for k, v in fields.items() if k != "rope_parameters"}
    scaling = {k: v for k, v in rope.items() if k not in ("rope_theta", "partial_rotary_factor")}
    if "rope_theta" in rope:
        fields["rope_theta"] = rope["rope_theta"]
    if "partial_rotary_factor" in rope:
        fields["partial_rotary_factor"] = rope["partial_rotary_factor"]
    if scaling.get("rope_type", "default") != "default":
        fields["rope_scaling"] = scaling
    return fields


class PescConfig(PreTrainedConfig):
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

    def __init__(self, **kwargs):
        for name, default in PESC_DEFAULTS.items():
            setattr(self, name, kwargs.pop(name, default))
        if self.base_model_type not in CONFIG_MAPPING:
            raise ValueError(
                f"unknown base_model_type {self.base_model_type!r}: this transformers version has no such model family"
            )
        family_config_class = CONFIG_MAPPING[self.base_model_type]
        base_fields = _rope_fields_for(family_config_class, {k: v for k, v in kwargs.items() if k not in _NOT_BASE_FIELDS})
        base_config = family_config_class(**base_fields)
        own = {k: kwargs[k] for k in ("auto_map",) if k in kwargs}
        kwargs = {k: v for k, v in base_config.to_dict().items() if k not in _NOT_BASE_FIELDS} | own
        # Families that alias standard names (GPT-2's n_embd -> hidden_size) get the standard name too.
        for alias in family_config_class.attribute_map:
            kwargs.setdefault(alias, getattr(base_config, alias))
        # Set here, not passed on: transformers 5 drops `use_cache` from a config's kwargs as a generation setting.
        self.use_cache = kwargs.pop("use_cache", True)
        super().__init__(**kwargs)
        self.validate_moe_settings()

    def validate_moe_settings(self):
        """Refuse settings that cannot describe a working MoE, naming the field."""
        for name in ("num_experts", "topk", "adapter_dim"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if self.topk > self.num_experts:
            raise ValueError(f"topk ({self.topk}) cannot exceed num_experts ({self.num_experts})")
        if not 0.0 <= self.adapter_dropout < 1.0:
            raise ValueError(f"adapter_dropout must be in [0, 1), got {self.adapter_dropout!r}")
        if self.router_aux_loss_coef < 0:
            raise ValueError(f"router_aux_loss_coef must be >= 0, got {self.router_aux_loss_coef!r}")

    def base_config(self) -> PreTrainedConfig:
        """The dense family's own config, rebuilt from our flat fields."""
        fields = {k: v for k, v in self.to_dict().items() if k not in PESC_DEFAULTS and k not in _NOT_BASE_FIELDS}
        family_config_class = CONFIG_MAPPING[self.base_model_type]
        return family_config_class(**_rope_fields_for(family_config_class, fields))


__all__ = ["PescConfig"]
