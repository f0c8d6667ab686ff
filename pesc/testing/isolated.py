"""Run Python code in a fresh interpreter where `pesc` cannot be imported.

Proves that a saved checkpoint loads with plain transformers and its shipped model code:
`-I -S` skips site processing (and so the editable-install finder of pesc), and only the
environment's site-packages folder is put back on the path.
"""

import json
import subprocess
import sys
import textwrap

_PRELUDE = """
import importlib.util, sys, sysconfig
sys.path.append(sysconfig.get_paths()["purelib"])
assert importlib.util.find_spec("pesc") is None, "pesc is importable in the isolated interpreter"
"""


def run_without_pesc(code: str, timeout: float = 300, env: dict | None = None) -> dict:
    """Execute `code` (which must print one JSON object as its last line) without pesc; return that object."""
    completed = subprocess.run(
        [sys.executable, "-I", "-S", "-c", _PRELUDE + textwrap.dedent(code)],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
    )
    if completed.returncode != 0:
        raise RuntimeError(f"isolated interpreter failed:\n{completed.stderr[-4000:]}")
    return json.loads(completed.stdout.strip().splitlines()[-1])
