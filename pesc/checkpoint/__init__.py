"""Checkpoint I/O in one place: what convert, export, training, eval and the imports read and write.

One concern a file:
- config: a model folder's config.json, read as its method's config or as a dense one;
- headers: the weight files' safetensors / .bin headers, the dtype tables, the corrupt-file errors;
- source: a source folder or Hub id resolved (downloaded), and what is known of it before torch loads;
- shard_writer: safetensors shards streamed, base shards copied or linked, progress, the disk-space check;
- run_files: the files a training run writes beside peft's adapter, and reading them back;
- weights: every command's check of the weight files it is about to load;
- trained_run: loading a trained run back (base + trained experts + LoRA) for export, eval and routes.

Import from the submodules. `read_config` and `resolve_method_config` are also found here (their home was
pesc/checkpoint.py), loaded on first use: importing this package must stay free of torch and transformers,
since convert reads headers and starts copying before those imports.
"""


def __getattr__(name: str):
    if name in ("read_config", "resolve_method_config"):
        from pesc.checkpoint import config

        return getattr(config, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
