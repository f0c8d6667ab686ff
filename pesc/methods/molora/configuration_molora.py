"""Configuration of a MoLoRA model (mixture of LoRA experts, arXiv 2309.05444).

Shipped inside every MoLoRA checkpoint beside the shared moe_*.py files (the flat-config machinery every
method shares): the dense family's fields sit flat at the top level, next to MoLoRA's own.
"""

from .moe_config import FlatMoEConfig
from .moe_sites import LINEAR_PARENTS



class MoLoRAConfig(FlatMoEConfig):
    r"""
    A dense decoder whose linears (`molora_sites`) each get a float32 softmax router on their input
    and `num_experts` LoRA experts of rank `expert_rank`, soft-merged: y = W0 x + (alpha/r) sum_e p_e B_e A_e x.

    Args:
        num_experts (`int`): LoRA experts per site.
        expert_rank (`int`): rank r of each expert.
        expert_alpha (`float`): LoRA alpha; the experts' sum is scaled by alpha / r.
        molora_sites (`list[str]`): the linears that get experts (default: all seven projections).
        router_topk (`int`): 0 mixes every expert; k > 0 keeps the k largest probabilities.
        router_topk_weights (`str`): with router_topk, "masked" keeps the k probabilities as they are (the
            official router), "renormalized" divides them by their sum.
        router_jitter (`float`): multiplicative U(1 - j, 1 + j) noise on the router input while training.
        kwargs: `base_model_type`, `moe_dtype`, `output_router_logits`, the dense family's config fields.
    """

    model_type = "pesc_molora"
    top_k_field = "router_topk"

    method_defaults = {
        "num_experts": 10,
        "expert_rank": 4,
        "expert_alpha": 16.0,
        "molora_sites": list(LINEAR_PARENTS),
        "router_topk": 0,
        "router_topk_weights": "masked",
        "router_jitter": 0.0,
    }

    def __init__(self, **kwargs):  # explicit: transformers 5 gives a config class without one a dataclass __init__
        super().__init__(**kwargs)

    def validate_moe_settings(self):
        self.require_positive_integers("num_experts", "expert_rank")
        if not 0 <= self.router_topk <= self.num_experts:
            raise ValueError(f"router_topk must be in [0, num_experts={self.num_experts}], got {self.router_topk!r}")
        if self.router_topk_weights not in ("masked", "renormalized"):
            raise ValueError(f"router_topk_weights must be masked or renormalized, got {self.router_topk_weights!r}")
        if not 0.0 <= self.router_jitter < 1.0:
            raise ValueError(f"router_jitter must be in [0, 1), got {self.router_jitter!r}")
        sites = list(self.molora_sites)
        unknown = [site for site in sites if site not in LINEAR_PARENTS]
        if unknown or not sites or len(set(sites)) != len(sites):
            raise ValueError(
                f"molora_sites must name distinct linears among {', '.join(LINEAR_PARENTS)}, got {sites!r}"
            )


__all__ = ["MoLoRAConfig"]
