"""A second method, defined here and nowhere else, goes through every command: the method interface works.

The toy method ("toyvec") puts a dense-routed scaled vector on q_proj's output: per layer a SIBLING
module `self_attn.toyvec_q_proj` (router [E, hidden] + E vectors [E, q_out]) turns q_proj's output y
into y * (1 + softmax(router(x)) @ vectors). Its vectors start at zero (the converted model computes
the dense model exactly); its aux loss `task_loss` reads the per-sample field `task_type`. Its shipped
files (copies of the shared moe_*.py it imports plus its own configuration / modeling files) are written by this test into
a temporary package; the toolkit learns of it through one `register_method` call.
"""

import importlib
import json
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

import pesc.modeling
from pesc.cli import main
from pesc.methods import METHODS, Method, SampleField, Setting, register_method
from pesc.testing.isolated import checkpoint_outputs_without_pesc
from helpers import read_tensors

CONFIGURATION = '''
from .moe_config import FlatMoEConfig


class ToyVecConfig(FlatMoEConfig):
    model_type = "pesc_toyvec"
    method_defaults = {"num_experts": 3, "task_loss_coef": 0.1}

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
'''

# The shared shipped files the toy method's code imports, transitively.

MODELING = '''
import torch
import torch.nn.functional as F
from torch import nn

from .configuration_toyvec import ToyVecConfig
from .moe_causal_lm import MoEForCausalLM, MoEModel
from .moe_routing import emit_routing_record
from .moe_sites import attach_sibling


class ToyVecSite(nn.Module):
    def __init__(self, in_features, out_features, num_experts, layer_idx):
        super().__init__()
        self.layer_idx = layer_idx
        self.vectors = nn.Parameter(torch.zeros(num_experts, out_features))
        self.router = nn.Linear(in_features, num_experts, bias=False)

    def linear_output_hook(self, linear, args, output):
        logits = self.router(args[0].to(self.router.weight.dtype)).reshape(-1, self.vectors.shape[0])
        emit_routing_record("q_proj", self.layer_idx, logits)  # dense routing: no selected experts
        scale = torch.softmax(logits.float(), dim=-1).to(self.vectors.dtype) @ self.vectors
        return output * (1 + scale.reshape(*output.shape[:-1], -1)).to(output.dtype)


class ToyVecForCausalLM(MoEForCausalLM):
    config_class = ToyVecConfig
    method_label = "ToyVec"
    sample_fields = ("task_type",)
    _no_split_modules = []

    def add_method_modules(self, layer, layer_idx, config):
        q_proj = layer.self_attn.q_proj
        site = ToyVecSite(q_proj.in_features, q_proj.out_features, config.num_experts, layer_idx)
        attach_sibling(layer.self_attn, "q_proj", "toyvec_q_proj", site, "output")

    def init_method_module(self, module):
        if isinstance(module, ToyVecSite):
            nn.init.zeros_(module.vectors)
            return True
        return False

    def aux_loss_coefficients(self):
        return {"task_loss": self.config.task_loss_coef}

    def compute_aux_losses(self, records, attention_mask, sample_values):
        task = sample_values.get("task_type")
        if task is None:
            return {}
        losses = [F.cross_entropy(r.logits.float(), task.to(r.logits.device) % r.logits.shape[-1]) for r in records]
        return {"task_loss": torch.stack(losses).mean()}


class ToyVecModel(MoEModel):
    config_class = ToyVecConfig
    causal_lm_class = ToyVecForCausalLM
'''


@pytest.fixture(scope="module")
def toyvec(tmp_path_factory):
    """The toy method: its files in a fresh package, imported, registered (and unregistered afterwards)."""
    root = tmp_path_factory.mktemp("toyvec")
    package = root / "toyvec_pkg"
    package.mkdir()
    (package / "__init__.py").write_text("")
    for shared in Path(pesc.modeling.__file__).parent.glob("*.py"):  # its own copy of the shared model code
        if shared.name != "__init__.py":
            shutil.copyfile(shared, package / shared.name)
    (package / "configuration_toyvec.py").write_text(textwrap.dedent(CONFIGURATION))
    (package / "modeling_toyvec.py").write_text(textwrap.dedent(MODELING))
    sys.path.insert(0, str(root))
    modeling = importlib.import_module("toyvec_pkg.modeling_toyvec")

    class ToyVec(Method):
        name = "toyvec"
        label = "ToyVec"
        description = "toy: a dense-routed scaled vector on q_proj's output; aux loss: task_loss"
        settings = (
            Setting("num_experts", (int,), "vectors per site", structural=True),
            Setting("task_loss_coef", (int, float), "weight of the task loss"),
        )
        config_class = modeling.ToyVecConfig
        model_class = modeling.ToyVecForCausalLM
        auto_model_class = modeling.ToyVecModel
        prefix = "toyvec_"
        sample_fields = (SampleField("task_type", {"chat": 0, "code": 1}),)

        def initial_state(self, config, layer_idx, seed):
            generator = torch.Generator().manual_seed(seed * 1000 + layer_idx)
            dtype = getattr(torch, config.moe_dtype) if config.moe_dtype else torch.float32
            q_out = config.num_attention_heads * config.head_dim
            return {
                "self_attn.toyvec_q_proj.vectors": torch.zeros(config.num_experts, q_out, dtype=dtype),
                "self_attn.toyvec_q_proj.router.weight": (
                    0.1 * torch.randn(config.num_experts, config.hidden_size, generator=generator)
                ).to(dtype),
            }

    method = register_method(ToyVec())
    yield method
    METHODS.pop(method.name)
    sys.path.remove(str(root))


@pytest.fixture(scope="module")
def converted(toyvec, tiny_llama_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("toy-convert") / "toy"
    main(["convert", str(tiny_llama_dir), str(out), "--method", "toyvec", "--num-experts", "2", "--seed", "1",
          "--task-loss-coef", "0.5"])
    return out


def test_convert_writes_the_method_layout_and_code(toyvec, converted, tiny_llama_dir):
    config = json.loads((converted / "config.json").read_text())
    assert config["model_type"] == "pesc_toyvec" and config["num_experts"] == 2 and config["task_loss_coef"] == 0.5
    assert config["auto_map"] == {"AutoConfig": "configuration_toyvec.ToyVecConfig",
                                  "AutoModel": "modeling_toyvec.ToyVecModel",
                                  "AutoModelForCausalLM": "modeling_toyvec.ToyVecForCausalLM"}
    own_folder = Path(sys.modules[toyvec.config_class.__module__].__file__).parent
    assert {path.parent for path in toyvec.shipped_files} == {own_folder}  # its own copies, not pesc's
    assert {path.name for path in toyvec.shipped_files} >= {"moe_causal_lm.py", "configuration_toyvec.py", "modeling_toyvec.py"}
    for path in toyvec.shipped_files:
        assert (converted / path.name).read_bytes() == path.read_bytes()
    tensors, dense = read_tensors(converted), read_tensors(Path(tiny_llama_dir))
    for name, tensor in dense.items():  # base tensors keep their names and bytes
        assert torch.equal(tensors[name], tensor), name
    added = sorted(set(tensors) - set(dense))
    layers = config["num_hidden_layers"]
    assert added == sorted(f"model.layers.{i}.self_attn.toyvec_q_proj.{p}" for i in range(layers)
                           for p in ("router.weight", "vectors"))
    for i in range(layers):
        for key, value in toyvec.initial_state(toyvec.config_class(**config), i, 1).items():
            assert torch.equal(tensors[f"model.layers.{i}.{key}"], value)


def test_converted_model_computes_the_dense_model(converted, tiny_llama_dir, capsys):
    main(["compare", str(converted), str(tiny_llama_dir), "--atol", "0"])
    assert "= 0" in capsys.readouterr().out


def test_inspect_counts_every_vector_active_under_dense_routing(toyvec, converted, tiny_llama_dir, capsys):
    main(["inspect", str(converted), "--json"])
    summary = json.loads(capsys.readouterr().out)
    config = json.loads((converted / "config.json").read_text())
    hidden, layers = config["hidden_size"], config["num_hidden_layers"]
    q_out = config["num_attention_heads"] * config["head_dim"]
    added = layers * 2 * (hidden + q_out)
    dense_total = sum(t.numel() for t in read_tensors(Path(tiny_llama_dir)).values())
    assert summary["method"] == "toyvec" and summary["settings"] == {"num_experts": 2, "task_loss_coef": 0.5}
    assert summary["trainable_params"] == added
    assert summary["total_params"] == summary["active_params"] == dense_total + added
    main(["inspect", str(tiny_llama_dir), "--json", "--method", "toyvec", "--num-experts", "5"])
    assert json.loads(capsys.readouterr().out)["trainable_params"] == layers * 5 * (hidden + q_out)


def test_a_flag_of_another_method_is_refused(toyvec, tiny_llama_dir, tmp_path, capsys):
    with pytest.raises(SystemExit):
        main(["convert", str(tiny_llama_dir), str(tmp_path / "x"), "--method", "toyvec", "--adapter-dim", "8"])
    assert "--adapter-dim is not a setting of method toyvec" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


def _toy_rows() -> list[dict]:
    rows = []
    for i in range(16):
        row = {"messages": [{"role": "user", "content": f"Add {i} and {i + 1}."},
                            {"role": "assistant", "content": f"{i} + {i + 1} = {2 * i + 1}."}]}
        if i % 2:
            row["task_type"] = "chat"  # the others take their entry's value
        rows.append(row)
    return rows


@pytest.fixture(scope="module")
def toy_run(toyvec, tiny_llama_dir, tmp_path_factory):
    """`pesc train` (4-bit NF4 base, LoRA on q_proj among others) of the toy method from the dense base."""
    root = tmp_path_factory.mktemp("toy-run")
    data = root / "rows.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in _toy_rows()))
    config = {
        "base_model": str(tiny_llama_dir), "method": "toyvec", "moe": {"num_experts": 2, "seed": 1},
        "lora_r": 4, "lora_alpha": 8, "lora_target_modules": ["q_proj", "v_proj", "gate_proj"],
        "datasets": [{"path": str(data), "type": "messages", "task_type": "code"}],
        "chat_template": "chatml", "sequence_len": 48, "micro_batch_size": 4, "max_steps": 2,
        "learning_rate": 0.05, "warmup_ratio": 0.0, "bf16": False, "output_dir": str(root / "run"),
        "logging_steps": 1, "save_steps": 2, "bnb_4bit_compute_dtype": "float32", "torch_dtype": "float32",
    }
    path = root / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    main(["train", str(path)])
    return root / "run"


def test_training_trains_the_method_and_logs_its_named_loss(toy_run):
    experts = load_file(toy_run / "final" / "experts.safetensors")
    assert sorted({name.split(".", 3)[3] for name in experts}) == [
        "self_attn.toyvec_q_proj.router.weight", "self_attn.toyvec_q_proj.vectors"]
    assert all(experts[n].abs().sum() > 0 for n in experts if n.endswith("vectors"))  # moved away from zero
    logs = json.loads((toy_run / "trainer_state.json").read_text())["log_history"]
    assert all("task_loss" in entry for entry in logs if "loss" in entry)
    assert not any("aux_loss" in entry for entry in logs)
    load = [json.loads(line) for line in (toy_run / "expert_load.jsonl").read_text().splitlines()]
    assert len(load[0]["expert_load"]) == 2 and len(load[0]["expert_load"][0]) == 2  # one row per site, 2 vectors


def test_the_sibling_follows_qlora_and_acts_once(toyvec, toy_run, tiny_llama_dir):
    """Under 4-bit + peft, q_proj is a LoRA layer around a Linear4bit: the vectors scale exactly its output."""
    from peft.tuners.lora import LoraLayer

    from pesc.training.config import load_config
    from pesc.training.model import load_base_model, prepare_for_training

    config = load_config(toy_run / "pesc_train_config.yaml")
    ids = torch.tensor([[3, 9, 27, 81]])
    quantized = load_base_model(config)
    with torch.no_grad():
        quantized(input_ids=ids)  # connects each sibling to the Linear4bit that replaced q_proj
    model = prepare_for_training(quantized, config).eval()  # peft wraps the Linear4bit: the hook must move
    attention = model.get_base_model().model.layers[0].self_attn
    assert isinstance(attention.q_proj, LoraLayer)
    assert type(attention.q_proj.get_base_layer()).__name__ == "Linear4bit"
    site = attention.toyvec_q_proj
    with torch.no_grad():
        site.vectors.normal_()
        for module in attention.q_proj.modules():
            if hasattr(module, "lora_B"):
                module.lora_B["default"].weight.normal_()
        model(input_ids=ids)  # the layers' forward connects each sibling to the q_proj there now
        x = torch.randn(1, 4, site.router.in_features, generator=torch.Generator().manual_seed(0))
        lora = attention.q_proj
        base = lora.get_base_layer().forward(x)  # no hooks: the plain 4-bit matmul
        delta = lora.lora_B["default"](lora.lora_A["default"](x)) * lora.scaling["default"]
        weights = torch.softmax(site.router(x).float(), dim=-1)
        expected = (base + delta) * (1 + weights @ site.vectors)
        torch.testing.assert_close(attention.q_proj(x), expected, rtol=1e-5, atol=1e-5)  # float32 op order only


def test_export_loads_without_pesc_and_computes_the_trained_model(toyvec, toy_run, tmp_path):
    from pesc.checkpoint.trained_run import load_trained_model

    out = tmp_path / "toy-export"
    main(["export", str(toy_run), str(out), "--dtype", "float32"])
    for name in (path.name for path in toyvec.shipped_files):
        assert (out / name).is_file()
    trained = load_file(toy_run / "final" / "experts.safetensors")
    exported = read_tensors(out)
    for name, tensor in trained.items():  # the added modules as trained, bit for bit
        assert torch.equal(exported[name], tensor.float()), name
    ids = [[5, 17, 33, 2, 71, 8]]
    fresh = checkpoint_outputs_without_pesc(out, ids)
    assert fresh["class"] == "ToyVecForCausalLM"
    peft_model, _, _ = load_trained_model(toy_run, dtype=torch.float32)
    with torch.no_grad():
        unmerged = peft_model(input_ids=torch.tensor(ids)).logits
    # merged LoRA (W + BA, summed in float32) against LoRA applied on the side: float32 rounding only (~1e-7)
    torch.testing.assert_close(torch.tensor(fresh["logits"]), unmerged, rtol=0, atol=1e-5)
    # and the vectors matter: without them the exported model computes something else, well beyond that tolerance
    assert (unmerged - _logits_without_vectors(out, ids)).abs().max() > 1e-4


def _logits_without_vectors(folder: Path, ids) -> torch.Tensor:
    """The exported model with its vectors zeroed: what it would compute without the method's modules."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("toyvec_q_proj.vectors"):
                param.zero_()
        return model(input_ids=torch.tensor(ids)).logits


def test_methods_lists_every_registered_method(toyvec, capsys):
    main(["methods"])
    lines = capsys.readouterr().out.splitlines()
    assert any(line.startswith("pesc ") and "2401.02731" in line for line in lines)
    assert any(line.startswith("toyvec ") and "task_loss" in line for line in lines)


def test_the_method_flags_are_parsed_without_importing_torch():
    """`pesc --help` and flag errors stay instant: parsing the methods' flags loads no model code (a method's
    defaults, read from its config class, load it only for a command's help or its resolved values)."""
    code = textwrap.dedent("""
        import sys
        from pesc.cli import cli
        for args in (["--help"], ["convert", "a", "b", "--method", "mov", "--top-k", "2"]):
            try:
                cli.main(args, standalone_mode=False)
            except SystemExit:
                pass
            except Exception as error:
                print(error)
        print(sorted(name for name in ("torch", "transformers") if name in sys.modules))
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert "convert" in out and "--top-k is not a setting of method mov" in out
    assert out.strip().endswith("[]")
