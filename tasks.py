"""Prompt templates: instruction data, SuperGLUE as multiple choice, and a word-order task made from the
bundled corpus for the CPU demonstration.

SuperGLUE tasks are scored as the paper scores them: each candidate answer is appended to the prompt
and the candidate with the lowest loss wins (evaluate.py). The templates follow lm-evaluation-harness's
(`tasks/super_glue`), so numbers are comparable with what users know; each answer is encoded on its own
and SentencePiece's dummy prefix supplies the space after "Answer:". The fields are those of the
official jsonl files (BoolQ: passage/question/label, COPA: premise/choice1/choice2/question/label, ...);
test files without labels are refused.

Addition (`python tasks.py addition OUT_DIR`): "What is a + b?" for two-digit numbers, the sum among three near
misses; the real-model demonstration's task (demo_smollm2.sh).

Word order (`python tasks.py word-order OUT_DIR`): each sentence of the book becomes a 4-way choice
between the sentence and three shufflings of its words; a model that has learned English word order
gives the real sentence the lowest loss. Chance is 25%. Train on the first 85% of the book's sentences,
evaluate on the last 15% (held out: never trained on, not even as text).

`load_dataset` reads a data file in any of the formats (data.py's docstring lists them) into data.py's
Sequences: it sits here, above data.py, because the instruction and SuperGLUE formats need the templates.
"""
import argparse
import json
import random
import re
from pathlib import Path

import numpy as np

import cli
from data import (MultipleChoice, Sequences, field_of, pack, prompt_answer_sequences, read_corpus,
                  read_jsonl)
from model import IGNORE_INDEX


def alpaca_prompt(instruction: str, input_text: str = "") -> str:
    """Stanford Alpaca's two templates (with and without an input)."""
    if input_text:
        return ("Below is an instruction that describes a task, paired with an input that provides further "
                "context. Write a response that appropriately completes the request.\n\n"
                f"### Instruction:\n{instruction}\n\n### Input:\n{input_text}\n\n### Response:\n")
    return ("Below is an instruction that describes a task. Write a response that appropriately completes the "
            f"request.\n\n### Instruction:\n{instruction}\n\n### Response:\n")


def label_index(row, path, mapping=None):
    """The gold answer's index: a bool, an int, or a string through `mapping`."""
    label = field_of(row, "label", path, (bool, int, str))
    if mapping is not None and isinstance(label, str):
        if label not in mapping:
            raise ValueError(f"{path}:{row.get('_line', '?')}: label {label!r} is not one of {sorted(mapping)}")
        return mapping[label]
    if isinstance(label, str) and not label.strip().lstrip("-").isdigit():
        raise ValueError(f"{path}:{row.get('_line', '?')}: label {label!r} is not an index: give the number of the "
                         f"right choice, counted from 0")
    return int(label)


def boolq(row, path):
    prompt = f"{field_of(row, 'passage', path)}\nQuestion: {field_of(row, 'question', path)}?\nAnswer:"
    return [MultipleChoice(prompt, ["no", "yes"], label_index(row, path))]


def cb(row, path):
    prompt = (f"{field_of(row, 'premise', path)}\nQuestion: {field_of(row, 'hypothesis', path)}. "
              f"True, False, or Neither?\nAnswer:")
    return [MultipleChoice(prompt, ["True", "False", "Neither"],
                           label_index(row, path, {"entailment": 0, "contradiction": 1, "neutral": 2}))]


def copa(row, path):
    connector = {"cause": "because", "effect": "therefore"}.get(field_of(row, "question", path))
    if connector is None:
        raise ValueError(f"{path}:{row.get('_line', '?')}: COPA question must be 'cause' or 'effect'")
    prompt = field_of(row, "premise", path).rstrip(".") + " " + connector
    choices = [(lambda c: c[:1].lower() + c[1:])(field_of(row, name, path)) for name in ("choice1", "choice2")]
    return [MultipleChoice(prompt, choices, label_index(row, path))]


def multirc(row, path):
    passage = field_of(row, "passage", path, dict)
    examples = []
    for question in passage["questions"]:
        for answer in question["answers"]:
            prompt = (f"{passage['text']}\nQuestion: {question['question']}\nCandidate answer: {answer['text']}\n"
                      f"Is the candidate answer correct?\nAnswer:")
            examples.append(MultipleChoice(prompt, ["no", "yes"], label_index(answer, path)))
    return examples


def rte(row, path):
    prompt = f"{field_of(row, 'premise', path)}\nQuestion: {field_of(row, 'hypothesis', path)} True or False?\nAnswer:"
    return [MultipleChoice(prompt, ["True", "False"], label_index(row, path, {"entailment": 0, "not_entailment": 1}))]


def wic(row, path):
    prompt = (f"Sentence 1: {field_of(row, 'sentence1', path)}\nSentence 2: {field_of(row, 'sentence2', path)}\n"
              f"Question: Is the word '{field_of(row, 'word', path)}' used in the same way in the two sentences "
              f"above?\nAnswer:")
    return [MultipleChoice(prompt, ["no", "yes"], label_index(row, path))]


def wsc(row, path):
    target = field_of(row, "target", path, dict)
    prompt = (f"Passage: {field_of(row, 'text', path)}\nQuestion: In the passage above, does the pronoun "
              f"\"{target['span2_text']}\" refer to \"{target['span1_text']}\"?\nAnswer:")
    return [MultipleChoice(prompt, ["no", "yes"], label_index(row, path))]


def record(row, path):
    passage = field_of(row, "passage", path, dict)
    text = passage["text"]
    # Entity spans are inclusive at both ends in the official files.
    entities = list(dict.fromkeys(text[e["start"]:e["end"] + 1] for e in passage["entities"]))
    examples = []
    for qa in field_of(row, "qas", path, list):
        answers = {a["text"] for a in qa.get("answers", [])}
        gold = [i for i, entity in enumerate(entities) if entity in answers]
        if not gold:
            raise ValueError(f"{path}:{row.get('_line', '?')}: no answer among the passage's entities (test split?)")
        prompt = text.replace("@highlight\n", "- ") + "\n"
        # Several entities can be correct (surface forms of one answer): any of them counts, as in lm-eval.
        examples.append(MultipleChoice(prompt, [qa["query"].replace("@placeholder", e) for e in entities], gold[0],
                                       tuple(gold)))
    return examples


def generic_mc(row, path):
    choices = field_of(row, "choices", path, list)
    return [MultipleChoice(field_of(row, "prompt", path), choices, label_index(row, path))]


SUPERGLUE_TASKS = {"boolq": boolq, "cb": cb, "copa": copa, "multirc": multirc, "rte": rte, "wic": wic,
                   "wsc": wsc, "record": record}


def superglue_examples(task: str, rows: list, path) -> list:
    """MultipleChoice examples from the rows of a SuperGLUE task file (or our generic "mc" jsonl)."""
    build = generic_mc if task == "mc" else SUPERGLUE_TASKS[task]
    examples = []
    for row in rows:
        for example in build(row, path):
            if not 0 <= example.label < len(example.choices):
                raise ValueError(f"{path}:{row.get('_line', '?')}: label {example.label} is outside the "
                                 f"{len(example.choices)} choices")
            examples.append(example)
    return examples


# ----------------------------------------------------------------------------------------------------
# The word-order task, made from the bundled corpus


WORD_ORDER_PROMPT = "A sentence from the book:"


def word_order_task(text: str, n_choices: int = 4, seed: int = 0, val_fraction: float = 0.15,
                    min_words: int = 6, max_words: int = 16):
    """(train, validation) lists of MultipleChoice: the real sentence among shufflings of its words."""
    sentences = [s.strip() for s in re.split(r"(?<=[.!?])\s+", " ".join(text.split()))]
    sentences = [s for s in sentences if min_words <= len(s.split()) <= max_words]
    rng = random.Random(seed)
    examples = []
    for sentence in sentences:
        words = sentence.split()
        candidates = {sentence}
        for _ in range(50):  # a few tries to find distinct shufflings (short sentences have few)
            if len(candidates) == n_choices:
                break
            shuffled = words[:]
            rng.shuffle(shuffled)
            candidates.add(" ".join(shuffled))
        if len(candidates) < n_choices:
            continue
        choices = sorted(candidates - {sentence})
        choices.insert(rng.randrange(n_choices), sentence)
        examples.append(MultipleChoice(WORD_ORDER_PROMPT, choices, choices.index(sentence)))
    n_train = int(len(examples) * (1 - val_fraction))
    return examples[:n_train], examples[n_train:]


def addition_task(seed: int = 0, n_train: int = 2000, n_validation: int = 200):
    """(train, validation) lists of MultipleChoice: "What is a + b?" for two-digit a and b, the sum against three
    near misses (off by 1, 2, 9, 10 or 11: the digits a model gets wrong). The held-out pairs are never trained on.
    A pretrained small model is near chance (SmolLM2-135M: 0.275); the answer is a skill, not a fact of the text."""
    rng = random.Random(seed)
    pairs = [(a, b) for a in range(10, 100) for b in range(10, 100)]
    rng.shuffle(pairs)
    examples = []
    for a, b in pairs[:n_validation + n_train]:
        total, wrong = a + b, []
        for miss in rng.sample([1, -1, 2, -2, 9, -9, 10, -10, 11, -11], 10):
            if len(wrong) < 3:
                wrong.append(str(total + miss))
        label = rng.randrange(4)
        examples.append(MultipleChoice(f"Question: What is {a} + {b}?\nAnswer: ", wrong[:label] + [str(total)] +
                                       wrong[label:], label))
    return examples[n_validation:], examples[:n_validation]


def write_mc_jsonl(examples, path: Path):
    with open(path, "w") as f:
        for e in examples:
            f.write(json.dumps(dict(prompt=e.prompt, choices=e.choices, label=e.label)) + "\n")


# ----------------------------------------------------------------------------------------------------
# Data files in every format, as Sequences


# Chat data: {"messages": [{"role": "system" | "user" | "assistant", "content": "..."}, ...]} per line, laid out
# with the markers of the checkpoint's own chat format, found among its tokenizer's special tokens: ChatML
# (SmolLM2, Qwen: <|im_start|>role\n ... <|im_end|>\n) or Llama 3's (<|start_header_id|>role<|end_header_id|>\n\n
# ... <|eot_id|>). The loss is on each assistant turn and its end marker, so the model learns to stop; the headers
# and the other turns are context. The template's Jinja text is not rendered: a default system prompt it would
# add is not added.
CHAT_FORMATS = {"chatml": ("<|im_start|>{role}\n", "<|im_end|>", "\n"),
                "llama3": ("<|start_header_id|>{role}<|end_header_id|>\n\n", "<|eot_id|>", "")}


def chat_format(tokenizer, path) -> str:
    special = getattr(tokenizer, "special", {})
    if "<|im_start|>" in special and "<|im_end|>" in special:
        return "chatml"
    if "<|start_header_id|>" in special and "<|eot_id|>" in special:
        return "llama3"
    raise ValueError(f"{path} is chat data (messages), but the tokenizer has no chat markers (ChatML's "
                     f"<|im_start|>/<|im_end|> or Llama 3's <|start_header_id|>/<|eot_id|>): train a chat "
                     f"checkpoint, or write the data as Alpaca instruction/output pairs")


def chat_sequences(rows, path, tokenizer, seq_len: int, train_on_prompt: bool, long: str) -> Sequences:
    layout = chat_format(tokenizer, path)
    header, end, after = CHAT_FORMATS[layout]
    result = Sequences(items=[])
    for row in rows:
        messages = field_of(row, "messages", path, list)
        ids = [tokenizer.bos_id] if layout == "llama3" else []  # Llama 3 begins with <|begin_of_text|>
        labels = [IGNORE_INDEX] * len(ids)
        for message in messages:
            role, content = (message.get(k) if isinstance(message, dict) else None for k in ("role", "content"))
            if role not in ("system", "user", "assistant") or not isinstance(content, str):
                raise ValueError(f"{path}:{row['_line']}: each message is {{\"role\": system, user or assistant, "
                                 f"\"content\": text}}; got {json.dumps(message)[:80]}")
            context = tokenizer.encode(header.format(role=role), bos=False)
            turn = tokenizer.encode(content + end, bos=False)
            tail = tokenizer.encode(after, bos=False) if after else []
            trained = role == "assistant" or train_on_prompt
            ids += context + turn + tail
            labels += (context if train_on_prompt else [IGNORE_INDEX] * len(context)) + \
                (turn if trained else [IGNORE_INDEX] * len(turn)) + [IGNORE_INDEX] * len(tail)
        if not any(role_of(m) == "assistant" for m in messages):
            raise ValueError(f"{path}:{row['_line']}: no assistant turn, so nothing to learn from this line")
        if len(ids) > seq_len + 1:
            if long == "drop":
                result.dropped += 1
                continue
            ids, labels, result.truncated = ids[:seq_len + 1], labels[:seq_len + 1], result.truncated + 1
        result.items.append((ids, labels))
    return result


def role_of(message):
    return message.get("role") if isinstance(message, dict) else None


def read_npy_ids(path):
    """The token stream of a .npy file: an array of non-negative integers, else an error naming the file."""
    try:
        ids = np.load(path, allow_pickle=False)
    except (ValueError, OSError) as error:
        raise ValueError(f"{path} is not a NumPy .npy array ({error}): save the token ids with numpy.save, or "
                         f"name a text file .txt") from None
    if not np.issubdtype(ids.dtype, np.integer):
        raise ValueError(f"{path} holds {ids.dtype} values, not integer token ids: convert them without rounding "
                         f"(e.g. ids.astype(numpy.int64) after checking they are whole numbers)")
    if ids.size and ids.min() < 0:
        raise ValueError(f"{path} holds the negative token id {int(ids.min())}: token ids are >= 0")
    return ids.astype(np.int64).reshape(-1)


def load_dataset(path, fmt: str, tokenizer, seq_len: int, train_on_prompt: bool = False, long: str = "truncate"):
    """Read a data file in one of the formats above and turn it into Sequences."""
    path = Path(path)
    if long not in ("truncate", "drop"):
        raise ValueError(f"unknown policy {long!r} for long examples: use truncate or drop")
    fmt = detect_format(path) if fmt == "auto" else fmt
    if fmt == "text":
        texts = [read_corpus(path)] if path.suffix == ".txt" else [field_of(r, "text", path) for r in read_jsonl(path)]
        stream = [t for text in texts for t in tokenizer.encode(text, bos=True, eos=True)]
        return Sequences(items=pack(stream, seq_len), packed=True)
    if fmt == "ids":
        if path.suffix == ".npy":
            return Sequences(items=pack(read_npy_ids(path).tolist(), seq_len), packed=True)
        rows = []
        for row in read_jsonl(path):
            ids = field_of(row, "input_ids", path, list)
            if len(ids) < 2 or not all(isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in ids):
                raise ValueError(f"{path}:{row['_line']}: input_ids must be a list of at least 2 token ids "
                                 f"(non-negative integers)")
            rows.append(ids)
        too_long = sum(len(r) > seq_len + 1 for r in rows)
        items = [(r[:seq_len + 1], list(r[:seq_len + 1])) for r in rows if long == "truncate" or len(r) <= seq_len + 1]
        return Sequences(items=items, truncated=too_long if long == "truncate" else 0,
                         dropped=too_long if long == "drop" else 0)
    if fmt == "alpaca":
        rows = read_jsonl(path)
        pairs = [(alpaca_prompt(field_of(r, "instruction", path), r.get("input", "")), field_of(r, "output", path))
                 for r in rows]
        if not any(answer.strip() for _, answer in pairs):
            raise ValueError(f"{path}: every output is empty, so there is nothing to learn but the end of text "
                             f"(its loss would fall to 0): check the data's output field")
        return prompt_answer_sequences(pairs, tokenizer, seq_len, train_on_prompt, long)
    if fmt == "chat":
        return chat_sequences(read_jsonl(path), path, tokenizer, seq_len, train_on_prompt, long)
    if fmt == "mc" or fmt in SUPERGLUE_TASKS:
        examples = superglue_examples(fmt, read_jsonl(path), path)
        pairs = [(e.prompt, e.choices[e.label]) for e in examples]
        return prompt_answer_sequences(pairs, tokenizer, seq_len, train_on_prompt, long, choices=examples)
    raise ValueError(f"unknown data format {fmt!r}: use auto, text, ids, alpaca, mc or one of "
                     f"{sorted(SUPERGLUE_TASKS)}")


def detect_format(path: Path) -> str:
    if path.suffix == ".txt":
        return "text"
    if path.suffix == ".npy":
        return "ids"
    if path.suffix not in (".json", ".jsonl"):
        raise ValueError(f"cannot tell the format of {path} from its extension: use .txt, .json, .jsonl or .npy, "
                         f"or pass --format")
    keys = set(read_jsonl(path)[0])
    for fmt, required in (("text", {"text"}), ("alpaca", {"instruction", "output"}), ("ids", {"input_ids"}),
                          ("mc", {"prompt", "choices", "label"}), ("chat", {"messages"})):
        if required <= keys:
            return fmt
    raise ValueError(f"cannot tell the format of {path} from its fields {sorted(keys - {'_line'})}: pass --format "
                     f"(boolq, cb, copa, multirc, rte, wic, wsc, record for SuperGLUE files)")


def main(argv=None):
    parser = argparse.ArgumentParser(description="Make a multiple-choice task: word order (from a corpus) or "
                                                 "two-digit addition.")
    parser.add_argument("task", choices=["word-order", "addition"])
    parser.add_argument("out", help="folder for train.jsonl and validation.jsonl")
    parser.add_argument("--corpus", default=str(Path(__file__).parent / "data" / "botchan.txt"))
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if args.task == "word-order":
        train, validation = word_order_task(read_corpus(args.corpus), seed=args.seed)
    else:
        train, validation = addition_task(seed=args.seed)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    write_mc_jsonl(train, out / "train.jsonl")
    write_mc_jsonl(validation, out / "validation.jsonl")
    print(f"{args.task.replace('-', ' ')}: {len(train)} training and {len(validation)} held-out examples in {out}")


if __name__ == "__main__":
    cli.run(main, "tasks.py")
