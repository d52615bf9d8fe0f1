"""The line-infill twist recipe (synthetic problems, exact positives, conditional head) and
the line-infill bounds eval, on the embedded model with tiny budgets."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

import llmsample
from llmsample.config import parse_config
from llmsample.ctl.head import LearnedTwist, TwistHead, text_features
from llmsample.generate import smc_generate
from llmsample.potentials import SuffixLikelihood

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "recipes"))

from twist_ctl import TwistCTLRecipeConfig, main  # noqa: E402
from twist_ctl_infill import infill_problems  # noqa: E402

CONFIG = ROOT / "recipes" / "configs" / "twist_ctl_line_infill.yaml"
TINY = [
    "--steps", "2", "--num_problems", "6", "--eval_problems", "3", "--eval_particles", "3",
    "--eval_seeds", "2", "--prompts_per_step", "2", "--num_negatives", "2", "--head_width", "8",
    "--save_every", "1", "--eval_every", "0", "--log_every", "1", "--progress", "false",
]  # fmt: skip


@pytest.fixture(scope="module")
def lm():
    return llmsample.load_model("shakespeare-tiny")


def test_line_infill_needs_exact_positives():
    with pytest.raises(ValueError, match="positives: given"):
        TwistCTLRecipeConfig(task="line-infill", positives="smc")


def test_problems_come_from_the_training_plays_and_are_cached(lm, tmp_path):
    model, tok = lm
    cache = tmp_path / "p.json"
    a = infill_problems(model, tok, 5, 4, seed=0, heldout=False, cache=cache)
    b = infill_problems(model, tok, 5, 4, seed=0, heldout=False, cache=cache)  # from the cache
    assert a == b
    with pytest.raises(ValueError, match="other settings"):  # never silently reused
        infill_problems(model, tok, 5, 4, seed=99, heldout=False, cache=cache) and len(
            a["prompts"]
        ) == len(a["suffixes"]) == len(a["references"]) == 5
    held = infill_problems(model, tok, 5, 4, seed=0, heldout=True)
    assert not set(held["prompts"]) & set(a["prompts"])
    for s in a["suffixes"]:  # the suffix re-encodes to suffix_tokens ids (as it is scored)
        assert len(tok(s, add_special_tokens=False)["input_ids"]) == 4


def test_recipe_trains_resumes_and_exports_a_conditional_head(lm, tmp_path):
    argv = ["--config", str(CONFIG), "--out_dir", str(tmp_path), *TINY]
    summary = main(parse_config(TwistCTLRecipeConfig, argv))
    assert summary["final"]["finished"] and summary["num_problems"] == 6
    for key in ("base", "trained"):
        assert torch.isfinite(torch.tensor(summary[key]["lower_bound"]))
    head = TwistHead.load(tmp_path / "twist_head.pt")
    assert head.cond_size == lm[0].config.hidden_size
    assert any(p.abs().sum() > 0 for p in head.parameters())  # it trained
    # a rerun with more steps resumes from the last checkpoint on the same problems
    problems = (tmp_path / "problems.json").read_text()
    main(parse_config(TwistCTLRecipeConfig, argv + ["--steps", "3"]))
    events = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert {"event": "resume", "step": 2} in events
    assert (tmp_path / "problems.json").read_text() == problems


def test_a_random_conditional_head_telescopes_away_on_real_text(lm):
    """Importance weights telescope psi away: with a random conditional head and no
    resampling, log Z_hat equals untwisted importance sampling's exactly."""
    model, tok = lm
    prompts = ["ROMEO:\nBut soft, what light through yonder window breaks?\n"] * 2
    suffixes = ["\nIt is the east", "\nAnd Juliet is"]
    pot = SuffixLikelihood(model, tok, suffixes)
    H = model.config.hidden_size
    torch.manual_seed(0)
    head = TwistHead(H, len(tok), width=8, cond_size=H)
    with torch.no_grad():
        for p in head.parameters():
            p.normal_(0, 0.3)
    twist = LearnedTwist(model, head, pot, condition=text_features(model, tok, suffixes))
    kw = dict(potential=pot, num_particles=4, max_new_tokens=6, seed=1, ess_threshold=0.0)
    plain = smc_generate(model, tok, prompts, **kw)
    twisted = smc_generate(model, tok, prompts, twist=twist, **kw)
    assert torch.equal(plain.sequences, twisted.sequences)
    assert torch.allclose(plain.log_z, twisted.log_z, atol=1e-9, rtol=0)


def test_infill_bounds_quick(tmp_path):
    from evals.infill_bounds import main as bounds_main

    out = tmp_path / "b"
    methods = ["smc", "smc-learned", "smc-learned-q"]
    assert bounds_main(["--out", str(out), "--quick", "--methods", *methods]) == 0
    rows = json.loads((out / "summary.json").read_text())["rows"]
    assert [(r["method"], r["N"]) for r in rows] == [(m, 4) for m in methods]
    for r in rows:
        assert torch.isfinite(torch.tensor([r["lower"], r["upper"], r["gap"]])).all()
        assert r["fwd_tokens_per_problem_run"] > 0
    # the learned twist runs the base model a second time (its own cached pass)
    assert rows[1]["fwd_tokens_per_problem_run"] > rows[0]["fwd_tokens_per_problem_run"]
    assert "| smc | 4 |" in (out / "results.md").read_text()
    # a rerun with other settings into the same folder is refused, not mixed in
    with pytest.raises(ValueError, match="other settings"):
        bounds_main(["--out", str(out), "--quick", "--suffix-tokens", "5", "--methods", "smc"])


def test_eval_methods_learned_twist_and_flow_twist_on_real_prompts(lm):
    """The evals' smc-learned and gfn-flow cells (committed head and adapter) run on real
    line-infill prompts and give finite weights and log Z."""
    from evals.methods import methods
    from evals.tasks import build_task

    model, tok = lm
    task = build_task("line-infill", num_prompts=2)
    grid = {m.name: m for m in methods("line-infill", quick=True)}
    assert {"smc-learned", "gfn-flow", "gfn-is"} <= set(grid)
    for name in ("smc-learned", "gfn-flow"):
        out = grid[name].run(model, tok, task, task.examples, 0)
        assert out.log_z.shape == (2,) and torch.isfinite(out.log_z).all(), name
        assert torch.isfinite(out.log_weights).all() and out.num_forward_tokens > 0
