"""Checkpoints: Meta and Hugging Face LLaMA folders (read and write, at any tensor-parallel size), and training-state
save and resume with an atomic commit.

- Files: safetensors_io.py reads and writes safetensors (memory-mapped, every offset checked before a byte is used,
  so a truncated or corrupt file is refused with the file's and the tensor's names) and writes every file here
  atomically (a temporary file in the same folder, fsync, os.replace), so a reader never sees half a file.
  read_safetensors and write_safetensors are re-exported: `from checkpoint import read_safetensors` works.
- Loading fills an already built model (model.Transformer, or shard.build_model at any tp) in place, strictly:
  missing and unexpected names are listed, and shapes that disagree with the config are reported with both values.
  Each source is opened lazily (our safetensors reader; torch.load with mmap=True and weights_only=True) and seen as
  "this tensor is these pieces concatenated along this dim"; each rank copies only its own slice out of the
  (memory-mapped) pieces, reading only that slice's pages. So Meta files with any number of shards, HF files and our
  training state all load at any tp.
- Meta (params.json, consolidated.NN.pth, tokenizer.model): wq/wk/wv/w1/w3/output split along dim 0, wo/w2 along
  dim 1, norms repeated in every shard. tok_embeddings is split along the embedding dim in LLaMA-1/2 files
  (fairscale's ParallelEmbedding) and along the vocabulary in Llama 3's; ours splits the vocabulary. The loader tells
  the two apart by shape. rope.freqs (a buffer in LLaMA-1/2 files) is ignored knowingly.
- Hugging Face (config.json, model.safetensors[.index.json] or pytorch_model*.bin[.index.json]): names are mapped
  to Meta's, and q/k rows are un-permuted, because HF's rotary embedding rotates (i, i + head_dim/2) pairs where
  Meta's rotates (2i, 2i+1). HF stores the FFN width (intermediate_size) and Meta derives it from multiple_of, so we
  choose a multiple_of that derives it. rotary_emb.inv_freq is ignored knowingly.
- Export (`save_hf`, `save_meta`) gathers the tp shards one parameter at a time; rank 0 alone writes, one file at
  a time, into a temporary folder next to the destination that is renamed at the end.
- Training state (`save_training_state`): root/step-NNNNNNNN/ holds one safetensors file per tp rank (written by
  dp rank 0: the dp replicas are identical), every rank's RNG state, the caller's state, and manifest.json. The
  manifest is written last, after a barrier, and the folder is renamed into place: that is the commit. It loads
  at any tp; the RNG state is restored when the world layout is the same.
- CLI: `python checkpoint.py convert SRC DST --to hf|meta [--shards N]`.

Left out: RoPE frequency scaling (Llama 3.1's use_scaled_rope, HF's rope_scaling) and biases (refused with a
message); Llama 3's tiktoken tokenizer (refused: data.py reads SentencePiece only); padding a checkpoint's
vocabulary when tp does not divide it; file checksums (sizes and headers are checked); a checkpoint folder that
not every rank can see; checkpoints whose tensors have different dtypes (the model holds one dtype). What the
safetensors reader and writer leave out (big-endian hosts among it) is listed in safetensors_io.py.
"""
import argparse
import contextlib
import dataclasses
import io
import json
import os
import random
import re
import shutil
from pathlib import Path
from typing import Optional

import numpy as np
import torch
import torch.distributed as dist

from data import Tokenizer
from model import ModelArgs, Transformer
from safetensors_io import _fsync_folder, _read_header, _write_file, read_safetensors, write_safetensors
from shard import SPLIT_DIM, Grid, gather_full, split_dim_of

# Meta's shards split like ours except the embedding (LLaMA-1/2 split its columns, we split the vocabulary).
META_SPLIT_DIM = {**SPLIT_DIM, "tok_embeddings": 1}
IGNORED = ("rope.freqs", "rotary_emb.inv_freq")  # rotary frequency buffers: recomputed, never trained
HF_LAYER_NAMES = {"attention.wq": "self_attn.q_proj", "attention.wk": "self_attn.k_proj",
                  "attention.wv": "self_attn.v_proj", "attention.wo": "self_attn.o_proj",
                  "feed_forward.w1": "mlp.gate_proj", "feed_forward.w3": "mlp.up_proj",
                  "feed_forward.w2": "mlp.down_proj", "attention_norm": "input_layernorm",
                  "ffn_norm": "post_attention_layernorm"}
HF_TOP_NAMES = {"tok_embeddings.weight": "model.embed_tokens.weight", "norm.weight": "model.norm.weight",
                "output.weight": "lm_head.weight"}
MANIFEST = "manifest.json"  # the commit marker of a training-state checkpoint, written last


# ----------------------------------------------------------------------------------------------------
# Files: .pth/.bin and JSON (safetensors and atomic writes are in safetensors_io.py)


def _torch_load(path):
    """A .pth/.bin state dict, memory-mapped, with pickle restricted to tensors and plain containers."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as error:  # truncated zip, refused pickle, pre-1.6 format (no mmap): name the file
        raise ValueError(f"{path}: torch.load(weights_only=True, mmap=True) failed: {error}") from None


def _read_json(path):
    try:
        return json.loads(Path(path).read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ValueError(f"{path}: cannot read it as JSON ({error})") from None


# ----------------------------------------------------------------------------------------------------
# Names and the rotary permutation


def to_hf_name(name: str) -> str:
    if name in HF_TOP_NAMES:
        return HF_TOP_NAMES[name]
    layer, module = re.fullmatch(r"layers\.(\d+)\.(.+)\.weight", name).groups()
    return f"model.layers.{layer}.{HF_LAYER_NAMES[module]}.weight"


def from_hf_name(name: str) -> Optional[str]:
    """The Meta name of a Hugging Face name, or None for a name we do not know."""
    top = {hf: meta for meta, hf in HF_TOP_NAMES.items()}
    match = re.fullmatch(r"model\.layers\.(\d+)\.(.+)\.weight", name)
    modules = {hf: meta for meta, hf in HF_LAYER_NAMES.items()}
    if match and match.group(2) in modules:
        return f"layers.{match.group(1)}.{modules[match.group(2)]}.weight"
    return top.get(name)


def permute_for_hf(weight, n_heads: int):
    """Meta -> HF rows of wq or wk: each head's rows [pair0.x, pair0.y, pair1.x, ...] become [all x, then all y]."""
    rows, columns = weight.shape
    return weight.view(n_heads, rows // n_heads // 2, 2, columns).transpose(1, 2).reshape(rows, columns)


def unpermute_from_hf(weight, n_heads: int):
    """HF -> Meta rows of q_proj or k_proj (k with the kv heads): the inverse of permute_for_hf."""
    rows, columns = weight.shape
    return weight.view(n_heads, 2, rows // n_heads // 2, columns).transpose(1, 2).reshape(rows, columns)


# ----------------------------------------------------------------------------------------------------
# Reading: format, config, tokenizer


def detect_format(folder) -> str:
    """"meta", "hf" or "state" (our training state), from the files present."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"checkpoint folder {folder} does not exist")
    names = sorted(p.name for p in folder.iterdir())
    if MANIFEST in names:
        return "state"
    if "params.json" in names and any(re.fullmatch(r"consolidated\.\d+\.pth", n) for n in names):
        return "meta"
    if "config.json" in names and any(re.fullmatch(r"model.*\.safetensors|pytorch_model.*\.bin", n) for n in names):
        return "hf"
    raise ValueError(f"{folder} holds neither a Meta checkpoint (params.json + consolidated.NN.pth) nor a Hugging "
                     f"Face one (config.json + model.safetensors, shards + model.safetensors.index.json, or "
                     f"pytorch_model*.bin) nor a training state ({MANIFEST}); files found: {names or 'none'}")


def _hf_multiple_of(dim: int, width: int) -> int:
    """A multiple_of from which Meta's rule derives the FFN width HF's config states (256 for LLaMA-1/2, a smaller
    power of two for small models, else the width itself: 8/3 dim rounded up to a multiple of the width is the width
    whenever the width is at least 8/3 dim, as Llama 3's 14336 is for dim 4096). 0: no multiple_of derives it."""
    hidden = int(2 * 4 * dim / 3)
    return next((m for m in (256, 128, 64, 32, 16, 8, 4, 2, 1, width) if m * -(-hidden // m) == width), 0)


def _args_from_hf_config(config: dict, path) -> ModelArgs:
    refused = {key: config[key] for key, fine in (("rope_scaling", None), ("attention_bias", False),
                                                  ("mlp_bias", False), ("hidden_act", "silu"))
               if config.get(key, fine) != fine}
    if refused:
        raise ValueError(f"{path}: {refused} is not supported by model.py (no RoPE scaling, no biases, SwiGLU only)")
    try:
        dim, n_heads, width = config["hidden_size"], config["num_attention_heads"], config["intermediate_size"]
        fields = dict(dim=dim, n_layers=config["num_hidden_layers"], n_heads=n_heads, vocab_size=config["vocab_size"],
                      n_kv_heads=config.get("num_key_value_heads", n_heads), norm_eps=config["rms_norm_eps"],
                      rope_theta=config.get("rope_theta", 10000.0),
                      max_seq_len=config.get("max_position_embeddings", 2048),
                      tie_embeddings=config.get("tie_word_embeddings", False))
    except KeyError as error:
        raise ValueError(f"{path}: the field {error} is missing") from None
    if config.get("head_dim", dim // n_heads) != dim // n_heads:
        raise ValueError(f"{path}: head_dim={config['head_dim']} differs from hidden_size / num_attention_heads = "
                         f"{dim // n_heads}; model.py derives head_dim from them")
    multiple_of = _hf_multiple_of(dim, width)
    if not multiple_of:
        raise ValueError(f"{path}: intermediate_size={width}, but ModelArgs derives at least {int(8 * dim / 3)} from "
                         f"hidden_size={dim} (Meta's rule: 8/3 dim rounded up to multiple_of); model.py cannot "
                         f"build this FFN width")
    return ModelArgs(multiple_of=multiple_of, **fields)


def _read_args(folder, layout: str) -> ModelArgs:
    """The config of a checkpoint folder; vocab_size may be -1 (Meta: take it from the tokenizer)."""
    if layout == "hf":
        return _args_from_hf_config(_read_json(folder / "config.json"), folder / "config.json")
    if layout == "state":
        return ModelArgs(**_read_json(folder / MANIFEST)["model_args"])
    params = _read_json(folder / "params.json")
    if params.pop("use_scaled_rope", False):
        raise ValueError(f"{folder / 'params.json'}: use_scaled_rope (Llama 3.1's RoPE frequency scaling) is not "
                         f"implemented in model.py")
    unknown = sorted(params.keys() - {field.name for field in dataclasses.fields(ModelArgs)})
    if unknown:
        raise ValueError(f"{folder / 'params.json'}: unknown fields {unknown}; ModelArgs has Meta's params.json fields")
    return ModelArgs(**params)


def checkpoint_args(folder, tokenizer_path=None, **overrides) -> ModelArgs:
    """ModelArgs of a checkpoint folder; Meta's vocab_size -1 is taken from the tokenizer (tokenizer_path, else
    the folder's tokenizer.model). Overrides (e.g. max_seq_len, which params.json lacks) are applied last."""
    folder = Path(folder)
    args = _read_args(folder, detect_format(folder))
    if args.vocab_size == -1:
        args.vocab_size = load_tokenizer(tokenizer_path or folder).vocab_size
    return dataclasses.replace(args, **overrides)


def load_tokenizer(path, vocab_size: Optional[int] = None) -> Tokenizer:
    """The SentencePiece tokenizer at `path` (a file, or a folder holding tokenizer.model), refused when it has
    more tokens than the model's vocabulary (its largest ids would index past the embedding)."""
    path = Path(path)
    path = path / "tokenizer.model" if path.is_dir() else path
    if not path.is_file():
        raise FileNotFoundError(f"no tokenizer at {path}: pass the path of the checkpoint's tokenizer.model")
    with open(path, "rb") as f:
        if f.read(64).startswith(b"version https://git-lfs"):
            raise ValueError(f"{path} is a git-lfs pointer, not the tokenizer: fetch the file with `git lfs pull`")
    tokenizer = Tokenizer(path)  # a non-SentencePiece file (Llama 3's tiktoken, ...) is refused here, with its name
    if vocab_size is not None and tokenizer.vocab_size > vocab_size:
        raise ValueError(f"the tokenizer {path} has {tokenizer.vocab_size} tokens, more than the model's vocabulary of "
                         f"{vocab_size}: use the tokenizer that belongs to this checkpoint")
    return tokenizer


# ----------------------------------------------------------------------------------------------------
# Reading: weights into a model, at any tp


def _meta_entries(folder, dim: int) -> dict:
    files = sorted(folder.glob("consolidated.*.pth"))
    expected = [folder / f"consolidated.{i:02d}.pth" for i in range(len(files))]
    if files != expected:
        raise ValueError(f"{folder}: shards {[f.name for f in files]} are not consolidated.00.pth .. "
                         f"consolidated.{len(files) - 1:02d}.pth: a shard is missing or misnamed")
    shards = [_torch_load(f) for f in files]
    for f, shard in zip(files[1:], shards[1:]):
        if shard.keys() != shards[0].keys():
            raise ValueError(f"{f}: its tensors differ from {files[0].name}'s: "
                             f"{sorted(shard.keys() ^ shards[0].keys())}")
    entries = {}
    for name in shards[0]:
        pieces, kind = [shard[name] for shard in shards], name.split(".")[-2] if "." in name else name
        split = META_SPLIT_DIM.get(kind) if len(pieces) > 1 else None
        if kind == "tok_embeddings" and split is not None:  # Llama 3 splits the vocabulary: its columns are whole
            split = 0 if pieces[0].shape[1] == dim else 1
        entries[name] = (pieces, split)
    return entries


def _hf_entries(folder) -> tuple:
    """Entries for the model's names, and the file they came from (for messages)."""
    for index_name, single in (("model.safetensors.index.json", "model.safetensors"),
                               ("pytorch_model.bin.index.json", "pytorch_model.bin")):
        if (folder / index_name).is_file():
            where, weight_map = folder / index_name, _read_json(folder / index_name).get("weight_map", {})
        elif (folder / single).is_file():
            where, weight_map = folder / single, None
        else:
            continue
        opened = {}
        for file in sorted(set(weight_map.values())) if weight_map else [single]:
            if not (folder / file).is_file():
                raise FileNotFoundError(f"{where} names {file}, which is not in {folder}")
            read = read_safetensors if file.endswith(".safetensors") else _torch_load
            opened[file] = read(folder / file)
        weight_map = weight_map or {name: single for name in opened[single]}
        entries = {}
        for hf_name, file in weight_map.items():
            if hf_name not in opened[file]:
                raise ValueError(f"{where} says {hf_name} is in {file}, but that file does not hold it")
            entries[from_hf_name(hf_name) or hf_name] = ([opened[file][hf_name]], None)
        return entries, where
    raise ValueError(f"{folder}: no model.safetensors[.index.json] or pytorch_model.bin[.index.json]")


def _state_entries(folder) -> dict:
    manifest = _read_json(folder / MANIFEST)
    tp, split_dims = manifest["tp"], manifest["split_dims"]  # the layout it was saved with, not today's table
    opened = [read_safetensors(folder / f"model-tp{r:02d}-of-{tp:02d}.safetensors") for r in range(tp)]
    return {name: ([part[name] for part in opened], split_dims.get(name.split(".")[-2]) if tp > 1 else None)
            for name in opened[0]}


def _open_entries(folder, layout: str, args: ModelArgs):
    """{our name: (pieces, dim)}: the full tensor is the pieces concatenated along dim (None: pieces[0] is it)."""
    if layout == "meta":
        entries, where = _meta_entries(folder, args.dim), folder / "consolidated.*.pth"
    elif layout == "hf":
        entries, where = _hf_entries(folder)
    else:
        entries, where = _state_entries(folder), folder
    return {name: entry for name, entry in entries.items() if not name.endswith(IGNORED)}, where


def _slice(pieces, piece_dim, dim, start, length):
    """[start, start + length) along `dim` of the tensor made of `pieces` along `piece_dim`: views of the mapped
    files, so only the bytes of this slice are read."""
    if piece_dim is None:
        pieces, piece_dim = pieces[:1], 0  # replicated: any copy is the tensor
    if dim is None:
        return torch.cat(pieces, piece_dim) if len(pieces) > 1 else pieces[0]
    if dim != piece_dim:  # every piece spans the whole range along dim
        parts = [piece.narrow(dim, start, length) for piece in pieces]
        return torch.cat(parts, piece_dim) if len(parts) > 1 else parts[0]
    parts, offset = [], 0
    for piece in pieces:  # split along the same dim: keep each piece's overlap with the range
        low, high = max(start, offset), min(start + length, offset + piece.shape[dim])
        if low < high:
            parts.append(piece.narrow(dim, low - offset, high - low))
        offset += piece.shape[dim]
    return torch.cat(parts, dim) if len(parts) > 1 else parts[0]


def _config_fields(name: str, args: ModelArgs) -> str:
    """The config fields a parameter's shape comes from, for messages."""
    kind = name.split(".")[-2]
    width = (f"FFN width {args.ffn_hidden_dim} (multiple_of={args.multiple_of}, "
             f"ffn_dim_multiplier={args.ffn_dim_multiplier})")
    return {"tok_embeddings": f"vocab_size={args.vocab_size}", "output": f"vocab_size={args.vocab_size}",
            "wq": f"n_heads={args.n_heads} x head_dim={args.head_dim}", "wo": f"n_heads={args.n_heads}",
            "wk": f"n_kv_heads={args.n_kv_heads} x head_dim={args.head_dim}", "wv": f"n_kv_heads={args.n_kv_heads}",
            "w1": width, "w2": width, "w3": width}.get(kind, "") + f", dim={args.dim}"


def _model_params(model) -> dict:
    """The parameters a checkpoint holds. With tied embeddings output.weight is tok_embeddings.weight, and is left
    out even when the model object holds two tensors (a model materialized with to_empty loses the tie)."""
    params = dict(model.named_parameters())
    if model.args.tie_embeddings:
        params.pop("output.weight", None)
    return params


@torch.no_grad()
def load_checkpoint(folder, model, grid: Optional[Grid] = None):
    """Fill the model's parameters (this rank's shards) from a Meta, Hugging Face or training-state folder, strictly."""
    grid, folder = grid or Grid(), Path(folder)
    layout, args = detect_format(folder), model.args
    saved = _read_args(folder, layout)
    differ = [f"{field}: model {getattr(args, field)}, checkpoint {getattr(saved, field)}" for field in
              ("dim", "n_layers", "n_heads", "n_kv_heads", "norm_eps", "rope_theta", "tie_embeddings")
              if getattr(args, field) != getattr(saved, field)]  # head counts and eps do not show in the shapes
    if differ:
        raise ValueError(f"{folder}: the model's config differs from the checkpoint's: {'; '.join(differ)}. Build the "
                         f"model from checkpoint_args({str(folder)!r})")
    entries, where = _open_entries(folder, layout, args)
    params = _model_params(model)
    if args.tie_embeddings:  # one tensor serves both; some files repeat it as the head
        entries.pop("output.weight", None)
    missing, unexpected = sorted(params.keys() - entries.keys()), sorted(entries.keys() - params.keys())
    if missing or unexpected:
        raise ValueError(f"{where}: names do not match the model; missing: {missing or 'none'}; unexpected: "
                         f"{unexpected or 'none'} (ignored knowingly: {', '.join(IGNORED)})")
    mismatched = []
    for name, param in params.items():
        (pieces, piece_dim), split = entries[name], split_dim_of(name, grid.tp)
        have, want = list(pieces[0].shape), list(param.shape)
        if piece_dim is not None:
            have[piece_dim] = sum(piece.shape[piece_dim] for piece in pieces)
        if split is not None:
            want[split] *= grid.tp
        if have != want:
            mismatched.append(f"{name}: weights {have}, config {want} ({_config_fields(name, args)})")
    if mismatched:
        raise ValueError(f"{where}: the weights' shapes disagree with the config:\n  " + "\n  ".join(mismatched) +
                         "\nfix the config (params.json / config.json) or use the weights it belongs to")
    for name, param in params.items():
        split = split_dim_of(name, grid.tp)
        length = param.shape[split] if split is not None else 0
        local = _slice(*entries[name], split, grid.tp_rank * length, length)
        if layout == "hf" and name.endswith(("wq.weight", "wk.weight")):
            local = unpermute_from_hf(local, local.shape[0] // args.head_dim)  # shards hold whole heads: commutes
        param.copy_(local)
    if args.tie_embeddings and model.output.weight is not model.tok_embeddings.weight:
        model.output.weight.copy_(model.tok_embeddings.weight)  # a model that lost the tie still gets equal values


# ----------------------------------------------------------------------------------------------------
# Writing: Hugging Face and Meta folders


def _barrier():
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


@contextlib.contextmanager
def _atomic_folder(folder, writer: bool):
    """A temporary folder next to `folder`, renamed to it when the block succeeds (removed when it fails)."""
    folder = Path(folder)
    if folder.exists():  # every rank checks, so that none starts a collective the others will not join
        raise FileExistsError(f"{folder} already exists: choose a new folder or delete it")
    temporary = folder.with_name(f".{folder.name}.tmp{os.getpid()}")
    if writer:
        temporary.mkdir(parents=True)
    try:
        yield temporary
        if writer:
            os.replace(temporary, folder)
            _fsync_folder(folder.parent)
    finally:
        if writer and temporary.exists():
            shutil.rmtree(temporary)
    _barrier()  # nobody reads the folder before it exists


def _gathered(model, grid: Grid, names):
    """(name, full tensor on the host) for rank 0, one parameter at a time. The other ranks of its tp group take part
    in each gather (a collective) and get nothing; the other dp replicas hold the same values and skip it."""
    params = _model_params(model)
    for name in names:
        if grid.dp_rank == 0:
            full = gather_full(params[name], grid)
            if grid.rank == 0:
                yield name, full.cpu()


def _copy_tokenizer(tokenizer_path, folder, vocab_size):
    if tokenizer_path is not None:
        load_tokenizer(tokenizer_path, vocab_size)
        shutil.copyfile(Path(tokenizer_path) / "tokenizer.model" if Path(tokenizer_path).is_dir() else tokenizer_path,
                        folder / "tokenizer.model")


def save_hf(model, folder, grid: Optional[Grid] = None, tokenizer_path=None, max_shard_bytes: int = 5 * 2**30):
    """Write a Hugging Face folder: config.json, model.safetensors (or shards of at most max_shard_bytes plus
    model.safetensors.index.json), tokenizer.model. Every rank calls it; rank 0 writes."""
    grid, args = grid or Grid(), model.args
    params = _model_params(model)
    files, size, total_size = [[]], 0, 0  # plan the files from the full shapes, before gathering anything
    for name, param in params.items():
        nbytes = param.numel() * param.element_size() * (grid.tp if split_dim_of(name, grid.tp) is not None else 1)
        if files[-1] and size + nbytes > max_shard_bytes:
            files, size = files + [[]], 0
        files[-1].append(name)
        size, total_size = size + nbytes, total_size + nbytes
    file_names = ["model.safetensors"] if len(files) == 1 else \
        [f"model-{i + 1:05d}-of-{len(files):05d}.safetensors" for i in range(len(files))]
    writer, dtype = grid.rank == 0, model.tok_embeddings.weight.dtype
    with _atomic_folder(folder, writer) as temporary:
        weight_map = {}
        for file_name, names in zip(file_names, files):
            tensors = {}
            for name, full in _gathered(model, grid, names):
                if name.endswith(("wq.weight", "wk.weight")):
                    full = permute_for_hf(full, full.shape[0] // args.head_dim)
                tensors[to_hf_name(name)] = full
            if writer:
                write_safetensors(temporary / file_name, tensors, metadata={"format": "pt"})
                weight_map.update({hf_name: file_name for hf_name in tensors})
        if writer:
            config = dict(architectures=["LlamaForCausalLM"], model_type="llama", hidden_size=args.dim,
                          intermediate_size=args.ffn_hidden_dim, num_attention_heads=args.n_heads,
                          num_key_value_heads=args.n_kv_heads, num_hidden_layers=args.n_layers,
                          rms_norm_eps=args.norm_eps, rope_theta=args.rope_theta, vocab_size=args.vocab_size,
                          max_position_embeddings=args.max_seq_len, tie_word_embeddings=args.tie_embeddings,
                          hidden_act="silu", rope_scaling=None, attention_bias=False, bos_token_id=1,
                          eos_token_id=2, torch_dtype=str(dtype).removeprefix("torch."))
            _write_file(temporary / "config.json", lambda f: f.write(json.dumps(config, indent=2).encode()))
            if len(files) > 1:
                index = dict(metadata=dict(total_size=total_size), weight_map=weight_map)
                _write_file(temporary / "model.safetensors.index.json",
                            lambda f: f.write(json.dumps(index, indent=2).encode()))
            _copy_tokenizer(tokenizer_path, temporary, args.vocab_size)


def save_meta(model, folder, grid: Optional[Grid] = None, shards: int = 1, tokenizer_path=None):
    """Write a Meta folder: params.json, consolidated.00.pth .. (shards - 1) split Meta's way, tokenizer.model.
    Each shard is gathered anew (communication, not memory: rank 0 holds one shard at a time)."""
    grid, args = grid or Grid(), model.args
    params = _model_params(model)
    for count, what in ((args.n_heads, "n_heads"), (args.n_kv_heads, "n_kv_heads")):
        if count % shards:
            raise ValueError(f"shards={shards} does not divide {what}={count}: each Meta shard holds whole heads")
    for name, param in params.items():
        dim, split = META_SPLIT_DIM.get(name.split(".")[-2]), split_dim_of(name, grid.tp)
        full = param.shape[dim] * (grid.tp if split == dim else 1) if dim is not None else 0
        if full % shards:
            raise ValueError(f"shards={shards} does not divide {name}'s size {full} along dim {dim}")
    writer = grid.rank == 0
    with _atomic_folder(folder, writer) as temporary:
        for k in range(shards):
            shard = {}
            for name, full in _gathered(model, grid, params):
                dim = META_SPLIT_DIM.get(name.split(".")[-2])
                # clone: torch.save of a view would write the whole tensor it views
                shard[name] = full if dim is None else \
                    full.chunk(shards, dim)[k].clone(memory_format=torch.contiguous_format)
            if writer:
                _write_file(temporary / f"consolidated.{k:02d}.pth", lambda f: torch.save(shard, f))
        if writer:
            fields = dict(dim=args.dim, n_layers=args.n_layers, n_heads=args.n_heads, n_kv_heads=args.n_kv_heads,
                          vocab_size=args.vocab_size, multiple_of=args.multiple_of, norm_eps=args.norm_eps,
                          rope_theta=args.rope_theta)
            if args.ffn_dim_multiplier is not None:
                fields["ffn_dim_multiplier"] = args.ffn_dim_multiplier
            if args.tie_embeddings:  # not a Meta field; written only when it matters
                fields["tie_embeddings"] = True
            _write_file(temporary / "params.json", lambda f: f.write(json.dumps(fields, indent=2).encode()))
            _copy_tokenizer(tokenizer_path, temporary, args.vocab_size)


# ----------------------------------------------------------------------------------------------------
# Training state: save, find, resume


def _rng_state() -> dict:
    name, keys, position, has_gauss, gauss = np.random.get_state()
    state = dict(python=random.getstate(), torch=torch.get_rng_state(),
                 numpy=(name, torch.from_numpy(keys.astype(np.int64)), position, has_gauss, gauss))
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state()  # this rank's device
    return state


def _set_rng_state(state: dict):
    random.setstate(state["python"])
    torch.set_rng_state(state["torch"])
    name, keys, position, has_gauss, gauss = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), position, has_gauss, gauss))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def _step_folders(root: Path) -> list:
    """step-NNNNNNNN folders under root, oldest first (committed or not)."""
    return sorted(p for p in root.iterdir() if p.is_dir() and re.fullmatch(r"step-\d{8}", p.name)) \
        if root.is_dir() else []


def save_training_state(root, step: int, model, grid: Optional[Grid], state: dict, keep: int = 3) -> Path:
    """Save root/step-{step:08d}/ and return it; every rank calls it. Keeps the newest `keep` committed
    checkpoints (keep <= 0: all), deleting older ones only once this one is committed."""
    root, grid = Path(root), grid or Grid()
    folder, temporary = root / f"step-{step:08d}", root / f".step-{step:08d}.tmp"
    buffer = io.BytesIO()
    torch.save(state, buffer)
    try:  # refuse now what resume would refuse: state must be plain data (numbers, strings, lists, dicts, tensors)
        torch.load(io.BytesIO(buffer.getvalue()), weights_only=True)
    except Exception as error:
        raise ValueError(f"the training state is not plain data that torch.load(weights_only=True) reads back: "
                         f"{error}. Pass dicts of numbers, strings, lists and tensors (vars(args) for flags)") from None
    if grid.rank == 0:
        if temporary.exists():
            shutil.rmtree(temporary)  # left by a save that crashed
        temporary.mkdir(parents=True)
    _barrier()
    if grid.dp_rank == 0:  # the dp replicas hold the same weights: one copy of each tp shard is enough
        write_safetensors(temporary / f"model-tp{grid.tp_rank:02d}-of-{grid.tp:02d}.safetensors", _model_params(model),
                          metadata=dict(tp=grid.tp, tp_rank=grid.tp_rank))
    _write_file(temporary / f"rng-rank{grid.rank:05d}.pt", lambda f: torch.save(_rng_state(), f))
    _barrier()  # every rank's files are on disk before the commit
    if grid.rank == 0:
        _write_file(temporary / "state.pt", lambda f: f.write(buffer.getvalue()))
        manifest = dict(step=step, tp=grid.tp, dp=grid.dp, world_size=grid.world_size, split_dims=SPLIT_DIM,
                        model_args=dataclasses.asdict(model.args),
                        files={p.name: p.stat().st_size for p in sorted(temporary.iterdir())})
        _write_file(temporary / MANIFEST, lambda f: f.write(json.dumps(manifest, indent=2).encode()))
        _fsync_folder(temporary)
        old = root / f".step-{step:08d}.old"
        shutil.rmtree(old, ignore_errors=True)
        if folder.exists():  # the same step saved again: move the old one aside, never delete before the commit
            os.replace(folder, old)
        os.replace(temporary, folder)  # the commit
        _fsync_folder(root)
        shutil.rmtree(old, ignore_errors=True)
        committed = [p for p in _step_folders(root) if (p / MANIFEST).is_file() and p.name <= folder.name]
        for stale in committed[:-keep] if keep > 0 else []:
            shutil.rmtree(stale)
    _barrier()
    return folder


def _incomplete(folder: Path) -> Optional[str]:
    """Why a step folder cannot be resumed from, or None when it is complete."""
    if not (folder / MANIFEST).is_file():
        return f"no {MANIFEST}: the save did not finish"
    try:
        manifest = _read_json(folder / MANIFEST)
        for name, size in manifest["files"].items():
            if not (folder / name).is_file():
                return f"{name} is missing"
            if (folder / name).stat().st_size != size:
                return f"{name} has {(folder / name).stat().st_size} bytes, the manifest says {size}"
            if name.endswith(".safetensors"):
                _read_header(folder / name)
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as error:
        return f"corrupt: {error}"
    return None


def find_latest_checkpoint(root) -> Optional[Path]:
    """The newest complete step folder under root, or None; incomplete or corrupt ones are skipped, with a message."""
    for folder in reversed(_step_folders(Path(root))):
        problem = _incomplete(folder)
        if problem is None:
            return folder
        print(f"skipping checkpoint {folder}: {problem}")
    return None


def load_training_state(folder, model, grid: Optional[Grid] = None) -> dict:
    """Fill the model from a training-state folder at this run's tp, restore this rank's RNG state (when the world
    layout is the one it was saved with), and return the state dict given to save_training_state."""
    folder, grid = Path(folder), grid or Grid()
    problem = _incomplete(folder)
    if problem:
        raise ValueError(f"{folder} cannot be resumed from: {problem}")
    load_checkpoint(folder, model, grid)
    manifest = _read_json(folder / MANIFEST)
    if (manifest["world_size"], manifest["tp"]) == (grid.world_size, grid.tp):
        _set_rng_state(torch.load(folder / f"rng-rank{grid.rank:05d}.pt", weights_only=True))
    elif grid.is_main:
        print(f"{folder} was saved by {manifest['world_size']} processes at tp={manifest['tp']}, this run has "
              f"{grid.world_size} at tp={grid.tp}: weights resharded, random number generators not restored")
    return torch.load(folder / "state.pt", weights_only=True)


# ----------------------------------------------------------------------------------------------------
# Command line


def main(argv=None):
    parser = argparse.ArgumentParser(description="Convert LLaMA checkpoints between Meta and Hugging Face folders "
                                     "(a training-state step folder is also accepted as the source).")
    commands = parser.add_subparsers(dest="command", required=True)
    convert = commands.add_parser("convert", help="convert SRC into a new folder DST")
    convert.add_argument("src")
    convert.add_argument("dst")
    convert.add_argument("--to", choices=["hf", "meta"], required=True)
    convert.add_argument("--shards", type=int, default=1, help="number of consolidated.NN.pth files (--to meta)")
    convert.add_argument("--max-shard-bytes", type=int, default=5 * 2**30, help="largest safetensors file (--to hf)")
    convert.add_argument("--tokenizer", default=None, help="tokenizer.model (default: SRC's, when it has one)")
    options = parser.parse_args(argv)
    src = Path(options.src)
    tokenizer = options.tokenizer or (src / "tokenizer.model" if (src / "tokenizer.model").is_file() else None)
    if tokenizer is None:
        print(f"{src} has no tokenizer.model: {options.dst} will have none either")
    args = checkpoint_args(src, tokenizer)
    if tokenizer is not None:
        load_tokenizer(tokenizer, args.vocab_size)  # refuse a wrong tokenizer before converting anything
    # Built on the meta device and materialized empty (no init), in the checkpoint's own dtype, so that the
    # conversion copies every tensor bit for bit.
    entries, _ = _open_entries(src, detect_format(src), args)
    dtype = (entries.get("tok_embeddings.weight") or next(iter(entries.values())))[0][0].dtype
    with torch.device("meta"):
        model = Transformer(args).to(dtype)
    model.to_empty(device="cpu")
    if args.tie_embeddings:
        model.output.weight = model.tok_embeddings.weight  # to_empty made new Parameters, which unties them
    load_checkpoint(src, model)
    if options.to == "hf":
        save_hf(model, options.dst, tokenizer_path=tokenizer, max_shard_bytes=options.max_shard_bytes)
    else:
        save_meta(model, options.dst, shards=options.shards, tokenizer_path=tokenizer)
    print(f"wrote {options.dst} ({options.to}) from {src} ({detect_format(src)})")


if __name__ == "__main__":
    main()
