"""The flat config every method's config builds on: every field of the dense family's config at the top
level, beside the method's own settings (as the published Camelidae checkpoints have it).

Shipped in every checkpoint (each configuration_<m>.py imports it relatively), so it imports only
transformers and runs on transformers 4.46.3 and later: where the API differs between releases it asks
what the installed release has (a class name, a config field), never which version it is.
"""

import math

from transformers import CONFIG_MAPPING

try:
    from transformers import PreTrainedConfig
except ImportError:  # transformers 4.x spells it PretrainedConfig
    from transformers import PretrainedConfig as PreTrainedConfig


# The linears a method's site may sit on, and the module of a decoder layer that holds each (the
# gated-MLP families: llama, mistral, qwen2, ...).
LINEAR_PARENTS = {
    "q_proj": "self_attn", "k_proj": "self_attn", "v_proj": "self_attn", "o_proj": "self_attn",
    "gate_proj": "mlp", "up_proj": "mlp", "down_proj": "mlp",
}  # fmt: skip

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

    # The method's fields with their defaults, the one source of them (the CLI and YAML read them here);
    # everything else belongs to the family.
    method_defaults = {}
    # Fields every method's config has: the dense family, the dtype of the added modules, whether the forward
    # returns the router logits and named aux losses by default, and the experts a token is routed to under the
    # name Hugging Face MoE configs and serving engines read (None: every expert, as a dense router mixes them).
    common_defaults = {"base_model_type": "llama", "moe_dtype": None, "output_router_logits": False,
                       "num_experts_per_tok": None}
    # What a config without one of the method's fields means where that is not its default: the form of the
    # checkpoints written before the field existed (new ones always store it), which must compute what they did.
    absent_defaults = {}

    def __init__(self, **kwargs):
        for name, default in {**self.common_defaults, **self.method_defaults, **self.absent_defaults}.items():
            value = kwargs.pop(name, default)
            if isinstance(default, list) and isinstance(value, str):  # "q_proj,v_proj": a flag; 0.1.0's MoELoRA
                value = [item.strip() for item in value.split(",") if item.strip()]
            setattr(self, name, value)
        if self.num_experts_per_tok is None:
            self.num_experts_per_tok = self.num_experts
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
        self.check_ranges()
        self.validate_moe_settings()

    # Each setting's range, declared once: checked by `check_ranges` and shown by `pesc methods`. A name in
    # `number_ranges`, "positive integer", or a tuple of the allowed values.
    method_ranges = {}
    common_ranges = {"num_experts": "positive integer"}

    def check_ranges(self) -> None:
        """Every declared range holds, or a ValueError naming the first field that is out of it."""
        for name, allowed in {**self.common_ranges, **self.method_ranges}.items():
            value = getattr(self, name)
            if isinstance(allowed, tuple):
                if value not in allowed:
                    raise ValueError(f"{name} must be one of {', '.join(map(str, allowed))}, got {value!r}")
            elif allowed == "positive integer":
                self.require_positive_integers(name)
            else:
                self.require_numbers(allowed, name)

    @classmethod
    def range_text(cls, name: str) -> str:
        """How a field's range reads ("-": no declared range)."""
        allowed = {**cls.common_ranges, **cls.method_ranges}.get(name)
        if name == "num_experts_per_tok":
            return "1 to num_experts"
        if name == "sites":
            return "distinct linears"
        if allowed is None:
            return "-"
        if isinstance(allowed, tuple):
            return "one of " + ", ".join(map(str, allowed))
        return allowed if allowed == "positive integer" else cls.number_ranges[allowed][1]

    def validate_moe_settings(self):
        """Refuse settings that cannot describe a working model, naming the field (each method's own checks)."""

    def check_top_k(self, every_expert: bool = False) -> None:
        """num_experts_per_tok is 1..num_experts; exactly num_experts for a router that mixes every expert."""
        self.require_positive_integers("num_experts_per_tok")
        if self.num_experts_per_tok > self.num_experts:
            raise ValueError(
                f"num_experts_per_tok ({self.num_experts_per_tok}) cannot exceed num_experts ({self.num_experts})"
            )
        if every_expert and self.num_experts_per_tok != self.num_experts:
            raise ValueError(f"num_experts_per_tok must be num_experts ({self.num_experts}): the router mixes every "
                             f"expert, got {self.num_experts_per_tok!r}")

    def check_sites(self) -> None:
        """`sites` (where a method's experts sit beside linears) is a non-empty list of distinct linears."""
        sites = self.sites
        known = isinstance(sites, (list, tuple)) and all(isinstance(s, str) and s in LINEAR_PARENTS for s in sites)
        if not known or not sites or len(set(sites)) != len(sites):
            raise ValueError(
                f"sites must be a non-empty list of distinct linears among {', '.join(LINEAR_PARENTS)}, got {sites!r}"
            )

    def require_positive_integers(self, *names: str) -> None:
        """The named fields are positive integers (not bools), or a ValueError naming the first that is not."""
        for name in names:
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")

    # The ranges a method's number fields are checked against: (test, how the error words it).
    number_ranges = {
        "positive": (lambda v: v > 0, "a positive number"),
        "non-negative": (lambda v: v >= 0, ">= 0"),
        "fraction": (lambda v: 0 <= v < 1, "in [0, 1)"),
    }

    def require_numbers(self, bounds: str, *names: str) -> None:
        """The named fields are finite numbers (not bools) in the range `number_ranges[bounds]`, or a ValueError
        naming the first that is not."""
        within, wording = self.number_ranges[bounds]
        for name in names:
            value = getattr(self, name)
            number = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
            if not number or not within(value):
                raise ValueError(f"{name} must be {wording}, got {value!r}")

    def base_config(self) -> PreTrainedConfig:
        """The dense family's own config, rebuilt from our flat fields."""
        own = {**self.common_defaults, **self.method_defaults}
        fields = {k: v for k, v in self.to_dict().items() if k not in own and k not in _NOT_BASE_FIELDS}
        family_config_class = CONFIG_MAPPING[self.base_model_type]
        return family_config_class(**_rope_fields_for(family_config_class, fields))
