"""Memory-mapped reads of safetensors files: the tensors of a file as ``numpy.memmap`` views, so a reader takes a few
rows of a large file without loading the rest (safetensors' own ``load_file`` copies every tensor, and ``safe_open``'s
slices take ranges, not the scattered rows a random batch needs). The layout is safetensors' documented one: an
8-byte little-endian header length, a JSON header of ``{name: {dtype, shape, data_offsets}}`` and the raw bytes."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import numpy as np
import torch

# safetensors dtype -> (numpy dtype of the same item size, torch dtype the bytes are read as)
DTYPES = {"F64": (np.float64, torch.float64), "F32": (np.float32, torch.float32), "F16": (np.float16, torch.float16),
          "BF16": (np.uint16, torch.bfloat16), "I64": (np.int64, torch.int64), "I32": (np.int32, torch.int32),
          "I16": (np.int16, torch.int16), "I8": (np.int8, torch.int8), "U8": (np.uint8, torch.uint8),
          "BOOL": (np.bool_, torch.bool)}


class MappedTensor:
    """One tensor of a mapped file: ``rows(idx)`` copies rows ``idx`` (any order, repeats allowed) into a torch
    tensor, ``all()`` the whole tensor."""

    def __init__(self, array: np.ndarray, dtype: torch.dtype):
        self.array, self.dtype = array, dtype

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.array.shape)

    def __len__(self) -> int:
        return self.array.shape[0]

    def _torch(self, a: np.ndarray) -> torch.Tensor:
        # a fancy index already copied; a whole mapped tensor is copied here (torch wants writable memory)
        t = torch.from_numpy(np.ascontiguousarray(a) if a.flags.writeable else np.array(a))
        return t.view(self.dtype) if t.dtype != self.dtype else t

    def rows(self, idx) -> torch.Tensor:
        return self._torch(self.array[np.asarray(idx, dtype=np.int64)])

    def all(self) -> torch.Tensor:
        return self._torch(self.array)


def map_safetensors(path) -> tuple[dict[str, MappedTensor], dict[str, str]]:
    """``(tensors, metadata)`` of safetensors file ``path``, mapped, not read. A file cut short or whose header is not
    safetensors' raises ``ValueError`` naming the file."""
    path = Path(path)
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise ValueError(f"{path}: {size} bytes, too short for a safetensors header (truncated?)")
        (n,) = struct.unpack("<Q", head)
        if n > min(size - 8, 100_000_000):
            raise ValueError(f"{path}: header of {n} bytes in a {size}-byte file (truncated, or not safetensors)")
        try:
            header = json.loads(f.read(n))
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise ValueError(f"{path}: the safetensors header is not JSON (truncated, or not safetensors)") from None
    meta = header.pop("__metadata__", None) or {}
    base, out = 8 + n, {}
    for name, info in header.items():
        try:
            np_dtype, dtype = DTYPES[info["dtype"]]
            shape = tuple(int(s) for s in info["shape"])
            start, end = (int(o) for o in info["data_offsets"])
        except (KeyError, TypeError, ValueError):
            raise ValueError(f"{path}: tensor {name!r} has a header entry cmkit cannot read") from None
        count = int(np.prod(shape, dtype=np.int64))
        if end - start != count * np.dtype(np_dtype).itemsize or base + end > size:
            raise ValueError(f"{path}: tensor {name!r} runs past the end of the file (truncated?)")
        array = (np.memmap(path, dtype=np_dtype, mode="r", offset=base + start, shape=shape) if count
                 else np.empty(shape, np_dtype))
        out[name] = MappedTensor(array, dtype)
    return out, meta
