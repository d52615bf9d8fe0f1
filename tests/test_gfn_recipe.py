"""recipes/gfn_lora.py end to end on the two enumerable tasks (short runs)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "recipes"))

from gfn_lora import GFNRecipeConfig, main  # noqa: E402

from llmsample.config import parse_config  # noqa: E402


def _run(tmp_path, config: str, *flags: str) -> dict:
    argv = ["--config", str(ROOT / "recipes" / "configs" / config), "--out_dir", str(tmp_path)]
    argv += ["--progress", "false", "--save_every", "0", *flags]
    return main(parse_config(GFNRecipeConfig, argv))


def test_exact_task_recipe_lowers_exact_kl(tmp_path):
    summary = _run(tmp_path, "gfn_exact.yaml", "--steps", "40", "--eval_every", "0")
    base, trained = summary["base"], summary["trained"]
    assert base["step"] == 0 and trained["step"] == 40
    assert base["num_sequences"] >= 10_000  # the acceptance problem size
    assert trained["kl_q_sigma"] < base["kl_q_sigma"] / 3
    assert trained["kl_sigma_q"] < base["kl_sigma_q"] / 3
    assert json.loads((tmp_path / "summary.json").read_text())["final"]["finished"]


def test_uniform_number_recipe_raises_valid_fraction(tmp_path):
    summary = _run(tmp_path, "gfn_uniform_number.yaml", "--steps", "60", "--eval_every", "0")
    base, trained = summary["base"], summary["trained"]
    assert trained["valid_fraction"] > max(0.5, 2 * base["valid_fraction"])
    assert trained["kl_q_sigma"] < base["kl_q_sigma"] / 3


def test_recipe_config_validation():
    with pytest.raises(ValueError, match="task must be one of"):
        GFNRecipeConfig(task="sudoku")
    with pytest.raises(ValueError, match="miss_penalty"):
        GFNRecipeConfig(miss_penalty=0.0)
