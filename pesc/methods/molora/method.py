"""MoLoRA (Zadouri et al., arXiv 2309.05444): soft-merged LoRA experts on the official q, k, v, o, gate and down
projections (settable: more sites, such as up_proj, are ours), each site a float32 softmax router on its input;
optional top-k and jitter; no aux loss.

The official code is T5; the decoder mapping (which linears): docs/methods/mov-molora.md.
"""


from pesc.methods.base import Method, Setting
from pesc.methods.shapes import linear_shape
from pesc.methods.soft_merging import draw_block_sites, draw_sites


class MoLoRA(Method):
    name = "molora"
    label = "MoLoRA"
    description = (
        "MoLoRA (arXiv 2309.05444): soft-merged LoRA experts on q/k/v/o/gate/down (the official sites), each a "
        "dense float32 softmax router on the linear's input (optional top-k, jitter); no aux loss"
    )
    settings = (  # defaults and ranges: configuration_molora.MoLoRAConfig
        Setting("num_experts", (int,), "LoRA experts per site", structural=True),
        Setting("expert_rank", (int,), "rank r of each LoRA expert", structural=True),
        Setting("expert_alpha", (int, float), "LoRA alpha of the experts (their sum is scaled by alpha / r)",
                structural=True),
        Setting("sites", (list, str), "linears that get experts: a list, or names joined by commas (official: q, k, "
                "v, o, gate, down; up_proj is ours)", structural=True),
        Setting("top_k", (int,), "experts kept per token (None or 0: every expert, soft merging)",
                config_field="num_experts_per_tok", structural=True),
        Setting("top_k_weights", (str,), "with top_k: the kept probabilities as they are (masked, the official "
                "router) or divided by their sum (renormalized)", config_field="router_topk_weights", structural=True),
        Setting("router_jitter", (int, float), "multiplicative U(1-j, 1+j) noise on router inputs in training"),
    )
    vllm_model = "pesc.methods.molora.vllm_model:MoLoRAForCausalLM"
    prefix = "molora_"
    card_tags = ("molora", "lora-experts", "soft-merging")

    config_class_path = "configuration_molora.MoLoRAConfig"
    model_class_path = "modeling_molora.MoLoRAForCausalLM"
    auto_model_class_path = "modeling_molora.MoLoRAModel"
    seq2seq_model_class_path = "modeling_molora.MoLoRAForConditionalGeneration"

    def default_lora_targets(self, config) -> list[str]:
        return []  # the experts occupy the linears: only the routers and experts train

    def initial_state(self, config, layer_idx: int, seed: int) -> dict:
        if config.is_encoder_decoder:
            return draw_block_sites(self, config, layer_idx, seed)
        from pesc.methods.molora.modeling_molora import MoLoRAExperts
        from pesc.modeling.moe_config import LINEAR_PARENTS

        sites = {}
        for linear in config.sites:
            in_features, out_features = linear_shape(config, linear)
            sites[f"{LINEAR_PARENTS[linear]}.molora_{linear}"] = MoLoRAExperts(
                in_features, out_features, config.num_experts, config.expert_rank, config.expert_alpha)
        return draw_sites(config, sites, layer_idx, seed)

    def inactive_params_per_token(self, config, added_per_layer: dict[str, int]) -> int:
        """The unkept experts' A and B (their weight is zero): none when every expert is mixed."""
        experts = sum(count for name, count in added_per_layer.items() if name.endswith(("experts_A", "experts_B")))
        return experts * (config.num_experts - config.num_experts_per_tok) // config.num_experts

    def card_title(self, config) -> str:
        return f"MoLoRA-{config.num_experts} (rank {config.expert_rank})"


MOLORA = MoLoRA()
