"""MoLoRA (Zadouri et al., arXiv 2309.05444): soft-merged LoRA experts on the seven projections (settable),
each site a float32 softmax router on its input; optional top-k and jitter; no aux loss.

The decoder mapping is ours (the paper's code is T5): docs/methods/mov-molora.md.
"""


from pesc.errors import PescError
from pesc.methods.base import Method, Setting, check_top_k
from pesc.methods.shapes import linear_shape
from pesc.methods.soft_merging import draw_sites

# The linears MoLoRA may sit on, and the decoder-layer module holding each (as configuration_molora.py has them).
SITE_PARENTS = {"q_proj": "self_attn", "k_proj": "self_attn", "v_proj": "self_attn", "o_proj": "self_attn",
                "gate_proj": "mlp", "up_proj": "mlp", "down_proj": "mlp"}


class MoLoRA(Method):
    name = "molora"
    label = "MoLoRA"
    description = (
        "MoLoRA (arXiv 2309.05444): soft-merged LoRA experts on q/k/v/o/gate/up/down, each a dense float32 "
        "softmax router on the linear's input (optional top-k, jitter); no aux loss"
    )
    settings = (
        Setting("num_experts", (int,), 10, "LoRA experts per site", bounds="positive", structural=True),
        Setting("expert_rank", (int,), 4, "rank r of each LoRA expert", bounds="positive", structural=True),
        Setting("expert_alpha", (int, float), 16, "LoRA alpha of the experts (their sum is scaled by alpha / r)",
                bounds="positive", structural=True),
        Setting("sites", (list, str), list(SITE_PARENTS),
                "linears that get experts: a list, or names joined by commas", config_field="molora_sites",
                structural=True),
        Setting("top_k", (int,), 0, "experts kept per token (0: all, soft merging)", bounds="non-negative",
                config_field="router_topk", structural=True),
        Setting("top_k_weights", (str,), "masked", "with top_k: the kept probabilities as they are (masked, the "
                "official router) or divided by their sum (renormalized)", choices=("masked", "renormalized"),
                config_field="router_topk_weights", structural=True),
        Setting("router_jitter", (int, float), 0.0, "multiplicative U(1-j, 1+j) noise on router inputs in training",
                bounds="fraction"),
    )
    modeling_files = ("moe_config.py", "moe_routing.py", "moe_sites.py", "moe_causal_lm.py", "soft_merging.py",
                      "configuration_molora.py", "modeling_molora.py")
    prefix = "molora_"
    card_tags = ("molora", "lora-experts", "soft-merging")

    config_class_path = "configuration_molora.MoLoRAConfig"
    model_class_path = "modeling_molora.MoLoRAForCausalLM"
    auto_model_class_path = "modeling_molora.MoLoRAModel"

    def check_settings(self, values: dict) -> None:
        sites = values["sites"]
        unknown = [s for s in sites if s not in SITE_PARENTS] if isinstance(sites, list) else sites
        if unknown or not sites or len(set(sites)) != len(sites):
            raise PescError(
                f"sites must name distinct linears among {', '.join(SITE_PARENTS)}, got {sites!r}"
            )
        check_top_k(values)

    def default_lora_targets(self, config) -> list[str]:
        return []  # the experts occupy the linears: only the routers and experts train

    def initial_state(self, config, layer_idx: int, seed: int) -> dict:
        from pesc.modeling.modeling_molora import MoLoRAExperts

        sites = {}
        for linear in config.molora_sites:
            in_features, out_features = linear_shape(config, linear)
            sites[f"{SITE_PARENTS[linear]}.molora_{linear}"] = MoLoRAExperts(
                in_features, out_features, config.num_experts, config.expert_rank, config.expert_alpha)
        return draw_sites(config, sites, layer_idx, seed)

    def inactive_params_per_token(self, config, added_per_layer: dict[str, int]) -> int:
        """With top-k, the unkept experts' A and B (their weight is zero); with every expert mixed, none."""
        if not config.router_topk:
            return 0
        experts = sum(count for name, count in added_per_layer.items() if name.endswith(("experts_A", "experts_B")))
        return experts * (config.num_experts - config.router_topk) // config.num_experts

    def card_title(self, config) -> str:
        return f"MoLoRA-{config.num_experts} (rank {config.expert_rank})"


MOLORA = MoLoRA()
