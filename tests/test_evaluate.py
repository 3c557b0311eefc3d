"""Evaluation, generation and schedules: multiple-choice scoring against a hand computation and under
tp/dp, the KV cache against recomputation, learning-rate schedules against their formulas."""
import json
import math
from pathlib import Path

import pytest
import torch

import shard
from conftest import VOCAB, tiny_model
from data import MultipleChoice, Tokenizer, cached_tokenizer
from distributed import run_ranks
from evaluate import candidate_losses, multiple_choice_accuracy, validation_loss
from generate import generate
from tasks import load_dataset
from train import learning_rate
from model import KVCache, model_args, token_losses

CORPUS = Path(__file__).resolve().parent.parent / "data" / "botchan.txt"


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    return cached_tokenizer(CORPUS, 400, tmp_path_factory.mktemp("cache"))


EXAMPLES = [MultipleChoice("The cat sat on the", ["mat", "spaceship of doom"], 0),
            MultipleChoice("I went to the", ["school", "schoolhouse yard"], 1),
            MultipleChoice("He said", ["yes", "no", "nothing at all"], 2)]


@torch.no_grad()
def hand_loss(model, tokenizer, prompt, answer):
    """Summed -log p(answer tokens | prompt), straight from the logits."""
    prompt_ids, answer_ids = tokenizer.encode(prompt), tokenizer.encode(answer, bos=False)
    ids = torch.tensor([prompt_ids + answer_ids])
    log_probs = torch.log_softmax(model(ids[:, :-1]).double(), dim=-1)[0]
    positions = range(len(prompt_ids) - 1, len(prompt_ids) + len(answer_ids) - 1)
    return -sum(float(log_probs[p, ids[0, p + 1]]) for p in positions)


def test_candidate_losses_match_a_hand_computation_and_the_lowest_wins(tokenizer):
    model = tiny_model(vocab_size=tokenizer.vocab_size, max_seq_len=64)
    expected_acc, expected_norm = 0, 0
    for example in EXAMPLES:
        losses, truncated = candidate_losses(model, example, tokenizer, seq_len=63, device="cpu")
        assert truncated == 0
        by_hand = [hand_loss(model, tokenizer, example.prompt, c) for c in example.choices]
        assert losses == pytest.approx(by_hand, rel=1e-5)
        expected_acc += by_hand.index(min(by_hand)) == example.label
        per_byte = [loss / len(c.encode()) for loss, c in zip(by_hand, example.choices)]
        expected_norm += per_byte.index(min(per_byte)) == example.label
    result = multiple_choice_accuracy(model, EXAMPLES, tokenizer, 63, "cpu")
    assert result == dict(acc=expected_acc / 3, acc_norm=expected_norm / 3, n=3, truncated=0)
    # Relabel every example with its lowest-loss candidate: accuracy must then be 1.
    relabeled = []
    for e in EXAMPLES:
        losses = candidate_losses(model, e, tokenizer, 63, "cpu")[0]
        relabeled.append(MultipleChoice(e.prompt, e.choices, losses.index(min(losses))))
    assert multiple_choice_accuracy(model, relabeled, tokenizer, 63, "cpu")["acc"] == 1.0
    # Several golds (ReCoRD): any of them counts; and truncated candidates are counted.
    any_gold = [MultipleChoice(e.prompt, e.choices, 0, tuple(range(len(e.choices)))) for e in EXAMPLES]
    assert multiple_choice_accuracy(model, any_gold, tokenizer, 63, "cpu")["acc"] == 1.0
    long = [MultipleChoice("the cat sat on the mat " * 20, ["yes", "no"], 0)]
    assert multiple_choice_accuracy(model, long, tokenizer, 40, "cpu")["truncated"] == 2


def parallel_scores_worker(tp, tokenizer_path):
    from data import Tokenizer
    grid = shard.init_distributed(tp=tp)
    tokenizer = Tokenizer(tokenizer_path)
    args = model_args("tiny", vocab_size=tokenizer.vocab_size, n_layers=2, max_seq_len=64)
    model = shard.build_model(args, grid, seed=0)

    losses = [candidate_losses(model, e, tokenizer, 63, "cpu", grid)[0] for e in EXAMPLES]
    sample = generate(model, [1, 17, 42], 20, temperature=0.0,
                      gather_logits=lambda logits: shard.gather_from_tp(logits, grid))
    return losses, multiple_choice_accuracy(model, EXAMPLES, tokenizer, 63, "cpu", grid), sample


@pytest.mark.parametrize("tp", [2, 1])  # tp = 2, and dp = 2 (each dp rank scores half, counts are summed)
def test_scores_under_tp_and_dp_equal_one_process(tokenizer, tp):
    model = tiny_model(vocab_size=tokenizer.vocab_size, max_seq_len=64)
    expected_losses = [candidate_losses(model, e, tokenizer, 63, "cpu")[0] for e in EXAMPLES]
    expected = multiple_choice_accuracy(model, EXAMPLES, tokenizer, 63, "cpu")
    expected_sample = generate(model, [1, 17, 42], 20, temperature=0.0)
    for losses, result, sample in run_ranks(parallel_scores_worker, 2, tp, str(tokenizer.path)):
        for ours, theirs in zip(losses, expected_losses):
            assert ours == pytest.approx(theirs, rel=1e-5)
        assert result == expected
        assert sample == expected_sample  # greedy generation under tp gathers the logits and agrees


def test_validation_loss_is_the_token_mean_and_perplexity_its_exp():
    model = tiny_model()
    items = [([1, 5, 9, 30, 2], [1, 5, 9, 30, 2]), ([1, 7, 8], [-100, -100, 8])]
    loss, ppl = validation_loss(model, items, batch_size=1, device="cpu")
    with torch.no_grad():
        per_item = [token_losses(model(torch.tensor([ids[:-1]])), torch.tensor([labels[1:]])) for ids, labels in items]
    expected = float(sum(t.sum() for t in per_item)) / 5  # 4 targets + 1 unmasked target
    assert loss == pytest.approx(expected, rel=1e-6) and ppl == pytest.approx(math.exp(expected), rel=1e-6)


def test_kv_cache_gives_the_logits_and_tokens_of_full_recomputation():
    model = tiny_model(n_heads=4, n_kv_heads=2).eval()
    tokens = torch.randint(0, 320, (2, 20), generator=torch.Generator().manual_seed(0))
    full = model(tokens)
    cache = KVCache(len(model.layers))
    pieces = [model(tokens[:, :8], cache=cache), model(tokens[:, 8:13], cache=cache)]  # prefill, then a chunk
    pieces += [model(tokens[:, i:i + 1], cache=cache) for i in range(13, 20)]  # one token at a time
    torch.testing.assert_close(torch.cat(pieces, dim=1), full, rtol=1e-5, atol=1e-5)
    assert cache.length == 20
    for temperature in (0.0, 0.9):
        with_cache = generate(model, [1, 17, 42], 30, temperature=temperature,
                              generator=torch.Generator().manual_seed(5))
        without = generate(model, [1, 17, 42], 30, temperature=temperature,
                           generator=torch.Generator().manual_seed(5), use_cache=False)
        assert with_cache == without and len(with_cache) == 30


def test_top_p_keeps_only_the_nucleus():
    from generate import sample_next_token
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    picks = {int(sample_next_token(logits, 1.0, 0.7, torch.Generator().manual_seed(s))) for s in range(200)}
    assert picks == {0, 1}  # 0.5 + 0.3 reaches 0.7; the tail is never sampled
    assert int(sample_next_token(logits, 0.0, 0.9)) == 0


def test_schedules_match_their_formulas():
    base, total, warmup = 0.03, 110, 10
    assert [learning_rate(s, base, total, warmup) for s in (1, 5, 10, 11, 110)] == pytest.approx(
        [0.003, 0.015, 0.03, 0.03, 0.03])
    for step in (11, 35, 60, 110):
        progress = (step - warmup) / (total - warmup)
        assert learning_rate(step, base, total, warmup, "linear") == pytest.approx(base * (1 - progress))
        assert learning_rate(step, base, total, warmup, "cosine") == pytest.approx(
            base * 0.5 * (1 + math.cos(math.pi * progress)))
        assert learning_rate(step, base, total, warmup, "cosine", min_lr_ratio=0.1) == pytest.approx(
            base * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress))))
    assert learning_rate(110, base, total, warmup, "linear") == 0.0
    with pytest.raises(ValueError, match="unknown schedule 'step'"):
        learning_rate(1, base, total, warmup, "step")


def test_plot_draws_an_svg_with_one_path_per_curve(tmp_path):
    import xml.etree.ElementTree as ElementTree
    import plot
    for name, shift in (("a", 0.0), ("b", 0.5)):
        (tmp_path / name).mkdir()
        (tmp_path / name / "metrics.jsonl").write_text("\n".join(json.dumps(r) for r in [
            {"step": 0, "val_loss": 7.0 + shift, "acc": 0.25}, {"step": 1, "loss": 6.0 + shift},
            {"step": 2, "loss": 5.0 + shift, "val_loss": 5.5 + shift, "acc": 0.5}, {"summary": True, "val_loss": 5.5}]))
    svg = tmp_path / "curves.svg"
    assert plot.main([str(tmp_path / "a"), str(tmp_path / "b"), "--svg", str(svg), "--label", "A", "--label", "B"]) == 0
    root = ElementTree.parse(svg).getroot()  # well-formed XML
    curves = [p for p in root.iter("{http://www.w3.org/2000/svg}path") if p.get("class") == "curve"]
    titles = [p.find("{http://www.w3.org/2000/svg}title").text for p in curves]
    assert titles == ["A train", "A validation", "B train", "B validation", "A acc", "B acc"]
    assert all(p.get("d").count("L") == 1 for p in curves)  # two points each: one move, one line
    with pytest.raises(FileNotFoundError, match="nothing does not exist: pass a metrics.jsonl"):
        plot.main([str(tmp_path / "nothing")])
    with pytest.raises(ValueError, match="1 --label for 2 runs"):
        plot.main([str(tmp_path / "a"), str(tmp_path / "b"), "--label", "A"])


def test_the_generate_and_evaluate_command_lines_use_a_checkpoint(tmp_path, capsys):
    import checkpoint
    import evaluate
    import generate as generate_cli
    from data import train_tokenizer
    corpus = Path(__file__).resolve().parent.parent / "data" / "botchan.txt"
    # A 320-piece vocabulary must hold 259 special and byte pieces plus every character: keep 29 of them.
    text = "".join(c for c in corpus.read_text().lower() if c in "abcdefghijklmnopqrstuvwxyz .,\n")
    tokenizer_path = train_tokenizer(text, VOCAB, tmp_path / "tokenizer.model")
    model = tiny_model(seed=3)
    checkpoint.save_hf(model, tmp_path / "hf", tokenizer_path=tokenizer_path)
    tokenizer = Tokenizer(tokenizer_path)
    text = generate_cli.main(["--ckpt", str(tmp_path / "hf"), "--prompt", "the cat", "--temperature", "0",
                              "--max-new-tokens", "6", "--device", "cpu"])
    expected = generate(model, tokenizer.encode("the cat"), 6, temperature=0, eos_id=tokenizer.eos_id)
    assert text == tokenizer.decode(expected) and capsys.readouterr().out.strip() == text.strip()
    rows = [dict(prompt=f"the {word} is", choices=[" here", " there"], label=i % 2)
            for i, word in enumerate(["cat", "dog", "boy", "sea", "man"])]
    data = tmp_path / "mc.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    result = evaluate.main(["--ckpt", str(tmp_path / "hf"), "--data", str(data), "--device", "cpu"])
    sequences = load_dataset(data, "auto", tokenizer, model.args.max_seq_len - 1)
    loss, _ = evaluate.validation_loss(model, sequences.items, 8, "cpu")
    assert result["examples"] == 5 and result["val_loss"] == pytest.approx(loss, rel=1e-6) and result["n"] == 5
    assert json.loads(capsys.readouterr().out) == json.loads(json.dumps(result))
