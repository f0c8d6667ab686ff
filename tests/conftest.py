"""Shared fixtures: tiny dense checkpoints of real families, built locally (no network), and training data.

The shared helpers that are not fixtures are in helpers.py."""

import json
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402
import torch  # noqa: E402

from pesc.testing import TINY_FAMILIES, save_tiny_dense  # noqa: E402
from pesc.testing.trained_run import save_fake_trained_run  # noqa: E402
from helpers import training_rows  # noqa: E402

# Two threads, as CI's machine has, unless OMP_NUM_THREADS asks for another count (the tests must hold at any).
torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS") or 2))


@pytest.fixture(scope="session")
def tiny_dense_dirs(tmp_path_factory):
    """One saved tiny dense checkpoint per family: {family: path}."""
    root = tmp_path_factory.mktemp("dense")
    return {family: save_tiny_dense(root / family, family) for family in TINY_FAMILIES}


@pytest.fixture(scope="session")
def tiny_llama_dir(tiny_dense_dirs):
    return tiny_dense_dirs["llama"]


@pytest.fixture(scope="module")
def data_file(tmp_path_factory):
    """A JSONL file of 48 chat rows (`helpers.training_rows`)."""
    path = tmp_path_factory.mktemp("data") / "instruct.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in training_rows()))
    return path


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory, tiny_llama_dir):
    """A run folder as training leaves it (4 experts, top-2, adapter_dim 16, non-zero LoRA and experts)."""
    run = tmp_path_factory.mktemp("run") / "run"
    save_fake_trained_run(run, tiny_llama_dir)
    return run


@pytest.fixture(scope="module")
def exported(trained_run, tmp_path_factory):
    """`trained_run` exported in float32."""
    from pesc.export import export

    out = tmp_path_factory.mktemp("export") / "pesc-tiny"
    export(trained_run, out, dtype="float32", log=lambda message: None)
    return out
