"""The shared training loop (llmsample.train.base.Trainer) and its config (TrainConfig).

A trivial Trainer subclass (a linear regression on random batches) is enough to check what
every method inherits: a run stopped by a signal resumes exactly and does not redo finished
steps; the time budget stops with a checkpoint and an export; a checkpoint of another
``identity`` is refused; the shared config validation applies to every method's config.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import signal

import pytest
import torch

from llmsample.config import parse_config
from llmsample.ctl.trainer import CTLConfig
from llmsample.gfn import GFNConfig
from llmsample.train import TrainConfig, Trainer, make_accelerator
from llmsample.train.checkpoints import ResumeConflict, list_checkpoints


class Line(Trainer):
    """Fit y = sum(x) with a linear layer; ``signal_at``: SIGTERM during that step."""

    name = "line"

    def __init__(self, cfg: TrainConfig, width: int = 3, signal_at: int | None = None):
        super().__init__(cfg, make_accelerator(cfg), evaluate=self.score)
        torch.manual_seed(0)
        model = torch.nn.Linear(width, 1)
        self.model, self.opt = self.acc.prepare(model, torch.optim.SGD(model.parameters(), 0.1))
        self.gen = torch.Generator().manual_seed(cfg.seed)
        self.width, self.signal_at = width, signal_at
        self.ran: list[int] = []  # steps this object computed
        self.exports = 0

    @property
    def unwrapped(self):
        return self.acc.unwrap_model(self.model)

    def train_step(self) -> dict:
        if self.step + 1 == self.signal_at:
            os.kill(os.getpid(), signal.SIGTERM)  # as `kill` would: finish the step, save, stop
        x = torch.randn(8, self.width, generator=self.gen)
        loss = (self.model(x) - x.sum(1, keepdim=True)).pow(2).mean()
        self.acc.backward(loss)
        self.opt.step()
        self.opt.zero_grad()
        self.ran.append(self.step + 1)
        return dict(loss=float(loss.detach()))

    def extra_state(self) -> dict:
        return {"gen": self.gen.get_state()}

    def load_extra_state(self, extra: dict) -> None:
        self.gen.set_state(extra["gen"])

    def identity(self) -> dict:
        return {"width": self.width}

    def export(self):
        self.exports += 1

    def score(self, model, step: int) -> dict:
        return {"weight_sum": float(model.weight.detach().sum())}


def _cfg(out, **kw) -> TrainConfig:
    base = dict(steps=6, out_dir=str(out), save_every=0, log_every=1, progress=False)
    return TrainConfig(**(base | kw))


def _events(out) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_a_stopped_run_resumes_exactly_and_does_not_redo_finished_steps(tmp_path):
    straight = Line(_cfg(tmp_path / "a"))
    result = straight.train()
    assert result["finished"] and result["step"] == 6 and result["stopped_by"] is None
    assert result["eval_step"] == 6 and straight.exports == 1

    stopped = Line(_cfg(tmp_path / "b"), signal_at=3)
    result = stopped.train()
    assert not result["finished"] and result["stopped_by"] == "SIGTERM" and result["step"] == 3
    assert result["eval_step"] == 0 and stopped.exports == 0  # a signal: checkpoint only
    assert [p.name for p in list_checkpoints(tmp_path / "b" / "checkpoints")] == ["step_0000003"]

    again = Line(_cfg(tmp_path / "b"))
    result = again.train()
    assert result["finished"] and again.ran == [4, 5, 6]  # steps 1-3 are not redone
    assert torch.equal(again.unwrapped.weight, straight.unwrapped.weight)
    ref, got = _events(tmp_path / "a"), _events(tmp_path / "b")
    trains = [(e["step"], e["loss"]) for e in got if e["event"] == "train"]
    assert trains == [(e["step"], e["loss"]) for e in ref if e["event"] == "train"]
    others = [e["event"] for e in got if e["event"] != "train"]
    assert others == ["start", "eval", "resume", "eval", "done"]  # the stop event was cut back

    # a finished run resumed with the same steps: nothing to do but the end
    done = Line(_cfg(tmp_path / "b"))
    assert done.train()["finished"] and done.ran == []


def test_the_stop_event_is_cut_back_with_the_rest_of_the_interrupted_tail(tmp_path):
    Line(_cfg(tmp_path), signal_at=2).train()
    assert [e["event"] for e in _events(tmp_path)][-1] == "stop"
    Line(_cfg(tmp_path)).train()
    events = [e["event"] for e in _events(tmp_path)]
    assert events.count("stop") == 0 and events.count("resume") == 1  # as if never stopped


def test_time_budget_stops_with_a_checkpoint_and_an_export(tmp_path):
    trainer = Line(_cfg(tmp_path, max_minutes=1e-9))
    result = trainer.train()
    assert result["stopped_by"] == "max_minutes" and not result["finished"]
    assert result["step"] == 1 and trainer.exports == 1
    assert list_checkpoints(tmp_path / "checkpoints")
    assert _events(tmp_path)[-1] == dict(
        event="stop", step=1, elapsed_s=trainer.elapsed, reason="max_minutes"
    )


def test_cadence_of_logs_evaluations_and_checkpoints(tmp_path):
    Line(_cfg(tmp_path, steps=7, log_every=3, eval_every=2, save_every=3)).train()
    events = _events(tmp_path)
    assert [e["step"] for e in events if e["event"] == "train"] == [3, 6, 7]  # and the last
    assert [e["step"] for e in events if e["event"] == "eval"] == [0, 2, 4, 6, 7]
    kept = [p.name for p in list_checkpoints(tmp_path / "checkpoints")]
    assert kept == ["step_0000006", "step_0000007"]  # every 3 and at the end; keep 2


def test_a_checkpoint_of_another_identity_is_refused(tmp_path):
    Line(_cfg(tmp_path, steps=2)).train()
    with pytest.raises(ResumeConflict, match="width 3, not 4.*--overwrite"):
        Line(_cfg(tmp_path, steps=2), width=4).train()
    assert Line(_cfg(tmp_path, steps=2, overwrite=True), width=4).train()["finished"]


def test_a_changed_setting_is_refused_unless_resumable(tmp_path):
    Line(_cfg(tmp_path, steps=2)).train()
    with pytest.raises(ResumeConflict, match="seed 0 -> 1"):
        Line(_cfg(tmp_path, steps=2, seed=1)).train()
    more = Line(_cfg(tmp_path, steps=4, log_every=2, max_minutes=5.0))  # all resumable
    assert more.train()["step"] == 4 and more.ran == [3, 4]


# ---------------------------------------------------------------------------- config


@pytest.mark.parametrize("cls", [TrainConfig, GFNConfig, CTLConfig])
@pytest.mark.parametrize(
    "bad, message",
    [
        (dict(weight_decay=-0.1), "weight_decay must be >= 0, got -0.1; use 0 for no weight"),
        (dict(save_every=-1), "save_every must be an integer >= 0, got -1; use 0 to save only"),
        (dict(eval_every=-2), "eval_every must be an integer >= 0"),
        (dict(steps=0), "steps must be an integer >= 1, got 0"),
        (dict(log_every=0), "log_every must be an integer >= 1"),
        (dict(keep_checkpoints=0), "keep_checkpoints must be an integer >= 1"),
        (dict(lr=0.0), "lr must be > 0"),
        (dict(max_grad_norm=math.nan), "max_grad_norm must be >= 0"),
        (dict(max_minutes=-1.0), "max_minutes must be >= 0"),
        (dict(seed=1.5), "seed must be an integer"),
        (dict(report_to=""), "report_to must name"),
    ],
)
def test_shared_validation_applies_to_every_config(cls, bad, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(")):
        cls(**bad)


def test_method_configs_keep_their_defaults_and_the_shared_resumable_fields():
    shared = {f.name for f in dataclasses.fields(TrainConfig)}
    for cls in (GFNConfig, CTLConfig):
        fields = {f.name: f for f in dataclasses.fields(cls)}
        assert shared <= set(fields) and all("help" in f.metadata for f in fields.values())
        # the shared ones, plus method fields that leave the trained result unchanged
        # (GFN: activation_checkpointing, the same gradients with less memory)
        shared_resumable = cls.RESUMABLE_FIELDS[: len(TrainConfig.RESUMABLE_FIELDS)]
        assert shared_resumable == TrainConfig.RESUMABLE_FIELDS
        assert set(cls.RESUMABLE_FIELDS) <= set(fields)
    gfn, ctl = GFNConfig(), CTLConfig()
    assert (gfn.steps, gfn.lr, gfn.eval_every, gfn.out_dir) == (200, 1e-3, 50, "out/gfn")
    assert (ctl.steps, ctl.lr, ctl.eval_every, ctl.out_dir) == (300, 3e-3, 0, "out/twist_ctl")


def test_flags_reach_the_shared_fields_and_their_checks():
    cfg = parse_config(CTLConfig, ["--steps", "7", "--weight-decay", "0.5", "--report_to", "all"])
    assert (cfg.steps, cfg.weight_decay, cfg.report_to) == (7, 0.5, "all")
    with pytest.raises(ValueError, match="^command line: weight_decay must be >= 0"):
        parse_config(GFNConfig, ["--weight_decay", "-1"])
