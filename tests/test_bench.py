"""bench.py's code paths on the CPU (the tiny model): every mode runs in its own process and reports."""
import json

import pytest

import bench


def test_every_mode_runs_and_reports(tmp_path, capsys):
    out = tmp_path / "bench.jsonl"
    bench.main(["--tiny", "--steps", "1", "--warmup", "1", "--out", str(out)])
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["mode"] for r in rows] == bench.MODES
    for row in rows:
        assert row["tokens_per_s"] > 0 and row["device"] == "cpu" and row["param_gib"] > 0
        inference = row["mode"].startswith("infer")
        assert row["flops_per_token"] == (2 if inference else 6) * 869_504 + (4 if inference else 12) * 4 * 64 * 128


def test_tensor_parallel_modes_run_under_torchrun(tmp_path):
    out = tmp_path / "bench.jsonl"
    bench.main(["--tiny", "--tp", "2", "--modes", "lomo,lomo-clip", "--steps", "1", "--warmup", "1",
                "--out", str(out)])
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [(r["mode"], r["tp"]) for r in rows] == [("lomo", 2), ("lomo-clip", 2)]
    assert rows[0]["param_gib"] < 0.6 * 869_504 * 4 / 2**30  # each rank holds about half the model


def test_compiled_blocks_run(tmp_path):
    out = tmp_path / "bench.jsonl"
    bench.main(["--tiny", "--compile", "--modes", "lomo-clip", "--steps", "1", "--warmup", "1", "--out", str(out)])
    row = json.loads(out.read_text())
    assert row["compile"] is True and row["tokens_per_s"] > 0


def test_offloaded_checkpoints_run_and_need_checkpointing(tmp_path):
    out = tmp_path / "bench.jsonl"
    bench.main(["--tiny", "--activation-checkpointing", "--offload-checkpoints", "--modes", "lomo,lomo-clip",
                "--steps", "1", "--warmup", "1", "--out", str(out)])
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert all(r["offload_checkpoints"] and r["tokens_per_s"] > 0 for r in rows)
    with pytest.raises(SystemExit, match="add --activation-checkpointing"):
        bench.main(["--tiny", "--offload-checkpoints", "--modes", "lomo"])
