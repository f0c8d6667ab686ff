"""The MoELoRA rows of bench/moe_layer.py (`--methods moelora`): forward+backward of one site.

A frozen square linear (as q_proj) with a MoELoRA site of E experts, top-k, rank 8, in train mode, the
input gradient computed (a site sits mid-network: the layers below train too), timed against:

* lora        a single LoRA of the same trainable size on the same linear (the paper's baseline), with the
              same input dropout
* mixed       pesc's site on its "mixed" dispatch (all experts' A in one GEMM, zero weight off the top-k)
* routed      pesc's site on its "routed" dispatch (tokens sorted by expert, each expert on its own rows)
* loop        the same top-k experts by a Python loop over experts with boolean masks (the dispatch we avoid)

`mixed` and `routed` include the contrastive loss (`contrastive_sample_size` 128) and the input
dropout (`--moelora-dropout`, the default 0.05), as a training step has them; `loop` has neither, so
it is the cheapest thing the loop could be. Before timing, each row checks that the mixed and routed
dispatches and the loop give the same output without dropout.
"""

import torch
import torch.nn.functional as F
from torch import nn

from pesc.methods.moelora.configuration_moelora import MoELoraConfig
from pesc.methods.moelora.modeling_moelora import MoELoraSite, contrastive_loss, init_site
from pesc.modeling.moe_dropout import dropout_mask, zero_dropped
from pesc.modeling.moe_routing import record_routing

RANK = 8

HEADER = ("| device | hidden | tokens | E | k | LoRA (rank) ms | mixed ms | routed ms | loop ms | mixed / LoRA "
          "| routed / LoRA | loop / mixed |")


def add_arguments(parser) -> None:
    parser.add_argument("--moelora-experts", type=int, default=8, help="MoELoRA experts per site (paper: 8)")
    parser.add_argument("--moelora-top-k", type=int, default=2, help="MoELoRA experts per token (paper: 2)")
    parser.add_argument("--moelora-dropout", type=float, default=0.05, help="MoELoRA (and the LoRA's) input dropout")


class SiteBench(nn.Module):
    """A frozen linear, its MoELoRA site (non-zero B) and a single LoRA of the same trainable size."""

    def __init__(self, hidden: int, num_experts: int, top_k: int, dropout: float, seed: int):
        super().__init__()
        torch.manual_seed(seed)
        self.config = MoELoraConfig(base_model_type="llama", hidden_size=hidden, num_experts=num_experts,
                                    num_experts_per_tok=top_k, lora_rank=RANK, lora_dropout=dropout)
        self.linear = nn.Linear(hidden, hidden, bias=False).requires_grad_(False)
        self.site = MoELoraSite(hidden, hidden, self.config, "q_proj", 0)
        generator = torch.Generator().manual_seed(seed)
        init_site(self.site, generator)
        with torch.no_grad():
            self.site.up.normal_(0.0, 0.02, generator=generator)
        self.lora_rank = round(sum(p.numel() for p in self.site.parameters()) / (2 * hidden))
        self.lora_a = nn.Parameter(torch.randn(self.lora_rank, hidden, generator=generator) / hidden**0.5)
        self.lora_b = nn.Parameter(0.02 * torch.randn(hidden, self.lora_rank, generator=generator))
        self.dropout = dropout
        self.train()

    def lora(self, x: torch.Tensor) -> torch.Tensor:
        """W0 x + s B A dropout(x), the dropout as pesc draws it (one mask over the input)."""
        rows, scaling = x, self.config.lora_alpha / self.config.lora_rank
        if self.dropout:
            drop, keep_scale = dropout_mask(tuple(x.shape), self.dropout, x.device)
            rows, scaling = zero_dropped(x, drop), scaling * keep_scale
        return self.linear(x) + F.linear(F.linear(rows, self.lora_a), self.lora_b) * scaling

    def moelora(self, dispatch: str):
        """The site's output as a training step computes it, and its weighted contrastive loss (backward of both)."""

        def forward(x):
            self.site._dispatch = dispatch
            with record_routing() as records:
                out = self.site.linear_output_hook(self.linear, (x,), self.linear(x))
            sampled = [record for record in records if record.extras]
            if not sampled:  # the check runs without a sample
                return out
            return out, self.config.contrastive_loss_coef * contrastive_loss(sampled, None, self.config.contrastive_temperature)

        return forward

    def masked_loop(self, x: torch.Tensor) -> torch.Tensor:
        site = self.site
        logits = site.router(x)
        top, selected = torch.topk(logits, site.top_k, dim=-1)
        weights = torch.softmax(top, dim=-1, dtype=torch.float32)
        out = self.linear(x)
        for e in range(site.num_experts):
            hit = selected == e  # [tokens, k]
            rows = hit.any(-1)
            w = (weights * hit).sum(-1, keepdim=True)[rows]
            delta = (x[rows] @ site.down[e].t()) @ site.up[e].t() * (w * site.scaling)
            out = out.index_put((rows.nonzero().squeeze(-1),), delta, accumulate=True)
        return out


@torch.no_grad()
def check_same(bench: SiteBench, x) -> None:
    """mixed, routed and the loop give the same output (dropout and contrastive sample off for the check)."""
    bench.site.sample_size, bench.site.dropout = 0, 0.0
    outputs = [bench.moelora("mixed")(x), bench.moelora("routed")(x), bench.masked_loop(x)]  # no sample: tensors
    bench.site.sample_size, bench.site.dropout = bench.config.contrastive_sample_size, bench.dropout
    for other in outputs[1:]:
        if not torch.allclose(outputs[0], other, rtol=1e-4, atol=1e-5):
            raise SystemExit(f"MoELoRA dispatches differ (max {float((outputs[0] - other).abs().max()):.3g}); not timing")


def moelora_row(args, device_name, hidden, tokens, time_fwd_bwd, timing) -> str:
    """Build, check and time one MoELoRA row; `timing` = (warmup, repeats, inner)."""
    device = torch.device(device_name)
    bench = SiteBench(hidden, args.moelora_experts, args.moelora_top_k, args.moelora_dropout, args.seed).to(device)
    gen = torch.Generator().manual_seed(args.seed + 1)
    x = torch.randn(tokens, hidden, generator=gen).to(device).requires_grad_(True)
    grad = torch.randn(tokens, hidden, generator=gen).to(device)
    check_same(bench, x)
    t = time_fwd_bwd({"lora": bench.lora, "mixed": bench.moelora("mixed"), "routed": bench.moelora("routed"),
                      "loop": bench.masked_loop}, bench, x, grad, *timing)
    del bench.site._dispatch
    return (f"| {device_name} | {hidden} | {tokens} | {args.moelora_experts} | {args.moelora_top_k} "
            f"| {t['lora']:.2f} ({bench.lora_rank}) | {t['mixed']:.2f} | {t['routed']:.2f} | {t['loop']:.2f} "
            f"| {t.ratio('mixed', 'lora'):.3f} | {t.ratio('routed', 'lora'):.3f} | {t.ratio('loop', 'mixed'):.3f} |")
