"""MoV: a soft-merged mixture of (IA)³ vectors (Zadouri et al., arXiv 2309.05444), on a dense decoder.

Shipped inside every MoV checkpoint: imports only torch, transformers and its sibling files.

(IA)³ rescales three activations; MoV gives each of them E learned vectors and a router:
    y = a ⊙ Σ_e p_e l_e,    p = softmax(router(a)) over all E experts, float32
with every l_e initialised to ones, so a fresh model is exactly its base. The router reads
the activation it rescales. On a decoder the sites are (the official T5 sites on a decoder's linears):
- the outputs of `k_proj` and `v_proj`, per head: each key/value head routes on its own
  head_dim-wide vector with one router kernel [E, head_dim] shared by every head, and owns
  its own E vectors (the official `MoVAttention`); with grouped-query attention the heads
  are the key/value heads;
- the FFN, by `config.ffn_site`: "activation" (the official MLP block) rescales act(gate(x)), the
  output of the MLP's `act_fn`, before the product with up(x), and routes on it; "down_proj_input"
  (pesc 0.1.0's form, kept so its checkpoints compute what they did) rescales and routes on
  act(gate(x)) * up(x), the input of `down_proj`. The scaled outputs agree only while the router
  reads the same tensor: once the vectors are trained, the two forms differ.
"""

import torch
from torch import nn

from .configuration_mov import MoVConfig
from .moe_causal_lm import MoEForCausalLM, MoEModel
from .moe_routing import emit_routing_record
from .moe_seq2seq_lm import MoEForConditionalGeneration, block_attentions, block_ffn
from .moe_sites import activation_on, attach_sibling, linear_on
from .soft_merging import SoftRouter


class MoVScaling(nn.Module):
    """E (IA)³ vectors on one activation of `heads * width` features, soft-merged per token and head.

    `vectors[h, e]` is expert e's vector for head h (one head for the FFN site). The merge is
    the matmul `p @ L`, never a loop over experts.
    """

    def __init__(self, width: int, num_experts: int, heads: int = 1, site: str = "", layer_idx: int = 0):
        super().__init__()
        self.site, self.layer_idx = site, layer_idx  # name its routing records
        self.width = width
        self.heads = heads
        self.router = SoftRouter(width, num_experts)
        self.vectors = nn.Parameter(torch.ones(heads, num_experts, width))

    def reset_parameters(self, generator: torch.Generator | None = None) -> None:
        """The official init: router ~ N(0, 0.02), every vector all ones."""
        self.router.reset_parameters(generator)
        with torch.no_grad():
            self.vectors.fill_(1.0)

    def merged_vectors(self, activation: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Each token's and head's merged vector Σ_e p_e l_e [tokens, heads, width] (float32), and the router logits."""
        rows = activation.reshape(-1, self.heads, self.width)
        logits = self.router.logits(rows)  # [tokens, heads, E]
        probabilities, _ = self.router.probabilities(logits)
        # 1 + p @ (L - 1) is p @ L since the p sum to one; written so, vectors of ones merge
        # to exactly one, whatever the float rounding of sum(p).
        offsets = self.vectors.float() - 1.0  # [heads, E, width]
        merged = torch.matmul(probabilities.transpose(0, 1), offsets).add_(1.0).transpose(0, 1)
        return merged, logits

    def forward(self, activation: torch.Tensor) -> torch.Tensor:
        """activation ⊙ its merged vector, in the activation's dtype and shape."""
        merged, logits = self.merged_vectors(activation)
        # one record [tokens, E] per head, as every reader of records expects one row per token; dense: all active
        for head in range(self.heads):
            site = self.site if self.heads == 1 else f"{self.site}.head{head}"
            emit_routing_record(site, self.layer_idx, logits[:, head])
        rows = activation.reshape(-1, self.heads, self.width)
        return (rows * merged.to(activation.dtype)).reshape(activation.shape)

    def linear_output_hook(self, module: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
        """The K / V sites and the FFN's "activation" site: rescale the module's output."""
        return self(output)

    def linear_input_hook(self, linear: nn.Module, args: tuple) -> tuple:
        """The FFN's "down_proj_input" site: rescale down_proj's input, act(gate(x)) * up(x)."""
        return (self(args[0]), *args[1:])


# Where MoV's sites sit: (parent module in the decoder layer, module, which side of it); the FFN's by `ffn_site`.
ATTENTION_SITES = (("self_attn", "k_proj", "output"), ("self_attn", "v_proj", "output"))
FFN_SITE_MODULES = {"activation": ("mlp", "act_fn", "output"), "down_proj_input": ("mlp", "down_proj", "input")}


def mov_sites(config: MoVConfig) -> tuple:
    """The (parent, module, side) of each of the config's sites: keys, values, then the FFN."""
    return (*ATTENTION_SITES, FFN_SITE_MODULES[config.ffn_site])


class MoVForCausalLM(MoEForCausalLM):
    """A dense family's causal LM with MoV sites beside k_proj, v_proj and the FFN's act_fn (or down_proj, in the
    0.1.0 form), named `mov_<module>`."""

    config_class = MoVConfig
    method_label = "MoV"
    _no_split_modules = []

    def add_method_modules(self, layer: nn.Module, layer_idx: int, config: MoVConfig) -> None:
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        kv_heads = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
        for parent_name, name, position in mov_sites(config):
            keep_whole = ()
            if parent_name == "self_attn":  # keys / values: per key/value head
                linear = linear_on(layer, parent_name, name, config.base_model_type, self.method_label)
                if linear.out_features != kv_heads * head_dim:
                    raise ValueError(
                        f"MoV cannot wrap model family {config.base_model_type!r}: its {name} gives "
                        f"{linear.out_features} features, not {kv_heads} key/value heads x {head_dim}"
                    )
                site = MoVScaling(head_dim, config.num_experts, kv_heads, name, layer_idx)
            elif name == "act_fn":  # act(gate(x)): gate_proj's width; vLLM must not fuse gate_proj into act-and-mul
                activation_on(layer, parent_name, name, config.base_model_type, self.method_label, self.model.layers)
                gate = linear_on(layer, parent_name, "gate_proj", config.base_model_type, self.method_label)
                site = MoVScaling(gate.out_features, config.num_experts, 1, name, layer_idx)
                keep_whole = ("gate_proj",)
            else:  # act(gate(x)) * up(x), down_proj's input
                linear = linear_on(layer, parent_name, name, config.base_model_type, self.method_label)
                site = MoVScaling(linear.in_features, config.num_experts, 1, name, layer_idx)
            attach_sibling(getattr(layer, parent_name), name, f"mov_{name}", site, position, keep_whole)

    def init_method_module(self, module: nn.Module) -> bool:
        if isinstance(module, MoVScaling):
            module.reset_parameters()
            return True
        return isinstance(module, SoftRouter)  # drawn with its site


class MoVModel(MoEModel):
    """The MoV backbone without the LM head (what `AutoModel` and vLLM's Transformers backend load)."""

    config_class = MoVConfig
    causal_lm_class = MoVForCausalLM


class MoVForConditionalGeneration(MoEForConditionalGeneration):
    """T5 / mT5 with MoV's sites where the official code puts them (its MoVAttention and MoV modules): the keys and
    values of every attention (encoder and decoder self-attention, cross-attention), per head, beside `k` and `v`
    (`mov_k`, `mov_v`); and the FFN activation act(wi_0·x) (act(wi·x) in ReLU T5 v1.0), the output of the FFN's
    own `act` module (`mov_act`): the vectors scale it, and its router reads it, before the product with wi_1·x."""

    config_class = MoVConfig
    method_label = "MoV"
    init_method_module = MoVForCausalLM.init_method_module

    @classmethod
    def add_method_modules(cls, block: nn.Module, stack_name: str, block_idx: int, config: MoVConfig) -> None:
        for attention_name, attention in block_attentions(block):
            for linear_name in ("k", "v"):
                site = MoVScaling(config.d_kv, config.num_experts, config.num_heads,
                                  f"{stack_name}.{attention_name}.{linear_name}", block_idx)
                attach_sibling(attention, linear_name, f"mov_{linear_name}", site, "output")
        site = MoVScaling(config.d_ff, config.num_experts, 1, f"{stack_name}.ffn.act", block_idx)
        attach_sibling(block_ffn(block), "act", "mov_act", site, "output")


__all__ = ["MoVForCausalLM", "MoVForConditionalGeneration", "MoVModel", "MoVScaling", "mov_sites"]
