"""LoRAMoE as a pesc method, whole models (issue #12): exact at init on three families, the localized balancing
constraint through the model (padded and packed batches), official adapters imported by `pesc import loramoe`
against the official formula, and the checkpoint loading where pesc is not installed."""

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import yaml
from safetensors.torch import load_file
from torch import nn
from transformers import AutoModelForCausalLM

from pesc.checkpoint.config import read_config
from pesc.methods import get_method
from pesc.recipe import demo_data
from pesc.testing import TINY_FAMILIES
from pesc.testing.isolated import checkpoint_outputs_without_pesc
from helpers import assert_clean_error, assert_nothing_left, lbc_by_hand, official_state, run_cli, write_adapter

LORAMOE = get_method("loramoe")


def loramoe_from_dense(dense_dir, dtype=torch.float32, **settings):
    """The dense checkpoint loaded as a LoRAMoE model: its tensors, and the added modules initialised."""
    config = LORAMOE.config_from_dense(read_config(dense_dir), LORAMOE.resolve_settings(settings))
    return LORAMOE.model_class.from_pretrained(dense_dir, config=config, dtype=dtype).eval()


def _ids(batch, seq, seed=0):
    return torch.randint(5, 250, (batch, seq), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("family", TINY_FAMILIES)
def test_exact_at_init_on_each_family(tiny_dense_dirs, family):
    dense = AutoModelForCausalLM.from_pretrained(tiny_dense_dirs[family], dtype=torch.float32).eval()
    model = loramoe_from_dense(tiny_dense_dirs[family], num_experts=4)
    ids = _ids(2, 9)
    with torch.no_grad():
        out = model(ids, output_routing_records=True)
        assert torch.equal(out.logits, dense(ids).logits)
    layers = dense.config.num_hidden_layers
    assert [(r.site, r.layer) for r in out.routing_records] == [
        (site, layer) for layer in range(layers) for site in ("gate_proj", "up_proj", "down_proj")
    ]
    sites = [m for n, m in model.named_modules() if n.endswith("mlp.loramoe_up_proj")]
    assert len(sites) == layers
    assert all(torch.equal(s.experts_B.weight, torch.zeros_like(s.experts_B.weight)) for s in sites)
    assert all(s.experts_A.weight.abs().min() >= 0 and s.router.weight.abs().max() > 0 for s in sites)


def _with_random_experts(model, seed=1):
    """Non-zero B everywhere, so every site contributes."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("experts_B.weight"):
                param.copy_(torch.randn(param.shape, generator=generator, dtype=param.dtype) * 0.05)
    return model


def test_lbc_through_the_model_padded_batch(tiny_llama_dir):
    """Padded batch (right and left padding), three samples of two task types: the model's lbc_loss is the
    formula over the router logits it produced, padding left out, summed over the 6 sites; the loss adds
    lbc_loss_coef times it. Tolerance rel 1e-5: the model sums in float32."""
    model = _with_random_experts(loramoe_from_dense(tiny_llama_dir, num_experts=4, lbc_loss_coef=0.3))
    ids = _ids(3, 8)
    mask = torch.ones_like(ids)
    mask[0, 6:] = 0
    mask[2, :3] = 0
    types = torch.tensor([1, 0, 1])
    with torch.no_grad():
        out = model(ids, attention_mask=mask, labels=ids, task_type=types, output_router_logits=True)
        plain = model(ids, attention_mask=mask, labels=ids)
    assert len(out.router_logits) == 2 * 3
    expected = lbc_by_hand(out.router_logits, [m for m in range(3) for _ in range(8)], types.tolist(),
                            ((2, 3), (0, 1)), 0.1, mask.reshape(-1).bool().tolist(), "sum", "official")  # fmt: skip
    assert out.aux_losses["lbc_loss"].item() == pytest.approx(expected, rel=1e-5)
    assert expected > 1e-3
    assert out.loss.item() == pytest.approx(plain.loss.item() + 0.3 * expected, rel=1e-5)
    assert plain.aux_losses is None and "lbc_loss" not in (plain.aux_losses or {})


def test_lbc_through_the_model_packed_batch(tiny_llama_dir):
    """One packed row of three sequences (position_ids restart, no mask): each sequence is one sample; the
    config's reduction and direction reach the loss."""
    model = _with_random_experts(loramoe_from_dense(tiny_llama_dir, num_experts=4, lbc_reduction="mean",
                                                    lbc_direction="towards_own_group"))  # fmt: skip
    lengths = (4, 7, 5)
    ids = _ids(1, sum(lengths))
    positions = torch.cat([torch.arange(n) for n in lengths]).unsqueeze(0)
    types = torch.tensor([0, 1, 0])
    with torch.no_grad():
        out = model(ids, position_ids=positions, labels=ids, task_type=types, output_router_logits=True,
                    use_cache=False)  # fmt: skip
    sample_of_token = [m for m, n in enumerate(lengths) for _ in range(n)]
    expected = lbc_by_hand(out.router_logits, sample_of_token, types.tolist(), ((2, 3), (0, 1)), 0.1,
                            [True] * sum(lengths), "mean", "towards_own_group")  # fmt: skip
    assert out.aux_losses["lbc_loss"].item() == pytest.approx(expected, rel=1e-5)


def test_inference_needs_no_task_type_and_generates_the_same_with_cache(tiny_llama_dir):
    model = _with_random_experts(loramoe_from_dense(tiny_llama_dir, num_experts=4))
    ids = _ids(1, 6)
    with torch.no_grad():
        cached = model.generate(ids, max_new_tokens=6, do_sample=False, use_cache=True)
        uncached = model.generate(ids, max_new_tokens=6, do_sample=False, use_cache=False)
    assert torch.equal(cached, uncached)


# ---------------------------------------------------------------------------------------
# Official adapters
# ---------------------------------------------------------------------------------------
class OfficialLinear(nn.Module):
    """The official peft Linear.forward in eval mode, written from the adapter's own tensors:
    result = W0 x; p = softmax(lora_route(x)); result += p_i * lora_B{i}(lora_A{i}(x)) * lora_alpha / r."""

    def __init__(self, linear, state, prefix, num_experts, rank, alpha):
        super().__init__()
        self.linear, self.scaling, self.num_experts = linear, alpha / rank, num_experts
        self.route = state[f"{prefix}.lora_route.weight"].double()
        self.a = [state[f"{prefix}.lora_A{i}.weight"].double() for i in range(num_experts)]
        self.b = [state[f"{prefix}.lora_B{i}.weight"].double() for i in range(num_experts)]

    def forward(self, x):
        result = self.linear(x)
        route_weight = torch.softmax(F.linear(x, self.route), dim=-1)
        for i in range(self.num_experts):
            result = result + route_weight[..., i : i + 1] * F.linear(F.linear(x, self.a[i]), self.b[i]) * self.scaling
        return result


@pytest.fixture(scope="module")
def official_adapter(tiny_llama_dir, tmp_path_factory):
    """(adapter folder, its tensors): 4 experts of rank 4 on gate/up/down_proj, random non-zero B, float32."""
    dense = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float64)
    state = {k: v.float() for k, v in official_state(dense).items()}
    return write_adapter(tmp_path_factory.mktemp("official") / "adapter", state), state


def test_import_computes_the_official_formula(capsys, tmp_path, tiny_llama_dir, official_adapter):
    """Float64 on both sides (the imported float32 tensors are exact in float64); tolerance 1e-10."""
    adapter, state = official_adapter
    code, out, err = run_cli(capsys, "import", "loramoe", adapter, tmp_path / "out", "--base", tiny_llama_dir)
    assert code == 0, err
    assert "4 experts of rank 4 (alpha 32) on gate_proj, up_proj, down_proj" in out
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert (config["model_type"], config["num_experts"], config["expert_rank"], config["lbc_loss_coef"]) == (
        "pesc_loramoe", 4, 4, 0.1)  # fmt: skip
    imported = AutoModelForCausalLM.from_pretrained(tmp_path / "out", trust_remote_code=True, dtype=torch.float64)
    reference = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float64)
    for layer_idx, layer in enumerate(reference.model.layers):
        for site in ("gate_proj", "up_proj", "down_proj"):
            prefix = f"base_model.model.model.layers.{layer_idx}.mlp.{site}"
            setattr(layer.mlp, site, OfficialLinear(getattr(layer.mlp, site), state, prefix, 4, 4, 32))
    ids = _ids(2, 7)
    with torch.no_grad():
        ours, official = imported.eval()(ids).logits, reference.eval()(ids).logits
        dense = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float64).eval()(ids).logits
    torch.testing.assert_close(ours, official, rtol=1e-10, atol=1e-10)
    assert (official - dense).abs().max() > 0.1  # the experts change the logits: not a comparison of base models


def test_import_errors_write_nothing(capsys, tmp_path, tiny_llama_dir, tiny_dense_dirs, official_adapter):
    adapter, state = official_adapter
    plain = tmp_path / "plain"
    plain.mkdir()
    (plain / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 8, "lora_alpha": 16}))
    code, _, err = run_cli(capsys, "import", "loramoe", plain, tmp_path / "out", "--base", tiny_llama_dir)
    assert_clean_error(code, err, "plain LoRA adapter")
    assert_nothing_left(tmp_path)
    odd = write_adapter(tmp_path / "odd", official_state(AutoModelForCausalLM.from_pretrained(tiny_llama_dir),
                                                         num_experts=5), lora_nums=5)  # fmt: skip
    code, _, err = run_cli(capsys, "import", "loramoe", odd, tmp_path / "out", "--base", tiny_llama_dir)
    assert_clean_error(code, err, "odd lora_nums (5)")
    assert_nothing_left(tmp_path)
    partial = {k: v for k, v in state.items() if "layers.1.mlp.down_proj.lora_B2" not in k}
    incomplete = write_adapter(tmp_path / "incomplete", partial)
    code, _, err = run_cli(capsys, "import", "loramoe", incomplete, tmp_path / "out", "--base", tiny_llama_dir)
    assert_clean_error(code, err, "layers.1.mlp.down_proj.lora_B2.weight")
    assert_nothing_left(tmp_path)


def test_imported_checkpoint_runs_without_pesc(capsys, tmp_path, tiny_llama_dir, official_adapter):
    adapter, _ = official_adapter
    code, _, err = run_cli(capsys, "import", "loramoe", adapter, tmp_path / "out", "--base", tiny_llama_dir)
    assert code == 0, err
    ids = _ids(1, 6)
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "out", trust_remote_code=True, dtype=torch.float32).eval()
    with torch.no_grad():
        logits = model(ids).logits
        generated = model.generate(ids, max_new_tokens=5, do_sample=False)
    result = checkpoint_outputs_without_pesc(tmp_path / "out", ids.tolist(), new_tokens=5)
    assert result["class"] == "LoramoeForCausalLM"
    assert torch.equal(torch.tensor(result["logits"]), logits)
    assert result["cached"] == generated.tolist()


def test_convert_and_inspect_count_every_expert_as_active(capsys, tmp_path, tiny_llama_dir):
    code, out, err = run_cli(capsys, "convert", tiny_llama_dir, tmp_path / "out", "--method", "loramoe",
                             "--num-experts", "4", "--sites", "gate_proj,down_proj")  # fmt: skip
    assert code == 0, err
    code, out, err = run_cli(capsys, "inspect", tmp_path / "out", "--json")
    assert code == 0, err
    counts = json.loads(out)
    # per layer: gate_proj site (router 4x64 + A 16x64 + B 128x16) + down_proj site (4x128 + 16x128 + 64x16)
    per_layer = (4 * 64 + 16 * 64 + 128 * 16) + (4 * 128 + 16 * 128 + 64 * 16)
    dense = AutoModelForCausalLM.from_pretrained(tiny_llama_dir).num_parameters()
    assert counts["settings"]["sites"] == ["gate_proj", "down_proj"]
    assert counts["trainable_params"] == 2 * per_layer
    assert counts["total_params"] == counts["active_params"] == dense + 2 * per_layer
    code, out, err = run_cli(capsys, "compare", tiny_llama_dir, tmp_path / "out")
    assert code == 0 and "= 0" in out, out + err


# ---------------------------------------------------------------------------------------
# A tiny run with two task types, and its export
# ---------------------------------------------------------------------------------------
TWO_TASKS = Path(demo_data("pesc:tiny_two_tasks.jsonl"))


def _tiny_loramoe_run(root: Path, base: Path, **moe) -> Path:
    """The recipe loramoe-tiny, shortened: 4-bit base, 4 experts per FFN linear, task types per row."""
    from pesc.training.run import train

    config = {
        "method": "loramoe",
        "base_model": str(base),
        "moe": {"num_experts": 4, "lbc_loss_coef": 0.1, "seed": 0, **moe},
        # no lora_target_modules: LoRAMoE's default is none, only routers and experts train
        "datasets": [{"path": str(TWO_TASKS), "type": "messages"}],
        "chat_template": "chatml",
        "sequence_len": 64,
        "sample_packing": True,
        "micro_batch_size": 8,
        "max_steps": 8,
        "learning_rate": 0.01,
        "warmup_ratio": 0.0,
        "max_grad_norm": 1.0,
        "gradient_checkpointing": False,
        "bf16": False,
        "output_dir": str(root / "run"),
        "logging_steps": 1,
        "save_steps": 8,
    }
    path = root / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    train(str(path))
    return root / "run"


@pytest.fixture(scope="module")
def loramoe_run(tmp_path_factory, tiny_llama_dir):
    """The official constraint (the default direction)."""
    return _tiny_loramoe_run(tmp_path_factory.mktemp("loramoe-run"), tiny_llama_dir)


def test_tiny_run_with_two_task_types_logs_lbc_and_learns(loramoe_run):
    logs = [e for e in json.loads((loramoe_run / "trainer_state.json").read_text())["log_history"] if "loss" in e]
    assert len(logs) == 8 and all("lbc_loss" in e and e["lbc_loss"] > 0 for e in logs)
    losses = [e["loss"] for e in logs]
    assert sum(losses[-3:]) / 3 < sum(losses[:3]) / 3
    assert not (loramoe_run / "final" / "adapter_model.safetensors").exists()  # no LoRA: only the experts trained
    experts = load_file(loramoe_run / "final" / "experts.safetensors")
    assert len(experts) == 2 * 3 * 3  # 2 layers x 3 sites x (router, A, B)
    assert all(experts[n].abs().max() > 0 for n in experts if n.endswith("experts_B.weight"))


def test_export_loads_and_generates_without_pesc(capsys, loramoe_run, tmp_path):
    from pesc.checkpoint.trained_run import load_trained_model

    code, _, err = run_cli(capsys, "export", loramoe_run, tmp_path / "export", "--dtype", "float32")
    assert code == 0, err
    assert {path.name for path in LORAMOE.shipped_files} <= {
        p.name for p in (tmp_path / "export").iterdir()
    }
    peft_model, _, _ = load_trained_model(loramoe_run)
    ids = _ids(1, 6)
    with torch.no_grad():
        trained = peft_model(input_ids=ids).logits
    result = checkpoint_outputs_without_pesc(tmp_path / "export", ids.tolist(), new_tokens=4)
    # no LoRA to merge: the exported model computes what the trained one does, up to float32 reordering
    torch.testing.assert_close(torch.tensor(result["logits"]), trained, rtol=1e-4, atol=1e-4)
    assert len(result["cached"][0]) == 6 + 4


def _knowledge_group_share(model, data_dir: Path, out: Path) -> dict[str, float]:
    """`pesc routes` on MODEL: the mean router weight on the knowledge group (experts 0 and 1, the official
    halves for 4 experts) over every site and layer, for the knowledge rows and for the task rows."""
    from pesc.routing_analysis.run import run_routes

    data = [f"{task}={data_dir / task}.jsonl" for task in ("knowledge", "task")]
    run_routes(str(model), data, out, chat_template="chatml", sequence_len=64,
               expert_group=["knowledge=0,1", "task=2,3"], echo=lambda *args: None)  # fmt: skip
    shares = json.loads((out / "routes.json").read_text())["group_shares"]
    return {task: sum(sum(site[task]["knowledge"]) / len(site[task]["knowledge"]) for site in shares.values())
            / len(shares) for task in ("knowledge", "task")}  # fmt: skip


def test_towards_own_group_moves_knowledge_samples_to_the_knowledge_group(capsys, tmp_path, tiny_llama_dir,
                                                                        loramoe_run):
    """The same tiny run (same init, same batches) in both directions of the constraint, the routing read off with
    `pesc routes` on the data split by task type. towards_own_group: knowledge rows put more weight on the
    knowledge group than at init, and their lead over the task rows there grows, well beyond the official run's
    (whose constraint pulls each type off its own group; test_loramoe_layer pins that direction)."""
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    rows = [json.loads(line) for line in TWO_TASKS.read_text().splitlines()]
    for task in ("knowledge", "task"):
        (data_dir / f"{task}.jsonl").write_text("".join(json.dumps({"messages": r["messages"]}) + "\n"
                                                        for r in rows if r["task_type"] == task))
    code, _, err = run_cli(capsys, "convert", tiny_llama_dir, tmp_path / "init", "--method", "loramoe",
                           "--num-experts", "4", "--seed", "0")  # the runs' step 0  # fmt: skip
    assert code == 0, err
    (tmp_path / "towards").mkdir()
    towards = _tiny_loramoe_run(tmp_path / "towards", tiny_llama_dir, lbc_direction="towards_own_group")
    init, moved, official = (_knowledge_group_share(model, data_dir, tmp_path / f"routes-{name}")
                             for name, model in (("init", tmp_path / "init"), ("towards", towards),
                                                 ("official", loramoe_run)))  # fmt: skip
    lead = {name: shares["knowledge"] - shares["task"] for name, shares in
            (("init", init), ("towards", moved), ("official", official))}  # fmt: skip
    # seen: knowledge rows 0.461 at init, 0.527 towards, 0.475 official; leads -0.015, +0.035, -0.019
    assert moved["knowledge"] > init["knowledge"] + 0.03, (init, moved)
    assert lead["towards"] > lead["init"] + 0.03, lead
    assert lead["towards"] > lead["official"] + 0.03, lead


@pytest.mark.parametrize(
    "flags, message",
    [
        (("--num-experts", "5"), "num_experts (5) is odd"),
        (("--sites", "gate_proj,lm_head"), "sites must be a non-empty list"),
        (("--lbc-groups", "[[0, 1], [1, 9]]"), "lbc_groups must be a list"),
        (("--lbc-groups", "[[0"), "lbc_groups must be a JSON list of lists"),
        (("--lbc-reduction", "max"), "lbc_reduction must be one of sum, mean"),
        (("--lbc-direction", "inwards"), "lbc_direction must be one of official, towards_own_group"),
        (("--expert-dropout", "1.5"), "expert_dropout must be in [0, 1)"),
        (("--top-k", "2"), "--top-k is not a setting of method loramoe"),
    ],
)
def test_bad_settings_are_one_line_errors(capsys, tmp_path, tiny_llama_dir, flags, message):
    code, _, err = run_cli(capsys, "convert", tiny_llama_dir, tmp_path / "out", "--method", "loramoe", *flags)
    assert_clean_error(code, err, message)
    assert_nothing_left(tmp_path)


def test_task_type_names_and_indices():
    from pesc.errors import PescError

    field = LORAMOE.sample_fields[0]
    assert (field.name, field.encode("task", "x"), field.encode("knowledge", "x"), field.encode(2, "x")) == (
        "task_type", 0, 1, 2)  # fmt: skip
    with pytest.raises(PescError, match="row 3: task_type 'science' is not task, knowledge or an integer >= 0"):
        field.encode("science", "data.jsonl: row 3")


def test_shipped_recipes_hold_the_papers_settings():
    from pesc.training.config import load_config

    paper = load_config("loramoe-llama2-7b")
    settings = LORAMOE.resolve_settings(paper["moe"])
    assert (paper["method"], settings["num_experts"], settings["expert_rank"], settings["expert_alpha"]) == (
        "loramoe", 6, 4, 32)  # fmt: skip
    assert (settings["expert_dropout"], settings["lbc_delta"], settings["lbc_loss_coef"]) == (0.05, 0.1, 0.1)
    assert {e["task_type"] for e in paper["datasets"]} == {"knowledge", "task"}
    tiny = load_config("loramoe-tiny")
    assert tiny["datasets"][0]["path"] == "pesc:tiny_two_tasks.jsonl"
    types = {json.loads(line)["task_type"] for line in TWO_TASKS.read_text().splitlines()}
    assert types == {"knowledge", "task"}
