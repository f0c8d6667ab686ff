"""MoELoRA (Luo et al., arXiv 2402.12851; not MOELoRA of Liu et al., 2310.18339): top-k routed LoRA experts.

Each site (a linear: q_proj and v_proj by default) gets `self_attn.moelora_<linear>`: a router on the
linear's input and E LoRA experts (`down` = the A's, `up` = the B's, stacked); the top-2 experts of a token
add w_i (alpha/r) B_i A_i dropout(x) to the linear's output. Aux losses: the Switch balance loss
(`aux_loss`) and a contrastive loss over expert outputs (`contrastive_loss`). No official code exists:
the contrastive form, its temperature and weights are our defaults (docs/methods/moelora.md).
"""


from pesc.methods.base import Method, Setting
from pesc.methods.shapes import linear_shape


class MoELora(Method):
    name = "moelora"
    label = "MoELoRA"
    description = (
        "MoELoRA (arXiv 2402.12851): top-k routed LoRA experts beside q_proj and v_proj (settable); "
        "aux losses: Switch balance (aux_loss), contrastive over expert outputs (contrastive_loss)"
    )
    settings = (  # defaults and ranges: configuration_moelora.MoELoraConfig
        Setting("num_experts", (int,), "LoRA experts per site", structural=True),
        Setting("top_k", (int,), "experts routed per token", config_field="num_experts_per_tok", structural=True),
        Setting("lora_rank", (int,), "rank r of each LoRA expert", structural=True),
        Setting("lora_alpha", (int, float), "each LoRA expert's output is scaled by alpha / r", structural=True),
        Setting("lora_dropout", (int, float), "dropout on the experts' input"),
        Setting("sites", (list, str), "linears that get experts (q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj, "
                "down_proj): a list, or names joined by commas", structural=True),
        Setting("router_aux_loss_coef", (int, float), "weight of the load-balancing loss"),
        Setting("contrastive_loss_coef", (int, float), "weight of the contrastive loss (ours)"),
        Setting("contrastive_temperature", (int, float), "temperature tau of the contrastive loss (ours)"),
        Setting("contrastive_sample_size", (int,), "tokens per site and step the contrastive loss samples"),
        Setting("contrastive_form", (str,), "which contrastive loss (same_expert)"),
    )
    vllm_model = "pesc.methods.moelora.vllm_model:MoELoraForCausalLM"
    prefix = "moelora_"
    card_tags = ("moelora", "lora-experts")

    config_class_path = "configuration_moelora.MoELoraConfig"
    model_class_path = "modeling_moelora.MoELoraForCausalLM"
    auto_model_class_path = "modeling_moelora.MoELoraModel"

    def initial_state(self, config, layer_idx: int, seed: int) -> dict:
        """Per site, in `sites` order: the router, then each expert's A (kaiming-uniform), B zero; one seeded
        generator per layer, so any layer can be drawn alone."""
        import torch

        from pesc.methods.seeding import layer_generator
        from pesc.methods.moelora.modeling_moelora import SITE_PREFIX, MoELoraSite, init_site
        from pesc.modeling.moe_config import LINEAR_PARENTS

        generator = layer_generator(seed, layer_idx)
        dtype = getattr(torch, config.moe_dtype) if config.moe_dtype else torch.float32
        state = {}
        for name in config.sites:
            site = MoELoraSite(*linear_shape(config, name), config, name, layer_idx)
            init_site(site, generator)
            for key, tensor in site.state_dict().items():
                state[f"{LINEAR_PARENTS[name]}.{SITE_PREFIX}{name}.{key}"] = tensor.to(dtype)
        return state

    def default_lora_targets(self, config) -> list[str]:
        """None: the routers and LoRA experts are all that trains (the base stays frozen, 4-bit under QLoRA)."""
        return []

    def inactive_params_per_token(self, config, added_per_layer: dict[str, int]) -> int:
        """A token uses k of the E experts of each site: the other experts' A and B are idle."""
        experts = sum(count for name, count in added_per_layer.items() if name.endswith((".down", ".up")))
        return experts * (config.num_experts - config.num_experts_per_tok) // config.num_experts


MOELORA = MoELora()
