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

    python bench/moe_layer.py                      # CPU (and CUDA if present), defaults
    python bench/moe_layer.py --device cuda --hidden 1024 4096 --tokens 2048 8192

`--method loramoe` times LoRAMoE's three sites instead (bench/moe_layer_loramoe.py); `--method pesc
loramoe` prints both tables from one run.
"""

import argparse
import itertools
import statistics
import time

import torch
import torch.nn.functional as F
from transformers.models.llama.modeling_llama import LlamaConfig, LlamaMLP

from moe_layer_loramoe import HEADER as LORAMOE_HEADER
from moe_layer_loramoe import add_arguments as add_loramoe_arguments
from moe_layer_loramoe import loramoe_row
from pesc.modeling import PescConfig
from pesc.modeling.modeling_pesc import PescMLP, init_expert_weights

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
        topk=top_k,
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


def time_fwd_bwd(fns: dict, layer, x, grad, warmup: int, repeats: int, inner: int) -> dict:
    """Median milliseconds of one forward+backward of each function.

    The functions take turns inside every repeat, so that load from other processes
    (a shared CPU) falls on all of them alike rather than on whichever ran last.
    """
    device = x.device

    def step(fn):
        layer.zero_grad(set_to_none=True)
        x.grad = None
        fn(x).backward(grad)

    for fn in fns.values():
        for _ in range(warmup):
            step(fn)
    samples = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            sync(device)
            start = time.perf_counter()
            for _ in range(inner):
                step(fn)
            sync(device)
            samples[name].append((time.perf_counter() - start) * 1000.0 / inner)
    return {name: statistics.median(values) for name, values in samples.items()}


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


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", nargs="+", default=None, help="cpu, cuda (default: cpu, plus cuda if available)")
    parser.add_argument("--hidden", type=int, nargs="+", default=[1024])
    parser.add_argument("--intermediate", type=int, default=None, help="default: ~8/3 x hidden rounded to 256")
    parser.add_argument("--tokens", type=int, nargs="+", default=[2048])
    parser.add_argument("--adapter-dim", type=int, nargs="+", default=[64, 512])
    parser.add_argument("--dtype", nargs="+", default=["float32", "bfloat16"], choices=sorted(DTYPES))
    parser.add_argument("--experts", type=int, default=8)
    parser.add_argument("--top-k", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=None, help="timed repeats (default: cpu 5, cuda 20)")
    parser.add_argument("--warmup", type=int, default=None, help="warm-up iterations (default: cpu 2, cuda 10)")
    parser.add_argument("--inner", type=int, default=None, help="iterations per repeat (default: cpu 1, cuda 10)")
    parser.add_argument("--frozen-dense", action="store_true", help="gate/up/down frozen (only adapters+router train)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    parser.add_argument("--dropout", type=float, default=0.1, help="adapter dropout of the 'pesc dropout' timing")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--method", nargs="+", default=["pesc"], choices=["pesc", "loramoe"], help="which layers")
    add_loramoe_arguments(parser)
    args = parser.parse_args(argv)

    if args.threads:
        torch.set_num_threads(args.threads)
    devices = args.device or (["cpu", "cuda"] if torch.cuda.is_available() else ["cpu"])
    print(f"torch {torch.__version__}, CPU threads {torch.get_num_threads()}", end="")
    if torch.cuda.is_available():
        print(f", CUDA device {torch.cuda.get_device_name(0)}", end="")
    if "pesc" in args.method:
        print(f"; pesc: E={args.experts} k={args.top_k}, adapter dropout 0, "
              f"dense weights {'frozen' if args.frozen_dense else 'trainable'}", end="")
    if "loramoe" in args.method:
        print(f"; loramoe: alpha {args.loramoe_alpha:g}, expert dropout 0, base linears frozen", end="")
    print("; forward+backward, train mode, median ms")

    header = (
        "| device | dtype | hidden | interm. | tokens | adapter_dim | dense ms | pesc ms (path) | reference ms "
        "| pesc/dense | ref/dense | ref/pesc | pesc routed ms | routed/dense "
        f"| pesc dropout {args.dropout:g} ms | dropout/dense |"
    )
    rows = []
    for device_name, dtype_name, hidden, tokens, adapter_dim in itertools.product(
        devices, args.dtype, args.hidden, args.tokens, args.adapter_dim if "pesc" in args.method else []
    ):
        device = torch.device(device_name)
        dtype = DTYPES[dtype_name]
        on_cuda = device.type == "cuda"
        repeats = args.repeats or (20 if on_cuda else 5)
        warmup = args.warmup if args.warmup is not None else (10 if on_cuda else 2)
        inner = args.inner or (10 if on_cuda else 1)
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
            layer, x, grad, warmup, repeats, inner,
        )
        times["path"] = path
        rows.append(format_row(device_name, dtype_name, hidden, intermediate, tokens, adapter_dim, times))
        print(f"row {rows[-1]}", flush=True)
        del layer, x, grad
        if on_cuda:
            torch.cuda.empty_cache()

    loramoe_rows = []
    for device_name, dtype_name, hidden, tokens in itertools.product(
        devices, args.dtype, args.hidden, args.tokens if "loramoe" in args.method else []
    ):
        on_cuda = device_name == "cuda"
        timing = (
            args.warmup if args.warmup is not None else (10 if on_cuda else 2),
            args.repeats or (20 if on_cuda else 5),
            args.inner or (10 if on_cuda else 1),
        )
        intermediate = args.intermediate or intermediate_for(hidden)
        loramoe_rows.append(loramoe_row(args, device_name, DTYPES[dtype_name], dtype_name, hidden, intermediate,
                                        tokens, time_fwd_bwd, timing))  # fmt: skip
        print(f"row {loramoe_rows[-1]}", flush=True)

    for table_header, table_rows in ((header, rows), (LORAMOE_HEADER, loramoe_rows)):
        if table_rows:
            print()
            print(table_header)
            print("|" + "---|" * (table_header.count("|") - 1))
            for row in table_rows:
                print(row)


def format_row(device_name, dtype_name, hidden, intermediate, tokens, adapter_dim, t) -> str:
    return (
        f"| {device_name} | {dtype_name} | {hidden} | {intermediate} | {tokens} | {adapter_dim} "
        f"| {t['dense']:.2f} | {t['pesc']:.2f} ({t['path']}) | {t['reference']:.2f} "
        f"| {t['pesc'] / t['dense']:.3f} | {t['reference'] / t['dense']:.3f} | {t['reference'] / t['pesc']:.3f} "
        f"| {t['pesc_routed']:.2f} | {t['pesc_routed'] / t['dense']:.3f} "
        f"| {t['pesc_dropout']:.2f} | {t['pesc_dropout'] / t['dense']:.3f} |"
    )


if __name__ == "__main__":
    main()
