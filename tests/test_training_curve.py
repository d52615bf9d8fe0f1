"""evals/training_curve.py: window means of a metrics.jsonl, and its errors."""

from __future__ import annotations

import json

import pytest

from evals.training_curve import load_events, main, markdown_table, window_means


def _write(tmp_path, events):
    path = tmp_path / "metrics.jsonl"
    path.write_text("\n".join(json.dumps(e) for e in events) + "\n")
    return path


def test_window_means_average_train_records_per_window(tmp_path):
    events = [{"event": "start", "step": 0}, {"event": "eval", "step": 0, "log_reward": -9.0}]
    events += [{"event": "train", "step": s, "loss": float(s)} for s in (5, 10, 15, 20, 25)]
    events[-1]["log_reward_replay"] = -3.0
    rows = window_means(load_events(_write(tmp_path, events)), 10, ["loss", "log_reward_replay"])
    assert [(r["first"], r["last"]) for r in rows] == [(1, 10), (11, 20), (21, 25)]
    assert [r["loss"] for r in rows] == [7.5, 17.5, 25.0]
    assert [r["log_reward_replay"] for r in rows] == [None, None, -3.0]
    table = markdown_table(rows, ["loss", "log_reward_replay"])
    assert "| 1-10 | 7.50 |  |" in table and "| 21-25 | 25.00 | -3.00 |" in table


def test_cli_plots_and_refuses_bad_input(tmp_path, capsys):
    path = _write(tmp_path, [{"event": "train", "step": s, "loss": 1.0} for s in (1, 2)])
    png = tmp_path / "curve.png"
    assert main([str(path), "--metrics", "loss", "--png", str(png)]) == 0
    assert png.stat().st_size > 1000
    assert main([str(tmp_path / "missing.jsonl")]) == 2
    assert "no such metrics file" in capsys.readouterr().err
    empty = _write(tmp_path, [{"event": "start", "step": 0}])
    assert main([str(empty)]) == 2
    with pytest.raises(ValueError, match="window must be >= 1"):
        window_means([], 0, ["loss"])
