"""`pesc serve OUT`: vLLM's OpenAI-compatible server on a model folder.

- Without vLLM: the dtype default (the checkpoint's; a line where vLLM's own default would downcast), the path line
  read from vLLM's "Resolved architecture" log line, and the one-line errors (no folder, no vLLM, an interpreter
  without vLLM, a bad KV-cache size, an option after `--` that pesc serve sets, shipped code that is not pesc's).
- With the vLLM environment (skipped without it, failing in CI, as tests/test_vllm.py): `pesc serve` of a tiny
  float32 PESC checkpoint (added tensors perturbed) listens on 127.0.0.1 only, prints the path vLLM resolved (the
  native model: the environment has pesc's plugin), the URL and the model name it serves; an `openai` client's
  greedy chat completion is the text `pesc generate` gives (float32, same chat template, same max tokens); SIGINT
  stops it with exit code 0, no traceback, and no process of the server left.
"""

import importlib.util
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from io import StringIO

import pytest

from pesc.generate import generate
from pesc.serving.serve import path_line, serving_dtype
from pesc.serving.vllm_server import free_port, vllm_python
from pesc.testing import save_tiny_dense
from pesc.testing.perturbed import save_perturbed_checkpoint
from helpers import SERVE_SHAPE, assert_clean_error, require_vllm, run_cli

NEW_TOKENS = 12
# A random byte-level model mostly emits bytes of unfinished UTF-8 characters: transformers decodes each as U+FFFD,
# vLLM's incremental detokenizer holds a trailing one back. This prompt's reply ends in a whole character ('h').
PROMPT = "Hello"
NOTICE = "pesc serve: serving float32 as stored (vLLM would downcast to bfloat16; pass --dtype bfloat16 for speed)"
NATIVE_PATH = "pesc serve: path: native vLLM model (vLLM resolved PescForCausalLM)"

OPENAI_CHAT = """
import json, sys
from openai import OpenAI
base_url, model, messages, max_tokens = sys.argv[1], sys.argv[2], json.loads(sys.argv[3]), int(sys.argv[4])
answer = OpenAI(base_url=base_url, api_key="unused").chat.completions.create(
    model=model, messages=messages, max_tokens=max_tokens, temperature=0)
print(json.dumps(answer.choices[0].message.content))
"""


def test_dtype_default_is_the_checkpoints_and_says_when_vllm_would_downcast():
    assert serving_dtype({"dtype": "float32"}, None) == ("float32", NOTICE.removeprefix("pesc serve: "))
    assert serving_dtype({"torch_dtype": "float32"}, None)[0] == "float32"  # the name before transformers 5
    assert serving_dtype({"dtype": "bfloat16"}, None) == ("bfloat16", None)  # vLLM keeps it: nothing to say
    assert serving_dtype({"dtype": "float32"}, "bfloat16") == ("bfloat16", None)  # asked for
    assert serving_dtype({}, None) == (None, None)  # none recorded: vLLM decides


def test_path_line_names_the_path_vllm_resolved(tmp_path):
    assert path_line("PescForCausalLM", tmp_path) == NATIVE_PATH
    backend = path_line("TransformersMoEForCausalLM", tmp_path)
    assert "Transformers backend" in backend and str(tmp_path) in backend and "native" not in backend


@pytest.fixture(scope="module")
def pesc_checkpoint(tiny_llama_dir, tmp_path_factory):
    return save_perturbed_checkpoint(tiny_llama_dir, tmp_path_factory.mktemp("serve-errors") / "pesc", "pesc")


def test_a_folder_without_config_is_one_line(capsys, tmp_path):
    assert_clean_error(*run_cli(capsys, "serve", tmp_path / "missing")[::2], "is not a model folder (no config.json)")


@pytest.mark.skipif(importlib.util.find_spec("vllm") is not None, reason="this Python has vLLM")
def test_a_t5_export_is_one_line(capsys, tmp_path):
    """vLLM serves no T5: refused before vLLM is even looked for (this machine may have none)."""
    from pesc.testing.tiny_t5 import save_tiny_t5

    folder = tmp_path / "mov-t5"
    code, _, err = run_cli(capsys, "convert", save_tiny_t5(tmp_path / "t5", "t5-v1.1"), folder, "--method", "mov")
    assert code == 0, err
    assert_clean_error(*run_cli(capsys, "serve", folder)[::2], "is an encoder-decoder (t5)",
                       "vLLM cannot serve T5 models", "pesc generate")


def test_no_vllm_is_one_line(capsys, monkeypatch, tmp_path, pesc_checkpoint):
    monkeypatch.setenv("PESC_VLLM_VENV", str(tmp_path / "no-venv"))
    assert_clean_error(*run_cli(capsys, "serve", pesc_checkpoint)[::2], "no vLLM to serve with",
                       "scripts/setup_vllm.sh", "--vllm-python")
    # an interpreter named that has no vLLM
    assert_clean_error(*run_cli(capsys, "serve", pesc_checkpoint, "--vllm-python", sys.executable)[::2],
                       f"{sys.executable} has no vLLM")


@pytest.mark.parametrize("args, phrase", [
    (("--kv-cache-memory", "lots"), "--kv-cache-memory 'lots' is not a positive size"),
    (("--", "--max-model-len", "256", "--port=9000"), "--port after `--`: pesc serve sets it"),
])
def test_bad_options_are_one_line(capsys, pesc_checkpoint, args, phrase):
    assert_clean_error(*run_cli(capsys, "serve", pesc_checkpoint, *args)[::2], phrase)


@pytest.mark.skipif(importlib.util.find_spec("vllm") is not None, reason="this Python has vLLM")
def test_code_that_is_not_pescs_needs_trust_remote_code(capsys, pesc_checkpoint, tmp_path, monkeypatch):
    """vLLM runs a pesc checkpoint's shipped code: without --trust-remote-code only when it is this pesc's own."""
    import shutil

    edited = shutil.copytree(pesc_checkpoint, tmp_path / "edited")
    with open(edited / "moe_routing.py", "a") as code:
        code.write("\n# changed\n")
    assert_clean_error(*run_cli(capsys, "serve", edited)[::2], "model code is not this pesc's", "--trust-remote-code")
    # with the flag (or with the code as shipped) the folder passes, and the vLLM lookup comes next
    monkeypatch.setenv("PESC_VLLM_VENV", str(tmp_path / "no-venv"))
    for folder, args in ((edited, ("--trust-remote-code",)), (pesc_checkpoint, ())):
        code, _, err = run_cli(capsys, "serve", folder, *args)
        assert_clean_error(code, err, "no vLLM to serve with")


# ---- a real server (the vLLM environment) ----

def _descendants(pid: int) -> set[int]:
    """The processes below `pid` (from /proc), the server's own process group included."""
    parents = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as stat:
                    parents[int(entry)] = int(stat.read().rpartition(")")[2].split()[1])
            except OSError:
                pass
    found, pending = set(), [pid]
    while pending:
        parent = pending.pop()
        children = {child for child, of in parents.items() if of == parent}
        pending += children - found
        found |= children
    return found


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().rpartition(")")[2].split()[0] not in ("Z", "X")
    except OSError:
        return False


def _listening_addresses(port: int) -> set[str]:
    """The local addresses with a TCP socket listening on `port` (from /proc/net/tcp and tcp6)."""
    addresses = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            with open(table) as rows_file:
                rows = rows_file.read().splitlines()[1:]
        except OSError:
            continue
        for row in rows:
            local, state = row.split()[1], row.split()[3]
            address, _, local_port = local.partition(":")
            if state == "0A" and int(local_port, 16) == port:  # 0A: LISTEN
                addresses.add(".".join(str(b) for b in reversed(bytes.fromhex(address))) if len(address) == 8
                              else address)
    return addresses


@pytest.fixture(scope="module")
def float32_checkpoint(tmp_path_factory):
    """(A tiny float32 PESC checkpoint, head_dim 64 as vLLM's CPU attention needs, added tensors perturbed; its
    dense model)."""
    require_vllm()
    root = tmp_path_factory.mktemp("serve")
    dense = save_tiny_dense(root / "dense", "llama", **SERVE_SHAPE)
    pesc = save_perturbed_checkpoint(dense, root / "pesc", "pesc", scale=0.5, num_experts=4, top_k=2, adapter_dim=16)
    return pesc, dense


def test_pesc_serve_answers_as_pesc_generate_and_stops_on_ctrl_c(float32_checkpoint, tmp_path):
    checkpoint, dense = float32_checkpoint
    port = free_port()
    log = tmp_path / "serve-stderr.log"
    lines: list[str] = []
    # The server must get SIGINT as a terminal's foreground command does, even where pytest itself runs with SIGINT
    # ignored (a background job of a non-interactive shell: `nohup pytest &`): exec passes an ignored signal on as
    # ignored, and a handled one as the default, so pytest handles it while the server starts.
    outer = signal.signal(signal.SIGINT, signal.default_int_handler)
    with open(log, "w") as stderr:
        try:
            server = subprocess.Popen(
                [sys.executable, "-m", "pesc.cli", "serve", str(checkpoint), "--port", str(port),
                 "--kv-cache-memory", "64MiB", "--", "--max-model-len", "256", "--served-model-name", "tiny-pesc"],
                stdout=subprocess.PIPE, stderr=stderr, text=True)  # fmt: skip
        finally:
            signal.signal(signal.SIGINT, outer)
        reader = threading.Thread(target=lambda: lines.extend(iter(server.stdout.readline, "")), daemon=True)
        reader.start()
        try:
            deadline = time.monotonic() + 900  # an engine start with vLLM's compile: about a minute on a loaded box
            while not any(line.startswith("pesc serve: ready at") for line in lines):
                assert server.poll() is None, f"pesc serve exited with {server.returncode}:\n{log.read_text()[-5000:]}"
                assert time.monotonic() < deadline, "pesc serve was not ready after 900 s"
                time.sleep(1)
            base_url = f"http://127.0.0.1:{port}/v1"
            assert _listening_addresses(port) == {"127.0.0.1"}
            printed = [line.rstrip("\n") for line in lines]
            assert printed[0] == NOTICE
            assert printed[1].startswith("pesc serve: starting ") and "--dtype float32" in printed[1]
            assert NATIVE_PATH in printed  # from vLLM's log: the environment has pesc's plugin
            assert f'pesc serve: ready at {base_url}, model "tiny-pesc" (Ctrl-C stops it)' in printed
            assert any(f'OpenAI(base_url="{base_url}"' in line and 'model="tiny-pesc"' in line for line in printed)

            client = sys.executable if importlib.util.find_spec("openai") else str(vllm_python())
            messages = [{"role": "user", "content": PROMPT}]
            answer = subprocess.run([client, "-c", OPENAI_CHAT, base_url, "tiny-pesc", json.dumps(messages),
                                     str(NEW_TOKENS)], capture_output=True, text=True, timeout=300)
            assert answer.returncode == 0, answer.stderr[-3000:]
            served = json.loads(answer.stdout.strip().splitlines()[-1])
            # what `pesc generate CHECKPOINT --prompt Hello --max-new-tokens 12` prints: greedy, float32 as stored,
            # the tokenizer's chat template (the one vLLM's chat endpoint applies)
            expected = generate(checkpoint, PROMPT, max_new_tokens=NEW_TOKENS, stream=StringIO())
            assert expected and not expected.endswith("\ufffd"), f"no reply to compare whole: {expected!r}"
            # the experts act: a server that dropped them would answer as the dense model does
            assert generate(dense, PROMPT, max_new_tokens=NEW_TOKENS, stream=StringIO()) != expected
            assert served == expected, f"served {served!r} != pesc generate {expected!r}"

            processes = _descendants(server.pid)
            assert len(processes) >= 2  # vLLM's API server and its engine core: what Ctrl-C must stop
            server.send_signal(signal.SIGINT)
            # stop_server waits 60 s for vLLM to exit on its own before it kills the group; vLLM takes about 1 s
            assert server.wait(timeout=90) == 0  # Ctrl-C is how a server is stopped: a clean stop is a success
        finally:
            if server.poll() is None:  # a failed assertion above: stop it as a user would (SIGKILL would orphan vLLM)
                server.send_signal(signal.SIGINT)
                try:
                    server.wait(timeout=90)
                except subprocess.TimeoutExpired:
                    server.kill()
                    server.wait()
    reader.join(timeout=10)
    assert lines[-1].rstrip("\n") == "pesc serve: stopped"
    # no traceback from pesc serve itself; vLLM's own log lines carry its process prefix ("(APIServer pid=N)",
    # "(EngineCore pid=N)"), and vLLM 0.32 sometimes logs an EngineDeadError traceback while it shuts down on SIGINT
    # (its engine core exits before the API server's output task), whoever sends the signal
    ours = [line for line in log.read_text().splitlines() if not re.match(r"\s*\((APIServer|EngineCore)", line)]
    assert not any("Traceback" in line for line in ours)
    assert [pid for pid in processes if _alive(pid)] == []
