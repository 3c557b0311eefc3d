"""The output folder of a training run (--out): one run at a time, and no run's log or checkpoints lost to another.

- `claim(args, grid)`, before anything is built: rank 0 creates <out>/run.lock exclusively and holds it for the
  run's life; the file names the run's pid and host, so a second run on the same folder (on this node or
  another one that shares the folder) is refused naming them. A lock whose run is gone (this host, no such
  process) is taken over with a message; one from another host is left to the user to remove.
- A folder that already holds a run (metrics.jsonl or committed checkpoints) is refused unless --resume
  (continue it) or --overwrite (start over; what is removed is printed). --eval-only takes no lock and writes
  nothing of the run's: its results are appended to <out>/eval.jsonl.
- `write_args(args, out)`, by `claim`: the resolved flags in <out>/args.txt, which `train.py @<out>/args.txt` replays.
- `cut_metrics(path, step)`, on resume: metrics.jsonl back to the resumed step (the rows of steps that will
  run again go), a torn or blank line (a crash in mid-write) dropped with a message, the file replaced
  atomically.
Left out: locks on filesystems where an exclusive create is not atomic (some old NFS setups).
"""
import json
import os
import shutil
import socket
from pathlib import Path

import torch
import torch.distributed as dist

LOCK = "run.lock"


def holds_a_run(out: Path) -> list:
    """What of a run the folder holds: its log, its committed checkpoints."""
    found = ["metrics.jsonl"] if (out / "metrics.jsonl").is_file() else []
    saves = out / "checkpoints"
    if saves.is_dir():
        found += sorted(f"checkpoints/{p.name}" for p in saves.iterdir() if p.name.startswith("step-"))
    return found


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # it exists, run by another user
        return True
    return True


def _take_lock(out: Path):
    """The lock file's path once this process holds it; an error naming the run that holds it otherwise."""
    path, me = out / LOCK, dict(pid=os.getpid(), host=socket.gethostname())
    for _ in range(2):
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            try:
                holder = json.loads(path.read_text())
            except (OSError, ValueError):
                holder = {}
            if holder.get("host") == me["host"] and isinstance(holder.get("pid"), int) \
                    and not _process_alive(holder["pid"]):
                print(f"{path}: the run that held it (pid {holder['pid']}) is gone; taking the folder over")
                path.unlink(missing_ok=True)
                continue
            raise ValueError(f"--out {out} is in use by another run (pid {holder.get('pid', '?')} on host "
                             f"{holder.get('host', '?')}, lock file {path}): choose another --out, or wait for that "
                             f"run to end (if it is no longer running, delete {path})") from None
        with os.fdopen(fd, "w") as f:
            f.write(json.dumps(me))
        return path
    raise ValueError(f"{path}: could not take the lock; delete it if no run uses {out}")


def _agree(ok: bool, grid) -> bool:
    """Whether every rank is ok: a refusal on one rank stops all of them, none waits in a collective."""
    if not dist.is_initialized():
        return ok
    flag = torch.tensor(float(ok), device=grid.device)
    dist.all_reduce(flag, op=dist.ReduceOp.MIN)
    return bool(flag.item())


class Claim:
    """The folder held for a run; `release()` (at the run's end, also on error) gives the lock back."""

    def __init__(self, lock=None):
        self.lock = lock

    def release(self):
        if self.lock is not None:
            self.lock.unlink(missing_ok=True)
            self.lock = None


def claim(args, grid) -> Claim:
    out, error, lock = Path(args.out), None, None
    if grid.is_main and not args.eval_only:
        try:
            out.mkdir(parents=True, exist_ok=True)
            lock = _take_lock(out)
            found = holds_a_run(out)
            if found and not (args.resume or args.overwrite):
                listed = ", ".join(found[:4]) + (", ..." if len(found) > 4 else "")
                raise ValueError(f"--out {out} holds a run ({listed}): "
                                 f"continue it with --resume, start over with --overwrite (which removes them), "
                                 f"or choose another --out")
            if found and args.overwrite and not args.resume:
                for name in found:
                    (shutil.rmtree if (out / name).is_dir() else os.remove)(out / name)
                print(f"--overwrite: removed {', '.join(found)} from {out}")
            write_args(args, out)
        except (ValueError, OSError) as failure:
            error = failure
    if not _agree(error is None, grid):
        if lock is not None:
            lock.unlink(missing_ok=True)
        raise error if error is not None else ValueError(f"rank 0 refused the output folder --out {out}")
    return Claim(lock)


def write_args(args, out: Path):
    """<out>/args.txt: the run's resolved flags, one argument a line, so that `train.py @<out>/args.txt` replays
    it (flags after it override)."""
    lines = []
    for name, value in vars(args).items():
        if name in ("resume", "overwrite", "eval_only"):  # what this start did, not what the run is
            continue
        flag = "--" + name.replace("_", "-")
        if value is True:
            lines.append(flag)
        elif isinstance(value, (list, tuple)):  # a flag of several values (nargs)
            lines += [flag, *map(str, value)]
        elif value not in (None, False):
            lines += [flag, str(value)]
    temporary = out / "args.txt.tmp"
    temporary.write_text("".join(line + "\n" for line in lines))
    os.replace(temporary, out / "args.txt")


def cut_metrics(path: Path, step: int):
    """metrics.jsonl without the rows after `step` and without torn lines (see the top of this file)."""
    kept, dropped = [], []
    for number, line in enumerate(path.read_text(errors="replace").splitlines(), 1):
        try:
            row = json.loads(line)
        except ValueError:
            dropped.append(number)
            continue
        if isinstance(row, dict) and not row.get("summary") and row.get("step", 0) <= step:
            kept.append(line)
    if dropped:
        print(f"{path}: dropped {len(dropped)} torn or blank line(s) (line {', '.join(map(str, dropped[:5]))}), "
              f"left by a run that stopped while writing")
    temporary = path.with_name(path.name + ".tmp")
    temporary.write_text("".join(line + "\n" for line in kept))
    os.replace(temporary, path)
