"""Configuration of a MoV model (mixture of (IA)³ vectors, arXiv 2309.05444).

Shipped inside every MoV checkpoint beside the shared moe_*.py files (the flat-config machinery every
method shares): the dense family's fields sit flat at the top level, next to MoV's own.
"""

from .moe_config import FlatMoEConfig


class MoVConfig(FlatMoEConfig):
    r"""
    A dense decoder whose key, value and FFN-intermediate activations are rescaled by soft-merged
    (IA)³ vectors: each site owns `num_experts` vectors and a float32 softmax router.

    Args:
        num_experts (`int`): vectors per site (the paper's MoV-10, -30, -60).
        num_experts_per_tok (`int`): num_experts (the routers mix every vector; stored for the readers of the
            Hugging Face MoE name).
        kwargs: `base_model_type`, `moe_dtype`, `output_router_logits`, the dense family's config fields.
    """

    model_type = "pesc_mov"
    method_defaults = {"num_experts": 10}

    def __init__(self, **kwargs):  # explicit: transformers 5 gives a config class without one a dataclass __init__
        super().__init__(**kwargs)

    def validate_moe_settings(self):
        self.check_top_k(every_expert=True)


__all__ = ["MoVConfig"]
