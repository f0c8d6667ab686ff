"""PESC as a native vLLM model: vLLM's own Llama / Mistral / Qwen2 decoder layers, each FFN followed by the PESC
experts as stacked tensors (the fast path; the Transformers backend runs every method, slower).

Registered by `pesc.serving.vllm_plugin` (the `vllm.general_plugins` entry point) for the architecture
`PescForCausalLM`. Runs inside vLLM's environment: imports vLLM, torch and pesc.methods.vllm_sites (the family
dispatch and top-k gates it shares with the other methods' native models).

Per token, with F(x) the family's FFN output (vLLM's merged gate/up kernel), the k router picks and w their
float32 softmax weights (arXiv 2401.02731, Eq. 7-10; pesc/methods/pesc/modeling_pesc.py):
    y = F(x) + sum_{i in topk(x)} w_i * s * up_i(GELU(down_i(F(x))))
On vLLM's CPU build, only the top-k experts are computed, by vLLM's grouped-GEMM MoE kernel (vllm_cpu_experts.py).
Elsewhere (CUDA) every expert is computed at once with the weights zero off the top-k: fixed shapes, two plain
matmuls over the experts stacked side by side (no per-call copy or permute of the weights).
"""

import re
from collections.abc import Iterable

import torch
import torch.nn.functional as F
from torch import nn
from vllm.logger import init_logger
from vllm.model_executor.models.llama import LlamaDecoderLayer, LlamaForCausalLM
from vllm.model_executor.models.qwen2 import Qwen2DecoderLayer

from pesc.methods.pesc import vllm_cpu_experts
from pesc.methods.vllm_sites import family_model, top_k_softmax_gates

logger = init_logger(__name__)
_EXPERT_TENSOR = re.compile(r"^experts\.expert_(\d+)\.adapter_(down|up)\.weight$")


class PescExperts(nn.Module):
    """The router and the E adapters of one layer, stacked as two [E*d, H] matrices: rows e*d .. (e+1)*d-1 of
    `down` hold expert e's down projection, the same rows of `up` its up projection transposed. Where vLLM's CPU MoE
    kernel runs, the stacks become its packed weights (`kernel_w13`, `kernel_b13`, `kernel_w2`) once loaded, and their own storage is freed."""

    def __init__(self, config):
        super().__init__()
        self.top_k, self.scaling = config.num_experts_per_tok, config.moe_scaling
        self.num_experts, self.adapter_dim = config.num_experts, config.adapter_dim
        stacked = (config.num_experts * config.adapter_dim, config.hidden_size)
        self.router = nn.Linear(config.hidden_size, config.num_experts, bias=False)
        self.down = nn.Parameter(torch.empty(stacked))
        self.up = nn.Parameter(torch.empty(stacked))
        self._filled = {"down": set(), "up": set()}  # experts whose slice came, over every load_weights call
        self.uses_kernel = False
        for name in vllm_cpu_experts.PACKED:  # filled by `load_weights` where the kernel runs
            self.register_buffer(name, None, persistent=False)

    def forward(self, router_input: torch.Tensor, ffn_output: torch.Tensor) -> torch.Tensor:
        logits = F.linear(router_input.to(self.router.weight.dtype), self.router.weight)
        if self.uses_kernel:
            top_logits, selected = torch.topk(logits, self.top_k, dim=-1)
            weights = torch.softmax(top_logits, dim=-1, dtype=torch.float32) * self.scaling
            rows = ffn_output.to(self.down.dtype)
            mixture = vllm_cpu_experts.top_k_experts(rows, self.kernel_w13, self.kernel_b13, self.kernel_w2, weights,
                                                     selected)
            return (rows + mixture).to(ffn_output.dtype)
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
        complete = all(len(experts) == self.num_experts for experts in self._filled.values())
        if complete and not self.uses_kernel and vllm_cpu_experts.supports(self.down.shape[1], self.down.dtype):
            packed = vllm_cpu_experts.pack(self.down.data, self.up.data, self.num_experts)
            for name, tensor in zip(vllm_cpu_experts.PACKED, packed):
                setattr(self, name, tensor)
            self.down.data, self.up.data = self.down.data.new_empty(0), self.up.data.new_empty(0)
            self.uses_kernel = True
            logger.info_once("PESC experts on vLLM's CPU MoE kernel: only each token's top-k experts are computed")
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
