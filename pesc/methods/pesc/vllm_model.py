"""PESC as a native vLLM model: vLLM's own Llama / Mistral / Qwen2 decoder layers, each FFN followed by the PESC
experts as stacked tensors (the fast path; the Transformers backend runs every method, slower).

Registered by `pesc.serving.vllm_plugin` (the `vllm.general_plugins` entry point) for the architecture
`PescForCausalLM`. Runs inside vLLM's environment: imports vLLM, torch and pesc.methods.vllm_sites (the family
dispatch and top-k gates it shares with the other methods' native models).

Per token, with F(x) the family's FFN output (vLLM's merged gate/up kernel), the k router picks and w their
float32 softmax weights (arXiv 2401.02731, Eq. 7-10; pesc/methods/pesc/modeling_pesc.py):
    y = F(x) + sum_{i in topk(x)} w_i * s * up_i(GELU(down_i(F(x))))
computed for every expert at once with the weights zero off the top-k: fixed shapes, two plain matmuls over the
experts stacked side by side (no per-call copy or permute of the weights).
"""

import re
from collections.abc import Iterable

import torch
import torch.nn.functional as F
from torch import nn
from vllm.model_executor.models.llama import LlamaDecoderLayer, LlamaForCausalLM
from vllm.model_executor.models.qwen2 import Qwen2DecoderLayer

from pesc.methods.vllm_sites import family_model, top_k_softmax_gates

_EXPERT_TENSOR = re.compile(r"^experts\.expert_(\d+)\.adapter_(down|up)\.weight$")


class PescExperts(nn.Module):
    """The router and the E adapters of one layer, stacked as two [E*d, H] matrices: rows e*d .. (e+1)*d-1 of
    `down` hold expert e's down projection, the same rows of `up` its up projection transposed."""

    def __init__(self, config):
        super().__init__()
        self.top_k, self.scaling = config.num_experts_per_tok, config.moe_scaling
        self.num_experts, self.adapter_dim = config.num_experts, config.adapter_dim
        stacked = (config.num_experts * config.adapter_dim, config.hidden_size)
        self.router = nn.Linear(config.hidden_size, config.num_experts, bias=False)
        self.down = nn.Parameter(torch.empty(stacked))
        self.up = nn.Parameter(torch.empty(stacked))
        self._filled = {"down": set(), "up": set()}  # experts whose slice came, over every load_weights call

    def forward(self, router_input: torch.Tensor, ffn_output: torch.Tensor) -> torch.Tensor:
        logits = F.linear(router_input.to(self.router.weight.dtype), self.router.weight)
        gates = top_k_softmax_gates(logits, self.top_k) * self.scaling
        rows = ffn_output.to(self.down.dtype)
        hidden = F.gelu(F.linear(rows, self.down)).view(-1, self.num_experts, self.adapter_dim)
        hidden = (hidden * gates.to(rows.dtype).unsqueeze(-1)).view(rows.shape[0], -1)
        return torch.addmm(rows, hidden, self.up).to(ffn_output.dtype)

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        """Our checkpoint names (`router.weight`, `experts.expert_J.adapter_{down,up}.weight`) into the stacks;
        returns the parameters filled (a stack once every expert's slice came). vLLM calls this once per run of
        consecutive names, so a layer whose experts sit in two shards comes in two calls: the slices are counted
        over all of them."""
        loaded = set()
        for name, tensor in weights:
            if name == "router.weight":
                self.router.weight.data.copy_(tensor)
                loaded.add(name)
            elif (match := _EXPERT_TENSOR.match(name)) is not None:
                part, expert = match.group(2), int(match.group(1))
                rows = slice(expert * self.adapter_dim, (expert + 1) * self.adapter_dim)
                getattr(self, part).data[rows].copy_(tensor if part == "down" else tensor.t())
                self._filled[part].add(expert)
                if len(self._filled[part]) == self.num_experts:
                    loaded.add(part)
            else:
                raise ValueError(f"unexpected PESC tensor {name!r}")
        return loaded


class PescMLP(nn.Module):
    """The family's FFN (kept as vLLM built it, under its own names) followed by the experts on its output."""

    def __init__(self, dense_mlp: nn.Module, config):
        super().__init__()
        self.dense_mlp = dense_mlp
        self.moe_adapter = PescExperts(config)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return self.moe_adapter(hidden_states, self.dense_mlp(hidden_states))


class PescLlamaDecoderLayer(LlamaDecoderLayer):
    def __init__(self, vllm_config, prefix: str = "", **kwargs):
        super().__init__(vllm_config=vllm_config, prefix=prefix, **kwargs)
        self.mlp = PescMLP(self.mlp, vllm_config.model_config.hf_config)


class PescQwen2DecoderLayer(Qwen2DecoderLayer):
    def __init__(self, config, *args, **kwargs):
        super().__init__(config, *args, **kwargs)
        self.mlp = PescMLP(self.mlp, config)


class PescForCausalLM(LlamaForCausalLM):
    """A PESC checkpoint (config `base_model_type` llama, mistral or qwen2) on vLLM's own layers."""

    def _init_model(self, vllm_config, prefix: str = "", layer_type=None):
        return family_model(vllm_config, prefix, PescLlamaDecoderLayer, PescQwen2DecoderLayer, "PESC")

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        """The dense FFN's tensors sit one level down here (`mlp.dense_mlp.`): renamed on the way in."""
        renamed = ((re.sub(r"\.mlp\.(gate_proj|up_proj|down_proj)\.", r".mlp.dense_mlp.\1.", name), tensor)
                   for name, tensor in weights)
        return super().load_weights(renamed)
