"""Checkpoints and stop signals shared by the trainers (``gfn.trainer``, ``ctl_trainer``).

    folder = out_dir / "checkpoints"
    save_checkpoint(acc, folder, step, dict(step=step, elapsed=s), {"gen": g.get_state()},
                    keep=2, extra_file="ctl.pt")
    state, extra = load_checkpoint(acc, list_checkpoints(folder)[-1], "ctl.pt")
    with StopFlag() as flag:        # SIGINT/SIGTERM set flag.hit: save, then stop
        ...

A checkpoint is a folder ``step_<n>``: ``accelerate``'s ``save_state`` (models,
optimizers, registered schedulers, every RNG), the trainer's own ``extra_file``
(``torch.save``) and ``trainer_state.json`` (small JSON state). It is written under a
temporary name and renamed once complete, and the JSON is written last, so a kill at
any point leaves either a whole checkpoint or none: :func:`list_checkpoints` lists only
folders that hold the JSON.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
from pathlib import Path

import torch

__all__ = ["StopFlag", "list_checkpoints", "save_checkpoint", "load_checkpoint"]

DONE = "trainer_state.json"


class StopFlag:
    """SIGINT/SIGTERM -> ``hit`` (checkpoint and stop at the end of the current step); a
    second signal raises KeyboardInterrupt. Installs handlers only on the main thread."""

    def __init__(self) -> None:
        self.hit = False
        self._old: dict = {}

    def __enter__(self):
        import threading

        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._old[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame) -> None:
        if self.hit:
            raise KeyboardInterrupt
        self.hit = True

    def __exit__(self, *exc) -> None:
        for sig, handler in self._old.items():
            signal.signal(sig, handler)


def list_checkpoints(folder: Path) -> list[Path]:
    """Complete checkpoints in ``folder``, oldest first."""
    if not folder.is_dir():
        return []
    found = [p for p in folder.glob("step_*") if (p / DONE).is_file()]
    return sorted(found, key=lambda p: int(p.name.split("_")[1]))


def save_checkpoint(
    acc, folder: Path, step: int, state: dict, extra: dict, keep: int, extra_file: str
) -> Path:
    """Write ``step_<step>`` (see the module docstring) and keep the newest ``keep``."""
    final, tmp = folder / f"step_{step:07d}", folder / f"tmp_step_{step:07d}"
    acc.wait_for_everyone()
    acc.save_state(str(tmp))
    if acc.is_main_process:
        torch.save(extra, tmp / extra_file)
        (tmp / DONE).write_text(json.dumps(state))
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        for old in list_checkpoints(folder)[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    acc.wait_for_everyone()
    return final


def load_checkpoint(acc, path: Path, extra_file: str) -> tuple[dict, dict]:
    """Restore ``acc``'s objects from ``path``; returns (JSON state, extra)."""
    acc.load_state(str(path))
    extra = torch.load(path / extra_file, weights_only=False)
    return json.loads((path / DONE).read_text()), extra
