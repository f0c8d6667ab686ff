"""Time forward+backward of one T5 v1.1 block with MoV or MoLoRA sites, against the dense block and a per-expert loop.

The sites are the shipped ones, put on the block by the method's own T5 class
(`MoVForConditionalGeneration.add_method_modules` / `MoLoRAForConditionalGeneration.add_method_modules`), so the
bench times what training runs: MoV on the keys and values of every attention (per head) and on the FFN activation
act(wi_0 x); MoLoRA on q, k, v, o of every attention and on wi_0, wo (the official sites). A block is T5 v1.1's
(gated-GELU FFN, d_kv 64, heads = d_model / 64, relative attention bias), its dense weights frozen, in train mode
(dropout 0): `--stack encoder` is self-attention + FFN, `--stack decoder` adds the cross-attention over an encoder
output of the same length (a causal self-attention mask). Each row times:

* dense      the block alone
* ours       the block with the method's sites
* loop       the same mixture written naively (moe_layer.py's `mov_loop` / `MoLoRALoop`: one expert after the other),
             hooked on the dense block's modules where the sites sit

Before timing, each row checks in float32 that ours and the loop give the same output and input gradient
(moe_layer.py's `check_same_soft`), then times in the row's dtype; the timing is moe_layer.py's `time_fwd_bwd` (turns taken inside every repeat, median ms).

    python bench/moe_layer_t5.py --device cuda --d-model 768 1024 --tokens 512 2048 --stack encoder decoder
    python bench/moe_layer_t5.py --device cpu --d-model 128 --tokens 32 --repeats 1 --warmup 0   # a quick check
"""

import argparse
import copy
import itertools

import torch
from transformers import T5Config
from transformers.models.t5.modeling_t5 import T5Block

from moe_layer import (DTYPES, MoLoRALoop, check_same_soft, mov_loop, print_table, run_settings, time_fwd_bwd,
                       with_hooks)
from pesc.methods import get_method

# d_model -> d_ff of T5 v1.1 small, base, large, XL, XXL (google/t5-v1_1-*'s configs)
T5_V1_1_D_FF = {512: 1024, 768: 2048, 1024: 2816, 2048: 5120, 4096: 10240}
HEADER = ("| device | dtype | d_model | d_ff | tokens | stack | method | dense ms | ours ms | loop ms | ours/dense "
          "| loop/dense | loop/ours |")


def build_block(d_model: int, d_ff: int, decoder: bool, seed: int) -> tuple[T5Block, T5Config]:
    """A frozen T5 v1.1 block (the first of its stack: it holds the relative attention bias) in train mode."""
    config = T5Config(d_model=d_model, d_ff=d_ff, d_kv=64, num_heads=max(1, d_model // 64), num_layers=1,
                      num_decoder_layers=1, feed_forward_proj="gated-gelu", dropout_rate=0.0, is_decoder=decoder,
                      tie_word_embeddings=False, attn_implementation="eager")  # T5's attention is eager only
    torch.manual_seed(seed)
    block = T5Block(config, has_relative_attention_bias=True, layer_idx=0)
    return block.train().requires_grad_(False), config


def method_block(dense: T5Block, config: T5Config, method_name: str, settings: dict, generator: torch.Generator):
    """(a copy of `dense` with the method's sites as its T5 class puts them, [(module of `dense` a site acts on,
    the site)]); the sites drawn as at init, then off it (MoV's vectors, MoLoRA's B) so no site is the identity."""
    method = get_method(method_name)
    method_config = method.config_from_dense(config, method.resolve_settings(settings))
    ours = copy.deepcopy(dense)
    stack = "decoder" if config.is_decoder else "encoder"
    method.seq2seq_model_class.add_method_modules(ours, stack, 0, method_config)
    pairs = []
    for name, site in ours.named_modules():
        parent, _, child = name.rpartition(".")
        if not child.startswith(method.prefix):
            continue
        site.reset_parameters(generator)
        with torch.no_grad():
            if method_name == "mov":
                site.vectors.add_(torch.randn(site.vectors.shape, generator=generator) * 0.1)
            else:
                site.experts_B.normal_(0.0, 0.02, generator=generator)
        pairs.append((dense.get_submodule(f"{parent}.{child.removeprefix(method.prefix)}"), site))
    return ours, pairs


def loop_hooks(method_name: str, pairs) -> tuple[list, list]:
    """moe_layer.py's naive mixture of each site, as forward hooks on the dense block's modules, and the loops'
    modules (which hold MoLoRA's per-expert weight copies)."""
    if method_name == "mov":
        return [(module, "output", lambda m, a, out, site=site: mov_loop(site, out)) for module, site in pairs], []
    loops = [MoLoRALoop(site) for _, site in pairs]
    return [(module, "output", lambda m, a, out, loop=loop: out + loop(a[0]).to(out.dtype))
            for (module, _), loop in zip(pairs, loops)], loops


def t5_row(args, device_name: str, dtype_name: str, d_model: int, tokens: int, stack: str, method_name: str) -> str:
    device, dtype = torch.device(device_name), DTYPES[dtype_name]
    repeats, warmup, inner = run_settings(args, device)
    d_ff = args.d_ff or T5_V1_1_D_FF.get(d_model, int(d_model * 8 / 3) // 64 * 64)
    dense, config = build_block(d_model, d_ff, stack == "decoder", args.seed)
    generator = torch.Generator().manual_seed(args.seed)
    settings = {"num_experts": args.soft_experts}
    if method_name == "molora":
        settings.update(expert_rank=args.rank, expert_alpha=args.alpha)
    ours, pairs = method_block(dense, config, method_name, settings, generator)
    hooks, loops = loop_hooks(method_name, pairs)
    holder = torch.nn.ModuleList([dense, ours, *loops])
    gen = torch.Generator().manual_seed(args.seed + 1)
    x, grad, encoder_output = (torch.randn(1, tokens, d_model, generator=gen) for _ in range(3))
    label = f"{method_name} {stack} {device_name} {dtype_name} d_model={d_model} d_ff={d_ff} T={tokens}"
    # checked in float32, then timed in `dtype`: in bfloat16 the loop's E separately rounded terms alone move the
    # output past check_same_soft's 2e-2 (T5's residual stream is not normalised: entries of several units)
    for run_dtype in (torch.float32, dtype):
        holder.to(device=device, dtype=run_dtype)
        xd, gradd = x.to(device=device, dtype=run_dtype).requires_grad_(True), grad.to(device=device, dtype=run_dtype)
        kwargs = {}
        if stack == "decoder":
            causal = torch.full((tokens, tokens), torch.finfo(run_dtype).min, device=device, dtype=run_dtype).triu(1)
            kwargs = {"attention_mask": causal[None, None],
                      "encoder_hidden_states": encoder_output.to(device=device, dtype=run_dtype)}
        fns = {"ours": with_hooks(lambda h, kw=kwargs: ours(h, **kw), []),
               "loop": with_hooks(lambda h, kw=kwargs: dense(h, **kw), hooks),
               "dense": with_hooks(lambda h, kw=kwargs: dense(h, **kw), [])}
        if run_dtype == torch.float32:
            print(f"check {label} (in float32): {check_same_soft(fns, xd, gradd, run_dtype)}", flush=True)
    t = time_fwd_bwd(fns, holder, xd, gradd, warmup, repeats, inner, args.clock)
    return (f"| {device_name} | {dtype_name} | {d_model} | {d_ff} | {tokens} | {stack} | {method_name} "
            f"| {t['dense']:.2f} | {t['ours']:.2f} | {t['loop']:.2f} | {t.ratio('ours', 'dense'):.3f} "
            f"| {t.ratio('loop', 'dense'):.3f} | {t.ratio('loop', 'ours'):.3f} |")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--methods", nargs="+", default=["mov", "molora"], choices=["mov", "molora"])
    parser.add_argument("--stack", nargs="+", default=["encoder", "decoder"], choices=["encoder", "decoder"])
    parser.add_argument("--device", nargs="+", default=None, help="cpu, cuda (default: cpu, plus cuda if available)")
    parser.add_argument("--d-model", type=int, nargs="+", default=[768], help="T5 v1.1 base: 768, large: 1024")
    parser.add_argument("--d-ff", type=int, default=None, help="default: T5 v1.1's for its sizes (2048 for 768, 2816 for 1024), else ~8/3 x d_model")
    parser.add_argument("--tokens", type=int, nargs="+", default=[512])
    parser.add_argument("--dtype", nargs="+", default=["float32", "bfloat16"], choices=sorted(DTYPES))
    parser.add_argument("--soft-experts", type=int, default=10, help="experts per site (the paper's MoV-10 / MoLoRA-10)")
    parser.add_argument("--rank", type=int, default=4, help="MoLoRA rank")
    parser.add_argument("--alpha", type=float, default=16.0, help="MoLoRA alpha")
    parser.add_argument("--repeats", type=int, default=None, help="timed repeats (default: cpu 5, cuda 20)")
    parser.add_argument("--warmup", type=int, default=None, help="warm-up iterations (default: cpu 2, cuda 10)")
    parser.add_argument("--inner", type=int, default=None, help="iterations per repeat (default: cpu 1, cuda 10)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    parser.add_argument("--clock", choices=["wall", "cpu"], default="wall")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    devices = args.device or (["cpu", "cuda"] if torch.cuda.is_available() else ["cpu"])
    print(f"torch {torch.__version__}, CPU threads {torch.get_num_threads()}"
          + (f", CUDA device {torch.cuda.get_device_name(0)}" if torch.cuda.is_available() else ""))
    print(f"MoV / MoLoRA on a T5 v1.1 block: E={args.soft_experts}, MoLoRA r={args.rank} alpha={args.alpha:g} on the "
          "official sites; forward+backward, base frozen, train mode; median ms")
    rows = []
    for combo in itertools.product(devices, args.dtype, args.d_model, args.tokens, args.stack, args.methods):
        rows.append(t5_row(args, *combo))
        print(f"row {rows[-1]}", flush=True)
    print_table(HEADER, rows)


if __name__ == "__main__":
    main()
