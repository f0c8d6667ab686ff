"""The MoELoRA model (Luo et al., arXiv 2402.12851): top-k routed LoRA experts beside chosen linears.

Shipped inside every MoELoRA checkpoint, so it imports only torch, transformers and its sibling
files (configuration_moelora.py, and the shared moe_*.py: the dense-family wrapper, routing records,
the balance loss, dropout masks and the routed dispatch).

Each site (`q_proj` and `v_proj` by default) gets a sibling module `moelora_<linear>`: a router
on the linear's input and E LoRA experts stored stacked (`down` [E, r, in] = the A's, `up`
[E, out, r] = the B's). With the two largest router logits of a token and w their float32
softmax,
    y = W0 x + sum_{i in top-k} w_i (alpha / r) B_i A_i dropout(x),
computed as two GEMMs over all experts with zero weight off the top-k, or routed to each expert's
own tokens for wide experts (see `MoELoraSite`). dropout is one mask over the site's input, shared by
a token's experts. B = 0 at init, so a new model computes exactly the dense one.

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

from .configuration_moelora import MoELoraConfig
from .moe_causal_lm import MoEForCausalLM, MoEModel
from .moe_dispatch import routed_dispatch, traced_for_every_shape
from .moe_dropout import dropout_mask, zero_dropped
from .moe_routing import emit_routing_record, load_balancing_loss, token_mask
from .moe_sites import LINEAR_PARENTS, attach_sibling, linear_on

SITE_PREFIX = "moelora_"


class MoELoraRouter(nn.Linear):
    """A site's router (in -> E, no bias); its own type so weight init can tell it apart."""


class MoELoraSite(nn.Module):
    """Router plus E LoRA experts beside one linear: adds each token's top-k weighted expert outputs to its output.

    Two dispatches compute the same sum (`_dispatch`: "auto", "mixed", "routed"):

    * mixed: every expert's A on every token as one [tokens, E*r] matmul, the r-wide slices of the
      experts a token did not pick scaled by zero, then one matmul with all the B's. Fixed shapes,
      two GEMMs as wide as a single LoRA of the same trainable size, no sort and no gather: the
      fastest form while E*r is small next to the linear (LoRA widths).
    * routed: tokens sorted by expert, each expert run on its own tokens (`moe_dispatch.routed_dispatch`):
      k*r instead of E*r columns of work per token, for wide experts, at the price of the gather.

    "auto" takes mixed while E*r <= in_features: on a CPU at in_features 1024, 1024 tokens, top-2, the
    routed step took 1.33x the mixed one at E*r = 64 and still 1.06x at E*r = 512. Both
    read the same dropped input (one mask over the site's input, shared by a token's experts, as
    a single LoRA's dropout), so they agree to rounding.
    """

    _dispatch = "auto"

    def __init__(self, in_features: int, out_features: int, config: MoELoraConfig, site: str, layer_idx: int):
        super().__init__()
        self.site, self.layer_idx = site, layer_idx  # name its routing records
        self.num_experts, self.top_k = config.num_experts, config.num_experts_per_tok
        self.scaling = config.lora_alpha / config.lora_rank
        self.router = MoELoraRouter(in_features, config.num_experts, bias=False)
        self.down = nn.Parameter(torch.empty(config.num_experts, config.lora_rank, in_features))
        self.up = nn.Parameter(torch.empty(config.num_experts, out_features, config.lora_rank))
        self.dropout = config.lora_dropout  # on the experts' input, one mask over the site's input
        # tokens per forward whose expert outputs the contrastive loss sees (0: no sample drawn)
        self.sample_size = config.contrastive_sample_size if config.contrastive_loss_coef > 0 else 0

    def linear_output_hook(self, linear: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
        rows = args[0].reshape(-1, args[0].shape[-1])
        logits = self.router(rows.to(self.router.weight.dtype))
        top_logits, selected = torch.topk(logits, self.top_k, dim=-1)
        weights = torch.softmax(top_logits, dim=-1, dtype=torch.float32)
        extras = self._contrastive_sample(rows, selected) if self.sample_size and self.training and torch.is_grad_enabled() else None
        emit_routing_record(self.site, self.layer_idx, logits, selected, extras)
        expert_input, scaling = rows.to(self.down.dtype), self.scaling
        if self.training and self.dropout:
            drop, keep_scale = dropout_mask(tuple(expert_input.shape), self.dropout, expert_input.device)
            expert_input, scaling = zero_dropped(expert_input, drop), scaling * keep_scale
        base = output.reshape(-1, output.shape[-1])
        if self._uses_mixed_dispatch():
            return self._mixed_forward(base, expert_input, weights, selected, scaling).view(output.shape)
        mixed = routed_dispatch(expert_input, weights * scaling, selected, list(range(self.num_experts)),
                                self._weighted_expert_output)
        return output + mixed.to(output.dtype).reshape(output.shape)

    def _uses_mixed_dispatch(self) -> bool:
        if traced_for_every_shape():
            return True  # fixed shapes, no host sync: the routed dispatch has neither
        if self._dispatch != "auto":
            return self._dispatch == "mixed"
        experts, rank, in_features = self.down.shape
        return experts * rank <= in_features

    def _stacked_up_t(self) -> torch.Tensor:
        """The B's transposed and stacked, a contiguous [E*r, out]: row block e is expert e's B^T.

        Contiguous as the second GEMM operand, so that its gradient is hidden^T @ grad; a transposed view
        would make autograd form grad^T @ hidden, which copies the [tokens, out] grad for half-precision GEMMs.
        """
        experts, out_features, rank = self.up.shape
        return self.up.transpose(1, 2).reshape(experts * rank, out_features)

    def _mixed_forward(self, base: torch.Tensor, rows: torch.Tensor, weights: torch.Tensor, selected: torch.Tensor,
                       scaling: float) -> torch.Tensor:
        """base plus, over the top-k, w_i * scaling * B_i A_i rows, as two GEMMs over all experts (see the class)."""
        experts, rank, in_features = self.down.shape
        gates = torch.zeros(rows.shape[0], experts, dtype=weights.dtype, device=rows.device)
        gates = gates.scatter(1, selected, weights * scaling).to(rows.dtype)
        hidden = F.linear(rows, self.down.reshape(experts * rank, in_features)).view(-1, experts, rank)
        mixed_hidden = (hidden * gates.unsqueeze(-1)).view(-1, experts * rank)
        if base.dtype == mixed_hidden.dtype:  # the add fused into the second GEMM: one pass less over the output
            return torch.addmm(base, mixed_hidden, self._stacked_up_t())
        return base + (mixed_hidden @ self._stacked_up_t()).to(base.dtype)

    def _weighted_expert_output(self, expert: int, rows: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """w B_e A_e rows (w holds the scaling); the weights scale the r-wide bottleneck, not the out-wide output."""
        hidden = F.linear(rows, self.down[expert])
        return F.linear(hidden * weights.to(hidden.dtype), self.up[expert])

    def _contrastive_sample(self, rows: torch.Tensor, selected: torch.Tensor) -> dict:
        """B_i A_i x of each selected expert for up to `sample_size` random tokens (no dropout, no scaling).

        Each (token, pick) row holds the token's A-outputs of its picked expert only, zeros elsewhere, so one
        GEMM with all the B's gives every pick's output. x is detached: the loss shapes the experts (A and
        B), not the layers below. Drawn from the global RNG, which gradient checkpointing restores, so a
        recompute draws the same sample.
        """
        tokens = rows.shape[0]
        if tokens <= self.sample_size:
            sample = torch.arange(tokens, device=rows.device)
        else:
            sample = torch.randperm(tokens, device=rows.device)[: self.sample_size]
        experts, rank, in_features = self.down.shape
        picks = selected.index_select(0, sample)  # [S, k]
        sampled = rows.detach().index_select(0, sample).to(self.down.dtype)
        hidden = F.linear(sampled, self.down.reshape(experts * rank, in_features))
        picked = F.one_hot(picks, experts).to(hidden.dtype).unsqueeze(-1) * hidden.view(-1, 1, experts, rank)
        outputs = picked.view(-1, experts * rank) @ self._stacked_up_t()
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
        for name in config.sites:
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
        logits = tuple(r.logits for r in records)
        balance = load_balancing_loss(logits, config.num_experts, config.num_experts_per_tok, attention_mask)
        losses = {"aux_loss": balance}
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
