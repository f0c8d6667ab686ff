"""Shared fixtures: tiny dense checkpoints of real families, built locally (no network)."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402
import torch  # noqa: E402

from pesc.testing import TINY_FAMILIES, save_tiny_dense  # noqa: E402

torch.set_num_threads(2)


@pytest.fixture(scope="session")
def tiny_dense_dirs(tmp_path_factory):
    """One saved tiny dense checkpoint per family: {family: path}."""
    root = tmp_path_factory.mktemp("dense")
    return {family: save_tiny_dense(root / family, family) for family in TINY_FAMILIES}


@pytest.fixture(scope="session")
def tiny_llama_dir(tiny_dense_dirs):
    return tiny_dense_dirs["llama"]
