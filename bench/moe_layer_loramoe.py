"""The LoRAMoE rows of bench/moe_layer.py: forward+backward of one layer's three sites.

Timed on the same weights and input, in train mode, the base linears frozen (as LoRAMoE trains:
only routers and experts, and the input gradient flows on to the layers below):

* dense     the gated FFN alone, down(act(gate(x)) * up(x))
* loramoe   the FFN with pesc's `LoramoeExperts` on gate_proj, up_proj and down_proj: each site's
            router, then all N experts as two matmuls over the stacked A and B
* official  the official code's per-site loop (Ablustrund/LoRAMoE, peft/tuners/lora.py, Linear.forward),
            written here: float32 softmax of the router cast back, then for each expert
            `result += p_i * B_i(A_i(dropout(x))) * scaling` (dropout 0 here), each A_i and B_i its own nn.Linear
* loramoe dropout   our layer with expert dropout on (`--loramoe-dropout`, the paper's 0.05)

Expert dropout is 0 in the first three, so they do the same work. Before timing, each row checks
that loramoe and official give the same output and input gradient.
"""

import torch
from torch import nn
from transformers.models.llama.modeling_llama import LlamaConfig, LlamaMLP

from pesc.methods.loramoe.modeling_loramoe import LoramoeExperts, init_loramoe_weights

SITES = ("gate_proj", "up_proj", "down_proj")


class OfficialSite(nn.Module):
    """One site as the official code holds it: `lora_route`, and `lora_A{i}` / `lora_B{i}` per expert."""

    def __init__(self, ours: LoramoeExperts):
        super().__init__()
        num, rank = ours.num_experts, ours.rank
        in_features, out_features = ours.experts_A.in_features, ours.experts_B.out_features
        self.num_experts, self.scaling = num, ours.scaling
        self.lora_route = nn.Linear(in_features, num, bias=False)
        self.lora_A = nn.ModuleList(nn.Linear(in_features, rank, bias=False) for _ in range(num))
        self.lora_B = nn.ModuleList(nn.Linear(rank, out_features, bias=False) for _ in range(num))
        with torch.no_grad():
            self.lora_route.weight.copy_(ours.router.weight)
            for i in range(num):
                self.lora_A[i].weight.copy_(ours.experts_A.weight[i * rank : (i + 1) * rank])
                self.lora_B[i].weight.copy_(ours.experts_B.weight[:, i * rank : (i + 1) * rank])

    def forward(self, x: torch.Tensor, result: torch.Tensor) -> torch.Tensor:
        route_weight = torch.softmax(self.lora_route(x), dim=-1, dtype=torch.float32).to(result.dtype)
        for i in range(self.num_experts):
            result = result + route_weight[:, i : i + 1] * self.lora_B[i](self.lora_A[i](x)) * self.scaling
        return result


class LoramoeLayer(nn.Module):
    """A LlamaMLP with a LoRAMoE site on each linear, and the same layer computed the official way."""

    def __init__(self, hidden: int, intermediate: int, num_experts: int, rank: int, alpha: float, seed: int):
        super().__init__()
        torch.manual_seed(seed)
        self.mlp = LlamaMLP(LlamaConfig(hidden_size=hidden, intermediate_size=intermediate, hidden_act="silu"))
        self.mlp.requires_grad_(False)
        generator = torch.Generator().manual_seed(seed)
        self.sites = nn.ModuleDict()
        for name in SITES:
            linear = getattr(self.mlp, name)
            site = LoramoeExperts(linear.in_features, linear.out_features, num_experts, rank, alpha, 0.0)
            init_loramoe_weights(site, generator)
            with torch.no_grad():  # non-zero B: no shortcut through a zero up-projection
                site.experts_B.weight.normal_(0.0, 0.02, generator=generator)
            self.sites[name] = site
        self.official = nn.ModuleDict({name: OfficialSite(site) for name, site in self.sites.items()})

    def dense(self, x: torch.Tensor) -> torch.Tensor:
        return self.mlp(x)

    def loramoe(self, x: torch.Tensor) -> torch.Tensor:
        mlp, sites = self.mlp, self.sites
        gate = sites["gate_proj"](x, mlp.gate_proj(x))[0]
        up = sites["up_proj"](x, mlp.up_proj(x))[0]
        hidden = mlp.act_fn(gate) * up
        return sites["down_proj"](hidden, mlp.down_proj(hidden))[0]

    def official_loop(self, x: torch.Tensor) -> torch.Tensor:
        mlp, sites = self.mlp, self.official
        gate = sites["gate_proj"](x, mlp.gate_proj(x))
        up = sites["up_proj"](x, mlp.up_proj(x))
        hidden = mlp.act_fn(gate) * up
        return sites["down_proj"](hidden, mlp.down_proj(hidden))

    def with_dropout(self, p: float):
        def forward(x):
            for site in self.sites.values():
                site.dropout = p
            try:
                return self.loramoe(x)
            finally:
                for site in self.sites.values():
                    site.dropout = 0.0

        return forward


def check_same(layer: LoramoeLayer, x, grad, dtype) -> str:
    """loramoe vs official: same output and input gradient (dtype tolerance), and the experts contribute."""
    results = []
    for fn in (layer.official_loop, layer.loramoe):
        xi = x.detach().clone().requires_grad_(True)
        out = fn(xi)
        out.backward(grad)
        results.append((out.detach().float(), xi.grad.float()))
    layer.zero_grad(set_to_none=True)
    tol = dict(rtol=1e-4, atol=1e-5) if dtype == torch.float32 else dict(rtol=2e-2, atol=2e-2)
    (out_o, gx_o), (out, gx) = results
    diff = max((out - out_o).abs().max().item(), (gx - gx_o).abs().max().item())
    if not (torch.allclose(out, out_o, **tol) and torch.allclose(gx, gx_o, **tol)):
        raise SystemExit(f"loramoe and the official loop differ (max abs diff {diff:.3g}); not timing a wrong layer")
    with torch.no_grad():
        experts_part = (out_o - layer.dense(x.detach()).float()).abs().max().item()
    return f"allclose ok vs official (max abs diff of output and input grad {diff:.2g}; experts add up to {experts_part:.2g})"


HEADER = (
    "| device | dtype | hidden | interm. | tokens | N | r | dense ms | loramoe ms | official ms | loramoe/dense "
    "| official/dense | official/loramoe | loramoe dropout ms | dropout/dense |"
)


def loramoe_row(args, device_name, dtype, dtype_name, hidden, intermediate, tokens, time_fwd_bwd, timing) -> str:
    """Build, check and time one LoRAMoE row; `timing` = (warmup, repeats, inner)."""
    device = torch.device(device_name)
    layer = LoramoeLayer(hidden, intermediate, args.loramoe_experts, args.loramoe_rank, args.loramoe_alpha, args.seed)
    layer.to(device=device, dtype=dtype).train()
    gen = torch.Generator().manual_seed(args.seed + 1)
    x = torch.randn(tokens, hidden, generator=gen).to(device=device, dtype=dtype).requires_grad_(True)
    grad = torch.randn(tokens, hidden, generator=gen).to(device=device, dtype=dtype)
    label = f"loramoe {device_name} {dtype_name} H={hidden} I={intermediate} T={tokens}"
    print(f"check {label}: {check_same(layer, x, grad, dtype)}", flush=True)
    t = time_fwd_bwd(
        {
            "dense": layer.dense,
            "loramoe": layer.loramoe,
            "official": layer.official_loop,
            "dropout": layer.with_dropout(args.loramoe_dropout),
        },
        layer, x, grad, *timing,
    )  # fmt: skip
    return (
        f"| {device_name} | {dtype_name} | {hidden} | {intermediate} | {tokens} | {args.loramoe_experts} "
        f"| {args.loramoe_rank} | {t['dense']:.2f} | {t['loramoe']:.2f} | {t['official']:.2f} "
        f"| {t.ratio('loramoe', 'dense'):.3f} | {t.ratio('official', 'dense'):.3f} | {t.ratio('official', 'loramoe'):.3f} "
        f"| {t['dropout']:.2f} | {t.ratio('dropout', 'dense'):.3f} |"
    )


def add_arguments(parser) -> None:
    parser.add_argument("--loramoe-experts", type=int, default=6, help="LoRAMoE experts per site (paper: 6)")
    parser.add_argument("--loramoe-rank", type=int, default=4, help="LoRAMoE expert rank (paper: 4)")
    parser.add_argument("--loramoe-alpha", type=float, default=32.0, help="LoRAMoE alpha (paper: 32)")
    parser.add_argument("--loramoe-dropout", type=float, default=0.05, help="expert dropout of the dropout timing")
