"""Byte-level BPE, the tokenizer of GPT-2, SmolLM and Llama 3, in plain Python (no `regex`, no `tokenizers`).

Encoding a text: (1) special tokens (`<|im_start|>`, `<|begin_of_text|>`, ...) are cut out first and become their
ids; (2) the pre-tokenizer cuts the rest into pieces (words with their leading space, numbers, punctuation runs,
whitespace runs); (3) each piece's UTF-8 bytes are written as printable characters, one per byte (GPT-2's table:
the space is "Ġ"), and (4) merged pairwise, always the pair ranked first in the merge list, until no ranked pair
is left; each final symbol is a vocabulary entry. Decoding maps ids back to symbols and the symbols to bytes.

The pre-tokenizers are the regular expressions of the reference tokenizers, written out as scanners, because
Python's `re` has no Unicode classes: letters are categories L*, numbers N*, whitespace the White_Space set.
- gpt2: 's 't 're 've 'm 'll 'd | ?letters | ?numbers | ?other | spaces not before a non-space | spaces.
- smollm: every digit alone first (Hugging Face's Digits(individual_digits)), then gpt2 on each part.
- llama3: contractions in any case | one non-letter-non-number then letters | 1 to 3 digits | ?other then line
  breaks | spaces ending in a line break | spaces not before a non-space | spaces.
Read from a Hugging Face tokenizer.json (with tokenizer_config.json beside it for BOS and EOS) or from a GGUF file's
tokenizer.ggml.* metadata; tests/test_bpe.py holds the ids the reference library gives.
Written back as tokenizer.json and tokenizer_config.json (`hugging_face_files`) on export.
Left out: normalizers, other pre-tokenizers (refused by name), BPE dropout, byte fallback (byte-level BPE never
needs it), rendering chat templates (Jinja; kept as text).
"""
import json
import unicodedata
from functools import lru_cache
from pathlib import Path

# Unicode White_Space (what \s matches in the reference engines; Python's isspace also takes \x1c-\x1f).
WHITESPACE = frozenset("\t\n\x0b\x0c\r \x85\xa0\u1680\u2028\u2029\u202f\u205f\u3000" +
                       "".join(chr(c) for c in range(0x2000, 0x200b)))
CONTRACTIONS = ("s", "t", "re", "ve", "m", "ll", "d")


@lru_cache(maxsize=None)
def category(char: str) -> str:
    """'L' (letter), 'N' (number), 'S' (whitespace) or 'O' (other)."""
    if char in WHITESPACE:
        return "S"
    major = unicodedata.category(char)[0]
    return major if major in "LN" else "O"


def run(text, i, classes) -> int:
    """The end of the run of characters from i whose class is in `classes`."""
    while i < len(text) and category(text[i]) in classes:
        i += 1
    return i


def contraction(text, i, any_case: bool) -> int:
    """The end of 's, 't, 're, ... at i, or i."""
    if text[i] != "'":
        return i
    for ending in CONTRACTIONS:
        got = text[i + 1:i + 1 + len(ending)]
        if got == ending or (any_case and got.lower() == ending):
            return i + 1 + len(ending)
    return i


def spaces(text, i) -> int:
    """\\s+(?!\\S)|\\s+ at i: a whitespace run, less its last character when a non-space follows it (that one
    starts the next piece), unless the run is that one character."""
    end = run(text, i, "S")
    return end - 1 if end < len(text) and end - i > 1 else end


def split_gpt2(text: str) -> list:
    pieces, i, n = [], 0, len(text)
    while i < n:
        end = contraction(text, i, any_case=False)
        if end == i:
            start = i + 1 if text[i] == " " and i + 1 < n and category(text[i + 1]) != "S" else i
            kind = category(text[start])
            if kind in "LN":
                end = run(text, start, kind)
            elif kind == "O":
                end = run(text, start, "O")
            else:
                end = spaces(text, i)
        pieces.append(text[i:end])
        i = end
    return pieces


def split_digits(text: str) -> list:
    pieces, start = [], 0
    for i, char in enumerate(text):
        if category(char) == "N":
            pieces += [text[start:i], char] if i > start else [char]
            start = i + 1
    return pieces + ([text[start:]] if start < len(text) else [])


def split_smollm(text: str) -> list:
    return [piece for part in split_digits(text) for piece in split_gpt2(part)]


def split_llama3(text: str) -> list:
    pieces, i, n = [], 0, len(text)
    while i < n:
        char, end = text[i], contraction(text, i, any_case=True)
        kind = category(char)
        if end > i:
            pass
        elif kind == "L":
            end = run(text, i, "L")
        elif kind != "N" and char not in "\r\n" and i + 1 < n and category(text[i + 1]) == "L":
            end = run(text, i + 1, "L")  # one leading non-letter (a space, a quote, ...) and the letters
        elif kind == "N":
            end = i + 1
            while end < n and end - i < 3 and category(text[end]) == "N":
                end += 1
        elif kind == "O" or (char == " " and i + 1 < n and category(text[i + 1]) == "O"):
            end = run(text, i + 1 if kind == "S" else i, "O")
            while end < n and text[end] in "\r\n":
                end += 1
        else:  # whitespace: up to its last line break if it holds one, else as gpt2's
            stop = run(text, i, "S")
            breaks = [j for j in range(i, stop) if text[j] in "\r\n"]
            end = breaks[-1] + 1 if breaks else spaces(text, i)
        pieces.append(text[i:end])
        i = end
    return pieces


PRE_TOKENIZERS = {"gpt2": split_gpt2, "smollm": split_smollm, "llama3": split_llama3}
# GGUF's tokenizer.ggml.pre names of these pre-tokenizers.
GGUF_PRE = {"gpt-2": "gpt2", "gpt2": "gpt2", "smollm": "smollm", "llama-bpe": "llama3", "llama3": "llama3"}
LLAMA3_PATTERN = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|"
                  r"\s*[\r\n]+|\s+(?!\S)|\s+")


def byte_symbols() -> list:
    """GPT-2's printable character for each byte: the printable Latin-1 bytes are themselves, the others are
    moved to 256 and up, in order."""
    kept = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    moved = iter(range(256, 512))
    return [chr(b) if b in kept else chr(next(moved)) for b in range(256)]


BYTE_SYMBOL = byte_symbols()
SYMBOL_BYTE = {symbol: byte for byte, symbol in enumerate(BYTE_SYMBOL)}


class ByteLevelBPE:
    """The tokenizer interface of data.Tokenizer: vocab_size, bos_id, eos_id, encode, decode, path."""

    def __init__(self, tokens: list, merges: list, pre: str, special: dict, bos_id: int, eos_id: int, path=None,
                 chat_template: str = "", ignore_merges: bool = False):
        if pre not in PRE_TOKENIZERS:
            raise ValueError(f"{path}: pre-tokenizer {pre!r} is not implemented (gpt2, smollm and llama3 are)")
        self.tokens, self.pre, self.split, self.path = tokens, pre, PRE_TOKENIZERS[pre], Path(path) if path else None
        self.chat_template = chat_template  # (Jinja text, kept for the export; not rendered here)
        self.ignore_merges = ignore_merges  # Llama 3's: a piece that is a whole vocabulary entry is that entry
        self.ids = {token: i for i, token in enumerate(tokens) if token is not None}
        self.ranks = {tuple(merge): rank for rank, merge in enumerate(merges)}
        self.special = special  # content -> id, cut out of a text before pre-tokenizing
        self.special_longest_first = sorted(special, key=len, reverse=True)
        self.special_starts = {content[0] for content in special}
        self.vocab_size, self.bos_id, self.eos_id = len(tokens), bos_id, eos_id
        self.cache = {}

    def bpe(self, piece: str) -> list:
        word = "".join(BYTE_SYMBOL[b] for b in piece.encode("utf-8"))
        if word in self.cache:
            return self.cache[word]
        if self.ignore_merges and word in self.ids:
            return [self.ids[word]]
        symbols = list(word)
        while len(symbols) > 1:
            pair = min(zip(symbols, symbols[1:]), key=lambda p: self.ranks.get(p, len(self.ranks)))
            if pair not in self.ranks:
                break
            merged, i = [], 0  # every occurrence of the pair, left to right
            while i < len(symbols):
                if i + 1 < len(symbols) and (symbols[i], symbols[i + 1]) == pair:
                    merged.append(symbols[i] + symbols[i + 1])
                    i += 2
                else:
                    merged.append(symbols[i])
                    i += 1
            symbols = merged
        try:
            ids = [self.ids[symbol] for symbol in symbols]
        except KeyError as missing:
            raise ValueError(f"{self.path}: the symbol {missing} is not in the vocabulary: the merges and the "
                             f"vocabulary do not belong together") from None
        self.cache[word] = ids
        return ids

    def encode(self, text: str, bos: bool = True, eos: bool = False) -> list:
        ids = [self.bos_id] if bos else []
        for part, special in self.cut_special(text):
            if special:
                ids.append(self.special[part])
            else:
                for piece in self.split(part):
                    ids += self.bpe(piece)
        return ids + ([self.eos_id] if eos else [])

    def cut_special(self, text: str) -> list:
        """[(part, is it a special token)], the special tokens found longest first at each place."""
        if not self.special:
            return [(text, False)]
        parts, start, i = [], 0, 0
        while i < len(text):
            found = None
            if text[i] in self.special_starts:
                found = next((s for s in self.special_longest_first if text.startswith(s, i)), None)
            if found is None:
                i += 1
                continue
            if i > start:
                parts.append((text[start:i], False))
            parts.append((found, True))
            i = start = i + len(found)
        return parts + ([(text[start:], False)] if start < len(text) else [])

    def decode(self, ids) -> str:
        out = bytearray()
        for i in ids:
            token = self.tokens[int(i)]
            if token is None:  # an id the vocabulary leaves unused
                continue
            if token in self.special:
                out += token.encode("utf-8")
            else:
                out += bytes(SYMBOL_BYTE[c] for c in token if c in SYMBOL_BYTE)
        return out.decode("utf-8", errors="replace")

    def hugging_face_files(self) -> dict:
        """{file name: JSON content}: tokenizer.json and tokenizer_config.json for this tokenizer, which
        from_tokenizer_json (and Hugging Face's library) read back to the same ids."""
        vocab = {token: i for i, token in enumerate(self.tokens) if token is not None}  # the special ones too
        added = [dict(id=i, content=token, single_word=False, lstrip=False, rstrip=False, normalized=False,
                      special=True) for token, i in sorted(self.special.items(), key=lambda item: item[1])]
        byte_level = dict(type="ByteLevel", add_prefix_space=False, trim_offsets=True, use_regex=True)
        pre = {"gpt2": byte_level,
               "smollm": dict(type="Sequence", pretokenizers=[dict(type="Digits", individual_digits=True), byte_level]),
               "llama3": dict(type="Sequence", pretokenizers=[
                   dict(type="Split", pattern=dict(Regex=LLAMA3_PATTERN), behavior="Isolated", invert=False),
                   dict(byte_level, use_regex=False)])}[self.pre]
        merges = [" ".join(pair) for pair, _ in sorted(self.ranks.items(), key=lambda item: item[1])]
        tokenizer = dict(version="1.0", truncation=None, padding=None, added_tokens=added, normalizer=None,
                         pre_tokenizer=pre, post_processor=None, decoder=dict(byte_level, add_prefix_space=True),
                         model=dict(type="BPE", dropout=None, unk_token=None, continuing_subword_prefix=None,
                                    end_of_word_suffix=None, fuse_unk=False, byte_fallback=False,
                                    ignore_merges=self.ignore_merges, vocab=vocab, merges=merges))
        config = dict(tokenizer_class="PreTrainedTokenizerFast", bos_token=self.tokens[self.bos_id],
                      eos_token=self.tokens[self.eos_id], **({"chat_template": self.chat_template}
                                                             if self.chat_template else {}))
        return {"tokenizer.json": tokenizer, "tokenizer_config.json": config}

    # Readers

    @classmethod
    def from_gguf(cls, metadata: dict, path):
        if metadata.get("tokenizer.ggml.model") != "gpt2":
            raise ValueError(f"{path}: tokenizer.ggml.model is {metadata.get('tokenizer.ggml.model')!r}; only "
                             f"byte-level BPE ('gpt2') is read from GGUF: pass --tokenizer the model's own "
                             f"tokenizer.model (SentencePiece) or tokenizer.json")
        pre = metadata.get("tokenizer.ggml.pre", "gpt-2")
        if pre not in GGUF_PRE:
            raise ValueError(f"{path}: tokenizer.ggml.pre is {pre!r}; {', '.join(sorted(GGUF_PRE))} are read")
        tokens, types = metadata["tokenizer.ggml.tokens"], metadata.get("tokenizer.ggml.token_type", [])
        special = {t: i for i, (t, kind) in enumerate(zip(tokens, types)) if kind in (3, 4)}  # control, user-defined
        merges = [merge.split(" ", 1) for merge in metadata.get("tokenizer.ggml.merges", [])]
        return cls(tokens, merges, GGUF_PRE[pre], special, metadata["tokenizer.ggml.bos_token_id"],
                   metadata["tokenizer.ggml.eos_token_id"], path, metadata.get("tokenizer.chat_template", ""),
                   ignore_merges=GGUF_PRE[pre] == "llama3")  # (as llama.cpp does for Llama 3's vocabulary)

    @classmethod
    def from_tokenizer_json(cls, path):
        path = Path(path)
        try:
            spec = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
            raise ValueError(f"{path}: cannot read it as JSON ({error})") from None
        model = spec.get("model") or {}
        if model.get("type") != "BPE":
            raise ValueError(f"{path}: its model is {model.get('type')!r}; only byte-level BPE is read")
        if spec.get("normalizer"):
            raise ValueError(f"{path}: a normalizer ({spec['normalizer'].get('type')}) is not implemented")
        pre = pre_tokenizer_of(spec.get("pre_tokenizer"), path)
        size = max([*model["vocab"].values(), *(t["id"] for t in spec.get("added_tokens", []))]) + 1
        tokens = [None] * size
        for token, i in model["vocab"].items():
            tokens[i] = token
        special = {}
        for added in spec.get("added_tokens", []):
            tokens[added["id"]] = added["content"]
            special[added["content"]] = added["id"]
        merges = [m.split(" ", 1) if isinstance(m, str) else m for m in model.get("merges", [])]
        config = path.with_name("tokenizer_config.json")
        names = json.loads(config.read_text()) if config.is_file() else {}

        def id_of(key, guesses):
            name = names.get(key)
            name = name.get("content") if isinstance(name, dict) else name
            for candidate in ([name] if name else []) + guesses:
                if candidate in special or candidate in model["vocab"]:
                    return special.get(candidate, model["vocab"].get(candidate))
            raise ValueError(f"{path}: no {key} among its tokens ({name or ', '.join(guesses)}): put the "
                             f"tokenizer_config.json of the checkpoint beside it")
        return cls(tokens, merges, pre, special, id_of("bos_token", ["<|begin_of_text|>", "<s>", "<|endoftext|>"]),
                   id_of("eos_token", ["<|end_of_text|>", "</s>", "<|endoftext|>"]), path,
                   names.get("chat_template", "") if isinstance(names.get("chat_template", ""), str) else "",
                   ignore_merges=bool(model.get("ignore_merges")))


def pre_tokenizer_of(spec, path) -> str:
    """Which of the implemented pre-tokenizers a tokenizer.json's pre_tokenizer is; refused otherwise."""
    steps = spec.get("pretokenizers", []) if spec and spec.get("type") == "Sequence" else [spec] if spec else []
    kinds = [step.get("type") for step in steps]
    if kinds == ["ByteLevel"] and steps[0].get("use_regex", True):
        return "gpt2"
    if kinds == ["Digits", "ByteLevel"] and steps[0].get("individual_digits") and steps[1].get("use_regex", True):
        return "smollm"
    if kinds == ["Split", "ByteLevel"] and steps[0].get("pattern", {}).get("Regex") == LLAMA3_PATTERN and \
            not steps[1].get("use_regex", True):
        return "llama3"
    raise ValueError(f"{path}: the pre-tokenizer {json.dumps(spec)[:200]} is not one of those implemented (GPT-2's "
                     f"byte level, SmolLM's digits then byte level, Llama 3's split): see bpe.py")
