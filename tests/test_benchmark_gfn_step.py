"""benchmarks/gfn_step.py: the --quick run writes a complete JSON, and its
gradient-through-rollout reference optimizes exactly the objective of ours."""

from __future__ import annotations

import importlib.util
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from llmsample.diagnostics.exact import TOY_EOS, toy_model, toy_tokenizer
from llmsample.gfn import GFNConfig, add_lora, sample_rollouts, trajectory_balance
from llmsample.hf.prompts import encode_prompts
from llmsample.hf.session import teacher_force

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "gfn_step.py"


@pytest.fixture(scope="module")
def bench():
    # the script imports its sibling benchmarks/report.py, as `python benchmarks/gfn_step.py`
    # can (the script's folder leads sys.path); loaded from here, that folder must be added
    if str(SCRIPT.parent) not in sys.path:
        sys.path.insert(0, str(SCRIPT.parent))
    spec = importlib.util.spec_from_file_location("gfn_step_bench", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_quick_run_writes_json_and_markdown(tmp_path):
    out, md = tmp_path / "gfn_step.json", tmp_path / "RESULTS.md"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    cmd = [sys.executable, str(SCRIPT), "--quick", "--threads", "1"]
    proc = subprocess.run(
        cmd + ["--out", str(out), "--markdown", str(md)],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env=env,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    data = json.loads(out.read_text())
    assert data["benchmark"] == "gfn_step"
    assert {"command", "goal", "machine", "config", "results", "stop"} <= set(data)
    assert data["config"]["quick"] and data["config"]["model"] == "toy"
    (res,) = data["results"]
    assert res["max_new_tokens"] == 8
    rows = data["config"]["batch"] * data["config"]["k"]
    for name in ("ours", "reference"):
        v = res[name]
        for key in ("step_s", "samples_per_s", "peak_mb", "rss_peak_mb", "saved_mb"):
            assert isinstance(v[key], float) and v[key] >= 0, (name, key, v[key])
        assert v["step_s"] > 0 and v["peak_mb"] > 0 and v["saved_mb"] > 0
        assert v["samples_per_s"] == pytest.approx(rows / v["step_s"])
        assert v["losses_finite"] and v["losses"]
        assert all(math.isfinite(x) for x in v["losses"])
        assert v["tokens_per_step"] == rows * 8  # no stop token: exactly T tokens per row
        assert len(v["step_times"]) == data["config"]["repeats"] * data["config"]["rounds"]
    c = res["comparison"]
    for key in ("memory_ratio", "throughput_ratio", "throughput_ratio_of_mins", "saved_ratio"):
        assert c[key] > 0
    for key in ("memory_goal_met", "throughput_goal_met"):
        assert isinstance(c[key], bool)
    assert 0 <= c["same_sample_steps"] <= c["timed_steps"] == len(res["ours"]["losses"])
    text = md.read_text()
    assert "<!-- gfn_step:cpu:T8:threads1 -->" in text and "| 8 | reference |" in text


def _policy_with_active_adapter(seed: int = 0):
    """Toy llama + LoRA whose B matrices are non-zero, so the adapter changes q."""
    torch.manual_seed(seed)
    cfg = GFNConfig(target_modules=["all-linear"])
    policy = add_lora(toy_model("llama"), cfg).eval()
    with torch.no_grad():
        for name, p in policy.named_parameters():
            if "lora_B" in name:
                p.normal_(0.0, 0.3)
    return policy


def _lora_grads(policy) -> list[torch.Tensor]:
    return [p.grad.clone() for p in policy.parameters() if p.requires_grad]


@pytest.mark.parametrize("stop", [[TOY_EOS], []])
def test_rollout_log_q_equals_teacher_forced_log_q(bench, stop):
    """Same tokens -> the reference loop's log q (and TB gradients) equal ours."""
    tok = toy_tokenizer(with_pad=True)
    policy = _policy_with_active_adapter()
    prompts = encode_prompts(tok, ["a b", "c d e f"])  # different lengths: left padding
    B, K, T = prompts.size, 6, 5
    gen = torch.Generator().manual_seed(1)
    ro = sample_rollouts(policy, prompts, K, T, stop, generator=gen)
    if stop:
        assert (ro.lengths < T).any()  # some rows stopped early and are padded

    tokens, lengths, log_q_ref = bench.rollout_with_grad(
        policy, prompts, K, T, stop, forced=ro.tokens
    )
    assert torch.equal(tokens, ro.tokens) and torch.equal(lengths, ro.lengths)
    assert log_q_ref.requires_grad  # LMSession(grad=True): autograd through the rollout

    index = torch.arange(B).repeat_interleave(K)
    tf = teacher_force(
        policy,
        prompts.input_ids[index],
        prompts.attention_mask[index],
        ro.tokens,
        ro.mask.long(),
        grad=True,
    )
    log_q_ours = tf.token_logp.sum(1)
    torch.testing.assert_close(log_q_ref, log_q_ours, rtol=1e-5, atol=1e-5)

    # the same TB loss has the same gradient w.r.t. every LoRA weight and log Z
    log_r = bench.log_reward(policy, prompts, index, ro.tokens, ro.lengths)
    grads = []
    for log_q in (log_q_ref, log_q_ours):
        log_z = torch.nn.Parameter(torch.tensor(0.3))
        policy.zero_grad(set_to_none=True)
        trajectory_balance(log_q.view(B, K), log_r.view(B, K), log_z).backward()
        grads.append(_lora_grads(policy) + [log_z.grad])
    assert any(float(g.abs().max()) > 0 for g in grads[0][:-1])
    for a, b in zip(*grads):
        # float32 sums in a different order (per-step vs one pass): allow ~1e4 ulps of
        # the tensor's own scale instead of a fixed absolute tolerance
        scale = float(torch.finfo(torch.float32).eps) * 1e4 * float(a.abs().max())
        torch.testing.assert_close(a, b, rtol=1e-4, atol=scale)


def test_both_steps_sample_the_same_distribution(bench):
    """Same seed and policy: the reference loop draws the very tokens ours draws."""
    tok = toy_tokenizer(with_pad=True)
    policy = _policy_with_active_adapter()
    prompts = encode_prompts(tok, ["a b", "c"])
    ours = sample_rollouts(
        policy, prompts, 8, 4, [TOY_EOS], generator=torch.Generator().manual_seed(3)
    )
    tokens, lengths, _ = bench.rollout_with_grad(
        policy, prompts, 8, 4, [TOY_EOS], generator=torch.Generator().manual_seed(3)
    )
    assert torch.equal(tokens, ours.tokens) and torch.equal(lengths, ours.lengths)
