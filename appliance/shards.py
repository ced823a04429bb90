"""Safetensors shards read and written one tensor at a time, so a model of any size passes through a few of its
largest tensors' worth of memory.

Reading is done here too, with ``pread`` into a fresh buffer, not safetensors' ``safe_open``: that one maps the
file, and every page of a mapping a process has touched counts in its resident memory until the file is closed, so
reading a 5 GB shard through it grows the process by 5 GB (measured by bench/merge_memory.py). Writing is done
here: the format is an 8-byte little-endian header length, a JSON header (each tensor's dtype, shape and byte
offsets) and the tensors' bytes in order, and since a merged shard has the same names and shapes as its source
(only the dtype may change), the header is known before the first byte of data. safetensors' ``save_file`` needs
every tensor of the shard in memory at once; a 70B model's shards are 5 GB each.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

# safetensors' dtype names -> torch's, and their sizes
DTYPES = {"F64": ("float64", 8), "F32": ("float32", 4), "F16": ("float16", 2), "BF16": ("bfloat16", 2),
          "I64": ("int64", 8), "I32": ("int32", 4), "I16": ("int16", 2), "I8": ("int8", 1), "U8": ("uint8", 1),
          "BOOL": ("bool", 1)}
NAMES = {torch_name: st for st, (torch_name, _) in DTYPES.items()}
FLOATING = {"F64", "F32", "F16", "BF16"}
INDEX = "model.safetensors.index.json"
SINGLE = "model.safetensors"


@dataclass(frozen=True)
class Spec:
    name: str
    dtype: str  # safetensors' name: F32, BF16, ...
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        n = DTYPES[self.dtype][1]
        for d in self.shape:
            n *= d
        return n


def shard_files(folder: Path) -> list[str]:
    """The model's safetensors files, in the order of its index (or its one file)."""
    folder = Path(folder)
    if (folder / INDEX).is_file():
        weight_map = json.loads((folder / INDEX).read_text())["weight_map"]
        return sorted(set(weight_map.values()))
    if (folder / SINGLE).is_file():
        return [SINGLE]
    raise FileNotFoundError(f"{folder} holds no {SINGLE} and no {INDEX}")


def specs(path: Path) -> list[Spec]:
    """The tensors of one safetensors file as its header lists them, in the order of their data."""
    ordered = sorted(_header(path)[1].items(), key=lambda kv: kv[1]["data_offsets"][0])
    return [Spec(name, v["dtype"], tuple(v["shape"])) for name, v in ordered]


def _header(path: Path) -> tuple[int, dict]:
    with open(path, "rb") as f:
        (length,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(length))
    header.pop("__metadata__", None)
    return 8 + length, header


class Reader:
    """Tensors by name across a model's safetensors files, each read on its own into memory the caller owns (and
    frees by dropping it): no mapping, so nothing stays resident once a tensor is gone."""

    def __init__(self, folder: Path, files: list[str] | None = None):
        self.folder = Path(folder)
        self.where: dict[str, tuple[Path, int, Spec]] = {}
        for name in files or shard_files(folder):
            start, header = _header(self.folder / name)
            for key, v in header.items():
                self.where[key] = (self.folder / name, start + v["data_offsets"][0],
                                   Spec(key, v["dtype"], tuple(v["shape"])))

    def __contains__(self, name: str) -> bool:
        return name in self.where

    def names(self) -> list[str]:
        return list(self.where)

    def spec(self, name: str) -> Spec:
        return self.where[name][2]

    def get(self, name: str):
        import os

        import torch

        path, offset, spec = self.where[name]
        buffer = torch.empty(spec.nbytes, dtype=torch.uint8)
        view = memoryview(buffer.numpy())
        fd = os.open(path, os.O_RDONLY)
        try:
            done = 0
            while done < spec.nbytes:
                n = os.preadv(fd, [view[done:]], offset + done)
                if n <= 0:
                    raise OSError(f"{path} ends inside tensor {name}; the file is truncated")
                done += n
        finally:
            os.close(fd)
        return buffer.view(getattr(torch, DTYPES[spec.dtype][0])).reshape(spec.shape)


def tensors(path: Path) -> Iterator[tuple[str, object]]:
    """(name, tensor) of one file, one at a time, in the order of their data."""
    path = Path(path)
    reader = Reader(path.parent, [path.name])
    for spec in specs(path):
        yield spec.name, reader.get(spec.name)


def write(path: Path, out: list[Spec], produce: Callable[[Spec], object], metadata: dict | None = None) -> int:
    """Write the file ``path`` holding the tensors ``out`` in that order, asking ``produce(spec)`` for each one
    just before its bytes are written: only that tensor is in memory. Returns the bytes written."""
    import torch

    header: dict = {"__metadata__": {"format": "pt", **(metadata or {})}}
    offset = 0
    for s in out:
        header[s.name] = {"dtype": s.dtype, "shape": list(s.shape), "data_offsets": [offset, offset + s.nbytes]}
        offset += s.nbytes
    raw = json.dumps(header, separators=(",", ":")).encode("utf-8")
    raw += b" " * (-len(raw) % 8)  # the data starts 8-byte aligned, as safetensors writes it
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)))
        f.write(raw)
        for s in out:
            t = produce(s)
            want = getattr(torch, DTYPES[s.dtype][0])
            if t.dtype != want or tuple(t.shape) != s.shape:
                raise ValueError(f"{s.name}: produced {t.dtype} {tuple(t.shape)}, the header says {want} {s.shape}")
            data = t.contiguous().reshape(-1).view(torch.uint8).numpy()
            f.write(memoryview(data))  # no copy of the tensor's bytes
            del t, data
        f.flush()
    return 8 + len(raw) + offset
