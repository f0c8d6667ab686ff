"""The flat config every method's config builds on: every field of the dense family's config at the top
level, beside the method's own settings (as the published Camelidae checkpoints have it).

Shipped in every checkpoint (each configuration_<m>.py imports it relatively), so it imports only
transformers and runs on transformers 4.46.3 and later: where the API differs between releases it asks
what the installed release has (a class name, a config field), never which version it is.
"""

from transformers import CONFIG_MAPPING

try:
    from transformers import PreTrainedConfig
except ImportError:  # transformers 4.x spells it PretrainedConfig
    from transformers import PretrainedConfig as PreTrainedConfig


# Keys that describe the checkpoint rather than the base architecture: never copied
# from the dense family's config into ours.
_NOT_BASE_FIELDS = {"model_type", "architectures", "auto_map", "transformers_version"}


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


class FlatMoEConfig(PreTrainedConfig):
    """A dense family's config, flat, plus a method's settings (`method_defaults`, set by each method's config).

    The dense family's own config class validates and completes the base fields, so derived
    fields (head_dim, layer_types, rope settings) are always present. The class has an explicit
    `__init__` (the form every transformers release accepts for remote code) rather than
    dataclass fields, which older releases do not know.
    """

    # The method's fields with their defaults; everything else belongs to the family.
    method_defaults = {}
    # Fields every method's config has: the dense family, the dtype of the added modules, and whether the
    # forward returns the router logits and named aux losses by default.
    common_defaults = {"base_model_type": "llama", "moe_dtype": None, "output_router_logits": False}

    def __init__(self, **kwargs):
        for name, default in {**self.common_defaults, **self.method_defaults}.items():
            setattr(self, name, kwargs.pop(name, default))
        if self.base_model_type not in CONFIG_MAPPING:
            raise ValueError(
                f"unknown base_model_type {self.base_model_type!r}: this transformers version has no such model family"
            )
        family_config_class = CONFIG_MAPPING[self.base_model_type]
        base_fields = _rope_fields_for(family_config_class, {k: v for k, v in kwargs.items() if k not in _NOT_BASE_FIELDS})
        base_config = family_config_class(**base_fields)
        own = {k: kwargs[k] for k in ("auto_map", "architectures") if k in kwargs}
        kwargs = {k: v for k, v in base_config.to_dict().items() if k not in _NOT_BASE_FIELDS} | own
        # Families that alias standard names (GPT-2's n_embd -> hidden_size) get the standard name too.
        for alias in family_config_class.attribute_map:
            kwargs.setdefault(alias, getattr(base_config, alias))
        # Set here, not passed on: transformers 5 drops `use_cache` from a config's kwargs as a generation setting.
        self.use_cache = kwargs.pop("use_cache", True)
        super().__init__(**kwargs)
        self.validate_moe_settings()

    # The method's field holding how many experts a token is routed to (None, or a value of 0: every expert).
    top_k_field = None

    @property
    def num_experts_per_tok(self) -> int:
        """Experts active per token, under the name serving engines read: vLLM's Transformers backend takes any
        config with `num_experts` for an MoE model and requires this of it."""
        top_k = getattr(self, self.top_k_field) if self.top_k_field else 0
        return top_k or self.num_experts

    def validate_moe_settings(self):
        """Refuse settings that cannot describe a working model, naming the field (each method's own checks)."""

    def require_positive_integers(self, *names: str) -> None:
        """The named fields are positive integers (not bools), or a ValueError naming the first that is not."""
        for name in names:
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")

    def base_config(self) -> PreTrainedConfig:
        """The dense family's own config, rebuilt from our flat fields."""
        own = {**self.common_defaults, **self.method_defaults}
        fields = {k: v for k, v in self.to_dict().items() if k not in own and k not in _NOT_BASE_FIELDS}
        family_config_class = CONFIG_MAPPING[self.base_model_type]
        return family_config_class(**_rope_fields_for(family_config_class, fields))
