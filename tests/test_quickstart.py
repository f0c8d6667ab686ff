"""The README's first command as a newcomer runs it: scripts/quickstart.sh in a fresh copy of the repository.

The copy has no .venv and no runs/, so the script's own set-up runs (as on a fresh clone); it
takes a few minutes on 2 cores, most of it the QLoRA demo on SmolLM2-135M-Instruct.
CI runs the script on its own clean checkout first (.ci/run) and points this test at that run
(PESC_QUICKSTART_WORK and PESC_QUICKSTART_LOG), so it is checked without running twice.
Skip it locally with `-m "not slow"`.
"""

import json
import os
import re
import subprocess
from pathlib import Path

import pytest

from helpers import fresh_copy

REPO = Path(__file__).resolve().parents[1]


def _section(output: str, number: int) -> str:
    """The text the script printed under its step `number`."""
    match = re.search(rf"== {number}\. .*?\n(.*?)(?:\n\S*== \d+\.|\Z)", output, re.S)
    assert match, f"step {number} is missing from the output:\n{output[-3000:]}"
    return match.group(1)


def _run_quickstart(tmp_path) -> tuple[Path, str]:
    """(WORK_DIR, output) of the script run in a fresh copy of the repository, into another WORK_DIR."""
    repo = fresh_copy(tmp_path / "repo")
    work = tmp_path / "elsewhere" / "quickstart"  # its parent does not exist yet
    env = {k: v for k, v in os.environ.items() if k not in ("VIRTUAL_ENV", "PYTHONPATH")}
    completed = subprocess.run(
        ["bash", "scripts/quickstart.sh", str(work)], cwd=repo, env=env, capture_output=True, text=True, timeout=1500
    )
    assert completed.returncode == 0, completed.stdout[-3000:] + completed.stderr[-3000:]
    assert (repo / ".venv" / "bin" / "pesc").is_file()  # the script set the fresh copy up itself
    return work, completed.stdout


@pytest.mark.slow
def test_quickstart_runs_on_afresh_copy(tmp_path):
    if os.environ.get("PESC_QUICKSTART_WORK"):  # CI ran it on its clean checkout (.ci/run; set -e proves exit 0)
        work = Path(os.environ["PESC_QUICKSTART_WORK"])
        output = Path(os.environ["PESC_QUICKSTART_LOG"]).read_text()
    else:
        work, output = _run_quickstart(tmp_path)
    output = re.sub(r"\x1b\[[0-9;]*m", "", output)
    for name in ("config.json", "model.safetensors", "tokenizer.json", "chat_template.jinja"):
        assert (work / "dense" / name).is_file(), name
    pesc_config = json.loads((work / "pesc" / "config.json").read_text())
    assert pesc_config["model_type"] == "pesc" and pesc_config["num_experts"] == 8
    assert (work / "pesc" / "modeling_pesc.py").is_file()
    assert "max |logits" in _section(output, 3) and _section(output, 3).split("=")[-1].split()[0] == "0"
    assert (work / "run" / "final" / "experts.safetensors").is_file()
    assert (work / "run" / "final" / "adapter_model.safetensors").is_file()
    assert (work / "run" / "curves.png").is_file()
    export_config = json.loads((work / "export" / "config.json").read_text())
    assert export_config["auto_map"]["AutoModelForCausalLM"] == "modeling_pesc.PescForCausalLM"
    assert (work / "export" / "README.md").is_file()
    assert "without pesc" in _section(output, 7)
    difference = re.search(r"logits\(.*?\)\| = (\S+)", _section(output, 6)).group(1)
    assert float(difference) > 0  # training changed the model
    for before_or_after in (4, 8):
        reply = _section(output, before_or_after)
        assert "Paris" in reply, reply  # a real model's greedy reply, before and after the short tuning
