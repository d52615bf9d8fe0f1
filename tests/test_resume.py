"""Resume, overwrite, stop-by-signal and config errors of the trainers and recipes.

- a resumed run may change only its config class's RESUMABLE_FIELDS (budgets, intervals);
  any other change is refused, naming the field; ``overwrite`` starts fresh;
- the log is cut back to the checkpoint on resume: no event is repeated;
- SIGTERM / SIGINT: checkpoint, one line on stderr, exit status 143 / 130, and every
  figure of the summary labelled with the step it was measured at;
- config errors (malformed YAML, a value of the wrong type): one line naming the file
  and the field, exit status 2.
"""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from llmsample.config import parse_config, run_recipe
from llmsample.ctl.head import TwistHead
from llmsample.ctl.trainer import CTLConfig, CTLTrainer
from llmsample.diagnostics.exact import TOY_EOS, toy_model, toy_tokenizer
from llmsample.gfn import GFNConfig, GFNTrainer, add_lora
from llmsample.potentials import Reward
from llmsample.train.checkpoints import ResumeConflict, list_checkpoints

ROOT = Path(__file__).resolve().parents[1]
RECIPES = ROOT / "recipes"
sys.path.insert(0, str(RECIPES))

import gfn_lora  # noqa: E402
import pretrain_tiny_lm  # noqa: E402
import twist_ctl  # noqa: E402

PROMPT = "a b"
PHI = Reward(lambda texts: [2.0 * t.split().count("c") for t in texts])
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}


def _gfn(out: Path, **kw) -> GFNTrainer:
    base = dict(
        steps=2,
        samples_per_prompt=4,
        max_new_tokens=3,
        out_dir=str(out),
        save_every=1,
        eval_every=0,
        log_every=1,
        progress=False,
        target_modules=["c_attn"],
    )
    cfg = GFNConfig(**(base | kw))
    policy = add_lora(toy_model("gpt2"), cfg)
    return GFNTrainer(policy, toy_tokenizer(with_pad=True), [PROMPT], PHI, cfg, stop_ids=[TOY_EOS])


def _events(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def _keys(events: list[dict]) -> list[tuple[str, int]]:
    return [(e["event"], e["step"]) for e in events if e["event"] in ("train", "eval")]


# ---------------------------------------------------------------------------- config checks


@pytest.mark.parametrize(
    "cls",
    [
        GFNConfig,
        gfn_lora.GFNRecipeConfig,
        CTLConfig,
        twist_ctl.TwistCTLRecipeConfig,
        pretrain_tiny_lm.PretrainConfig,
    ],
)
def test_resumable_fields_are_fields(cls):
    names = {f.name for f in dataclasses.fields(cls)}
    assert set(cls.RESUMABLE_FIELDS) <= names
    assert "overwrite" in names and "seed" not in cls.RESUMABLE_FIELDS
    assert "help" in next(f for f in dataclasses.fields(cls) if f.name == "overwrite").metadata


def test_resume_with_changed_settings_is_refused_and_names_them(tmp_path):
    out = tmp_path / "run"
    assert _gfn(out).train()["finished"]
    log = (out / "metrics.jsonl").read_text()
    with pytest.raises(ResumeConflict) as info:
        _gfn(out, seed=1, lr=2e-3).train()
    message = str(info.value)
    assert "seed 0 -> 1" in message and "lr 0.001 -> 0.002" in message
    assert "new out_dir" in message and "--overwrite" in message and "\n" not in message
    with pytest.raises(ResumeConflict, match="loss 'tb' -> 'vargrad'"):  # no optimizer traceback
        _gfn(out, loss="vargrad").train()
    assert (out / "metrics.jsonl").read_text() == log  # refused before touching anything


def test_resume_with_more_steps_continues(tmp_path, capfd):
    out = tmp_path / "run"
    _gfn(out).train()
    result = _gfn(out, steps=4, eval_every=2, log_every=2).train()  # all allowed to change
    assert result["finished"] and result["step"] == 4 and result["stopped_by"] is None
    assert f"[gfn] resuming from {out / 'checkpoints' / 'step_0000002'} at step 2" in (
        capfd.readouterr().err
    )
    events = _events(out / "metrics.jsonl")
    assert [e["event"] for e in events].count("resume") == 1
    assert _keys(events) == [("train", 1), ("train", 2), ("train", 4)]


def test_overwrite_starts_fresh(tmp_path):
    out = tmp_path / "run"
    _gfn(out, steps=3).train()
    result = _gfn(out, seed=1, overwrite=True).train()
    assert result["finished"] and result["step"] == 2
    events = _events(out / "metrics.jsonl")
    assert [e["event"] for e in events] == ["start", "train", "train", "done"]
    found = list_checkpoints(out / "checkpoints")
    assert [p.name for p in found] == ["step_0000001", "step_0000002"]  # none of the old run
    assert json.loads((found[-1] / "run.json").read_text())["config"]["seed"] == 1


def test_ctl_resume_with_changed_seed_is_refused(tmp_path):
    def trainer(**kw):
        base = dict(steps=1, num_particles=2, num_negatives=2, max_new_tokens=3)
        cfg = CTLConfig(**(base | kw), out_dir=str(tmp_path), progress=False)
        head = TwistHead(32, 9, width=4)
        model, tok = toy_model("gpt2"), toy_tokenizer()
        return CTLTrainer(model, tok, [PROMPT], PHI, head, cfg, eos_token_ids=[TOY_EOS])

    assert trainer().train()["finished"]
    with pytest.raises(ResumeConflict, match="seed 0 -> 3"):
        trainer(seed=3).train()
    assert trainer(steps=2, log_every=1).train()["step"] == 2


# ---------------------------------------------------------------------------- logs


def test_log_has_no_duplicates_after_a_kill_and_resume(tmp_path):
    """Killed hard after logging step 3 (checkpoint at step 2): the rerun drops the
    step-3 events and logs them again, once, as the uninterrupted run did."""

    class Killed(Exception):
        pass

    kw = dict(steps=5, save_every=2, eval_every=2)
    straight = _gfn(tmp_path / "a", **kw)
    straight.evaluate = lambda policy, step: {"step_seen": step}
    straight.train()

    killed = _gfn(tmp_path / "b", **kw)
    killed.evaluate = lambda policy, step: {"step_seen": step}
    inner = killed.log

    def log(record):
        inner(record)
        if record["event"] == "train" and record["step"] == 3:
            raise Killed

    killed.log = log
    with pytest.raises(Killed):
        killed.train()
    assert ("train", 3) in _keys(_events(tmp_path / "b" / "metrics.jsonl"))

    again = _gfn(tmp_path / "b", **kw)
    again.evaluate = lambda policy, step: {"step_seen": step}
    assert again.train()["finished"]
    ref, got = _events(tmp_path / "a" / "metrics.jsonl"), _events(tmp_path / "b" / "metrics.jsonl")
    assert _keys(got) == _keys(ref)  # same events, none twice
    losses = [e["loss"] for e in got if e["event"] == "train"]  # resumed exactly
    assert losses == pytest.approx([e["loss"] for e in ref if e["event"] == "train"])
    assert [e["event"] for e in got if e["event"] not in ("train", "eval")] == [
        "start",
        "resume",
        "done",
    ]


# ---------------------------------------------------------------------------- signals


def _wait_for_checkpoint(out: Path, proc=None, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while not list(out.glob("checkpoints/step_*")):  # complete ones only (renamed last)
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"exited early ({proc.returncode}): {proc.stderr.read()[-3000:]}")
        if time.monotonic() > deadline:
            raise AssertionError("no checkpoint in time")
        time.sleep(0.02)


def test_sigterm_stops_with_status_143_a_message_and_labelled_summary(tmp_path):
    """recipes/gfn_lora.py in a subprocess, SIGTERM after its first checkpoint; then the
    same command (with a reachable step budget) resumes it without repeated events."""
    out = tmp_path / "run"
    argv = ["--config", str(RECIPES / "configs" / "gfn_uniform_number.yaml")]
    argv += ["--out_dir", str(out), "--samples_per_prompt", "4", "--save_every", "1"]
    argv += ["--eval_every", "2", "--log_every", "1", "--progress", "false"]
    cmd = [sys.executable, str(RECIPES / "gfn_lora.py"), *argv, "--steps", "100000"]
    proc = subprocess.Popen(cmd, env=ENV, cwd=tmp_path, stderr=subprocess.PIPE, text=True)
    try:
        _wait_for_checkpoint(out, proc)
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=120)
    finally:
        proc.kill()
    assert proc.returncode == 143, err[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    final, step = summary["final"], summary["final"]["step"]
    assert not final["finished"] and final["stopped_by"] == "SIGTERM" and step >= 1
    assert summary["stopped_by_signal"] == {"signal": "SIGTERM", "step": step, "exit_status": 143}
    line = [x for x in err.splitlines() if "stopped by" in x]
    assert line == [
        f"gfn_lora.py: stopped by SIGTERM at step {step} (checkpoint saved in "
        f"{out / 'checkpoints'}); rerun the same command to resume"
    ]
    evals = [e for e in _events(out / "metrics.jsonl") if e["event"] == "eval"]
    assert final["eval_step"] == evals[-1]["step"] == summary["trained"]["step"] <= step
    assert final["kl_q_sigma"] == evals[-1]["kl_q_sigma"]  # the figures of that evaluation
    assert list_checkpoints(out / "checkpoints")[-1].name == f"step_{step:07d}"

    resumed = gfn_lora.main(parse_config(gfn_lora.GFNRecipeConfig, [*argv, "--steps", "3"]))
    assert resumed["final"]["finished"] and resumed["stopped_by_signal"] is None
    keys = _keys(_events(out / "metrics.jsonl"))
    assert len(keys) == len(set(keys))
    assert [s for e, s in keys if e == "train"] == list(range(1, max(step, 3) + 1))


def _pretrain(argv: list[str]) -> int:
    return run_recipe(pretrain_tiny_lm.PretrainConfig, pretrain_tiny_lm.main, argv=argv)


def test_pretrain_sigterm_exit_status_resume_check_and_log(tmp_path, capsys):
    """The pretraining recipe: SIGTERM -> 143 and the message; a changed seed is refused
    (status 2, one line); the same command with more steps resumes, no event repeated."""
    out = tmp_path / "run"
    argv = ["--config", str(RECIPES / "configs" / "pretrain_tiny_lm_test.yaml")]
    argv += ["--out_dir", str(out), "--save_every", "1", "--eval_every", "0"]
    argv += ["--max_minutes", "1"]  # ends the run should the signal never come
    done = threading.Event()

    def watch():  # as `kill` would, once the first checkpoint is on disk
        try:
            _wait_for_checkpoint(out, timeout=60)
        except AssertionError:
            return
        if not done.is_set():
            os.kill(os.getpid(), signal.SIGTERM)

    previous = signal.signal(signal.SIGTERM, lambda *a: None)  # never kill pytest itself
    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    try:
        status = _pretrain([*argv, "--max_steps", "100000"])
    finally:
        done.set()
        watcher.join()
        signal.signal(signal.SIGTERM, previous)
    assert status == 143
    metrics = json.loads((out / "metrics.json").read_text())
    step = metrics["steps"]
    assert metrics["stopped_by_signal"] == {"signal": "SIGTERM", "step": step, "exit_status": 143}
    assert metrics["final_val_ppl"] is None and metrics["val_step"] is None
    err = capsys.readouterr().err
    assert f"stopped by SIGTERM at step {step} (checkpoint saved in" in err
    assert "rerun the same command to resume" in err

    assert _pretrain([*argv, "--seed", "1"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "seed 0 -> 1" in err[0] and "--overwrite" in err[0]

    more = [*argv, "--max_steps", str(step + 2)]
    assert _pretrain(more) == 0
    newest = out / "checkpoints" / f"step_{step:07d}"
    assert f"[pretrain] resuming from {newest} at step {step}" in capsys.readouterr().err
    events = _events(out / "log.jsonl")
    trains = [e["step"] for e in events if e["event"] == "train"]
    assert trains == list(range(1, step + 3))
    saved = [e["step"] for e in events if e["event"] == "checkpoint"]
    assert saved == list(range(1, step + 3))
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["val_step"] == step + 2 and metrics["stopped_by_signal"] is None


# ---------------------------------------------------------------------------- config errors


@pytest.mark.parametrize(
    "text, expected",
    [
        ("task: exact\nlr: abc\n", "field 'lr': expected a number, got 'abc'"),
        ("steps: 2.5\n", "field 'steps': expected an integer, got 2.5"),
        ("progress: maybe\n", "field 'progress': expected a boolean, got 'maybe'"),
        ("target_modules: [c_attn, [x]]\n", "field 'target_modules': expected a list of"),
        ("task: exact\n  lr: 1\n", "invalid YAML at line 2, column 5"),
        ("steps: [1, 2\n", "invalid YAML"),
        ("- 1\n- 2\n", "expected a mapping"),
        ("stepz: 3\n", "unknown field 'stepz' (did you mean 'steps'?)"),
        ("steps: 0\n", "steps must be an integer >= 1, got 0"),
    ],
)
def test_config_errors_are_one_line_naming_file_and_field(tmp_path, capsys, text, expected):
    bad = tmp_path / "bad.yaml"
    bad.write_text(text)

    def main(cfg):
        raise AssertionError("must not run")

    assert run_recipe(gfn_lora.GFNRecipeConfig, main, argv=["--config", str(bad)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and expected in err and f"{bad}:" in err, err


def test_config_values_are_coerced_to_the_field_types(tmp_path):
    good = tmp_path / "good.yaml"
    good.write_text("lr: 3e-3\nsteps: '7'\nprogress: 'no'\ntarget_modules: c_attn, c_proj\n")
    cfg = parse_config(gfn_lora.GFNRecipeConfig, ["--config", str(good)])
    assert cfg.lr == 0.003 and cfg.steps == 7 and cfg.progress is False  # YAML 1.1: '3e-3' str
    assert cfg.target_modules == ["c_attn", "c_proj"]
    with pytest.raises(ValueError, match=r"^command line: argument --lr: invalid float value"):
        parse_config(gfn_lora.GFNRecipeConfig, ["--lr", "abc"])
    with pytest.raises(ValueError, match=r"^command line: steps must be an integer >= 1"):
        parse_config(gfn_lora.GFNRecipeConfig, ["--config", str(good), "--steps", "0"])
    with pytest.raises(ValueError, match="nope.yaml: cannot read"):
        parse_config(gfn_lora.GFNRecipeConfig, ["--config", str(tmp_path / "nope.yaml")])


def test_script_exits_2_on_a_bad_config(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("task: exact\nlr: abc\n")
    cmd = [sys.executable, str(RECIPES / "gfn_lora.py"), "--config", str(bad)]
    proc = subprocess.run(cmd, env=ENV, cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.splitlines() == [
        f"gfn_lora.py: error: {bad}: field 'lr': expected a number, got 'abc'"
    ]
