"""Configuration of a LoRAMoE model (arXiv 2312.09979): a dense decoder plus routed LoRA experts beside its linears.

Shipped inside every LoRAMoE checkpoint beside the shared moe_*.py files (the flat-config machinery every method
shares) and modeling_loramoe.py. Flat like every pesc config: the dense family's fields at the top
level, next to the LoRAMoE fields below, and `base_model_type` naming the family.
"""

from .moe_config import FlatMoEConfig

OFFICIAL_SITES = ("gate_proj", "up_proj", "down_proj")

# The LoRAMoE settings with the paper's values (FlatMoEConfig adds base_model_type, moe_dtype,
# output_router_logits and num_experts_per_tok); everything else belongs to the dense family.
LORAMOE_DEFAULTS = {
    "num_experts": 6,
    "expert_rank": 4,
    "expert_alpha": 32,
    "expert_dropout": 0.05,
    "sites": list(OFFICIAL_SITES),
    "lbc_delta": 0.1,
    "lbc_loss_coef": 0.1,
    "lbc_groups": None,  # None: the official halves (type 0 the last N/2 experts, type 1 the first N/2)
    "lbc_reduction": "sum",
    "lbc_include_padding": False,
    "lbc_direction": "official",
}

# How the constraint is reduced over sites and layers: `sum` (the official code) or `mean`.
LBC_REDUCTIONS = ("sum", "mean")
# Which way the constraint weighs a sample's own group: `official` 1 + delta (the paper's Eq. 7 and the official
# code), `towards_own_group` 1 - delta (modeling_loramoe.lbc_importance).
LBC_DIRECTIONS = ("official", "towards_own_group")


class LoramoeConfig(FlatMoEConfig):
    r"""
    A dense decoder whose linears `sites` each get a router and `num_experts` LoRA experts, all active:
    y = W0 x + sum_i p_i(x) * B_i A_i dropout(x) * expert_alpha / expert_rank.

    Args:
        base_model_type (`str`): model_type of the dense family (`"llama"`, `"qwen2"`, ...).
        num_experts (`int`): LoRA experts per site (the paper: 6).
        num_experts_per_tok (`int`): num_experts (every expert is active; stored for the readers of the Hugging
            Face MoE name).
        expert_rank (`int`): rank r of every expert.
        expert_alpha (`float`): LoRA alpha; the experts' output is scaled by alpha / r.
        expert_dropout (`float`): dropout on the experts' input (the router reads the undropped input).
        sites (`list[str]`): the linears that get experts (gate_proj, up_proj, down_proj by default).
        lbc_delta (`float`): delta of the localized balancing constraint's importance matrix.
        lbc_loss_coef (`float`): beta, the weight of `lbc_loss` in the training loss.
        lbc_groups (`list[list[int]]`, *optional*): for each task type, the experts of its group.
        lbc_reduction (`str`): `sum` (official) or `mean` of the constraint over sites and layers.
        lbc_include_padding (`bool`): sum router weights over padding tokens too (official).
        lbc_direction (`str`): `official` weighs a sample's own group by 1 + delta, which pulls its routing off
            that group; `towards_own_group` by 1 - delta, which pulls it onto the group.
        moe_dtype (`str`, *optional*): dtype the routers and experts are stored in.
        output_router_logits (`bool`): return router logits and the aux losses by default.
        kwargs: the dense family's config fields, and the common config fields.
    """

    model_type = "pesc_loramoe"

    method_defaults = LORAMOE_DEFAULTS
    method_ranges = {"expert_rank": "positive integer", "expert_alpha": "positive", "expert_dropout": "fraction",
                     "lbc_delta": "fraction", "lbc_loss_coef": "non-negative", "lbc_reduction": LBC_REDUCTIONS,
                     "lbc_direction": LBC_DIRECTIONS}

    def __init__(self, **kwargs):  # explicit: transformers 5 gives a config class without one a dataclass __init__
        super().__init__(**kwargs)

    def validate_moe_settings(self):
        """Refuse settings that cannot describe a working LoRAMoE model, naming the field."""
        self.check_top_k(every_expert=True)
        self.check_sites()
        groups = self.lbc_groups
        if groups is None:
            if self.num_experts % 2 and self.lbc_loss_coef > 0:
                raise ValueError(
                    f"num_experts ({self.num_experts}) is odd: the official grouping gives each of the two task "
                    "types half of the experts; use an even num_experts or give lbc_groups"
                )
        elif not isinstance(groups, (list, tuple)) or not groups or not all(
            isinstance(g, (list, tuple)) and g and len(set(g)) == len(g)
            and all(isinstance(e, int) and not isinstance(e, bool) and 0 <= e < self.num_experts for e in g)
            for g in groups
        ):  # fmt: skip
            raise ValueError(
                f"lbc_groups must be a list with, for each task type, a non-empty list of distinct expert indices "
                f"in 0..{self.num_experts - 1}, got {groups!r}"
            )


__all__ = ["LoramoeConfig"]
