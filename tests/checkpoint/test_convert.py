"""`pesc convert`: streaming dense -> PESC conversion, end to end through the CLI."""

import errno
import threading
import json
import os
import shutil
import subprocess
import sys
import textwrap

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM

import pesc
import pesc.checkpoint.headers as headers_module
import pesc.checkpoint.shard_writer as shard_writer_module
import pesc.convert as convert_module
from pesc.testing import TINY_FAMILIES, save_tiny_dense
from helpers import SMALL, assert_clean_error, assert_nothing_left, read_tensors, run_cli


@pytest.fixture(scope="module")
def sources(tiny_dense_dirs, tmp_path_factory):
    """{(family, layout): folder} for layouts single-file, sharded safetensors and pickle .bin."""
    root = tmp_path_factory.mktemp("convert-src")
    folders = {}
    for family in TINY_FAMILIES:
        single = tiny_dense_dirs[family]
        folders[family, "single"] = single
        folders[family, "sharded"] = save_tiny_dense(root / f"{family}-sharded", family, max_shard_size="100KB")
        binary = root / f"{family}-bin"
        shutil.copytree(single, binary)
        torch.save(load_file(binary / "model.safetensors"), binary / "pytorch_model.bin")
        (binary / "model.safetensors").unlink()
        folders[family, "bin"] = binary
    return folders


@pytest.fixture(scope="module")
def dense_logits(sources):
    ids = torch.randint(0, 250, (2, 11), generator=torch.Generator().manual_seed(0))
    logits = {}
    for family in TINY_FAMILIES:
        model = AutoModelForCausalLM.from_pretrained(sources[family, "single"], dtype=torch.float32).eval()
        with torch.no_grad():
            logits[family] = model(ids).logits
    return ids, logits


@pytest.mark.parametrize("layout", ["single", "sharded", "bin"])
@pytest.mark.parametrize("family", TINY_FAMILIES)
def test_converted_model_computes_the_dense_model(family, layout, sources, dense_logits, tmp_path, capsys):
    out = tmp_path / "out"
    code, stdout, err = run_cli(capsys, "convert", sources[family, layout], out, *SMALL, "--max-shard-size", "40KB")
    assert code == 0, err
    assert "source" in stdout and "trainable (MoE)" in stdout and str(out) in stdout

    names = {p.name for p in out.iterdir()}
    assert {"config.json", "model.safetensors.index.json", "configuration_pesc.py", "modeling_pesc.py", "README.md",
            "tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "generation_config.json"} <= names
    assert not any(name.endswith(".bin") for name in names)
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == "pesc" and config["base_model_type"] == family
    assert config["architectures"] == ["PescForCausalLM"]
    assert config["auto_map"]["AutoModelForCausalLM"] == "modeling_pesc.PescForCausalLM"
    assert (config["num_experts"], config["num_experts_per_tok"], config["adapter_dim"]) == (4, 2, 8)

    # Every shard is listed in the index, none of the new ones exceeds --max-shard-size.
    index = json.loads((out / "model.safetensors.index.json").read_text())
    shards = sorted(p.name for p in out.glob("*.safetensors"))
    assert sorted(set(index["weight_map"].values())) == shards
    assert all(name.startswith("model-") and name.endswith(f"-of-{len(shards):05d}.safetensors") for name in shards)
    tensors = read_tensors(out)
    assert set(tensors) == set(index["weight_map"])
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in tensors.values())
    expert_shards = {index["weight_map"][k] for k in tensors if ".moe_adapter." in k}
    assert all((out / name).stat().st_size <= 40_000 + 4096 for name in expert_shards)

    ids, logits = dense_logits
    pesc.register_auto_classes()  # what pesc's commands do before they load; this test may run before any of them
    model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    assert isinstance(model, pesc.PescForCausalLM)
    with torch.no_grad():
        converted = model(ids).logits
    assert torch.equal(converted, logits[family])  # bit-exact at init: adapter_up is zero


def test_same_seed_gives_byte_identical_files(sources, tmp_path, capsys):
    src = sources["llama", "sharded"]
    for name, seed in (("a", "3"), ("b", "3"), ("c", "4")):
        code, _, err = run_cli(capsys, "convert", src, tmp_path / name, *SMALL[:-1], seed)
        assert code == 0, err
    files = sorted(p.name for p in (tmp_path / "a").iterdir())
    assert files == sorted(p.name for p in (tmp_path / "b").iterdir())
    for name in files:
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes(), name
    a, c = read_tensors(tmp_path / "a"), read_tensors(tmp_path / "c")
    assert not torch.equal(a["model.layers.0.mlp.moe_adapter.router.weight"], c["model.layers.0.mlp.moe_adapter.router.weight"])


def test_experts_equal_in_memory_upcycle(sources, tmp_path, capsys):
    src = sources["qwen2", "single"]
    code, _, err = run_cli(capsys, "convert", src, tmp_path / "out", *SMALL)
    assert code == 0, err
    dense = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32)
    upcycled = pesc.upcycle(dense, num_experts=4, top_k=2, adapter_dim=8, seed=3).state_dict()
    converted = read_tensors(tmp_path / "out")
    assert set(converted) == set(upcycled) - {"lm_head.weight"} | ({"lm_head.weight"} & set(converted))
    for name, tensor in converted.items():
        assert torch.equal(tensor, upcycled[name]), name
    assert any(".moe_adapter.experts.expert_3.adapter_up" in name for name in converted)


def test_recipe_settings_and_flags_win(sources, tmp_path, capsys):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("base_model: x\nmoe:\n  num_experts: 6\n  top_k: 3\n  adapter_dim: 4\n  moe_scaling: 0.5\n"
                      "lora_r: 8\ntraining: {lr: 1}\n")  # fmt: skip
    code, _, err = run_cli(capsys, "convert", sources["llama", "single"], tmp_path / "out", "--config", recipe,
                           "--adapter-dim", "12")  # fmt: skip
    assert code == 0, err
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert (config["num_experts"], config["num_experts_per_tok"], config["adapter_dim"], config["moe_scaling"]) == (
        6, 3, 12, 0.5)


def test_camelidae_recipe_holds_the_published_settings():
    from pesc.recipe import load_moe_settings

    moe = load_moe_settings("camelidae-8x7b")
    assert (moe["num_experts"], moe["top_k"], moe["adapter_dim"], moe["moe_scaling"]) == (8, 2, 512, 0.25)


def test_link_hard_links_the_base_shards(sources, tmp_path, capsys):
    src = sources["mistral", "sharded"]
    code, _, err = run_cli(capsys, "convert", src, tmp_path / "out", *SMALL, "--link")
    assert code == 0, err
    source_inodes = {p.stat().st_ino for p in src.glob("*.safetensors")}
    out_inodes = {p.stat().st_ino for p in (tmp_path / "out").glob("*.safetensors")}
    assert source_inodes <= out_inodes


def test_link_falls_back_to_copy_with_a_notice(sources, tmp_path, capsys, monkeypatch):
    def refuse(*args, **kwargs):
        raise OSError(errno.EXDEV, "Invalid cross-device link")

    monkeypatch.setattr(shard_writer_module.os, "link", refuse)
    src = sources["llama", "single"]
    code, _, err = run_cli(capsys, "convert", src, tmp_path / "out", *SMALL, "--link")
    assert code == 0, err
    assert "cannot hard-link" in err and "copying it instead" in err
    assert (tmp_path / "out" / "model-00001-of-00002.safetensors").read_bytes() == (src / "model.safetensors").read_bytes()


def test_force_replaces_only_a_folder_pesc_convert_wrote(sources, tmp_path, capsys):
    src, out = sources["llama", "single"], tmp_path / "out"
    assert run_cli(capsys, "convert", src, out, *SMALL)[0] == 0
    code, _, err = run_cli(capsys, "convert", src, out, *SMALL)
    assert_clean_error(code, err, "already exists", "--force")
    code, _, err = run_cli(capsys, "convert", src, out, "--num-experts", "5", "--force")
    assert code == 0, err
    assert json.loads((out / "config.json").read_text())["num_experts"] == 5
    assert [p.name for p in tmp_path.iterdir()] == ["out"]

    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "precious.txt").write_text("keep me")
    code, _, err = run_cli(capsys, "convert", src, foreign, "--force")
    assert_clean_error(code, err, "not written by pesc", "--force will not replace it")
    assert (foreign / "precious.txt").read_text() == "keep me"

    # Any folder a pesc command wrote (its marker) may be replaced, e.g. a `pesc export` output.
    exported = tmp_path / "exported"
    exported.mkdir()
    (exported / ".pesc-export").write_text("{}\n")
    code, _, err = run_cli(capsys, "convert", src, exported, *SMALL, "--force")
    assert code == 0, err
    assert (exported / ".pesc-convert").is_file() and not (exported / ".pesc-export").exists()


# --------------------------------------------------------------------------------------
# Bad input: one line, exit != 0, nothing left behind
# --------------------------------------------------------------------------------------
def _copy(src, tmp_path):
    return shutil.copytree(src, tmp_path / "src")


def _rewrite_weights(folder, edit):
    path = folder / "model.safetensors"
    tensors = load_file(path)
    edit(tensors)
    save_file(tensors, path, metadata={"format": "pt"})


def _truncate(folder):
    path = folder / "model.safetensors"
    os.truncate(path, path.stat().st_size - 100)


def _garbage_header(folder):
    path = folder / "model.safetensors"
    data = bytearray(path.read_bytes())
    data[8:40] = b"\x00not json at all\xff" * 2
    path.write_bytes(bytes(data))


def _save_tiny(family_config):
    def make(tmp_path):
        from transformers import AutoConfig

        config = AutoConfig.for_model(**family_config)
        model = AutoModelForCausalLM.from_config(config)
        model.save_pretrained(tmp_path / "src")
        return tmp_path / "src"

    return make


BAD_SOURCES = {
    "missing": (lambda src, tmp: tmp / "no-such-folder", ["does not exist"]),
    "not-a-model": (lambda src, tmp: (tmp / "src").mkdir() or tmp / "src", ["not a model folder", "config.json"]),
    "no-weights": (
        lambda src, tmp: (_copy(src, tmp), (tmp / "src" / "model.safetensors").unlink())[0],
        ["no weights"],
    ),
    "gpt2": (
        lambda src, tmp: _save_tiny(dict(model_type="gpt2", n_embd=32, n_layer=1, n_head=2, vocab_size=64))(tmp),
        ["unsupported architecture", "gpt2"],
    ),
    "phi3": (
        lambda src, tmp: _save_tiny(
            dict(model_type="phi3", hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                 num_key_value_heads=2, vocab_size=64, pad_token_id=0)  # fmt: skip
        )(tmp),
        ["unsupported architecture", "phi3"],
    ),
    "missing-ffn-tensor": (
        lambda src, tmp: (d := _copy(src, tmp), _rewrite_weights(d, lambda t: t.pop("model.layers.1.mlp.up_proj.weight")))[0],
        ["weights don't match config.json", "model.layers.1.mlp.up_proj.weight"],
    ),
    "wrong-shape": (
        lambda src, tmp: (
            d := _copy(src, tmp),
            _rewrite_weights(d, lambda t: t.update({"model.layers.0.mlp.down_proj.weight": torch.zeros(64, 100)})),
        )[0],
        ["weights don't match config.json", "model.layers.0.mlp.down_proj.weight", "[64, 100]"],
    ),
    "extra-tensor": (
        lambda src, tmp: (d := _copy(src, tmp), _rewrite_weights(d, lambda t: t.update({"model.bogus.weight": torch.zeros(2)})))[0],
        ["weights don't match config.json", "model.bogus.weight"],
    ),
    "truncated": (lambda src, tmp: (d := _copy(src, tmp), _truncate(d))[0], ["truncated or corrupt"]),
    "corrupt-header": (lambda src, tmp: (d := _copy(src, tmp), _garbage_header(d))[0], ["truncated or corrupt"]),
    "corrupt-bin": (
        lambda src, tmp: (
            d := _copy(src, tmp),
            (d / "model.safetensors").unlink(),
            (d / "pytorch_model.bin").write_bytes(b"PK\x03\x04 this is not a torch checkpoint"),
        )[0],
        ["truncated or corrupt", "pytorch_model.bin"],
    ),
    "hub-id-offline": (lambda src, tmp: "nonexistent-org-pesc/no-such-model", ["could not be fetched", "download it first"]),
}


@pytest.mark.parametrize("case", list(BAD_SOURCES))
def test_bad_source_gives_one_line_and_leaves_nothing(case, tiny_llama_dir, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    make, phrases = BAD_SOURCES[case]
    work = tmp_path / "work"
    work.mkdir()
    src = make(tiny_llama_dir, work)
    outdir = tmp_path / "outs"
    outdir.mkdir()
    code, _, err = run_cli(capsys, "convert", src, outdir / "out", *SMALL)
    assert_clean_error(code, err, *phrases)
    assert list(outdir.iterdir()) == []


def test_already_pesc_is_refused(tiny_llama_dir, tmp_path, capsys):
    first = tmp_path / "pesc"
    assert run_cli(capsys, "convert", tiny_llama_dir, first, *SMALL)[0] == 0
    code, _, err = run_cli(capsys, "convert", first, tmp_path / "out", *SMALL)
    assert_clean_error(code, err, "already a PESC checkpoint")
    assert_nothing_left(tmp_path)

    # A dense config whose weights already hold experts (e.g. a Camelidae-style folder) too.
    mixed = shutil.copytree(tiny_llama_dir, tmp_path / "mixed")
    _rewrite_weights(mixed, lambda t: t.update({"model.layers.0.mlp.moe_adapter.router.weight": torch.zeros(4, 64)}))
    code, _, err = run_cli(capsys, "convert", mixed, tmp_path / "out", *SMALL)
    assert_clean_error(code, err, "already holds PESC experts")
    assert_nothing_left(tmp_path)


@pytest.mark.parametrize(
    "args, phrases",
    [
        (["--num-experts", "2", "--top-k", "3"], ["top_k (3) cannot exceed num_experts (2)"]),
        (["--adapter-dim", "0"], ["adapter_dim must be a positive integer"]),
        (["--num-experts", "-1"], ["num_experts must be a positive integer"]),
        (["--max-shard-size", "0"], ["--max-shard-size must be positive"]),
        (["--max-shard-size", "lots"], ["is not a size"]),
        (["--moe-scaling", "-1"], ["moe_scaling must be a positive number"]),
        (["--config", "RECIPE_UNKNOWN"], ["unknown key(s) in moe: num_expert"]),
        (["--config", "RECIPE_NO_MOE"], ["no `moe:` section"]),
        (["--config", "RECIPE_MISSING"], ["does not exist"]),
    ],
)
def test_invalid_settings(args, phrases, tiny_llama_dir, tmp_path, capsys):
    (tmp_path / "unknown.yaml").write_text("moe:\n  num_expert: 8\n  top_k: 2\n")
    (tmp_path / "nomoe.yaml").write_text("lora_r: 8\n")
    recipes = {"RECIPE_UNKNOWN": tmp_path / "unknown.yaml", "RECIPE_NO_MOE": tmp_path / "nomoe.yaml",
               "RECIPE_MISSING": tmp_path / "missing.yaml"}  # fmt: skip
    args = [recipes.get(a, a) for a in args]
    code, _, err = run_cli(capsys, "convert", tiny_llama_dir, tmp_path / "out", *args)
    assert_clean_error(code, err, *phrases)
    assert_nothing_left(tmp_path)


@pytest.mark.parametrize("target", ["write_safetensors", "copy_file"])
def test_disk_full_mid_write_leaves_nothing(target, sources, tmp_path, capsys, monkeypatch):
    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(shard_writer_module, target, full)
    code, _, err = run_cli(capsys, "convert", sources["llama", "sharded"], tmp_path / "out", *SMALL)
    assert_clean_error(code, err, "disk full", "free some space")
    assert_nothing_left(tmp_path)


@pytest.mark.parametrize("free_after_base", [True, False], ids=["experts-do-not-fit", "base-does-not-fit"])
def test_too_little_disk_space_is_refused(free_after_base, sources, tmp_path, capsys, monkeypatch):
    """Checked before the base shards start copying, and again (for the rest) once the plan knows the experts."""
    from collections import namedtuple

    usage = namedtuple("usage", "total used free")
    answers = [10**12 if free_after_base else 1000, 1000]  # room for the base at the first check, or not
    calls = []

    def disk_usage(path):
        calls.append(path)
        return usage(10**12, 0, answers[len(calls) - 1])

    monkeypatch.setattr(shard_writer_module.shutil, "disk_usage", disk_usage)
    code, _, err = run_cli(capsys, "convert", sources["llama", "sharded"], tmp_path / "out", *SMALL)
    assert_clean_error(code, err, "not enough disk space", "free some space")
    assert_nothing_left(tmp_path)
    assert len(calls) == (2 if free_after_base else 1)


def test_base_shards_start_copying_before_the_plan_checks(sources, tmp_path, capsys, monkeypatch):
    """The copy overlaps the plan's torch/transformers imports and checks instead of following them."""
    copying = threading.Event()
    real_copy, real_plan = shard_writer_module.copy_file, convert_module.plan_conversion

    def copy_file(*args, **kwargs):
        copying.set()
        return real_copy(*args, **kwargs)

    def plan_conversion(*args, **kwargs):
        assert copying.wait(30), "the plan ran before any base shard started copying"
        return real_plan(*args, **kwargs)

    monkeypatch.setattr(shard_writer_module, "copy_file", copy_file)
    monkeypatch.setattr(convert_module, "plan_conversion", plan_conversion)
    code, _, err = run_cli(capsys, "convert", sources["llama", "sharded"], tmp_path / "out", *SMALL)
    assert code == 0, err
    names = sorted(p.name for p in (tmp_path / "out").glob("*.safetensors"))
    assert names and all(n.startswith("model-") for n in names)  # provisional base-N names were renamed


def test_zero_tensors_are_left_as_holes_that_read_back_exactly(tmp_path):
    tensors = {
        "zeros_middle": torch.zeros(64, 64, dtype=torch.bfloat16),
        "values": torch.randn(8, 8),
        "negative_zeros": torch.full((4,), -0.0),  # all-zero as numbers, not as bytes: must be written
        "zeros_last": torch.zeros(1000, dtype=torch.float16),
    }
    infos = [
        headers_module.TensorInfo(name, headers_module._safetensors_dtype(t.dtype), tuple(t.shape))
        for name, t in tensors.items()
    ]
    path = tmp_path / "experts.safetensors"
    shard_writer_module.write_safetensors(path, infos, tensors.values())
    loaded = load_file(path)
    for name, tensor in tensors.items():
        assert loaded[name].view(torch.uint8).equal(tensor.view(torch.uint8)), name
    header_bytes = 8 + int.from_bytes(path.read_bytes()[:8], "little")
    assert path.stat().st_size == header_bytes + sum(t.numel() * t.element_size() for t in tensors.values())


def test_interrupt_mid_write_leaves_nothing(sources, tmp_path, capsys, monkeypatch):
    real = shard_writer_module.write_safetensors
    calls = []

    def interrupted(path, *args, **kwargs):
        calls.append(path)
        if len(calls) == 2:
            path.write_bytes(b"half")
            raise KeyboardInterrupt
        return real(path, *args, **kwargs)

    monkeypatch.setattr(shard_writer_module, "write_safetensors", interrupted)
    code, _, err = run_cli(capsys, "convert", sources["llama", "single"], tmp_path / "out", *SMALL,
                           "--max-shard-size", "10KB")  # fmt: skip
    assert code == 130
    assert ("Interrupted" in err or "Aborted" in err) and "Traceback" not in err
    assert_nothing_left(tmp_path)


def test_script_entry_point(tiny_llama_dir, tmp_path, capsys, monkeypatch):
    import runpy

    script = os.path.join(os.path.dirname(__file__), "..", "..", "convert.py")
    monkeypatch.setattr(sys, "argv", ["convert.py", str(tiny_llama_dir), str(tmp_path / "out"), "--top-k", "9"])
    with pytest.raises(SystemExit) as exit_:
        runpy.run_path(script, run_name="__main__")
    assert exit_.value.code == 1
    assert capsys.readouterr().err.strip() == "Error: top_k (9) cannot exceed num_experts (8)"
    monkeypatch.setattr(sys, "argv", ["convert.py", str(tiny_llama_dir), str(tmp_path / "out"), *SMALL])
    runpy.run_path(script, run_name="__main__")
    assert (tmp_path / "out" / "config.json").is_file()


def test_output_loads_without_pesc(sources, dense_logits, tmp_path, capsys):
    from pesc.testing.isolated import run_without_pesc

    out = tmp_path / "out"
    assert run_cli(capsys, "convert", sources["llama", "sharded"], out, *SMALL)[0] == 0
    ids, logits = dense_logits
    result = run_without_pesc(
        f"""
        import torch
        from transformers import AutoModelForCausalLM
        model = AutoModelForCausalLM.from_pretrained({str(out)!r}, trust_remote_code=True, dtype=torch.float32).eval()
        torch.set_num_threads(2)  # as conftest sets it for the dense logits: the same kernels, bit for bit
        with torch.no_grad():
            logits = model(torch.tensor({ids.tolist()})).logits
        emit({{"logits": logits.tolist(), "cls": type(model).__name__}})
        """,
        timeout=120,
    )
    assert result["cls"] == "PescForCausalLM"
    assert torch.equal(torch.tensor(result["logits"]), logits["llama"])  # JSON floats round-trip float32 exactly


# --------------------------------------------------------------------------------------
# Streaming: peak memory far below the checkpoint's size
# --------------------------------------------------------------------------------------
def _write_big_llama(folder, layers=8, hidden=1024, intermediate=2816, vocab=32000):
    """A Llama-shaped bf16 checkpoint (~330 MB), written shard by shard with safetensors directly."""
    from transformers import LlamaConfig

    folder.mkdir()
    config = LlamaConfig(hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=layers,
                         num_attention_heads=8, num_key_value_heads=8, vocab_size=vocab, dtype="bfloat16")  # fmt: skip
    config.save_pretrained(folder)
    groups = [{"model.embed_tokens.weight": (vocab, hidden)}]
    for i in range(layers):
        p = f"model.layers.{i}."
        groups.append({
            p + "self_attn.q_proj.weight": (hidden, hidden), p + "self_attn.k_proj.weight": (hidden, hidden),
            p + "self_attn.v_proj.weight": (hidden, hidden), p + "self_attn.o_proj.weight": (hidden, hidden),
            p + "mlp.gate_proj.weight": (intermediate, hidden), p + "mlp.up_proj.weight": (intermediate, hidden),
            p + "mlp.down_proj.weight": (hidden, intermediate),
            p + "input_layernorm.weight": (hidden,), p + "post_attention_layernorm.weight": (hidden,),
        })  # fmt: skip
    groups.append({"model.norm.weight": (hidden,), "lm_head.weight": (vocab, hidden)})
    shards = [groups[0] | groups[1] | groups[2], *[a | b for a, b in zip(groups[3::2], groups[4::2])], groups[-1]]
    weight_map, total = {}, 0
    for number, shard in enumerate(shards, 1):
        name = f"model-{number:05d}-of-{len(shards):05d}.safetensors"
        tensors = {k: torch.ones(shape, dtype=torch.bfloat16) for k, shape in shard.items()}
        save_file(tensors, folder / name, metadata={"format": "pt"})
        total += sum(t.numel() * 2 for t in tensors.values())
        weight_map.update(dict.fromkeys(shard, name))
        del tensors
    (folder / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map})
    )
    return total


def test_streaming_conversion_peak_memory_is_far_below_checkpoint_size(tmp_path):
    src = tmp_path / "big"
    size = _write_big_llama(src)
    assert size > 300_000_000
    code = textwrap.dedent(
        f"""
        import json, resource, sys
        import transformers, pesc.convert, pesc.methods.pesc.upcycling, pesc.summary, tqdm.auto
        from huggingface_hub import ModelCard
        from transformers import LlamaForCausalLM
        from pesc.cli import main
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        main(["convert", {str(src)!r}, {str(tmp_path / "out")!r}, "--adapter-dim", "64", "--max-shard-size", "50MB"])
        after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        print(json.dumps({{"before": before, "after": after}}))
        """
    )
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    peaks = json.loads(result.stdout.strip().splitlines()[-1])
    growth = peaks["after"] - peaks["before"]
    assert growth < size / 5, f"RSS grew by {growth / 1e6:.0f} MB converting a {size / 1e6:.0f} MB checkpoint"
    index = json.loads((tmp_path / "out" / "model.safetensors.index.json").read_text())
    assert len(index["weight_map"]) == 8 * 9 + 3 + 8 * (1 + 8 * 2)


# --------------------------------------------------------------------------------------
# `pesc tiny-model OUT`: the same output-folder rules (pesc.atomic), without --force
# --------------------------------------------------------------------------------------
def test_tiny_model_writes_a_new_or_empty_folder(tmp_path, capsys):
    code, _, err = run_cli(capsys, "tiny-model", tmp_path / "new")
    assert code == 0, err
    assert json.loads((tmp_path / "new" / "config.json").read_text())["model_type"] == "llama"
    (tmp_path / "empty").mkdir()
    code, _, err = run_cli(capsys, "tiny-model", tmp_path / "empty", "--family", "qwen2")
    assert code == 0, err
    assert json.loads((tmp_path / "empty" / "config.json").read_text())["model_type"] == "qwen2"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["empty", "new"]  # no temporary folder left


def test_tiny_model_refuses_an_existing_folder(tmp_path, capsys):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "notes.txt").write_text("keep me")
    code, _, err = run_cli(capsys, "tiny-model", out)
    assert_clean_error(code, err, "already exists", "remove it first")
    assert "--force" not in err
    assert [p.name for p in out.iterdir()] == ["notes.txt"]
    assert [p.name for p in tmp_path.iterdir()] == ["mine"]
