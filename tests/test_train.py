"""The default run, shortened: it learns, it logs what it promises, and it refuses bad input up front."""
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import train


def run(tmp_path, *flags):
    return train.main(["--out", str(tmp_path), "--sample-tokens", "4", "--eval-batches", "4", *flags])


def rows(tmp_path):
    return [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]


def test_shortened_default_run_lowers_validation_loss(tmp_path, capsys):
    summary = run(tmp_path, "--steps", "150", "--eval-every", "75")
    logged = rows(tmp_path)
    assert [r["step"] for r in logged[:-1]] == list(range(151))
    evaluations = [r for r in logged[:-1] if "val_loss" in r]
    assert [r["step"] for r in evaluations] == [0, 75, 150]
    assert evaluations[-1]["val_loss"] < evaluations[0]["val_loss"] - 1.0  # from ~7.6 (uniform over 2048)
    final = logged[-1]  # the summary row, which carries the final validation result too
    assert final["summary"] and final["val_loss"] == evaluations[-1]["val_loss"] == summary["val_loss"]
    assert final["best_val_loss"] == min(r["val_loss"] for r in evaluations) and final["tokens_per_s"] > 0
    # The run's wall time holds its steps' time (150 steps of 16 x 128 tokens at the summary's tokens/s).
    assert final["time_s"] > 150 * 16 * 128 / final["tokens_per_s"] > 0
    step = logged[1]
    assert set(step) >= {"loss", "lr", "grad_norm", "skipped", "skipped_steps", "loss_scale", "tokens_per_s",
                         "tokens_per_gpu_per_s"}
    assert step["grad_norm"] > 0 and step["skipped"] is False and step["tokens_per_s"] > 0
    out = capsys.readouterr().out
    assert "val loss" in out and "sample: " in out
    import xml.etree.ElementTree as ElementTree
    curves = ElementTree.parse(tmp_path / "curves.svg").getroot()  # every run draws its curves
    assert len([p for p in curves.iter("{http://www.w3.org/2000/svg}path") if p.get("class") == "curve"]) == 2


def test_schedule_reaches_the_metrics(tmp_path):
    run(tmp_path, "--steps", "6", "--eval-every", "6", "--warmup-steps", "2", "--schedule", "linear", "--lr", "0.4")
    assert [r["lr"] for r in rows(tmp_path)[1:-1]] == pytest.approx([0.2, 0.4, 0.3, 0.2, 0.1, 0.0])


@pytest.mark.parametrize("dtype", ["bf16", "fp16"])
def test_low_precision_runs_with_clipping_log_norm_and_scale(tmp_path, dtype):
    offload = ["--offload-checkpoints"] if dtype == "bf16" else []  # the block inputs in host memory
    run(tmp_path, "--steps", "3", "--eval-every", "3", "--dtype", dtype, "--clip-grad-norm", "1.0",
        "--activation-checkpointing", *offload)
    logged = rows(tmp_path)[1:-1]
    assert all(r["grad_norm"] is not None and r["grad_norm"] > 0 for r in logged)
    assert all((r["loss_scale"] is not None) == (dtype == "fp16") for r in logged)


@pytest.mark.parametrize("flags, error, message", [
    (["--device", "meta"], ValueError, "unsupported device 'meta'"),
    (["--device", "banana"], ValueError, "unknown device 'banana'"),
    (["--seq-len", "300"], ValueError, "--seq-len=300 exceeds the tiny model's max_seq_len=256"),
    (["--steps", "0"], ValueError, "--steps=0 must be a positive integer"),
    (["--corpus", "/nonexistent/corpus.txt"], FileNotFoundError, "--data /nonexistent/corpus.txt does not exist"),
    (["--warmup-steps", "900"], ValueError, "--warmup-steps=900 must be >= 0 and below --steps=800"),
    (["--offload-checkpoints"], ValueError, "add --activation-checkpointing"),
    (["--branch-grads-gpu-gib", "-0.5"], ValueError, "--branch-grads-gpu-gib=-0.5 must be a number >= 0"),
    (["--cuda-graph", "--device", "cpu", "--dtype", "bf16"], ValueError,
     "--cuda-graph replays CUDA graphs: it needs a GPU"),
    (["--cuda-graph"], ValueError, "--cuda-graph with --dtype fp32: .* add --dtype bf16"),
    (["--optimizer", "adamw", "--dtype", "fp16"], ValueError, "--optimizer adamw with --dtype fp16: .* no loss "),
    (["--optimizer", "adalomo", "--cuda-graph"], ValueError, "adalomo's is not: drop --cuda-graph"),
    (["--optimizer", "adalomo", "--adalomo-decay-rate", "0.5"], ValueError, "AdaLomo decay_rate=0.5 must be negative"),
])
def test_bad_input_is_refused_before_training(tmp_path, flags, error, message):
    with pytest.raises(error, match=message):
        run(tmp_path, *flags)
    assert not (tmp_path / "metrics.jsonl").exists()


@pytest.mark.parametrize("flag, value, choices", [
    ("--dtype", "fp8", "fp32, bf16, fp16"), ("--schedule", "step", "constant, linear, cosine"),
    ("--long-examples", "skip", "truncate, drop"), ("--format", "csv", "auto, text, ids"),
])
def test_a_name_that_is_not_a_choice_is_refused_with_the_choices(tmp_path, capsys, flag, value, choices):
    with pytest.raises(SystemExit) as leaving:
        run(tmp_path, flag, value)
    err = capsys.readouterr().err
    assert leaving.value.code == 2 and f"argument {flag}: invalid choice: '{value}'" in err
    assert all(choice in err.split("choose from", 1)[1] for choice in choices.split(", "))  # (quoted or not)


def test_tokenizer_larger_than_model_vocabulary_is_refused(tmp_path, monkeypatch):
    import model
    monkeypatch.setitem(model.LLAMA_SIZES, "small-vocab", {**model.LLAMA_SIZES["tiny"], "vocab_size": 1000})
    with pytest.raises(ValueError, match="the tokenizer has 2048 tokens but the small-vocab model only 1000"):
        run(tmp_path, "--model", "small-vocab")


def test_empty_corpus_is_refused(tmp_path):
    empty = tmp_path / "empty.txt"
    empty.write_text("\n")
    with pytest.raises(ValueError, match="is empty"):
        run(tmp_path, "--corpus", str(empty))


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on a machine without a GPU")
def test_cuda_without_gpu_is_refused(tmp_path):
    with pytest.raises(ValueError, match="no CUDA GPU: use --device cpu"):
        run(tmp_path, "--device", "cuda")


QUICK_UNCHECKED = ["--steps", "2", "--eval-every", "2", "--eval-batches", "2", "--sample-tokens", "2",
                   "--batch-size", "4", "--seq-len", "32", "--no-finite-checks"]


def test_without_finite_checks_training_logs_no_norm_and_stops_on_a_bad_loss(tmp_path, monkeypatch):
    quick = QUICK_UNCHECKED
    checked = []
    real_check = train.require_finite_weights
    monkeypatch.setattr(train, "require_finite_weights",
                        lambda model, step: checked.append(step) or real_check(model, step))
    run(tmp_path / "ok", *quick, "--save-every", "2", "--export-hf", str(tmp_path / "hf"))
    assert checked == [2, 2]  # the weights were checked before the save and before the export
    logged = [r for r in rows(tmp_path / "ok") if "loss" in r and "step" in r]
    assert logged and all(r["grad_norm"] is None and r["loss"] == r["loss"] for r in logged)
    # lr 1e30 sends the weights to +-inf in step 1; step 2's loss is not finite, and with no checks its
    # update has been applied: training stops there, saying how to go on.
    with pytest.raises(FloatingPointError, match=r"step 2: loss .* with --no-finite-checks.*--resume"):
        run(tmp_path / "bad", *quick, "--lr", "1e30")
    # Step 2 not the last: its row is written once step 3's forward is queued, and the error still names
    # step 2 (and comes before step 3's update).
    with pytest.raises(FloatingPointError, match=r"step 2: loss .* with --no-finite-checks.*--resume"):
        run(tmp_path / "bad-later", *quick, "--lr", "1e30", "--steps", "4", "--eval-every", "4")
    assert [r["step"] for r in rows(tmp_path / "bad-later") if "loss" in r] == [1]


def test_with_a_norm_pass_no_finite_checks_changes_nothing_and_a_bad_loss_is_skipped(tmp_path, monkeypatch):
    calls = []

    def second_loss_nan(*args):
        calls.append(1)
        loss = train_loss(*args)
        return loss * float("nan") if len(calls) == 2 else loss

    train_loss = train.model_loss
    monkeypatch.setattr(train, "model_loss", second_loss_nan)
    run(tmp_path, *QUICK_UNCHECKED, "--clip-grad-norm", "1.0")  # no FloatingPointError: the norm pass checks
    steps = {r["step"]: r for r in rows(tmp_path) if "skipped" in r}
    assert not steps[1]["skipped"] and steps[2]["skipped"] and steps[1]["grad_norm"] > 0


def test_non_finite_weights_are_never_saved(tmp_path):
    from conftest import tiny_model
    model = tiny_model()
    train.require_finite_weights(model, step=7)  # finite: passes
    with torch.no_grad():
        model.layers[1].feed_forward.w2.weight[0, 0] = float("inf")
    with pytest.raises(FloatingPointError, match=r"step 7: layers.1.feed_forward.w2.weight is no longer finite"):
        train.require_finite_weights(model, step=7)


def test_a_non_finite_gradient_norm_stops_training_at_its_step_before_it_is_logged_or_saved(tmp_path, monkeypatch):
    # The one-pass step leaves its norm on the GPU; train.py asks for it before it writes the step's row,
    # which a step that saves does at once: the bad step is neither logged nor saved.
    import lomo
    real_norm, norms = lomo.LOMO.norm, []

    def second_norm_nan(self):
        norms.append(1)
        norm = real_norm(self)
        return norm * float("nan") if len(norms) == 2 else norm

    monkeypatch.setattr(lomo.LOMO, "norm", second_norm_nan)
    quick = [flag for flag in QUICK_UNCHECKED if flag != "--no-finite-checks"]
    with pytest.raises(FloatingPointError, match=r"step 2: gradient norm nan with a finite loss"):
        run(tmp_path, *quick, "--steps", "3", "--save-every", "1")
    assert [r["step"] for r in rows(tmp_path) if "loss" in r] == [1]
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir() if p.is_dir()) == ["step-00000001"], \
        list((tmp_path / "checkpoints").iterdir())
    # Without a save or an evaluation at step 2, its row waits for step 3's forward, and the run stops there,
    # before step 3's update.
    norms.clear()
    with pytest.raises(FloatingPointError, match=r"step 2: gradient norm nan with a finite loss"):
        run(tmp_path / "later", *quick, "--steps", "4", "--eval-every", "4")
    assert [r["step"] for r in rows(tmp_path / "later") if "loss" in r] == [1]


def test_the_saved_gradients_budget_reaches_lomo(tmp_path, monkeypatch):
    # --clip-grad-norm with checkpointed blocks saves branch gradients (offload.py): the flag decides where.
    import offload
    made = []

    class Recorded(offload.SavedBranchGrads):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            made.append(self)

    monkeypatch.setattr(offload, "SavedBranchGrads", Recorded)
    run(tmp_path, "--steps", "2", "--eval-every", "2", "--clip-grad-norm", "1.0", "--activation-checkpointing",
        "--branch-grads-gpu-gib", "0.25")
    assert [extension.gpu_gib for extension in made] == [0.25]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
@pytest.mark.parametrize("clip", [[], ["--clip-grad-norm", "0.5"]])
def test_with_cuda_graphs_training_logs_the_same_losses(tmp_path, capsys, clip):
    quick = ["--steps", "6", "--eval-every", "3", "--eval-batches", "2", "--sample-tokens", "2", "--batch-size", "4",
             "--seq-len", "32", "--device", "cuda", "--dtype", "bf16", "--activation-checkpointing", *clip]
    run(tmp_path / "eager", *quick)
    run(tmp_path / "graphs", *quick, "--cuda-graph")
    assert "CUDA graphs: 5 steps replayed, 1 eager" in capsys.readouterr().out
    eager, graphs = rows(tmp_path / "eager"), rows(tmp_path / "graphs")
    assert [r.get("loss") for r in graphs] == [r.get("loss") for r in eager]  # replays train bit for bit
    assert [r.get("val_loss") for r in graphs] == [r.get("val_loss") for r in eager]
    with pytest.raises(ValueError, match="--cuda-graph with --dtype fp16: .* add --dtype bf16"):
        run(tmp_path / "fp16", *quick, "--cuda-graph", "--dtype", "fp16")
    with pytest.raises(ValueError, match="no --weight-decay"):
        run(tmp_path / "decay", *quick, "--cuda-graph", "--weight-decay", "0.1")


def test_weights_that_overflow_are_never_committed_and_the_good_checkpoints_stay(tmp_path):
    # fp16 at a huge lr: finite gradients, but the update overflows the weights. Neither the save nor the
    # export may commit them, and the checkpoints of before (here: of a good first run) must stay.
    quick = ["--steps", "2", "--eval-every", "2", "--eval-batches", "1", "--batch-size", "2", "--seq-len", "16",
             "--dtype", "fp16", "--save-every", "1", "--keep", "1"]
    run(tmp_path, *quick)
    committed = sorted(p.name for p in (tmp_path / "checkpoints").iterdir())
    assert committed == ["step-00000002"]
    with pytest.raises(FloatingPointError, match=r"step 3: .* is no longer finite, so nothing was saved"):
        run(tmp_path, *quick[2:], "--steps", "4", "--resume", "--lr", "1e9", "--export-hf", str(tmp_path / "hf"))
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == committed
    assert not (tmp_path / "hf").exists()


@pytest.mark.parametrize("flags, message", [
    (["--lr", "0"], "--lr=0.0 must be a positive number"),
    (["--model", "2B"], "--model '2B' is not a named size"),
])
def test_a_user_error_on_the_command_line_is_one_line_and_status_2(tmp_path, flags, message):
    done = subprocess.run([sys.executable, str(Path(train.__file__)), "--out", str(tmp_path), *flags],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and "Traceback" not in done.stderr, done.stderr
    assert done.stderr.startswith("train.py: error: ") and message in done.stderr and done.stderr.count("\n") == 1


def test_data_that_would_train_silently_wrong_is_refused(tmp_path):
    import numpy as np
    np.save(tmp_path / "floats.npy", np.array([1.5, 2.0, 3.7] * 100))
    with pytest.raises(ValueError, match=r"floats.npy holds float64 values, not integer token ids"):
        run(tmp_path / "a", "--data", str(tmp_path / "floats.npy"), "--steps", "1", "--eval-every", "1")
    (tmp_path / "text.npy").write_text("plain text, not an array\n" * 20)
    with pytest.raises(ValueError, match=r"text.npy is not a NumPy .npy array"):
        run(tmp_path / "b", "--data", str(tmp_path / "text.npy"), "--steps", "1", "--eval-every", "1")
    rows = [dict(instruction=f"Say nothing {i}.", output="") for i in range(40)]
    (tmp_path / "empty.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.raises(ValueError, match=r"empty.jsonl: every output is empty"):
        run(tmp_path / "c", "--data", str(tmp_path / "empty.jsonl"), "--steps", "1", "--eval-every", "1")
    (tmp_path / "latin1.txt").write_bytes("caf\xe9 au lait\n".encode("latin-1") * 50)
    with pytest.raises(ValueError, match=r"latin1.txt:1: not UTF-8 text \(byte 0xe9 at offset 3\)"):
        run(tmp_path / "d", "--data", str(tmp_path / "latin1.txt"), "--steps", "1", "--eval-every", "1")
    mc = [dict(prompt=f"Pick {i}:", choices=["a", "b"], label="b") for i in range(40)]
    (tmp_path / "mc.jsonl").write_text("".join(json.dumps(r) + "\n" for r in mc))
    with pytest.raises(ValueError, match=r"mc.jsonl:1: label 'b' is not an index"):
        run(tmp_path / "e", "--data", str(tmp_path / "mc.jsonl"), "--steps", "1", "--eval-every", "1")


def test_ctrl_c_ends_the_step_saves_and_stops(tmp_path, monkeypatch, capsys):
    import os
    import signal
    real_loss, calls = train.model_loss, []

    def interrupted_at_step_2(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            os.kill(os.getpid(), signal.SIGINT)  # as a Ctrl-C during step 2's forward
        return real_loss(*args, **kwargs)
    monkeypatch.setattr(train, "model_loss", interrupted_at_step_2)
    quick = ["--steps", "5", "--eval-every", "5", "--eval-batches", "1", "--batch-size", "2", "--seq-len", "16"]
    run(tmp_path, *quick, "--save-every", "4", "--export-hf", str(tmp_path / "hf"))
    assert "stopped by Ctrl-C after step 2; saved in" in capsys.readouterr().out
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["step-00000002"]
    assert [r["step"] for r in rows(tmp_path) if "loss" in r and "summary" not in r] == [1, 2]
    assert not (tmp_path / "hf").exists()  # an interrupted run exports nothing
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # given back


def test_a_failed_export_keeps_the_weights_in_a_training_state(tmp_path, monkeypatch):
    def full_disk(*args, **kwargs):
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(train.checkpoint, "save_hf", full_disk)
    quick = ["--steps", "2", "--eval-every", "2", "--eval-batches", "1", "--batch-size", "2", "--seq-len", "16"]
    with pytest.raises(RuntimeError, match=r"--export-hf .* failed \(OSError: .*No space left on device\); the "
                                           r"trained weights are in .*step-00000002: export them with"):
        run(tmp_path, *quick, "--export-hf", str(tmp_path / "hf"))
    assert (tmp_path / "checkpoints" / "step-00000002" / "manifest.json").is_file()


def test_a_run_that_skips_most_of_its_steps_fails_and_is_not_exported(tmp_path, monkeypatch):
    real_loss, calls = train.model_loss, []

    def mostly_nan(*args, **kwargs):  # a non-finite loss at every step but the first
        calls.append(1)
        loss = real_loss(*args, **kwargs)
        return loss if len(calls) == 1 else loss * float("nan")
    monkeypatch.setattr(train, "model_loss", mostly_nan)
    quick = ["--steps", "4", "--eval-every", "4", "--eval-batches", "1", "--batch-size", "2", "--seq-len", "16"]
    with pytest.raises(FloatingPointError, match=r"3 of the 4 steps were skipped .* more than "
                                                 r"--max-skipped-fraction=0.5: the model barely trained and was not "
                                                 r"exported"):
        run(tmp_path / "a", *quick, "--export-hf", str(tmp_path / "hf"))
    assert not (tmp_path / "hf").exists()
    rows = [json.loads(line) for line in (tmp_path / "a" / "metrics.jsonl").read_text().splitlines()]
    assert rows[-1]["summary"] and rows[-1]["skipped_steps"] == 3  # the log is complete all the same
    calls.clear()
    run(tmp_path / "b", *quick, "--max-skipped-fraction", "0.8")  # a looser bound lets it end normally


@pytest.mark.parametrize("program, arguments, message", [
    ("checkpoint.py", ["convert", "/nonexistent/ckpt", "/tmp/never-written", "--to", "hf"], "/nonexistent/ckpt"),
    ("bench.py", ["--tiny", "--modes", "lomo,warp"], "unknown modes ['warp']"),
])
def test_the_other_programs_end_a_user_error_in_one_line(program, arguments, message):
    done = subprocess.run([sys.executable, str(Path(train.__file__).parent / program), *arguments],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and "Traceback" not in done.stderr and message in done.stderr, done.stderr


def test_eval_only_scores_the_whole_file_and_the_sample_continues_a_real_prompt(tmp_path, capsys):
    rows = [dict(instruction=f"Name the number after {i}.", output=f"It is {i + 1}.") for i in range(30)]
    data = tmp_path / "alpaca.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    quick = ["--steps", "2", "--eval-every", "2", "--eval-batches", "1", "--batch-size", "2", "--seq-len", "96",
             "--data", str(data), "--save-every", "2"]
    run(tmp_path / "run", *quick)
    out = capsys.readouterr().out
    assert "sample: 'Below is an instruction that describes a task." in out  # not an empty continuation of "I"
    run(tmp_path / "run", *quick, "--resume", "--eval-only")
    assert "data: 30 training and 30 validation sequences" in capsys.readouterr().out  # all of them, not a tenth


def test_the_demo_learns_above_chance_and_prints_its_progress_as_it_runs(tmp_path):
    """demo_word_order.sh, shortened to 120 steps: from chance (1 in 4) to well above it on held-out sentences,
    each evaluation's line printed while the run goes on."""
    import os
    root = Path(__file__).resolve().parent.parent
    env = dict(os.environ, STEPS="120", EVAL_EVERY="60", SEEDS="1", PYTHONUNBUFFERED="1")
    demo = subprocess.Popen(["bash", str(root / "demo_word_order.sh"), str(tmp_path)], cwd=root, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    try:
        lines = []
        for line in demo.stdout:
            lines.append(line)
            if line.startswith("step 0:"):
                assert demo.poll() is None  # the first evaluation's line arrived while training still runs
        assert demo.wait(timeout=180) == 0
    finally:
        demo.kill()
    assert [line.split(":")[0] for line in lines if line.startswith("step")] == ["step 0", "step 60", "step 120"]
    assert lines[-1].startswith("validation loss")
    evaluations = [row for row in rows(tmp_path / "word-order-1") if "acc" in row]
    assert evaluations[0]["acc"] < 0.4 and evaluations[0]["n"] == 165
    assert evaluations[-1]["acc"] > 0.6


def ctrl_c_on_one_rank_worker(out):
    """Rank 1 alone gets Ctrl-C during step 3's forward, then SIGTERM as torchrun sends its workers."""
    import os
    import signal
    import torch.distributed as dist
    real_loss, calls = train.model_loss, []

    def interrupted(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3 and dist.get_rank() == 1:
            os.kill(os.getpid(), signal.SIGINT)
            os.kill(os.getpid(), signal.SIGTERM)  # after a Ctrl-C: the same request, not the end
        return real_loss(*args, **kwargs)
    train.model_loss = interrupted
    train.main(["--out", out, "--steps", "8", "--eval-every", "8", "--eval-batches", "1", "--batch-size", "2",
                "--seq-len", "16", "--sample-tokens", "0", "--save-every", "100", "--tp", "2"])
    return len(calls)


def test_ctrl_c_on_one_rank_stops_every_rank_after_the_same_step_and_saves(tmp_path):
    from distributed import run_ranks
    calls = run_ranks(ctrl_c_on_one_rank_worker, 2, str(tmp_path))
    assert calls == [4, 4]  # both ran step 4 (the step after rank 1's request) and no further
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["step-00000004"]
    assert [r["step"] for r in rows(tmp_path) if "loss" in r and "summary" not in r] == [1, 2, 3, 4]
