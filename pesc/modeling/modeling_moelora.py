"""The MoELoRA model (Luo et al., arXiv 2402.12851): top-k routed LoRA experts beside chosen linears.

Shipped inside every MoELoRA checkpoint, so it imports only torch, transformers and its sibling
files (configuration_moelora.py, and moe_core.py: the dense-family wrapper, routing records, the
balance loss and the routed dispatch every method shares).

Each site (`q_proj` and `v_proj` by default) gets a sibling module `moelora_<linear>`: a router
on the linear's input and E LoRA experts stored stacked (`down` [E, r, in] = the A's, `up`
[E, out, r] = the B's). With the two largest router logits of a token and w their float32
softmax,
    y = W0 x + sum_{i in top-k} w_i (alpha / r) B_i A_i dropout(x),
each expert run on its own tokens only (moe_core.routed_dispatch, which also draws the input
dropout: one mask per (token, expert) pair). B = 0 at init, so a new
model computes exactly the dense one.

Aux losses: `aux_loss`, the Switch balance loss per site (padding masked), and
`contrastive_loss` (see `same_expert_infonce`): while training, each site draws a bounded random
sample of tokens and records its selected experts' outputs B_i A_i x; outputs of the same expert
are positives, of other experts negatives. The form is looked up by name (`contrastive_form`),
so another form can sit beside it.
"""

import math

import torch
import torch.nn.functional as F
from torch import nn

from .configuration_moelora import MoELoraConfig, site_list
from .moe_core import (
    LINEAR_PARENTS,
    MoEForCausalLM,
    MoEModel,
    attach_sibling,
    emit_routing_record,
    linear_on,
    load_balancing_loss,
    routed_dispatch,
    token_mask,
    traced_for_every_shape,
)

SITE_PREFIX = "moelora_"


class MoELoraRouter(nn.Linear):
    """A site's router (in -> E, no bias); its own type so weight init can tell it apart."""


class MoELoraSite(nn.Module):
    """Router plus E LoRA experts beside one linear: adds each token's top-k weighted expert outputs to its output."""

    def __init__(self, in_features: int, out_features: int, config: MoELoraConfig, site: str, layer_idx: int):
        super().__init__()
        self.site, self.layer_idx = site, layer_idx  # name its routing records
        self.num_experts, self.top_k = config.num_experts, config.topk
        self.scaling = config.lora_alpha / config.lora_rank
        self.router = MoELoraRouter(in_features, config.num_experts, bias=False)
        self.down = nn.Parameter(torch.empty(config.num_experts, config.lora_rank, in_features))
        self.up = nn.Parameter(torch.empty(config.num_experts, out_features, config.lora_rank))
        self.dropout = config.lora_dropout  # on the experts' input, one mask per (token, expert) pair
        # tokens per forward whose expert outputs the contrastive loss sees (0: no sample drawn)
        self.sample_size = config.contrastive_sample_size if config.contrastive_loss_coef > 0 else 0

    def linear_output_hook(self, linear: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
        rows = args[0].reshape(-1, args[0].shape[-1])
        logits = self.router(rows.to(self.router.weight.dtype))
        top_logits, selected = torch.topk(logits, self.top_k, dim=-1)
        weights = torch.softmax(top_logits, dim=-1, dtype=torch.float32)
        extras = self._contrastive_sample(rows, selected) if self.sample_size and self.training and torch.is_grad_enabled() else None
        emit_routing_record(self.site, self.layer_idx, logits, selected, extras)
        if traced_for_every_shape():
            mixed = self._all_experts_output(rows.to(self.down.dtype), weights, selected)
        else:
            mixed = routed_dispatch(rows.to(self.down.dtype), weights, selected, list(range(self.num_experts)),
                                    self._weighted_expert_output, input_dropout=self.dropout if self.training else None)
        return output + mixed.to(output.dtype).reshape(output.shape)

    def _all_experts_output(self, rows: torch.Tensor, weights: torch.Tensor, selected: torch.Tensor) -> torch.Tensor:
        """The same sum with every expert on every row, the weights zero off each row's top-k: fixed shapes (no
        dropout: inference only)."""
        dense = torch.zeros(rows.shape[0], self.num_experts, dtype=weights.dtype, device=rows.device)
        dense = dense.scatter(-1, selected, weights) * self.scaling
        hidden = torch.einsum("ti,eri->ter", rows, self.down) * dense.to(rows.dtype).unsqueeze(-1)
        return torch.einsum("ter,eor->to", hidden, self.up)

    def _weighted_expert_output(self, expert: int, rows: torch.Tensor, weights: torch.Tensor,
                                keep_scale: float = 1.0) -> torch.Tensor:
        """w (alpha/r) B_e A_e rows; the weights (and the dispatch's dropout keep scale, the rows arriving already
        masked) scale the r-wide bottleneck, not the out-wide output."""
        hidden = F.linear(rows, self.down[expert])
        return F.linear(hidden * (weights * (self.scaling * keep_scale)).to(hidden.dtype), self.up[expert])

    def _plain_expert_output(self, expert: int, rows: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """B_e A_e rows (times `weights`, ones here): what the contrastive loss compares."""
        return F.linear(F.linear(rows, self.down[expert]), self.up[expert]) * weights.to(rows.dtype)

    def _contrastive_sample(self, rows: torch.Tensor, selected: torch.Tensor) -> dict:
        """B_i A_i x of each selected expert for up to `sample_size` random tokens (no dropout, no scaling).

        Drawn from the global RNG, which gradient checkpointing restores, so a recompute draws the same sample.
        """
        tokens = rows.shape[0]
        if tokens <= self.sample_size:
            sample = torch.arange(tokens, device=rows.device)
        else:
            sample = torch.randperm(tokens, device=rows.device)[: self.sample_size]
        picks = selected.index_select(0, sample)  # [S, k]
        repeated = rows.index_select(0, sample).to(self.down.dtype).repeat_interleave(self.top_k, dim=0)
        ones = torch.ones(picks.numel(), 1, dtype=torch.float32, device=rows.device)
        outputs = routed_dispatch(repeated, ones, picks.reshape(-1, 1), list(range(self.num_experts)),
                                  self._plain_expert_output)
        return {"sample_rows": sample, "sample_outputs": outputs.view(sample.numel(), self.top_k, -1)}


@torch.no_grad()
def init_site(site: MoELoraSite, generator: torch.Generator | None = None) -> None:
    """A site as MoELoRA starts: router and each A kaiming-uniform (a=sqrt 5, nn.Linear's and peft's LoRA
    default), each B zero (exact at init). A seeded `generator` makes the draw reproducible."""
    init_router(site.router, generator)
    for expert in range(site.num_experts):
        nn.init.kaiming_uniform_(site.down[expert], a=math.sqrt(5), generator=generator)
    nn.init.zeros_(site.up)


def init_router(router: MoELoraRouter, generator: torch.Generator | None = None) -> None:
    nn.init.kaiming_uniform_(router.weight, a=math.sqrt(5), generator=generator)


# ---------------------------------------------------------------------------------------
# The contrastive loss, one form per name (`contrastive_form`).
# ---------------------------------------------------------------------------------------
def same_expert_infonce(outputs: torch.Tensor, experts: torch.Tensor, temperature: float) -> torch.Tensor | None:
    """InfoNCE over cosine similarities: an output's positives are the same expert's outputs for other tokens.

    outputs [N, d] (expert outputs), experts [N] (which expert made each). With s_nm = cos(o_n, o_m) / tau
    and P(n) = {m != n : e_m = e_n}, for every anchor n with P(n) non-empty
        L_n = -1/|P(n)| sum_{p in P(n)} log( exp(s_np) / sum_{m != n} exp(s_nm) ),
    the outputs of other experts being the negatives; the loss is the mean of L_n (None: no anchor has a
    positive). The multi-positive form of Khosla et al. (arXiv 2004.11362); the form, tau and the weight are
    ours (the MoELoRA paper's exact form was not checked).
    """
    if outputs.element_size() < 4:
        outputs = outputs.float()
    count = outputs.shape[0]
    others = ~torch.eye(count, dtype=torch.bool, device=outputs.device)
    positive = (experts.unsqueeze(0) == experts.unsqueeze(1)) & others
    positives = positive.sum(1)
    anchors = positives > 0
    if not bool(anchors.any()):
        return None
    unit = F.normalize(outputs, dim=-1)
    similarity = (unit @ unit.t() / temperature).masked_fill(~others, float("-inf"))
    log_prob = similarity - torch.logsumexp(similarity, dim=1, keepdim=True)
    per_anchor = log_prob.masked_fill(~positive, 0.0).sum(1)[anchors] / positives[anchors]
    return -per_anchor.mean()


CONTRASTIVE_FORMS = {"same_expert": same_expert_infonce}


def contrastive_loss(records, attention_mask, temperature: float, form: str = "same_expert") -> torch.Tensor:
    """The contrastive loss of every site that recorded a sample, over its non-padding tokens, averaged over sites."""
    loss_of = CONTRASTIVE_FORMS[form]
    site_losses = []
    for record in records:
        rows, outputs = record.extras["sample_rows"], record.extras["sample_outputs"]
        experts = record.selected.index_select(0, rows)
        mask = token_mask(attention_mask, record.logits.shape[0])
        if mask is not None:
            keep = mask.to(rows.device)[rows]
            outputs, experts = outputs[keep], experts[keep]
        loss = loss_of(outputs.reshape(-1, outputs.shape[-1]), experts.reshape(-1), temperature)
        if loss is not None:
            site_losses.append(loss)
    if not site_losses:  # no anchor with a positive anywhere: zero, still on the graph of every sample
        return sum(record.extras["sample_outputs"].sum() for record in records) * 0.0
    return torch.stack(site_losses).mean()


class MoELoraForCausalLM(MoEForCausalLM):
    """Causal LM of a dense family with routed LoRA experts beside the chosen linears of every decoder layer."""

    config_class = MoELoraConfig
    method_label = "MoELoRA"
    _no_split_modules = []

    def add_method_modules(self, layer: nn.Module, layer_idx: int, config: MoELoraConfig) -> None:
        for name in site_list(config.sites):
            linear = linear_on(layer, LINEAR_PARENTS[name], name, config.base_model_type, self.method_label)
            site = MoELoraSite(linear.in_features, linear.out_features, config, name, layer_idx)
            attach_sibling(getattr(layer, LINEAR_PARENTS[name]), name, SITE_PREFIX + name, site, "output")

    def init_method_module(self, module: nn.Module) -> bool:
        if isinstance(module, MoELoraSite):
            init_site(module)
        elif isinstance(module, MoELoraRouter):
            init_router(module)
        return isinstance(module, (MoELoraSite, MoELoraRouter))

    def aux_loss_coefficients(self) -> dict[str, float]:
        return {"aux_loss": self.config.router_aux_loss_coef, "contrastive_loss": self.config.contrastive_loss_coef}

    def compute_aux_losses(self, records, attention_mask, sample_values) -> dict:
        config = self.config
        losses = {"aux_loss": load_balancing_loss(tuple(r.logits for r in records), config.num_experts, config.topk,
                                                  attention_mask)}
        sampled = [record for record in records if record.extras]
        if sampled:
            losses["contrastive_loss"] = contrastive_loss(sampled, attention_mask, config.contrastive_temperature,
                                                          config.contrastive_form)
        return losses


class MoELoraModel(MoEModel):
    """The MoELoRA backbone without the LM head (what `AutoModel` and vLLM's Transformers backend load)."""

    config_class = MoELoraConfig
    causal_lm_class = MoELoraForCausalLM


__all__ = ["MoELoraForCausalLM", "MoELoraModel", "MoELoraSite", "MoELoraRouter", "init_site", "same_expert_infonce", "contrastive_loss"]
