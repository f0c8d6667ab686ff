"""MoV as a native vLLM model: vLLM's own Llama / Mistral / Qwen2 decoder layers (fused q/k/v and gate/up kept),
the (IA)³ vectors scaling the keys and values in the fused q/k/v output and the FFN in place of vLLM's act-and-mul.

Registered by `pesc.serving.vllm_plugin` for the architecture `MoVForCausalLM`. Per token, with p the float32
softmax of a float32 router over all E vectors l_e (pesc/methods/mov/modeling_mov.py, soft_merging.py):
    a -> a * sum_e p_e l_e,    computed as a * (1 + p @ (L - 1)) in float32, as shipped
- keys and values: per key/value head, the head's router reading the head's vector (one router per site, shared by
  its heads; E vectors per head);
- the FFN, by config `ffn_site`: "activation" (the official form) routes on act(gate(x)), "down_proj_input" (pesc
  0.1.0's, and what a config.json without the field means) on act(gate(x)) * up(x); either way the merged vector
  scales act(gate(x)) * up(x) (the scaling commutes with the product with up(x)).
"""

import re

import torch
import torch.nn.functional as F
from torch import nn

from pesc.methods.vllm_sites import NativeSitesForCausalLM, SitedLinear, renamer

SITE_PREFIX = "mov"
KEY_VALUE = ("k_proj", "v_proj")
# the FFN site's tensors: `mov_act_fn` ("activation"), `mov_down_proj` ("down_proj_input")
FFN_TENSOR = re.compile(r"\.mlp\.(mov_(act_fn|down_proj))\.")


class MoVKeyValueScaling(nn.Module):
    """The key and value sites on the fused q/k/v output: its 2H head vectors (H keys, then H values) as one batch.
    `routers` [2H, head_dim, E]: each head's site router, transposed; `offsets` [2H, E, head_dim]: each head's
    vectors minus one. Float32, as the shipped routers and merge."""

    def __init__(self, q_size: int, kv_heads: int, head_dim: int, num_experts: int):
        super().__init__()
        self.q_size, self.kv_heads, self.head_dim = q_size, kv_heads, head_dim
        heads = 2 * kv_heads
        self.routers = nn.Parameter(torch.empty(heads, head_dim, num_experts, dtype=torch.float32),
                                    requires_grad=False)
        self.offsets = nn.Parameter(torch.empty(heads, num_experts, head_dim, dtype=torch.float32),
                                    requires_grad=False)
        self._filled = set()

    def forward(self, x: torch.Tensor, output: torch.Tensor) -> torch.Tensor:
        key_values = output[:, self.q_size:].view(output.shape[0], 2 * self.kv_heads, self.head_dim)
        rows = key_values.float().transpose(0, 1)  # [2H, T, head_dim]
        probabilities = torch.softmax(torch.bmm(rows, self.routers), dim=-1, dtype=torch.float32)
        merged = torch.bmm(probabilities, self.offsets).add_(1.0).transpose(0, 1)
        key_values.mul_(merged.to(output.dtype))
        return output

    def load_weights(self, weights) -> set[str]:
        heads = self.kv_heads
        for name, tensor in weights:
            site_name, _, rest = name.partition(".")
            site = site_name.removeprefix(SITE_PREFIX + "_")
            if site not in KEY_VALUE or rest not in ("router.weight", "vectors"):
                raise ValueError(f"unexpected MoV tensor {name!r}")
            rows = slice(0, heads) if site == "k_proj" else slice(heads, 2 * heads)
            if rest == "router.weight":  # [E, head_dim], shared by the site's heads
                self.routers.data[rows] = tensor.float().t()
            else:  # [H, E, head_dim]
                self.offsets.data[rows] = tensor.float() - 1.0
            self._filled.add((site, rest))
        return {"routers", "offsets"} if len(self._filled) == 4 else set()


class MoVFeedForwardScaling(nn.Module):
    """vLLM's act-and-mul of the fused gate/up output, act(gate) * up, scaled by the FFN site's merged vector.
    `router` [E, I] and `offsets` [E, I] (the vectors minus one), float32."""

    def __init__(self, intermediate_size: int, num_experts: int, routes_on_activation: bool):
        super().__init__()
        self.intermediate_size, self.routes_on_activation = intermediate_size, routes_on_activation
        self.router = nn.Parameter(torch.empty(num_experts, intermediate_size, dtype=torch.float32),
                                   requires_grad=False)
        self.offsets = nn.Parameter(torch.empty(num_experts, intermediate_size, dtype=torch.float32),
                                    requires_grad=False)
        self._filled = set()

    def forward(self, gate_up: torch.Tensor) -> torch.Tensor:
        activation = F.silu(gate_up[:, :self.intermediate_size])
        product = activation * gate_up[:, self.intermediate_size:]
        routed = activation if self.routes_on_activation else product
        probabilities = torch.softmax(F.linear(routed.float(), self.router), dim=-1, dtype=torch.float32)
        merged = torch.addmm(torch.ones_like(self.offsets[:1]), probabilities, self.offsets)
        return product * merged.to(product.dtype)

    def load_weights(self, weights) -> set[str]:
        for name, tensor in weights:
            rest = name.partition(".")[2]
            if rest == "router.weight":
                self.router.data.copy_(tensor)
            elif rest == "vectors":  # [1, E, I]
                self.offsets.data.copy_(tensor[0].float() - 1.0)
            else:
                raise ValueError(f"unexpected MoV tensor {name!r}")
            self._filled.add(rest)
        return {"router", "offsets"} if len(self._filled) == 2 else set()


class MoVForCausalLM(NativeSitesForCausalLM):
    label = "MoV"

    @staticmethod
    def add_sites(layer, config) -> None:
        attention, mlp = layer.self_attn, layer.mlp
        key_values = MoVKeyValueScaling(attention.q_size, attention.num_kv_heads, attention.head_dim,
                                        config.num_experts)
        attention.qkv_proj = SitedLinear(attention.qkv_proj, key_values)
        if type(mlp.act_fn).__name__ != "SiluAndMul":
            raise ValueError(f"pesc's native vLLM model for MoV needs a SiLU gated FFN, not {type(mlp.act_fn)}")
        routes_on_activation = getattr(config, "ffn_site", "down_proj_input") == "activation"
        intermediate = mlp.gate_up_proj.output_size_per_partition // 2
        mlp.act_fn = MoVFeedForwardScaling(intermediate, config.num_experts, routes_on_activation)

    @staticmethod
    def rename(config):
        attention_rename = renamer(SITE_PREFIX, KEY_VALUE)

        def rename(name: str) -> str:
            match = FFN_TENSOR.search(name)
            if match is not None:
                return name[:match.start()] + f".mlp.act_fn.{match.group(1)}." + name[match.end():]
            return attention_rename(name)

        return rename
