"""GGUF files (llama.cpp's format): the header, the metadata, the tensor table, and the tensors dequantized.

A GGUF file is one file: the magic "GGUF", a version (2 or 3), the metadata as typed key-value pairs
(`general.architecture`, `llama.block_count`, ..., the tokenizer's `tokenizer.ggml.*`), then a table of tensors
(name, shape with the fastest-varying dimension first, type, offset), then the tensor data, each tensor at its
offset from the aligned start of the data. Everything is checked before a byte of data is used: every length
and offset lies inside the file and the tensors do not overlap, so a truncated or corrupt file is refused naming
the file and the tensor.

- `read_gguf(path)` returns the metadata and the tensors, dequantized to fp32 torch tensors in our shapes
  ([out, in] for a weight: GGUF's dims reversed). F32, F16, BF16, Q8_0, Q4_0 and Q4_1 are read; any other type is
  refused with its name.
- `model_fields(metadata)`: the ModelArgs fields of a LLaMA-architecture file; `OUR_NAME`: its tensor names to ours.
  llama.cpp stores q and k in Meta's rotary layout (its converter undoes Hugging Face's permutation), which is
  model.py's, so they load as they are.
The block formats, per 32 weights: Q8_0 is an fp16 scale d and 32 int8 q, w = d q; Q4_0 is d and 16 bytes of
4-bit q (the low nibbles are weights 0-15, the high ones 16-31), w = d (q - 8); Q4_1 is d, an fp16 minimum m and
the same nibbles, w = d q + m.
Left out: the k-quants (Q2_K ... Q6_K) and the other types, refused by name; big-endian files; lazy reading
(a file is dequantized whole, in host memory, which suits the small models this serves); writing GGUF.
"""
import struct
from pathlib import Path

import numpy as np
import torch

MAGIC = b"GGUF"
# Metadata value types: (struct format, size) of the scalars; 8 is a string, 9 an array.
SCALARS = {0: ("<B", 1), 1: ("<b", 1), 2: ("<H", 2), 3: ("<h", 2), 4: ("<I", 4), 5: ("<i", 4), 6: ("<f", 4),
           7: ("<?", 1), 10: ("<Q", 8), 11: ("<q", 8), 12: ("<d", 8)}
STRING, ARRAY = 8, 9
# Tensor types read here: name, weights per block, bytes per block.
TYPES = {0: ("F32", 1, 4), 1: ("F16", 1, 2), 30: ("BF16", 1, 2), 8: ("Q8_0", 32, 34), 2: ("Q4_0", 32, 18),
         3: ("Q4_1", 32, 20)}
OTHER_TYPES = {6: "Q5_0", 7: "Q5_1", 9: "Q8_1", 10: "Q2_K", 11: "Q3_K", 12: "Q4_K", 13: "Q5_K", 14: "Q6_K",
               15: "Q8_K", 16: "IQ2_XXS", 17: "IQ2_XS", 18: "IQ3_XXS", 19: "IQ1_S", 20: "IQ4_NL", 21: "IQ3_S",
               22: "IQ2_S", 23: "IQ4_XS", 24: "I8", 25: "I16", 26: "I32", 27: "I64", 28: "F64", 29: "IQ1_M"}
OUR_NAME = {"token_embd": "tok_embeddings", "output_norm": "norm", "output": "output", "attn_norm": "attention_norm",
            "attn_q": "attention.wq", "attn_k": "attention.wk", "attn_v": "attention.wv",
            "attn_output": "attention.wo", "ffn_norm": "ffn_norm", "ffn_gate": "feed_forward.w1",
            "ffn_up": "feed_forward.w3", "ffn_down": "feed_forward.w2"}


class Reader:
    """Little-endian fields from a bytes-like buffer, each checked against the end of the file."""

    def __init__(self, data, path):
        self.data, self.path, self.at = data, path, 0

    def take(self, size: int, what: str):
        if self.at + size > len(self.data):
            raise ValueError(f"{self.path}: truncated: {what} needs {size} bytes at offset {self.at}, the file has "
                             f"{len(self.data)}; download it again")
        piece, self.at = self.data[self.at:self.at + size], self.at + size
        return piece

    def scalar(self, kind: int, what: str):
        fmt, size = SCALARS[kind]
        return struct.unpack(fmt, self.take(size, what))[0]

    def string(self, what: str) -> str:
        length = self.scalar(10, what)
        try:
            return bytes(self.take(length, what)).decode("utf-8")
        except UnicodeDecodeError:
            raise ValueError(f"{self.path}: {what} is not UTF-8 text: the file is corrupt") from None

    def value(self, kind: int, what: str):
        if kind == STRING:
            return self.string(what)
        if kind == ARRAY:
            item, count = self.scalar(4, what), self.scalar(10, what)
            if item in SCALARS:  # numbers in one read (a vocabulary's scores and types are long)
                fmt, size = SCALARS[item]
                raw = self.take(size * count, what)
                return np.frombuffer(raw, dtype=np.dtype(fmt)).tolist()
            return [self.value(item, what) for _ in range(count)]
        if kind not in SCALARS:
            raise ValueError(f"{self.path}: {what} has the unknown metadata type {kind}: the file is corrupt")
        return self.scalar(kind, what)


def read_gguf(path, tensors: bool = True):
    """(metadata dict, {GGUF tensor name: fp32 tensor in our shape}) of a GGUF file, every field checked;
    tensors=False: every name maps to None, nothing is dequantized."""
    path, want_tensors = Path(path), tensors
    data = np.memmap(path, dtype=np.uint8, mode="r") if path.stat().st_size else b""
    reader = Reader(data, path)
    if bytes(reader.take(4, "the magic")) != MAGIC:
        raise ValueError(f"{path} is not a GGUF file (it does not begin with 'GGUF')")
    version = reader.scalar(4, "the version")
    if version not in (2, 3):
        raise ValueError(f"{path}: GGUF version {version}; versions 2 and 3 are read")
    tensor_count, metadata_count = reader.scalar(10, "the tensor count"), reader.scalar(10, "the metadata count")
    metadata = {}
    for _ in range(metadata_count):
        key = reader.string("a metadata key")
        metadata[key] = reader.value(reader.scalar(4, f"the type of {key}"), key)
    table = []
    for _ in range(tensor_count):
        name = reader.string("a tensor name")
        dims = [reader.scalar(10, f"{name}'s shape") for _ in range(reader.scalar(4, f"{name}'s rank"))]
        kind, offset = reader.scalar(4, f"{name}'s type"), reader.scalar(10, f"{name}'s offset")
        table.append((name, dims, kind, offset))
    alignment = metadata.get("general.alignment", 32)
    start = (reader.at + alignment - 1) // alignment * alignment
    tensors, spans = {}, []
    for name, dims, kind, offset in table:
        if kind not in TYPES:
            raise ValueError(f"{path}: tensor {name} has type {OTHER_TYPES.get(kind, kind)}, which is not read here "
                             f"(F32, F16, BF16, Q8_0, Q4_0 and Q4_1 are): convert the model to one of those")
        type_name, per_block, block_bytes = TYPES[kind]
        count = int(np.prod(dims)) if dims else 1
        if count % per_block:
            raise ValueError(f"{path}: tensor {name} has {count} weights, not a whole number of {type_name} blocks")
        size, begin = count // per_block * block_bytes, start + offset
        if begin + size > len(data):
            raise ValueError(f"{path}: tensor {name} ({type_name}, {size} bytes at {begin}) ends past the end of the "
                             f"file ({len(data)} bytes): the file is truncated; download it again")
        spans.append((begin, begin + size, name))
        tensors[name] = None
        if want_tensors:
            raw = np.asarray(data[begin:begin + size])
            tensors[name] = torch.from_numpy(dequantize(raw, type_name, count)).reshape(list(reversed(dims)))
    spans.sort()
    for (_, end, first), (begin, _, second) in zip(spans, spans[1:]):
        if begin < end:
            raise ValueError(f"{path}: tensors {first} and {second} overlap: the file is corrupt")
    return metadata, tensors


def dequantize(raw: np.ndarray, type_name: str, count: int) -> np.ndarray:
    """fp32 weights of `count` elements from their bytes in one of the types read here."""
    if type_name == "F32":
        return raw.view("<f4").astype(np.float32)
    if type_name == "F16":
        return raw.view("<f2").astype(np.float32)
    if type_name == "BF16":  # the top half of an fp32
        return (raw.view("<u2").astype(np.uint32) << 16).view(np.float32)
    blocks = raw.reshape(count // 32, -1)
    scale = blocks[:, 0:2].copy().view("<f2").astype(np.float32)  # d, one per block: shape (blocks, 1)
    if type_name == "Q8_0":
        return (scale * blocks[:, 2:].view(np.int8).astype(np.float32)).reshape(-1)
    nibbles = blocks[:, 4:] if type_name == "Q4_1" else blocks[:, 2:]
    q = np.concatenate([nibbles & 0x0F, nibbles >> 4], axis=1).astype(np.float32)  # weights 0-15, then 16-31
    if type_name == "Q4_0":
        return (scale * (q - 8)).reshape(-1)
    minimum = blocks[:, 2:4].copy().view("<f2").astype(np.float32)
    return (scale * q + minimum).reshape(-1)


def holds_tensor(path, name: str) -> bool:
    """Whether the file has a tensor of this name (reading its table only)."""
    return name in read_gguf(path, tensors=False)[1]


def our_name(name: str):
    """Our parameter name of a GGUF tensor name, or None for one we do not hold (rope_freqs: computed here)."""
    parts = name.split(".")
    if parts[0] == "blk" and len(parts) == 4 and parts[2] in OUR_NAME:
        return f"layers.{parts[1]}.{OUR_NAME[parts[2]]}.{parts[3]}"
    if len(parts) == 2 and parts[0] in OUR_NAME and parts[0] in ("token_embd", "output_norm", "output"):
        return f"{OUR_NAME[parts[0]]}.{parts[1]}"
    return None


def model_fields(metadata: dict, path) -> tuple:
    """(ModelArgs fields, FFN width) of a LLaMA-architecture GGUF file; the caller derives multiple_of."""
    architecture = metadata.get("general.architecture")
    if architecture != "llama":
        raise ValueError(f"{path}: general.architecture is {architecture!r}; model.py builds 'llama' (LLaMA, "
                         f"Mistral without a sliding window, SmolLM, TinyLlama, ...)")

    def field(key, default=None):
        value = metadata.get(f"llama.{key}", default)
        if value is None:
            raise ValueError(f"{path}: the metadata lacks llama.{key}")
        return value

    dim, n_heads = field("embedding_length"), field("attention.head_count")
    if field("rope.dimension_count", dim // n_heads) != dim // n_heads:
        raise ValueError(f"{path}: llama.rope.dimension_count={field('rope.dimension_count')} rotates part of each "
                         f"head; model.py rotates all {dim // n_heads} dimensions of it")
    if metadata.get("llama.rope.scaling.type", "none") != "none":
        raise ValueError(f"{path}: RoPE scaling {metadata['llama.rope.scaling.type']!r} is not read from GGUF")
    vocab = field("vocab_size", len(metadata.get("tokenizer.ggml.tokens", [])) or None)
    fields = dict(dim=dim, n_layers=field("block_count"), n_heads=n_heads, vocab_size=vocab,
                  n_kv_heads=field("attention.head_count_kv", n_heads),
                  norm_eps=field("attention.layer_norm_rms_epsilon"), rope_theta=field("rope.freq_base", 10000.0),
                  max_seq_len=field("context_length", 2048))
    return fields, field("feed_forward_length")
