"""Checkpoints, resume checks and stop signals shared by every trainer (the loop that uses
them is :class:`llmsample.train.base.Trainer`).

    start = resume_point(out_dir, cfg, logs=[out_dir / "metrics.jsonl"], acc=acc, name="ctl")
    if start is not None:                   # cfg checked against the checkpoint's config
        state, extra = load_checkpoint(acc, start, "ctl.pt")
    with StopFlag() as flag:                # SIGINT/SIGTERM set flag.signal: save, then stop
        ...
        save_checkpoint(acc, out_dir / "checkpoints", step, dict(step=step), {"gen": g},
                        keep=2, extra_file="ctl.pt", config=cfg, logs=[...])

A checkpoint is a folder ``step_<n>``: ``accelerate``'s ``save_state`` (the models'
trainable parameters only, optimizers, registered schedulers, every RNG), the trainer's
own ``extra_file`` (``torch.save``), ``run.json`` (the run's config and the size of each
log file at that moment) and ``trainer_state.json`` (small JSON state). It is written
under a temporary name and renamed once complete, and the state JSON is written last,
so a kill at any point leaves either a whole checkpoint or none: :func:`list_checkpoints` lists only
folders that hold it.

Resuming (:func:`resume_point`) is what a rerun of the same command does:

- the config must match the checkpoint's, except the fields the config class lists in
  ``RESUMABLE_FIELDS`` (budgets, intervals, progress: things that do not change what is
  trained); any other difference raises :class:`ResumeConflict`, naming each field
  (old -> new) and the two ways out: a new ``out_dir`` or ``overwrite`` (start fresh);
- ``overwrite`` deletes the checkpoints and the logs and starts from step 0;
- each log is cut back to its size at the checkpoint, so events written after it and
  before a kill are not repeated: the log reads as if the run had not been interrupted
  (plus one ``resume`` event).

A run stopped by a signal exits with status ``128 + signal`` (SIGINT 130, SIGTERM 143)
from the recipes (:func:`llmsample.config.run_recipe`, with :func:`signal_stop`).
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import signal
import sys
from collections.abc import Sequence
from pathlib import Path

import torch

__all__ = [
    "ResumeConflict",
    "StopFlag",
    "check_resume",
    "config_changes",
    "list_checkpoints",
    "load_checkpoint",
    "read_state",
    "resumable_fields",
    "resume_point",
    "save_checkpoint",
    "signal_stop",
    "start_fresh",
]

DONE = "trainer_state.json"
RUN = "run.json"
# never a reason to refuse a resume: where the run lives (it may have been moved) and
# the switch that would have started it afresh
ALWAYS_RESUMABLE = ("out_dir", "overwrite")


class StopFlag:
    """SIGINT/SIGTERM -> ``signal`` (checkpoint and stop at the end of the current step);
    a second signal raises KeyboardInterrupt. Installs handlers only on the main thread."""

    def __init__(self) -> None:
        self.signal: int | None = None
        self._old: dict = {}

    @property
    def hit(self) -> bool:
        return self.signal is not None

    @property
    def name(self) -> str | None:
        """``"SIGINT"`` / ``"SIGTERM"`` once hit, else None."""
        return None if self.signal is None else signal.Signals(self.signal).name

    def __enter__(self):
        import threading

        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._old[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame) -> None:
        if self.signal is not None:
            raise KeyboardInterrupt
        self.signal = signum

    def __exit__(self, *exc) -> None:
        for sig, handler in self._old.items():
            signal.signal(sig, handler)


def signal_stop(name: str | None, step: int) -> dict | None:
    """``{"signal", "step", "exit_status"}`` of a run stopped by signal ``name`` at
    ``step`` (what recipe summaries record as ``stopped_by_signal``); None otherwise."""
    if name not in ("SIGINT", "SIGTERM"):
        return None
    return dict(signal=name, step=step, exit_status=128 + int(signal.Signals[name]))


# ---------------------------------------------------------------------------- configs


class ResumeConflict(ValueError):
    """The config differs from the checkpoint's in fields that may not change on resume."""


def _record(cfg) -> dict:
    """``cfg`` (a dataclass) as plain JSON values, the form saved with each checkpoint."""
    return json.loads(json.dumps(dataclasses.asdict(cfg), default=str))


def resumable_fields(cfg) -> tuple[str, ...]:
    """Fields of ``cfg`` that may differ from the checkpoint's when resuming: its class's
    ``RESUMABLE_FIELDS`` plus ``out_dir`` and ``overwrite``."""
    return tuple(dict.fromkeys((*getattr(cfg, "RESUMABLE_FIELDS", ()), *ALWAYS_RESUMABLE)))


def config_changes(saved: dict, cfg) -> list[tuple[str, object, object]]:
    """(field, old, new) for each field of ``cfg`` that differs from ``saved`` and may not
    change on resume. Fields the saved config lacks (added since) are not compared."""
    now, allowed = _record(cfg), set(resumable_fields(cfg))
    changed = [k for k, v in now.items() if k in saved and saved[k] != v]
    return [(k, saved[k], now[k]) for k in changed if k not in allowed]


def _read_run(checkpoint: Path) -> dict:
    path = checkpoint / RUN
    return json.loads(path.read_text()) if path.is_file() else {}


def check_resume(
    out_dir: Path | str, cfg, marker: str = DONE, overwrite: bool | None = None
) -> Path | None:
    """The newest checkpoint under ``out_dir/checkpoints`` (None if there is none or
    ``overwrite``, by default ``cfg.overwrite``), after checking that ``cfg`` may resume
    it: raises :class:`ResumeConflict` naming every field that changed and may not.
    Reads only: recipes call it early, before any slow setup."""
    out_dir = Path(out_dir)
    if overwrite is None:
        overwrite = bool(getattr(cfg, "overwrite", False))
    found = list_checkpoints(out_dir / "checkpoints", marker)
    if not found or overwrite:
        return None
    saved = _read_run(found[-1]).get("config")
    if saved is None:  # a checkpoint from before configs were recorded: nothing to compare
        return found[-1]
    changes = config_changes(saved, cfg)
    if changes:
        step = read_state(found[-1], marker).get("step")
        diff = ", ".join(f"{k} {old!r} -> {new!r}" for k, old, new in changes)
        allowed = ", ".join(f for f in resumable_fields(cfg) if f not in ALWAYS_RESUMABLE)
        raise ResumeConflict(
            f"{out_dir} holds a checkpoint (step {step}) of a run with other settings: {diff}; "
            f"only {allowed} may change when resuming. Use a new out_dir to keep that run, "
            f"or pass --overwrite to start fresh (deletes {out_dir / 'checkpoints'} and the "
            "run's logs)"
        )
    return found[-1]


# ---------------------------------------------------------------------------- files


def list_checkpoints(folder: Path, marker: str = DONE) -> list[Path]:
    """Complete checkpoints in ``folder``, oldest first."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    found = [p for p in folder.glob("step_*") if (p / marker).is_file()]
    return sorted(found, key=lambda p: int(p.name.split("_")[1]))


def save_checkpoint(
    acc,
    folder: Path,
    step: int,
    state: dict,
    extra: dict | None = None,
    keep: int = 2,
    extra_file: str | None = None,
    *,
    config=None,
    logs: Sequence[Path] = (),
    marker: str = DONE,
) -> Path:
    """Write ``step_<step>`` (see the module docstring) and keep the newest ``keep``.
    ``config`` (a dataclass) is recorded for :func:`check_resume`; each of ``logs`` has
    its current size recorded, to be cut back to on resume."""
    folder = Path(folder)
    final, tmp = folder / f"step_{step:07d}", folder / f"tmp_step_{step:07d}"
    if acc.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)  # a half-written one from a kill
    acc.wait_for_everyone()
    handle = acc.register_save_state_pre_hook(_trainable_only)
    try:
        acc.save_state(str(tmp))
    finally:
        handle.remove()
    acc.wait_for_everyone()
    if acc.is_main_process:
        if extra is not None:
            torch.save(extra, tmp / extra_file)
        sizes = {Path(p).name: Path(p).stat().st_size for p in logs if Path(p).is_file()}
        run = dict(config=None if config is None else _record(config), log_sizes=sizes)
        (tmp / RUN).write_text(json.dumps(run, indent=2))
        (tmp / marker).write_text(json.dumps(state))
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        for old in list_checkpoints(folder, marker)[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    acc.wait_for_everyone()
    return final


def _trainable_only(models, weights, output_dir) -> None:
    """accelerate save hook: keep only each model's trainable parameters (a LoRA adapter and
    a log Z head, not the frozen base model they sit on), so a checkpoint holds what
    training changes."""
    for i, (model, weight) in enumerate(zip(models, weights)):
        # one name per tensor: a tied output embedding is saved (and restored) once
        trainable = {name for name, param in model.named_parameters() if param.requires_grad}
        weights[i] = {k: v for k, v in weight.items() if k in trainable}


def read_state(path: Path, marker: str = DONE) -> dict:
    """The small JSON state of checkpoint ``path`` (its step, ...), without loading it."""
    return json.loads((Path(path) / marker).read_text())


def load_checkpoint(
    acc, path: Path, extra_file: str | None = None, marker: str = DONE
) -> tuple[dict, dict | None]:
    """Restore ``acc``'s objects from ``path``; returns (JSON state, extra or None).
    Models get back their trainable parameters; frozen ones keep what they were built with
    (checkpoints hold only what training changes)."""
    acc.load_state(str(path), strict=False)
    extra = None if extra_file is None else torch.load(path / extra_file, weights_only=False)
    return read_state(path, marker), extra


def start_fresh(out_dir: Path | str, paths: Sequence[Path] = ()) -> None:
    """Delete ``out_dir/checkpoints`` and each of ``paths`` (files or folders)."""
    for path in (Path(out_dir) / "checkpoints", *map(Path, paths)):
        if path.is_dir():
            shutil.rmtree(path, ignore_errors=True)
        elif path.exists():
            path.unlink()


def _truncate(path: Path, size: int) -> None:
    if path.is_file() and path.stat().st_size > size:
        with open(path, "r+b") as fh:
            fh.truncate(size)


def resume_point(
    out_dir: Path | str,
    cfg,
    *,
    logs: Sequence[Path] = (),
    fresh: Sequence[Path] = (),
    acc=None,
    overwrite: bool | None = None,
    marker: str = DONE,
    name: str = "train",
) -> Path | None:
    """Where a run starts: the checkpoint to resume (checked with :func:`check_resume`),
    or None to start at step 0.

    - ``overwrite`` (default ``cfg.overwrite``): delete the checkpoints, ``logs`` and
      ``fresh`` (other files of the run), start fresh;
    - no checkpoint: empty ``logs`` (they belong to a run that left no checkpoint);
    - a checkpoint: cut each log back to its size when it was written, and print
      ``[name] resuming from <path> at step N`` to stderr.

    Files are touched by the main process only (``acc.is_main_process``; every process
    waits for it)."""
    out_dir = Path(out_dir)
    main = acc is None or acc.is_main_process
    if overwrite is None:
        overwrite = bool(getattr(cfg, "overwrite", False))
    found = check_resume(out_dir, cfg, marker, overwrite)
    if main:
        if overwrite:
            start_fresh(out_dir, [*logs, *fresh])
        elif found is None:
            for path in logs:
                _truncate(Path(path), 0)
        else:
            sizes = _read_run(found).get("log_sizes", {})
            for path in logs:
                if Path(path).name in sizes:
                    _truncate(Path(path), sizes[Path(path).name])
            step = read_state(found, marker).get("step")
            print(f"[{name}] resuming from {found} at step {step}", file=sys.stderr, flush=True)
    if acc is not None:
        acc.wait_for_everyone()
    return found
