"""The output folder (run_folder.py): one run at a time, no run's log or checkpoints overwritten by another, and
a resume that repairs what a crash leaves in metrics.jsonl."""
import json
import os
import socket
import subprocess
import sys

import pytest

import train

QUICK = ["--steps", "2", "--eval-every", "2", "--eval-batches", "1", "--sample-tokens", "2", "--batch-size", "2",
         "--seq-len", "16"]


def run(out, *flags):
    return train.main(["--out", str(out), *QUICK, *flags])


def test_a_second_run_on_a_folder_that_holds_one_is_refused_and_overwrite_starts_over(tmp_path, capsys):
    run(tmp_path, "--save-every", "2")
    log = (tmp_path / "metrics.jsonl").read_bytes()
    with pytest.raises(ValueError, match=r"holds a run \(metrics.jsonl, checkpoints/step-00000002\): continue it "
                                         r"with --resume, start over with --overwrite"):
        run(tmp_path)
    assert (tmp_path / "metrics.jsonl").read_bytes() == log and not (tmp_path / "run.lock").exists()
    run(tmp_path, "--overwrite", "--seed", "5")
    assert "--overwrite: removed metrics.jsonl, checkpoints/step-00000002" in capsys.readouterr().out
    assert (tmp_path / "metrics.jsonl").read_bytes() != log
    assert not (tmp_path / "checkpoints" / "step-00000002").exists()


def test_a_folder_in_use_by_a_running_process_is_refused_naming_it(tmp_path):
    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        tmp_path.mkdir(exist_ok=True)
        (tmp_path / "run.lock").write_text(json.dumps(dict(pid=other.pid, host=socket.gethostname())))
        with pytest.raises(ValueError, match=rf"in use by another run \(pid {other.pid} on host "):
            run(tmp_path)
        assert (tmp_path / "run.lock").exists() and not (tmp_path / "metrics.jsonl").exists()
        (tmp_path / "run.lock").write_text(json.dumps(dict(pid=1, host="another-node")))  # maybe alive there
        with pytest.raises(ValueError, match=r"pid 1 on host another-node"):
            run(tmp_path)
    finally:
        other.kill()
        other.wait()


def test_a_lock_left_by_a_run_that_is_gone_is_taken_over(tmp_path, capsys):
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    (tmp_path / "run.lock").write_text(json.dumps(dict(pid=gone.pid, host=socket.gethostname())))
    run(tmp_path)
    assert f"(pid {gone.pid}) is gone; taking the folder over" in capsys.readouterr().out
    assert not (tmp_path / "run.lock").exists()  # released at the end of the run


def test_eval_only_writes_beside_the_training_log(tmp_path):
    run(tmp_path, "--save-every", "2")
    log = (tmp_path / "metrics.jsonl").read_bytes()
    run(tmp_path, "--resume", "--eval-only")
    run(tmp_path, "--resume", "--eval-only")
    assert (tmp_path / "metrics.jsonl").read_bytes() == log
    rows = [json.loads(line) for line in (tmp_path / "eval.jsonl").read_text().splitlines()]
    assert len(rows) == 2 and all(r["eval_only"] and r["step"] == 2 for r in rows)


def test_resume_drops_a_torn_line_and_says_when_the_run_is_finished(tmp_path, capsys):
    run(tmp_path, "--steps", "4", "--save-every", "2")
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    # a crash after step 2's save: step 3's row written, step 4's torn in mid-write
    torn = [line for line in lines if json.loads(line).get("step", 0) <= 3 and not json.loads(line).get("summary")]
    (tmp_path / "metrics.jsonl").write_text("\n".join(torn) + '\n{"step": 4, "lo')
    for step in ("00000004",):
        os.rename(tmp_path / "checkpoints" / f"step-{step}", tmp_path / f"moved-{step}")  # newest is step 2
    capsys.readouterr()
    run(tmp_path, "--steps", "4", "--resume")
    out = capsys.readouterr().out
    assert "dropped 1 torn or blank line(s)" in out and "resuming from" in out
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "loss" in r and "summary" not in r] == [1, 2, 3, 4]
    run(tmp_path, "--steps", "4", "--resume", "--save-every", "2")
    run(tmp_path, "--steps", "4", "--resume")
    assert "the run is finished: its training state is at step 4 and --steps is 4" in capsys.readouterr().out


def test_the_summary_of_a_resumed_run_covers_every_segment(tmp_path):
    import torch
    first = run(tmp_path, "--save-every", "2")
    second = run(tmp_path, "--steps", "4", "--save-every", "2", "--resume")
    assert second["time_s"] > first["time_s"]
    state = torch.load(tmp_path / "checkpoints" / "step-00000004" / "state.pt", weights_only=True)
    assert state["totals"]["tokens"] == 4 * 2 * 16  # four steps of 2 x 16 target tokens, both segments
    assert state["totals"]["time_s"] > first["time_s"]


def test_resuming_with_another_model_names_the_flags_of_the_run(tmp_path, monkeypatch):
    run(tmp_path, "--save-every", "2")
    monkeypatch.setitem(train.LLAMA_SIZES, "tiny-deeper", {**train.LLAMA_SIZES["tiny"], "n_layers": 6})
    with pytest.raises(ValueError, match=r"was saved by a run of another model .*n_layers: model 6, checkpoint 4"
                                         r".* Resume with the flags the run was started with: --model tiny --tp 1"):
        run(tmp_path, "--resume", "--model", "tiny-deeper", "--steps", "3")


def test_a_run_writes_its_flags_and_replays_from_them(tmp_path):
    run(tmp_path / "first", "--lr", "0.25", "--schedule", "cosine", "--train-on-prompt")
    written = tmp_path / "first" / "args.txt"
    replayed = train.parse_args([f"@{written}", "--out", str(tmp_path / "second")])
    original = train.parse_args(["--out", str(tmp_path / "first"), *QUICK, "--lr", "0.25", "--schedule", "cosine",
                                 "--train-on-prompt"])
    assert {**vars(replayed), "out": None} == {**vars(original), "out": None}
    assert replayed.lr == 0.25 and replayed.train_on_prompt and replayed.schedule == "cosine"
