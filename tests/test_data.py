"""Tokenizer and data: LLaMA's SentencePiece settings, every file format, prompt masking, truncation,
packing, the resumable sampler, and bad input named by file and line."""
import json

import numpy as np
import pytest
import sentencepiece as spm
import torch

from data import (ShuffledSampler, Tokenizer, cached_tokenizer, check_token_ids, collate, pack, read_corpus,
                  split_train_val, train_tokenizer)
from model import IGNORE_INDEX
from tasks import WORD_ORDER_PROMPT, alpaca_prompt, load_dataset, word_order_task

TEXT = "\n".join(f"Line {i}: the quick brown fox jumps over the lazy dog {i * 37}, café." for i in range(360))


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    path = tmp_path_factory.mktemp("corpus") / "corpus.txt"
    path.write_text(TEXT, encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def tokenizer(corpus, tmp_path_factory):
    return cached_tokenizer(corpus, 360, tmp_path_factory.mktemp("cache"))


def write_jsonl(path, rows):
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return path


# ----------------------------------------------------------------------------------------------------
# Tokenizer


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


def test_non_sentencepiece_files_are_refused(tmp_path):
    lfs_pointer = tmp_path / "tokenizer.model"
    lfs_pointer.write_text("version https://git-lfs.github.com/spec/v1\noid sha256:abc\nsize 499723\n")
    with pytest.raises(ValueError, match="is a git-lfs pointer, not the tokenizer: fetch the file"):
        Tokenizer(lfs_pointer)
    (tmp_path / "tiktoken.model").write_text("IQ== 0\nIg== 1\n")
    with pytest.raises(ValueError, match="is not a SentencePiece model"):
        Tokenizer(tmp_path / "tiktoken.model")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        Tokenizer(tmp_path / "nope.model")
    (tmp_path / "folder").mkdir()
    with pytest.raises(FileNotFoundError, match="is a folder without a tokenizer.model"):
        Tokenizer(tmp_path / "folder")


def test_a_tokenizer_without_bos_is_refused_and_a_folder_holding_one_is_read(tmp_path):
    text = TEXT
    spm.SentencePieceTrainer.Train(sentence_iterator=iter(text.splitlines()), model_prefix=str(tmp_path / "nobos"),
                                   vocab_size=360, bos_id=-1)
    with pytest.raises(ValueError, match="nobos.model has no BOS piece"):
        Tokenizer(tmp_path / "nobos.model")
    (tmp_path / "folder").mkdir()
    train_tokenizer(text, 360, tmp_path / "folder" / "tokenizer.model")
    assert Tokenizer(tmp_path / "folder").path == tmp_path / "folder" / "tokenizer.model"


def test_a_binary_corpus_is_refused_as_not_text(tmp_path):
    (tmp_path / "zeros.txt").write_bytes(b"\x00" * 4096)
    with pytest.raises(ValueError, match=r"zeros.txt holds NUL bytes \(4096 of them\): it is a binary file"):
        read_corpus(tmp_path / "zeros.txt")


# ----------------------------------------------------------------------------------------------------
# Formats


def test_text_is_packed_into_windows_where_every_token_is_a_target_once(corpus, tokenizer, tmp_path):
    sequences = load_dataset(corpus, "auto", tokenizer, seq_len=16)
    stream = tokenizer.encode(TEXT, bos=True, eos=True)
    assert sequences.packed and all(len(ids) == 17 and ids == labels for ids, labels in sequences.items)
    targets = [t for ids, _ in sequences.items for t in ids[1:]]
    assert targets == stream[1:1 + len(targets)] and len(stream) - 1 - len(targets) < 16
    # jsonl with a "text" field: each document wrapped in BOS ... EOS, then packed the same way
    docs = write_jsonl(tmp_path / "docs.jsonl", [{"text": "the fox"}, {"text": "the dog"}])
    items = load_dataset(docs, "auto", tokenizer, seq_len=4).items
    assert [t for ids, _ in items for t in ids[1:]] == (tokenizer.encode("the fox", eos=True) +
                                                         tokenizer.encode("the dog", eos=True))[1:1 + 4 * len(items)]


def test_pretokenized_ids_from_npy_and_jsonl(tmp_path, tokenizer):
    np.save(tmp_path / "ids.npy", np.arange(50, dtype=np.uint16))
    items = load_dataset(tmp_path / "ids.npy", "auto", tokenizer, seq_len=9).items
    assert items[0][0] == list(range(10)) and items[1][0] == list(range(9, 19))
    rows = write_jsonl(tmp_path / "ids.jsonl", [{"input_ids": [1, 5, 6]}, {"input_ids": list(range(30))}])
    sequences = load_dataset(rows, "auto", tokenizer, seq_len=9, long="drop")
    assert sequences.items == [([1, 5, 6], [1, 5, 6])] and sequences.dropped == 1


def test_alpaca_json_and_jsonl_mask_the_prompt(tmp_path, tokenizer):
    rows = [{"instruction": "Name a dog.", "input": "", "output": "Rex"},
            {"instruction": "Add.", "input": "2 and 3", "output": "5"}]
    (tmp_path / "alpaca.json").write_text(json.dumps(rows))
    for path in (tmp_path / "alpaca.json", write_jsonl(tmp_path / "alpaca.jsonl", rows)):
        sequences = load_dataset(path, "auto", tokenizer, seq_len=200)
        for (ids, labels), row in zip(sequences.items, rows):
            prompt = tokenizer.encode(alpaca_prompt(row["instruction"], row["input"]), bos=True)
            answer = tokenizer.encode(row["output"], bos=False, eos=True)
            assert ids == prompt + answer
            assert labels == [IGNORE_INDEX] * len(prompt) + answer  # loss on the answer only
    assert "### Input:\n2 and 3" in alpaca_prompt("Add.", "2 and 3") and "### Input" not in alpaca_prompt("x")
    unmasked = load_dataset(tmp_path / "alpaca.json", "auto", tokenizer, seq_len=200, train_on_prompt=True)
    assert all(ids == labels for ids, labels in unmasked.items)


def test_masked_loss_is_the_mean_over_answer_tokens(tmp_path, tokenizer):
    from conftest import tiny_model
    from model import cross_entropy_loss, token_losses
    rows = write_jsonl(tmp_path / "qa.jsonl", [{"instruction": "Say hello.", "output": "hello there"}])
    inputs, targets = collate(load_dataset(rows, "auto", tokenizer, seq_len=200).items)
    model = tiny_model(vocab_size=tokenizer.vocab_size, max_seq_len=256)
    logits = model(inputs).detach()
    answer = targets != IGNORE_INDEX
    n_answer = len(tokenizer.encode("hello there", bos=False, eos=True))
    assert int(answer.sum()) == n_answer and not answer[0, :-n_answer].any()
    by_hand = -torch.log_softmax(logits.float(), -1)[0, -n_answer:].gather(-1, targets[0, -n_answer:, None]).mean()
    torch.testing.assert_close(cross_entropy_loss(logits, targets), by_hand)
    assert float(token_losses(logits, targets)[0, :-n_answer].abs().sum()) == 0.0


def test_long_examples_are_truncated_keeping_the_answer_or_dropped(tmp_path, tokenizer):
    long_prompt = "the quick brown fox " * 40
    rows = write_jsonl(tmp_path / "long.jsonl", [{"prompt": long_prompt, "choices": ["yes", "no"], "label": 0},
                                                 {"prompt": "short", "choices": ["yes", "no"], "label": 1}])
    truncated = load_dataset(rows, "auto", tokenizer, seq_len=31)
    assert truncated.truncated == 1 and truncated.dropped == 0 and len(truncated.items[0][0]) == 32
    answer = tokenizer.encode("yes", bos=False, eos=True)
    ids, labels = truncated.items[0]
    assert ids[0] == tokenizer.bos_id and ids[-len(answer):] == answer and labels[-len(answer):] == answer
    dropped = load_dataset(rows, "auto", tokenizer, seq_len=31, long="drop")
    assert dropped.dropped == 1 and len(dropped.items) == 1 and dropped.choices[0].prompt == "short"


SUPERGLUE_ROWS = {
    "boolq": ({"passage": "Dogs bark.", "question": "do dogs bark", "idx": 0, "label": True},
              "Dogs bark.\nQuestion: do dogs bark?\nAnswer:", ["no", "yes"], 1),
    "cb": ({"premise": "It rained.", "hypothesis": "It was dry", "label": "contradiction"},
           "It rained.\nQuestion: It was dry. True, False, or Neither?\nAnswer:", ["True", "False", "Neither"], 1),
    "copa": ({"premise": "The man fell.", "choice1": "He tripped.", "choice2": "He sang.", "question": "cause",
              "label": 0}, "The man fell because", ["he tripped.", "he sang."], 0),
    "rte": ({"premise": "A cat sat.", "hypothesis": "A cat sat.", "label": "entailment"},
            "A cat sat.\nQuestion: A cat sat. True or False?\nAnswer:", ["True", "False"], 0),
    "wic": ({"word": "bank", "sentence1": "The river bank.", "sentence2": "The bank lent money.", "label": False},
            "Sentence 1: The river bank.\nSentence 2: The bank lent money.\nQuestion: Is the word 'bank' used in "
            "the same way in the two sentences above?\nAnswer:", ["no", "yes"], 0),
    "wsc": ({"text": "Tom said he was tired.", "target": {"span1_text": "Tom", "span2_text": "he"}, "label": True},
            "Passage: Tom said he was tired.\nQuestion: In the passage above, does the pronoun \"he\" refer to "
            "\"Tom\"?\nAnswer:", ["no", "yes"], 1),
}


@pytest.mark.parametrize("task", sorted(SUPERGLUE_ROWS))
def test_superglue_files_become_documented_prompts(tmp_path, tokenizer, task):
    row, prompt, choices, label = SUPERGLUE_ROWS[task]
    sequences = load_dataset(write_jsonl(tmp_path / f"{task}.jsonl", [row]), task, tokenizer, seq_len=200)
    (example,) = sequences.choices
    assert (example.prompt, example.choices, example.label) == (prompt, choices, label)
    assert sequences.items[0][0] == tokenizer.encode(prompt) + tokenizer.encode(choices[label], bos=False, eos=True)


def test_multirc_and_record_expand_nested_rows(tmp_path, tokenizer):
    multirc = {"idx": 0, "passage": {"text": "Ann has a cat.", "questions": [
        {"question": "What does Ann have?",
         "answers": [{"text": "a cat", "label": 1}, {"text": "a dog", "label": 0}]}]}}
    examples = load_dataset(write_jsonl(tmp_path / "m.jsonl", [multirc]), "multirc", tokenizer, 200).choices
    assert [e.label for e in examples] == [1, 0] and "Candidate answer: a dog" in examples[1].prompt
    text = "Ann met Bob.\n@highlight\nBob left"
    record = {"passage": {"text": text, "entities": [{"start": 0, "end": 2}, {"start": 8, "end": 10}]},
              "qas": [{"query": "@placeholder waved.", "answers": [{"text": "Bob"}]}]}
    (example,) = load_dataset(write_jsonl(tmp_path / "r.jsonl", [record]), "record", tokenizer, 200).choices
    assert example.choices == ["Ann waved.", "Bob waved."] and example.label == 1 and "- Bob left" in example.prompt


def test_malformed_files_name_the_file_and_line(tmp_path, tokenizer):
    bad_json = tmp_path / "bad.jsonl"
    bad_json.write_text('{"text": "fine"}\n{"text": oops}\n')
    with pytest.raises(ValueError, match=r"bad.jsonl:2: not valid JSON"):
        load_dataset(bad_json, "auto", tokenizer, 16)
    missing = write_jsonl(tmp_path / "missing.jsonl", [{"instruction": "a", "output": "b"}, {"instruction": "c"}])
    with pytest.raises(ValueError, match=r"missing.jsonl:2: missing field 'output'"):
        load_dataset(missing, "alpaca", tokenizer, 16)
    no_label = write_jsonl(tmp_path / "test.jsonl", [{"passage": "p", "question": "q", "idx": 0}])
    with pytest.raises(ValueError, match=r"test.jsonl:1: missing field 'label'"):
        load_dataset(no_label, "boolq", tokenizer, 16)
    bad_label = write_jsonl(tmp_path / "cb.jsonl", [{"premise": "p", "hypothesis": "h", "label": "maybe"}])
    with pytest.raises(ValueError, match=r"cb.jsonl:1: label 'maybe' is not one of"):
        load_dataset(bad_label, "cb", tokenizer, 16)
    float_label = write_jsonl(tmp_path / "mc.jsonl", [{"prompt": "p", "choices": ["a", "b"], "label": 1.0}])
    with pytest.raises(ValueError, match=r"mc.jsonl:1: field 'label' should be bool or int or str, got float"):
        load_dataset(float_label, "auto", tokenizer, 16)
    empty_json = tmp_path / "empty.json"
    empty_json.write_text("[]")
    with pytest.raises(ValueError, match=r"empty.json holds no examples"):
        load_dataset(empty_json, "alpaca", tokenizer, 16)
    for ids in ([], [1, -3], [1, 2.5]):
        bad_ids = write_jsonl(tmp_path / "ids.jsonl", [{"input_ids": [1, 2, 3]}, {"input_ids": ids}])
        with pytest.raises(ValueError, match=r"ids.jsonl:2: input_ids must be a list of at least 2 token ids"):
            load_dataset(bad_ids, "auto", tokenizer, 16)
    not_object = tmp_path / "list.jsonl"
    not_object.write_text("[1, 2]\n")
    with pytest.raises(ValueError, match=r"list.jsonl:1: expected a JSON object"):
        load_dataset(not_object, "auto", tokenizer, 16)
    unknown = write_jsonl(tmp_path / "odd.jsonl", [{"question": "q"}])
    with pytest.raises(ValueError, match=r"cannot tell the format of .*odd.jsonl from its fields \['question'\]"):
        load_dataset(unknown, "auto", tokenizer, 16)


def test_bad_data_is_refused(tmp_path, corpus, tokenizer):
    with pytest.raises(FileNotFoundError, match="corpus .*missing.txt does not exist"):
        read_corpus(tmp_path / "missing.txt")
    empty = tmp_path / "empty.txt"
    empty.write_text("  \n")
    with pytest.raises(ValueError, match="is empty"):
        read_corpus(empty)
    with pytest.raises(ValueError, match="token id 360, outside the model's vocabulary \\[0, 360\\)"):
        check_token_ids(torch.tensor([5, 360]), 360, "the batch")
    with pytest.raises(ValueError, match="vocab_size=100000"):
        train_tokenizer(TEXT, 100_000, tmp_path / "big.model")
    with pytest.raises(ValueError, match="too few to split off a validation set"):
        split_train_val(load_dataset(corpus, "auto", tokenizer, seq_len=100_000), 0.1)


# ----------------------------------------------------------------------------------------------------
# Sampling, batching, splitting


def test_sampler_covers_each_epoch_and_resumes_at_the_exact_example():
    sampler = ShuffledSampler(10, seed=3)
    first_epoch = sampler.next(10)
    assert sorted(first_epoch) == list(range(10))
    assert sorted(sampler.next(10)) == list(range(10)) and sampler.position == 20
    sampler.next(7)
    state = sampler.state_dict()
    continued = sampler.next(9)  # crosses into the next epoch
    resumed = ShuffledSampler(10, seed=3)
    resumed.load_state_dict(state)
    assert resumed.next(9) == continued
    assert ShuffledSampler(10, seed=4).next(10) != first_epoch
    with pytest.raises(ValueError, match="resume with the same data"):
        ShuffledSampler(11, seed=3).load_state_dict(state)


def test_collate_pads_right_with_ignored_labels():
    inputs, targets = collate([([1, 5, 6, 7], [IGNORE_INDEX, IGNORE_INDEX, 6, 7]), ([1, 9], [1, 9])])
    assert inputs.tolist() == [[1, 5, 6], [1, 9, 0]]
    assert targets.tolist() == [[IGNORE_INDEX, 6, 7], [9, IGNORE_INDEX, IGNORE_INDEX]]


def test_collate_pads_to_a_fixed_length_and_refuses_a_longer_sequence():
    items = [([1, 5, 6, 7], [IGNORE_INDEX, IGNORE_INDEX, 6, 7]), ([1, 9], [1, 9])]
    inputs, targets = collate(items, length=6)  # (train.py --cuda-graph: every batch the captured shape)
    assert inputs.tolist() == [[1, 5, 6, 7, 0], [1, 9, 0, 0, 0]]
    no = IGNORE_INDEX
    assert targets.tolist() == [[no, 6, 7, no, no], [9, no, no, no, no]]
    with pytest.raises(ValueError, match="a sequence of 4 tokens does not fit the fixed length 3"):
        collate(items, length=3)


def test_packed_validation_is_the_contiguous_tail_and_examples_are_shuffled(corpus, tokenizer, tmp_path):
    packed = load_dataset(corpus, "auto", tokenizer, seq_len=16)
    train, val = split_train_val(packed, 0.1)
    assert train.items + val.items == packed.items
    rows = write_jsonl(tmp_path / "mc.jsonl", [{"prompt": f"q{i}", "choices": ["a", "b"], "label": i % 2}
                                               for i in range(20)])
    examples = load_dataset(rows, "auto", tokenizer, 32)
    train, val = split_train_val(examples, 0.25)
    assert len(val.items) == 5 and [c.prompt for c in val.choices] != [f"q{i}" for i in range(15, 20)]
    assert sorted(c.prompt for c in train.choices + val.choices) == sorted(f"q{i}" for i in range(20))


def test_word_order_task_holds_out_the_end_of_the_book():
    text = " ".join(f"Sentence number {i} has quite a few words in it." for i in range(100))
    train, validation = word_order_task(text, seed=0)
    assert len(train) == 85 and len(validation) == 15
    for example in train + validation:
        real = example.choices[example.label]
        assert example.prompt == WORD_ORDER_PROMPT and len(set(example.choices)) == 4
        assert all(sorted(c.split()) == sorted(real.split()) for c in example.choices)
    assert validation[-1].choices[validation[-1].label] == "Sentence number 99 has quite a few words in it."
    assert pack(list(range(7)), 3) == [([0, 1, 2, 3], [0, 1, 2, 3]), ([3, 4, 5, 6], [3, 4, 5, 6])]


def test_chat_data_trains_on_the_assistant_turns_only(tmp_path):
    from bpe import BYTE_SYMBOL, ByteLevelBPE
    from model import IGNORE_INDEX
    from tasks import load_dataset
    tokens = list(BYTE_SYMBOL) + ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    tokenizer = ByteLevelBPE(tokens, [], "gpt2", {t: 256 + i for i, t in enumerate(tokens[256:])}, 257, 258)
    path = tmp_path / "chat.jsonl"
    path.write_text(json.dumps({"messages": [{"role": "user", "content": "Hi"},
                                             {"role": "assistant", "content": "Yo"}]}) + "\n")
    (ids, labels), = load_dataset(path, "auto", tokenizer, seq_len=64).items
    expected = [257, *b"user\n", *b"Hi", 258, 10, 257, *b"assistant\n", *b"Yo", 258, 10]  # bytes are their ids here
    assert ids == expected
    trained = [i for i, label in zip(ids, labels) if label != IGNORE_INDEX]
    assert trained == [*b"Yo", 258]  # the answer and its end marker; not the headers, not the user's turn
    assert tokenizer.decode(ids) == "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\nYo<|im_end|>\n"
    path.write_text(json.dumps({"messages": [{"role": "user", "content": "Hi"}]}) + "\n")
    with pytest.raises(ValueError, match="chat.jsonl:1: no assistant turn"):
        load_dataset(path, "auto", tokenizer, seq_len=64)
    path.write_text(json.dumps({"messages": [{"role": "robot", "content": "Hi"}]}) + "\n")
    with pytest.raises(ValueError, match="chat.jsonl:1: each message is"):
        load_dataset(path, "auto", tokenizer, seq_len=64)
    plain = ByteLevelBPE(tokens[:257], [], "gpt2", {"<|endoftext|>": 256}, 256, 256)
    with pytest.raises(ValueError, match="the tokenizer has no chat markers"):
        load_dataset(path, "chat", plain, seq_len=64)
