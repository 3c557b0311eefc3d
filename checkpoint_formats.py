"""Checkpoint formats: what a Meta, Hugging Face or training-state folder holds, and how its names, q/k rows and
config map onto model.py's. Which format a folder is (`detect_format`), its config as ModelArgs (`checkpoint_args`),
its tokenizer (`load_tokenizer`), the name mapping (`to_hf_name`, `from_hf_name`) and the rotary permutation
(`permute_for_hf`, `unpermute_from_hf`). Only JSON files and the tokenizer are read here: checkpoint.py loads and
writes the weights with these, training_state.py writes the training state.

- Meta (params.json, consolidated.NN.pth, tokenizer.model): wq/wk/wv/w1/w3/output split along dim 0, wo/w2 along
  dim 1, norms repeated in every shard (META_SPLIT_DIM). tok_embeddings is split along the embedding dim in
  LLaMA-1/2 files (fairscale's ParallelEmbedding) and along the vocabulary in Llama 3's; ours splits the
  vocabulary. The loader (checkpoint.py) tells the two apart by shape. rope.freqs (a buffer in LLaMA-1/2 files) is
  ignored knowingly.
- Hugging Face (config.json, model.safetensors[.index.json] or pytorch_model*.bin[.index.json]): names are mapped
  to Meta's, and q/k rows are un-permuted, because HF's rotary embedding rotates (i, i + head_dim/2) pairs where
  Meta's rotates (2i, 2i+1). HF stores the FFN width (intermediate_size) and Meta derives it from multiple_of, so we
  choose a multiple_of that derives it. rotary_emb.inv_freq is ignored knowingly.
- Training state (a folder holding manifest.json, MANIFEST): its config is the manifest's model_args.
  training_state.py writes it and describes what it holds.
- GGUF (one .gguf file, gguf.py): config, tensors and tokenizer in one file; q/k are in Meta's layout already.
- Tokenizers: SentencePiece (tokenizer.model, data.py) or byte-level BPE (tokenizer.json, or a GGUF file's own:
  bpe.py).

Left out: RoPE scalings other than llama3, and biases (refused with a message); Llama 3's tiktoken file (its
tokenizer.json is read instead).
"""
import dataclasses
import json
import re
from pathlib import Path
from typing import Optional

import gguf
from bpe import ByteLevelBPE
from data import Tokenizer
from model import ModelArgs
from shard import SPLIT_DIM

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


def read_json(path):
    try:
        return json.loads(Path(path).read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ValueError(f"{path}: cannot read it as JSON ({error})") from None


def detect_format(folder) -> str:
    """"meta", "hf", "state" (our training state) or "gguf" (a .gguf file), from the files present."""
    folder = Path(folder)
    if folder.is_file() and folder.suffix == ".gguf":
        return "gguf"
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


def hf_multiple_of(dim: int, width: int) -> int:
    """A multiple_of from which Meta's rule derives the FFN width HF's config states (256 for LLaMA-1/2, a smaller
    power of two for small models, else the width itself: 8/3 dim rounded up to a multiple of the width is the width
    whenever the width is at least 8/3 dim, as Llama 3's 14336 is for dim 4096). 0: no multiple_of derives it."""
    hidden = int(2 * 4 * dim / 3)
    return next((m for m in (256, 128, 64, 32, 16, 8, 4, 2, 1, width) if m * -(-hidden // m) == width), 0)


def _rope_fields(config: dict, path) -> dict:
    """rope_theta and the RoPE scaling of an HF config, in transformers 4's layout (top-level `rope_theta` and
    `rope_scaling`) or 5's (`rope_parameters`, which holds both). Only Llama 3's scaling is implemented."""
    parameters = config.get("rope_parameters")
    if parameters is not None:
        if not isinstance(parameters, dict):
            raise ValueError(f"{path}: rope_parameters={parameters!r} should be an object (transformers 5's layout)")
        theta, scaling = parameters.get("rope_theta", config.get("rope_theta", 10000.0)), parameters
    else:
        theta, scaling = config.get("rope_theta", 10000.0), config.get("rope_scaling")
    fields = dict(rope_theta=float(theta))
    kind = None if scaling is None else scaling.get("rope_type", scaling.get("type", "default"))
    if kind in (None, "default"):
        return fields
    if kind != "llama3":
        raise ValueError(f"{path}: RoPE scaling of type {kind!r} ({scaling}) is not implemented in model.py, which "
                         f"knows Llama 3's ('llama3') only: a model built without it would compute wrong positions")
    try:
        return dict(fields, use_scaled_rope=True, rope_scaling_factor=float(scaling["factor"]),
                    rope_low_freq_factor=float(scaling["low_freq_factor"]),
                    rope_high_freq_factor=float(scaling["high_freq_factor"]),
                    rope_original_max_seq_len=int(scaling["original_max_position_embeddings"]))
    except KeyError as error:
        raise ValueError(f"{path}: the llama3 RoPE scaling {scaling} lacks the field {error}") from None


def hf_rope_scaling(args: ModelArgs) -> Optional[dict]:
    """The `rope_scaling` of an HF config (transformers 4's layout, which 5 reads too) for these args."""
    if not args.use_scaled_rope:
        return None
    return dict(rope_type="llama3", factor=args.rope_scaling_factor, low_freq_factor=args.rope_low_freq_factor,
                high_freq_factor=args.rope_high_freq_factor,
                original_max_position_embeddings=args.rope_original_max_seq_len)


def _args_from_hf_config(config: dict, path) -> ModelArgs:
    refused = {key: config[key] for key, fine in (("attention_bias", False), ("mlp_bias", False),
                                                  ("hidden_act", "silu")) if config.get(key, fine) != fine}
    if refused:
        raise ValueError(f"{path}: {refused} is not supported by model.py (no biases, SwiGLU only)")
    window, positions = config.get("sliding_window"), config.get("max_position_embeddings", 2048)
    if window is not None and config.get("use_sliding_window", True) and window < positions:
        raise ValueError(f"{path}: sliding_window={window} limits attention to the last {window} tokens, which "
                         f"model.py does not do (it attends to all {positions}); this model would load and compute "
                         f"wrong attention beyond {window} tokens")
    try:
        dim, n_heads, width = config["hidden_size"], config["num_attention_heads"], config["intermediate_size"]
        fields = dict(dim=dim, n_layers=config["num_hidden_layers"], n_heads=n_heads, vocab_size=config["vocab_size"],
                      n_kv_heads=config.get("num_key_value_heads", n_heads), norm_eps=config["rms_norm_eps"],
                      **_rope_fields(config, path),
                      max_seq_len=config.get("max_position_embeddings", 2048),
                      tie_embeddings=config.get("tie_word_embeddings", False))
    except KeyError as error:
        raise ValueError(f"{path}: the field {error} is missing") from None
    if config.get("head_dim", dim // n_heads) != dim // n_heads:
        raise ValueError(f"{path}: head_dim={config['head_dim']} differs from hidden_size / num_attention_heads = "
                         f"{dim // n_heads}; model.py derives head_dim from them")
    multiple_of = hf_multiple_of(dim, width)
    if not multiple_of:
        raise ValueError(f"{path}: intermediate_size={width}, but ModelArgs derives at least {int(8 * dim / 3)} from "
                         f"hidden_size={dim} (Meta's rule: 8/3 dim rounded up to multiple_of); model.py cannot "
                         f"build this FFN width")
    return ModelArgs(multiple_of=multiple_of, **fields)


def read_args(folder, layout: str) -> ModelArgs:
    """The config of a checkpoint folder; vocab_size may be -1 (Meta: take it from the tokenizer)."""
    if layout == "hf":
        return _args_from_hf_config(read_json(folder / "config.json"), folder / "config.json")
    if layout == "state":
        return ModelArgs(**read_json(folder / MANIFEST)["model_args"])
    if layout == "gguf":
        metadata, _ = gguf.read_gguf(folder, tensors=False)
        fields, width = gguf.model_fields(metadata, folder)
        multiple_of = hf_multiple_of(fields["dim"], width)
        if not multiple_of:
            raise ValueError(f"{folder}: llama.feed_forward_length={width} cannot be derived from dim={fields['dim']} "
                             f"by Meta's rule (8/3 dim rounded up to multiple_of)")
        return ModelArgs(multiple_of=multiple_of, tie_embeddings=not gguf.holds_tensor(folder, "output.weight"),
                         **fields)
    params = read_json(folder / "params.json")  # Llama 3.1's use_scaled_rope and 3.2's rope_scaling_factor included
    unknown = sorted(params.keys() - {field.name for field in dataclasses.fields(ModelArgs)})
    if unknown:
        raise ValueError(f"{folder / 'params.json'}: unknown fields {unknown}; ModelArgs has Meta's params.json fields")
    return ModelArgs(**params)


def checkpoint_args(folder, tokenizer_path=None, **overrides) -> ModelArgs:
    """ModelArgs of a checkpoint folder; Meta's vocab_size -1 is taken from the tokenizer (tokenizer_path, else
    the folder's tokenizer.model). Overrides (e.g. max_seq_len, which params.json lacks) are applied last."""
    folder = Path(folder)
    args = read_args(folder, detect_format(folder))
    if args.vocab_size == -1:
        args.vocab_size = load_tokenizer(tokenizer_path or folder).vocab_size
    return dataclasses.replace(args, **overrides)


def load_tokenizer(path, vocab_size: Optional[int] = None):
    """The tokenizer at `path`: a SentencePiece tokenizer.model, a byte-level BPE tokenizer.json, a folder holding
    one of them, or a .gguf file (its own tokenizer). Refused when it has more tokens than the model's vocabulary
    (its largest ids would index past the embedding)."""
    path = Path(path)
    if path.is_dir():
        path = path / "tokenizer.model" if (path / "tokenizer.model").is_file() or \
            not (path / "tokenizer.json").is_file() else path / "tokenizer.json"
    if not path.is_file():
        raise FileNotFoundError(f"no tokenizer at {path}: pass the path of the checkpoint's tokenizer.model or "
                                f"tokenizer.json")
    if path.suffix == ".gguf":
        tokenizer = ByteLevelBPE.from_gguf(gguf.read_gguf(path, tensors=False)[0], path)
    elif path.suffix == ".json":
        tokenizer = ByteLevelBPE.from_tokenizer_json(path)
    else:
        tokenizer = Tokenizer(path)  # a git-lfs pointer or another format (Llama 3's tiktoken, ...) is refused here
    if vocab_size is not None and tokenizer.vocab_size > vocab_size:
        raise ValueError(f"the tokenizer {path} has {tokenizer.vocab_size} tokens, more than the model's vocabulary of "
                         f"{vocab_size}: use the tokenizer that belongs to this checkpoint")
    return tokenizer
