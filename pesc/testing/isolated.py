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


def checkpoint_outputs_without_pesc(folder, ids: list[list[int]], new_tokens: int = 0) -> dict:
    """What the checkpoint in `folder` computes when plain transformers loads it with its shipped code, pesc not
    importable: {"class", "logits"} for `ids`, and with `new_tokens`, greedy generations with and without the
    cache ("cached", "uncached")."""
    return run_without_pesc(f"""
        import torch
        from transformers import AutoModelForCausalLM
        model = AutoModelForCausalLM.from_pretrained({str(folder)!r}, trust_remote_code=True, dtype=torch.float32).eval()
        ids = torch.tensor({ids!r})
        result = {{"class": type(model).__name__}}
        with torch.no_grad():
            result["logits"] = model(input_ids=ids).logits.tolist()
            if {new_tokens}:
                for name, cache in (("cached", True), ("uncached", False)):
                    result[name] = model.generate(ids, max_new_tokens={new_tokens}, do_sample=False, pad_token_id=0,
                                                  use_cache=cache).tolist()
        emit(result)
    """)
