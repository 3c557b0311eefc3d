"""Tokenizer and data: LLaMA's SentencePiece settings, caching, splits and batching, bad input."""
import pytest
import torch

from data import TextDataset, Tokenizer, cached_tokenizer, check_token_ids, read_corpus, train_tokenizer

TEXT = "\n".join(f"Line {i}: the quick brown fox jumps over the lazy dog {i * 37}, café." for i in range(360))


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    path = tmp_path_factory.mktemp("corpus") / "corpus.txt"
    path.write_text(TEXT, encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def tokenizer(corpus, tmp_path_factory):
    return cached_tokenizer(corpus, 360, tmp_path_factory.mktemp("cache"))


def test_tokenizer_has_llama_ids_byte_fallback_and_split_digits(tokenizer):
    assert (tokenizer.sp.unk_id(), tokenizer.bos_id, tokenizer.eos_id, tokenizer.vocab_size) == (0, 1, 2, 360)
    ids = tokenizer.encode("12345 🙂", bos=True, eos=True)
    assert ids[0] == 1 and ids[-1] == 2
    pieces = [tokenizer.sp.IdToPiece(i) for i in ids[1:-1]]
    assert all(len(p.strip("▁")) <= 1 for p in pieces if p.strip("▁").isdigit())  # one digit per piece
    assert "<0xF0>" in pieces  # the emoji is not in the training text: it falls back to bytes
    assert tokenizer.decode(ids[1:-1]) == "12345 🙂"


def test_tokenizer_is_cached_by_corpus_and_size(corpus, tmp_path):
    first = cached_tokenizer(corpus, 360, tmp_path)
    stamp = first.path.stat().st_mtime_ns
    again = cached_tokenizer(corpus, 360, tmp_path)
    assert again.path == first.path and again.path.stat().st_mtime_ns == stamp  # not retrained
    assert cached_tokenizer(corpus, 370, tmp_path).path != first.path
    assert [p.name for p in tmp_path.iterdir() if ".tmp" in p.name] == []  # no temporary left behind


def test_dataset_split_and_batches(corpus, tokenizer):
    data = TextDataset(corpus, tokenizer, seq_len=16, val_fraction=0.1)
    everything = torch.tensor(tokenizer.encode(TEXT, bos=True, eos=True))
    assert torch.equal(torch.cat([data.train, data.val]), everything)
    assert len(data.val) == int(len(everything) * 0.1)
    inputs, targets = data.train_batch(4, torch.Generator().manual_seed(0))
    assert inputs.shape == targets.shape == (4, 16)
    assert torch.equal(inputs[:, 1:], targets[:, :-1])  # targets are the next tokens
    first, second = list(data.val_batches(3, 2)), list(data.val_batches(3, 2))
    assert len(first) == 2 and all(torch.equal(a[0], b[0]) for a, b in zip(first, second))
    assert torch.equal(first[0][0][0], data.val[:16])


def test_bad_data_is_refused(tmp_path, corpus, tokenizer):
    with pytest.raises(FileNotFoundError, match="corpus .*missing.txt does not exist"):
        read_corpus(tmp_path / "missing.txt")
    empty = tmp_path / "empty.txt"
    empty.write_text("  \n")
    with pytest.raises(ValueError, match="is empty"):
        read_corpus(empty)
    with pytest.raises(ValueError, match="fewer than one sequence of seq_len\\+1=100001"):
        TextDataset(corpus, tokenizer, seq_len=100_000)
    with pytest.raises(ValueError, match="token id 300, outside the model's vocabulary \\[0, 300\\)"):
        check_token_ids(torch.tensor([5, 300]), 300, "the batch")
    with pytest.raises(ValueError, match="vocab_size=100000"):
        train_tokenizer(TEXT, 100_000, tmp_path / "big.model")


def test_non_sentencepiece_files_are_refused(tmp_path):
    lfs_pointer = tmp_path / "tokenizer.model"
    lfs_pointer.write_text("version https://git-lfs.github.com/spec/v1\noid sha256:abc\nsize 499723\n")
    with pytest.raises(ValueError, match="is not a SentencePiece model"):
        Tokenizer(lfs_pointer)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        Tokenizer(tmp_path / "nope.model")
