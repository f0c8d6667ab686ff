"""The recipes and demo data shipped inside the package: `pesc recipes`, names wherever a recipe path is taken,
`pesc:NAME` demo data, and a wheel that trains and exports with no clone."""

import os
import shutil
import site
import subprocess
import sys
import venv
from pathlib import Path

import pytest
import yaml

from pesc.checkpoint.run_files import TRAIN_CONFIG_FILE
from pesc.errors import PescError
from pesc.recipe import RECIPES, demo_data, load_moe_settings, recipe_file, recipe_names, recipe_summary
from pesc.training.config import load_config
from helpers import assert_clean_error, run_cli

REPO = Path(__file__).resolve().parents[1]
TRAINING = [name for name in recipe_names() if not name.startswith("accelerate/")]
LAUNCH = [name for name in recipe_names() if name.startswith("accelerate/")]


def test_names_are_the_shipped_files():
    on_disk = sorted(path.relative_to(RECIPES).with_suffix("").as_posix() for path in RECIPES.rglob("*.yaml"))
    assert sorted(recipe_names()) == on_disk
    assert {"tiny", "quickstart", "camelidae-8x7b", "loramoe-tiny", "mov-tiny", "molora-tiny", "moelora-tiny",
            "accelerate/ddp", "accelerate/fsdp", "accelerate/deepspeed_zero3"} <= set(on_disk)


def test_recipes_lists_each_recipe_on_one_line(capsys):
    code, out, err = run_cli(capsys, "recipes")
    assert code == 0, err
    lines = out.splitlines()
    assert len(lines) == len(recipe_names())
    for line, name in zip(lines, recipe_names()):
        listed, kind, summary = line.split(maxsplit=2)
        path = RECIPES / f"{name}.yaml"
        method = "accelerate" if name in LAUNCH else yaml.safe_load(path.read_text()).get("method", "pesc")
        assert (listed, kind, summary) == (name, method, recipe_summary(path))


@pytest.mark.parametrize("name", recipe_names())
def test_every_recipe_says_what_it_is_for_in_its_first_line(name):
    summary = recipe_summary(RECIPES / f"{name}.yaml")
    assert summary.endswith(".") and 20 <= len(summary) <= 100, summary  # one sentence, one listing line


def test_show_prints_the_file_unchanged_and_names_an_unknown_recipe(capsys):
    code, out, err = run_cli(capsys, "recipes", "show", "tiny")
    assert code == 0 and out == (RECIPES / "tiny.yaml").read_text(), err
    code, _, err = run_cli(capsys, "recipes", "show", "tinyy")
    assert_clean_error(code, err, "tinyy does not exist, nor is it a recipe pesc ships", "tiny, ")


@pytest.mark.parametrize("name", TRAINING)
def test_every_training_recipe_validates(name):
    """Its training config, its method's settings (as `pesc convert --config` reads them) and its demo data."""
    config = load_config(name)
    raw = yaml.safe_load((RECIPES / f"{name}.yaml").read_text())
    assert config["method"] == raw.get("method") and config["moe"]
    load_moe_settings(name)
    for entry in config["datasets"]:
        if entry["path"].startswith("pesc:"):
            assert Path(demo_data(entry["path"])).is_file()


@pytest.mark.parametrize("name", LAUNCH)
def test_every_launch_config_is_an_accelerate_config(name):
    config = yaml.safe_load((RECIPES / f"{name}.yaml").read_text())
    assert config["distributed_type"] in ("MULTI_GPU", "FSDP", "DEEPSPEED") and config["num_processes"] >= 2


def test_an_existing_file_wins_over_a_name(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert recipe_file("tiny") == RECIPES / "tiny.yaml"
    Path("tiny").write_text("moe:\n  num_experts: 3\n")
    assert recipe_file("tiny") == Path("tiny")
    assert load_moe_settings("tiny") == {"num_experts": 3}
    Path("mov-tiny").mkdir()  # a folder is no recipe file: the name still means the shipped one
    assert recipe_file("mov-tiny") == RECIPES / "mov-tiny.yaml"
    with pytest.raises(PescError, match=r"recipe nowhere.yaml does not exist, nor is it a recipe pesc ships \(one "
                                        r"of: camelidae-8x7b, .*tiny"):
        recipe_file("nowhere.yaml")


def test_an_unknown_demo_data_name_lists_the_shipped_ones():
    assert demo_data("data/mine.jsonl") == "data/mine.jsonl"  # any other path is left to the working folder
    with pytest.raises(PescError, match=r"pesc:nope.jsonl: pesc ships no demo data of that name \(it ships "
                                        r"pesc:tiny_instruct.jsonl, pesc:tiny_t5_sums.jsonl, "
                                        r"pesc:tiny_two_tasks.jsonl\)"):
        demo_data("pesc:nope.jsonl")


def test_routes_reads_demo_data(tiny_llama_dir):
    from transformers import AutoTokenizer

    from pesc.routing_analysis.inputs import load_tasks

    tokenizer = AutoTokenizer.from_pretrained(tiny_llama_dir)
    [task] = load_tasks(["pesc:tiny_instruct.jsonl"], tokenizer, data_type="messages", chat_template="chatml",
                        sequence_len=256, limit=None)
    shipped = RECIPES / "data" / "tiny_instruct.jsonl"
    assert task.files == [str(shipped)] and len(task.rows) == len(shipped.read_text().splitlines())


def test_train_tiny_by_name_from_another_folder(tmp_path, tiny_llama_dir, monkeypatch, capsys):
    """The recipe as shipped: base_model and output_dir relative to the folder it runs in, its data from the
    package (that folder has no data/)."""
    monkeypatch.chdir(tmp_path)
    shutil.copytree(tiny_llama_dir, tmp_path / "runs" / "tiny-dense")
    code, out, err = run_cli(capsys, "train", "tiny", "--set", "max_steps=2")
    assert code == 0, err
    assert (tmp_path / "runs" / "tiny" / "final").is_dir() and "trained model: runs/tiny/final" in out
    saved = yaml.safe_load((tmp_path / "runs" / "tiny" / TRAIN_CONFIG_FILE).read_text())
    assert saved["datasets"][0]["path"] == "pesc:tiny_instruct.jsonl"  # the run folder stays portable


def _run(command: list[str], cwd: Path, env: dict) -> str:
    completed = subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=900, check=False)
    assert completed.returncode == 0, f"{command}\n{completed.stdout[-3000:]}\n{completed.stderr[-3000:]}"
    return completed.stdout


@pytest.mark.slow
def test_the_wheel_trains_and_exports_with_no_clone(tmp_path):
    """Built from a copy of the repository as a clone has it, installed in a fresh venv whose dependencies come
    from this environment (a .pth file; nothing downloaded), run from a folder outside the repository."""
    from helpers import fresh_copy

    source = fresh_copy(tmp_path / "source")
    _run([sys.executable, "-m", "pip", "wheel", str(source), "--no-deps", "--no-build-isolation", "-w",
          str(tmp_path / "dist")], tmp_path, dict(os.environ))
    wheel = next((tmp_path / "dist").glob("pesc_moe-*.whl"))

    env_dir = tmp_path / "venv"
    venv.create(env_dir, with_pip=True)
    python = env_dir / "bin" / "python"
    env = {key: value for key, value in os.environ.items() if key not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env.update(PATH=f"{env_dir / 'bin'}{os.pathsep}{env['PATH']}", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1",
               HF_DATASETS_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    _run([str(python), "-m", "pip", "install", "-q", "--no-deps", "--no-index", str(wheel)], tmp_path, env)
    # after the install: pip would take this environment's pesc (the repository's, editable) for the same version
    packages = _run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"], tmp_path, env)
    (Path(packages.strip()) / "dependencies.pth").write_text("".join(f"{path}\n" for path in site.getsitepackages()))

    work = tmp_path / "work"
    work.mkdir()
    imported = _run([str(python), "-c", "import pesc; print(pesc.__file__)"], work, env).strip()
    print("pesc imported from", imported)
    imported = Path(imported).resolve()
    assert imported.is_relative_to(env_dir.resolve()) and not imported.is_relative_to(REPO)
    locate = ("from importlib.metadata import files\n"
              "print(next(f for f in files('pesc-moe') if f.name == 'LICENSE').locate())")
    license_file = _run([str(python), "-c", locate], work, env)
    assert "Apache License" in Path(license_file.strip()).read_text()

    listing = _run(["pesc", "recipes"], work, env)
    assert [line.split()[0] for line in listing.splitlines()] == recipe_names()
    _run(["pesc", "tiny-model", "runs/tiny-dense"], work, env)
    _run(["pesc", "train", "tiny", "--set", "max_steps=2"], work, env)
    _run(["pesc", "export", "runs/tiny", "out/tiny"], work, env)
    assert (work / "out" / "tiny" / "config.json").is_file() and (work / "out" / "tiny" / "README.md").is_file()
