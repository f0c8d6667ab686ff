"""Writing checkpoint shards: safetensors streamed tensor by tensor, base shards copied, linked or re-written
in a worker thread, one progress bar for both, and the disk-space check before any of it.

convert and the imports (camelidae, loramoe) write through these; export's `save_pretrained` output is
put into the same sharded layout (`ensure_sharded_layout`).
"""

from __future__ import annotations

import errno
import json
import math
import os
import shutil
import struct
import sys
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Callable, Iterable

from pesc.checkpoint.headers import (
    _IGNORED_SOURCE_TENSORS,
    SAFETENSORS_INDEX,
    SourceFile,
    TensorInfo,
    _load_bin,
    _safetensors_dtype,
    read_safetensors_header,
)
from pesc.errors import PescError
from pesc.finite import refuse_non_finite

_COPY_CHUNK = 64 * 1024 * 1024
# Layers whose experts are drawn ahead of the one being written, each in its own thread
# (torch's RNG and casts release the GIL). 2 measured ~1 s faster at Llama-2-7B shape on 2
# cores but +220 MiB peak RSS (glibc arenas of the second thread), which would break the
# < 1 GiB bound at hidden 8192: docs/convert.md.
_DRAW_AHEAD = 1


def write_safetensors(path: Path, infos: list[TensorInfo], tensors: Iterable, progress=None) -> None:
    """Stream tensors into a safetensors file: the header comes from `infos`, each tensor is written and dropped.

    An all-zero tensor (every fresh adapter_up: half the expert bytes) is skipped over rather
    than written, leaving a hole that reads back as zeros: the same bytes, less disk I/O.
    """
    header: dict = {"__metadata__": {"format": "pt"}}
    offset = 0
    for info in infos:
        header[info.name] = {"dtype": info.dtype, "shape": list(info.shape), "data_offsets": [offset, offset + info.nbytes]}
        offset += info.nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    with open(path, "wb") as handle:
        handle.write(struct.pack("<Q", len(raw)))
        handle.write(raw)
        written = 0
        for info, tensor in zip(infos, tensors, strict=True):
            if tuple(tensor.shape) != info.shape or _safetensors_dtype(tensor.dtype) != info.dtype:
                raise RuntimeError(f"internal error: {info.name} does not match its planned shape or dtype")
            refuse_non_finite([(info.name, tensor)], f"(written into {path.parent.name})")
            data = tensor.detach().contiguous().reshape(-1).view(_byte_dtype())
            if data.any():  # on the bytes, so that -0.0 is written, not left as a hole
                handle.write(memoryview(data.numpy()))
            else:
                handle.seek(info.nbytes, os.SEEK_CUR)
            written += info.nbytes
            if progress is not None:
                progress.update(info.nbytes)
        if written != offset:
            raise RuntimeError(f"internal error: wrote {written} of {offset} bytes to {path}")
        handle.truncate()  # a trailing hole still counts in the file's size


def _byte_dtype():
    import torch

    return torch.uint8


def copy_file(src: Path, dst: Path, progress=None, cancel: threading.Event | None = None) -> None:
    """Copy bytes in the kernel (copy_file_range) in chunks, reporting progress; a plain read/write fallback."""
    with open(src, "rb") as fin, open(dst, "wb") as fout:
        remaining = os.fstat(fin.fileno()).st_size
        kernel_copy = hasattr(os, "copy_file_range")
        while remaining > 0:
            if cancel is not None and cancel.is_set():
                return
            chunk = min(remaining, _COPY_CHUNK)
            if kernel_copy:
                try:
                    copied = os.copy_file_range(fin.fileno(), fout.fileno(), chunk)
                except OSError as error:
                    if error.errno not in (errno.EXDEV, errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP, errno.EPERM):
                        raise
                    kernel_copy = False
                    continue
            else:
                data = fin.read(chunk)
                fout.write(data)
                copied = len(data)
            if copied == 0:
                raise OSError(errno.EIO, f"{src} ended early while copying")
            remaining -= copied
            if progress is not None:
                progress.update(copied)


def link_or_copy(src: Path, dst: Path, progress=None, notice: Callable[[str], None] = print) -> bool:
    """Hard-link src to dst; where the filesystem refuses, copy (with a notice). True if linked."""
    try:
        os.link(src.resolve(), dst)
    except OSError as error:
        if error.errno == errno.ENOSPC:
            raise
        notice(f"note: cannot hard-link {src.name} into the output ({error.strerror}); copying it instead")
        copy_file(src, dst, progress)
        return False
    if progress is not None:
        progress.update(src.stat().st_size)
    return True


def _write_expert_shard(path: Path, shard, layer_state: Callable[[int], dict], progress=None) -> None:
    """Write each layer's added tensors while workers already draw the next layers'.

    `shard.entries` (convert's ExpertShard) lists (layer, name inside the decoder layer, TensorInfo) in write order.

    `layer_state(layer_idx)` gives one layer's tensors (convert: the method's seeded `initial_state`).
    At most 1 + _DRAW_AHEAD layers are in memory; every layer has its own seeded RNG, so
    drawing ahead, in any number of threads, changes no value.
    """
    layers = list(dict.fromkeys(layer for layer, _, _ in shard.entries))

    def tensors(pool):
        drawn = {}
        for layer, name, _ in shard.entries:
            if layer not in drawn:
                position = layers.index(layer)
                drawn = {
                    upcoming: drawn.get(upcoming) or pool.submit(layer_state, upcoming)
                    for upcoming in layers[position : position + 1 + _DRAW_AHEAD]
                }
            yield drawn[layer].result().pop(name)

    with ThreadPoolExecutor(max_workers=_DRAW_AHEAD, thread_name_prefix="pesc-draw") as pool:
        write_safetensors(path, [info for _, _, info in shard.entries], tensors(pool), progress)


def _rewrite_bin(src: Path, dst: Path, tensors: dict[str, TensorInfo], progress=None) -> None:
    state = _load_bin(src)
    names = [n for n in tensors if not _IGNORED_SOURCE_TENSORS.search(n)]
    write_safetensors(dst, [tensors[n] for n in names], (state.pop(n) for n in names), progress)



class Progress:
    """One byte progress bar shared by the base-shard worker and the expert writer.

    The worker may start counting before the bar can be shown (the plan's summary is
    printed first): counts wait in `pending` until `show` opens the bar.
    """

    def __init__(self):
        self.lock = threading.Lock()
        self.bar = None
        self.pending = 0

    def show(self, total: int) -> None:
        from tqdm.auto import tqdm

        with self.lock:
            self.bar = tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024, desc="pesc convert",
                            disable=None, file=sys.stderr, dynamic_ncols=True)  # fmt: skip
            self.bar.update(self.pending)

    def update(self, count: int) -> None:
        with self.lock:
            if self.bar is None:
                self.pending += count
            else:
                self.bar.update(count)

    def notice(self, message: str) -> None:
        from tqdm.auto import tqdm

        with self.lock:
            tqdm.write(message, file=sys.stderr)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


class BaseShardWriter:
    """Copies, links or re-writes the base shards into the output folder, in a worker thread.

    Kernel copies overlap with the main thread's work: the plan's checks (which import
    torch and transformers) and drawing the experts. The shards get provisional names
    (`base-N.safetensors`) because their final names count the expert shards, which only
    the plan knows; `finish` renames them.
    """

    def __init__(self, folder: Path, link: bool, progress: Progress):
        self.folder, self.link, self.progress = folder, link, progress
        self.cancel = threading.Event()
        self.counts = {"linked": 0, "copied": 0, "rewritten": 0}
        self.sources: list[SourceFile] = []
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="pesc-copy")
        self._job = None

    @property
    def started(self) -> bool:
        return self._job is not None

    def start(self, sources: list[SourceFile]) -> None:
        self.sources = sources
        self._job = self._pool.submit(self._write_all)

    def check(self) -> None:
        """Raise the worker's error now, if it already failed."""
        if self._job is not None and self._job.done():
            self._job.result()

    def _write_all(self) -> None:
        for number, file in enumerate(self.sources, 1):
            if self.cancel.is_set():
                return
            target = self.folder / f"base-{number:05d}.safetensors"
            if file.kind == "bin":
                _rewrite_bin(file.path, target, file.tensors, self.progress)
                self.counts["rewritten"] += 1
            elif self.link:
                linked = link_or_copy(file.path, target, None, notice=self.progress.notice)
                self.counts["linked" if linked else "copied"] += 1
            else:
                copy_file(file.path, target, self.progress, self.cancel)
                self.counts["copied"] += 1

    def finish(self, plan) -> None:
        """Wait for the worker and give each base shard its final name (`plan.shard_name(number)`: convert's Plan)."""
        if self._job is not None:
            self._job.result()
        self._pool.shutdown()
        for number in range(1, len(self.sources) + 1):
            os.rename(self.folder / f"base-{number:05d}.safetensors", self.folder / plan.shard_name(number))

    def abort(self) -> None:
        """Stop the worker at its next chunk and wait for it, before the folder is removed."""
        self.cancel.set()
        self._pool.shutdown(wait=True)


def _check_disk_space(out: Path, needed: int, link: bool) -> None:
    """Refuse to start (or go on) writing `needed` more bytes beside OUT when they do not fit."""
    needed += 50_000_000  # index, card, code, and the filesystem's own overhead
    free = shutil.disk_usage(out.parent).free
    if free < needed:
        raise PescError(
            f"not enough disk space in {out.parent}: the output needs about {_human(needed)} more, "
            f"{_human(free)} is free; free some space{'' if link else ' or pass --link'} and retry"
        )



def _human(num_bytes: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if num_bytes < 1000:
            return f"{num_bytes:.1f} {unit}" if unit != "B" else f"{int(num_bytes)} B"
        num_bytes /= 1000
    return f"{num_bytes:.1f} TB"


def ensure_sharded_layout(folder: Path) -> None:
    """A single `model.safetensors` becomes `model-00001-of-00001.safetensors` plus an index (§4 layout)."""
    single = folder / "model.safetensors"
    if (folder / SAFETENSORS_INDEX).is_file() or not single.is_file():
        return
    shard = folder / "model-00001-of-00001.safetensors"
    single.rename(shard)
    tensors = read_safetensors_header(shard)
    index = {
        "metadata": {
            "total_parameters": sum(math.prod(info.shape) for info in tensors.values()),
            "total_size": sum(info.nbytes for info in tensors.values()),
        },
        "weight_map": {name: shard.name for name in sorted(tensors)},
    }
    (folder / SAFETENSORS_INDEX).write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
