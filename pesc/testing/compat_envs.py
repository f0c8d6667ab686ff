"""Cached Python environments that each hold one transformers release, for the compatibility test.

A published checkpoint runs its shipped model code on its user's transformers, so the test
loads checkpoints under several releases. Installing torch once per release would cost a
torch install (~1 min, ~0.9 GB) each; instead one venv holds torch (this environment's
release, from the local CPU wheel) and each transformers release gets its own
`pip install --target` folder (transformers, safetensors and what transformers requires,
~0.25 GB, ~30 s), put on the path of that venv's interpreter.

Everything lives under $PESC_COMPAT_CACHE (default ~/.cache/pesc/compat). Each environment
is built in a temporary folder, checked (it imports, with the release asked for), marked
ready and renamed into place, so a half-built one is never used; one that is missing,
unmarked or lacks its files is rebuilt. A lock file keeps two test runs from building the
same environment at once.
"""

import fcntl
import json
import os
import shutil
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

READY_MARKER = ".pesc-compat-ready"
_PIP = ["-m", "pip", "install", "--quiet", "--disable-pip-version-check", "--only-binary=:all:", "--no-compile"]


class EnvBuildError(RuntimeError):
    """An environment could not be built (no registry, no wheel for this platform, ...)."""


@dataclass(frozen=True)
class CompatEnv:
    """An interpreter and the only folders importable in it (the run without pesc)."""

    transformers_version: str
    python: str
    paths: tuple[str, ...]


def cache_root() -> Path:
    return Path(os.environ.get("PESC_COMPAT_CACHE", Path.home() / ".cache" / "pesc" / "compat"))


def torch_release() -> str:
    """This environment's torch release without its local tag (2.13.0+cpu -> 2.13.0), as the local wheel is named."""
    import torch

    return torch.__version__.split("+")[0]


def _site_packages(venv: Path) -> Path:
    return venv / "lib" / f"python{sys.version_info.major}.{sys.version_info.minor}" / "site-packages"


def _run(command: list[str], what: str, timeout: float) -> str:
    try:
        completed = subprocess.run(command, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        raise EnvBuildError(f"{what}: no result after {timeout:.0f} s") from None
    if completed.returncode != 0:
        detail = "\n".join(line for line in completed.stderr.splitlines() if "WARNING: Location" not in line)
        raise EnvBuildError(f"{what} failed:\n{detail[-3000:]}")
    return completed.stdout


@contextmanager
def _locked(folder: Path):
    folder.parent.mkdir(parents=True, exist_ok=True)
    with open(folder.parent / f".{folder.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def _is_ready(folder: Path, expected: dict, required: list[str]) -> bool:
    try:
        marker = json.loads((folder / READY_MARKER).read_text())
    except (OSError, ValueError):
        return False
    return marker == expected and all((folder / path).exists() for path in required)


def _ensure(folder: Path, expected: dict, required: list[str], build, timeout: float) -> Path:
    """`folder`, built by `build(tmp)` unless a ready copy is there; replaced when it is not ready."""
    if _is_ready(folder, expected, required):
        return folder
    with _locked(folder):
        if _is_ready(folder, expected, required):  # built by another run meanwhile
            return folder
        tmp = folder.with_name(f"{folder.name}.tmp-{os.getpid()}")
        shutil.rmtree(tmp, ignore_errors=True)
        try:
            build(tmp, timeout)
            (tmp / READY_MARKER).write_text(json.dumps(expected))
            shutil.rmtree(folder, ignore_errors=True)
            tmp.rename(folder)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return folder


def _torch_venv(timeout: float) -> Path:
    release = torch_release()
    folder = cache_root() / f"torch-{release}"
    python_dir = f"python{sys.version_info.major}.{sys.version_info.minor}"

    def build(tmp: Path, timeout: float) -> None:
        _run([sys.executable, "-m", "venv", str(tmp)], "creating the torch venv", timeout)
        _run([str(tmp / "bin" / "python"), *_PIP, f"torch=={release}"], f"installing torch {release}", timeout)

    required = ["bin/python", f"lib/{python_dir}/site-packages/torch/__init__.py"]
    return _ensure(folder, {"torch": release, "python": python_dir}, required, build, timeout)


def _transformers_folder(version: str, timeout: float) -> Path:
    """The `--target` folder of one release; pip runs in this interpreter (the torch venv's has the same tags)."""
    folder = cache_root() / f"transformers-{version}"

    def build(tmp: Path, timeout: float) -> None:
        _run([sys.executable, *_PIP, "--target", str(tmp), f"transformers=={version}", "safetensors"],
             f"installing transformers {version}", timeout)  # fmt: skip
        check = f"import sys; sys.path[:0] = [{str(tmp)!r}]; import transformers, safetensors; print(transformers.__version__)"
        found = _run([sys.executable, "-I", "-S", "-c", check], f"importing transformers {version}", timeout).strip()
        if found != version:
            raise EnvBuildError(f"the folder for transformers {version} imports transformers {found}")

    return _ensure(folder, {"transformers": version}, ["transformers/__init__.py", "safetensors"], build, timeout)


def ensure_envs(versions: list[str], timeout: float = 600) -> dict[str, CompatEnv]:
    """{version: environment} for each transformers release, building (all at once) what is not cached."""
    with ThreadPoolExecutor(max_workers=2) as pool:
        venv = pool.submit(_torch_venv, timeout)
        folders = {v: pool.submit(_transformers_folder, v, timeout) for v in versions}
        venv = venv.result()
        python, torch_site = str(venv / "bin" / "python"), str(_site_packages(venv))
        return {v: CompatEnv(v, python, (str(folder.result()), torch_site)) for v, folder in folders.items()}
