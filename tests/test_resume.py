"""Checkpoints in training: exact resume (one process and tp = 2; AdaLomo's factors and AdamW's moments too),
incomplete saves skipped, a Hugging Face export that loads back for evaluation with the same result."""
import json
from pathlib import Path

import pytest
import torch

import train
from checkpoint import read_safetensors
from distributed import run_ranks

QUICK = ["--steps", "6", "--eval-every", "3", "--eval-batches", "2", "--sample-tokens", "2", "--lr", "0.5",
         "--save-every", "3", "--batch-size", "4", "--seq-len", "32"]


def losses(out):
    rows = [json.loads(line) for line in (Path(out) / "metrics.jsonl").read_text().splitlines()]
    return {row["step"]: row["loss"] for row in rows if "loss" in row}


def weights(folder):
    tensors = {}
    for path in sorted(Path(folder).glob("model-tp*.safetensors")):
        for name, value in read_safetensors(path).items():
            tensors.setdefault(name, []).append(value.clone())
    return tensors


def train_worker(flags):
    train.main(flags)
    return True


@pytest.mark.parametrize("tp, optimizer", [(1, "lomo"), (2, "lomo"), (2, "adalomo"), (1, "adamw")])
def test_half_then_resume_equals_straight_bit_for_bit(tmp_path, tp, optimizer):
    def run(flags):
        flags = flags + ["--optimizer", optimizer] + (["--lr", "1e-2"] if optimizer != "lomo" else [])
        if tp == 1:
            train.main(flags)
        else:
            run_ranks(train_worker, 2, flags + ["--tp", "2"])

    straight, halves = tmp_path / "straight", tmp_path / "halves"
    run(QUICK + ["--out", str(straight)])
    run(QUICK[:1] + ["4"] + QUICK[2:] + ["--out", str(halves)])  # saves at 3 and 4
    # A crash during the save at step 4: the folder lacks its manifest, so --resume must skip it, go back
    # to step 3, and drop the rows logged after step 3 before logging them again.
    (halves / "checkpoints" / "step-00000004" / "manifest.json").unlink()
    run(QUICK + ["--out", str(halves), "--resume"])
    assert losses(halves) == losses(straight) and len(losses(straight)) == 6
    steps = [json.loads(line).get("step") for line in (halves / "metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(7)) + [6]  # every step once, then the one summary row
    final_straight, final_halves = (weights(p / "checkpoints" / "step-00000006") for p in (straight, halves))
    assert final_straight.keys() == final_halves.keys()
    for name in final_straight:
        assert all(torch.equal(a, b) for a, b in zip(final_straight[name], final_halves[name])), name
    # and the weights did change over the second half
    first_half = weights(halves / "checkpoints" / "step-00000003")
    wq = "layers.0.attention.wq.weight"
    assert not torch.equal(first_half[wq][0], final_halves[wq][0])


def test_resume_without_a_saved_state_starts_fresh_and_says_so(tmp_path, capsys):
    train.main(QUICK[:1] + ["2"] + QUICK[2:] + ["--out", str(tmp_path), "--resume"])
    assert "no complete training state" in capsys.readouterr().out


def test_exported_hf_folder_evaluates_to_the_same_loss(tmp_path):
    # --eval-only scores the whole --data file: the training run is scored on the same file (--val-data).
    scored = ["--val-data", str(train.BUNDLED_CORPUS)]
    summary = train.main(QUICK + scored + ["--out", str(tmp_path / "run"), "--export-hf", str(tmp_path / "hf")])
    assert (tmp_path / "hf" / "config.json").is_file() and (tmp_path / "hf" / "tokenizer.model").is_file()
    result = train.main(QUICK + ["--out", str(tmp_path / "eval"), "--ckpt", str(tmp_path / "hf"), "--eval-only"])
    assert result["val_loss"] == pytest.approx(summary["val_loss"], rel=1e-6)
    state = train.main(QUICK + ["--out", str(tmp_path / "eval2"), "--eval-only", "--ckpt",
                                str(tmp_path / "run" / "checkpoints" / "step-00000006")])
    assert state["val_loss"] == pytest.approx(summary["val_loss"], rel=1e-6)


def test_checkpoint_without_tokenizer_and_existing_export_folder_are_refused(tmp_path):
    train.main(QUICK[:1] + ["1"] + QUICK[2:] + ["--out", str(tmp_path / "run"), "--export-hf", str(tmp_path / "hf")])
    (tmp_path / "hf" / "tokenizer.model").unlink()
    with pytest.raises(ValueError, match="has no tokenizer.model or tokenizer.json: pass --tokenizer PATH"):
        train.main(QUICK + ["--out", str(tmp_path / "eval"), "--ckpt", str(tmp_path / "hf"), "--eval-only"])
    with pytest.raises(ValueError, match="the folder exists; choose a new one"):
        train.main(QUICK + ["--out", str(tmp_path / "again"), "--export-hf", str(tmp_path / "hf")])
    assert not (tmp_path / "again").exists()  # refused before any work


@pytest.mark.parametrize("flags, error, message", [
    (["--eval-only"], ValueError, "--eval-only evaluates a trained model: pass --ckpt DIR"),
    (["--min-lr-ratio", "-1"], ValueError, "--min-lr-ratio=-1.0 must be between 0 and 1"),
    (["--ckpt", "/nonexistent"], FileNotFoundError, "checkpoint /nonexistent does not exist"),
    (["--save-every", "-1"], ValueError, "--save-every=-1 must be >= 0"),
])
def test_bad_checkpoint_flags_are_refused(tmp_path, flags, error, message):
    with pytest.raises(error, match=message):
        train.main(["--out", str(tmp_path), *flags])


def test_resume_with_another_optimizer_is_refused(tmp_path):
    out = str(tmp_path / "run")
    train.main(QUICK[:1] + ["3"] + QUICK[2:] + ["--out", out])
    with pytest.raises(ValueError, match="--optimizer lomo, this one has --optimizer adalomo"):
        train.main(QUICK + ["--out", out, "--resume", "--optimizer", "adalomo", "--lr", "1e-3"])
