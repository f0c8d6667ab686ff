"""Faults a user meets outside the happy path: a full disk, a killed process, a huge setting, NaN weights.

Each ends in one line and an exit status, leaves no half-written output, and loses no earlier output.
"""

import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time

import pytest
import torch
from safetensors.torch import load_file, save_file

from helpers import assert_clean_error, assert_nothing_left, make_config, official_state, run_cli, write_adapter

DISK_FULL = "Error while serializing: I/O error: No space left on device (os error 28)"  # safetensors' own words


def assert_error_line(code, err, *phrases):
    """Exit 1, no traceback, and one `Error:` line, the last: progress lines of the steps that ran may precede it."""
    lines = [line for line in err.strip().splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("Error: ")]
    assert code == 1 and "Traceback" not in err and errors == lines[-1:], err
    for phrase in phrases:
        assert phrase in errors[0], errors[0]


def _a_dead_pid() -> int:
    """The pid of a process that has exited (so no live process can own a leftover named after it)."""
    process = subprocess.Popen([sys.executable, "-c", "pass"])
    process.wait()
    return process.pid


@pytest.mark.parametrize("command", ["tiny-model", "export"])
def test_a_full_disk_is_one_line_and_leaves_nothing(command, trained_run, tmp_path, capsys, monkeypatch):
    """safetensors reports ENOSPC as its own SafetensorError (not an OSError): it used to escape as a traceback."""
    from safetensors import SafetensorError

    def full(*args, **kwargs):
        raise SafetensorError(DISK_FULL)

    from transformers.utils import logging as hf_logging

    monkeypatch.setattr("transformers.modeling_utils.safe_save_file", full)
    hf_logging.disable_progress_bar()  # its bar is drawn on stderr before the write fails
    args = {"tiny-model": ["tiny-model", tmp_path / "out"],
            "export": ["export", trained_run, tmp_path / "out", "--dtype", "float32"]}[command]
    try:
        code, _, err = run_cli(capsys, *args)
    finally:
        hf_logging.enable_progress_bar()
    assert_error_line(code, err, "disk full while writing", "free some space")
    assert_nothing_left(tmp_path)


def test_leftovers_of_a_killed_run_are_removed_and_a_folder_being_replaced_is_restored(tmp_path, capsys):
    """A SIGKILL leaves `.OUT.pesc-tmp-PID` (and, mid --force, the old OUT as `.OUT.pesc-tmp-old-PID`)."""
    dead = _a_dead_pid()
    half_written = tmp_path / f".first.pesc-tmp-{dead}"
    (half_written / "sub").mkdir(parents=True)
    replaced = tmp_path / f".second.pesc-tmp-old-{dead}"  # OUT was moved aside, the new one never moved in
    replaced.mkdir()
    (replaced / "config.json").write_text("{}")
    live = tmp_path / f".third.pesc-tmp-{os.getpid()}"  # a run still writing: not touched
    live.mkdir()
    not_ours = tmp_path / ".fourth.pesc-tmp-abc"
    not_ours.mkdir()
    code, _, err = run_cli(capsys, "tiny-model", tmp_path / "new")
    assert code == 0
    assert not half_written.exists() and live.exists() and not_ours.exists()
    assert (tmp_path / "second" / "config.json").read_text() == "{}" and not replaced.exists()
    assert f"removed {half_written}" in err and f"restored {tmp_path / 'second'}" in err


def test_sigterm_unwinds_like_ctrl_c(tmp_path):
    """`kill PID` mid-write: exit 130, the interrupted message, no temporary folder left."""
    out = tmp_path / "out"
    script = textwrap.dedent(f"""
        import time
        import pesc.testing
        def slow(folder, *args, **kwargs):
            (folder / "partial").write_text("x")
            print("writing", flush=True)
            time.sleep(60)
        pesc.testing.save_tiny_dense = slow
        from pesc.cli import main
        main(["tiny-model", {str(out)!r}])
    """)
    process = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert process.stdout.readline().strip() == "writing"
    process.send_signal(signal.SIGTERM)
    _, err = process.communicate(timeout=60)
    assert process.returncode == 130, err
    assert err.strip().splitlines()[-1] == "Interrupted; nothing was left half-written."
    assert list(tmp_path.iterdir()) == []


def test_a_huge_number_of_experts_is_refused_at_once_with_its_size(tiny_llama_dir, tmp_path, capsys):
    """It used to hang for minutes building 10^8 modules per layer; now it is sized in closed form first."""
    started = time.monotonic()
    code, _, err = run_cli(capsys, "convert", tiny_llama_dir, tmp_path / "out", "--num-experts", "100000000")
    assert_clean_error(code, err, "100,000,000 experts", "lower --num-experts")
    assert "TB" in err  # the estimated size: 10^8 experts x 2 layers x 2·64·512 float32 adapters
    assert time.monotonic() - started < 120  # a generous bound against the hang, not a timing of the feature
    assert_nothing_left(tmp_path)


@pytest.mark.parametrize("method", ["pesc", "loramoe", "mov", "molora", "moelora"])
def test_the_added_parameters_are_sized_exactly_from_the_config(method, tiny_llama_dir):
    """The closed form (two probe models, extended linearly) equals the count of the model actually built."""
    from pesc.checkpoint.config import read_config
    from pesc.methods import get_method

    chosen = get_method(method)
    config = chosen.config_from_dense(read_config(tiny_llama_dir), chosen.resolve_settings({"num_experts": 6}, ""))
    with torch.device("meta"):
        model = chosen.model_class(config)
    built = sum(p.numel() for n, p in model.named_parameters() if chosen.is_added(n))
    assert built > 0 and chosen.added_params_estimate(config) == built


def _with_nan(folder, name_part: str) -> str:
    """Put a NaN into the first tensor whose name contains `name_part`; returns its name."""
    for path in sorted(folder.glob("*.safetensors")):
        tensors = load_file(path)
        name = next((n for n in tensors if name_part in n), None)
        if name is not None:
            tensors[name].view(-1)[0] = float("nan")
            save_file(tensors, path, metadata={"format": "pt"})
            return name
    raise AssertionError(f"no tensor named like {name_part}")


def test_compare_and_generate_say_when_a_model_computes_nan(exported, tiny_llama_dir, tmp_path, capsys):
    broken = shutil.copytree(exported, tmp_path / "broken")
    _with_nan(broken, "router")
    code, out, err = run_cli(capsys, "compare", tiny_llama_dir, broken)
    assert_error_line(code, err, "non-finite logits", str(broken))
    code, out, err = run_cli(capsys, "generate", broken, "--prompt", "Hi", "--max-new-tokens", "3")
    assert_error_line(code, err, "non-finite logits", "cannot generate")


def test_export_refuses_a_run_with_nan_weights(trained_run, tmp_path, capsys):
    run = shutil.copytree(trained_run, tmp_path / "run")
    experts = next(run.rglob("experts.safetensors"))
    tensors = load_file(experts)
    name = next(iter(sorted(tensors)))
    tensors[name].view(-1)[-1] = float("inf")
    save_file(tensors, experts, metadata={"format": "pt"})
    code, _, err = run_cli(capsys, "export", run, tmp_path / "out", "--dtype", "float32")
    assert_error_line(code, err, "NaN or inf", name.split("model.layers.", 1)[-1])
    assert_nothing_left(tmp_path)


def test_convert_refuses_to_write_a_non_finite_new_tensor(tiny_llama_dir, tmp_path, capsys, monkeypatch):
    """The tensors convert creates are checked as they are written (a method whose draw overflowed)."""
    from pesc.methods import get_method

    pesc_method = get_method("pesc")
    draw = pesc_method.initial_state

    def overflowing(config, layer_idx, seed):
        state = draw(config, layer_idx, seed)
        name = sorted(state)[0]
        state[name] = state[name].clone()
        state[name].view(-1)[0] = float("inf")
        return state

    monkeypatch.setattr(pesc_method, "initial_state", overflowing)
    code, _, err = run_cli(capsys, "convert", tiny_llama_dir, tmp_path / "out", "--num-experts", "2")
    assert_clean_error(code, err, "NaN or inf", "model.layers.0.")
    assert_nothing_left(tmp_path)


def test_import_loramoe_refuses_a_nan_router(tiny_llama_dir, tmp_path, capsys):
    from transformers import AutoModelForCausalLM


    state = official_state(AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32))
    name = next(n for n in sorted(state) if "lora_route" in n)
    state[name] = state[name].clone()
    state[name].view(-1)[0] = float("nan")
    adapter = write_adapter(tmp_path / "adapter", state)
    code, _, err = run_cli(capsys, "import", "loramoe", adapter, tmp_path / "out", "--base", tiny_llama_dir)
    assert_clean_error(code, err, "NaN or inf", "lora_route")
    assert_nothing_left(tmp_path)


def test_a_user_file_named_like_a_leftover_is_never_removed(tmp_path):
    """Only `.NAME.pesc-tmp-[old-]PID` folders are pesc's; a file of the same name is left alone."""
    from pesc.atomic import recover_leftovers

    dead = _a_dead_pid()
    user_file = tmp_path / f".notes.pesc-tmp-{dead}"
    user_file.write_text(json.dumps({"mine": True}))
    recover_leftovers(tmp_path, echo=lambda message: None)
    assert user_file.exists()


def test_train_refuses_experts_that_cannot_fit_in_memory_before_building_them(tiny_llama_dir, tmp_path, capsys,
                                                                               monkeypatch):

    def refuse(*args, **kwargs):
        raise AssertionError("the model must not load when its settings cannot fit")

    monkeypatch.setattr("pesc.training.model.load_base_model", refuse)
    data = tmp_path / "rows.jsonl"
    data.write_text(json.dumps({"messages": [{"role": "user", "content": "hi"},
                                             {"role": "assistant", "content": "hello"}]}) + "\n")
    config = make_config(tmp_path, tiny_llama_dir, data, output_dir=str(tmp_path / "run"))
    code, _, err = run_cli(capsys, "train", config, "--set", "moe.num_experts=100000000")
    assert_error_line(code, err, "moe: these settings add", "100,000,000 experts", "lower moe.num_experts")
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("args, phrase", [
    (["generate", "MODEL", "--prompt", "hi", "--temperature", "nan"], "--temperature must be a number >= 0"),
    (["compare", "MODEL", "MODEL", "--atol", "nan"], "--atol must be a number >= 0"),
    (["compare", "MODEL", "MODEL", "--prompt", ""], "--prompt is empty"),
    (["tiny-model", "OUT", "--seed", "-1"], "--seed"),
    (["export", "RUN", "OUT", "--max-shard-size", "lots"], "--max-shard-size 'lots' is not a size"),
    (["train", "FOLDER"], "is a folder: give the YAML file"),
    (["convert", "MODEL", "OUT", "--method", "moelora", "--sites", "q_proj,q_proj"], "distinct linears"),
], ids=["nan-temperature", "nan-atol", "empty-prompt", "negative-seed", "bad-shard-size", "config-folder",
        "site-twice"])
def test_values_the_audit_found_passing_are_refused(args, phrase, tiny_llama_dir, trained_run, tmp_path, capsys):
    """Found by scripts/audit_bad_inputs.py: each used to exit 0, or fail with a message that did not name it."""
    names = {"MODEL": tiny_llama_dir, "OUT": tmp_path / "out", "RUN": trained_run, "FOLDER": tmp_path}
    code, _, err = run_cli(capsys, *[names.get(arg, arg) for arg in args])
    assert code not in (0, None) and phrase in err and "Traceback" not in err, err
    assert not (tmp_path / "out").exists()


def test_push_names_a_truncated_shard_before_sending_anything(exported, tmp_path, capsys):
    folder = shutil.copytree(exported, tmp_path / "model")
    shard = next(folder.glob("*.safetensors"))
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])
    code, _, err = run_cli(capsys, "push", folder, "--repo-id", "someone/model", "--dry-run")
    assert_clean_error(code, err, shard.name, "truncated")


def test_a_library_error_prints_its_first_line_only(tiny_llama_dir, tmp_path, capsys):
    """transformers' errors run to many lines of advice; the CLI keeps the line that says what went wrong."""
    folder = shutil.copytree(tiny_llama_dir, tmp_path / "no-tokenizer")
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja"):
        (folder / name).unlink(missing_ok=True)
    code, _, err = run_cli(capsys, "generate", folder, "--prompt", "hi", "--max-new-tokens", "2")
    assert_error_line(code, err)


def test_weights_that_do_not_match_config_json_are_named_not_a_traceback(tiny_llama_dir, tmp_path, capsys):
    folder = shutil.copytree(tiny_llama_dir, tmp_path / "other-vocab")
    config = json.loads((folder / "config.json").read_text())
    config["vocab_size"] += 4
    (folder / "config.json").write_text(json.dumps(config))
    code, _, err = run_cli(capsys, "compare", tiny_llama_dir, folder)
    assert_error_line(code, err, "weights don't match its config.json")


def test_inspect_refuses_setting_flags_on_a_converted_checkpoint(exported, capsys):
    """They used to be ignored silently: the counts printed were the checkpoint's, not what the flag asked."""
    code, _, err = run_cli(capsys, "inspect", exported, "--num-experts", "16")
    assert_clean_error(code, err, "--num-experts", "already a PESC checkpoint")


def test_import_loramoe_blames_lora_nums_when_it_disagrees_with_the_weights(tiny_llama_dir, tmp_path, capsys):
    from transformers import AutoModelForCausalLM


    state = official_state(AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32), num_experts=4)
    adapter = write_adapter(tmp_path / "adapter", state, lora_nums=6)
    code, _, err = run_cli(capsys, "import", "loramoe", adapter, tmp_path / "out", "--base", tiny_llama_dir)
    assert_clean_error(code, err, "lora_nums 6", "hold 4 experts")
    assert_nothing_left(tmp_path, "out")


def test_import_camelidae_never_writes_into_its_source(tiny_llama_dir, tmp_path, capsys, monkeypatch):
    """OUT inside SRC is refused before the temporary folder is made (it used to appear inside SRC first)."""
    import pesc.atomic

    source = shutil.copytree(tiny_llama_dir, tmp_path / "camelidae")
    made = []
    real_mkdir = pesc.atomic.Path.mkdir

    def watch_mkdir(self, *args, **kwargs):
        made.append(self)
        return real_mkdir(self, *args, **kwargs)

    monkeypatch.setattr(pesc.atomic.Path, "mkdir", watch_mkdir)
    code, _, err = run_cli(capsys, "import", "camelidae", source, source / "out")
    assert_clean_error(code, err, "is inside the input")
    assert not any(source in path.parents for path in made)


@pytest.mark.parametrize("damage, phrase", [
    (lambda config: [config], "is not a JSON object"),
    (lambda config: {**config, "hidden_size": "sixty-four"}, "hidden_size must be a positive integer"),
    (lambda config: {**config, "num_hidden_layers": -2}, "num_hidden_layers must be a positive integer"),
], ids=["a-list", "a-string-size", "negative-layers"])
@pytest.mark.parametrize("command", ["convert", "inspect"])
def test_a_damaged_config_json_is_one_line(command, damage, phrase, tiny_llama_dir, tmp_path, capsys):
    folder = shutil.copytree(tiny_llama_dir, tmp_path / "src")
    (folder / "config.json").write_text(json.dumps(damage(json.loads((folder / "config.json").read_text()))))
    out = [tmp_path / "out"] if command == "convert" else []
    code, _, err = run_cli(capsys, command, folder, *out)
    assert_clean_error(code, err, phrase)
