"""SMC on vLLM (llmsample.vllm): exact on an enumerable target, and the same as on HF.

Runs only where vLLM is installed (CI's vLLM stage; see the README for the install line),
on one engine per session (conftest.vllm_engine): the toy Llama folder, loaded by vLLM and
by transformers alike.
"""

import math

import pytest
import torch
from conftest import EOS, make_tokenizer, soft_reward

import llmsample
from llmsample.diagnostics.exact import enumerate_target
from llmsample.hf.prompts import encode_prompts
from llmsample.proposals import LMProposal
from llmsample.smc.blocks import block_ends
from llmsample.vllm import VLLMBlocks

PROMPTS = ["a b", "c d e f"]
T = 4
RUNS = 100
SOFT = soft_reward()  # log phi = #c - 0.7 #a, scores prefixes too: the twist


@pytest.fixture(scope="module")
def hf_model(vllm_engine):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(vllm_engine[1], dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def targets(hf_model):
    tok = make_tokenizer()
    return [enumerate_target(hf_model, tok, p, SOFT, T, EOS) for p in PROMPTS]


def smc(model, proposal=None, k=2, seed=1):
    cfg = llmsample.SMCConfig(
        num_particles=8, max_new_tokens=T, ess_threshold=0.9, resample_every=k, seed=seed
    )
    prompts = [p for p in PROMPTS for _ in range(RUNS)]
    tok = make_tokenizer(with_pad=True)
    return llmsample.smc_generate(
        model, tok, prompts, potential=SOFT, twist="prefix", proposal=proposal, config=cfg
    )


def z_ratio(out, targets):
    """Per prompt: mean of Z_hat / Z and its standard error."""
    rows = []
    for b, target in enumerate(targets):
        ratio = (out.log_z[b * RUNS : (b + 1) * RUNS] - target.log_z).exp()
        rows.append((float(ratio.mean()), float(ratio.std() / math.sqrt(RUNS))))
    return rows


@pytest.mark.parametrize("proposal", [None, LMProposal(temperature=1.5)], ids=["base", "T=1.5"])
def test_vllm_z_hat_unbiased(vllm_engine, targets, proposal):
    out = smc(vllm_engine[0], proposal)
    assert out.resampled.any(), "the test must exercise resampling"
    for b, (mean, se) in enumerate(z_ratio(out, targets)):
        assert abs(mean - 1) < 3 * se, (PROMPTS[b], mean, se)


def test_vllm_and_hf_log_z_agree(vllm_engine, hf_model):
    """The same run on both backends: per prompt, mean log Z within 3 combined SE, and
    spreads within a factor 1.5."""
    on_vllm, on_hf = smc(vllm_engine[0], seed=2), smc(hf_model, seed=3)
    for b in range(len(PROMPTS)):
        a = on_vllm.log_z[b * RUNS : (b + 1) * RUNS]
        h = on_hf.log_z[b * RUNS : (b + 1) * RUNS]
        se = math.sqrt((a.var() + h.var()) / RUNS)
        assert abs(a.mean() - h.mean()) < 3 * se, (PROMPTS[b], a.mean(), h.mean(), se)
        assert 1 / 1.5 < a.std() / h.std() < 1.5, (PROMPTS[b], a.std(), h.std())


def test_vllm_log_p_and_log_q_match_hf(vllm_engine, hf_model):
    """A tempered block: vLLM's log p of the drawn tokens is the model's (teacher-forced in
    transformers), and log q is the tempered distribution's."""
    tok = make_tokenizer()
    seq = encode_prompts(tok, ["a b c"]).input_ids[0].tolist()
    backend = VLLMBlocks(vllm_engine[0], LMProposal(temperature=1.5), [EOS])
    (blk,) = backend.extend([seq], [3], [0])
    full = torch.tensor([seq + blk.tokens])
    with torch.no_grad():
        logits = hf_model(full).logits[0, len(seq) - 1 : -1].double()  # [k, V]
    x = torch.tensor(blk.tokens)[:, None]
    lp = logits.log_softmax(-1).gather(1, x).sum()
    lq = (logits / 1.5).log_softmax(-1).gather(1, x).sum()
    assert blk.log_p == pytest.approx(float(lp), abs=1e-3)
    assert blk.log_q == pytest.approx(float(lq), abs=1e-3)


def test_resampled_particles_continue_from_the_prefix_cache(vllm_engine):
    """A long prompt (two 32-token KV blocks) and resampling at every block: vLLM computes
    far fewer positions than the requests hold, because each request's prefix (its
    prompt, and its parent's tokens) comes from the cache."""
    tok = make_tokenizer(with_pad=True)
    prompt = " ".join("abcdefgh"[i % 8] for i in range(40))
    cfg = llmsample.SMCConfig(
        num_particles=8, max_new_tokens=12, resample_every=4, ess_threshold=2.0, seed=0
    )
    out = llmsample.smc_generate(vllm_engine[0], tok, [prompt], potential=SOFT, config=cfg)
    assert out.resampled.any()
    P = len(tok(prompt).input_ids)
    requested = sum(8 * (P + t) for t in (0, 4, 8)) + 8 * 12  # every request's prompt + new
    assert out.num_forward_tokens < 0.5 * requested, (out.num_forward_tokens, requested)


def test_aligned_blocks_recompute_one_token_per_particle(vllm_engine):
    """Resampling at every block end, K = 32 = the KV block. Unaligned, each request
    re-feeds its parent's last partial KV block; aligned (the default), block ends sit at
    prompt + t = 1 (mod 32), so a request recomputes one token. Both counts are what the
    cache arithmetic predicts: ((L - 1) mod 32) + 1 of a request of L tokens, plus its new
    tokens."""
    tok = make_tokenizer(with_pad=True)
    prompt = " ".join("abcdefgh"[i % 8] for i in range(9))
    P, N, T, K = len(tok(prompt).input_ids), 8, 80, 32
    computed = {}
    for align in (True, False):
        cfg = llmsample.SMCConfig(
            num_particles=N,
            max_new_tokens=T,
            resample_every=K,
            ess_threshold=2.0,
            seed=0,
            align_blocks=align,
        )
        out = llmsample.smc_generate(vllm_engine[0], tok, [prompt], eos_token_id=[], config=cfg)
        ends = block_ends(P, T, K, 32 if align else None)
        assert out.ess.shape[1] == len(ends) and out.resampled[0, :-1].all()
        starts = [0, *ends[:-1]]
        expected = sum(N * ((P + a - 1) % 32 + 1 + b - a) for a, b in zip(starts, ends))
        computed[align] = out.num_forward_tokens
        assert out.num_forward_tokens == expected, (align, ends, out.num_forward_tokens)
    assert computed[True] < computed[False]


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(proposal="optimal"), "not available on vLLM"),
        (dict(stop_guard=True), "stop_guard is not available on vLLM"),
        (dict(reference=[[0, EOS]]), "conditional SMC"),
    ],
    ids=["optimal", "stop_guard", "reference"],
)
def test_vllm_refuses_what_it_cannot_weigh_exactly(vllm_engine, kwargs, match):
    tok = make_tokenizer(with_pad=True)
    with pytest.raises(ValueError, match=match):
        llmsample.smc_generate(
            vllm_engine[0], tok, ["a b"], potential=SOFT, max_new_tokens=T, **kwargs
        )


def test_vllm_ancestral_and_beam(vllm_engine):
    """ancestral_generate runs on the engine (unweighted draws, log phi reported);
    beam_generate refuses it with a clear error."""
    tok = make_tokenizer(with_pad=True)
    out = llmsample.ancestral_generate(
        vllm_engine[0], tok, PROMPTS, num_samples=5, potential=SOFT, max_new_tokens=T, seed=0
    )
    assert out.method == "ancestral" and out.log_z is None
    assert [len(t) for t in out.texts] == [5, 5] and out.log_potential.shape == (2, 5)
    assert torch.allclose(out.log_weights.exp(), torch.full((2, 5), 0.2, dtype=torch.float64))
    with pytest.raises(ValueError, match="vLLM has its own beam search"):
        llmsample.beam_generate(vllm_engine[0], tok, ["a b"])


def test_recipe_shards_over_replicas_and_resumes(vllm_engine, tmp_path):
    """recipes/smc_vllm.py: two replicas (two engines) share the concept sets and the
    merged file is in dataset order; after a kill, a rerun keeps what the parts hold and
    computes the rest, and a concept set's draws do not depend on the replica count
    (each chunk is seeded by its first concept set)."""
    import json
    import shutil
    import sys
    from dataclasses import replace
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "recipes"))
    import smc_vllm

    out = tmp_path / "smc.jsonl"
    cfg = smc_vllm.SMCvLLMConfig(
        model=vllm_engine[1],
        out=str(out),
        prompts=4,
        replicas=2,
        prompts_per_call=1,
        num_particles=4,
        max_new_tokens=4,
        resample_every=2,
        chat=False,  # the toy tokenizer has no chat template
        dtype="float32",
        enforce_eager=True,
    )
    assert smc_vllm.main(cfg)["computed"] == 4
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["index"] for r in rows] == [0, 1, 2, 3]
    assert {r["replica"] for r in rows} == {0, 1}
    for r in rows:
        assert len(r["texts"]) == 4 and math.isfinite(r["log_z"])
        assert torch.tensor(r["log_weights"]).logsumexp(0) == pytest.approx(0.0, abs=1e-6)

    parts = tmp_path / "smc.jsonl.parts"  # a kill after two concept sets, one line cut
    shutil.rmtree(parts)
    parts.mkdir()
    kept = [dict(r, log_z=123.0) for r in rows[:2]]
    (parts / "replica-0.jsonl").write_text(
        "".join(json.dumps(r) + "\n" for r in kept) + '{"index": 2, "tex'
    )
    assert smc_vllm.main(replace(cfg, replicas=1))["computed"] == 2
    again = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["index"] for r in again] == [0, 1, 2, 3]
    assert [r["log_z"] for r in again[:2]] == [123.0, 123.0]  # kept, not recomputed
    for a, b in zip(again[2:], rows[2:]):
        assert a["texts"] == b["texts"] and a["log_z"] == pytest.approx(b["log_z"], abs=1e-4)
