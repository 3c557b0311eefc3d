"""safetensors files, read and written without the safetensors package, and atomic file writes.

The format (https://github.com/huggingface/safetensors): an 8-byte little-endian unsigned header length N, then N
bytes of UTF-8 JSON {name: {"dtype": "F32", "shape": [2, 3], "data_offsets": [start, end]}} with an optional
"__metadata__" {string: string}, then the data area: each tensor's raw little-endian bytes, row-major, at
[start, end) counted from the end of the header. No pickle, so a file can be opened without trusting it, and the
bytes can be memory-mapped and viewed as tensors in place. The format fits in a hundred lines, so we read and write
it here rather than depend on the package (this file is named safetensors_io.py so as not to shadow it).

- `write_safetensors` writes the largest elements first and pads the header with spaces to a multiple of 8 bytes,
  so every tensor starts at a multiple of its element size and a reader can view it without copying. Tensors may
  live on any device and are copied to the host one at a time (a GPU state dict is never on the host all at once).
- `read_safetensors` maps the file privately (copy-on-write): bytes are read from disk only when used, so a rank
  that slices its tensor-parallel part reads only those pages, and writing into a tensor never changes the file.
  A tensor another writer left unaligned is copied.
- Validation, before a byte of data is used (`read_header`): the file holds the 8-byte length and the header; the
  header is at most 100 MiB, a JSON object, with __metadata__ mapping strings to strings; every entry has a known
  dtype, a shape of non-negative ints and data_offsets [start, end] with start <= end inside the data area, exactly
  as many bytes as the shape and dtype need, and no two tensors overlap. Each refusal is a ValueError that names the
  file (and the tensor at fault), so a truncated or corrupt file is reported, not read as garbage.
- `write_file` writes any file atomically: a temporary file in the same folder, fsync, os.replace. A crash leaves
  the old file or the new one, never half of one; `fsync_folder` makes the rename itself durable. checkpoint.py
  writes its JSON, .pth and safetensors files through it.

Left out: dtypes beyond the ten of SAFETENSORS_DTYPES (the format's F8_E4M3, F8_E5M2, U16, U32, U64, ...: the
writer refuses them with the list it stores, the reader as a bad header entry); big-endian hosts (refused: the
bytes are not converted); deduplicating tensors that share memory (each name gets its own copy, where the
safetensors package refuses them); checking that the tensors tile the data area with no gaps or trailing bytes (the
safetensors package requires it; bytes outside every tensor are harmless here, only overlaps are refused);
checksums (sizes and offsets are checked, not contents).
"""
import contextlib
import json
import os
import struct
import sys
from pathlib import Path
from typing import Optional

import numpy as np
import torch

SAFETENSORS_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
                      "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
                      "U8": torch.uint8, "BOOL": torch.bool}


# ----------------------------------------------------------------------------------------------------
# Atomic files


def write_file(path, write):
    """Write through write(f) into a temporary file in the same folder, fsync it, then rename it into place:
    a crash leaves the old file or the new one, never half of one."""
    path = Path(path)
    temporary = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        with open(temporary, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(temporary, path)
    finally:
        temporary.unlink(missing_ok=True)


def fsync_folder(folder):
    """Make a rename inside `folder` durable (POSIX; a no-op where folders cannot be opened)."""
    with contextlib.suppress(OSError):
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


# ----------------------------------------------------------------------------------------------------
# safetensors


def write_safetensors(path, tensors: dict, metadata: Optional[dict] = None):
    """Write tensors (on any device; copied to the host one at a time) as a safetensors file, atomically."""
    dtype_names = {dtype: name for name, dtype in SAFETENSORS_DTYPES.items()}
    # Largest elements first, and a header padded to 8 bytes: every tensor starts at a multiple of its element size.
    order = sorted(tensors, key=lambda name: (-tensors[name].element_size(), name))
    header, offset = {}, 0
    if metadata:
        header["__metadata__"] = {str(key): str(value) for key, value in metadata.items()}
    for name in order:
        tensor = tensors[name]
        if tensor.dtype not in dtype_names:
            raise ValueError(f"{path}: tensor {name} has dtype {tensor.dtype}, which this writer does not store; "
                             f"use one of {sorted(map(str, dtype_names))}")
        size = tensor.numel() * tensor.element_size()
        header[name] = dict(dtype=dtype_names[tensor.dtype], shape=list(tensor.shape),
                            data_offsets=[offset, offset + size])
        offset += size
    encoded = json.dumps(header, separators=(",", ":")).encode()
    encoded += b" " * (-len(encoded) % 8)

    def write(f):
        f.write(struct.pack("<Q", len(encoded)) + encoded)
        for name in order:
            data = tensors[name].detach().to("cpu").contiguous().reshape(-1)
            f.write(memoryview(data.view(torch.uint8).numpy()))
    write_file(path, write)


def read_header(path):
    """The validated header of a safetensors file and the byte offset where its data starts."""
    if sys.byteorder != "little":
        raise RuntimeError("safetensors stores little-endian bytes; this reader does not convert them")
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        if size < 8:
            raise ValueError(f"{path}: {size} bytes, shorter than the 8-byte header length: the file is truncated")
        (length,) = struct.unpack("<Q", f.read(8))
        if length > min(size - 8, 100 * 2**20):
            raise ValueError(f"{path}: the header length {length} runs past the end of the file ({size} bytes) or "
                             f"past 100 MB: the file is truncated or not a safetensors file")
        try:
            header = json.loads(f.read(length).decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as error:
            raise ValueError(f"{path}: the header is not valid JSON ({error}): the file is corrupt") from None
    if not isinstance(header, dict):
        raise ValueError(f"{path}: the header is not a JSON object: the file is corrupt")
    metadata = header.pop("__metadata__", {})
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise ValueError(f"{path}: __metadata__ must map strings to strings, got {metadata!r}")
    data_start, data_size = 8 + length, size - 8 - length

    def naturals(value):
        return isinstance(value, list) and all(isinstance(n, int) and n >= 0 for n in value)
    ranges = []
    for name, info in header.items():
        what = f"{path}: tensor {name}"
        dtype = SAFETENSORS_DTYPES.get(info.get("dtype")) if isinstance(info, dict) else None
        shape, offsets = (info["shape"], info["data_offsets"]) if dtype and info.keys() >= {"shape", "data_offsets"} \
            else (None, None)
        if not (naturals(shape) and naturals(offsets) and len(offsets) == 2 and offsets[0] <= offsets[1]):
            raise ValueError(f"{what}: bad header entry {info!r} (want dtype in {sorted(SAFETENSORS_DTYPES)}, a shape "
                             f"of non-negative ints, data_offsets [start, end])")
        start, end = offsets
        if end > data_size:
            raise ValueError(f"{what}: data_offsets [{start}, {end}] run past the data area of {data_size} bytes: "
                             f"the file is truncated")
        needed = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
        if end - start != needed:
            raise ValueError(f"{what}: data_offsets [{start}, {end}] hold {end - start} bytes, but shape {shape} of "
                             f"{info['dtype']} needs {needed}: the file is corrupt")
        ranges.append((start, end, name))
    ranges.sort()
    for (_, end, before), (start, _, after) in zip(ranges, ranges[1:]):
        if start < end:
            raise ValueError(f"{path}: tensors {before} and {after} overlap (bytes {start} to {end}): "
                             f"the file is corrupt")
    return header, data_start


def read_safetensors(path) -> dict:
    """{name: tensor} of a safetensors file, memory-mapped: bytes are read from disk only when used, so slicing one
    rank's part reads only that part. The mapping is private: writing into a tensor never changes the file."""
    header, data_start = read_header(path)
    if not header:
        return {}
    storage = torch.UntypedStorage.from_file(str(path), shared=False, nbytes=os.path.getsize(path))
    file_bytes = torch.empty(0, dtype=torch.uint8).set_(storage)
    tensors = {}
    for name, info in header.items():
        dtype, (start, end) = SAFETENSORS_DTYPES[info["dtype"]], info["data_offsets"]
        data = file_bytes[data_start + start:data_start + end]
        if (data_start + start) % dtype.itemsize:
            data = data.clone()  # an unaligned tensor (another writer's choice): copy it to view it as its dtype
        tensors[name] = data.view(dtype).view(info["shape"])
    return tensors
