"""Checkpoints: every Meta and Hugging Face layout against files these tests write with their own code (their own
name map, Meta split table and HF's q/k permutation), resharding to any tp, exports that load back bit for bit, and
training-state save/resume that survives interrupted saves. The safetensors format itself: test_safetensors_io.py."""
import dataclasses
import json
import math
import os
import random
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

import checkpoint
import checkpoint_formats
import model
import shard
import training_state
from conftest import VOCAB, tiny_model
from data import train_tokenizer
from distributed import run_ranks
from model import Transformer, apply_rotary, init_weights, model_args, rotary_cos_sin

CORPUS = Path(__file__).resolve().parent.parent / "data" / "botchan.txt"
TOKENS = torch.randint(0, VOCAB, (2, 12), generator=torch.Generator().manual_seed(3))


def logits_of(model):
    with torch.no_grad():
        return model(TOKENS)


def fresh_model(folder):
    """A model built from the checkpoint's config with other (seed 0) weights, to be overwritten by the load."""
    return init_weights(Transformer(checkpoint_formats.checkpoint_args(folder)), seed=0)


def loaded(folder):
    model = fresh_model(folder)
    checkpoint.load_checkpoint(folder, model)
    return model


def run_args():
    # 8 query heads sharing 4 kv heads: splits evenly at tp = 1, 2 and 4
    return model_args("tiny", vocab_size=VOCAB, n_layers=2, max_seq_len=64, n_heads=8, n_kv_heads=4)


@pytest.fixture(scope="module")
def tokenizer_path(tmp_path_factory):
    # A 320-piece vocabulary must hold 259 special and byte pieces plus every character: keep 29 of them.
    text = "".join(c for c in CORPUS.read_text().lower() if c in "abcdefghijklmnopqrstuvwxyz .,\n")
    return train_tokenizer(text, VOCAB, tmp_path_factory.mktemp("tokenizer") / "tokenizer.model")


@pytest.fixture(scope="module")
def reference():
    return tiny_model(seed=1)


# ----------------------------------------------------------------------------------------------------
# Test-side writers, independent of checkpoint_formats.py: Meta's split table, HF's names and HF's permutation


META_SPLIT = {"wq": 0, "wk": 0, "wv": 0, "w1": 0, "w3": 0, "output": 0, "wo": 1, "w2": 1, "tok_embeddings": 1}


def hf_permute(w, n_heads):
    """transformers' convert_llama_weights_to_hf.py permute(): Meta rows -> HF rows."""
    dim1, dim2 = w.shape
    return w.view(n_heads, dim1 // n_heads // 2, 2, dim2).transpose(1, 2).reshape(dim1, dim2)


def hf_names(n_layers):
    names = {"tok_embeddings.weight": "model.embed_tokens.weight", "norm.weight": "model.norm.weight",
             "output.weight": "lm_head.weight"}
    for i in range(n_layers):
        for ours, theirs in [("attention.wq", "self_attn.q_proj"), ("attention.wk", "self_attn.k_proj"),
                             ("attention.wv", "self_attn.v_proj"), ("attention.wo", "self_attn.o_proj"),
                             ("feed_forward.w1", "mlp.gate_proj"), ("feed_forward.w2", "mlp.down_proj"),
                             ("feed_forward.w3", "mlp.up_proj"), ("attention_norm", "input_layernorm"),
                             ("ffn_norm", "post_attention_layernorm")]:
            names[f"layers.{i}.{ours}.weight"] = f"model.layers.{i}.{theirs}.weight"
    return names


def write_meta(folder, model, shards, dtype=torch.float32, tokenizer=None, params=None, edit=None):
    """Meta's layout: every shard holds every key, split along META_SPLIT, norms and rope.freqs repeated."""
    args, folder = model.args, Path(folder)
    folder.mkdir(parents=True)
    state = {name: t.detach().to(dtype) for name, t in model.state_dict().items()}
    state["rope.freqs"] = torch.ones(args.head_dim // 2)
    if edit:
        edit(state)
    for k in range(shards):
        part = {name: t.chunk(shards, META_SPLIT[name.split(".")[-2]])[k].clone()
                if name.split(".")[-2] in META_SPLIT else t.clone() for name, t in state.items()}
        torch.save(part, folder / f"consolidated.{k:02d}.pth")
    fields = dict(dim=args.dim, n_layers=args.n_layers, n_heads=args.n_heads, n_kv_heads=args.n_kv_heads,
                  vocab_size=-1 if tokenizer else args.vocab_size, multiple_of=args.multiple_of,
                  norm_eps=args.norm_eps)
    fields.update(params or {})
    (folder / "params.json").write_text(json.dumps(fields))
    if tokenizer:
        shutil.copyfile(tokenizer, folder / "tokenizer.model")
    return folder


def hf_state_dict(model, permute=True):
    args, names = model.args, hf_names(model.args.n_layers)
    state = {}
    for name, t in model.state_dict().items():
        t = t.detach().clone()
        if permute and name.endswith(("wq.weight", "wk.weight")):
            t = hf_permute(t, args.n_heads if "wq" in name else args.n_kv_heads)
        state[names[name]] = t
    return state


def hf_config(args, **changes):
    return {"architectures": ["LlamaForCausalLM"], "hidden_size": args.dim, "intermediate_size": args.ffn_hidden_dim,
            "num_attention_heads": args.n_heads, "num_key_value_heads": args.n_kv_heads,
            "num_hidden_layers": args.n_layers, "rms_norm_eps": args.norm_eps, "rope_theta": args.rope_theta,
            "vocab_size": args.vocab_size, "max_position_embeddings": args.max_seq_len, "tie_word_embeddings": False,
            "hidden_act": "silu", **changes}


def write_hf(folder, model, layout, permute=True, config=None):
    folder = Path(folder)
    folder.mkdir(parents=True)
    state = hf_state_dict(model, permute)
    (folder / "config.json").write_text(json.dumps(hf_config(model.args, **(config or {}))))
    names = sorted(state)
    halves = {1: names[:len(names) // 2], 2: names[len(names) // 2:]}
    if layout == "safetensors":
        checkpoint.write_safetensors(folder / "model.safetensors", state)
    elif layout == "bin":
        old_buffer = {"model.layers.0.self_attn.rotary_emb.inv_freq": torch.ones(16)}  # in older HF files
        torch.save({**state, **old_buffer}, folder / "pytorch_model.bin")
    else:
        extension, index = (("safetensors", "model.safetensors.index.json") if layout == "sharded-safetensors"
                            else ("bin", "pytorch_model.bin.index.json"))
        stem = "model" if extension == "safetensors" else "pytorch_model"
        weight_map = {}
        for i, part in halves.items():
            file = f"{stem}-{i:05d}-of-00002.{extension}"
            tensors = {name: state[name] for name in part}
            (checkpoint.write_safetensors if extension == "safetensors" else
             lambda path, t: torch.save(t, path))(folder / file, tensors)
            weight_map.update({name: file for name in part})
        (folder / index).write_text(json.dumps({"metadata": {"total_size": 0}, "weight_map": weight_map}))
    return folder


# ----------------------------------------------------------------------------------------------------
# Names and the rotary permutation


def test_name_map_matches_hugging_face_names_both_ways(reference):
    for ours, theirs in hf_names(2).items():
        assert checkpoint_formats.to_hf_name(ours) == theirs and checkpoint_formats.from_hf_name(theirs) == ours
    assert checkpoint_formats.from_hf_name("model.layers.0.self_attn.rotary_emb.inv_freq") is None
    assert set(hf_names(2)) == set(reference.state_dict())


def test_permutation_is_hf_converters_and_round_trips():
    w = torch.randn(4 * 32, 128, generator=torch.Generator().manual_seed(0))
    assert torch.equal(checkpoint_formats.permute_for_hf(w, 4), hf_permute(w, 4))
    assert torch.equal(checkpoint_formats.unpermute_from_hf(checkpoint_formats.permute_for_hf(w, 4), 4), w)
    assert not torch.equal(checkpoint_formats.permute_for_hf(w, 4), w)


def hf_rotary(x, theta=10000.0):
    """HF's RoPE (rotate_half over (i, i + head_dim/2) pairs), for x of shape (seq, heads, head_dim)."""
    seq, _, head_dim = x.shape
    cos, sin = rotary_cos_sin(head_dim, seq, theta)
    cos, sin = torch.cat([cos, cos], -1)[:, None, :], torch.cat([sin, sin], -1)[:, None, :]
    rotated_half = torch.cat([-x[..., head_dim // 2:], x[..., :head_dim // 2]], -1)
    return x * cos + rotated_half * sin


def test_hf_rotary_on_permuted_rows_gives_metas_attention_scores():
    seq, heads, head_dim, dim = 7, 4, 32, 128
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(seq, dim, generator=generator)
    wq, wk = (torch.randn(heads * head_dim, dim, generator=generator) * 0.1 for _ in range(2))
    cos, sin = rotary_cos_sin(head_dim, seq, 10000.0)

    def scores(q, k):
        return torch.einsum("qhd,khd->hqk", q, k)

    meta = scores(apply_rotary((x @ wq.T).view(1, seq, heads, head_dim), cos, sin)[0],
                  apply_rotary((x @ wk.T).view(1, seq, heads, head_dim), cos, sin)[0])
    hf_q = x @ checkpoint_formats.permute_for_hf(wq, heads).T
    hf_k = x @ checkpoint_formats.permute_for_hf(wk, heads).T
    hf = scores(hf_rotary(hf_q.view(seq, heads, head_dim)), hf_rotary(hf_k.view(seq, heads, head_dim)))
    torch.testing.assert_close(hf, meta, rtol=1e-4, atol=1e-4)
    unpermuted = scores(hf_rotary((x @ wq.T).view(seq, heads, head_dim)),
                        hf_rotary((x @ wk.T).view(seq, heads, head_dim)))
    assert not torch.allclose(unpermuted, meta, rtol=1e-2, atol=1e-2)


# ----------------------------------------------------------------------------------------------------
# Every layout loads to the same logits


@pytest.mark.parametrize("layout", ["meta-1", "meta-2", "meta-4", "safetensors", "sharded-safetensors", "bin",
                                    "sharded-bin"])
def test_every_layout_loads_to_identical_logits(tmp_path, reference, layout):
    if layout.startswith("meta"):
        folder = write_meta(tmp_path / "ckpt", reference, shards=int(layout[-1]))
    else:
        folder = write_hf(tmp_path / "ckpt", reference, layout)
    assert checkpoint_formats.detect_format(folder) == ("meta" if layout.startswith("meta") else "hf")
    assert not torch.equal(logits_of(fresh_model(folder)), logits_of(reference))
    assert torch.equal(logits_of(loaded(folder)), logits_of(reference))


def test_llama3_meta_shards_split_the_embedding_along_the_vocabulary(tmp_path, reference):
    folder = write_meta(tmp_path / "ckpt", reference, shards=2)
    for k in range(2):  # rewrite tok_embeddings the Llama 3 way: rows (vocabulary) instead of columns
        part = torch.load(folder / f"consolidated.{k:02d}.pth")
        part["tok_embeddings.weight"] = reference.tok_embeddings.weight.detach().chunk(2, 0)[k].clone()
        torch.save(part, folder / f"consolidated.{k:02d}.pth")
    assert torch.equal(logits_of(loaded(folder)), logits_of(reference))


def test_a_missing_qk_permutation_gives_different_logits(tmp_path, reference):
    folder = write_hf(tmp_path / "ckpt", reference, "safetensors", permute=False)
    logits = logits_of(loaded(folder))
    assert not torch.allclose(logits, logits_of(reference), rtol=1e-3, atol=1e-3)


def test_meta_vocab_size_minus_one_comes_from_the_tokenizer(tmp_path, reference, tokenizer_path):
    folder = write_meta(tmp_path / "ckpt", reference, shards=1, tokenizer=tokenizer_path)
    assert json.loads((folder / "params.json").read_text())["vocab_size"] == -1
    assert checkpoint_formats.checkpoint_args(folder).vocab_size == VOCAB
    assert checkpoint_formats.checkpoint_args(folder, max_seq_len=64).max_seq_len == 64


def test_hf_config_maps_to_model_args(tmp_path, reference):
    folder = write_hf(tmp_path / "ckpt", reference, "safetensors")
    args = checkpoint_formats.checkpoint_args(folder)
    assert args.ffn_hidden_dim == reference.args.ffn_hidden_dim == 352
    for field in ("dim", "n_layers", "n_heads", "n_kv_heads", "vocab_size", "norm_eps", "rope_theta", "max_seq_len"):
        assert getattr(args, field) == getattr(reference.args, field), field
    llama3 = {"hidden_size": 4096, "intermediate_size": 14336, "num_attention_heads": 32, "num_hidden_layers": 32,
              "num_key_value_heads": 8, "rms_norm_eps": 1e-5, "vocab_size": 128256}
    assert checkpoint_formats._args_from_hf_config(llama3, "config.json").ffn_hidden_dim == 14336
    llama2 = {**llama3, "intermediate_size": 11008, "num_key_value_heads": 32, "vocab_size": 32000}
    assert checkpoint_formats._args_from_hf_config(llama2, "config.json").multiple_of == 256


# ----------------------------------------------------------------------------------------------------
# Strictness: names, shapes, configs, tokenizers, folders


def test_missing_and_unexpected_names_are_listed(tmp_path, reference):
    def edit(state):
        del state["layers.1.ffn_norm.weight"]
        state["layers.0.attention.bogus.weight"] = torch.zeros(3)
    folder = write_meta(tmp_path / "ckpt", reference, shards=2, edit=edit)
    with pytest.raises(ValueError, match=r"missing: \['layers.1.ffn_norm.weight'\]; unexpected: "
                                         r"\['layers.0.attention.bogus.weight'\]"):
        loaded(folder)


def test_unknown_hf_names_are_listed_as_unexpected(tmp_path, reference):
    folder = write_hf(tmp_path / "ckpt", reference, "safetensors")
    state = checkpoint.read_safetensors(folder / "model.safetensors")
    state = {**{k: v.clone() for k, v in state.items()}, "model.layers.0.self_attn.q_proj.bias": torch.zeros(128)}
    checkpoint.write_safetensors(folder / "model.safetensors", state)
    with pytest.raises(ValueError, match=r"missing: none; unexpected: \['model.layers.0.self_attn.q_proj.bias'\]"):
        loaded(folder)


def test_config_that_disagrees_with_the_weights_is_reported_with_both_shapes(tmp_path, reference):
    folder = write_meta(tmp_path / "meta", reference, shards=2, params=dict(vocab_size=512))
    with pytest.raises(ValueError, match=r"tok_embeddings.weight: weights \[320, 128\], config \[512, 128\] "
                                         r"\(vocab_size=512, dim=128\)"):
        loaded(folder)
    folder = write_hf(tmp_path / "hf", reference, "safetensors", config=dict(intermediate_size=384))
    with pytest.raises(ValueError, match=r"layers.0.feed_forward.w1.weight: weights \[352, 128\], config "
                                         r"\[384, 128\] \(FFN width 384"):
        loaded(folder)


def test_an_intermediate_size_modelargs_cannot_derive_is_reported(tmp_path, reference):
    folder = write_hf(tmp_path / "hf", reference, "safetensors", config=dict(intermediate_size=200))
    with pytest.raises(ValueError, match=r"intermediate_size=200, but ModelArgs derives at least 341 from "
                                         r"hidden_size=128"):
        checkpoint_formats.checkpoint_args(folder)


def test_head_counts_that_do_not_show_in_shapes_are_checked(tmp_path, reference):
    folder = write_meta(tmp_path / "meta", reference, shards=1)
    model = Transformer(model_args("tiny", vocab_size=VOCAB, n_layers=2, n_heads=8, n_kv_heads=2))
    with pytest.raises(ValueError, match=r"n_heads: model 8, checkpoint 4"):
        checkpoint.load_checkpoint(folder, model)


@pytest.mark.parametrize("fmt, change, message", [
    ("meta", dict(max_batch_size=4), r"unknown fields \['max_batch_size'\]"),
    ("hf", dict(rope_scaling={"rope_type": "llama3"}), "the llama3 RoPE scaling .* lacks the field 'factor'"),
    ("hf", dict(rope_scaling={"rope_type": "linear", "factor": 2.0}), "RoPE scaling of type 'linear'"),
    ("hf", dict(rope_scaling={"type": "dynamic", "factor": 2.0}), "RoPE scaling of type 'dynamic'"),
    ("hf", dict(rope_parameters={"rope_theta": 1e6, "rope_type": "yarn", "factor": 4.0}),
     "RoPE scaling of type 'yarn'"),
    ("hf", dict(attention_bias=True), "attention_bias"),
    ("hf", dict(mlp_bias=True), "mlp_bias"),
    ("hf", dict(sliding_window=16), "sliding_window=16 limits attention to the last 16 tokens"),
    ("hf", dict(head_dim=64), "head_dim=64 differs from hidden_size / num_attention_heads"),
])
def test_unsupported_configs_are_refused(tmp_path, reference, fmt, change, message):
    folder = (write_meta(tmp_path / "c", reference, 1, params=change) if fmt == "meta" else
              write_hf(tmp_path / "c", reference, "safetensors", config=change))
    with pytest.raises(ValueError, match=message):
        checkpoint_formats.checkpoint_args(folder)


def test_a_tokenizer_larger_than_the_vocabulary_is_refused(tmp_path):
    big = train_tokenizer(CORPUS.read_text(), 400, tmp_path / "tokenizer.model")
    with pytest.raises(ValueError, match=rf"the tokenizer {big} has 400 tokens, more than the model's vocabulary of "
                                         rf"{VOCAB}"):
        checkpoint_formats.load_tokenizer(tmp_path, VOCAB)
    assert checkpoint_formats.load_tokenizer(big, 400).vocab_size == 400


@pytest.mark.parametrize("content, message", [
    (b"version https://git-lfs.github.com/spec/v1\noid sha256:0123\nsize 499723\n", "is a git-lfs pointer"),
    (b"IQ== 0\nIg== 1\nIw== 2\n", "is not a SentencePiece model"),  # Llama 3's tiktoken format
])
def test_a_file_that_is_not_a_sentencepiece_model_is_refused(tmp_path, reference, content, message):
    folder = write_meta(tmp_path / "ckpt", reference, shards=1)
    (folder / "tokenizer.model").write_bytes(content)
    params = json.loads((folder / "params.json").read_text())
    (folder / "params.json").write_text(json.dumps({**params, "vocab_size": -1}))
    with pytest.raises(ValueError, match=message):
        checkpoint_formats.checkpoint_args(folder)


def test_a_folder_in_neither_format_lists_its_files(tmp_path):
    (tmp_path / "notes.txt").write_text("hi")
    (tmp_path / "weights.npz").write_bytes(b"")
    with pytest.raises(ValueError, match=r"neither a Meta checkpoint .* files found: \['notes.txt', 'weights.npz'\]"):
        checkpoint_formats.detect_format(tmp_path)


def test_a_missing_meta_shard_is_named(tmp_path, reference):
    folder = write_meta(tmp_path / "ckpt", reference, shards=2)
    (folder / "consolidated.01.pth").rename(folder / "consolidated.02.pth")
    with pytest.raises(ValueError, match=r"shards \['consolidated.00.pth', 'consolidated.02.pth'\] are not"):
        loaded(folder)


def test_a_truncated_meta_shard_is_named(tmp_path, reference):
    folder = write_meta(tmp_path / "ckpt", reference, shards=2)
    path = folder / "consolidated.01.pth"
    path.write_bytes(path.read_bytes()[:5000])
    with pytest.raises(ValueError, match=rf"{path}: torch.load\(weights_only=True, mmap=True\) failed"):
        loaded(folder)


# ----------------------------------------------------------------------------------------------------
# Export and conversion


def test_exports_load_back_to_identical_logits_and_meta_shards_match_metas_layout(tmp_path, reference, tokenizer_path):
    checkpoint.save_hf(reference, tmp_path / "hf", tokenizer_path=tokenizer_path, max_shard_bytes=200_000)
    checkpoint.save_meta(reference, tmp_path / "meta", shards=2, tokenizer_path=tokenizer_path)
    index = json.loads((tmp_path / "hf" / "model.safetensors.index.json").read_text())
    files = sorted(set(index["weight_map"].values()))
    assert len(files) > 1 and all((tmp_path / "hf" / f).stat().st_size < 200_000 + 4096 for f in files)
    assert set(index["weight_map"]) == set(hf_state_dict(reference))
    assert (tmp_path / "hf" / "tokenizer.model").read_bytes() == tokenizer_path.read_bytes()
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert config == {**config, **hf_config(reference.args)}
    for folder in ("hf", "meta"):
        assert torch.equal(logits_of(loaded(tmp_path / folder)), logits_of(reference)), folder
    expected = write_meta(tmp_path / "expected", reference, shards=2)
    for k in range(2):
        ours, theirs = (torch.load(f / f"consolidated.{k:02d}.pth") for f in (tmp_path / "meta", expected))
        assert ours.keys() == theirs.keys() - {"rope.freqs"}
        assert all(torch.equal(ours[name], theirs[name]) for name in ours)


def test_meta_to_hf_to_meta_with_the_cli_is_byte_identical_per_tensor(tmp_path, reference, tokenizer_path, capsys):
    source = write_meta(tmp_path / "meta", reference, shards=2, dtype=torch.bfloat16, tokenizer=tokenizer_path)
    checkpoint.main(["convert", str(source), str(tmp_path / "hf"), "--to", "hf"])
    checkpoint.main(["convert", str(tmp_path / "hf"), str(tmp_path / "back"), "--to", "meta", "--shards", "2"])
    assert "wrote" in capsys.readouterr().out
    hf = checkpoint.read_safetensors(tmp_path / "hf" / "model.safetensors")
    expected_hf = hf_state_dict(tiny_model(seed=1, dtype=torch.bfloat16))
    assert hf.keys() == expected_hf.keys()
    assert all(hf[n].dtype == torch.bfloat16 and torch.equal(hf[n], expected_hf[n]) for n in hf)
    for k in range(2):
        before, after = (torch.load(f / f"consolidated.{k:02d}.pth") for f in (source, tmp_path / "back"))
        assert after.keys() == before.keys() - {"rope.freqs"}
        for name, tensor in after.items():
            assert tensor.dtype == before[name].dtype and torch.equal(tensor, before[name]), name
    assert checkpoint_formats.checkpoint_args(tmp_path / "back").vocab_size == VOCAB
    assert (tmp_path / "back" / "tokenizer.model").read_bytes() == tokenizer_path.read_bytes()


def test_export_never_overwrites_and_a_failed_export_leaves_nothing(tmp_path, reference, monkeypatch):
    (tmp_path / "taken").mkdir()
    with pytest.raises(FileExistsError, match="taken already exists"):
        checkpoint.save_hf(reference, tmp_path / "taken")

    def fail(*args, **kwargs):
        raise OSError("disk full")
    monkeypatch.setattr(checkpoint, "write_safetensors", fail)
    with pytest.raises(OSError, match="disk full"):
        checkpoint.save_hf(reference, tmp_path / "hf")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["taken"]


def test_tied_embeddings_export_without_a_head_and_load_back(tmp_path):
    model = tiny_model(seed=2, tie_embeddings=True)
    checkpoint.save_hf(model, tmp_path / "hf")
    assert "lm_head.weight" not in checkpoint.read_safetensors(tmp_path / "hf" / "model.safetensors")
    back = loaded(tmp_path / "hf")
    assert back.output.weight is back.tok_embeddings.weight
    assert torch.equal(logits_of(back), logits_of(model))


# ----------------------------------------------------------------------------------------------------
# Tensor parallelism: loads and exports at tp = 2


def tp2_load_worker(folders, export_root):
    grid = shard.init_distributed(tp=2)
    results = {}
    for name, folder in folders.items():
        model = shard.build_model(checkpoint_formats.checkpoint_args(folder), grid, seed=0)
        checkpoint.load_checkpoint(folder, model, grid)
        with torch.no_grad():
            results[name] = shard.gather_from_tp(model(TOKENS), grid)
    checkpoint.save_hf(model, Path(export_root) / "hf", grid, max_shard_bytes=200_000)
    checkpoint.save_meta(model, Path(export_root) / "meta", grid, shards=2)
    return results


def test_checkpoints_load_at_tp2_with_the_logits_of_tp1_and_export_from_tp2(tmp_path, reference):
    folders = {"meta-2": write_meta(tmp_path / "meta2", reference, shards=2),
               "meta-1": write_meta(tmp_path / "meta1", reference, shards=1),
               "hf-sharded": write_hf(tmp_path / "hf", reference, "sharded-safetensors")}
    expected = logits_of(reference)
    for rank_results in run_ranks(tp2_load_worker, 2, folders, tmp_path / "export"):
        for name, logits in rank_results.items():
            torch.testing.assert_close(logits, expected, rtol=1e-5, atol=1e-5, msg=lambda m: f"{name}: {m}")
    for folder in ("hf", "meta"):  # gathered from tp = 2 by rank 0 alone
        assert torch.equal(logits_of(loaded(tmp_path / "export" / folder)), expected), folder


# ----------------------------------------------------------------------------------------------------
# Training state


STATE = dict(step=5, data_position=1234, lr_step=5, loss_scaler=dict(scale=1024.0, clean_steps=3),
             config=dict(model="tiny", lr=0.5, tp=2), sampler=torch.arange(4))


def draw():
    return torch.rand(3).tolist(), random.random(), float(np.random.rand())


def save_tp2_worker(root):
    grid = shard.init_distributed(tp=2)
    model = shard.build_model(run_args(), grid, seed=7)
    torch.manual_seed(100 + grid.rank), random.seed(200 + grid.rank), np.random.seed(300 + grid.rank)
    folder = training_state.save_training_state(root, 5, model, grid, STATE)
    after_save = draw()
    other = shard.build_model(run_args(), grid, seed=0)
    state = training_state.load_training_state(folder, other, grid)  # the same layout: RNG state restored too
    return dict(after_save=after_save, after_load=draw(), state=state,
                same_weights=all(torch.equal(a, b) for a, b in zip(model.parameters(), other.parameters())))


def load_tp4_worker(folder):
    grid = shard.init_distributed(tp=4)
    model = shard.build_model(run_args(), grid, seed=0)
    state = training_state.load_training_state(folder, model, grid)
    with torch.no_grad():
        return dict(logits=shard.gather_from_tp(model(TOKENS), grid), state=state)


def test_training_state_saved_at_tp2_resumes_at_tp1_and_tp4(tmp_path, capsys):
    saved = run_ranks(save_tp2_worker, 2, tmp_path)
    folder = tmp_path / "step-00000005"
    assert training_state.find_latest_checkpoint(tmp_path) == folder
    assert sorted(p.name for p in folder.iterdir()) == ["manifest.json", "model-tp00-of-02.safetensors",
                                                        "model-tp01-of-02.safetensors", "rng-rank00000.pt",
                                                        "rng-rank00001.pt", "state.pt"]
    for rank in saved:
        assert rank["same_weights"] and rank["after_load"] == rank["after_save"]  # each rank's own RNG state
        assert rank["state"].keys() == STATE.keys() and torch.equal(rank["state"]["sampler"], STATE["sampler"])
    assert saved[0]["after_save"] != saved[1]["after_save"]

    expected = logits_of(init_weights(Transformer(run_args()), seed=7))
    model = init_weights(Transformer(run_args()), seed=0)
    state = training_state.load_training_state(folder, model)
    assert "random number generators not restored" in capsys.readouterr().out  # 1 process now, 2 then
    assert state["loss_scaler"] == STATE["loss_scaler"] and state["config"] == STATE["config"]
    assert torch.equal(logits_of(model), expected)
    for rank in run_ranks(load_tp4_worker, 4, folder):
        torch.testing.assert_close(rank["logits"], expected, rtol=1e-5, atol=1e-5)
        assert rank["state"]["data_position"] == 1234
    checkpoint.main(["convert", str(folder), str(tmp_path / "hf"), "--to", "hf"])  # fine-tuned weights, exported
    assert torch.equal(logits_of(loaded(tmp_path / "hf")), expected)


def saved_steps(root):
    return sorted(p.name for p in root.iterdir() if p.name.startswith("step-"))


def test_interrupted_and_corrupt_saves_are_skipped(tmp_path, reference, capsys):
    for step in (1, 2):
        training_state.save_training_state(tmp_path, step, reference, None, dict(step=step))
    good = tmp_path / "step-00000002"
    shutil.copytree(good, tmp_path / "step-00000003")
    (tmp_path / "step-00000003" / "manifest.json").unlink()  # crashed before the commit marker
    shutil.copytree(good, tmp_path / "step-00000004")
    weights = tmp_path / "step-00000004" / "model-tp00-of-01.safetensors"
    weights.write_bytes(weights.read_bytes()[:-100])  # truncated after the commit (disk trouble)
    shutil.copytree(good, tmp_path / "step-00000005")
    (tmp_path / "step-00000005" / "manifest.json").write_text("{not json")
    shutil.copytree(good, tmp_path / ".step-00000006.tmp")  # a save still in its temporary folder
    assert training_state.find_latest_checkpoint(tmp_path) == good
    out = capsys.readouterr().out
    assert "step-00000005: corrupt" in out and "step-00000003: no manifest.json" in out
    assert "step-00000004: model-tp00-of-01.safetensors has" in out
    with pytest.raises(ValueError, match="step-00000003 cannot be resumed from: no manifest.json"):
        training_state.load_training_state(tmp_path / "step-00000003", tiny_model())
    assert training_state.find_latest_checkpoint(tmp_path / "nothing-here") is None


def test_keep_deletes_only_older_committed_checkpoints_after_a_commit(tmp_path, reference, monkeypatch):
    (tmp_path / "step-00000000").mkdir()  # not committed: not ours to delete
    for step in range(1, 5):
        training_state.save_training_state(tmp_path, step, reference, None, dict(step=step), keep=2)
    assert saved_steps(tmp_path) == ["step-00000000", "step-00000003", "step-00000004"]

    def crash(*args, **kwargs):
        raise OSError("killed mid-save")
    monkeypatch.setattr(training_state, "write_safetensors", crash)
    with pytest.raises(OSError, match="killed mid-save"):
        training_state.save_training_state(tmp_path, 5, reference, None, dict(step=5), keep=2)
    assert saved_steps(tmp_path) == ["step-00000000", "step-00000003", "step-00000004"]
    assert training_state.find_latest_checkpoint(tmp_path) == tmp_path / "step-00000004"
    monkeypatch.undo()
    training_state.save_training_state(tmp_path, 5, reference, None, dict(step=5), keep=2)
    assert saved_steps(tmp_path) == ["step-00000000", "step-00000004", "step-00000005"]
    assert not list(tmp_path.glob(".step-*"))  # the crashed save's temporary folder is gone too


def test_state_that_resume_could_not_read_is_refused_at_save(tmp_path, reference):
    with pytest.raises(ValueError, match="not plain data"):
        training_state.save_training_state(tmp_path, 1, reference, None, dict(flags=object()))
    assert not list(tmp_path.iterdir())


# ----------------------------------------------------------------------------------------------------
# RoPE: transformers 4 and 5 config layouts, Llama 3's frequency scaling


LLAMA3_SCALING = {"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                  "original_max_position_embeddings": 8192}


@pytest.mark.parametrize("layout", ["transformers 4", "transformers 5"])
@pytest.mark.parametrize("scaled", [False, True])
def test_both_config_layouts_give_the_rotary_base_and_scaling(reference, layout, scaled):
    # transformers 5 keeps the base inside rope_parameters and has no top-level rope_theta: read as 10000 it
    # would build a model with the wrong positions for Llama 3 (500000), Mistral (1e6) or SmolLM2 (100000).
    config = {k: v for k, v in hf_config(reference.args).items() if k != "rope_theta"}
    scaling = LLAMA3_SCALING if scaled else {"rope_type": "default"}
    if layout == "transformers 4":
        config.update(rope_theta=500000.0, rope_scaling=scaling if scaled else None)
    else:
        config.update(rope_parameters={"rope_theta": 500000.0, **scaling})
    args = checkpoint_formats._args_from_hf_config(config, "config.json")
    assert args.rope_theta == 500000.0 and args.use_scaled_rope == scaled
    if scaled:
        assert (args.rope_scaling_factor, args.rope_low_freq_factor, args.rope_high_freq_factor,
                args.rope_original_max_seq_len) == (32.0, 1.0, 4.0, 8192)


def test_metas_params_json_takes_llama3s_scaled_rope(tmp_path, reference):
    folder = write_meta(tmp_path / "meta", reference, 1, params=dict(rope_theta=500000.0, use_scaled_rope=True))
    args = checkpoint_formats.checkpoint_args(folder)
    assert args.use_scaled_rope and args.rope_scaling_factor == 8.0 and args.rope_theta == 500000.0  # Llama 3.1's
    folder = write_meta(tmp_path / "meta32", reference, 1, params=dict(use_scaled_rope=True, rope_scaling_factor=32))
    assert checkpoint_formats.checkpoint_args(folder).rope_scaling_factor == 32  # Llama 3.2's


def metas_apply_scaling(freqs, scale_factor, low_freq_factor, high_freq_factor, old_context_len):
    """Llama 3.1's apply_scaling, transcribed one frequency at a time in Python floats."""
    low_freq_wavelen, high_freq_wavelen = old_context_len / low_freq_factor, old_context_len / high_freq_factor
    new_freqs = []
    for freq in freqs:
        wavelen = 2 * math.pi / freq
        if wavelen < high_freq_wavelen:
            new_freqs.append(freq)
        elif wavelen > low_freq_wavelen:
            new_freqs.append(freq / scale_factor)
        else:
            smooth = (old_context_len / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor)
            new_freqs.append((1 - smooth) * freq / scale_factor + smooth * freq)
    return new_freqs


def test_llama3_scaling_is_metas_formula():
    args = model_args("tiny", vocab_size=VOCAB, use_scaled_rope=True, rope_scaling_factor=32.0,
                      rope_original_max_seq_len=64)  # a short original context: every branch of the formula
    head_dim, theta = 128, 500000.0
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))
    ours = model.scaled_rope_frequencies(inv_freq, args)
    expected = metas_apply_scaling(inv_freq.double().tolist(), 32.0, 1.0, 4.0, 64)
    wavelengths = 2 * math.pi / inv_freq.double()
    assert (wavelengths < 16).any() and (wavelengths > 64).any() and ((wavelengths > 16) & (wavelengths < 64)).any()
    # fp32 against Python floats: the wavelength, the blend weight and the blend are a handful of fp32 roundings
    # (half an ulp, 6e-8, each), so a few ulps of fp32 bound the difference.
    eps = torch.finfo(torch.float32).eps
    torch.testing.assert_close(ours.double(), torch.tensor(expected, dtype=torch.float64), rtol=8 * eps, atol=0)
    cos, sin = rotary_cos_sin(head_dim, 8, theta, args=args)  # the model's angles use the scaled frequencies
    torch.testing.assert_close(cos, torch.outer(torch.arange(8.0), ours).cos(), rtol=0, atol=0)


def test_a_scaled_rope_model_exports_both_layouts_and_loads_back(tmp_path, tokenizer_path):
    args = model_args("tiny", vocab_size=VOCAB, n_layers=2, rope_theta=500000.0, use_scaled_rope=True,
                      rope_scaling_factor=32.0, rope_original_max_seq_len=64)
    scaled = init_weights(Transformer(args), seed=1)
    plain = init_weights(Transformer(dataclasses.replace(args, use_scaled_rope=False)), seed=1)
    assert not torch.allclose(logits_of(scaled), logits_of(plain))  # the scaling changes the model
    checkpoint.save_hf(scaled, tmp_path / "hf", tokenizer_path=tokenizer_path)
    checkpoint.save_meta(scaled, tmp_path / "meta", tokenizer_path=tokenizer_path)
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert config["rope_theta"] == 500000.0 and config["rope_scaling"] == {**LLAMA3_SCALING, "factor": 32.0,
                                                                          "original_max_position_embeddings": 64}
    assert json.loads((tmp_path / "meta" / "params.json").read_text())["use_scaled_rope"] is True
    for folder in ("hf", "meta"):
        assert checkpoint_formats.checkpoint_args(tmp_path / folder, max_seq_len=args.max_seq_len) == args, folder
        assert torch.equal(logits_of(loaded(tmp_path / folder)), logits_of(scaled)), folder
    with pytest.raises(ValueError, match="use_scaled_rope: model False, checkpoint True"):
        checkpoint.load_checkpoint(tmp_path / "hf", plain)


def test_resume_puts_right_what_a_crash_in_a_save_or_a_deletion_left(tmp_path, reference):
    for step in (1, 2, 3):
        training_state.save_training_state(tmp_path, step, reference, None, dict(step=step), keep=0)
    os.replace(tmp_path / "step-00000001", tmp_path / ".step-00000001.deleting")  # killed while deleting step 1
    (tmp_path / ".step-00000004.tmp").mkdir()  # killed while writing step 4
    os.replace(tmp_path / "step-00000003", tmp_path / ".step-00000003.old")  # killed in the commit of a re-save
    shutil.copytree(tmp_path / "step-00000002", tmp_path / ".step-00000002.old")  # re-save done, cleanup cut
    (tmp_path / "step-00000000").mkdir()  # someone's, incomplete: named, never deleted
    said = []
    training_state.remove_leftovers(tmp_path, said.append)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step-00000000", "step-00000002", "step-00000003"]
    assert training_state.find_latest_checkpoint(tmp_path) == tmp_path / "step-00000003"
    assert any("put back the save" in line and "step-00000003" in line for line in said)
    assert any(".step-00000001.deleting: removed (a deletion that was cut short)" in line for line in said)
    assert any(".step-00000004.tmp: removed (a save that never committed)" in line for line in said)
    assert any("step-00000000: cannot be resumed from" in line for line in said) and len(said) == 5


def test_keep_deletes_by_renaming_first_so_a_kill_leaves_no_half_deleted_step(tmp_path, reference, monkeypatch):
    for step in (1, 2):
        training_state.save_training_state(tmp_path, step, reference, None, dict(step=step), keep=1)

    rmtree = shutil.rmtree

    def killed(path, *args, **kwargs):  # the deletion of an old save is cut short
        if str(path).endswith(".deleting"):
            raise KeyboardInterrupt("killed while deleting")
        return rmtree(path, *args, **kwargs)
    monkeypatch.setattr(training_state.shutil, "rmtree", killed)
    with pytest.raises(KeyboardInterrupt):
        training_state.save_training_state(tmp_path, 3, reference, None, dict(step=3), keep=1)
    monkeypatch.undo()
    assert saved_steps(tmp_path) == ["step-00000003"]  # step 2 went aside whole, as .step-00000002.deleting
    training_state.remove_leftovers(tmp_path, lambda line: None)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step-00000003"]


def test_an_old_save_is_deleted_only_once_the_new_one_reads_back(tmp_path, reference, monkeypatch):
    training_state.save_training_state(tmp_path, 1, reference, None, dict(step=1), keep=1)
    real_write = training_state.write_safetensors

    def short_write(path, tensors, metadata=None):  # the disk drops the file's tail, unseen by the writer
        real_write(path, tensors, metadata)
        with open(path, "r+b") as f:
            f.truncate(path.stat().st_size // 2)
    monkeypatch.setattr(training_state, "write_safetensors", short_write)
    with pytest.raises(OSError, match=r"step-00000002 was written but does not read back .*; the older saves are kept"):
        training_state.save_training_state(tmp_path, 2, reference, None, dict(step=2), keep=1)
    assert training_state.find_latest_checkpoint(tmp_path) == tmp_path / "step-00000001"
