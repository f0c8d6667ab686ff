"""MoV (Zadouri et al., arXiv 2309.05444): soft-merged (IA)³ vectors on the keys and values (per key/value
head) and the FFN activation act(gate(x)) (the official MLP block; `ffn_site` "down_proj_input" is pesc 0.1.0's
form); dense float32 softmax routers; no aux loss.

The official code is T5; the decoder mapping (which linears and activation): docs/methods/mov-molora.md.
"""


from pesc.methods.base import Method, Setting
from pesc.methods.shapes import attention_dims
from pesc.methods.soft_merging import draw_block_sites, draw_sites


class MoV(Method):
    name = "mov"
    label = "MoV"
    description = (
        "MoV (arXiv 2309.05444): soft-merged (IA)³ vectors on k_proj / v_proj outputs (per key/value head) "
        "and the FFN activation act(gate(x)), dense float32 softmax routers; no aux loss"
    )
    settings = (  # defaults and ranges: configuration_mov.MoVConfig
        Setting("num_experts", (int,), "vectors per site (MoV-10; the paper also has 30 and 60)", structural=True),
        Setting("ffn_site", (str,), "the FFN's site: activation (official: the router reads and the vectors scale "
                "act(gate(x)), before the product with up(x)) or down_proj_input (pesc 0.1.0: act(gate(x)) * up(x))",
                structural=True),
    )
    vllm_model = "pesc.methods.mov.vllm_model:MoVForCausalLM"
    prefix = "mov_"
    card_tags = ("mov", "ia3", "soft-merging")

    config_class_path = "configuration_mov.MoVConfig"
    model_class_path = "modeling_mov.MoVForCausalLM"
    auto_model_class_path = "modeling_mov.MoVModel"
    seq2seq_model_class_path = "modeling_mov.MoVForConditionalGeneration"

    def default_lora_targets(self, config) -> list[str]:
        return []  # only the routers and vectors train

    def initial_state(self, config, layer_idx: int, seed: int) -> dict:
        if config.is_encoder_decoder:
            return draw_block_sites(self, config, layer_idx, seed)
        from pesc.methods.mov.modeling_mov import MoVScaling, mov_sites

        _, kv_heads, head_dim = attention_dims(config)
        sites = {}
        for parent, name, _ in mov_sites(config):  # the FFN's activation, either form, is intermediate_size wide
            width, heads = (head_dim, kv_heads) if parent == "self_attn" else (config.intermediate_size, 1)
            sites[f"{parent}.mov_{name}"] = MoVScaling(width, config.num_experts, heads)
        return draw_sites(config, sites, layer_idx, seed)

    def card_title(self, config) -> str:
        return f"MoV-{config.num_experts}"


MOV = MoV()
