"""Greedy generation speed of an exported PESC model against its dense base.

Builds a mid-size synthetic Llama locally (no downloads), makes a "trained" run on it
(random LoRA, perturbed routers and adapters: `pesc.testing.trained_run`), exports it
with `pesc export`, then times `model.generate` (greedy, exactly --new-tokens tokens,
KV cache on) of the exported model and of the dense base on the same prompt, at each
batch size. Each timing is the median of --repeats runs, dense and PESC interleaved.
Prints tokens/s of both and the ratio PESC / dense (target: >= 0.85).

    python bench/generate.py                              # CPU (and CUDA if present)
    python bench/generate.py --device cuda --hidden 2048 --layers 16 --dtype bfloat16
    python bench/generate.py --profile                    # + where the PESC decode step spends its time
    python bench/generate.py --compile                    # + static cache, compiled decode steps (both models)
    python bench/generate.py --per-step 300               # + per-step medians, dense and PESC alternating
"""

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def intermediate_for(hidden: int) -> int:
    """~8/3 x hidden rounded up to a multiple of 256 (Llama's 11008 for 4096)."""
    return -(-int(hidden * 8 / 3) // 256) * 256


def build_models(args, workdir: Path):
    """(dense path, exported PESC path) built under `workdir`."""
    from pesc.export import export
    from pesc.testing import save_tiny_dense
    from pesc.testing.trained_run import save_fake_trained_run

    dense = save_tiny_dense(
        workdir / "dense",
        "llama",
        hidden_size=args.hidden,
        intermediate_size=args.intermediate or intermediate_for(args.hidden),
        num_hidden_layers=args.layers,
        num_attention_heads=args.heads,
        num_key_value_heads=args.kv_heads,
        max_position_embeddings=4096,
    )
    if args.vocab:  # the tiny tokenizer has 256 tokens; a real vocabulary makes embeddings and lm_head realistic
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(dense)
        model.resize_token_embeddings(args.vocab, mean_resizing=False)
        model.save_pretrained(dense)
    save_fake_trained_run(
        workdir / "run", dense, num_experts=args.experts, top_k=args.top_k, adapter_dim=args.adapter_dim
    )
    out = export(workdir / "run", workdir / "pesc", dtype="float32", log=lambda message: None)
    return dense, out


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def compiled_settings() -> dict:
    """`generate` arguments for transformers' compiled decoding: a static cache, decode steps compiled.

    transformers compiles by itself on CUDA once the cache is static; `_compile_all_devices`
    is its switch for doing the same on the CPU.
    """
    from transformers import CompileConfig

    compile_config = CompileConfig()
    compile_config._compile_all_devices = True
    return {"cache_implementation": "static", "compile_config": compile_config}


def time_generate(model, input_ids, new_tokens: int, **settings) -> float:
    sync(input_ids.device)
    start = time.perf_counter()
    with torch.no_grad():
        out = model.generate(
            input_ids=input_ids,
            attention_mask=torch.ones_like(input_ids),
            max_new_tokens=new_tokens,
            min_new_tokens=new_tokens,
            do_sample=False,
            pad_token_id=0,
            **settings,
        )
    sync(input_ids.device)
    assert out.shape[1] == input_ids.shape[1] + new_tokens
    return time.perf_counter() - start


def per_step_ms(models: dict, input_ids, steps: int) -> dict:
    """Median ms of one decode step on a fixed cache, the models alternating step by step.

    Each model prefills `input_ids` once; every step then decodes one token and crops the
    cache back, so all steps see the same length. Alternating single steps puts a slow spell
    of a shared machine on every model alike, which whole-run timings cannot do.
    """
    with torch.no_grad():
        caches = {name: model(input_ids=input_ids, use_cache=True).cache for name, model in models.items()}
        times = {name: [] for name in models}
        for step in range(steps + 10):
            for name, model in models.items():
                sync(input_ids.device)
                start = time.perf_counter()
                model(input_ids=input_ids[:, -1:], cache=caches[name], use_cache=True)
                sync(input_ids.device)
                if step >= 10:  # the first steps warm up
                    times[name].append(time.perf_counter() - start)
                caches[name].crop(-1)  # drop the decoded token again
    return {name: 1e3 * statistics.median(values) for name, values in times.items()}


def profile_decode(model, input_ids, new_tokens: int, label: str) -> None:
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if input_ids.is_cuda else [])
    with profile(activities=activities) as prof, torch.no_grad():
        model.generate(input_ids=input_ids, attention_mask=torch.ones_like(input_ids), max_new_tokens=new_tokens,
                       min_new_tokens=new_tokens, do_sample=False, pad_token_id=0)
    print(f"\n--- profile: {label}, batch {input_ids.shape[0]}, {new_tokens} tokens ---")
    sort = "self_cuda_time_total" if input_ids.is_cuda else "self_cpu_time_total"
    print(prof.key_averages().table(sort_by=sort, row_limit=18))


def add_model_arguments(parser) -> None:
    """The synthetic model's shape flags (what `build_models` reads), shared with bench/serve.py."""
    parser.add_argument("--hidden", type=int, default=768)
    parser.add_argument("--intermediate", type=int, default=None)
    parser.add_argument("--layers", type=int, default=6)
    parser.add_argument("--heads", type=int, default=12)
    parser.add_argument("--kv-heads", type=int, default=4)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--experts", type=int, default=8)
    parser.add_argument("--top-k", type=int, default=2)
    parser.add_argument("--adapter-dim", type=int, default=96, help="default 96: hidden/8, as Camelidae's 512 for 4096")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", nargs="+", default=None, help="cpu, cuda (default: cpu, plus cuda if available)")
    parser.add_argument("--dtype", default=None, choices=sorted(DTYPES), help="default: float32 on cpu, bfloat16 on cuda")
    add_model_arguments(parser)
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--prompt-len", type=int, default=32)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    parser.add_argument("--profile", action="store_true", help="profile one PESC and one dense generate per batch")
    parser.add_argument("--per-step", type=int, default=0, metavar="STEPS",
                        help="also time STEPS single decode steps per model, dense and PESC alternating (steadier)")
    parser.add_argument("--compile", action="store_true",
                        help="also time both models with a static cache and compiled decode steps (transformers' own path)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    devices = args.device or (["cpu"] + (["cuda"] if torch.cuda.is_available() else []))

    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    from pesc.methods import register_auto_classes
    from pesc.methods.pesc.configuration_pesc import PescConfig

    register_auto_classes()

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    with tempfile.TemporaryDirectory() as tmp:
        dense_path, pesc_path = build_models(args, Path(tmp))
        config = PescConfig.from_pretrained(pesc_path)
        print(
            f"llama hidden {args.hidden}, {args.layers} layers, vocab {config.vocab_size}; PESC {args.experts} experts "
            f"top-{args.top_k} adapter_dim {args.adapter_dim}; prompt {args.prompt_len} + {args.new_tokens} new tokens, "
            f"greedy, median of {args.repeats}; torch {torch.__version__}, {torch.get_num_threads()} CPU threads"
        )
        print(f"{'device':7}{'dtype':10}{'decode':10}{'batch':>6}{'dense tok/s':>13}{'pesc tok/s':>12}{'ratio':>8}")
        for device_name in devices:
            device = torch.device(device_name)
            dtype = DTYPES[args.dtype or ("bfloat16" if device.type == "cuda" else "float32")]
            dense = AutoModelForCausalLM.from_pretrained(dense_path, dtype=dtype).to(device).eval()
            sparse = AutoModelForCausalLM.from_pretrained(pesc_path, dtype=dtype).to(device).eval()
            for batch in args.batch:
                ids = torch.randint(
                    10, config.vocab_size, (batch, args.prompt_len), generator=torch.Generator().manual_seed(batch)
                ).to(device)
                modes = {"eager": {}} | ({"compiled": compiled_settings()} if args.compile else {})
                for mode, settings in modes.items():
                    for model in (dense, sparse):  # warm-up (compiling: the same lengths, or it compiles again)
                        time_generate(model, ids, args.new_tokens if settings else min(8, args.new_tokens), **settings)
                    times = {"dense": [], "pesc": []}
                    for _ in range(args.repeats):
                        times["dense"].append(time_generate(dense, ids, args.new_tokens, **settings))
                        times["pesc"].append(time_generate(sparse, ids, args.new_tokens, **settings))
                    rate = {k: batch * args.new_tokens / statistics.median(v) for k, v in times.items()}
                    print(
                        f"{device_name:7}{str(dtype).removeprefix('torch.'):10}{mode:10}{batch:>6}{rate['dense']:>13.1f}"
                        f"{rate['pesc']:>12.1f}{rate['pesc'] / rate['dense']:>8.3f}",
                        flush=True,
                    )
                if args.per_step:
                    ms = per_step_ms({"dense": dense, "pesc": sparse}, ids, args.per_step)
                    print(f"{'':23}per step (median of {args.per_step}): dense {ms['dense']:.2f} ms, "
                          f"pesc {ms['pesc']:.2f} ms, ratio {ms['dense'] / ms['pesc']:.3f}", flush=True)
                if args.profile:
                    profile_decode(sparse, ids, args.new_tokens, "pesc")
                    profile_decode(dense, ids, args.new_tokens, "dense")
            del dense, sparse


if __name__ == "__main__":
    main()
