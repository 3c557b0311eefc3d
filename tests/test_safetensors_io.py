"""safetensors_io: files laid out as the safetensors spec says (checked byte by byte here, not by reading them back),
round trips of every dtype, another writer's unaligned file, a reader that maps the file instead of copying it, every
kind of corruption refused naming the file and the tensor, and writes that leave the old file whole when they fail."""
import json
import struct

import numpy as np
import pytest
import torch

import safetensors_io

# The ten dtypes safetensors_io stores, written out here rather than taken from it.
SAFETENSORS_DTYPES = [torch.float64, torch.float32, torch.float16, torch.bfloat16, torch.int64, torch.int32,
                      torch.int16, torch.int8, torch.uint8, torch.bool]


@pytest.mark.parametrize("dtype", SAFETENSORS_DTYPES)
def test_safetensors_round_trip_keeps_values_dtype_and_shape(tmp_path, dtype):
    values = torch.randn(3, 5, generator=torch.Generator().manual_seed(0)) * 100
    tensors = {"matrix": values.to(dtype), "scalar": values[0, 0].to(dtype), "empty": values[:0].to(dtype),
               "column": values[:, 1].to(dtype)}  # a non-contiguous view
    safetensors_io.write_safetensors(tmp_path / "t.safetensors", tensors, metadata={"format": "pt"})
    read = safetensors_io.read_safetensors(tmp_path / "t.safetensors")
    assert read.keys() == tensors.keys()
    for name, tensor in tensors.items():
        assert read[name].dtype == dtype and read[name].shape == tensor.shape and torch.equal(read[name], tensor), name


def test_safetensors_file_layout_follows_the_spec(tmp_path):
    a, b = torch.arange(6, dtype=torch.float32).view(2, 3), torch.tensor([1.5, -2.0], dtype=torch.bfloat16)
    safetensors_io.write_safetensors(tmp_path / "t.safetensors", {"b": b, "a": a}, metadata={"format": "pt"})
    raw = (tmp_path / "t.safetensors").read_bytes()
    (length,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8:8 + length])
    assert (8 + length) % 8 == 0 and header["__metadata__"] == {"format": "pt"}
    assert header["a"]["dtype"] == "F32" and header["a"]["shape"] == [2, 3]
    assert header["b"]["dtype"] == "BF16" and header["b"]["shape"] == [2]
    data = raw[8 + length:]
    start, end = header["a"]["data_offsets"]
    assert data[start:end] == np.arange(6, dtype="<f4").tobytes()
    start, end = header["b"]["data_offsets"]
    assert data[start:end] == b.view(torch.int16).numpy().astype("<i2").tobytes()
    assert len(data) == 6 * 4 + 2 * 2  # nothing else in the data area


def test_safetensors_reader_reads_another_writers_unaligned_file(tmp_path):
    header = json.dumps({"x": {"dtype": "F32", "shape": [2], "data_offsets": [1, 9]},
                         "y": {"dtype": "U8", "shape": [1], "data_offsets": [0, 1]}}).encode()  # odd length, x at 1
    data = b"\x07" + np.array([0.5, 3.0], dtype="<f4").tobytes()
    (tmp_path / "t.safetensors").write_bytes(struct.pack("<Q", len(header)) + header + data)
    read = safetensors_io.read_safetensors(tmp_path / "t.safetensors")
    assert read["x"].tolist() == [0.5, 3.0] and read["y"].tolist() == [7]


def test_safetensors_reader_maps_the_file_instead_of_copying_it(tmp_path):
    path = tmp_path / "t.safetensors"
    safetensors_io.write_safetensors(path, {"x": torch.zeros(1024)})
    tensor = safetensors_io.read_safetensors(path)["x"]
    # Change the file after reading it: a mapped tensor shows the bytes on disk now (Linux shows a private mapping's
    # file pages until they are written to), a copied one would not.
    with open(path, "r+b") as f:
        f.seek(-4, 2)
        f.write(np.array([5.0], dtype="<f4").tobytes())
    assert tensor[-1].item() == 5.0
    tensor[0] = 9.0  # a private mapping: writing into the tensor leaves the file alone
    assert safetensors_io.read_safetensors(path)["x"][0].item() == 0.0


def raw_safetensors(path, header, data, length=None):
    encoded = json.dumps(header).encode() if isinstance(header, dict) else header
    path.write_bytes(struct.pack("<Q", len(encoded) if length is None else length) + encoded + data)
    return path


GOOD = {"first": {"dtype": "F32", "shape": [2, 3], "data_offsets": [0, 24]},
        "second": {"dtype": "F32", "shape": [4], "data_offsets": [24, 40]}}


@pytest.mark.parametrize("header, data, length, message", [
    (GOOD, bytes(30), None, r"tensor second: data_offsets \[24, 40\] run past the data area of 30 bytes: the file is "
                            r"truncated"),
    (GOOD, bytes(40), 10**6, r"the header length 1000000 runs past the end of the file"),
    ({**GOOD, "second": {"dtype": "F32", "shape": [4], "data_offsets": [40, 56]}}, bytes(40), None,
     r"tensor second: data_offsets \[40, 56\] run past the data area of 40 bytes"),
    ({**GOOD, "first": {"dtype": "F32", "shape": [2, 4], "data_offsets": [0, 24]}}, bytes(40), None,
     r"tensor first: data_offsets \[0, 24\] hold 24 bytes, but shape \[2, 4\] of F32 needs 32"),
    ({**GOOD, "first": {"dtype": "BF16", "shape": [2, 3], "data_offsets": [0, 24]}}, bytes(40), None,
     r"tensor first: .* hold 24 bytes, but shape \[2, 3\] of BF16 needs 12"),
    ({**GOOD, "second": {"dtype": "F32", "shape": [4], "data_offsets": [16, 32]}}, bytes(40), None,
     r"tensors first and second overlap"),
    (b'{"first": {"dtype": "F32", ', bytes(40), None, r"the header is not valid JSON"),
    ({"first": {"dtype": "Q8", "shape": [1], "data_offsets": [0, 1]}}, bytes(1), None, r"tensor first: bad header"),
])
def test_corrupt_safetensors_are_refused_naming_file_and_tensor(tmp_path, header, data, length, message):
    path = raw_safetensors(tmp_path / "broken.safetensors", header, data, length)
    with pytest.raises(ValueError, match=rf"{path}: {message}"):
        safetensors_io.read_safetensors(path)


def test_a_file_shorter_than_its_header_length_field_is_refused(tmp_path):
    path = tmp_path / "stub.safetensors"
    path.write_bytes(b"\x01\x02")
    with pytest.raises(ValueError, match=f"{path}: 2 bytes, shorter than the 8-byte header length"):
        safetensors_io.read_safetensors(path)


def test_a_failed_write_leaves_the_old_file_and_no_temporary(tmp_path, monkeypatch):
    path = tmp_path / "t.safetensors"
    safetensors_io.write_safetensors(path, {"x": torch.ones(3)})

    def disk_full(fd):
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(safetensors_io.os, "fsync", disk_full)
    with pytest.raises(OSError, match="No space left"):
        safetensors_io.write_safetensors(path, {"x": torch.zeros(3)})
    assert torch.equal(safetensors_io.read_safetensors(path)["x"], torch.ones(3))
    assert [p.name for p in tmp_path.iterdir()] == ["t.safetensors"]
