"""What pesc's native vLLM models share: vLLM's own Llama / Mistral / Qwen2 decoder layers picked by the config's
`base_model_type`, a method's modules put into those layers, LoRA experts stacked beside vLLM's fused linears, and
pesc's tensor names renamed on their way to them.

Runs inside vLLM's environment (imported by each method's `vllm_model.py`, never by pesc's other code).

A LoRA-expert site sits on one of vLLM's linears: q/k/v are one fused `qkv_proj` and gate/up one `gate_up_proj`,
each reading one input. Every site on the same linear is one `StackedLoraExperts`: its routers' and its experts'
A matrices stacked into one [S*E + S*E*r, in] matrix (one matmul gives every router's logits and every expert's
bottleneck), and the experts' B matrices into one block-structured [out, S*E*r] matrix whose site s rows are
that site's slice of the fused output. After loading, B is folded into the linear's own weight as extra input
columns ([W | B], `LoraSitedLinear`), and the linear reads [x, gated bottlenecks]: a site costs one small GEMM
and one fused elementwise kernel beyond the dense layer, both GEMMs vLLM's own. Fixed shapes, no host sync: the
experts off a token's top-k are run with weight zero.
"""

import functools
import re
from collections.abc import Callable, Iterable

import torch
import torch.nn.functional as F
from torch import nn
from vllm.config import get_current_vllm_config
from vllm.distributed import get_tensor_model_parallel_world_size
from vllm.model_executor.layers.linear import ReplicatedLinear
from vllm.model_executor.models.llama import LlamaDecoderLayer, LlamaForCausalLM, LlamaModel
from vllm.model_executor.models.qwen2 import Qwen2DecoderLayer, Qwen2Model

# pesc's linear names -> (vLLM's module holding it in the decoder layer, the slice of its output it is)
FUSED_LINEAR = {"q_proj": "self_attn.qkv_proj", "k_proj": "self_attn.qkv_proj", "v_proj": "self_attn.qkv_proj",
                "o_proj": "self_attn.o_proj", "gate_proj": "mlp.gate_up_proj", "up_proj": "mlp.gate_up_proj",
                "down_proj": "mlp.down_proj"}  # fmt: skip


def family_model(vllm_config, prefix: str, llama_layer, qwen2_layer, label: str) -> nn.Module:
    """vLLM's LlamaModel (llama, mistral) or Qwen2Model built with the given decoder layer class (or factory)."""
    family = vllm_config.model_config.hf_config.base_model_type
    if family in ("llama", "mistral"):
        return LlamaModel(vllm_config=vllm_config, prefix=prefix, layer_type=llama_layer)
    if family == "qwen2":
        return Qwen2Model(vllm_config=vllm_config, prefix=prefix, decoder_layer_type=qwen2_layer)
    raise ValueError(f"pesc's native vLLM model runs llama, mistral and qwen2 {label} checkpoints, not {family!r}: "
                     "serve it with --model-impl transformers")


class SitedLlamaDecoderLayer(LlamaDecoderLayer):
    """vLLM's Llama layer, then `add_sites(layer, config)` puts the method's modules into it."""

    def __init__(self, vllm_config, prefix: str = "", *, add_sites: Callable, **kwargs):
        super().__init__(vllm_config=vllm_config, prefix=prefix, **kwargs)
        add_sites(self, vllm_config.model_config.hf_config)


class SitedQwen2DecoderLayer(Qwen2DecoderLayer):
    """vLLM's Qwen2 layer, then `add_sites(layer, config)` puts the method's modules into it."""

    def __init__(self, config, *args, add_sites: Callable, **kwargs):
        super().__init__(config, *args, **kwargs)
        add_sites(self, config)


class SitedLinear(nn.Module):
    """One of vLLM's linears (kept whole as `base`, its weight loader and kernel unchanged), its output then passed
    through `experts(x, output)`."""

    def __init__(self, base: nn.Module, experts: nn.Module):
        super().__init__()
        self.base, self.experts = base, experts

    def forward(self, x: torch.Tensor):
        output, bias = self.base(x)
        return self.experts(x, output), bias


class LoraSitedLinear(nn.Module):
    """One of vLLM's linears (`base`, its weight loader unchanged) with LoRA experts: after loading, the experts'
    B stack is folded into `base`'s weight as extra input columns, so that one GEMM gives the linear's output and
    the experts' mixture: base([x, experts(x)])."""

    def __init__(self, base: nn.Module, experts: nn.Module):
        super().__init__()
        self.base, self.experts = base, experts

    def forward(self, x: torch.Tensor):
        return self.base(self.experts(x))

    def fold_experts(self) -> None:
        """W <- [W | B]: called once every tensor is loaded, before vLLM prepares `base` for its kernel."""
        weight = self.base.weight
        weight.data = torch.cat([weight.data, self.experts.stack_b.data], dim=1)
        del self.experts.stack_b


def output_slices(layer: nn.Module, fused: str) -> dict[str, tuple[int, int]]:
    """{pesc linear name: (start, end) of its columns in the output of vLLM's fused linear `fused`}."""
    if fused == "self_attn.qkv_proj":
        q, kv = layer.self_attn.q_size, layer.self_attn.kv_size
        return {"q_proj": (0, q), "k_proj": (q, q + kv), "v_proj": (q + kv, q + 2 * kv)}
    if fused == "mlp.gate_up_proj":
        half = layer.mlp.gate_up_proj.output_size_per_partition // 2
        return {"gate_proj": (0, half), "up_proj": (half, 2 * half)}
    parent, name = fused.split(".")
    return {name: (0, getattr(getattr(layer, parent), name).output_size_per_partition)}


def add_lora_sites(layer: nn.Module, sites: Iterable[str], make_experts: Callable) -> None:
    """Wrap each of vLLM's linears that holds one of pesc's `sites` in a `LoraSitedLinear` whose experts are
    `make_experts(in_features, {site: (start, end) of its output columns}, out_features)`."""
    if get_current_vllm_config().load_config.load_format == "dummy":
        raise ValueError("pesc's native vLLM models of the LoRA-expert methods fold the experts into vLLM's linears "
                         "as they load the checkpoint: serve it without --load-format dummy")
    for fused in dict.fromkeys(FUSED_LINEAR[site] for site in sites):
        parent, name = fused.split(".")
        linear = getattr(getattr(layer, parent), name)
        slices = {site: span for site, span in output_slices(layer, fused).items() if site in sites}
        experts = make_experts(linear.input_size, slices, linear.output_size_per_partition)
        setattr(getattr(layer, parent), name, LoraSitedLinear(linear, experts))


def renamer(site_prefix: str, sites: Iterable[str]) -> Callable[[str], str]:
    """A pesc tensor name -> its name here: a wrapped linear's own tensors one level down (`<fused>.base.`), a
    site's tensors in the fused linear's experts (`self_attn.<prefix>_q_proj.X` -> `self_attn.qkv_proj.experts.
    <prefix>_q_proj.X`). vLLM's stacking then maps `.q_proj` / `.gate_proj` etc. to the fused names as usual."""
    wrapped = {fused.split(".")[1] for fused in (FUSED_LINEAR[site] for site in sites)}
    base_linears = [linear for linear, fused in FUSED_LINEAR.items() if fused.split(".")[1] in wrapped]
    base = re.compile(rf"\.({'|'.join(base_linears)})\.(weight|bias)$") if base_linears else None
    site = re.compile(rf"\.(self_attn|mlp)\.({re.escape(site_prefix)}_({'|'.join(FUSED_LINEAR)}))\.")

    def rename(name: str) -> str:
        if base is not None and base.search(name):
            return base.sub(r".\1.base.\2", name)
        match = site.search(name)
        if match is not None:
            fused = FUSED_LINEAR[match.group(3)]
            return name[:match.start()] + f".{fused}.experts.{match.group(2)}." + name[match.end():]
        return name

    return rename


def refuse_tensor_parallel(label: str) -> None:
    """One line, where vLLM would shard the linears: the sites' routers and A matrices read whole inputs, and the
    B matrices and vectors write whole outputs, where a rank holds a slice of the heads or of the FFN."""
    ranks = get_tensor_model_parallel_world_size()
    if ranks > 1:
        raise ValueError(f"pesc's native vLLM model for {label} runs on one tensor-parallel rank, not {ranks}: "
                         "serve it with tensor_parallel_size=1")


class NativeSitesForCausalLM(LlamaForCausalLM):
    """A method's checkpoint (config `base_model_type` llama, mistral or qwen2) on vLLM's own layers, the method's
    modules put in by `add_sites(layer, config)`; `rename(config)` gives the tensor renaming for `load_weights`.
    One tensor-parallel rank (the sites' routers read whole inputs vLLM would split)."""

    label = ""

    @staticmethod
    def add_sites(layer: nn.Module, config) -> None:
        raise NotImplementedError

    @staticmethod
    def rename(config) -> Callable[[str], str]:
        raise NotImplementedError

    def _init_model(self, vllm_config, prefix: str = "", layer_type=None):
        refuse_tensor_parallel(self.label)
        llama = functools.partial(SitedLlamaDecoderLayer, add_sites=self.add_sites)
        qwen2 = functools.partial(SitedQwen2DecoderLayer, add_sites=self.add_sites)
        return family_model(vllm_config, prefix, llama, qwen2, self.label)

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        rename = self.rename(self.config)
        loaded = super().load_weights((rename(name), tensor) for name, tensor in weights)
        for module in self.modules():
            if isinstance(module, LoraSitedLinear):
                module.fold_experts()
        return loaded


# ---------------------------------------------------------------------------------------
# Stacked LoRA experts
# ---------------------------------------------------------------------------------------
def top_k_softmax_gates(logits: torch.Tensor, top_k: int) -> torch.Tensor:
    """Float32 softmax over each token's top-k logits, zero elsewhere (PESC, MoELoRA)."""
    top_logits, selected = torch.topk(logits, top_k, dim=-1)
    weights = torch.softmax(top_logits, dim=-1, dtype=torch.float32)
    return torch.zeros_like(logits, dtype=torch.float32).scatter(-1, selected, weights)


class StackedLoraExperts(nn.Module):
    """The routers and LoRA experts of the sites on one fused linear (see the module docstring).

    `stack_a` [S*E + S*E*r, in]: rows s*E .. of site s's router, then rows S*E + s*E*r .. of its experts' A (expert
    e's rank-r block at e*r), a vLLM linear (`ReplicatedLinear`), prepared for vLLM's own GEMM kernel as the layer's
    are (oneDNN prepacked on the CPU); `stack_b` [out, S*E*r]: site s's columns hold its experts' B in its output
    rows, zero elsewhere, held only until `LoraSitedLinear.fold_experts` moves it into the linear's weight.
    `gates(logits [T, S, E]) -> float32 [T, S, E]` is the method's routing; `read(rest, tensor) -> (part, tensor)`
    turns a site's checkpoint tensor (name after the site prefix) into ("router" [E, in] | "A" [E*r, in] | "B"
    [out_site, E*r]). `float32_router`: the router reads the input in float32 (the soft-merging routers): kept
    apart from `stack_a` when the model's dtype is not float32.
    """

    def __init__(self, in_features: int, slices: dict[str, tuple[int, int]], out_features: int, num_experts: int,
                 rank: int, scaling: float, gates: Callable, read: Callable, site_prefix: str,
                 float32_router: bool = False):  # fmt: skip
        super().__init__()
        self.sites, self.slices = list(slices), slices
        self.num_experts, self.rank, self.scaling = num_experts, rank, scaling
        self.gates, self.read, self.site_prefix = gates, read, site_prefix
        routers = len(slices) * num_experts
        self.router_rows = 0 if float32_router and torch.get_default_dtype() != torch.float32 else routers
        self.stack_a = ReplicatedLinear(in_features, self.router_rows + routers * rank, bias=False, return_bias=False)
        self.stack_b = nn.Parameter(torch.zeros(out_features, routers * rank), requires_grad=False)
        if not self.router_rows:
            self.router = nn.Parameter(torch.empty(routers, in_features, dtype=torch.float32), requires_grad=False)
        self._filled = set()  # (site, part) that came, over every load_weights call

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """[x, the experts' gated bottlenecks]: the input of the linear that `stack_b` was folded into."""
        tokens, sites, experts = x.shape[0], len(self.sites), self.num_experts
        both = self.stack_a(x)
        if self.router_rows:
            logits, hidden = both[:, :self.router_rows], both[:, self.router_rows:]
        else:
            logits, hidden = F.linear(x.float(), self.router), both
        gates = self.gates(logits.view(tokens, sites, experts)) * self.scaling
        hidden = hidden.view(tokens, sites * experts, self.rank) * gates.view(tokens, -1, 1).to(hidden.dtype)
        return torch.cat([x, hidden.view(tokens, -1)], dim=-1)

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        """`<prefix>_<linear>.<rest>` tensors into the stacks; returns the parameters filled (once every site's
        router, A and B came: a layer's tensors may come in several calls, one per shard)."""
        experts, rank = self.num_experts, self.rank
        for name, tensor in weights:
            site_name, _, rest = name.partition(".")
            site = site_name.removeprefix(self.site_prefix + "_")
            if site not in self.slices:
                raise ValueError(f"unexpected {self.site_prefix} tensor {name!r}")
            part, tensor = self.read(rest, tensor)
            s = self.sites.index(site)
            if part == "router":
                target = self.stack_a.weight[s * experts:(s + 1) * experts] if self.router_rows else \
                    self.router[s * experts:(s + 1) * experts]
            elif part == "A":
                start = self.router_rows + s * experts * rank
                target = self.stack_a.weight[start:start + experts * rank]
            else:
                start, end = self.slices[site]
                target = self.stack_b[start:end, s * experts * rank:(s + 1) * experts * rank]
            target.data.copy_(tensor)
            self._filled.add((site, part))
        if len(self._filled) < 3 * len(self.sites):
            return set()
        return {"stack_a.weight", "stack_b"} | (set() if self.router_rows else {"router"})
