"""Resumable training state: accelerate's (weights, optimizer, RNGs) plus the loop's, in step-N/ folders."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from accelerate import Accelerator


def latest_checkpoint(checkpoint_dir: Path) -> Path | None:
    """The newest complete step-N folder, or None."""
    done = [p for p in checkpoint_dir.glob("step-*") if (p / "trainer_state.json").is_file()]
    return max(done, key=lambda p: int(p.name.split("-")[1]), default=None)


def save_checkpoint(
    accelerator: Accelerator, checkpoint_dir: Path, step: int, trainer_state: dict, keep: int
) -> Path:
    """accelerate's state (weights, optimizer, RNGs) plus ours, in step-N/; only the newest `keep` stay."""
    path = checkpoint_dir / f"step-{step}"
    tmp = path.with_name(path.name + ".partial")
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp))
    if accelerator.is_main_process:
        (tmp / "trainer_state.json").write_text(json.dumps(trainer_state, indent=2) + "\n")
        shutil.rmtree(path, ignore_errors=True)
        tmp.rename(path)
        kept = sorted((p for p in checkpoint_dir.glob("step-*") if p.suffix != ".partial"),
                      key=lambda p: int(p.name.split("-")[1]))
        for stale in kept[: max(0, len(kept) - keep)]:
            shutil.rmtree(stale, ignore_errors=True)
    accelerator.wait_for_everyone()
    return path
