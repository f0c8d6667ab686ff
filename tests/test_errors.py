"""Bad input across the CLI: one line on stderr naming the problem, exit 1, before any weight loads, nothing left.

Each case is what a user can do by mistake (a truncated download, a typo in the config, an output folder in
the wrong place); see docs/training.md and docs/export.md for the rules they check.
"""

import json
import logging
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
import yaml

from pesc.testing.trained_run import save_fake_trained_run
from helpers import exit_of, one_line_error

INTERRUPTED = "Interrupted; nothing was left half-written."


def truncate(path: Path, keep: int | None = None) -> None:
    """Cut a file as an interrupted download does (by default, to half its size)."""
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2 if keep is None else keep])


@pytest.fixture
def no_model_load(monkeypatch):
    """Training must fail before the model's weights load."""

    def refuse(*args, **kwargs):
        raise AssertionError("the model must not load when the input is bad")

    monkeypatch.setattr("pesc.training.model.load_base_model", refuse)


@pytest.fixture
def dense_copy(tiny_llama_dir, tmp_path):
    """A copy of the tiny dense llama to damage."""
    return Path(shutil.copytree(tiny_llama_dir, tmp_path / "dense"))


@pytest.fixture(scope="module")
def data_file(tmp_path_factory):
    rows = [{"messages": [{"role": "user", "content": f"What is {i} + 1?"},
                          {"role": "assistant", "content": f"{i + 1}."}]} for i in range(8)]
    path = tmp_path_factory.mktemp("data") / "instruct.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def write_config(tmp_path: Path, base, data, **overrides) -> Path:
    config = {
        "base_model": str(base),
        "moe": {"num_experts": 4, "top_k": 2, "adapter_dim": 16},
        "lora_r": 4,
        "datasets": [{"path": str(data), "type": "messages"}],
        "chat_template": "chatml",
        "sequence_len": 64,
        "micro_batch_size": 4,
        "max_steps": 1,
        "save_steps": 1,
        "warmup_ratio": 0.0,
        "gradient_checkpointing": False,
        "bf16": False,
        "output_dir": str(tmp_path / "run"),
    }
    config.update(overrides)
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


# ---------------------------------------------------------------- unreadable weights, every command


def test_generate_refuses_a_truncated_safetensors_in_one_line(dense_copy):
    """In a real process: the whole of stderr is the error line (no traceback, no load progress bar)."""
    truncate(dense_copy / "model.safetensors")
    result = subprocess.run([sys.executable, "-m", "pesc.cli", "generate", str(dense_copy), "--prompt", "Hi"],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 1 and result.stdout == ""
    error = f"Error: {dense_copy / 'model.safetensors'} is truncated or corrupt (the header describes "
    assert result.stderr.startswith(error) and result.stderr.count("\n") == 1
    assert result.stderr.endswith("): download or save the checkpoint again\n")


def test_compare_checks_both_models_before_loading_either(dense_copy, tiny_llama_dir, capsys, monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("no model may load when one of them is damaged")

    monkeypatch.setattr("pesc.compare.load_folder_model", refuse)
    truncate(dense_copy / "model.safetensors")
    error = one_line_error(capsys, "compare", tiny_llama_dir, dense_copy)
    assert str(dense_copy / "model.safetensors") in error and "truncated or corrupt" in error


def test_a_bad_index_or_a_corrupt_bin_is_one_line(dense_copy, capsys):
    (dense_copy / "model.safetensors.index.json").write_text("{not json")
    error = one_line_error(capsys, "generate", dense_copy, "--prompt", "Hi")
    assert "model.safetensors.index.json" in error and "no valid weight_map" in error

    (dense_copy / "model.safetensors.index.json").unlink()
    (dense_copy / "model.safetensors").unlink()
    (dense_copy / "pytorch_model.bin").write_bytes(b"PK\x03\x04 not a torch file")
    error = one_line_error(capsys, "generate", dense_copy, "--prompt", "Hi")
    assert "pytorch_model.bin is truncated or corrupt" in error


def test_train_refuses_a_truncated_base_before_loading(dense_copy, data_file, tmp_path, capsys, no_model_load):
    truncate(dense_copy / "model.safetensors")
    error = one_line_error(capsys, "train", write_config(tmp_path, dense_copy, data_file))
    assert error.startswith("Error: base_model: ") and "model.safetensors is truncated or corrupt" in error
    assert not (tmp_path / "run").exists()


@pytest.fixture
def fake_run(tiny_llama_dir, tmp_path):
    """A run folder whose checkpoint-2 is complete (adapter, experts, trainer state, optimizer)."""
    checkpoint = save_fake_trained_run(tmp_path / "run", tiny_llama_dir, adapter_dim=16)
    torch.save({"state": {}, "param_groups": []}, checkpoint / "optimizer.pt")
    return checkpoint.parent


def test_export_refuses_a_truncated_experts_file(fake_run, tmp_path, capsys):
    experts = fake_run / "checkpoint-2" / "experts.safetensors"
    truncate(experts)
    error = one_line_error(capsys, "export", fake_run, tmp_path / "out")
    assert str(experts) in error and "truncated or corrupt" in error
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("name", ["adapter_model.safetensors", "optimizer.pt"])
def test_resume_refuses_a_truncated_checkpoint(name, fake_run, tiny_llama_dir, data_file, tmp_path, capsys,
                                               no_model_load):
    truncate(fake_run / "checkpoint-2" / name)
    config = write_config(tmp_path, tiny_llama_dir, data_file, output_dir=str(fake_run))
    error = one_line_error(capsys, "train", config, "--resume")
    assert error.startswith("Error: --resume: ") and f"checkpoint-2/{name} is truncated or corrupt" in error


# ---------------------------------------------------------------- train: output_dir, config values, YAML


@pytest.mark.parametrize("where", ["file", "under a file"])
def test_train_output_dir_a_file_or_under_one(where, tiny_llama_dir, data_file, tmp_path, capsys, no_model_load):
    blocker = tmp_path / "taken"
    blocker.write_text("a file")
    output_dir = blocker if where == "file" else blocker / "sub" / "run"
    config = write_config(tmp_path, tiny_llama_dir, data_file, output_dir=str(output_dir))
    error = one_line_error(capsys, "train", config)
    assert "output_dir" in error and str(output_dir) in error
    assert blocker.read_text() == "a file"


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"learning_rate": -0.01}, "learning_rate must be positive, got -0.01"),
        ({"learning_rate": float("nan")}, "learning_rate must be a finite number, got nan"),
        ({"max_grad_norm": -1.0}, "max_grad_norm must be >= 0"),
        ({"weight_decay": float("inf")}, "weight_decay must be a finite number"),
        ({"num_epochs": float("nan")}, "num_epochs must be a finite number"),
        ({"lora_alpha": 0}, "lora_alpha must be positive"),
        ({"val_set_size": float("nan")}, "val_set_size must be a finite number"),
        ({"seed": -1}, "seed must be in [0, 2**32)"),
        ({"dataloader_num_workers": -1}, "dataloader_num_workers must be >= 0"),
        ({"moe": {"moe_scaling": float("nan")}}, "moe.moe_scaling must be a finite number"),
        ({"moe": {"router_aux_loss_coef": -0.5}}, "moe.router_aux_loss_coef must be >= 0"),
        ({"lr_scheduler": "cosin"}, "lr_scheduler 'cosin' is not one transformers knows (did you mean 'cosine'?)"),
        ({"optimizer": "adamw"}, "optimizer 'adamw' is not one transformers knows"),
        ({"report_to": "wandbb"}, "report_to: unknown integration"),
    ],
)
def test_config_values_are_checked_before_the_model(overrides, message, tiny_llama_dir, data_file, tmp_path, capsys,
                                                    no_model_load):
    error = one_line_error(capsys, "train", write_config(tmp_path, tiny_llama_dir, data_file, **overrides))
    assert message in error
    assert not (tmp_path / "run").exists()  # no pesc_train_config.yaml, no folder


def test_report_to_an_integration_that_is_not_installed(tiny_llama_dir, data_file, tmp_path, capsys, no_model_load):
    from transformers.integrations import get_available_reporting_integrations
    from transformers.integrations.integration_utils import INTEGRATION_TO_CALLBACK

    absent = next(name for name in INTEGRATION_TO_CALLBACK if name not in get_available_reporting_integrations())
    config = write_config(tmp_path, tiny_llama_dir, data_file, report_to=[absent])
    error = one_line_error(capsys, "train", config)
    assert error == f"Error: report_to: {absent} is not installed: install it, or set report_to: none"
    assert not (tmp_path / "run").exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="FSDP runs where there is a GPU")
def test_fsdp_launch_without_a_gpu_is_refused(tiny_llama_dir, data_file, tmp_path, capsys, no_model_load, monkeypatch):
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")  # what `accelerate launch --config_file fsdp.yaml` sets
    error = one_line_error(capsys, "train", write_config(tmp_path, tiny_llama_dir, data_file))
    assert error.startswith("Error: FSDP needs GPUs") and "deepspeed_zero3.yaml" in error
    assert not (tmp_path / "run").exists()


def test_yaml_syntax_error_is_one_line(tmp_path, capsys):
    path = tmp_path / "config.yaml"
    path.write_text("base_model: m\noutput_dir: [unclosed\nlora_r: 4\n")
    error = one_line_error(capsys, "train", path)
    assert error.startswith(f"Error: {path} is not valid YAML: ") and "line " in error


def test_ctrl_c_says_nothing_was_left(tmp_path, capsys, monkeypatch):
    def interrupted(out, *args, **kwargs):
        (Path(out) / "config.json").write_text("{}")  # half-way through writing
        raise KeyboardInterrupt

    monkeypatch.setattr("pesc.testing.save_tiny_dense", interrupted)
    code, err = exit_of(capsys, "tiny-model", tmp_path / "tiny")
    assert code == 130 and err.strip() == INTERRUPTED
    assert list(tmp_path.iterdir()) == []


class _Records(logging.Handler):
    def __init__(self):
        super().__init__(logging.DEBUG)
        self.messages = []

    def emit(self, record):
        self.messages.append(record.getMessage())


def test_a_real_run_creates_output_dir_parents_quietly(tiny_llama_dir, data_file, tmp_path):
    """The nested output_dir is made; transformers and peft say nothing about the PESC model to the user."""
    from pesc.training import train

    output_dir = tmp_path / "new" / "nested" / "run"
    records = _Records()
    transformers_logger = logging.getLogger("transformers")
    level = transformers_logger.level
    transformers_logger.setLevel(logging.WARNING)  # what a user sees, whatever an earlier test left
    transformers_logger.addHandler(records)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            final = train(str(write_config(tmp_path, tiny_llama_dir, data_file, output_dir=str(output_dir))))
    finally:
        transformers_logger.removeHandler(records)
        transformers_logger.setLevel(level)
    assert final == output_dir / "final" and (final / "experts.safetensors").is_file()
    assert (output_dir / "checkpoint-1" / "trainer_state.json").is_file()
    noise = [m for m in records.messages if "to instantiate a model of type" in m or "MISSING" in m]
    assert noise == []
    deprecations = [str(w.message) for w in caught if issubclass(w.category, (FutureWarning, DeprecationWarning))
                    and "is_gradient_checkpointing" in str(w.message)]
    assert deprecations == []


def test_export_says_nothing_about_peft_internals(fake_run, tmp_path):
    from pesc.export import export

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        export(str(fake_run), tmp_path / "export", dtype="float32", log=lambda message: None)
    assert [str(w.message) for w in caught if "is_gradient_checkpointing" in str(w.message)] == []


def test_bitsandbytes_cpu_kernel_notice_is_dropped_and_nothing_else(caplog):
    from pesc.quiet import silence_bitsandbytes_cpu_kernel_notice

    silence_bitsandbytes_cpu_kernel_notice()
    logger = logging.getLogger("bitsandbytes.backends.cpu.ops")
    with caplog.at_level(logging.WARNING, logger=logger.name):
        logger.warning("Failed to load CPU gemm_4bit_forward from kernels-community: No module named 'kernels'.")
        logger.warning("another bitsandbytes warning")
    assert [record.getMessage() for record in caplog.records] == ["another bitsandbytes warning"]


# ---------------------------------------------------------------- silent successes


def test_resume_skips_an_interrupted_save(fake_run, caplog):
    from pesc.training.run import resume_checkpoint

    newer = fake_run / "checkpoint-4"
    shutil.copytree(fake_run / "checkpoint-2", newer)
    (newer / "trainer_state.json").unlink()  # transformers writes it last: this save was interrupted
    with caplog.at_level(logging.WARNING, logger="pesc.train"):
        assert resume_checkpoint(fake_run) == fake_run / "checkpoint-2"
    assert f"skipping {newer}: it has no trainer_state.json" in caplog.text


def test_resume_with_no_complete_checkpoint(fake_run, tiny_llama_dir, data_file, tmp_path, capsys, no_model_load):
    (fake_run / "checkpoint-2" / "trainer_state.json").unlink()
    config = write_config(tmp_path, tiny_llama_dir, data_file, output_dir=str(fake_run))
    error = one_line_error(capsys, "train", config, "--resume")
    assert "holds no complete checkpoint-N" in error


def test_convert_and_export_refuse_an_out_inside_the_input(dense_copy, fake_run, capsys):
    before = sorted(p.name for p in dense_copy.iterdir())
    error = one_line_error(capsys, "convert", dense_copy, dense_copy / "pesc", "--num-experts", "4")
    assert f"is inside the input {dense_copy.resolve()}" in error
    assert sorted(p.name for p in dense_copy.iterdir()) == before

    error = one_line_error(capsys, "export", fake_run, fake_run / "exported")
    assert f"is inside the input {fake_run.resolve()}" in error
    assert not (fake_run / "exported").exists()


@pytest.mark.parametrize("repo_id", ["user/name..x", "user/name.git", "user/" + "n" * 120])
def test_push_checks_the_repo_id_as_the_hub_does(repo_id, tmp_path, capsys):
    error = one_line_error(capsys, "push", tmp_path, "--repo-id", repo_id, "--dry-run")
    assert error.startswith("Error: --repo-id is not a valid Hub repository id (") and repo_id in error


# ---------------------------------------------------------------- messages that say what happened


class NotATensor:
    """An object a pickle can hold besides tensors (what a training script may leave in a .bin)."""


def test_a_bin_holding_objects_other_than_tensors_is_named_so(dense_copy, tmp_path, capsys):
    from safetensors.torch import load_file

    state = load_file(dense_copy / "model.safetensors")
    (dense_copy / "model.safetensors").unlink()
    torch.save({**state, "extra": NotATensor()}, dense_copy / "pytorch_model.bin")
    error = one_line_error(capsys, "convert", dense_copy, tmp_path / "out", "--num-experts", "4")
    assert "pytorch_model.bin holds objects other than tensors" in error and "NotATensor" in error
    assert "weights_only=True" in error and "truncated or corrupt" not in error
    assert not (tmp_path / "out").exists()


def test_a_truncated_gguf_file_is_named_truncated_not_unsupported(tmp_path, capsys):
    from pesc.testing.tiny_gguf import save_tiny_gguf

    gguf_file = save_tiny_gguf(tmp_path / "tiny.gguf")
    complete = gguf_file.stat().st_size
    for keep in (100, complete // 2, complete - 1):  # in the metadata, in the tensors, the last byte
        truncate(gguf_file, keep)
        for command in ("from-gguf", "convert"):
            error = one_line_error(capsys, command, gguf_file, tmp_path / "out")
            assert f"{gguf_file} is truncated or damaged" in error and f"from its {keep} bytes" in error, error
            assert "architecture" not in error
        gguf_file = save_tiny_gguf(gguf_file)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tiny.gguf"]


def test_a_fifo_as_data_file_is_not_taken_for_a_hub_dataset(tiny_llama_dir, tmp_path, capsys, no_model_load):
    import os

    fifo = tmp_path / "data.jsonl"
    os.mkfifo(fifo)
    error = one_line_error(capsys, "train", write_config(tmp_path, tiny_llama_dir, fifo))
    assert f"{fifo} is not a regular file or a folder" in error and "cannot load dataset" not in error
    assert not (tmp_path / "run").exists()


def test_import_camelidae_with_topk_above_num_experts_names_the_config_field(tiny_llama_dir, tmp_path, capsys):
    published = Path(shutil.copytree(tiny_llama_dir, tmp_path / "published"))
    config = json.loads((published / "config.json").read_text())
    config.update(model_type="camelidae", num_experts=2, topk=3, adapter_dim=8)
    (published / "config.json").write_text(json.dumps(config))
    error = one_line_error(capsys, "import", "camelidae", published, tmp_path / "out")
    assert f"{published}/config.json routes each token to topk 3 of its num_experts 2 experts" in error
    assert "set topk there to at most 2" in error and "--top-k" not in error
    assert not (tmp_path / "out").exists()
