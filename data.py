"""Tokenizer and data: SentencePiece, the file formats users bring, prompt masking, packing, batching,
and a deterministic sampler whose position can be saved.

- `Tokenizer` wraps a SentencePiece model (LLaMA's `tokenizer.model` or one trained here) and encodes
  with BOS (id 1) and optionally EOS (id 2), as LLaMA does. `train_tokenizer` reproduces LLaMA's
  settings (BPE, byte fallback, digits split, identity normalization); `cached_tokenizer` trains once per
  corpus and vocabulary size and keeps the file in a cache folder (rebuilt, never committed).
- Formats (read by tasks.py's `load_dataset` from the records that this file parses): plain text
  (.txt), jsonl with a "text" field, Alpaca instruction data (.json list or .jsonl with
  instruction/input/output), multiple-choice jsonl ({"prompt", "choices", "label"}), chat jsonl
  ({"messages": [{"role", "content"}]}, laid out by tasks.py in the checkpoint's chat markers), the
  SuperGLUE task files as distributed (tasks.py turns them into prompts and choices), and pre-tokenized
  ids (.npy of one token stream, or jsonl with "input_ids"). Byte-level BPE tokenizers (tokenizer.json,
  GGUF) are bpe.py's. Malformed lines are errors that name the file and the line.
- Text is packed: all documents, each wrapped in BOS ... EOS, form one stream cut into windows of
  seq_len + 1 tokens, so no position is padding. Prompt/answer examples are one sequence each; by
  default the loss is on the answer only (labels -100 on the prompt), `train_on_prompt` trains on both.
  Examples longer than seq_len + 1 are truncated (from the left of the prompt, so the answer stays) or
  dropped, and counted.
- `ShuffledSampler` walks a seeded permutation per epoch; its position is one integer, so a resumed run
  continues at the exact example. Every rank draws the same global batch and keeps its dp slice.

Left out: chat templates, streaming datasets larger than memory, tokenizers other than SentencePiece
(bring their ids pre-tokenized).
"""
import hashlib
import io
import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import sentencepiece as spm
import torch

from model import IGNORE_INDEX  # the label of positions that carry no loss (prompt tokens, padding)

# LLaMA-1/2's SentencePiece training settings (read off their tokenizer.model's trainer_spec).
LLAMA_TOKENIZER_SETTINGS = dict(
    model_type="bpe", byte_fallback=True, split_digits=True, allow_whitespace_only_pieces=True,
    normalization_rule_name="identity", add_dummy_prefix=True, remove_extra_whitespaces=False,
    character_coverage=0.99995, max_sentencepiece_length=16,
    unk_id=0, bos_id=1, eos_id=2, pad_id=-1,
)


# ----------------------------------------------------------------------------------------------------
# Tokenizer


class Tokenizer:
    def __init__(self, model_path):
        model_path = Path(model_path)
        if model_path.is_dir():
            if not (model_path / "tokenizer.model").is_file():
                raise FileNotFoundError(f"tokenizer {model_path} is a folder without a tokenizer.model: pass "
                                        f"--tokenizer the path of the SentencePiece file itself")
            model_path = model_path / "tokenizer.model"
        if not model_path.is_file():
            raise FileNotFoundError(f"tokenizer file {model_path} does not exist: pass --tokenizer PATH to a "
                                    f"SentencePiece tokenizer.model, or omit it to train one on the corpus")
        with open(model_path, "rb") as f:
            if f.read(64).startswith(b"version https://git-lfs"):
                raise ValueError(f"{model_path} is a git-lfs pointer, not the tokenizer: fetch the file with "
                                 f"`git lfs pull` (or download it again)")
        self.sp = spm.SentencePieceProcessor()
        try:
            self.sp.Load(str(model_path))
        except (RuntimeError, OSError) as error:
            raise ValueError(f"{model_path} is not a SentencePiece model ({error}); a Llama 3 tiktoken file or a "
                             f"git-lfs pointer looks like this: pass the tokenizer.model of a LLaMA-1/2 model, or "
                             f"bring pre-tokenized ids") from None
        self.path = model_path
        self.vocab_size, self.bos_id, self.eos_id = self.sp.GetPieceSize(), self.sp.bos_id(), self.sp.eos_id()
        if self.bos_id < 0 or self.eos_id < 0:
            raise ValueError(f"{model_path} has no {'BOS' if self.bos_id < 0 else 'EOS'} piece, which LLaMA's "
                             f"sequences begin (BOS) and end (EOS) with: use a tokenizer trained with them (the "
                             f"LLaMA tokenizer.model, or omit --tokenizer to train one)")

    def encode(self, text: str, bos: bool = True, eos: bool = False) -> list:
        ids = self.sp.EncodeAsIds(text)
        return ([self.bos_id] if bos else []) + ids + ([self.eos_id] if eos else [])

    def decode(self, ids) -> str:
        return self.sp.DecodeIds([int(i) for i in ids])


def read_corpus(path) -> str:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"corpus {path} does not exist: pass --data PATH to a UTF-8 text file "
                                f"(the bundled one is data/botchan.txt)")
    text = read_utf8(path)
    if "\x00" in text:
        raise ValueError(f"corpus {path} holds NUL bytes ({text.count(chr(0))} of them): it is a binary file, not "
                         f"text; pass --data PATH to a UTF-8 text file")
    if not text.strip():
        raise ValueError(f"corpus {path} is empty: pass --data PATH to a file with some text in it")
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


# ----------------------------------------------------------------------------------------------------
# Reading files


def read_utf8(path) -> str:
    """A file's text, or an error naming the file, the line and the byte that is not UTF-8."""
    data = Path(path).read_bytes()
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as error:
        line = data.count(b"\n", 0, error.start) + 1
        raise ValueError(f"{path}:{line}: not UTF-8 text (byte {data[error.start]:#04x} at offset {error.start}): "
                         f"convert the file to UTF-8 (e.g. iconv -f latin1 -t utf-8)") from None


def read_jsonl(path) -> list:
    """Rows of a .jsonl file (or the list in a .json file); each must be a JSON object."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"data file {path} does not exist")
    if path.suffix == ".json":
        try:
            rows = json.loads(read_utf8(path))
        except json.JSONDecodeError as error:
            raise ValueError(f"{path}:{error.lineno}: not valid JSON ({error.msg})") from None
        if not isinstance(rows, list) or not all(isinstance(r, dict) for r in rows):
            raise ValueError(f"{path}: a .json data file must hold a list of objects (or use .jsonl, one per line)")
        if not rows:
            raise ValueError(f"{path} holds no examples")
        return rows
    rows = []
    for number, line in enumerate(read_utf8(path).splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as error:
            raise ValueError(f"{path}:{number}: not valid JSON ({error.msg}): {line[:80]!r}") from None
        if not isinstance(row, dict):
            raise ValueError(f"{path}:{number}: expected a JSON object, got {type(row).__name__}")
        row["_line"] = number  # kept so that later errors can name the line
        rows.append(row)
    if not rows:
        raise ValueError(f"{path} holds no examples")
    return rows


def field_of(row: dict, name: str, path, kind=str):
    """row[name], or an error naming the file, the line and the missing or mistyped field."""
    if name not in row:
        raise ValueError(f"{path}:{row.get('_line', '?')}: missing field {name!r} (fields: "
                         f"{sorted(k for k in row if k != '_line')})")
    if not isinstance(row[name], kind) or (isinstance(row[name], bool) and bool not in (kind if isinstance(kind, tuple)
                                                                                            else (kind,))):
        names = " or ".join(k.__name__ for k in (kind if isinstance(kind, tuple) else (kind,)))
        raise ValueError(f"{path}:{row.get('_line', '?')}: field {name!r} should be {names}, "
                         f"got {type(row[name]).__name__}")
    return row[name]


# ----------------------------------------------------------------------------------------------------
# Sequences: token ids with their labels


@dataclass
class Sequences:
    """Training or evaluation sequences: ids and labels of equal length (labels IGNORE_INDEX where no loss),
    plus, for multiple-choice data, the examples to score."""
    items: list  # [(ids, labels)] as lists of ints
    choices: list = field(default_factory=list)  # [MultipleChoice] aligned with items; empty without choices
    truncated: int = 0
    dropped: int = 0
    packed: bool = False  # windows of one token stream (text), rather than one example each


@dataclass
class MultipleChoice:
    prompt: str
    choices: list
    label: int  # the gold choice (trained on)
    golds: tuple = ()  # every choice that counts as correct, when several do (ReCoRD); empty: (label,)


def pack(token_stream: list, seq_len: int) -> list:
    """Cut one token stream into windows of seq_len + 1 (inputs and shifted targets share a window);
    consecutive windows overlap by one token so that every token is a target exactly once."""
    windows = []
    for start in range(0, len(token_stream) - seq_len, seq_len):
        window = token_stream[start:start + seq_len + 1]
        windows.append((window, list(window)))
    return windows


def encode_prompt_answer(tokenizer, prompt: str, answer: str, seq_len: int, train_on_prompt: bool, long: str,
                         answer_eos: bool = True):
    """BOS prompt answer EOS, labels IGNORE_INDEX on the prompt unless train_on_prompt; None if dropped.

    The answer is encoded on its own, so SentencePiece's dummy prefix gives it its leading space
    ("Answer:" + "yes" -> "Answer: yes"), and the prompt/answer boundary is exact in tokens.
    """
    prompt_ids, answer_ids = tokenizer.encode(prompt, bos=True), tokenizer.encode(answer, bos=False, eos=answer_eos)
    limit, truncated = seq_len + 1, False
    if len(prompt_ids) + len(answer_ids) > limit:
        if long == "drop":
            return None, False
        truncated = True
        answer_ids = answer_ids[:limit - 1]  # an answer longer than everything keeps BOS and its start
        keep = limit - len(answer_ids)  # keep BOS and the end of the prompt, next to the answer
        prompt_ids = prompt_ids[:1] + prompt_ids[len(prompt_ids) - keep + 1:] if keep > 1 else prompt_ids[:1]
    ids = prompt_ids + answer_ids
    labels = list(ids) if train_on_prompt else [IGNORE_INDEX] * len(prompt_ids) + answer_ids
    return (ids, labels), truncated


def prompt_answer_sequences(pairs, tokenizer, seq_len, train_on_prompt, long, choices=None):
    result = Sequences(items=[])
    for i, (prompt, answer) in enumerate(pairs):
        encoded, truncated = encode_prompt_answer(tokenizer, prompt, answer, seq_len, train_on_prompt, long)
        if encoded is None:
            result.dropped += 1
            continue
        result.items.append(encoded)
        result.truncated += truncated
        if choices is not None:
            result.choices.append(choices[i])
    return result


def check_token_ids(tokens: torch.Tensor, vocab_size: int, what: str):
    """Refuse token ids outside [0, vocab_size) before they reach an embedding (a GPU would only assert)."""
    low, high = int(tokens.min()), int(tokens.max())
    if low < 0 or high >= vocab_size:
        raise ValueError(f"{what} holds token id {high if high >= vocab_size else low}, outside the model's "
                         f"vocabulary [0, {vocab_size}): the tokenizer and the model's vocab_size disagree; "
                         f"build the model with vocab_size >= the tokenizer's size")


# ----------------------------------------------------------------------------------------------------
# Sampling and batching


class ShuffledSampler:
    """An endless stream of example indices: a fresh seeded permutation each epoch. The state is the
    number of indices handed out, so saving and restoring it resumes at the exact example."""

    def __init__(self, n_items: int, seed: int):
        if n_items <= 0:
            raise ValueError("no training examples left (all dropped as too long?): raise --seq-len or "
                             "use --long-examples truncate")
        self.n_items, self.seed, self.position = n_items, seed, 0

    def _permutation(self, epoch):
        return torch.randperm(self.n_items, generator=torch.Generator().manual_seed(self.seed + epoch)).tolist()

    def next(self, count: int) -> list:
        indices = []
        while len(indices) < count:
            epoch, offset = divmod(self.position, self.n_items)
            take = min(count - len(indices), self.n_items - offset)
            indices += self._permutation(epoch)[offset:offset + take]
            self.position += take
        return indices

    def state_dict(self):
        return dict(position=self.position, seed=self.seed, n_items=self.n_items)

    def load_state_dict(self, state):
        if state["n_items"] != self.n_items or state["seed"] != self.seed:
            raise ValueError(f"the saved sampler covered {state['n_items']} examples with seed {state['seed']}, this "
                             f"one {self.n_items} with seed {self.seed}: resume with the same data, --seq-len "
                             f"and --seed")
        self.position = int(state["position"])


def collate(items: list, pad_id: int = 0, length: int = None):
    """Inputs and shifted targets, right-padded to the longest sequence, or to `length` tokens before the shift
    (a fixed shape, for CUDA graphs); padding has label IGNORE_INDEX."""
    longest = max(len(ids) for ids, _ in items)
    if length is not None and longest > length:
        raise ValueError(f"a sequence of {longest} tokens does not fit the fixed length {length}")
    length = longest if length is None else length
    ids = torch.full((len(items), length), pad_id, dtype=torch.long)
    labels = torch.full((len(items), length), IGNORE_INDEX, dtype=torch.long)
    for row, (item_ids, item_labels) in enumerate(items):
        ids[row, :len(item_ids)] = torch.tensor(item_ids)
        labels[row, :len(item_labels)] = torch.tensor(item_labels)
    return ids[:, :-1], labels[:, 1:]


def split_train_val(sequences: Sequences, val_fraction: float):
    """A validation tail for data that comes as one file. For packed text the tail is contiguous text
    (no sentence in both); examples are shuffled with a fixed seed first."""
    if not 0 < val_fraction < 1:
        raise ValueError(f"val_fraction={val_fraction} must be between 0 and 1")
    n = len(sequences.items)
    n_val = max(1, int(n * val_fraction))
    if n - n_val < 1:
        raise ValueError(f"only {n} sequences: too few to split off a validation set; use a longer corpus, "
                         f"a shorter --seq-len, or pass --val-data")
    shuffled = torch.randperm(n, generator=torch.Generator().manual_seed(0)).tolist()
    order = list(range(n)) if sequences.packed else shuffled

    def pick(indices):
        return Sequences(items=[sequences.items[i] for i in indices], packed=sequences.packed,
                         choices=[sequences.choices[i] for i in indices] if sequences.choices else [])

    return pick(order[:n - n_val]), pick(order[n - n_val:])
