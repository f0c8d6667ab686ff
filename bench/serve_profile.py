"""Where a decode step's time goes, each method's native vLLM model beside the dense base: vLLM's torch profiler
over one greedy request, split into the GEMMs (count and time), attention, the compiled graph's other work
(inductor's fused kernels and the graph's own per-op cost) and what runs outside the graph (scheduling, sampling,
pre-graph bytecode). bench/serve.py says how fast; this says why.

The models are bench/serve.py's (synthetic, or --dense and --checkpoint as there). Each is loaded in turn by
`vllm.LLM` in .venv-vllm (one process per model), warmed up, then profiled on one request of --new-tokens tokens
at batch 1; the figures are per decode step (medians; the prefill step left out).

    python bench/serve_profile.py --dense runs/quickstart/dense --methods molora
    python bench/serve_profile.py --methods pesc loramoe molora moelora mov
"""

import argparse
import gzip
import json
import statistics
import subprocess
import sys
import tempfile
from collections import defaultdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from generate import add_model_arguments  # noqa: E402
from serve import build_checkpoints, method_checkpoint  # noqa: E402  (the same models as bench/serve.py)

from pesc.serving.vllm_server import vllm_environment, vllm_python  # noqa: E402

PROFILED = """
import json, sys
from vllm import LLM, SamplingParams
folder, trace_dir, new_tokens, prompt_len = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
llm = LLM(folder, dtype="float32", max_model_len=prompt_len + new_tokens + 8, max_num_seqs=1, trust_remote_code=True,
          kv_cache_memory_bytes=1 << 29, seed=0,
          profiler_config={"profiler": "torch", "torch_profiler_dir": trace_dir, "torch_profiler_with_stack": False})
prompt = {"prompt_token_ids": [(13 * i) % 200 + 10 for i in range(prompt_len)]}
params = SamplingParams(max_tokens=new_tokens, temperature=0, ignore_eos=True)
llm.generate([prompt], params, use_tqdm=False)
llm.start_profile()
llm.generate([prompt], params, use_tqdm=False)
llm.stop_profile()
"""

GEMMS = {"_C::onednn_mm", "aten::mm", "aten::addmm"}  # vLLM's CPU GEMM; aten's elsewhere (none nests another)
ATTENTION = {"vllm::unified_attention_with_output", "vllm::unified_kv_cache_update"}
GRAPH = "## Call CompiledFxGraph"  # the compiled graph's call, named "## Call CompiledFxGraph <hash> ##"
DECODE_STEP = "_generation_1(1)"  # vLLM's name for a step of one decoding request and no prefill


def profile(folder: Path, trace_dir: Path, args) -> list[dict]:
    """The profiled events of a run on `folder`: complete ('X') events of the worker's trace."""
    command = [str(vllm_python()), "-c", PROFILED, str(folder), str(trace_dir), str(args.new_tokens),
               str(args.prompt_len)]
    completed = subprocess.run(command, capture_output=True, text=True, env=vllm_environment(), check=False)
    traces = sorted(trace_dir.glob("*.pt.trace.json*"))
    if completed.returncode != 0 or not traces:
        raise RuntimeError(f"profiling {folder} failed:\n{completed.stderr[-3000:]}")
    opener = gzip.open if traces[-1].suffix == ".gz" else open
    with opener(traces[-1], "rt") as trace:
        return [event for event in json.load(trace)["traceEvents"] if event.get("ph") == "X"]


def step_breakdown(events: list[dict]) -> dict:
    """Medians over decode steps, in ms (and the GEMM count): every event inside a step, by what it is."""
    steps = sorted((event for event in events if DECODE_STEP in event["name"]), key=lambda event: event["ts"])
    if not steps:
        raise RuntimeError("no decode step in the trace")
    per_step = defaultdict(list)
    inside = [event for event in events if event["name"] in GEMMS | ATTENTION or event["name"].startswith(GRAPH)]
    for step in steps:
        start, end = step["ts"], step["ts"] + step["dur"]
        own = [event for event in inside if start <= event["ts"] < end]
        gemms = [event for event in own if event["name"] in GEMMS]
        attention = [event for event in own if event["name"] in ATTENTION]
        graphs = [event for event in own if event["name"].startswith(GRAPH)]
        in_graph = sum(event["dur"] for event in gemms + attention if any(
            graph["ts"] <= event["ts"] < graph["ts"] + graph["dur"] for graph in graphs))
        graph = sum(event["dur"] for event in graphs)
        gemm, attention = (sum(event["dur"] for event in group) for group in (gemms, attention))
        # the four parts add up to the step: the logits' GEMM runs outside the graph, counted under "gemm"
        for key, value in (("step", step["dur"]), ("gemm", gemm), ("attention", attention),
                           ("graph other", graph - in_graph),
                           ("outside graph", step["dur"] - graph - (gemm + attention - in_graph))):
            per_step[key].append(value / 1000)
        per_step["gemm calls"].append(len(gemms))
    return {key: statistics.median(values) for key, values in per_step.items()}


def main(argv=None):
    from pesc.methods import METHODS

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_arguments(parser)
    parser.add_argument("--dense", default=None, help="profile this dense checkpoint instead of the synthetic one")
    parser.add_argument("--checkpoint", type=method_checkpoint, action="append", default=[], metavar="METHOD=DIR")
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    parser.add_argument("--prompt-len", type=int, default=32)
    parser.add_argument("--new-tokens", type=int, default=64)
    args = parser.parse_args(argv)
    if vllm_python() is None:
        sys.exit("no vLLM environment: run scripts/setup_vllm.sh")

    columns = ("step", "gemm", "gemm calls", "attention", "graph other", "outside graph")
    print(f"per decode step, batch 1, median over {args.new_tokens - 1} steps (ms; gemm calls a count)")
    print(f"{'model':>8} " + " ".join(f"{column:>13}" for column in columns) + f" {'/ dense':>8}")
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        folders = build_checkpoints(args, workdir)
        dense_step = None
        for name in ["dense", *args.methods]:
            breakdown = step_breakdown(profile(folders[name], workdir / f"trace-{name}", args))
            dense_step = dense_step or breakdown["step"]
            print(f"{name:>8} " + " ".join(f"{breakdown[column]:>13.2f}" if column != "gemm calls" else
                                           f"{breakdown[column]:>13.0f}" for column in columns)
                  + f" {dense_step / breakdown['step']:>8.3f}", flush=True)


if __name__ == "__main__":
    main()
