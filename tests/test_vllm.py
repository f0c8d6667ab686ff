"""vLLM serves pesc exports through its Transformers backend (`vllm serve OUT --trust-remote-code`).

For a Llama and a Qwen2 tiny PESC export (head_dim 64, as vLLM's CPU attention needs; random
non-zero LoRA merged, routers and adapters), one real `vllm serve` per model on 127.0.0.1,
shared by the tests below and stopped at the end of the module:
- greedy tokens from the server (a completion from token ids) equal transformers generate here;
- a chat completion sent by the `openai` client (run in the vLLM environment, where it is
  installed) gives the text transformers generate gives for the chat template's prompt.
vLLM lives in .venv-vllm (scripts/setup_vllm.sh, which .ci/run runs): without it the tests skip on
a developer's machine and fail in CI.
"""

import json
import os
import subprocess

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from pesc.export import export
from pesc.serving.vllm_server import get_json, vllm_environment, vllm_python, vllm_server
from pesc.testing import save_tiny_dense
from pesc.testing.isolated import run_without_pesc
from pesc.testing.trained_run import save_fake_trained_run

# head_dim 128 / 2 = 64: vLLM's CPU attention refuses head_dim 16 (the other tests' tiny shape)
SERVE_SHAPE = dict(hidden_size=128, intermediate_size=256, num_attention_heads=2, num_key_value_heads=1)
NEW_TOKENS = 12
PROMPT_IDS = [17, 42, 99, 5, 130, 61, 8, 200]
MESSAGES = [{"role": "user", "content": "What is two plus two?"}]

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


def _require_vllm():
    if vllm_python() is None:
        reason = "no .venv-vllm: run scripts/setup_vllm.sh to test serving with vLLM"
        if os.environ.get("CI"):
            pytest.fail(reason + " (.ci/run makes it)")
        pytest.skip(reason)


@pytest.fixture(scope="module", params=["llama", "qwen2"])
def served(request, tmp_path_factory):
    """(family, export folder, server base URL): a tiny trained PESC export served by vLLM."""
    _require_vllm()
    family = request.param
    root = tmp_path_factory.mktemp(f"serve-{family}")
    dense = save_tiny_dense(root / "dense", family, **SERVE_SHAPE)
    run = root / "run"
    save_fake_trained_run(run, dense)
    out = root / "export"
    export(run, out, dtype="float32", log=lambda message: None)
    log = root / "vllm-serve.log"
    with vllm_server(out, "--dtype", "float32", "--max-model-len", "256", "--served-model-name", "pesc",
                     log_path=log) as base_url:
        yield family, out, base_url


def test_export_loads_as_automodel_backbone(exported):
    """What vLLM's Transformers backend asks of the shipped code, checked without vLLM (loaded as remote code)."""
    config = json.loads((exported / "config.json").read_text())
    assert config["auto_map"]["AutoModel"] == "modeling_pesc.PescModel"
    result = run_without_pesc(f"""
import torch
from transformers import AutoModel, AutoModelForCausalLM
ids = torch.tensor([{PROMPT_IDS!r}])
model = AutoModelForCausalLM.from_pretrained({str(exported)!r}, trust_remote_code=True).eval()
backbone = AutoModel.from_pretrained({str(exported)!r}, trust_remote_code=True).eval()
with torch.no_grad():
    logits = model(input_ids=ids).logits
    from_backbone = model.lm_head(backbone(input_ids=ids).last_hidden_state)
    compiled = torch.compile(backbone, backend="eager", dynamic=True, fullgraph=True)
    compiled_logits = model.lm_head(compiled(input_ids=ids, use_cache=False).last_hidden_state)
emit({{"equal": torch.equal(logits, from_backbone), "compiled": (compiled_logits - logits).abs().max().item(),
       "supports_backend": type(backbone)._supports_attention_backend, "experts": type(backbone.layers[0].mlp.moe_adapter.experts).__name__,
       "mlp": type(backbone.layers[0].mlp).__module__, "top_k": [backbone.config.num_experts_per_tok, backbone.config.topk]}})
""")
    assert result["mlp"].startswith("transformers_modules."), result["mlp"]
    assert result["equal"], "AutoModel's last hidden state through the LM head is not the causal LM's logits"
    # one graph for every token count, as vLLM traces it (fullgraph: a host sync or a data-dependent shape fails)
    # (1e-5: in a graph the experts run one by one, eagerly as one stacked matmul: float32 sums in another order)
    assert result["compiled"] <= 1e-5, result["compiled"]
    assert result["supports_backend"] and result["experts"] == "ModuleDict"
    assert result["top_k"][0] == result["top_k"][1] == 2


def _transformers_greedy(folder, input_ids: list[int]) -> list[int]:
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    ids = torch.tensor([input_ids])
    with torch.no_grad():
        generated = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=NEW_TOKENS,
                                   do_sample=False)
    return generated[0, ids.shape[1]:].tolist()


def test_vllm_greedy_tokens_equal_transformers(served):
    family, out, base_url = served
    expected = _transformers_greedy(out, PROMPT_IDS)
    answer = get_json(f"{base_url}/v1/completions", {
        "model": "pesc", "prompt": PROMPT_IDS, "max_tokens": NEW_TOKENS, "temperature": 0,
        "return_token_ids": True,
    })
    tokens = answer["choices"][0]["token_ids"]
    assert len(expected) >= 4, "the reference stopped at once: the comparison would say little"
    assert tokens == expected, f"{family}: vLLM greedy {tokens} != transformers {expected}"


def test_openai_chat_completion_equals_transformers(served):
    family, out, base_url = served
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
    assert answer["token_ids"] == expected_ids, f"{family}: vLLM chat tokens {answer['token_ids']} != {expected_ids}"
    if "\ufffd" not in expected:
        # Text too, where the tokens decode to whole characters: a random model may emit bytes of a split
        # character, which transformers decodes as U+FFFD and vLLM's incremental detokenizer holds back.
        assert expected.strip(), "the reference generated no text: the comparison would say little"
        assert answer["text"] == expected, f"{family}: vLLM chat {answer['text']!r} != transformers {expected!r}"
