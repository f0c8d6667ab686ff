"""The routers and adapters `pesc convert` draws for a seed, pinned by hash.

Recorded from the code of 2026-11-29, before the method interface was redesigned: any refactor of
how experts are built, named or drawn must keep existing conversions bit for bit (same seed, same
tensors), or this test names what changed. The hash covers every expert tensor's name, dtype and bytes.
"""

import hashlib
import json

import torch
from safetensors import safe_open

from pesc.convert import ConvertSettings, convert

PINNED = {
    # (num_experts, top_k, adapter_dim, seed) on the tiny llama: sha256 over the sorted expert tensors
    (4, 2, 8, 3): "366a510e0ef8edf4f817e4453a55862a1996db9316a4ec679fe74e54259fa696",
}


def _expert_digest(folder) -> str:
    weight_map = json.loads((folder / "model.safetensors.index.json").read_text())["weight_map"]
    digest = hashlib.sha256()
    for name in sorted(n for n in weight_map if ".moe_adapter." in n):
        with safe_open(folder / weight_map[name], "pt") as handle:
            tensor = handle.get_tensor(name)
        digest.update(name.encode())
        digest.update(str(tensor.dtype).encode())
        digest.update(tensor.contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def test_convert_draws_the_pinned_experts(tiny_llama_dir, tmp_path):
    for (num_experts, top_k, adapter_dim, seed), expected in PINNED.items():
        out = tmp_path / f"pesc-{seed}"
        settings = ConvertSettings(num_experts=num_experts, top_k=top_k, adapter_dim=adapter_dim, seed=seed)
        convert(tiny_llama_dir, out, settings, echo=lambda message: None)
        assert _expert_digest(out) == expected
