"""Configuration of a MoLoRA model (mixture of LoRA experts, arXiv 2309.05444).

Shipped inside every MoLoRA checkpoint beside the shared moe_*.py files (the flat-config machinery every
method shares): the dense family's fields sit flat at the top level, next to MoLoRA's own.
"""

from .moe_config import FlatMoEConfig

# How the probabilities kept by a top-k router are weighed.
TOP_K_WEIGHTS = ("masked", "renormalized")
# The official sites (q, k, v, o, wi_0 and wo of T5) on a decoder's linears: up_proj (T5's wi_1) is not one.
OFFICIAL_SITES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "down_proj")


class MoLoRAConfig(FlatMoEConfig):
    r"""
    A dense decoder whose linears (`sites`) each get a float32 softmax router on their input
    and `num_experts` LoRA experts of rank `expert_rank`, soft-merged: y = W0 x + (alpha/r) sum_e p_e B_e A_e x.

    Args:
        num_experts (`int`): LoRA experts per site.
        expert_rank (`int`): rank r of each expert.
        expert_alpha (`float`): LoRA alpha; the experts' sum is scaled by alpha / r.
        sites (`list[str]`): the linears that get experts (default: the official q, k, v, o, gate and down
            projections; up_proj may be added, ours; pesc 0.1.0 named the field `molora_sites` and defaulted to
            all seven projections).
        num_experts_per_tok (`int`): experts kept per token: num_experts (the default; 0 says it too) mixes every
            expert, k < num_experts keeps the k largest probabilities (pesc 0.1.0 named the field `router_topk`,
            0 for every expert).
        router_topk_weights (`str`): with k < num_experts, "masked" keeps the k probabilities as they are (the
            official router), "renormalized" divides them by their sum.
        router_jitter (`float`): multiplicative U(1 - j, 1 + j) noise on the router input while training.
        kwargs: `base_model_type`, `moe_dtype`, `output_router_logits`, the dense family's config fields.
    """

    model_type = "pesc_molora"

    method_defaults = {
        "num_experts": 10,
        "expert_rank": 4,
        "expert_alpha": 16.0,
        "sites": list(OFFICIAL_SITES),
        "router_topk_weights": "masked",
        "router_jitter": 0.0,
    }
    method_ranges = {"expert_rank": "positive integer", "expert_alpha": "positive",
                     "router_topk_weights": TOP_K_WEIGHTS, "router_jitter": "fraction"}

    def __init__(self, **kwargs):  # explicit: transformers 5 gives a config class without one a dataclass __init__
        # the names pesc 0.1.0 wrote: read, never written again
        if "molora_sites" in kwargs:
            kwargs.setdefault("sites", kwargs.pop("molora_sites"))
        if "router_topk" in kwargs:
            kwargs.setdefault("num_experts_per_tok", kwargs.pop("router_topk"))
        if kwargs.get("num_experts_per_tok") == 0:  # `--top-k 0` and 0.1.0's router_topk 0: every expert
            kwargs["num_experts_per_tok"] = None
        super().__init__(**kwargs)

    def validate_moe_settings(self):
        self.check_top_k()
        self.check_sites()


__all__ = ["MoLoRAConfig", "OFFICIAL_SITES"]
