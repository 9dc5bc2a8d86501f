"""Training checkpoints: written atomically (staging folder, then rename), the last K kept.

A checkpoint holds the model (projector, and LoRA or LM weights when those train), the optimizer
and scheduler state, the RNG states and the data position, so `--resume` continues the exact run.
"""

from __future__ import annotations

import errno
import json
import pickle
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from vlm.config import ConfigError
from vlm.files import DISK_FAULTS, WriteError, atomic_dir


@dataclass
class Progress:
    stage: str
    step: int = 0  # optimizer steps done in this stage
    epoch: int = 0
    batches_in_epoch: int = 0  # batches of `epoch` already consumed
    samples: int = 0
    seconds: float = 0.0  # training wall time so far, across restarts
    done: bool = False


def checkpoints_dir(output_dir: Path) -> Path:
    return output_dir / "checkpoints"


@contextmanager
def run_folder_writes(output_dir: Path) -> Iterator[None]:
    """A disk that refuses the run folder's files (full, read-only, no permission) stops the run with
    one line naming the folder and the way out."""
    try:
        yield
    except OSError as e:
        if e.errno not in DISK_FAULTS:
            raise
        where = e.filename if isinstance(e, WriteError) else output_dir
        if e.errno in (errno.ENOSPC, errno.EDQUOT):
            way_out = ("free space there and continue with --resume, "
                       "or set train.output_dir=<a folder on another disk>")
        else:
            way_out = "make it writable, or set train.output_dir=<a folder you can write>"
        raise ConfigError(f"cannot write {where}: {e.strerror}; {way_out}") from None


def check_run_folder(output_dir: Path) -> None:
    """Stop before any model loads if the run folder cannot take a file."""
    with run_folder_writes(output_dir):
        output_dir.mkdir(parents=True, exist_ok=True)
        tempfile.TemporaryFile(dir=output_dir).close()


def save_checkpoint(output_dir: Path, model, optimizer, scheduler, progress: Progress, keep_last: int) -> Path:
    root = checkpoints_dir(output_dir)
    name = f"{progress.stage}-step-{progress.step:07d}{'-done' if progress.done else ''}"
    target = root / name
    with run_folder_writes(output_dir), atomic_dir(target) as staging:
        model.save_pretrained(staging / "model")
        torch.save(optimizer.state_dict(), staging / "optimizer.pt")
        torch.save(scheduler.state_dict(), staging / "scheduler.pt")
        rng = {"cpu": torch.get_rng_state()}
        if torch.cuda.is_available():
            rng["cuda"] = torch.cuda.get_rng_state()
        save_file(rng, staging / "rng.safetensors")
        (staging / "progress.json").write_text(json.dumps(asdict(progress), indent=2))
    # Only the main process writes checkpoints, and this one is in place: any staging folder left is a
    # killed writer's half checkpoint.
    for old in list_checkpoints(output_dir)[:-keep_last] + list(root.glob(".*-step-*")):
        shutil.rmtree(old)
    return target


def list_checkpoints(output_dir: Path) -> list[Path]:
    """Complete checkpoints, oldest first: names sort by stage (align < instruct), then step.

    Staging folders start with '.' and are never listed (pathlib's `*` matches a leading '.').
    """
    root = checkpoints_dir(output_dir)
    return sorted(p for p in root.glob("[!.]*-step-*") if (p / "progress.json").is_file()) if root.is_dir() else []


def read_progress(checkpoint: Path) -> Progress:
    return Progress(**json.loads((checkpoint / "progress.json").read_text()))


def restore_training_state(checkpoint: Path, optimizer, scheduler) -> None:
    optimizer.load_state_dict(_load_state(checkpoint / "optimizer.pt"))
    scheduler.load_state_dict(_load_state(checkpoint / "scheduler.pt"))
    restore_rng(checkpoint)


def _load_state(path: Path) -> dict:
    # save_checkpoint writes these, but anyone who can write the run folder can replace them, and a
    # pickle runs code as it loads: weights_only takes tensors and plain containers, nothing else.
    try:
        return torch.load(path, weights_only=True)
    except pickle.UnpicklingError:
        raise ConfigError(
            f"refused to load {path}: it holds more than plain tensors, and loading it could run code; "
            "delete that checkpoint folder to resume from an earlier one, or start over in a new train.output_dir"
        ) from None


def restore_rng(checkpoint: Path) -> None:
    rng = load_file(checkpoint / "rng.safetensors")
    torch.set_rng_state(rng["cpu"])
    if "cuda" in rng and torch.cuda.is_available():
        torch.cuda.set_rng_state(rng["cuda"])
