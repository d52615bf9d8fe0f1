"""Trainer: the one training loop (resume, checkpoints, logs, evaluation, budget, signals).

A method subclasses it and implements its step, what its checkpoint holds beside
accelerate's state, and its export::

    class MyTrainer(Trainer):
        name = "my"                       # progress bar, messages, checkpoint file my.pt
        postfix = {"loss": ".3g"}         # metrics shown on the progress bar

        def __init__(self, model, cfg: TrainConfig, evaluate=None):
            acc = make_accelerator(cfg)
            super().__init__(cfg, acc, evaluate=evaluate)
            opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr)
            self.model, self.opt = acc.prepare(model, opt)   # checkpointed by accelerate

        @property
        def unwrapped(self):              # what evaluate(model, step) and export() see
            return self.acc.unwrap_model(self.model)

        def train_step(self) -> dict:     # one optimizer step; its metrics for the log
            ...
            return dict(loss=float(loss))

    result = MyTrainer(model, cfg).train()   # resumes from cfg.out_dir/checkpoints if present

:meth:`Trainer.train` runs to ``cfg.steps`` (:class:`~llmsample.train.config.TrainConfig`):

- **resume**: the newest checkpoint in ``out_dir/checkpoints`` is loaded if the config
  differs from its own only in ``RESUMABLE_FIELDS`` and :meth:`Trainer.identity` matches
  (else :class:`~llmsample.train.checkpoints.ResumeConflict`); ``overwrite`` starts fresh.
  The log is cut back to the checkpoint, so no event is repeated;
- **log**: one JSON line per event in ``out_dir/metrics.jsonl`` (``start`` or ``resume``,
  ``train`` every ``log_every`` steps and at the last, ``eval``, ``done`` or ``stop``), and
  to accelerate's trackers when ``report_to`` names some;
- **evaluate**: the ``evaluate(model, step)`` callback (a dict of metrics) at step 0, every
  ``eval_every`` steps and at the end;
- **checkpoint** (:mod:`llmsample.train.checkpoints`: accelerate's state, :meth:`extra_state`
  in ``<name>.pt``, the step, the config) every ``save_every`` steps and when the run ends;
- **stop**: SIGINT/SIGTERM (checkpoint, then stop), ``max_minutes`` (checkpoint and
  :meth:`export`, then stop: a budget-limited run leaves a usable result) or
  :meth:`is_done` (checkpoint, final evaluation, :meth:`export`). Under ``accelerate
  launch`` the processes agree on when to stop.

``train()`` returns the last evaluation with the step it was measured at (``eval_step``),
the ``step`` reached, ``finished`` and ``stopped_by`` (None, ``"SIGINT"``, ``"SIGTERM"``
or ``"max_minutes"``).
"""

from __future__ import annotations

import dataclasses
import json
import signal
import time
from collections.abc import Callable
from pathlib import Path

import torch
from tqdm.auto import tqdm

from llmsample.train.checkpoints import (
    ResumeConflict,
    StopFlag,
    load_checkpoint,
    read_state,
    resume_point,
    save_checkpoint,
)
from llmsample.train.config import TrainConfig

__all__ = ["Trainer", "make_accelerator"]


def make_accelerator(cfg: TrainConfig, **kwargs):
    """An ``accelerate.Accelerator`` logging to ``cfg.report_to``'s trackers under
    ``cfg.out_dir``; ``kwargs`` (mixed precision, gradient accumulation, ...) pass through."""
    from accelerate import Accelerator

    log_with = None if cfg.report_to == "none" else cfg.report_to
    return Accelerator(log_with=log_with, project_dir=str(cfg.out_dir), **kwargs)


class Trainer:
    """The loop every method shares; see the module docstring. A subclass implements
    :meth:`train_step` and :attr:`unwrapped`, and where it has them :meth:`extra_state` /
    :meth:`load_extra_state`, :meth:`identity` and :meth:`export`.

    ``acc`` is the run's ``accelerate.Accelerator`` (:func:`make_accelerator`); the modules,
    optimizers and schedulers it prepares (or has registered) are checkpointed with it.
    ``evaluate(model, step)`` returns a dict of metrics (logged as an ``eval`` event).
    ``run_config`` is the config recorded with each checkpoint and compared on resume
    (default ``cfg``; a recipe passes its whole config). ``log_file``: the JSONL log's name
    in ``out_dir``."""

    name = "train"
    postfix: dict[str, str] = {"loss": ".3g"}

    def __init__(
        self,
        cfg: TrainConfig,
        acc,
        *,
        evaluate: Callable[[object, int], dict] | None = None,
        run_config=None,
        log_file: str = "metrics.jsonl",
    ):
        self.cfg, self.acc, self.evaluate = cfg, acc, evaluate
        self.run_config = cfg if run_config is None else run_config
        self.out = Path(cfg.out_dir)
        self.log_path = self.out / log_file
        self.step, self.elapsed = 0, 0.0  # steps done; training wall time, resumes included
        # set when the loop ends (before the final evaluation): how the run ended
        self.finished, self.stopped_by = False, None
        self._saved_step: int | None = None  # the step of the newest checkpoint on disk

    # ------------------------------------------------------------------ what a method implements
    def train_step(self) -> dict:
        """One optimizer step (``self.step`` is the number done before it); returns its
        metrics, logged as a ``train`` event at the ``log_every`` cadence."""
        raise NotImplementedError

    @property
    def unwrapped(self):
        """The trained module as ``evaluate(model, step)`` and :meth:`export` see it."""
        raise NotImplementedError

    def extra_state(self) -> dict:
        """What the checkpoint holds beside accelerate's state (RNGs, buffers, counters)."""
        return {}

    def load_extra_state(self, extra: dict) -> None:
        """Restore what :meth:`extra_state` returned."""

    def identity(self) -> dict:
        """JSON facts about what is trained that a checkpoint must match to be resumed
        (e.g. a head's shape); checked before anything is loaded."""
        return {}

    def export(self) -> Path | None:
        """Write the trained result for use (at the end and at ``max_minutes``)."""
        return None

    def is_done(self) -> bool:
        """Whether the run has reached its end (default: ``cfg.steps`` steps)."""
        return self.step >= self.cfg.steps

    def train_record(self, metrics: dict) -> dict:
        """The ``train`` event of this step (at the log cadence) from its metrics."""
        return dict(event="train", step=self.step, **metrics, elapsed_s=self.elapsed)

    def start_info(self) -> dict:
        """Facts logged with the ``start`` event of a fresh run (sizes, the data split)."""
        return {}

    # ------------------------------------------------------------------ checkpoints and logs
    @property
    def extra_file(self) -> str:
        return f"{self.name}.pt"

    def save(self) -> Path:
        """Checkpoint the current step into ``out_dir/checkpoints`` (all processes call)."""
        state = dict(step=self.step, elapsed=self.elapsed, **self.identity())
        path = save_checkpoint(
            self.acc,
            self.out / "checkpoints",
            self.step,
            state,
            self.extra_state(),
            self.cfg.keep_checkpoints,
            self.extra_file,
            config=self.run_config,
            logs=[self.log_path],
        )
        self._saved_step = self.step
        return path

    def resume(self) -> bool:
        """Load the newest checkpoint if there is one (``overwrite``: delete them first);
        raises :class:`~llmsample.train.checkpoints.ResumeConflict` if the config changed in a
        field that may not change, or if :meth:`identity` differs from the checkpoint's."""
        found = resume_point(
            self.out,
            self.run_config,
            logs=[self.log_path],
            acc=self.acc,
            overwrite=self.cfg.overwrite,
            name=self.name,
        )
        if found is None:
            return False
        saved = read_state(found)
        for key, value in json.loads(json.dumps(self.identity())).items():
            if saved.get(key) != value:
                raise ResumeConflict(
                    f"checkpoint {found} holds {key} {saved.get(key)}, not {value}; use a new "
                    "out_dir, or pass --overwrite to start fresh"
                )
        state, extra = load_checkpoint(self.acc, found, self.extra_file)
        self.load_extra_state(extra)
        self.step, self.elapsed = state["step"], state["elapsed"]
        self._saved_step = self.step
        return True

    def log(self, record: dict) -> None:
        """Append ``record`` to the JSONL log (main process) and to the trackers."""
        if self.acc.is_main_process:
            self.out.mkdir(parents=True, exist_ok=True)
            with open(self.log_path, "a", encoding="utf-8") as fh:
                fh.write(json.dumps(record) + "\n")
        if self.cfg.report_to != "none":
            numbers = {k: v for k, v in record.items() if isinstance(v, int | float)}
            self.acc.log(numbers, step=self.step)

    def _eval(self) -> dict:
        if self.evaluate is None:
            return {}
        result = self.evaluate(self.unwrapped, self.step)
        self.log(dict(event="eval", step=self.step, **result))
        return dict(result, eval_step=self.step)

    def _stop_reason(self, flag: StopFlag) -> str | None:
        """Why the loop ends before the next step: a signal's name, ``"done"`` or
        ``"max_minutes"`` (None: go on). Every process gets the same answer."""
        cfg = self.cfg
        timed_out = bool(cfg.max_minutes) and self.elapsed > 60 * cfg.max_minutes
        votes = [float(flag.signal or 0), float(self.is_done()), float(timed_out)]
        if self.acc.num_processes > 1:  # clocks and signals differ between processes
            local = torch.tensor([votes], device=self.acc.device)
            votes = self.acc.gather(local).max(dim=0).values.tolist()
        signum, done, timed_out = votes
        if signum:
            return signal.Signals(int(signum)).name
        return "done" if done else "max_minutes" if timed_out else None

    # ------------------------------------------------------------------ the loop
    def train(self) -> dict:
        """Run to the end (resuming if a checkpoint exists); returns the last eval (with
        its ``eval_step``), ``step``, ``finished`` and ``stopped_by``."""
        cfg = self.cfg
        resumed = self.resume()
        self.finished, self.stopped_by = False, None
        if cfg.report_to != "none":
            self.acc.init_trackers(self.name, config=dataclasses.asdict(cfg))
        if resumed:
            self.log(dict(event="resume", step=self.step))
        else:
            self.log(dict(event="start", step=self.step, **self.start_info()))
        last = {} if resumed else self._eval()
        bar = tqdm(
            total=cfg.steps,
            initial=self.step,
            desc=self.name,
            dynamic_ncols=True,
            disable=not cfg.progress or not self.acc.is_main_process,
        )
        clock = time.monotonic() - self.elapsed
        with StopFlag() as flag:
            while (reason := self._stop_reason(flag)) is None:
                metrics = self.train_step()
                self.step += 1
                self.elapsed = time.monotonic() - clock
                bar.update(1)
                shown = {k: format(metrics[k], f) for k, f in self.postfix.items() if k in metrics}
                bar.set_postfix(shown)
                if self.step % cfg.log_every == 0 or self.step == cfg.steps:
                    self.log(self.train_record(metrics))
                if cfg.eval_every and self.step % cfg.eval_every == 0 and self.step < cfg.steps:
                    last = self._eval()
                if cfg.save_every and self.step % cfg.save_every == 0:
                    self.save()
            if self._saved_step != self.step:
                self.save()
        bar.close()
        self.finished = reason == "done"
        self.stopped_by = None if self.finished else reason
        if self.finished:
            last = self._eval()
            self.export()
            self.log(dict(event="done", step=self.step, elapsed_s=self.elapsed))
        else:
            if reason == "max_minutes":  # a time budget: leave a usable result too
                self.export()
            self.log(dict(event="stop", step=self.step, elapsed_s=self.elapsed, reason=reason))
        if cfg.report_to != "none":
            self.acc.end_training()
        last.setdefault("eval_step", None)
        return dict(last, step=self.step, finished=self.finished, stopped_by=self.stopped_by)
