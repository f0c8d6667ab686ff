"""vLLM serves every method's checkpoints through its Transformers backend (`vllm serve OUT --trust-remote-code`).

- Without vLLM: `AutoModel` of each method's checkpoint (remote code, pesc not importable) is the
  backbone whose last hidden state through the LM head is exactly the causal LM's logits, and it
  compiles as one graph for every token count (what vLLM traces).
- Greedy tokens: for tiny checkpoints of every method (PESC on Llama, Qwen2 and Mistral; MoV, MoLoRA,
  MoELoRA and LoRAMoE on Llama and Qwen2; head_dim 64, as vLLM's CPU attention needs; added tensors
  perturbed, so the experts change the output: the dense model's tokens differ), one process in
  the vLLM environment runs `LLM(...)` on each in turn, two prompts batched: the Llama and Mistral ones on
  the Transformers backend (`model_impl="transformers"`), every one on pesc's native vLLM model
  (`model_impl="vllm"`: the plugin's class, which the engine reports as its architecture); the tokens equal
  transformers generate here, prompt by prompt. pesc-llama and each new method's Qwen2 checkpoint have
  their first layer's added tensors in two shards, as a large export's shard boundary can put them (vLLM
  then loads that layer's experts in two calls). MoV on Llama has the official FFN site (`ffn_site`
  "activation"), on Qwen2 pesc 0.1.0's; the new methods' Qwen2 runs skip vLLM's compile (EAGER).
- MoV's native FFN site, both forms (`ffn_site` "activation", the official one, and "down_proj_input"), against
  a float64 reference written from the formula.
- Two tensor-parallel ranks (CPU, one core each): the native PESC model and LoRAMoE (FFN sites) give the
  same tokens; MoELoRA (attention sites) is refused with one line, where it gave wrong tokens before, and
  gives transformers' tokens on two pipeline stages; the other methods' native models refuse two ranks in one
  line.
- A real server: one `vllm serve` of a tiny trained PESC export (random non-zero LoRA merged,
  routers and adapters; vLLM picks the native model, the plugin being installed) on 127.0.0.1,
  stopped at the end of the module: greedy tokens of a completion equal transformers generate; a chat completion sent by the `openai` client (run in
  the vLLM environment, where it is installed) gives the text transformers generate gives for the
  chat template's prompt.
vLLM lives in .venv-vllm (scripts/setup_vllm.sh, which .ci/run runs): without it the vLLM tests skip
on a developer's machine and fail in CI.
"""

import json
import subprocess
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from pesc.export import export
from pesc.methods import register_auto_classes
from pesc.serving.vllm_server import get_json, vllm_environment, vllm_python, vllm_server
from pesc.testing import save_tiny_dense
from pesc.testing.isolated import run_without_pesc
from pesc.testing.perturbed import save_perturbed_checkpoint
from pesc.testing.trained_run import save_fake_trained_run

from helpers import SERVE_SHAPE, require_vllm

# head_dim 128 / 2 = 64: vLLM's CPU attention refuses head_dim 16 (the other tests' tiny shape)
NEW_TOKENS = 12
PROMPT_IDS = [17, 42, 99, 5, 130, 61, 8, 200]
PROMPTS = [PROMPT_IDS, [3, 9, 27]]  # batched together in vLLM: two lengths in one step
MESSAGES = [{"role": "user", "content": "What is two plus two?"}]
# (method, family, settings) of the checkpoints vLLM generates from; settings small, every method's defaults else
CHECKPOINTS = {
    "pesc-llama": ("pesc", "llama", {"num_experts": 4, "top_k": 2, "adapter_dim": 16}),
    "pesc-qwen2": ("pesc", "qwen2", {"num_experts": 4, "top_k": 2, "adapter_dim": 16}),
    "pesc-mistral": ("pesc", "mistral", {"num_experts": 4, "top_k": 2, "adapter_dim": 16}),
    "mov-llama": ("mov", "llama", {"num_experts": 3}),
    "molora-llama": ("molora", "llama", {"num_experts": 3, "expert_rank": 2}),
    "moelora-llama": ("moelora", "llama", {"num_experts": 4}),
    "loramoe-llama": ("loramoe", "llama", {"num_experts": 4}),
    # native only; sites other than the defaults: MoLoRA's top-k and a subset without k_proj and up_proj,
    # LoRAMoE's with attention linears
    "mov-qwen2": ("mov", "qwen2", {"num_experts": 3, "ffn_site": "down_proj_input"}),  # pesc 0.1.0's FFN form
    "molora-qwen2": ("molora", "qwen2", {"num_experts": 3, "expert_rank": 2, "top_k": 2,
                                         "sites": ["q_proj", "v_proj", "o_proj", "gate_proj", "down_proj"]}),
    "moelora-qwen2": ("moelora", "qwen2", {"num_experts": 4}),
    "loramoe-qwen2": ("loramoe", "qwen2", {"num_experts": 4, "sites": ["k_proj", "gate_proj", "up_proj", "down_proj"]}),
}
# run on vLLM's Transformers backend too
BACKEND = ("pesc-llama", "pesc-qwen2", "pesc-mistral", "mov-llama", "molora-llama", "moelora-llama", "loramoe-llama")
# the added tensors of their first layer in two shards
SPLIT = ("pesc-llama", "mov-qwen2", "molora-qwen2", "moelora-qwen2", "loramoe-qwen2")
# native runs without vLLM's compile (enforce_eager): each method's site modules are compiled in its Llama run, and
# the compile costs about 30 s an engine on 2 CPU cores (pesc-qwen2 stays compiled: PESC's Qwen2 layer)
EAGER = ("mov-qwen2", "molora-qwen2", "moelora-qwen2", "loramoe-qwen2")

OPENAI_CHAT = """
import json, sys
from openai import OpenAI
base_url, model, messages, max_tokens = sys.argv[1], sys.argv[2], json.loads(sys.argv[3]), int(sys.argv[4])
client = OpenAI(base_url=base_url + "/v1", api_key="unused")
answer = client.chat.completions.create(model=model, messages=messages, max_tokens=max_tokens, temperature=0,
                                        extra_body={"return_token_ids": True})
choice = answer.choices[0]
print(json.dumps({"text": choice.message.content, "token_ids": choice.model_extra["token_ids"]}))
"""

# native vLLM model classes (pesc.methods.<method>.vllm_model, registered by the plugin)
NATIVE_CLASS = {"pesc": "PescForCausalLM", "mov": "MoVForCausalLM", "molora": "MoLoRAForCausalLM",
                "moelora": "MoELoraForCausalLM", "loramoe": "LoramoeForCausalLM"}

# One process, one engine per run in turn (importing vLLM once): greedy tokens of every prompt, EOS ignored, and
# the architecture vLLM resolved. model_impl "transformers": the Transformers backend; "vllm": a native model (an
# error if none is registered).
VLLM_GREEDY = """
import json, sys
from vllm import LLM, SamplingParams
spec = json.loads(sys.argv[1])
results = {}
for name, folder, model_impl, eager in spec["runs"]:
    llm = LLM(folder, trust_remote_code=True, dtype="float32", max_model_len=256, kv_cache_memory_bytes=64 << 20,
              model_impl=model_impl, enforce_eager=eager)
    params = SamplingParams(max_tokens=spec["new_tokens"], temperature=0, ignore_eos=True)
    outputs = llm.generate([{"prompt_token_ids": ids} for ids in spec["prompts"]], params, use_tqdm=False)
    results[name] = {"tokens": [list(output.outputs[0].token_ids) for output in outputs],
                     "architecture": llm.llm_engine.model_config.architecture}
    del llm
print("@@vllm-greedy@@" + json.dumps(results), flush=True)
"""


def _transformers_greedy(folder, input_ids: list[int], ignore_eos: bool = False) -> list[int]:
    register_auto_classes()  # what pesc's commands do before they load; this file may run before any of them
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    if ignore_eos:
        model.generation_config.eos_token_id = None
    ids = torch.tensor([input_ids])
    with torch.no_grad():
        generated = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=NEW_TOKENS,
                                   do_sample=False)
    return generated[0, ids.shape[1]:].tolist()


def split_layer_experts_across_shards(folder: Path, method: str, layer: int = 0) -> None:
    """Move the second half (by name) of one layer's added tensors into a shard of their own, listed last, as a
    large export's shard boundary can fall: the native model's load_weights then gets that layer's experts in two
    calls (for PESC: experts 2 and 3 and the router after experts 0 and 1; for the sites on one of vLLM's fused
    linears: some sites' tensors, or some of a site's, after the others)."""
    from pesc.methods import METHODS

    index_path = folder / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    prefix = f"model.layers.{layer}."
    names = sorted(n for n in index["weight_map"] if n.startswith(prefix) and METHODS[method].is_added(n))
    moved = names[len(names) // 2:]
    source = folder / index["weight_map"][moved[0]]
    tensors = load_file(source)
    save_file({n: tensors.pop(n) for n in moved}, folder / "model-zz-split-experts.safetensors", metadata={"format": "pt"})
    save_file(tensors, source, metadata={"format": "pt"})
    index["weight_map"].update({n: "model-zz-split-experts.safetensors" for n in moved})
    index_path.write_text(json.dumps(index, indent=2))


def vllm_test_environment() -> dict:
    """vLLM's environment, importing the pesc under test (its plugin and native models), whichever checkout the
    vLLM environment has installed."""
    import pesc

    return dict(vllm_environment(), PYTHONPATH=str(Path(pesc.__file__).resolve().parents[1]))


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """{name: (checkpoint folder, its dense model's folder)} for every entry of CHECKPOINTS; those in SPLIT have
    their first layer's added tensors in two shards."""
    root = tmp_path_factory.mktemp("vllm-checkpoints")
    dense = {family: save_tiny_dense(root / f"dense-{family}", family, **SERVE_SHAPE)
             for family in {family for _, family, _ in CHECKPOINTS.values()}}
    made = {name: (save_perturbed_checkpoint(dense[family], root / name, method, scale=0.5, **settings), dense[family])
            for name, (method, family, settings) in CHECKPOINTS.items()}
    for name in SPLIT:
        split_layer_experts_across_shards(made[name][0], CHECKPOINTS[name][0])
    return made


@pytest.fixture(scope="module")
def vllm_greedy(checkpoints, tmp_path_factory):
    """{run: {"tokens": greedy tokens of each prompt, "architecture": the one vLLM resolved}} from vLLM, the BACKEND
    checkpoints through the Transformers backend (run: the name) and every one through pesc's native model (run:
    name + "+native"), in turn in one process."""
    require_vllm()
    runs = [(name, str(checkpoints[name][0]), "transformers", False) for name in BACKEND]
    runs += [(name + "+native", str(folder), "vllm", name in EAGER) for name, (folder, _) in checkpoints.items()]
    spec = {"runs": runs, "prompts": PROMPTS, "new_tokens": NEW_TOKENS}
    log = tmp_path_factory.mktemp("vllm-greedy") / "vllm.log"
    with open(log, "w") as output:
        completed = subprocess.run([str(vllm_python()), "-c", VLLM_GREEDY, json.dumps(spec)], stdout=subprocess.PIPE,
                                   stderr=output, text=True, timeout=1800, env=vllm_test_environment())
    assert completed.returncode == 0, log.read_text()[-5000:]
    return json.loads(completed.stdout.rpartition("@@vllm-greedy@@")[2])


@pytest.fixture(scope="module")
def reference_greedy(checkpoints):
    """{name: (transformers greedy tokens of each prompt, the dense model's)}, EOS ignored."""
    return {name: tuple([_transformers_greedy(model, prompt, ignore_eos=True) for prompt in PROMPTS]
                        for model in (folder, dense))
            for name, (folder, dense) in checkpoints.items()}


@pytest.mark.parametrize("name", BACKEND)
def test_vllm_greedy_tokens_equal_transformers(name, reference_greedy, vllm_greedy):
    expected, dense = reference_greedy[name]
    # the experts act: a vLLM that ran the dense model (experts dropped or never called) would fail below
    assert expected != dense
    tokens = vllm_greedy[name]["tokens"]
    assert tokens == expected, f"{name}: vLLM greedy {tokens} != transformers {expected}"
    assert vllm_greedy[name]["architecture"].startswith("Transformers"), vllm_greedy[name]["architecture"]


@pytest.mark.parametrize("name", list(CHECKPOINTS))
def test_native_vllm_model_greedy_tokens_equal_transformers(name, reference_greedy, vllm_greedy):
    """pesc's native vLLM model of the checkpoint's method (vLLM's own decoder layers, stacked experts)."""
    expected, dense = reference_greedy[name]
    assert expected != dense  # the experts act
    native = vllm_greedy[name + "+native"]
    assert native["architecture"] == NATIVE_CLASS[CHECKPOINTS[name][0]]
    assert native["tokens"] == expected, f"{name}: native vLLM greedy {native['tokens']} != transformers {expected}"


# MoV's native FFN site in both forms against float64 from the formula (official MLP block: a = act(gate x),
# p = softmax(R r) with r = a ("activation") or a * up(x) ("down_proj_input"), y = a * (sum_e p_e l_e) * up(x)).
MOV_FFN_FORMS = """
import json
import torch
import torch.nn.functional as F
from pesc.methods.mov.vllm_model import MoVFeedForwardScaling
generator = torch.Generator().manual_seed(0)
width, experts, tokens = 32, 3, 6
gate_up = torch.randn(tokens, 2 * width, generator=generator)
router = torch.randn(experts, width, generator=generator)
vectors = 1 + 0.5 * torch.randn(1, experts, width, generator=generator)
errors = {}
for form, site_name in (("activation", "act_fn"), ("down_proj_input", "down_proj")):
    site = MoVFeedForwardScaling(width, experts, routes_on_activation=form == "activation")
    site.load_weights([(f"mov_{site_name}.router.weight", router), (f"mov_{site_name}.vectors", vectors)])
    gate, up = gate_up.double().chunk(2, dim=-1)
    activation = gate * torch.sigmoid(gate)
    routed = activation if form == "activation" else activation * up
    merged = torch.softmax(routed @ router.double().t(), dim=-1) @ vectors[0].double()
    expected = activation * merged * up
    errors[form] = ((site(gate_up).double() - expected).abs().max() / expected.abs().max()).item()
print("@@errors@@" + json.dumps(errors))
"""


def _errors_in_vllm(script: str) -> dict:
    """Run `script` in vLLM's environment; the dict it prints after `@@errors@@`."""
    require_vllm()
    completed = subprocess.run([str(vllm_python()), "-c", script], capture_output=True, text=True, timeout=300,
                               env=vllm_test_environment())
    assert completed.returncode == 0, completed.stderr[-3000:]
    return json.loads(completed.stdout.rpartition("@@errors@@")[2])


def test_native_mov_ffn_site_both_forms_equal_float64():
    errors = _errors_in_vllm(MOV_FFN_FORMS)
    # float32 against float64: each output is a few float32 roundings (silu, products, a 3-term softmax, a
    # 3-term merge, a 32-term router dot product): well under 1e-5 of the largest output; the other form's
    # routing differs by O(0.1)
    assert errors == {form: pytest.approx(0, abs=1e-5) for form in ("activation", "down_proj_input")}, errors


PESC_EXPERT_PATHS = """
import json
import torch
import torch.nn.functional as F
from types import SimpleNamespace
from pesc.methods.pesc import vllm_cpu_experts
from pesc.methods.pesc.vllm_model import PescExperts
generator = torch.Generator().manual_seed(0)
hidden, experts, width, top_k, scaling, tokens = 96, 5, 20, 2, 0.7, 7  # width 20: the kernel pads it to 32
config = SimpleNamespace(hidden_size=hidden, num_experts=experts, adapter_dim=width, num_experts_per_tok=top_k,
                         moe_scaling=scaling)
router = torch.randn(experts, hidden, generator=generator)
down = [torch.randn(width, hidden, generator=generator) / hidden**0.5 for _ in range(experts)]
up = [torch.randn(hidden, width, generator=generator) / width**0.5 for _ in range(experts)]
router_input, ffn_output = torch.randn(2, tokens, hidden, generator=generator)
tensors = [(f"experts.expert_{e}.adapter_{part}.weight", (down if part == "down" else up)[e])
           for e in range(experts) for part in ("down", "up")] + [("router.weight", router)]
# the paper's formula per token in float64, every expert separately
x, f = router_input.double(), ffn_output.double()
expected = f.clone()
for t in range(tokens):
    top = torch.topk(x[t] @ router.double().t(), top_k)
    for w, e in zip(torch.softmax(top.values, -1), top.indices.tolist()):
        expected[t] += w * scaling * (up[e].double() @ F.gelu(down[e].double() @ f[t]))
mixture = (expected - f).abs().max()
errors = {}
for path in ("kernel", "stacked"):
    if path == "stacked":
        vllm_cpu_experts.supports = lambda *args: False
    module = PescExperts(config)
    module.load_weights(tensors[: len(tensors) // 2])  # one layer's experts over two calls, as over two shards
    module.load_weights(tensors[len(tensors) // 2:])
    assert module.uses_kernel == (path == "kernel"), path
    errors[path] = ((module(router_input, ffn_output).double() - expected).abs().max() / mixture).item()
print("@@errors@@" + json.dumps(errors))
"""


def test_native_pesc_experts_on_the_cpu_kernel_and_stacked_equal_float64():
    """Both of the native PESC model's expert paths (vLLM's CPU MoE kernel, top-k only; every expert stacked, the
    CUDA path) against the formula per token in float64, on a padded adapter width and a scaling other than 1."""
    errors = _errors_in_vllm(PESC_EXPERT_PATHS)
    # float32 against float64, relative to the experts' largest contribution: a 96-term and a 20-term dot product,
    # erf GELU, a 2-term softmax and sum, each a few float32 roundings (~1e-7 relative): under 1e-5; a tanh GELU
    # is off by ~1e-3, a wrong expert or weight by O(1)
    assert errors == {path: pytest.approx(0, abs=1e-5) for path in ("kernel", "stacked")}, errors


# Two tensor- or pipeline-parallel ranks (one core each) on one prompt: greedy tokens, or the error that stopped
# the engine.
VLLM_TWO_RANKS = """
import json, sys
from vllm import LLM, SamplingParams
if __name__ == "__main__":
    folder, model_impl, prompt, new_tokens = sys.argv[1], sys.argv[2], json.loads(sys.argv[3]), int(sys.argv[4])
    parallel = {sys.argv[5] + "_parallel_size": 2}
    llm = LLM(folder, trust_remote_code=True, dtype="float32", max_model_len=256, kv_cache_memory_bytes=64 << 20,
              model_impl=model_impl, distributed_executor_backend="mp", **parallel)
    params = SamplingParams(max_tokens=new_tokens, temperature=0, ignore_eos=True)
    output = llm.generate([{"prompt_token_ids": prompt}], params, use_tqdm=False)[0]
    print("@@tokens@@" + json.dumps(list(output.outputs[0].token_ids)), flush=True)
"""


def _two_ranks(folder, model_impl: str, tmp_path, parallel: str = "tensor") -> tuple[int, str]:
    script = tmp_path / "two_ranks.py"  # a file: vLLM's worker processes re-import the main module
    script.write_text(VLLM_TWO_RANKS)
    env = dict(vllm_test_environment(), VLLM_CPU_OMP_THREADS_BIND="0|1", CUDA_VISIBLE_DEVICES="")
    completed = subprocess.run([str(vllm_python()), str(script), str(folder), model_impl, json.dumps(PROMPT_IDS),
                                str(NEW_TOKENS), parallel], capture_output=True, text=True, timeout=900, env=env,
                               cwd=tmp_path)  # fmt: skip
    return completed.returncode, completed.stdout + completed.stderr


def _tokens(output: str) -> list[int]:
    return json.loads(output.rpartition("@@tokens@@")[2].splitlines()[0])


@pytest.mark.parametrize("name, model_impl", [("pesc-llama", "vllm"), ("loramoe-llama", "transformers")])
def test_two_tensor_parallel_ranks_give_the_same_tokens(name, model_impl, checkpoints, reference_greedy, tmp_path):
    """The native model's experts replicated over vLLM's sharded Llama; LoRAMoE's FFN sites (hooked linears
    whole) beside vLLM's sharded attention."""
    require_vllm()
    code, output = _two_ranks(checkpoints[name][0], model_impl, tmp_path)
    assert code == 0, output[-5000:]
    assert _tokens(output) == reference_greedy[name][0][0]


def test_attention_sites_refuse_two_tensor_parallel_ranks_and_run_on_two_pipeline_stages(
        checkpoints, reference_greedy, tmp_path):  # fmt: skip
    """MoELoRA's q/v sites: vLLM would split the heads while the hooked linears stay whole (wrong tokens, no
    error, before the check); the shipped code stops the engine with a line naming the fix. Pipeline stages
    keep whole layers: the same checkpoint runs there, with transformers' tokens."""
    require_vllm()
    folder = checkpoints["moelora-llama"][0]
    code, output = _two_ranks(folder, "transformers", tmp_path, "pipeline")
    assert code == 0, output[-5000:]
    assert _tokens(output) == reference_greedy["moelora-llama"][0][0]
    code, output = _two_ranks(folder, "transformers", tmp_path)
    assert code != 0 and "@@tokens@@" not in output
    assert ("sites act on attention linears (q_proj, v_proj), which vLLM cannot split across 2 tensor-parallel "
            "ranks: serve it with tensor_parallel_size=1") in output


def test_native_models_of_the_lora_and_vector_methods_refuse_two_tensor_parallel_ranks(checkpoints, tmp_path):
    """Their routers read whole inputs (q/k/v, gate/up, down's) that vLLM would split across ranks: one line naming
    the fix (LoRAMoE's default FFN sites run on two ranks on the Transformers backend, above)."""
    require_vllm()
    code, output = _two_ranks(checkpoints["loramoe-llama"][0], "vllm", tmp_path)
    assert code != 0 and "@@tokens@@" not in output
    assert ("pesc's native vLLM model for LoRAMoE runs on one tensor-parallel rank, not 2: serve it with "
            "tensor_parallel_size=1") in output


DUMMY_LOAD = """
import json, sys
from vllm import LLM
try:
    LLM(sys.argv[1], trust_remote_code=True, dtype="float32", max_model_len=256, kv_cache_memory_bytes=64 << 20,
        load_format="dummy")
    error = None
except Exception as raised:
    error = str(raised)
print("@@errors@@" + json.dumps({"error": error}))
"""


def test_native_lora_expert_models_refuse_dummy_weights(checkpoints):
    """Their B matrices are folded into vLLM's linears as the checkpoint loads; random weights skip the loading,
    and would leave the linears unfolded: one line naming the fix instead of a shape error mid-forward."""
    require_vllm()
    completed = subprocess.run([str(vllm_python()), "-c", DUMMY_LOAD, str(checkpoints["molora-llama"][0])],
                               capture_output=True, text=True, timeout=300, env=vllm_test_environment())
    error = json.loads(completed.stdout.rpartition("@@errors@@")[2])["error"]
    assert error == ("pesc's native vLLM models of the LoRA-expert methods fold the experts into vLLM's linears as "
                     "they load the checkpoint: serve it without --load-format dummy"), completed.stderr[-3000:]


def test_every_method_has_a_vllm_checkpoint_and_a_native_model():
    from pesc.methods import METHODS

    assert {method for method, _, _ in CHECKPOINTS.values()} == set(METHODS)
    assert {name: method.vllm_model.rsplit(":", 1)[1] for name, method in METHODS.items()} == NATIVE_CLASS
    for family in ("llama", "qwen2"):  # every method's native model is tested on both families
        assert {method for method, f, _ in CHECKPOINTS.values() if f == family} == set(METHODS), family


# (parent in the decoder layer, linear) that each method's default sites include (PESC: a linear it leaves alone)
SITED = {"pesc": ("mlp", "gate_proj"), "mov": ("self_attn", "k_proj"), "molora": ("self_attn", "q_proj"),
         "moelora": ("self_attn", "v_proj"), "loramoe": ("mlp", "up_proj")}


@pytest.fixture(scope="module")
def small_checkpoints(tiny_llama_dir, tmp_path_factory):
    """{method: folder}: every method's tiny (head_dim 16) checkpoint, added tensors perturbed."""
    from pesc.methods import METHODS

    root = tmp_path_factory.mktemp("automodel")
    return {method: save_perturbed_checkpoint(tiny_llama_dir, root / method, method, scale=0.5) for method in METHODS}


def test_automodel_is_the_backbone_and_compiles_for_every_shape(small_checkpoints):
    """What vLLM's Transformers backend asks of the shipped code, checked without vLLM (loaded as remote code)."""
    result = run_without_pesc(f"""
import torch
from transformers import AutoModel, AutoModelForCausalLM
ids = torch.tensor([{PROMPT_IDS!r}])
results = {{}}
for method, folder in {({m: str(f) for m, f in small_checkpoints.items()})!r}.items():
    model = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True).eval()
    backbone = AutoModel.from_pretrained(folder, trust_remote_code=True).eval()
    with torch.no_grad():
        logits = model(input_ids=ids).logits
        from_backbone = model.lm_head(backbone(input_ids=ids).last_hidden_state)
        compiled = torch.compile(backbone, backend="eager", dynamic=True, fullgraph=True)
        compiled_logits = model.lm_head(compiled(input_ids=ids, use_cache=False).last_hidden_state)
    layer = backbone.layers[0]
    results[method] = {{
        "equal": torch.equal(logits, from_backbone), "compiled": (compiled_logits - logits).abs().max().item(),
        "layer_module": type(layer.mlp).__module__ if method == "pesc" else type(layer).__module__,
        "supports_backend": type(backbone)._supports_attention_backend,
        "sited_linear": type(getattr(getattr(layer, {SITED!r}[method][0]), {SITED!r}[method][1])).__name__,
        "experts_per_token": backbone.config.num_experts_per_tok, "num_experts": backbone.config.num_experts,
    }}
    if method == "pesc":
        results[method]["experts"] = type(layer.mlp.moe_adapter.experts).__name__
emit(results)
""")
    for method, found in result.items():
        assert found["equal"], f"{method}: AutoModel's last hidden state through the LM head is not the logits"
        # one graph for every token count, as vLLM traces it (fullgraph: a host sync or a data-dependent shape
        # fails); 1e-5: the compiled routing runs every expert, the eager one each expert on its own rows
        assert found["compiled"] <= 1e-5, (method, found["compiled"])
        assert found["supports_backend"], method
    assert result["pesc"]["layer_module"].startswith("transformers_modules."), result["pesc"]["layer_module"]
    # ModuleDict: vLLM's MoE wrapper replaces a ModuleList called `experts` by its FusedMoE
    assert result["pesc"]["experts"] == "ModuleDict"
    # a linear a site hooks is an UnmergedLinear (nn.Linear would let vLLM merge q/k/v and gate/up away from under
    # the hook); PESC hooks none
    assert {method: found["sited_linear"] for method, found in result.items()} == {
        method: "Linear" if method == "pesc" else "UnmergedLinear" for method in result}
    # the top-k under the name vLLM reads (its MoE wrapper asserts it): every expert for the dense routers
    assert result["pesc"]["experts_per_token"] == 2 and result["moelora"]["experts_per_token"] == 2
    for method in ("mov", "molora", "loramoe"):
        assert result[method]["experts_per_token"] == result[method]["num_experts"], method


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """(export folder, server base URL): a tiny trained PESC export served by `vllm serve`."""
    require_vllm()
    root = tmp_path_factory.mktemp("serve")
    dense = save_tiny_dense(root / "dense", "llama", **SERVE_SHAPE)
    run = root / "run"
    save_fake_trained_run(run, dense)
    out = root / "export"
    export(run, out, dtype="float32", log=lambda message: None)
    log = root / "vllm-serve.log"
    with vllm_server(out, "--dtype", "float32", "--max-model-len", "256", "--served-model-name", "pesc",
                     log_path=log) as base_url:
        yield out, base_url


def test_served_completion_tokens_equal_transformers(served):
    out, base_url = served
    expected = _transformers_greedy(out, PROMPT_IDS)
    answer = get_json(f"{base_url}/v1/completions", {
        "model": "pesc", "prompt": PROMPT_IDS, "max_tokens": NEW_TOKENS, "temperature": 0,
        "return_token_ids": True,
    })
    tokens = answer["choices"][0]["token_ids"]
    assert len(expected) >= 4, "the reference stopped at once: the comparison would say little"
    assert tokens == expected, f"vLLM served greedy {tokens} != transformers {expected}"


def test_openai_chat_completion_equals_transformers(served):
    out, base_url = served
    tokenizer = AutoTokenizer.from_pretrained(out)
    prompt = tokenizer.apply_chat_template(MESSAGES, add_generation_prompt=True, tokenize=True, return_dict=False)
    expected_ids = _transformers_greedy(out, list(prompt))
    expected = tokenizer.decode(expected_ids, skip_special_tokens=True)
    completed = subprocess.run(
        [str(vllm_python()), "-c", OPENAI_CHAT, base_url, "pesc", json.dumps(MESSAGES), str(NEW_TOKENS)],
        capture_output=True, text=True, timeout=300, env=vllm_environment(),
    )
    assert completed.returncode == 0, completed.stderr[-3000:]
    answer = json.loads(completed.stdout.strip().splitlines()[-1])
    assert answer["token_ids"] == expected_ids, f"vLLM chat tokens {answer['token_ids']} != {expected_ids}"
    if "\ufffd" not in expected:
        # Text too, where the tokens decode to whole characters: a random model may emit bytes of a split
        # character, which transformers decodes as U+FFFD and vLLM's incremental detokenizer holds back.
        assert expected.strip(), "the reference generated no text: the comparison would say little"
        assert answer["text"] == expected, f"vLLM chat {answer['text']!r} != transformers {expected!r}"
