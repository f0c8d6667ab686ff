"""Configuration of a PESC sparse model.

Shipped inside every exported checkpoint: imports only torch and transformers.

The config is *flat*, like the published Camelidae checkpoints: every field of the
dense base config (hidden_size, rope settings, ...) sits at the top level next to the
PESC fields, and `base_model_type` names the dense family. The dense family's own
config class validates and completes the base fields, so derived fields (head_dim,
layer_types, rope_parameters) are always present.
"""

from transformers import PreTrainedConfig
from transformers.models.auto.configuration_auto import CONFIG_MAPPING

# Keys that describe the checkpoint rather than the base architecture: never copied
# from the dense family's config into ours.
_NOT_BASE_FIELDS = {"model_type", "architectures", "auto_map", "transformers_version"}


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
    """

    model_type = "pesc"

    base_model_type: str = "llama"
    num_experts: int = 8
    topk: int = 2
    adapter_dim: int = 512
    moe_scaling: float = 0.25
    adapter_dropout: float = 0.1
    moe_dtype: str | None = None
    output_router_logits: bool = False
    router_aux_loss_coef: float = 0.01
    use_cache: bool = True

    def __post_init__(self, **kwargs):
        if self.base_model_type not in CONFIG_MAPPING:
            raise ValueError(
                f"unknown base_model_type {self.base_model_type!r}: this transformers version has no such model family"
            )
        base_fields = {k: v for k, v in kwargs.items() if k not in _NOT_BASE_FIELDS}
        base_config = CONFIG_MAPPING[self.base_model_type](**base_fields)
        own = {k: kwargs[k] for k in ("auto_map",) if k in kwargs}
        kwargs = {k: v for k, v in base_config.to_dict().items() if k not in _NOT_BASE_FIELDS} | own
        # Families that alias standard names (GPT-2's n_embd -> hidden_size) get the standard name too.
        for alias in type(base_config).attribute_map:
            kwargs.setdefault(alias, getattr(base_config, alias))
        super().__post_init__(**kwargs)
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
        own = set(PescConfig.__dataclass_fields__) - set(PreTrainedConfig.__dataclass_fields__)
        fields = {k: v for k, v in self.to_dict().items() if k not in own and k not in _NOT_BASE_FIELDS}
        return CONFIG_MAPPING[self.base_model_type](**fields)


__all__ = ["PescConfig"]
