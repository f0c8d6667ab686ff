"""Configuration of a MoELoRA model (Luo et al., arXiv 2402.12851): top-k routed LoRA experts on linears.

Shipped inside every MoELoRA checkpoint beside the shared moe_*.py files (the flat-config machinery every
method shares: imports only torch and transformers). The dense family's fields sit flat at the
top level, `base_model_type` names the family.
"""

from .moe_config import FlatMoEConfig
from .moe_sites import LINEAR_PARENTS

# The contrastive-loss forms the model knows (modeling_moelora.CONTRASTIVE_FORMS computes them).
CONTRASTIVE_FORMS = ("same_expert",)


def site_list(sites: str) -> list[str]:
    """`"q_proj,v_proj"` as ["q_proj", "v_proj"] (the setting is one comma-separated string: a CLI flag too)."""
    return [name.strip() for name in sites.split(",") if name.strip()]


class MoELoraConfig(FlatMoEConfig):
    r"""
    A dense decoder whose chosen linears (`sites`) each get a router and `num_experts` LoRA experts,
    of which the router picks `topk` per token: y = W0 x + sum_{i in topk} w_i (alpha/r) B_i A_i dropout(x).

    Args:
        num_experts (`int`): LoRA experts per site.
        topk (`int`): experts routed per token.
        lora_rank (`int`), lora_alpha (`float`), lora_dropout (`float`): each expert's LoRA shape, scale, dropout.
        sites (`str`): comma-separated linears carrying experts (default `"q_proj,v_proj"`).
        router_aux_loss_coef (`float`): weight of the Switch balance loss (`aux_loss`).
        contrastive_loss_coef (`float`): weight of the contrastive loss (`contrastive_loss`).
        contrastive_temperature (`float`): temperature of the contrastive loss's InfoNCE.
        contrastive_sample_size (`int`): tokens per site whose expert outputs the contrastive loss sees.
        contrastive_form (`str`): which contrastive loss (`"same_expert"`).
        kwargs: the dense family's config fields, and the common config fields.
    """

    model_type = "pesc_moelora"

    top_k_field = "topk"

    method_defaults = {
        "num_experts": 8,
        "topk": 2,
        "lora_rank": 8,
        "lora_alpha": 16,
        "lora_dropout": 0.05,
        "sites": "q_proj,v_proj",
        "router_aux_loss_coef": 0.01,
        "contrastive_loss_coef": 0.01,
        "contrastive_temperature": 0.07,
        "contrastive_sample_size": 128,
        "contrastive_form": "same_expert",
    }

    def __init__(self, **kwargs):  # explicit: transformers 5 gives a config class without one a dataclass __init__
        super().__init__(**kwargs)

    def validate_moe_settings(self):
        """Refuse settings that cannot describe a working model, naming the field."""
        self.require_positive_integers("num_experts", "topk", "lora_rank")
        if self.topk > self.num_experts:
            raise ValueError(f"topk ({self.topk}) cannot exceed num_experts ({self.num_experts})")
        unknown = [name for name in site_list(self.sites) if name not in LINEAR_PARENTS]
        if unknown or not site_list(self.sites) or len(set(site_list(self.sites))) != len(site_list(self.sites)):
            raise ValueError(f"sites {self.sites!r}: each must be one of {', '.join(LINEAR_PARENTS)}, named once")
        if self.contrastive_form not in CONTRASTIVE_FORMS:
            raise ValueError(f"contrastive_form must be one of {', '.join(CONTRASTIVE_FORMS)}, got {self.contrastive_form!r}")
        if not 0.0 <= self.lora_dropout < 1.0:
            raise ValueError(f"lora_dropout must be in [0, 1), got {self.lora_dropout!r}")
        if self.contrastive_temperature <= 0:
            raise ValueError(f"contrastive_temperature must be positive, got {self.contrastive_temperature!r}")


__all__ = ["MoELoraConfig"]
