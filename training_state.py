"""Training state: save a run at a step with an atomic commit, find the newest complete save, and resume from it
exactly (weights, every rank's random number generators, the caller's state).

- `save_training_state`: root/step-NNNNNNNN/ holds one safetensors file per tp rank (written by dp rank 0: the dp
  replicas are identical), every rank's RNG state, the caller's state, and manifest.json. The manifest is written
  last, after a barrier, and the folder is renamed into place: that is the commit. The newest `keep` committed
  saves are kept, older ones deleted only after the commit. The caller's state must be plain data that
  torch.load(weights_only=True) reads back, and is refused at save time otherwise.
- `find_latest_checkpoint` skips a step folder with no manifest, a file missing or of another size than the
  manifest says, or a safetensors header that does not parse, and says why.
- `remove_leftovers`, on resume: what a crash in a save or a deletion left (.step-N.tmp, .deleting, .old folders)
  is finished off, removed or put back, each with a message. Old saves are deleted by first renaming them
  (atomic), so a kill never leaves a half-deleted step folder.
- `load_training_state` loads at any tp (through checkpoint.load_checkpoint); the RNG state is restored when the
  world layout is the same.

Left out: file checksums (sizes and headers are checked); a checkpoint folder that not every rank can see.
"""
import dataclasses
import io
import json
import os
import random
import re
import shutil
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from checkpoint import barrier, load_checkpoint, model_params
from checkpoint_formats import MANIFEST, read_json
from safetensors_io import fsync_folder, read_header, write_file, write_safetensors
from shard import SPLIT_DIM, Grid


def _rng_state() -> dict:
    name, keys, position, has_gauss, gauss = np.random.get_state()
    state = dict(python=random.getstate(), torch=torch.get_rng_state(),
                 numpy=(name, torch.from_numpy(keys.astype(np.int64)), position, has_gauss, gauss))
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state()  # this rank's device
    return state


def _set_rng_state(state: dict):
    random.setstate(state["python"])
    torch.set_rng_state(state["torch"])
    name, keys, position, has_gauss, gauss = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), position, has_gauss, gauss))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def _step_folders(root: Path) -> list:
    """step-NNNNNNNN folders under root, oldest first (committed or not)."""
    return sorted(p for p in root.iterdir() if p.is_dir() and re.fullmatch(r"step-\d{8}", p.name)) \
        if root.is_dir() else []


def save_training_state(root, step: int, model, grid: Optional[Grid], state: dict, keep: int = 3) -> Path:
    """Save root/step-{step:08d}/ and return it; every rank calls it. Keeps the newest `keep` committed
    checkpoints (keep <= 0: all), deleting older ones only once this one is committed."""
    root, grid = Path(root), grid or Grid()
    folder, temporary = root / f"step-{step:08d}", root / f".step-{step:08d}.tmp"
    buffer = io.BytesIO()
    torch.save(state, buffer)
    try:  # refuse now what resume would refuse: state must be plain data (numbers, strings, lists, dicts, tensors)
        torch.load(io.BytesIO(buffer.getvalue()), weights_only=True)
    except Exception as error:
        raise ValueError(f"the training state is not plain data that torch.load(weights_only=True) reads back: "
                         f"{error}. Pass dicts of numbers, strings, lists and tensors (vars(args) for flags)") from None
    if grid.rank == 0:
        if temporary.exists():
            shutil.rmtree(temporary)  # left by a save that crashed
        temporary.mkdir(parents=True)
    barrier()
    if grid.dp_rank == 0:  # the dp replicas hold the same weights: one copy of each tp shard is enough
        write_safetensors(temporary / f"model-tp{grid.tp_rank:02d}-of-{grid.tp:02d}.safetensors", model_params(model),
                          metadata=dict(tp=grid.tp, tp_rank=grid.tp_rank))
    write_file(temporary / f"rng-rank{grid.rank:05d}.pt", lambda f: torch.save(_rng_state(), f))
    barrier()  # every rank's files are on disk before the commit
    if grid.rank == 0:
        write_file(temporary / "state.pt", lambda f: f.write(buffer.getvalue()))
        manifest = dict(step=step, tp=grid.tp, dp=grid.dp, world_size=grid.world_size, split_dims=SPLIT_DIM,
                        model_args=dataclasses.asdict(model.args),
                        files={p.name: p.stat().st_size for p in sorted(temporary.iterdir())})
        write_file(temporary / MANIFEST, lambda f: f.write(json.dumps(manifest, indent=2).encode()))
        fsync_folder(temporary)
        old = root / f".step-{step:08d}.old"
        shutil.rmtree(old, ignore_errors=True)
        if folder.exists():  # the same step saved again: move the old one aside, never delete before the commit
            os.replace(folder, old)
        os.replace(temporary, folder)  # the commit
        fsync_folder(root)
        shutil.rmtree(old, ignore_errors=True)
        problem = _incomplete(folder)  # read back: an old save goes only once the new one is known good
        if problem is not None:
            raise OSError(f"{folder} was written but does not read back ({problem}); the older saves are kept")
        committed = [p for p in _step_folders(root) if (p / MANIFEST).is_file() and p.name <= folder.name]
        for stale in committed[:-keep] if keep > 0 else []:
            doomed = root / f".{stale.name}.deleting"
            os.replace(stale, doomed)  # atomic: a kill during the deletion leaves no half-deleted step folder
            shutil.rmtree(doomed)
    barrier()
    return folder


def _incomplete(folder: Path) -> Optional[str]:
    """Why a step folder cannot be resumed from, or None when it is complete."""
    if not (folder / MANIFEST).is_file():
        return f"no {MANIFEST}: the save did not finish"
    try:
        manifest = read_json(folder / MANIFEST)
        for name, size in manifest["files"].items():
            if not (folder / name).is_file():
                return f"{name} is missing"
            if (folder / name).stat().st_size != size:
                return f"{name} has {(folder / name).stat().st_size} bytes, the manifest says {size}"
            if name.endswith(".safetensors"):
                read_header(folder / name)
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as error:
        return f"corrupt: {error}"
    return None


def remove_leftovers(root, say=print):
    """What a crash during a save leaves under root, put right with a message: a deletion finished
    (.step-N.deleting), a save that never committed removed (.step-N.tmp), the previous save of a step whose
    second save crashed in its commit put back (.step-N.old, when step-N is missing, else removed). Step folders
    older than the newest complete one that cannot be resumed from are named, not deleted (they may be a user's)."""
    root = Path(root)
    if not root.is_dir():
        return
    for path in sorted(root.iterdir()):
        found = re.fullmatch(r"\.(step-\d{8})\.(deleting|tmp|old)", path.name)
        if not found or not path.is_dir():
            continue
        name, kind = found.groups()
        if kind == "old" and not (root / name).exists():
            os.replace(path, root / name)
            say(f"{root / name}: put back the save that a crashed re-save of step {name[5:]} had moved aside")
            continue
        shutil.rmtree(path)
        why = dict(deleting="a deletion that was cut short", tmp="a save that never committed",
                   old="superseded by the newer save of the same step")[kind]
        say(f"{path}: removed ({why})")
    steps = _step_folders(root)
    complete = [p for p in steps if _incomplete(p) is None]
    for folder in steps:
        if complete and folder.name < complete[-1].name and _incomplete(folder) is not None:
            say(f"{folder}: cannot be resumed from ({_incomplete(folder)}); left as it is, delete it if no one "
                f"needs it")


def find_latest_checkpoint(root) -> Optional[Path]:
    """The newest complete step folder under root, or None; incomplete or corrupt ones are skipped, with a message."""
    for folder in reversed(_step_folders(Path(root))):
        problem = _incomplete(folder)
        if problem is None:
            return folder
        print(f"skipping checkpoint {folder}: {problem}")
    return None


def load_training_state(folder, model, grid: Optional[Grid] = None) -> dict:
    """Fill the model from a training-state folder at this run's tp, restore this rank's RNG state (when the world
    layout is the one it was saved with), and return the state dict given to save_training_state."""
    folder, grid = Path(folder), grid or Grid()
    problem = _incomplete(folder)
    if problem:
        raise ValueError(f"{folder} cannot be resumed from: {problem}")
    load_checkpoint(folder, model, grid)
    manifest = read_json(folder / MANIFEST)
    if (manifest["world_size"], manifest["tp"]) == (grid.world_size, grid.tp):
        _set_rng_state(torch.load(folder / f"rng-rank{grid.rank:05d}.pt", weights_only=True))
    elif grid.is_main:
        print(f"{folder} was saved by {manifest['world_size']} processes at tp={manifest['tp']}, this run has "
              f"{grid.world_size} at tp={grid.tp}: weights resharded, random number generators not restored")
    return torch.load(folder / "state.pt", weights_only=True)
