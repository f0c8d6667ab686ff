"""One QLoRA training step (forward, backward, optimizer) of an upcycled PESC model vs the same dense model
with the same LoRA, on the same tokens; prints time and peak-memory ratios.

    python bench/train_step.py                      # a ~100M-parameter llama shape, CPU or GPU
    python bench/train_step.py --hidden 4096 --intermediate 11008 --layers 4 --adapter-dim 512

Each variant runs in its own process (clean peak memory). Memory: CUDA `max_memory_allocated` over the
step; on the CPU the process RSS sampled every millisecond during the step, minus the RSS before it.
Targets (issue 4): time <= 1.25x the dense step; peak <= 1.1x the dense step's + the experts' own
weights, gradients and AdamW state (fp32: 4 + 4 + 8 bytes a parameter).
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class PeakRSS:
    def __enter__(self):
        self.base, self.peak, self._stop = _rss(), _rss(), False
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def _run(self):
        while not self._stop:
            self.peak = max(self.peak, _rss())
            time.sleep(0.001)

    def __exit__(self, *exc):
        self._stop = True
        self._thread.join()
        self.peak = max(self.peak, _rss())


def run_variant(args) -> dict:
    import torch

    from pesc.training.config import validate
    from pesc.training.model import load_base_model, prepare_for_training

    torch.manual_seed(0)
    config = validate({
        "base_model": args.model_dir, "datasets": [{"path": "unused.jsonl", "type": "messages"}], "output_dir": "unused",
        "moe": {"num_experts": args.experts, "top_k": args.top_k, "adapter_dim": args.adapter_dim} if args.variant == "pesc" else None,
        "load_in_4bit": not args.no_4bit, "lora_r": 64, "lora_alpha": 16, "lora_dropout": 0.1,
        "gradient_checkpointing": True, "torch_dtype": "bfloat16",
    })
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.variant == "pesc":
        model = prepare_for_training(load_base_model(config), config)
    else:  # the same dense model, the same 4-bit load, the same LoRA and checkpointing
        from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
        from transformers import AutoModelForCausalLM

        from pesc.training.model import quantization_config

        kwargs = {"dtype": torch.bfloat16}
        if not args.no_4bit:
            kwargs["quantization_config"] = quantization_config(config)
        model = AutoModelForCausalLM.from_pretrained(args.model_dir, **kwargs)
        model.config.use_cache = False
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=True,
                                                gradient_checkpointing_kwargs={"use_reentrant": False})
        model = get_peft_model(model, LoraConfig(r=64, lora_alpha=16, lora_dropout=0.1, task_type="CAUSAL_LM",
                                                 target_modules=config["lora_target_modules"]))
    model.to(device).train()
    params = [p for p in model.parameters() if p.requires_grad]
    expert_params = sum(p.numel() for n, p in model.named_parameters() if p.requires_grad and ".moe_adapter." in n)
    optimizer = torch.optim.AdamW(params, lr=1e-4)
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, args.vocab, (args.batch, args.seq), generator=gen).to(device)

    def step():
        out = model(input_ids=ids, labels=ids)
        out.loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    autocast = torch.autocast(device, dtype=torch.bfloat16)
    with autocast:
        step()  # warm-up: optimizer state exists from here on, as in any later step
    times = []
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    with PeakRSS() as rss:
        for _ in range(args.steps):
            start = time.perf_counter()
            with autocast:
                step()
            if device == "cuda":
                torch.cuda.synchronize()
            times.append(time.perf_counter() - start)
    if device == "cuda":
        peak, step_peak = torch.cuda.max_memory_allocated(), torch.cuda.max_memory_allocated() - base
        total = torch.cuda.max_memory_allocated()
    else:
        peak, step_peak, total = rss.peak, rss.peak - rss.base, rss.peak
    return {"variant": args.variant, "device": device, "step_s": statistics.median(times), "times": times,
            "peak_bytes": total, "step_peak_bytes": step_peak, "expert_params": expert_params}


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--intermediate", type=int, default=2816)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--heads", type=int, default=16)
    parser.add_argument("--vocab", type=int, default=8192)
    parser.add_argument("--experts", type=int, default=8)
    parser.add_argument("--top-k", type=int, default=2)
    parser.add_argument("--adapter-dim", type=int, default=128, help="paper: hidden/8 (512 for 4096)")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--no-4bit", action="store_true")
    parser.add_argument("--variant", choices=["dense", "pesc"], help=argparse.SUPPRESS)
    parser.add_argument("--model-dir", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.variant:
        print("RESULT " + json.dumps(run_variant(args)))
        return

    from transformers import AutoConfig, AutoModelForCausalLM

    with tempfile.TemporaryDirectory() as tmp:
        import torch

        config = AutoConfig.for_model("llama", hidden_size=args.hidden, intermediate_size=args.intermediate,
                                      num_hidden_layers=args.layers, num_attention_heads=args.heads,
                                      num_key_value_heads=args.heads, vocab_size=args.vocab)
        torch.manual_seed(0)
        AutoModelForCausalLM.from_config(config).to(torch.bfloat16).save_pretrained(tmp)
        results = {}
        for variant in ("dense", "pesc"):
            cmd = [sys.executable, __file__, "--variant", variant, "--model-dir", tmp, *sys.argv[1:]]
            out = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
            line = [l for l in out.stdout.splitlines() if l.startswith("RESULT ")]
            if out.returncode or not line:
                sys.exit(f"{variant} failed:\n{out.stderr[-4000:]}")
            results[variant] = json.loads(line[0][7:])
    dense, pesc = results["dense"], results["pesc"]
    expert_bytes = pesc["expert_params"] * (4 + 4 + 8)
    mib = 2**20
    time_ratio = pesc["step_s"] / dense["step_s"]
    print(f"device: {pesc['device']}; shape: hidden {args.hidden}, ffn {args.intermediate}, {args.layers} layers; "
          f"{args.experts} experts top-{args.top_k}, adapter {args.adapter_dim}; {args.batch}x{args.seq} tokens; "
          f"{'bf16 base' if args.no_4bit else '4-bit NF4 base'}; LoRA r64 on q,k,v,o,gate,up,down")
    print(f"step time   dense {dense['step_s']:.3f}s  pesc {pesc['step_s']:.3f}s  ratio {time_ratio:.3f}  (target <= 1.25)")
    for key, label in (("step_peak_bytes", "step peak"), ("peak_bytes", "total peak")):
        budget = 1.1 * dense[key] + expert_bytes
        print(f"{label:11} dense {dense[key] / mib:.1f} MiB  pesc {pesc[key] / mib:.1f} MiB  ratio "
              f"{pesc[key] / max(dense[key], 1):.3f}  budget 1.1x dense + experts' weights/grads/AdamW "
              f"({expert_bytes / mib:.1f} MiB) = {budget / mib:.1f} MiB -> {'ok' if pesc[key] <= budget else 'OVER'}")
    print(f"time target {'ok' if time_ratio <= 1.25 else 'MISSED'}")


if __name__ == "__main__":
    main()
