"""Run Python code in a fresh interpreter where `pesc` cannot be imported.

Proves that a saved checkpoint loads with plain transformers and its shipped model code:
`-I -S` skips site processing (and so the editable-install finder of pesc), and only the
environment's site-packages folder is put back on the path (or the folders given: another
interpreter with another transformers, see `pesc.testing.compat_envs`).
"""

import json
import subprocess
import sys
import sysconfig
import textwrap

_RESULT_MARKER = "@@pesc-result@@"
_PRELUDE = """
import importlib.util, json, sys
def emit(result):
    print("\\n" + {marker!r} + json.dumps(result), flush=True)
sys.path.extend({paths!r})
assert importlib.util.find_spec("pesc") is None, "pesc is importable in the isolated interpreter"
"""


def run_without_pesc(
    code: str,
    timeout: float = 300,
    env: dict | None = None,
    python: str = sys.executable,
    paths: list[str] | None = None,
) -> dict:
    """Execute `code` (which reports by calling `emit(obj)` once with a JSON-able object) without pesc; return that object.

    By default in this interpreter with this environment's packages; else in `python` with only `paths` importable.
    """
    paths = [sysconfig.get_paths()["purelib"]] if paths is None else [str(p) for p in paths]
    completed = subprocess.run(
        [python, "-I", "-S", "-c", _PRELUDE.format(paths=paths, marker=_RESULT_MARKER) + textwrap.dedent(code)],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
    )
    if completed.returncode != 0:
        raise RuntimeError(f"isolated interpreter failed:\n{completed.stderr[-4000:]}")
    _, marker, payload = completed.stdout.rpartition(_RESULT_MARKER)
    if not marker:
        raise RuntimeError(f"isolated interpreter emitted no result:\n{completed.stdout[-4000:]}")
    return json.loads(payload.strip())
