"""Configuration of a MoELoRA model (Luo et al., arXiv 2402.12851): top-k routed LoRA experts on linears.

Shipped inside every MoELoRA checkpoint beside the shared moe_*.py files (the flat-config machinery every
method shares: imports only torch and transformers). The dense family's fields sit flat at the
top level, `base_model_type` names the family.
"""

from .moe_config import FlatMoEConfig

# The contrastive-loss forms the model knows (modeling_moelora.CONTRASTIVE_FORMS computes them).
CONTRASTIVE_FORMS = ("same_expert",)


class MoELoraConfig(FlatMoEConfig):
    r"""
    A dense decoder whose chosen linears (`sites`) each get a router and `num_experts` LoRA experts,
    of which the router picks `num_experts_per_tok` (k) per token:
    y = W0 x + sum_{i in top-k} w_i (alpha/r) B_i A_i dropout(x).

    Args:
        num_experts (`int`): LoRA experts per site.
        num_experts_per_tok (`int`): experts routed per token (pesc 0.1.0 named it `topk`).
        lora_rank (`int`), lora_alpha (`float`), lora_dropout (`float`): each expert's LoRA shape, scale, dropout.
        sites (`list[str]`): linears carrying experts (default q_proj, v_proj; pesc 0.1.0 wrote them as one
            comma-separated string, which still loads).
        router_aux_loss_coef (`float`): weight of the Switch balance loss (`aux_loss`).
        contrastive_loss_coef (`float`): weight of the contrastive loss (`contrastive_loss`).
        contrastive_temperature (`float`): temperature of the contrastive loss's InfoNCE.
        contrastive_sample_size (`int`): tokens per site whose expert outputs the contrastive loss sees.
        contrastive_form (`str`): which contrastive loss (`"same_expert"`).
        kwargs: the dense family's config fields, and the common config fields.
    """

    model_type = "pesc_moelora"

    method_defaults = {
        "num_experts": 8,
        "num_experts_per_tok": 2,
        "lora_rank": 8,
        "lora_alpha": 16,
        "lora_dropout": 0.05,
        "sites": ["q_proj", "v_proj"],
        "router_aux_loss_coef": 0.01,
        "contrastive_loss_coef": 0.01,
        "contrastive_temperature": 0.07,
        "contrastive_sample_size": 128,
        "contrastive_form": "same_expert",
    }
    method_ranges = {"lora_rank": "positive integer", "lora_alpha": "positive", "contrastive_temperature": "positive",
                     "lora_dropout": "fraction", "router_aux_loss_coef": "non-negative",
                     "contrastive_loss_coef": "non-negative", "contrastive_sample_size": "non-negative",
                     "contrastive_form": CONTRASTIVE_FORMS}

    def __init__(self, **kwargs):  # explicit: transformers 5 gives a config class without one a dataclass __init__
        if "topk" in kwargs:  # the name pesc 0.1.0 wrote: read, never written again
            kwargs.setdefault("num_experts_per_tok", kwargs.pop("topk"))
        super().__init__(**kwargs)

    def validate_moe_settings(self):
        """Refuse settings that cannot describe a working model, naming the field."""
        self.check_top_k()
        self.check_sites()


__all__ = ["MoELoraConfig"]
