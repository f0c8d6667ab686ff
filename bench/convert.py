"""Benchmark `pesc convert` against `cp -r` and the naive in-memory path, side by side.

    python bench/convert.py                 # ~1.1B-parameter Llama shape (TinyLlama), bf16, 5 shards
    python bench/convert.py --skip-naive    # without from_pretrained + upcycle + save_pretrained

Writes a synthetic dense checkpoint (real shapes, zero-filled, safetensors written directly)
into a temporary folder, then times each command in its own child process and reads that
child's peak RSS from GNU time (`/usr/bin/time -f %M`). The source is read once beforehand so every command sees
it in the page cache; dirty pages are flushed (`sync`, untimed) between commands. A second,
half-depth checkpoint shows that the converter's peak memory does not grow with model size.
Everything is deleted at the end.
"""

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import save_file

ROOT = Path(__file__).resolve().parents[1]


def llama_tensors(layers, hidden, intermediate, heads, kv_heads, vocab):
    """Groups of (name -> shape), one group per layer plus the embeddings and the head."""
    head_dim = hidden // heads
    groups = [{"model.embed_tokens.weight": (vocab, hidden)}]
    for i in range(layers):
        p = f"model.layers.{i}."
        groups.append(
            {
                p + "self_attn.q_proj.weight": (hidden, hidden),
                p + "self_attn.k_proj.weight": (kv_heads * head_dim, hidden),
                p + "self_attn.v_proj.weight": (kv_heads * head_dim, hidden),
                p + "self_attn.o_proj.weight": (hidden, hidden),
                p + "mlp.gate_proj.weight": (intermediate, hidden),
                p + "mlp.up_proj.weight": (intermediate, hidden),
                p + "mlp.down_proj.weight": (hidden, intermediate),
                p + "input_layernorm.weight": (hidden,),
                p + "post_attention_layernorm.weight": (hidden,),
            }
        )
    groups.append({"model.norm.weight": (hidden,), "lm_head.weight": (vocab, hidden)})
    return groups


def write_checkpoint(folder: Path, layers: int, shard_bytes: int, hidden=2048, intermediate=5632, heads=32,
                     kv_heads=4, vocab=32000) -> tuple[int, int]:  # fmt: skip
    """A dense Llama checkpoint in bf16, sharded like save_pretrained does; (parameters, bytes)."""
    from transformers import LlamaConfig

    folder.mkdir(parents=True)
    LlamaConfig(
        hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=layers, num_attention_heads=heads,
        num_key_value_heads=kv_heads, vocab_size=vocab, dtype="bfloat16", tie_word_embeddings=False,
    ).save_pretrained(folder)  # fmt: skip
    shards, current, size = [], {}, 0
    for group in llama_tensors(layers, hidden, intermediate, heads, kv_heads, vocab):
        group_bytes = sum(2 * torch.Size(s).numel() for s in group.values())
        if current and size + group_bytes > shard_bytes:
            shards.append(current)
            current, size = {}, 0
        current.update(group)
        size += group_bytes
    shards.append(current)
    weight_map, total = {}, 0
    for number, shard in enumerate(shards, 1):
        name = f"model-{number:05d}-of-{len(shards):05d}.safetensors"
        tensors = {k: torch.zeros(shape, dtype=torch.bfloat16) for k, shape in shard.items()}
        save_file(tensors, folder / name, metadata={"format": "pt"})
        total += sum(t.numel() for t in tensors.values())
        weight_map.update(dict.fromkeys(shard, name))
        del tensors
    index = {"metadata": {"total_size": 2 * total}, "weight_map": weight_map}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    return total, 2 * total


def measure(cmd: list[str]) -> tuple[float, int]:
    """(wall seconds, peak RSS bytes) of one command, through GNU time (its small process forks the command,
    so the peak is the command's own, not this process's inherited at fork)."""
    subprocess.run(["sync"], check=True)
    start = time.perf_counter()
    proc = subprocess.run(["/usr/bin/time", "-f", "PESC_BENCH_RSS_KB %M", *cmd], stdout=subprocess.DEVNULL,
                          stderr=subprocess.PIPE, text=True)  # fmt: skip
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{proc.stderr[-3000:]}")
    rss_kb = int(proc.stderr.rsplit("PESC_BENCH_RSS_KB", 1)[1].split()[0])
    return wall, rss_kb * 1024


def folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.iterdir() if p.is_file())


NAIVE = """
import sys, torch, pesc
from transformers import AutoModelForCausalLM
dense = AutoModelForCausalLM.from_pretrained(sys.argv[1], dtype=torch.bfloat16)
model = pesc.upcycle(dense, seed=0)
model.save_pretrained(sys.argv[2], max_shard_size="5GB")
"""


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=22, help="decoder layers (22 = TinyLlama-1.1B shape)")
    parser.add_argument("--hidden", type=int, default=2048, help="hidden size (4096 with --intermediate 11008 "
                        "--heads 32 --kv-heads 32 --layers 32 = Llama-2-7B)")
    parser.add_argument("--intermediate", type=int, default=5632)
    parser.add_argument("--heads", type=int, default=32)
    parser.add_argument("--kv-heads", type=int, default=4)
    parser.add_argument("--shard-size", type=int, default=500_000_000, help="source shard size in bytes")
    parser.add_argument("--workdir", default="/tmp", help="where the temporary checkpoints go")
    parser.add_argument("--repeat", type=int, default=2, help="runs of cp / convert (best is reported)")
    parser.add_argument("--skip-naive", action="store_true")
    args = parser.parse_args()

    env_python = sys.executable
    shape = (args.hidden, args.intermediate, args.heads, args.kv_heads)
    work = Path(tempfile.mkdtemp(prefix="pesc-bench-convert-", dir=args.workdir))
    try:
        params = sum(torch.Size(s).numel() for g in llama_tensors(args.layers, *shape, 32000) for s in g.values())
        free = shutil.disk_usage(work).free
        needed = 2 * params * 2 * 2.6
        if free < needed:
            raise SystemExit(f"need about {needed / 1e9:.1f} GB free in {args.workdir}, have {free / 1e9:.1f} GB")
        src = work / "dense"
        params, nbytes = write_checkpoint(src, args.layers, args.shard_size, *shape)
        small = work / "dense-half"
        small_params, small_bytes = write_checkpoint(small, args.layers // 2, args.shard_size, *shape)
        for folder in (src, small):  # page-cache the sources so every command reads them from memory
            for path in folder.iterdir():
                with open(path, "rb") as handle:
                    while handle.read(1 << 26):
                        pass
        shards = len(list(src.glob("*.safetensors")))
        print(f"source: {params / 1e9:.2f}B parameters, bf16, {nbytes / 1e9:.2f} GB in {shards} shards ({src})")
        print(f"half-depth source: {small_params / 1e9:.2f}B parameters, {small_bytes / 1e9:.2f} GB")
        print(f"machine: {os.cpu_count()} CPUs, torch {torch.__version__}\n")

        pesc = [env_python, "-m", "pesc.cli", "convert"]
        runs = [
            ("python -c 'import pesc' (startup floor)", [env_python, "-c", "import pesc"], None, 1),
            ("cp -r", ["cp", "-r", str(src), str(work / "out")], work / "out", args.repeat),
            ("pesc convert", [*pesc, str(src), str(work / "out")], work / "out", args.repeat),
            ("pesc convert --link", [*pesc, str(src), str(work / "out"), "--link"], work / "out", args.repeat),
            ("pesc convert (half-depth model)", [*pesc, str(small), str(work / "out")], work / "out", 1),
        ]
        if not args.skip_naive:
            runs.append(("naive: from_pretrained+upcycle+save", [env_python, "-c", NAIVE, str(src), str(work / "out")],
                         work / "out", 1))  # fmt: skip
        results = {}
        for label, cmd, out, repeat in runs:
            best = None
            for _ in range(repeat):
                wall, rss = measure(cmd)
                written = folder_bytes(out) if out is not None and out.exists() else 0
                if out is not None:
                    shutil.rmtree(out, ignore_errors=True)
                if best is None or wall < best[0]:
                    best = (wall, max(rss, best[1] if best else 0), written)
                else:
                    best = (best[0], max(rss, best[1]), best[2])
            results[label] = best
            print(f"  measured {label}: {best[0]:.2f} s, {best[1] / 2**20:.0f} MiB", flush=True)

        cp_wall = results["cp -r"][0]
        conv_rss = results["pesc convert"][1]
        print()
        print(f"{'command':<40} {'wall s':>8} {'x cp -r':>8} {'peak RSS MiB':>13} {'x convert':>10} {'written GB':>11}")
        for label, (wall, rss, written) in results.items():
            print(f"{label:<40} {wall:8.2f} {wall / cp_wall:8.2f} {rss / 2**20:13.0f} {rss / conv_rss:10.2f} "
                  f"{written / 1e9:11.2f}")  # fmt: skip
        startup = results["python -c 'import pesc' (startup floor)"][0]
        conv = results["pesc convert"][0]
        print(f"\npesc convert minus interpreter startup: {conv - startup:.2f} s = {(conv - startup) / cp_wall:.2f} x cp -r")
        print(f"targets: peak RSS < 1 GiB: {'met' if conv_rss < 2**30 else 'MISSED'}; "
              f"time <= 1.3 x cp -r: {'met' if conv <= 1.3 * cp_wall else 'MISSED'} ({conv / cp_wall:.2f} x)")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
