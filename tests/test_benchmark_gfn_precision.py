"""benchmarks/gfn_precision.py: the --quick run on the toy exact task times all three
variants, each running with the precision it names, and writes its JSON and section."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "gfn_precision.py"


def test_quick_run_times_each_variant_at_its_precision(tmp_path):
    out, md = tmp_path / "gfn_precision.json", tmp_path / "RESULTS.md"
    cmd = [sys.executable, str(SCRIPT), "--config", "recipes/configs/gfn_exact.yaml", "--quick"]
    cmd += ["--out", str(out), "--markdown", str(md), "--", "--samples_per_prompt", "8"]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = json.loads(out.read_text())["rows"]
    expected = {
        "fp32": ("float32", "no"),
        "bf16-rollout": ("bfloat16", "no"),
        "bf16-rollout+autocast": ("bfloat16", "bf16"),
    }
    assert set(rows) == set(expected)
    for name, (dtype, mixed) in expected.items():
        (run,) = rows[name]["runs"]  # --quick: one round
        assert (run["sampler_dtype"], run["mixed_precision"]) == (dtype, mixed), name
        assert len(run["step_s"]) == len(run["rollout_s"]) == 2 and min(run["step_s"]) > 0
        assert rows[name]["step_speedup"] == rows["fp32"]["step_s"] / rows[name]["step_s"]
        assert 1 <= rows[name]["tokens_per_row"] <= 5  # the exact task's T
    assert rows["fp32"]["step_speedup"] == 1.0
    text = md.read_text()
    assert "<!-- gfn_precision:cpu:gfn_exact -->" in text and "| bf16-rollout+autocast |" in text


def test_missing_config_is_a_clear_error():
    cmd = [sys.executable, str(SCRIPT), "--config", "no/such.yaml"]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert proc.returncode == 2 and "no such file" in proc.stderr
