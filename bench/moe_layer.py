"""Time forward+backward of one PESC MoE layer against the dense FFN and a reference-style dispatch.

Three things are timed on the same weights and the same input (train mode, adapter
dropout 0 so that every variant does the same work):

* dense      the gated FFN alone, down(act(gate(x)) * up(x)) (`PescMLP.dense_forward`)
* pesc       our `PescMLP`: the FFN once plus top-k routed adapters (`PescMoEAdapter`)
* reference  the Camelidae dispatch, written here: FFN output repeated k times
             (repeat_interleave), a Python loop over experts with boolean masks
             `y[flat == i] = expert_i(h_rep[flat == i])`, then a weighted sum over k

A fourth timing, `pesc dropout`, is our layer with adapter dropout on (`--dropout`, default 0.1, the
training default): the path a real training step takes, since dropout rules out the "all" dispatch.

Each row: warm-up iterations, then the median of `--repeats` timings of one
forward+backward (or `--inner` of them on CUDA, divided). Before timing, the bench
checks once that pesc and the reference compute the same output and input gradient.

MoV and MoLoRA (`--methods mov molora`) put their experts on several linears of a decoder
layer, so their rows time forward+backward of one whole Llama decoder layer (attention with
grouped-query heads, head_dim 64, plus the FFN), its weights frozen as training has them:

* dense      the decoder layer alone
* mov        MoV's sites on k_proj / v_proj outputs (per kv head) and act(gate(x)), the official FFN site (`MoVScaling`)
* molora     MoLoRA's default sites, q/k/v/o/gate/down (`MoLoRAExperts`: stacked A, p-weighted middle, stacked B)
* loop       the same mixture written naively in the bench, one expert after the other
             (MoV: E vector products; MoLoRA: E pairs of small matmuls on per-expert weights)
* lora16     (MoLoRA rows) one plain LoRA of rank 16 on the same sites

    python bench/moe_layer.py                      # CPU (and CUDA if present), defaults
    python bench/moe_layer.py --device cuda --hidden 1024 4096 --tokens 2048 8192
    python bench/moe_layer.py --methods mov molora --dtype float32 --hidden 1024 2048
    python bench/moe_layer.py --methods moelora --hidden 1024 2048   # one MoELoRA site (moe_layer_moelora.py)
    python bench/moe_layer.py --methods loramoe --dtype float32 bfloat16   # LoRAMoE's three FFN sites (moe_layer_loramoe.py)

MoV and MoLoRA on a T5 v1.1 block (encoder, or decoder with cross-attention): bench/moe_layer_t5.py, on these helpers.
"""

import argparse
import functools
import itertools
import statistics
import time

import torch
import torch.nn.functional as F
from transformers.models.llama.modeling_llama import LlamaConfig, LlamaDecoderLayer, LlamaMLP, LlamaRotaryEmbedding

from moe_layer_loramoe import HEADER as LORAMOE_HEADER
from moe_layer_loramoe import add_arguments as add_loramoe_arguments
from moe_layer_loramoe import loramoe_row
from moe_layer_moelora import HEADER as MOELORA_HEADER
from moe_layer_moelora import add_arguments as add_moelora_arguments
from moe_layer_moelora import moelora_row
from pesc.methods.pesc.configuration_pesc import PescConfig
from pesc.methods.molora.configuration_molora import MoLoRAConfig
from pesc.methods.molora.modeling_molora import MoLoRAExperts
from pesc.methods.mov.modeling_mov import MoVScaling
from pesc.methods.pesc.modeling_pesc import PescMLP, init_expert_weights
from pesc.modeling.moe_config import LINEAR_PARENTS

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def intermediate_for(hidden: int) -> int:
    """~2.7x hidden, rounded up to a multiple of 256 (Llama's 11008 for 4096)."""
    return -(-int(hidden * 8 / 3) // 256) * 256


def build_layer(hidden: int, intermediate: int, adapter_dim: int, num_experts: int, top_k: int, seed: int):
    """A PescMLP around a fresh LlamaMLP, experts initialised as upcycling does, adapter_up perturbed."""
    torch.manual_seed(seed)
    base = LlamaConfig(hidden_size=hidden, intermediate_size=intermediate, hidden_act="silu")
    config = PescConfig(
        base_model_type="llama",
        hidden_size=hidden,
        intermediate_size=intermediate,
        hidden_act="silu",
        num_experts=num_experts,
        num_experts_per_tok=top_k,
        adapter_dim=adapter_dim,
        adapter_dropout=0.0,
    )
    layer = PescMLP(LlamaMLP(base), config)
    generator = torch.Generator().manual_seed(seed)
    init_expert_weights(layer.moe_adapter.router, generator)
    for expert in layer.moe_adapter.experts.values():
        init_expert_weights(expert, generator)
        with torch.no_grad():  # non-zero adapters: no shortcut through a zero up-projection
            expert.adapter_up.weight.normal_(0.0, 0.02, generator=generator)
        expert.dropout.p = 0.0
    return layer.train()


def reference_forward(layer: PescMLP, hidden_states: torch.Tensor) -> torch.Tensor:
    """The Camelidae reference dispatch, on the same modules as `layer`."""
    moe = layer.moe_adapter
    ffn_output = layer.dense_forward(hidden_states)
    shape = ffn_output.shape
    x = hidden_states.reshape(-1, shape[-1])
    h = ffn_output.reshape(-1, shape[-1])
    gate_logits = moe.router(x)
    weights, selected = torch.topk(gate_logits, moe.top_k)
    weights = F.softmax(weights, dim=1, dtype=torch.float).to(h.dtype)
    flat = selected.view(-1)
    h = h.repeat_interleave(moe.top_k, dim=0)
    y = torch.empty_like(h)
    for i, expert in enumerate(moe.experts.values()):
        y[flat == i] = expert(h[flat == i]).to(y.dtype)
    y = (y.view(*weights.shape, -1) * weights.unsqueeze(-1)).sum(dim=1)
    return ffn_output + y.view(shape)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


CLOCKS = {"wall": time.perf_counter, "cpu": time.thread_time}


class Timings(dict):
    """Median milliseconds per variant; `ratio(a, b)` is the median over repeats of a's time over b's in the
    same repeat, which a slow spell of the host (it moves both) disturbs less than a ratio of two medians."""

    def __init__(self, samples: dict):
        super().__init__({name: statistics.median(values) for name, values in samples.items()})
        self.samples = samples

    def ratio(self, name: str, base: str) -> float:
        return statistics.median(a / b for a, b in zip(self.samples[name], self.samples[base]))


def time_fwd_bwd(fns: dict, layer, x, grad, warmup: int, repeats: int, inner: int, clock: str = "wall") -> Timings:
    """Milliseconds of one forward+backward of each function (see `Timings`).

    The functions take turns inside every repeat, so that load from other processes
    (a shared CPU) falls on all of them alike rather than on whichever ran last.
    clock "cpu" counts the calling thread's CPU time instead of wall time: with `--threads 1`
    on a shared CPU, the time other processes hold the core is then not counted.
    """
    device = x.device
    now = CLOCKS[clock]

    def step(fn):
        layer.zero_grad(set_to_none=True)
        x.grad = None
        result = fn(x)  # the output, or (output, an added loss)
        if isinstance(result, torch.Tensor):
            result.backward(grad)
        else:
            torch.autograd.backward(list(result), [grad, None])

    for fn in fns.values():
        for _ in range(warmup):
            step(fn)
    samples = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            sync(device)
            start = now()
            for _ in range(inner):
                step(fn)
            sync(device)
            samples[name].append((now() - start) * 1000.0 / inner)
    return Timings(samples)


def routed_only(layer):
    """Our layer forced onto the routed dispatch (the path training with adapter dropout > 0 takes)."""

    def forward(hidden_states):
        layer.moe_adapter._dispatch = "routed"
        try:
            return layer(hidden_states)
        finally:
            del layer.moe_adapter._dispatch

    return forward


def with_dropout(layer, p: float):
    """Our layer with every expert's adapter dropout set to `p` for the call (as in training)."""

    def forward(hidden_states):
        experts = list(layer.moe_adapter.experts.values())
        for expert in experts:
            expert.dropout.p = p
        try:
            return layer(hidden_states)
        finally:
            for expert in experts:
                expert.dropout.p = 0.0

    return forward


def check_same(layer, x, grad, dtype) -> str:
    """pesc (auto path and routed path) vs reference: same output and input gradient (dtype tolerance)."""
    results = []
    for fn in (lambda t: reference_forward(layer, t), layer, routed_only(layer)):
        layer.zero_grad(set_to_none=True)
        xi = x.detach().clone().requires_grad_(True)
        out = fn(xi)
        out.backward(grad)
        results.append((out.detach().float(), xi.grad.float()))
    tol = dict(rtol=1e-4, atol=1e-5) if dtype == torch.float32 else dict(rtol=2e-2, atol=2e-2)
    out_r, gx_r = results[0]
    with torch.no_grad():
        adapter_part = (out_r - layer.dense_forward(x.detach()).float()).abs().max().item()
    diffs = []
    for name, (out, gx) in zip(("pesc", "pesc routed"), results[1:]):
        diff = max((out - out_r).abs().max().item(), (gx - gx_r).abs().max().item())
        if not (torch.allclose(out, out_r, **tol) and torch.allclose(gx, gx_r, **tol)):
            raise SystemExit(f"{name} and reference differ (max abs diff {diff:.3g}); not timing a wrong layer")
        diffs.append(f"{name} {diff:.2g}")
    return f"allclose ok vs reference (max abs diff of output and input grad: {', '.join(diffs)}; " \
        f"adapter contribution max {adapter_part:.2g})"


def run_settings(args, device: torch.device) -> tuple[int, int, int]:
    """(repeats, warmup, inner) for a device: the given ones, else the device's defaults."""
    on_cuda = device.type == "cuda"
    repeats = args.repeats or (20 if on_cuda else 5)
    warmup = args.warmup if args.warmup is not None else (10 if on_cuda else 2)
    inner = args.inner or (10 if on_cuda else 1)
    return repeats, warmup, inner


def pesc_table(args, devices) -> None:
    """The PESC rows: PescMLP against the dense FFN and the Camelidae dispatch."""
    print(f"PESC: E={args.experts} k={args.top_k}; forward+backward of the FFN, train mode, adapter dropout 0, "
          f"dense weights {'frozen' if args.frozen_dense else 'trainable'}; median ms")
    header = (
        "| device | dtype | hidden | interm. | tokens | adapter_dim | dense ms | pesc ms (path) | reference ms "
        "| pesc/dense | ref/dense | ref/pesc | pesc routed ms | routed/dense "
        f"| pesc dropout {args.dropout:g} ms | dropout/dense |"
    )
    rows = []
    for device_name, dtype_name, hidden, tokens, adapter_dim in itertools.product(
        devices, args.dtype, args.hidden, args.tokens, args.adapter_dim
    ):
        device = torch.device(device_name)
        dtype = DTYPES[dtype_name]
        repeats, warmup, inner = run_settings(args, device)
        intermediate = args.intermediate or intermediate_for(hidden)
        layer = build_layer(hidden, intermediate, adapter_dim, args.experts, args.top_k, args.seed)
        layer.to(device=device, dtype=dtype)
        if args.frozen_dense:
            for linear in (layer.gate_proj, layer.up_proj, layer.down_proj):
                linear.weight.requires_grad_(False)
        gen = torch.Generator().manual_seed(args.seed + 1)
        x = torch.randn(tokens, hidden, generator=gen).to(device=device, dtype=dtype).requires_grad_(True)
        grad = torch.randn(tokens, hidden, generator=gen).to(device=device, dtype=dtype)
        label = f"{device_name} {dtype_name} H={hidden} I={intermediate} T={tokens} d={adapter_dim}"
        print(f"check {label}: {check_same(layer, x, grad, dtype)}", flush=True)
        moe = layer.moe_adapter
        path = moe._choose_dispatch(x.reshape(-1, hidden))
        times = time_fwd_bwd(
            {
                "dense": layer.dense_forward,
                "pesc": layer,
                "pesc_routed": routed_only(layer),
                "pesc_dropout": with_dropout(layer, args.dropout),
                "reference": lambda t: reference_forward(layer, t),
            },
            layer, x, grad, warmup, repeats, inner, args.clock,
        )
        times["path"] = path
        rows.append(format_row(device_name, dtype_name, hidden, intermediate, tokens, adapter_dim, times))
        print(f"row {rows[-1]}", flush=True)
        del layer, x, grad
        if device.type == "cuda":
            torch.cuda.empty_cache()
    print_table(header, rows)


# ---------------------------------------------------------------------------------------
# MoV and MoLoRA: sites on the linears of a whole decoder layer.
# ---------------------------------------------------------------------------------------
SITE_PARENTS = {**LINEAR_PARENTS, "act_fn": "mlp"}  # MoV's FFN site sits on the MLP's activation module
MOLORA_SITES = MoLoRAConfig.method_defaults["sites"]  # the official six: q, k, v, o, gate (wi_0), down (wo)


def build_decoder_layer(hidden: int, intermediate: int, seed: int):
    """A frozen Llama decoder layer (head_dim 64, a quarter as many kv heads as heads) and its rotary embedding."""
    heads = max(1, hidden // 64)
    config = LlamaConfig(hidden_size=hidden, intermediate_size=intermediate, num_attention_heads=heads,
                         num_key_value_heads=max(1, heads // 4), head_dim=64, attn_implementation="sdpa")
    torch.manual_seed(seed)
    layer = LlamaDecoderLayer(config, layer_idx=0).train().requires_grad_(False)
    return layer, config, LlamaRotaryEmbedding(config)


def module_of(layer, name: str) -> torch.nn.Module:
    return getattr(getattr(layer, SITE_PARENTS[name]), name)


def mov_loop(site: MoVScaling, activation: torch.Tensor) -> torch.Tensor:
    """MoV written naively: the merged vector summed expert by expert (E vector products)."""
    rows = activation.reshape(-1, site.heads, site.width)
    probabilities = torch.softmax(site.router.logits(rows), dim=-1)
    merged = 0
    for expert in range(site.vectors.shape[1]):
        merged = merged + probabilities[..., expert : expert + 1] * site.vectors[:, expert].float()
    return (rows * merged.to(activation.dtype)).reshape(activation.shape)


class MoLoRALoop(torch.nn.Module):
    """MoLoRA written naively: E separate LoRA pairs (copies of the site's weights), one after the other."""

    def __init__(self, site: MoLoRAExperts):
        super().__init__()
        self.site = site
        rank = site.rank
        self.experts_A = torch.nn.ParameterList(
            torch.nn.Parameter(a.detach().clone()) for a in site.experts_A.split(rank, dim=0))
        self.experts_B = torch.nn.ParameterList(
            torch.nn.Parameter(b.detach().clone().contiguous()) for b in site.experts_B.split(rank, dim=1))

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        probabilities, _ = self.site.router.probabilities(self.site.router.logits(inputs))
        out = 0
        for expert, (a, b) in enumerate(zip(self.experts_A, self.experts_B)):
            weight = (probabilities[..., expert : expert + 1] * self.site.scaling).to(inputs.dtype)
            out = out + weight * F.linear(F.linear(inputs, a), b)
        return out


class SingleLoRA(torch.nn.Module):
    """One plain LoRA (the second reference row for MoLoRA): (alpha/r) B A x."""

    def __init__(self, in_features: int, out_features: int, rank: int, alpha: float, generator: torch.Generator):
        super().__init__()
        self.scaling = alpha / rank
        self.lora_A = torch.nn.Parameter(torch.randn(rank, in_features, generator=generator) * 0.02)
        self.lora_B = torch.nn.Parameter(torch.randn(out_features, rank, generator=generator) * 0.02)

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        return F.linear(F.linear(inputs, self.lora_A), self.lora_B) * self.scaling


def mov_variants(layer, config, experts: int, generator: torch.Generator) -> tuple[dict, list]:
    """{variant: [(linear, position, hook)]} for MoV and its loop, and the modules that hold their parameters."""
    kv_heads, head_dim = config.num_key_value_heads, config.head_dim
    sites = {"k_proj": MoVScaling(head_dim, experts, kv_heads), "v_proj": MoVScaling(head_dim, experts, kv_heads),
             "act_fn": MoVScaling(config.intermediate_size, experts)}
    for site in sites.values():
        site.reset_parameters(generator)
        with torch.no_grad():  # trained-like vectors: no shortcut through ones
            site.vectors.add_(torch.randn(site.vectors.shape, generator=generator) * 0.1)

    def loop_hook(site):
        return lambda module, args, out: mov_loop(site, out)

    variants = {
        variant: [(module_of(layer, name), "output", make_hook(site)) for name, site in sites.items()]
        for variant, make_hook in (("mov", lambda site: site.linear_output_hook), ("loop", loop_hook))
    }
    return variants, list(sites.values())


def molora_variants(layer, experts: int, rank: int, alpha: float, generator: torch.Generator) -> tuple[dict, list]:
    """{variant: [(linear, position, hook)]} for MoLoRA, its loop and a single rank-16 LoRA on MoLoRA's default sites."""
    sites, loops, loras = {}, {}, {}
    for name in MOLORA_SITES:
        linear = module_of(layer, name)
        site = MoLoRAExperts(linear.in_features, linear.out_features, experts, rank, alpha)
        site.reset_parameters(generator)
        with torch.no_grad():  # trained-like B: no shortcut through zeros
            site.experts_B.normal_(0.0, 0.02, generator=generator)
        sites[name], loops[name] = site, MoLoRALoop(site)
        loras[name] = SingleLoRA(linear.in_features, linear.out_features, 16, alpha, generator)
    def adds(module):
        return lambda linear, args, out: out + module(args[0])

    variants = {"molora": [(module_of(layer, name), "output", site.linear_output_hook) for name, site in sites.items()]}
    for variant, modules in (("loop", loops), ("lora16", loras)):
        variants[variant] = [(module_of(layer, name), "output", adds(module)) for name, module in modules.items()]
    return variants, [*sites.values(), *loops.values(), *loras.values()]


def with_sites(layer, rope, hooks):
    """The decoder layer with `hooks` ([(linear, "output" | "input", hook)]) on their linears for the call."""
    return with_hooks(lambda hidden_states: layer(hidden_states, position_embeddings=rope), hooks)


def with_hooks(call, hooks):
    """`call` (hidden states -> a layer's output) with `hooks` ([(module, "output" | "input", hook)]) on their modules
    for the call; the layer's hidden states alone come back (a tuple's first)."""

    def forward(hidden_states):
        handles = [
            module.register_forward_hook(hook) if position == "output" else module.register_forward_pre_hook(hook)
            for module, position, hook in hooks
        ]
        try:
            out = call(hidden_states)
        finally:
            for handle in handles:
                handle.remove()
        return out[0] if isinstance(out, tuple) else out

    return forward


def check_same_soft(fns: dict, x, grad, dtype) -> str:
    """Our layer and the loop give the same output and input gradient (dtype tolerance); raises otherwise."""
    results = {}
    for name, fn in fns.items():
        xi = x.detach().clone().requires_grad_(True)
        out = fn(xi)
        out.backward(grad)
        results[name] = (out.detach().float(), xi.grad.float())
    tol = dict(rtol=1e-4, atol=1e-4) if dtype == torch.float32 else dict(rtol=2e-2, atol=2e-2)
    (ours, (out_a, gx_a)), (_, (out_b, gx_b)) = list(results.items())[:2]
    diff = max((out_a - out_b).abs().max().item(), (gx_a - gx_b).abs().max().item())
    if not (torch.allclose(out_a, out_b, **tol) and torch.allclose(gx_a, gx_b, **tol)):
        raise SystemExit(f"{ours} and its loop differ (max abs diff {diff:.3g}); not timing a wrong layer")
    return f"{ours} allclose to its loop (max abs diff of output and input grad {diff:.2g})"


def soft_table(args, devices) -> None:
    """The MoV and MoLoRA rows: a whole decoder layer with the method's sites, against the dense layer and a loop."""
    print(f"MoV / MoLoRA: E={args.soft_experts}, MoLoRA r={args.rank} alpha={args.alpha:g} on {', '.join(MOLORA_SITES)}; "
          "forward+backward of a Llama decoder layer (head_dim 64, kv heads = heads/4), base frozen, train mode; median ms")
    header = ("| device | dtype | hidden | interm. | tokens | method | dense ms | ours ms | loop ms | lora16 ms "
              "| ours/dense | loop/dense | loop/ours | lora16/dense |")
    rows = []
    for device_name, dtype_name, hidden, tokens, method in itertools.product(
        devices, args.dtype, args.hidden, args.tokens, [m for m in args.methods if m in ("mov", "molora")]
    ):
        device = torch.device(device_name)
        dtype = DTYPES[dtype_name]
        repeats, warmup, inner = run_settings(args, device)
        intermediate = args.intermediate or intermediate_for(hidden)
        layer, config, rotary = build_decoder_layer(hidden, intermediate, args.seed)
        generator = torch.Generator().manual_seed(args.seed)
        if method == "mov":
            variants, modules = mov_variants(layer, config, args.soft_experts, generator)
        else:
            variants, modules = molora_variants(layer, args.soft_experts, args.rank, args.alpha, generator)
        holder = torch.nn.ModuleList([layer, *modules]).to(device=device, dtype=dtype)
        gen = torch.Generator().manual_seed(args.seed + 1)
        x = torch.randn(1, tokens, hidden, generator=gen).to(device=device, dtype=dtype).requires_grad_(True)
        grad = torch.randn(1, tokens, hidden, generator=gen).to(device=device, dtype=dtype)
        with torch.no_grad():
            rope = rotary.to(device)(x, torch.arange(tokens, device=device).unsqueeze(0))
        fns = {("ours" if name == method else name): with_sites(layer, rope, hooks) for name, hooks in variants.items()}
        label = f"{device_name} {dtype_name} H={hidden} I={intermediate} T={tokens}"
        print(f"check {method} {label}: {check_same_soft(fns, x, grad, dtype)}", flush=True)
        times = time_fwd_bwd({"dense": with_sites(layer, rope, []), **fns}, holder, x, grad, warmup, repeats, inner,
                             args.clock)
        rows.append(format_soft_row(device_name, dtype_name, hidden, intermediate, tokens, method, times))
        print(f"row {rows[-1]}", flush=True)
        del layer, holder, x, grad
        if device.type == "cuda":
            torch.cuda.empty_cache()
    print_table(header, rows)


def format_soft_row(device_name, dtype_name, hidden, intermediate, tokens, method, t) -> str:
    lora16 = t.get("lora16")
    lora16_ms, lora16_ratio = (f"{lora16:.2f}", f"{t.ratio('lora16', 'dense'):.3f}") if lora16 else ("-", "-")
    return (
        f"| {device_name} | {dtype_name} | {hidden} | {intermediate} | {tokens} | {method} "
        f"| {t['dense']:.2f} | {t['ours']:.2f} | {t['loop']:.2f} | {lora16_ms} "
        f"| {t.ratio('ours', 'dense'):.3f} | {t.ratio('loop', 'dense'):.3f} | {t.ratio('loop', 'ours'):.3f} | {lora16_ratio} |"
    )


def print_table(header: str, rows: list) -> None:
    print()
    print(header)
    print("|" + "---|" * (header.count("|") - 1))
    for row in rows:
        print(row)
    print()


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--methods", nargs="+", default=["pesc", "mov", "molora"],
                        choices=["pesc", "mov", "molora", "loramoe", "moelora"])
    parser.add_argument("--device", nargs="+", default=None, help="cpu, cuda (default: cpu, plus cuda if available)")
    parser.add_argument("--hidden", type=int, nargs="+", default=[1024])
    parser.add_argument("--intermediate", type=int, default=None, help="default: ~8/3 x hidden rounded to 256")
    parser.add_argument("--tokens", type=int, nargs="+", default=[2048])
    parser.add_argument("--adapter-dim", type=int, nargs="+", default=[64, 512], help="PESC")
    parser.add_argument("--dtype", nargs="+", default=["float32", "bfloat16"], choices=sorted(DTYPES))
    parser.add_argument("--experts", type=int, default=8, help="PESC experts")
    parser.add_argument("--top-k", type=int, default=2, help="PESC")
    parser.add_argument("--soft-experts", type=int, default=10, help="MoV / MoLoRA experts per site")
    parser.add_argument("--rank", type=int, default=4, help="MoLoRA rank")
    parser.add_argument("--alpha", type=float, default=16.0, help="MoLoRA alpha (and the rank-16 LoRA's)")
    parser.add_argument("--repeats", type=int, default=None, help="timed repeats (default: cpu 5, cuda 20)")
    parser.add_argument("--warmup", type=int, default=None, help="warm-up iterations (default: cpu 2, cuda 10)")
    parser.add_argument("--inner", type=int, default=None, help="iterations per repeat (default: cpu 1, cuda 10)")
    parser.add_argument("--frozen-dense", action="store_true", help="PESC: gate/up/down frozen (only adapters+router train)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    parser.add_argument("--clock", choices=sorted(CLOCKS), default="wall",
                        help="cpu: the thread's CPU time (CPU runs with --threads 1 on a shared machine)")
    parser.add_argument("--dropout", type=float, default=0.1, help="adapter dropout of the 'pesc dropout' timing")
    parser.add_argument("--seed", type=int, default=0)
    add_loramoe_arguments(parser)
    add_moelora_arguments(parser)
    args = parser.parse_args(argv)

    if args.threads:
        torch.set_num_threads(args.threads)
    devices = args.device or (["cpu", "cuda"] if torch.cuda.is_available() else ["cpu"])
    print(f"torch {torch.__version__}, CPU threads {torch.get_num_threads()}", end="")
    if torch.cuda.is_available():
        print(f", CUDA device {torch.cuda.get_device_name(0)}", end="")
    print()
    if "pesc" in args.methods:
        pesc_table(args, devices)
    if set(args.methods) & {"mov", "molora"}:
        soft_table(args, devices)
    if "loramoe" in args.methods:
        loramoe_table(args, devices, functools.partial(time_fwd_bwd, clock=args.clock))
    if "moelora" in args.methods:
        moelora_table(args, devices, functools.partial(time_fwd_bwd, clock=args.clock))


def side_table(header: str, rows_of) -> None:
    """Print the rows (each printed as it is timed, so a long run shows progress), then the table."""
    rows = []
    for row in rows_of:
        rows.append(row)
        print(f"row {row}", flush=True)
    print_table(header, rows)


def loramoe_table(args, devices, timer) -> None:
    """LoRAMoE's rows (bench/moe_layer_loramoe.py): its three FFN sites against the dense FFN and the official loop."""
    side_table(LORAMOE_HEADER, (
        loramoe_row(args, device_name, DTYPES[dtype_name], dtype_name, hidden, args.intermediate or intermediate_for(hidden),
                    tokens, timer, warmup_repeats_inner(args, device_name))
        for device_name, dtype_name, hidden, tokens in itertools.product(devices, args.dtype, args.hidden, args.tokens)
    ))  # fmt: skip


def moelora_table(args, devices, timer) -> None:
    """MoELoRA's rows (bench/moe_layer_moelora.py): one site against a single LoRA of its size and a masked loop."""
    side_table(MOELORA_HEADER, (
        moelora_row(args, device_name, hidden, tokens, timer, warmup_repeats_inner(args, device_name))
        for device_name, hidden, tokens in itertools.product(devices, args.hidden, args.tokens)
    ))  # fmt: skip


def warmup_repeats_inner(args, device_name: str) -> tuple[int, int, int]:
    repeats, warmup, inner = run_settings(args, torch.device(device_name))
    return warmup, repeats, inner


def format_row(device_name, dtype_name, hidden, intermediate, tokens, adapter_dim, t) -> str:
    return (
        f"| {device_name} | {dtype_name} | {hidden} | {intermediate} | {tokens} | {adapter_dim} "
        f"| {t['dense']:.2f} | {t['pesc']:.2f} ({t['path']}) | {t['reference']:.2f} "
        f"| {t.ratio('pesc', 'dense'):.3f} | {t.ratio('reference', 'dense'):.3f} | {t.ratio('reference', 'pesc'):.3f} "
        f"| {t['pesc_routed']:.2f} | {t.ratio('pesc_routed', 'dense'):.3f} "
        f"| {t['pesc_dropout']:.2f} | {t.ratio('pesc_dropout', 'dense'):.3f} |"
    )


# ---------------------------------------------------------------------------------------
# MoELoRA: one site (a frozen square linear, as q_proj) with E rank-r LoRA experts, top-k routed,
# contrastive loss included, against a single LoRA of the same trainable size on the same linear
# (the paper's baseline) and against a per-expert boolean-mask loop of the same experts.
# ---------------------------------------------------------------------------------------
if __name__ == "__main__":
    main()
