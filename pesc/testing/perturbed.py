"""A converted checkpoint of any method whose added tensors are moved off their initial values.

`pesc convert` draws each method's added modules so that the new model computes exactly the
dense one (zero up-projections, vectors of ones): a test that must see the experts act (a
serving engine that dropped them would give the dense model's tokens) needs them changed.
The checkpoint keeps the converted layout, config and shipped code; only the added tensors
of its shards are rewritten, each plus `scale` times Gaussian noise from a seeded generator.
"""

import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file


def save_perturbed_checkpoint(dense_dir: str | Path, out: str | Path, method: str, scale: float = 0.2, seed: int = 0,
                              **settings) -> Path:
    """Convert `dense_dir` with `method` (and its `settings`) to `out`, then perturb every added tensor; returns `out`."""
    from pesc.convert import ConvertSettings, convert

    out = Path(out)
    conversion = ConvertSettings(method=method, seed=seed, **settings)
    convert(dense_dir, out, conversion, echo=lambda message: None)
    generator = torch.Generator().manual_seed(seed + 1)
    index = out / "model.safetensors.index.json"
    shards = sorted(set(json.loads(index.read_text())["weight_map"].values())) if index.exists() else ["model.safetensors"]
    for shard in shards:
        tensors = load_file(out / shard)
        names = [name for name in tensors if conversion.method.is_added(name)]
        if not names:
            continue
        for name in sorted(names):
            noise = torch.randn(tensors[name].shape, generator=generator, dtype=torch.float32)
            tensors[name] = (tensors[name].float() + scale * noise).to(tensors[name].dtype)
        save_file(tensors, out / shard, metadata={"format": "pt"})
    return out
