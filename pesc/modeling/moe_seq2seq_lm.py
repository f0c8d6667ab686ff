"""The encoder-decoder every method with T5 sites builds on: T5 (v1.0, v1.1, Flan-T5) and mT5.

The method's model is transformers' own T5ForConditionalGeneration (relative attention, caches, generation
run unchanged) plus the method's modules beside the linears and activations of each block, the dense tensors
keeping their names (`encoder.block.N.layer.0.SelfAttention.k.weight`). mT5 has T5's modules and tensor names
(transformers copies the code), so one class serves both. A T5 block holds, in order, its self-attention, in
the decoder a cross-attention over the encoder's output, and its FFN: `block_attentions` and `block_ffn` name
them, and a method's `add_method_modules` puts its sites on one block.

Shipped in every checkpoint of a method with T5 sites: imports only torch, transformers and sibling files.
"""

import dataclasses

from torch import nn
from transformers import T5Config, T5ForConditionalGeneration
from transformers.modeling_outputs import Seq2SeqLMOutput

from .moe_causal_lm import MethodModules
from .moe_routing import record_routing

# The encoder-decoder families whose blocks these classes know.
SEQ2SEQ_FAMILIES = ("t5", "mt5")

# The decoder linears a site may name (moe_config.LINEAR_PARENTS) on a T5 block: the projections of every attention,
# and in the FFN the linear the activation reads (wi_0 in gated-GELU T5 v1.1 / mT5, wi in ReLU T5 v1.0), the gated
# FFN's other input linear, and the output linear.
T5_ATTENTION_LINEARS = {"q_proj": "q", "k_proj": "k", "v_proj": "v", "o_proj": "o"}
T5_FFN_LINEARS = {"gate_proj": ("wi_0", "wi"), "up_proj": ("wi_1",), "down_proj": ("wo",)}


def block_attentions(block: nn.Module) -> list[tuple[str, nn.Module]]:
    """(name, T5Attention) of a block's attentions: "self_attn", and in a decoder block "cross_attn"."""
    attentions = [("self_attn", block.layer[0].SelfAttention)]
    if block.is_decoder:
        attentions.append(("cross_attn", block.layer[1].EncDecAttention))
    return attentions


def block_ffn(block: nn.Module) -> nn.Module:
    """The block's FFN (T5DenseActDense or T5DenseGatedActDense: `wi` or `wi_0` / `wi_1`, `act`, `wo`)."""
    return block.layer[-1].DenseReluDense


def ffn_linear(ffn: nn.Module, site: str, label: str) -> str:
    """The name of the FFN linear that decoder site `site` names here, or a one-line error where it has none."""
    found = [name for name in T5_FFN_LINEARS[site] if isinstance(getattr(ffn, name, None), nn.Linear)]
    if not found:
        raise ValueError(
            f"{label} cannot put a site on {site} of this T5: its FFN ({type(ffn).__name__}) has no "
            f"{' or '.join(T5_FFN_LINEARS[site])} (a ReLU T5 v1.0 FFN has wi and wo only): leave {site} out of sites"
        )
    return found[0]


def settle_output_scaling(config) -> bool:
    """Say, as the installed T5 reads it, whether the decoder output is scaled by d_model**-0.5 before the LM head,
    which T5 does where the LM head is the input embedding (T5 v1.0), not in T5 v1.1 nor mT5; returns it.

    transformers 5 keeps the scaling in `scale_decoder_outputs` (T5Config; MT5Config has no such field, and mT5's
    own model never scales) and sets `tie_word_embeddings` always (it ties the stacks' embeddings by it too, and
    unties at load time an LM head the checkpoint holds apart); 4.x reads both from `tie_word_embeddings`, so a
    config written by transformers 5 would make 4.x tie and scale a T5 v1.1 / mT5 head.
    """
    scaled = getattr(config, "scale_decoder_outputs", None)
    if scaled is None:
        scaled = config.tie_word_embeddings if config.base_model_type == "t5" else False
    config.scale_decoder_outputs = scaled
    if not hasattr(T5Config(), "scale_decoder_outputs"):
        config.tie_word_embeddings = scaled
    return scaled


@dataclasses.dataclass
class MoESeq2SeqLMOutput(Seq2SeqLMOutput):
    """transformers' encoder-decoder output plus, when asked with `output_routing_records=True`, the routing records
    of every site in call order (the encoder's first; a record's site name says encoder or decoder)."""

    routing_records: tuple | None = None


class MoEForConditionalGeneration(MethodModules, T5ForConditionalGeneration):
    """T5ForConditionalGeneration plus a method's modules (`add_method_modules`, once per encoder and decoder block)."""

    method_label = "MoE"  # how errors name the method

    def __init__(self, config):
        if config.base_model_type not in SEQ2SEQ_FAMILIES:
            raise ValueError(
                f"{self.method_label} cannot wrap model family {config.base_model_type!r}: its encoder-decoder "
                f"sites are defined for {', '.join(SEQ2SEQ_FAMILIES)} only"
            )
        if not settle_output_scaling(config) and isinstance(self._tied_weights_keys, dict):
            # transformers 5 ties by this map: a T5 v1.1 / mT5 LM head is a tensor of its own however the model is
            # built (on the meta device too, where `pesc inspect` counts it), which the checkpoint must hold
            self._tied_weights_keys = {k: v for k, v in self._tied_weights_keys.items() if k != "lm_head.weight"}
        super().__init__(config)
        for stack_name in ("encoder", "decoder"):
            for block_idx, block in enumerate(getattr(self, stack_name).block):
                self.add_method_modules(block, stack_name, block_idx, config)
        for module in self.modules():  # the family's init ran before the method's modules existed
            self.init_method_module(module)

    @classmethod
    def add_method_modules(cls, block: nn.Module, stack_name: str, block_idx: int, config) -> None:
        """Put the method's modules into one block of the encoder or decoder (`stack_name`); a class method, so
        that pesc draws one block's initial sites on a lone block, as the model builds them."""
        raise NotImplementedError

    def tie_weights(self, *args, **kwargs):
        """The usual tying, and where loading left a tied tensor unset (still on the meta device: transformers 5.3
        skips the tie for remote code), the shared embedding: the stacks' input embeddings, and an LM head the
        checkpoint does not hold (T5 v1.0's)."""
        result = super().tie_weights(*args, **kwargs)
        shared = self.shared.weight
        for module in (self.encoder.embed_tokens, self.decoder.embed_tokens, self.lm_head):
            if module.weight.is_meta and not shared.is_meta:
                module.weight = shared
        return result

    def forward(self, *args, output_routing_records: bool = False, **kwargs):
        """The family's forward; with `output_routing_records=True`, a `MoESeq2SeqLMOutput` with the records."""
        if not output_routing_records:
            return super().forward(*args, **kwargs)
        with record_routing() as records:
            outputs = super().forward(*args, **{**kwargs, "return_dict": True})
        return MoESeq2SeqLMOutput(**outputs, routing_records=tuple(records))


__all__ = ["MoEForConditionalGeneration", "MoESeq2SeqLMOutput", "SEQ2SEQ_FAMILIES", "block_attentions", "block_ffn",
           "ffn_linear", "T5_ATTENTION_LINEARS", "T5_FFN_LINEARS"]
