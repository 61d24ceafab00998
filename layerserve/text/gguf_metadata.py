"""Read a GGUF file's key/value metadata into plain Python values, quickly.

`gguf.GGUFReader` builds a numpy view per array element, which takes seconds on a vocabulary of
50k tokens and 50k merges; the tokenizer needs only the metadata section at the head of the file.
This parses that section directly (little-endian GGUF v2/v3) and stops before the tensor infos.
"""

from __future__ import annotations

import mmap
import os
import struct
from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any

import numpy as np

# GGUF value type -> (struct format, numpy dtype) for the fixed-size types
_SCALARS: Mapping[int, tuple[str, str]] = MappingProxyType(
    {
        0: ("<B", "<u1"),
        1: ("<b", "<i1"),
        2: ("<H", "<u2"),
        3: ("<h", "<i2"),
        4: ("<I", "<u4"),
        5: ("<i", "<i4"),
        6: ("<f", "<f4"),
        7: ("<?", "<?"),
        10: ("<Q", "<u8"),
        11: ("<q", "<i8"),
        12: ("<d", "<f8"),
    }
)
_STRING, _ARRAY = 8, 9


@dataclass(frozen=True, slots=True)
class GGUFTensorInfo:
    name: str
    shape: tuple[int, ...]  # ggml order: shape[0] is the contiguous (innermost) dimension
    ggml_type: int
    offset: int  # absolute byte offset of the data in the file


def read_gguf_metadata(path: str | os.PathLike[str]) -> dict[str, Any]:
    """All metadata of a GGUF file: key -> str | int | float | bool | list of those."""
    return read_gguf(path, tensors=False)[0]


def read_gguf(path: str | os.PathLike[str], tensors: bool = True) -> tuple[dict[str, Any], list[GGUFTensorInfo]]:
    """Metadata and (optionally) the tensor directory of a GGUF file, without reading tensor data."""
    with open(path, "rb") as file, mmap.mmap(file.fileno(), 0, access=mmap.ACCESS_READ) as buf:
        if buf[:4] != b"GGUF":
            raise ValueError(f"{os.fspath(path)} is not a GGUF file")
        version, num_tensors, num_kv = struct.unpack_from("<IQQ", buf, 4)
        if version not in (2, 3):
            raise ValueError(f"unsupported GGUF version {version} (or big-endian file) in {os.fspath(path)}")
        reader = _Cursor(buf, 24)
        metadata: dict[str, Any] = {}
        for _ in range(num_kv):
            key = reader.string()
            metadata[key] = reader.value(reader.unpack("<I"))
        if not tensors:
            return metadata, []
        raw = []
        for _ in range(num_tensors):
            name = reader.string()
            n_dims = reader.unpack("<I")
            shape = tuple(reader.unpack("<Q") for _ in range(n_dims))
            ggml_type, rel = reader.unpack("<I"), reader.unpack("<Q")
            raw.append((name, shape, ggml_type, rel))
        align = int(metadata.get("general.alignment", 32))
        data_start = -(-reader.offset // align) * align
        return metadata, [GGUFTensorInfo(n, s, t, data_start + o) for n, s, t, o in raw]


class _Cursor:
    """Sequential little-endian reads over a buffer."""

    def __init__(self, buf: mmap.mmap, offset: int) -> None:
        self.buf = buf
        self.offset = offset

    def unpack(self, fmt: str) -> Any:
        (value,) = struct.unpack_from(fmt, self.buf, self.offset)
        self.offset += struct.calcsize(fmt)
        return value

    def string(self) -> str:
        length = self.unpack("<Q")
        start, self.offset = self.offset, self.offset + length
        return self.buf[start : self.offset].decode("utf-8", errors="replace")

    def value(self, value_type: int) -> Any:
        if value_type == _STRING:
            return self.string()
        if value_type == _ARRAY:
            item_type, count = self.unpack("<I"), self.unpack("<Q")
            if item_type in _SCALARS:
                dtype = np.dtype(_SCALARS[item_type][1])
                items = np.frombuffer(self.buf, dtype=dtype, count=count, offset=self.offset).tolist()
                self.offset += dtype.itemsize * count
                return items
            return [self.value(item_type) for _ in range(count)]
        if value_type in _SCALARS:
            return self.unpack(_SCALARS[value_type][0])
        raise ValueError(f"unknown GGUF value type {value_type} at offset {self.offset}")
