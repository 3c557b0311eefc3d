"""Tokenizer and data: a SentencePiece wrapper, a LLaMA-style tokenizer trainer, and a plain-text dataset.

- `Tokenizer` wraps a SentencePiece model file (LLaMA's `tokenizer.model` or one trained here) and
  encodes with BOS (id 1) and optionally EOS (id 2), as LLaMA does.
- `train_tokenizer` reproduces LLaMA's SentencePiece settings (BPE, byte fallback so that no text is
  ever out of vocabulary, digits split one by one, identity normalization, whitespace kept as is) on
  a corpus; `cached_tokenizer` trains once per corpus content and vocabulary size and keeps the file in
  a cache folder, so the binary is rebuilt, never committed.
- `TextDataset` tokenizes one text file into a single token stream and splits it: the last
  `val_fraction` of the tokens is the validation set (a contiguous tail, so no sentence is in both).
  Training batches are random windows (as nanoGPT does); validation uses fixed, non-overlapping windows
  so every evaluation sees the same tokens.

Left out for now: instruction and multiple-choice data, prompt masking, a resumable sampler.
"""
import hashlib
import io
import os
from pathlib import Path

import torch
import sentencepiece as spm

# LLaMA-1/2's SentencePiece training settings (read off their tokenizer.model's trainer_spec).
LLAMA_TOKENIZER_SETTINGS = dict(
    model_type="bpe", byte_fallback=True, split_digits=True, allow_whitespace_only_pieces=True,
    normalization_rule_name="identity", add_dummy_prefix=True, remove_extra_whitespaces=False,
    character_coverage=0.99995, max_sentencepiece_length=16,
    unk_id=0, bos_id=1, eos_id=2, pad_id=-1,
)


class Tokenizer:
    def __init__(self, model_path):
        model_path = Path(model_path)
        if not model_path.is_file():
            raise FileNotFoundError(f"tokenizer file {model_path} does not exist: pass --tokenizer PATH to a "
                                    f"SentencePiece tokenizer.model, or omit it to train one on the corpus")
        self.sp = spm.SentencePieceProcessor()
        try:
            self.sp.Load(str(model_path))
        except (RuntimeError, OSError) as error:
            raise ValueError(f"{model_path} is not a SentencePiece model ({error}); a Llama 3 tiktoken file or a "
                             f"git-lfs pointer looks like this: pass the tokenizer.model of a LLaMA-1/2 model") from None
        self.path = model_path
        self.vocab_size, self.bos_id, self.eos_id = self.sp.GetPieceSize(), self.sp.bos_id(), self.sp.eos_id()

    def encode(self, text: str, bos: bool = True, eos: bool = False) -> list:
        ids = self.sp.EncodeAsIds(text)
        return ([self.bos_id] if bos else []) + ids + ([self.eos_id] if eos else [])

    def decode(self, ids) -> str:
        return self.sp.DecodeIds([int(i) for i in ids])


def read_corpus(path) -> str:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"corpus {path} does not exist: pass --corpus PATH to a UTF-8 text file "
                                f"(the bundled one is data/botchan.txt)")
    text = path.read_text(encoding="utf-8")
    if not text.strip():
        raise ValueError(f"corpus {path} is empty: pass --corpus PATH to a text file with some text in it")
    return text


def train_tokenizer(text: str, vocab_size: int, model_path):
    """Train a LLaMA-style BPE tokenizer on `text` and write it atomically to `model_path`."""
    model = io.BytesIO()
    lines = (line for line in text.splitlines() if line.strip())
    try:
        spm.SentencePieceTrainer.train(sentence_iterator=lines, model_writer=model, vocab_size=vocab_size,
                                       num_threads=2, minloglevel=2, **LLAMA_TOKENIZER_SETTINGS)
    except RuntimeError as error:
        raise ValueError(f"could not train a tokenizer with vocab_size={vocab_size} on this corpus: {error}. "
                         f"Choose --vocab-size within the bounds the message gives") from None
    model_path = Path(model_path)
    model_path.parent.mkdir(parents=True, exist_ok=True)
    temporary = model_path.with_suffix(f".tmp{os.getpid()}")
    temporary.write_bytes(model.getvalue())
    os.replace(temporary, model_path)  # readers never see a half-written file
    return model_path


def cached_tokenizer(corpus_path, vocab_size: int, cache_dir) -> Tokenizer:
    """The tokenizer for this corpus and vocabulary size, trained on first use and then reused."""
    text = read_corpus(corpus_path)
    key = hashlib.sha256(f"{vocab_size}\n{sorted(LLAMA_TOKENIZER_SETTINGS.items())}\n{text}".encode()).hexdigest()
    model_path = Path(cache_dir) / f"tokenizer-{vocab_size}-{key[:16]}.model"
    if not model_path.is_file():
        train_tokenizer(text, vocab_size, model_path)
    return Tokenizer(model_path)


class TextDataset:
    """One text file as a token stream, split into a training head and a validation tail."""

    def __init__(self, corpus_path, tokenizer: Tokenizer, seq_len: int, val_fraction: float = 0.1):
        if not 0 < val_fraction < 1:
            raise ValueError(f"val_fraction={val_fraction} must be between 0 and 1")
        text = read_corpus(corpus_path)
        tokens = torch.tensor(tokenizer.encode(text, bos=True, eos=True), dtype=torch.long)
        n_val = int(len(tokens) * val_fraction)
        self.train, self.val = tokens[:-n_val], tokens[-n_val:]
        self.seq_len = seq_len
        for split, part in (("training", self.train), ("validation", self.val)):
            if len(part) < seq_len + 1:
                raise ValueError(f"the {split} split of {corpus_path} has {len(part)} tokens, fewer than one sequence "
                                 f"of seq_len+1={seq_len + 1}: use a longer corpus or a shorter --seq-len")

    def train_batch(self, batch_size: int, generator: torch.Generator):
        """Random windows: inputs tokens[i:i+seq_len] and targets shifted by one."""
        starts = torch.randint(0, len(self.train) - self.seq_len, (batch_size,), generator=generator)
        return self._windows(self.train, starts)

    def val_batches(self, batch_size: int, max_batches: int):
        """The same non-overlapping validation windows every time, in order."""
        starts = torch.arange(0, len(self.val) - self.seq_len, self.seq_len)[: batch_size * max_batches]
        for i in range(0, len(starts), batch_size):
            yield self._windows(self.val, starts[i:i + batch_size])

    def _windows(self, tokens, starts):
        rows = torch.stack([tokens[s:s + self.seq_len + 1] for s in starts.tolist()])
        return rows[:, :-1], rows[:, 1:]


def check_token_ids(tokens: torch.Tensor, vocab_size: int, what: str):
    """Refuse token ids outside [0, vocab_size) before they reach an embedding (a GPU would only assert)."""
    low, high = int(tokens.min()), int(tokens.max())
    if low < 0 or high >= vocab_size:
        raise ValueError(f"{what} holds token id {high if high >= vocab_size else low}, outside the model's "
                         f"vocabulary [0, {vocab_size}): the tokenizer and the model's vocab_size disagree; "
                         f"build the model with vocab_size >= the tokenizer's size")
