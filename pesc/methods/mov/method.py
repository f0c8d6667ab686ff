"""MoV (Zadouri et al., arXiv 2309.05444): soft-merged (IA)³ vectors on the keys and values (per key/value
head) and the FFN intermediate activation; dense float32 softmax routers; no aux loss.

The decoder mapping is ours (the paper's code is T5): docs/methods/mov-molora.md.
"""


from pesc.methods.base import Method, Setting
from pesc.methods.shapes import attention_dims
from pesc.methods.soft_merging import draw_sites


class MoV(Method):
    name = "mov"
    label = "MoV"
    description = (
        "MoV (arXiv 2309.05444): soft-merged (IA)³ vectors on k_proj / v_proj outputs (per key/value head) "
        "and the FFN intermediate activation, dense float32 softmax routers; no aux loss"
    )
    settings = (  # defaults and ranges: configuration_mov.MoVConfig
        Setting("num_experts", (int,), "vectors per site (MoV-10; the paper also has 30 and 60)", structural=True),
    )
    vllm_model = "pesc.methods.mov.vllm_model:MoVForCausalLM"
    prefix = "mov_"
    card_tags = ("mov", "ia3", "soft-merging")

    config_class_path = "configuration_mov.MoVConfig"
    model_class_path = "modeling_mov.MoVForCausalLM"
    auto_model_class_path = "modeling_mov.MoVModel"

    def default_lora_targets(self, config) -> list[str]:
        return []  # only the routers and vectors train

    def initial_state(self, config, layer_idx: int, seed: int) -> dict:
        from pesc.methods.mov.modeling_mov import MOV_SITES, MoVScaling

        _, kv_heads, head_dim = attention_dims(config)
        sites = {}
        for parent, linear, position in MOV_SITES:
            width, heads = (head_dim, kv_heads) if position == "output" else (config.intermediate_size, 1)
            sites[f"{parent}.mov_{linear}"] = MoVScaling(width, config.num_experts, heads)
        return draw_sites(config, sites, layer_idx, seed)

    def card_title(self, config) -> str:
        return f"MoV-{config.num_experts}"


MOV = MoV()
