"""The evals harness end to end in --quick mode, its resumability, and its tasks."""

import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from evals import report  # noqa: E402
from evals.run import main  # noqa: E402
from evals.tasks import build_task, speeches  # noqa: E402
from llmsample.data.shakespeare import DEFAULT_HELDOUT, load_plays  # noqa: E402


def test_tasks_come_from_heldout_plays_only():
    for name in ("line-infill", "keywords"):
        task = build_task(name, num_prompts=20)
        assert len(task.examples) == 20
        assert {e.source for e in task.examples} <= set(DEFAULT_HELDOUT)
    text = load_plays(["macbeth"])["macbeth"]
    task = build_task("line-infill", num_prompts=20)
    for e in task.examples:  # prompt, middle and next line are consecutive in the play
        prev = e.prompt.split("\n")[1]
        assert f"{prev}\n{e.references[0]}{e.suffix}" in load_plays([e.source])[e.source]
    assert speeches(text)[0][1]  # speeches parse


def test_keyword_references_contain_the_keywords():
    task = build_task("keywords", num_prompts=20)
    for e in task.examples:
        assert 2 <= len(e.words) <= 3
        assert e.references and all(task.satisfied(e, r) for r in e.references)


def test_quick_run_end_to_end_and_resume(tmp_path, capsys):
    out = tmp_path / "kw"
    assert main(["--task", "keywords", "--out", str(out), "--quick", "--samples", "4"]) == 0
    cells = sorted((out / "cells").glob("*.jsonl"))
    assert cells and (out / "results.md").exists() and (out / "quality_vs_diversity.png").exists()
    summary = json.loads((out / "summary.json").read_text())
    methods = {r["method"] for r in summary["rows"]}
    assert {"ancestral", "importance", "smc", "smc-twist"} <= methods
    for r in summary["rows"]:
        assert 0 <= r["constraint_rate"] <= 1 and 0 <= r["rougeL"] <= 100
    smc = next(r for r in summary["rows"] if r["method"] == "smc")
    anc = next(r for r in summary["rows"] if r["method"] == "ancestral")
    assert smc["constraint_rate"] >= anc["constraint_rate"]
    # resume: a finished cell is not recomputed (its file is untouched)
    stamp = {p: p.stat().st_mtime_ns for p in cells}
    cells[0].unlink()
    assert main(["--task", "keywords", "--out", str(out), "--quick", "--samples", "4"]) == 0
    assert all(p.stat().st_mtime_ns == stamp[p] for p in cells[1:])
    assert cells[0].exists()


def test_exact_task_quick(tmp_path):
    assert main(["--task", "exact", "--out", str(tmp_path), "--quick"]) == 0
    summary = json.loads((tmp_path / "summary.json").read_text())
    rows = {r["method"]: r for r in summary["rows"]}
    assert rows["ancestral"]["kl_q_sigma"] > 0 and rows["ancestral"]["kl_sigma_q"] > 0
    for name in ("smc", "smc-twist", "importance"):
        assert rows[name]["tv"] < 1 and abs(rows[name]["log_z_err_mean"]) < 1


@pytest.mark.parametrize(
    "points, front",
    [([(0, 0), (1, 1), (0.5, 2), (2, 0.5)], [1, 2, 3]), ([(1, 1), (1, 1)], [0, 1])],
)
def test_pareto_front(points, front):
    assert report.pareto_front(points) == front


def test_report_lists_every_command_that_shared_the_grid(tmp_path):
    from evals.run import _commands

    out = tmp_path / "grid"
    out.mkdir()
    a = "python -m evals.run --task commongen --out x --methods smc"
    b = "python -m evals.run --task commongen --out x --methods beam"
    assert _commands(out, a) == [a]
    (out / "summary.json").write_text(json.dumps({"meta": {"command": a, "commands": [a]}}))
    assert _commands(out, b) == [a, b]
    (out / "summary.json").write_text(json.dumps({"meta": {"command": b, "commands": [a, b]}}))
    assert _commands(out, a) == [b, a]  # a rerun moves to the end, never twice
    full = "python -m evals.run --task commongen --out x"
    assert _commands(out, full) == [full]  # the whole grid stands alone


def test_artifacts_sit_apart_from_the_code(monkeypatch, tmp_path):
    """Issue 16: trained adapters, twist heads and results live under evals/artifacts; a
    path in their old folders is refused before any work, naming the new one."""
    from evals import coverage_ceiling, infill_bounds, paths

    evals = ROOT / "evals"
    assert paths.ARTIFACTS == evals / "artifacts"
    assert not any((evals / old).exists() for old in ("adapters", "twists", "results"))
    assert (paths.ADAPTERS / "line-infill" / "adapter_config.json").is_file()
    assert (paths.TWISTS / "line-infill" / "twist_head.pt").is_file()
    assert (paths.RESULTS / "exact" / "summary.json").is_file()
    monkeypatch.chdir(ROOT)
    paths.refuse_old(tmp_path)  # anything else passes
    paths.refuse_old("evals/artifacts/results/keywords")
    with pytest.raises(SystemExit, match="use evals/artifacts/results/keywords"):
        main(["--task", "keywords", "--out", "evals/results/keywords", "--quick"])
    with pytest.raises(SystemExit, match="use evals/artifacts/results/line-infill-bounds"):
        infill_bounds.main(["--out", "evals/results/line-infill-bounds", "--quick"])
    with pytest.raises(SystemExit, match=r"use evals/artifacts/results/commongen/cells/a\.jsonl"):
        coverage_ceiling.main(["evals/results/commongen/cells/a.jsonl"])
    with pytest.raises(SystemExit, match="use evals/artifacts/twists$"):
        paths.refuse_old(evals / "twists")
    assert not (evals / "results").exists()  # nothing was written there


def test_log_z_column_counts_the_runs_that_lost_every_particle():
    """Per prompt: mean and std over the seeds where a particle survived; the runs where
    none did are left out and counted in the table cell."""
    inf = float("inf")
    seeds = [
        dict(log_z=[-1.0, -inf], bleu_signature="s"),
        dict(log_z=[-3.0, -2.0], bleu_signature="s"),
    ]
    row = report._aggregate("smc", "N=4", seeds)
    assert row["log_z_mean"] == pytest.approx((-2.0 + -2.0) / 2)  # prompt 1 has one seed left
    assert row["log_z_std"] == pytest.approx(1.0)  # only prompt 0 has two seeds: std 1
    assert row["log_z_dead"] == 1
    assert report._log_z(row) == "-2.00 (1.00), 1 lost"
    seeds[0]["log_z"][1] = -2.0
    assert report._log_z(report._aggregate("smc", "N=4", seeds)).endswith(")")
