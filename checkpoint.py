"""Checkpoints: Meta, Hugging Face and training-state folders loaded into a model at any tensor-parallel size,
Meta and Hugging Face folders written from one, and a converter between them. What each format holds (names,
the q/k permutation, config, tokenizer) is in checkpoint_formats.py; saving and resuming the training state is in
training_state.py.

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
- Export (`save_hf`, `save_meta`) gathers the tp shards one parameter at a time; rank 0 alone writes, one file at
  a time, into a temporary folder next to the destination that is renamed at the end.
- CLI: `python checkpoint.py convert SRC DST --to hf|meta [--shards N]`; SRC may also be a training state or a
  .gguf file (gguf.py).

Left out: padding a checkpoint's vocabulary when tp does not divide it; a checkpoint folder that not every rank can
see; checkpoints whose tensors have different dtypes (the model holds one dtype). What the formats leave out (RoPE
frequency scaling, biases, Llama 3's tokenizer) is listed in checkpoint_formats.py, what the training state leaves
out in training_state.py, and what the safetensors reader and writer leave out (big-endian hosts among it) in
safetensors_io.py.
"""
import argparse
import contextlib
import json
import os
import shutil
from pathlib import Path
from typing import Optional

import torch
import torch.distributed as dist

import cli
import gguf
from bpe import ByteLevelBPE
from checkpoint_formats import (IGNORED, MANIFEST, META_SPLIT_DIM, checkpoint_args, detect_format, from_hf_name,
                                hf_rope_scaling, load_tokenizer, permute_for_hf, read_args, read_json, to_hf_name,
                                unpermute_from_hf)
from model import SCALED_ROPE_FIELDS, ModelArgs, Transformer
from safetensors_io import fsync_folder, read_safetensors, write_file, write_safetensors
from shard import Grid, gather_full, split_dim_of


# ----------------------------------------------------------------------------------------------------
# Reading: weights into a model, at any tp


def _torch_load(path):
    """A .pth/.bin state dict, memory-mapped, with pickle restricted to tensors and plain containers."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as error:  # truncated zip, refused pickle, pre-1.6 format (no mmap): name the file
        raise ValueError(f"{path}: torch.load(weights_only=True, mmap=True) failed: {error}") from None


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
            where, weight_map = folder / index_name, read_json(folder / index_name).get("weight_map", {})
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
    manifest = read_json(folder / MANIFEST)
    tp, split_dims = manifest["tp"], manifest["split_dims"]  # the layout it was saved with, not today's table
    opened = [read_safetensors(folder / f"model-tp{r:02d}-of-{tp:02d}.safetensors") for r in range(tp)]
    return {name: ([part[name] for part in opened], split_dims.get(name.split(".")[-2]) if tp > 1 else None)
            for name in opened[0]}


def _gguf_entries(path) -> dict:
    _, tensors = gguf.read_gguf(path)
    return {gguf.our_name(name) or name: ([tensor], None) for name, tensor in tensors.items()
            if name != "rope_freqs.weight"}  # (Llama 3's scaled frequencies: model.py computes them)


def _open_entries(folder, layout: str, args: ModelArgs):
    """{our name: (pieces, dim)}: the full tensor is the pieces concatenated along dim (None: pieces[0] is it)."""
    if layout == "gguf":
        entries, where = _gguf_entries(folder), folder
    elif layout == "meta":
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


def model_params(model) -> dict:
    """The parameters a checkpoint holds. With tied embeddings output.weight is tok_embeddings.weight, and is left
    out even when the model object holds two tensors (a model materialized with to_empty loses the tie)."""
    params = dict(model.named_parameters())
    if model.args.tie_embeddings:
        params.pop("output.weight", None)
    return params


def load_pretrained(folder, tokenizer_path=None):
    """The model and tokenizer of a Meta, Hugging Face or training-state folder, or of a GGUF file, in one
    process (the command lines of generate.py and evaluate.py); a training state has no tokenizer, so it needs
    tokenizer_path."""
    folder = Path(folder)
    if not folder.is_dir() and not (folder.is_file() and folder.suffix == ".gguf"):
        raise FileNotFoundError(f"checkpoint {folder} does not exist: pass --ckpt a Meta, Hugging Face or "
                                f"training-state folder, or a .gguf file")
    if detect_format(folder) == "state" and tokenizer_path is None:
        raise ValueError(f"{folder} is a training state, which holds no tokenizer: pass --tokenizer PATH (the "
                         f"tokenizer.model that the run used)")
    args = checkpoint_args(folder, tokenizer_path)
    tokenizer = load_tokenizer(tokenizer_path or folder, args.vocab_size)
    model = Transformer(args)
    load_checkpoint(folder, model)
    return model, tokenizer


@torch.no_grad()
def load_checkpoint(folder, model, grid: Optional[Grid] = None):
    """Fill the model's parameters (this rank's shards) from a Meta, Hugging Face or training-state folder, strictly."""
    grid, folder = grid or Grid(), Path(folder)
    layout, args = detect_format(folder), model.args
    saved = read_args(folder, layout)
    differ = [f"{field}: model {getattr(args, field)}, checkpoint {getattr(saved, field)}" for field in
              ("dim", "n_layers", "n_heads", "n_kv_heads", "norm_eps", "rope_theta", "tie_embeddings",
               "use_scaled_rope") + (SCALED_ROPE_FIELDS if args.use_scaled_rope else ())
              if getattr(args, field) != getattr(saved, field)]  # head counts and eps do not show in the shapes
    if differ:
        raise ValueError(f"{folder}: the model's config differs from the checkpoint's: {'; '.join(differ)}. Build the "
                         f"model from checkpoint_args({str(folder)!r})")
    entries, where = _open_entries(folder, layout, args)
    params = model_params(model)
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


def barrier():
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
            fsync_folder(folder.parent)
    finally:
        if writer and temporary.exists():
            shutil.rmtree(temporary)
    barrier()  # nobody reads the folder before it exists


def _gathered(model, grid: Grid, names):
    """(name, full tensor on the host) for rank 0, one parameter at a time. The other ranks of its tp group take part
    in each gather (a collective) and get nothing; the other dp replicas hold the same values and skip it."""
    params = model_params(model)
    for name in names:
        if grid.dp_rank == 0:
            full = gather_full(params[name], grid)
            if grid.rank == 0:
                yield name, full.cpu()


def _copy_tokenizer(tokenizer_path, folder, vocab_size):
    """The tokenizer into the export: tokenizer.model (SentencePiece), or tokenizer.json and tokenizer_config.json
    (byte-level BPE, written anew, also for the tokenizer of a GGUF file)."""
    if tokenizer_path is None:
        return
    tokenizer = load_tokenizer(tokenizer_path, vocab_size)
    if isinstance(tokenizer, ByteLevelBPE):
        for name, content in tokenizer.hugging_face_files().items():
            write_file(folder / name, lambda f, content=content: f.write(json.dumps(content, ensure_ascii=False,
                                                                                     indent=1).encode("utf-8")))
        return
    shutil.copyfile(tokenizer.path, folder / "tokenizer.model")


def save_hf(model, folder, grid: Optional[Grid] = None, tokenizer_path=None, max_shard_bytes: int = 5 * 2**30):
    """Write a Hugging Face folder: config.json, model.safetensors (or shards of at most max_shard_bytes plus
    model.safetensors.index.json), tokenizer.model. Every rank calls it; rank 0 writes."""
    grid, args = grid or Grid(), model.args
    params = model_params(model)
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
                          hidden_act="silu", rope_scaling=hf_rope_scaling(args), attention_bias=False, bos_token_id=1,
                          eos_token_id=2, torch_dtype=str(dtype).removeprefix("torch."))
            write_file(temporary / "config.json", lambda f: f.write(json.dumps(config, indent=2).encode()))
            if len(files) > 1:
                index = dict(metadata=dict(total_size=total_size), weight_map=weight_map)
                write_file(temporary / "model.safetensors.index.json",
                            lambda f: f.write(json.dumps(index, indent=2).encode()))
            _copy_tokenizer(tokenizer_path, temporary, args.vocab_size)


def save_meta(model, folder, grid: Optional[Grid] = None, shards: int = 1, tokenizer_path=None):
    """Write a Meta folder: params.json, consolidated.00.pth .. (shards - 1) split Meta's way, tokenizer.model.
    Each shard is gathered anew (communication, not memory: rank 0 holds one shard at a time)."""
    grid, args = grid or Grid(), model.args
    params = model_params(model)
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
                write_file(temporary / f"consolidated.{k:02d}.pth", lambda f: torch.save(shard, f))
        if writer:
            fields = dict(dim=args.dim, n_layers=args.n_layers, n_heads=args.n_heads, n_kv_heads=args.n_kv_heads,
                          vocab_size=args.vocab_size, multiple_of=args.multiple_of, norm_eps=args.norm_eps,
                          rope_theta=args.rope_theta)
            if args.ffn_dim_multiplier is not None:
                fields["ffn_dim_multiplier"] = args.ffn_dim_multiplier
            if args.use_scaled_rope:  # Meta's fields, and ours for the two numbers Meta's code fixes (1 and 8192)
                fields.update(use_scaled_rope=True, rope_scaling_factor=args.rope_scaling_factor,
                              rope_high_freq_factor=args.rope_high_freq_factor,
                              rope_low_freq_factor=args.rope_low_freq_factor,
                              rope_original_max_seq_len=args.rope_original_max_seq_len)
            if args.tie_embeddings:  # not a Meta field; written only when it matters
                fields["tie_embeddings"] = True
            write_file(temporary / "params.json", lambda f: f.write(json.dumps(fields, indent=2).encode()))
            _copy_tokenizer(tokenizer_path, temporary, args.vocab_size)


# ----------------------------------------------------------------------------------------------------
# Command line


def main(argv=None):
    parser = argparse.ArgumentParser(description="Convert LLaMA checkpoints between Meta and Hugging Face folders "
                                     "(a training-state step folder or a .gguf file is also accepted as the source).")
    commands = parser.add_subparsers(dest="command", required=True)
    convert = commands.add_parser("convert", help="convert SRC into a new folder DST")
    convert.add_argument("src")
    convert.add_argument("dst")
    convert.add_argument("--to", choices=["hf", "meta"], required=True)
    convert.add_argument("--shards", type=int, default=1, help="number of consolidated.NN.pth files (--to meta)")
    convert.add_argument("--max-shard-bytes", type=int, default=5 * 2**30, help="largest safetensors file (--to hf)")
    convert.add_argument("--tokenizer", default=None, help="tokenizer.model or tokenizer.json (default: SRC's, when it "
                         "has one)")
    options = parser.parse_args(argv)
    src = Path(options.src)
    tokenizer = options.tokenizer or next((path for path in (src / "tokenizer.model", src / "tokenizer.json")
                                           if path.is_file()), src if src.suffix == ".gguf" else None)
    if tokenizer is None:
        print(f"{src} has no tokenizer.model or tokenizer.json: {options.dst} will have none either")
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
    cli.run(main, "checkpoint.py")
