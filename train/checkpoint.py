"""Training checkpoints: written atomically (staging folder, then rename), the last K kept.

A checkpoint holds the model (projector, and LoRA or LM weights when those train), the optimizer
and scheduler state, the RNG states and the data position, so `--resume` continues the exact run.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from vlm.files import atomic_dir


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


def save_checkpoint(output_dir: Path, model, optimizer, scheduler, progress: Progress, keep_last: int) -> Path:
    root = checkpoints_dir(output_dir)
    name = f"{progress.stage}-step-{progress.step:07d}{'-done' if progress.done else ''}"
    target = root / name
    with atomic_dir(target) as staging:
        model.save_pretrained(staging / "model")
        torch.save(optimizer.state_dict(), staging / "optimizer.pt")
        torch.save(scheduler.state_dict(), staging / "scheduler.pt")
        rng = {"cpu": torch.get_rng_state()}
        if torch.cuda.is_available():
            rng["cuda"] = torch.cuda.get_rng_state()
        save_file(rng, staging / "rng.safetensors")
        (staging / "progress.json").write_text(json.dumps(asdict(progress), indent=2))
    for old in list_checkpoints(output_dir)[:-keep_last]:
        shutil.rmtree(old)
    return target


def list_checkpoints(output_dir: Path) -> list[Path]:
    """Complete checkpoints, oldest first: names sort by stage (align < instruct), then step.

    Staging folders start with '.' and are never listed.
    """
    root = checkpoints_dir(output_dir)
    return sorted(p for p in root.glob("*-step-*") if (p / "progress.json").is_file()) if root.is_dir() else []


def read_progress(checkpoint: Path) -> Progress:
    return Progress(**json.loads((checkpoint / "progress.json").read_text()))


def restore_training_state(checkpoint: Path, optimizer, scheduler) -> None:
    # Our own files, written by save_checkpoint; weights_only keeps even those from running code.
    optimizer.load_state_dict(torch.load(checkpoint / "optimizer.pt", weights_only=True))
    scheduler.load_state_dict(torch.load(checkpoint / "scheduler.pt", weights_only=True))
    restore_rng(checkpoint)


def restore_rng(checkpoint: Path) -> None:
    rng = load_file(checkpoint / "rng.safetensors")
    torch.set_rng_state(rng["cpu"])
    if "cuda" in rng and torch.cuda.is_available():
        torch.cuda.set_rng_state(rng["cuda"])
