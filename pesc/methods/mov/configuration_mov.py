"""Configuration of a MoV model (mixture of (IA)³ vectors, arXiv 2309.05444).

Shipped inside every MoV checkpoint beside the shared moe_*.py files (the flat-config machinery every
method shares): the dense family's fields sit flat at the top level, next to MoV's own.
"""

from .moe_config import FlatMoEConfig

# Where the FFN's vectors act: "activation", the official MLP block (the router reads act(gate(x)) and the
# vectors scale it, before the product with up(x)); "down_proj_input", pesc 0.1.0's form (the router reads and
# the vectors scale act(gate(x)) * up(x), the input of down_proj).
FFN_SITES = ("activation", "down_proj_input")


class MoVConfig(FlatMoEConfig):
    r"""
    A dense decoder whose key, value and FFN activations are rescaled by soft-merged
    (IA)³ vectors: each site owns `num_experts` vectors and a float32 softmax router.

    Args:
        num_experts (`int`): vectors per site (the paper's MoV-10, -30, -60).
        ffn_site (`str`): "activation" (official, what `pesc convert` writes) or "down_proj_input" (pesc 0.1.0's
            form, and what a config.json without the field means, so that its checkpoints compute what they did).
        num_experts_per_tok (`int`): num_experts (the routers mix every vector; stored for the readers of the
            Hugging Face MoE name).
        kwargs: `base_model_type`, `moe_dtype`, `output_router_logits`, the dense family's config fields.
    """

    model_type = "pesc_mov"
    method_defaults = {"num_experts": 10, "ffn_site": "activation"}
    method_ranges = {"ffn_site": FFN_SITES}
    absent_defaults = {"ffn_site": "down_proj_input"}  # a config.json without the field predates it (pesc 0.1.0)

    def __init__(self, **kwargs):  # explicit: transformers 5 gives a config class without one a dataclass __init__
        if kwargs.get("is_encoder_decoder") and "ffn_site" not in kwargs:
            kwargs["ffn_site"] = "activation"  # no T5 checkpoint predates the field: it has the official site only
        super().__init__(**kwargs)

    def validate_moe_settings(self):
        self.check_top_k(every_expert=True)
        if getattr(self, "is_encoder_decoder", False) and self.ffn_site != "activation":
            raise ValueError(f"MoV on an encoder-decoder (T5) has the official FFN site only: ffn_site 'activation', "
                             f"not {self.ffn_site!r}")


__all__ = ["MoVConfig", "FFN_SITES"]
