"""A peft LoRA adapter as an SMC proposal for its own base model, with exact weights.

peft injects the LoRA layers into the base model in place, so the base model object
applies the adapter too; the target p must run with the adapter disabled. Checked
against brute-force enumeration on the toy GPT-2 (V = 9): with a perturbed (non-zero)
adapter q != p_base, the SMC estimate of Z is unbiased for the *base* model's Z,
weighted particles match sigma_base, and a run whose target wrongly keeps the adapter
on is caught by the same checks.
"""

import copy
import math
import warnings

import pytest
import torch
from conftest import EOS, continuations, make_model, make_tokenizer, perturbed_lora, soft_reward

import llmsample
from llmsample.diagnostics.exact import enumerate_target
from llmsample.generate import _resolve_proposal
from llmsample.proposals import ModelProposal
from llmsample.smc import SMCConfig, run_smc

PROMPTS = ["a b", "c d e f"]
T = 4
GPT2_MODULES = ["c_attn", "c_proj", "c_fc"]
SOFT = soft_reward()  # log phi = #c - 0.7 #a, with prefix scores (a valid twist)


@pytest.fixture(scope="module")
def setup():
    """(base, policy, tokenizer, exact targets of the base, of the adapted model)."""
    tok = make_tokenizer()
    base = make_model("gpt2")
    exact_base = [enumerate_target(base, tok, p, SOFT, T, EOS) for p in PROMPTS]  # unwrapped
    policy = perturbed_lora(base, GPT2_MODULES, std=0.2)  # q != p_base
    exact_policy = [enumerate_target(policy, tok, p, SOFT, T, EOS) for p in PROMPTS]
    return base, policy, tok, exact_base, exact_policy


def logits(model, ids=((EOS, 0, 1, 2), (EOS, 3, 4, 5))):
    with torch.no_grad():
        return model(input_ids=torch.tensor(ids)).logits


def run(model, tok, proposal, runs, num_particles=16, seed=0, method=llmsample.smc_generate):
    return method(
        model,
        tok,
        [p for p in PROMPTS for _ in range(runs)],
        potential=SOFT,
        twist="prefix",
        proposal=proposal,
        num_particles=num_particles,
        max_new_tokens=T,
        ess_threshold=0.7,
        seed=seed,
    )


def z_ratio(out, targets, runs):
    """Per prompt: (mean of Z_hat / Z, its standard error), Z the exact target's."""
    stats = []
    for b, target in enumerate(targets):
        ratio = (out.log_z[b * runs : (b + 1) * runs] - target.log_z).exp()
        stats.append((float(ratio.mean()), float(ratio.std()) / math.sqrt(runs)))
    return stats


def test_perturbed_adapter_changes_the_model(setup):
    """The setup has power: q != p_base, the adapter moves Z, and disable_adapter is p_base."""
    base, policy, tok, exact_base, exact_policy = setup
    fresh = make_model("gpt2")  # the same weights, never wrapped
    assert not torch.allclose(logits(policy), logits(fresh), atol=1e-2)
    assert torch.equal(logits(base), logits(policy))  # the base object applies the adapter
    with policy.disable_adapter():
        assert torch.allclose(logits(policy), logits(fresh), atol=1e-6)
        off = enumerate_target(policy, tok, PROMPTS[0], SOFT, T, EOS)
    assert abs(off.log_z - exact_base[0].log_z) < 1e-9
    for eb, ep in zip(exact_base, exact_policy):
        assert abs(ep.log_z - eb.log_z) > 0.3  # Z_policy / Z_base < 0.75


@pytest.mark.parametrize("case", ["same_object", "base_object", "adapter", "importance"])
def test_z_hat_unbiased_for_the_base_model(setup, case):
    """Z_hat with the adapter as q is unbiased for the base model's Z (within 3 SE),
    and the wrong target (adapter on) would be more than 3 SE away."""
    base, policy, tok, exact_base, exact_policy = setup
    runs = 400
    model, proposal, method = {
        "same_object": (policy, policy, llmsample.smc_generate),
        "base_object": (base, policy, llmsample.smc_generate),
        "adapter": (policy, "adapter", llmsample.smc_generate),
        "importance": (policy, policy, llmsample.importance_generate),
    }[case]
    out = run(model, tok, proposal, runs, method=method)
    if case != "importance":
        assert out.resampled.any(), "the test must exercise resampling"
    for (mean, se), eb, ep in zip(z_ratio(out, exact_base, runs), exact_base, exact_policy):
        assert abs(mean - 1) < 3 * se, (case, mean, se)
        if case != "importance":  # (without resampling the SE is about twice as large)
            assert abs(math.exp(ep.log_z - eb.log_z) - 1) > 3 * se  # power: the bug shows


def test_target_with_adapter_on_is_caught(setup):
    """Negative control: the same run with the target evaluated with the adapter on
    (what calling the wrapped base model does) estimates Z_policy and fails the check."""
    _, policy, tok, exact_base, exact_policy = setup
    runs = 400
    batch = llmsample.hf.prompts.encode_prompts(tok, [p for p in PROMPTS for _ in range(runs)])
    cfg = SMCConfig(num_particles=16, max_new_tokens=T, ess_threshold=0.7, seed=0)
    twist = llmsample.twists.resolve_twist("prefix", SOFT)
    out = run_smc(
        policy,
        tok,
        batch,
        SOFT,
        cfg,
        proposal=ModelProposal(policy),
        twist=twist,
        eos_token_ids=[EOS],
    )
    for mean, se in z_ratio(out, exact_base, runs):
        assert abs(mean - 1) > 3 * se, (mean, se)  # caught
    for mean, se in z_ratio(out, exact_policy, runs):
        assert abs(mean - 1) < 3 * se  # it is unbiased for the adapted model instead


@pytest.mark.parametrize("case", ["same_object", "base_object", "adapter", "tempered"])
def test_matches_an_unrelated_model_with_the_same_weights(setup, case):
    """The shared-base run is the ordinary two-model run: the base (a fresh copy) as p and
    the merged adapter (a separate plain model) as q give the same draws and weights."""
    base, policy, tok, _, _ = setup
    fresh = make_model("gpt2")
    merged = copy.deepcopy(policy).merge_and_unload()
    model, proposal, reference = {
        "same_object": (policy, policy, merged),
        "base_object": (base, policy, merged),
        "adapter": (policy, "adapter", merged),
        "tempered": (base, ModelProposal(policy, 1.3), ModelProposal(merged, 1.3)),
    }[case]
    out = run(model, tok, proposal, runs=32, num_particles=8, seed=5)
    ref = run(fresh, tok, reference, runs=32, num_particles=8, seed=5)
    assert torch.equal(out.sequences, ref.sequences)
    assert torch.allclose(out.log_weights_unnormalized, ref.log_weights_unnormalized, atol=1e-4)
    assert out.num_forward_tokens == ref.num_forward_tokens


def test_weighted_particles_match_the_base_posterior(setup):
    """TV(weighted particles, sigma_base) within the noise floor of floor(ESS) exact draws;
    the adapter's own posterior sigma_policy and the unweighted draws are both caught."""
    _, policy, tok, _, _ = setup
    t3 = 3
    out = llmsample.smc_generate(
        policy,
        tok,
        PROMPTS,
        potential=SOFT,
        twist="prefix",
        proposal="adapter",
        num_particles=4096,
        max_new_tokens=t3,
        seed=4,
    )
    with policy.disable_adapter():
        targets = [enumerate_target(policy, tok, p, SOFT, t3, EOS) for p in PROMPTS]
    wrong = [enumerate_target(policy, tok, p, SOFT, t3, EOS) for p in PROMPTS]
    for b, (target, bad) in enumerate(zip(targets, wrong)):
        samples = continuations(out, b)
        m = int(llmsample.smc.resampling.ess(out.log_weights[b]))
        floor = target.tv_noise_floor(m, q=0.99)
        assert target.tv(samples, out.log_weights[b]) < floor
        assert target.tv(samples) > floor  # unweighted draws: caught
        assert 0.5 * float((target.log_sigma.exp() - bad.log_sigma.exp()).abs().sum()) > floor


def test_adapter_state_restored_after_the_run(setup):
    """disable_adapter contexts are exited: the adapter is still on afterwards, the base
    is untouched, and peft's re-enabling does not unfreeze the adapter weights."""
    base, policy, tok, _, _ = setup
    before, fresh = logits(policy), logits(make_model("gpt2"))
    grads = {n: p.requires_grad for n, p in policy.named_parameters()}
    for p in policy.parameters():
        p.requires_grad_(False)  # a frozen adapter, as load_model returns it
    try:
        for model, proposal in [(policy, policy), (base, policy), (policy, "adapter")]:
            run(model, tok, proposal, runs=2, num_particles=4)
            assert torch.equal(logits(policy), before)
            assert torch.equal(logits(base), before)
            assert not any(p.requires_grad for p in policy.parameters())
        with policy.disable_adapter():
            assert torch.allclose(logits(policy), fresh, atol=1e-6)
    finally:
        for n, p in policy.named_parameters():
            p.requires_grad_(grads[n])
    assert policy.get_model_status().enabled is True


def test_forward_tokens_count_both_sessions(setup):
    """The target (adapter off) and the proposal (adapter on) each prefill and step."""
    base, policy, tok, _, _ = setup
    runs, n = 3, 8
    for model, proposal in [(policy, policy), (base, policy), (policy, "adapter")]:
        out = run(model, tok, proposal, runs=runs, num_particles=n)
        B, P = len(PROMPTS) * runs, out.prompt_length
        steps = out.ess.shape[1] - 1  # no model step after the last decoding step
        assert out.num_forward_tokens == 2 * (B * P + B * n * steps)
        plain = run(model, tok, None, runs=runs, num_particles=n)
        assert plain.num_forward_tokens == B * P + B * n * (plain.ess.shape[1] - 1)


def test_which_runs_disable_the_adapter(setup):
    """Only a peft proposal over the target's own base switches the target's adapter off."""
    base, policy, _, _, _ = setup
    other = make_model("gpt2", seed=7)
    for model, proposal in [
        (policy, policy),
        (base, policy),
        (policy, "adapter"),
        (base, ModelProposal(policy, top_k=3)),
    ]:
        q, context = _resolve_proposal(proposal, model)
        assert isinstance(q, ModelProposal) and q.model is policy and context is not None
    for model, proposal in [(other, policy), (policy, other), (policy, None), (base, None)]:
        assert _resolve_proposal(proposal, model)[1] is None  # used as they are
    with pytest.raises(ValueError, match="proposal='adapter' needs a peft model"):
        _resolve_proposal("adapter", base)
    with pytest.raises(ValueError, match="'adapter'"):
        _resolve_proposal("adaptor", policy)


def test_adapter_as_plain_sampler(setup):
    """ancestral_generate(policy) draws from the adapted model, not from the base."""
    _, policy, tok, _, _ = setup
    t3 = 3
    out = llmsample.ancestral_generate(
        policy, tok, PROMPTS[0], num_samples=4096, max_new_tokens=t3, seed=1
    )
    adapted = enumerate_target(policy, tok, PROMPTS[0], None, t3, EOS)
    with policy.disable_adapter():
        base = enumerate_target(policy, tok, PROMPTS[0], None, t3, EOS)
    samples = continuations(out, 0)
    floor = adapted.tv_noise_floor(len(samples), q=0.99)
    assert adapted.tv(samples) < floor
    assert base.tv(samples) > floor
    assert out.log_z is None and out.num_forward_tokens > 0


@pytest.fixture(scope="module")
def saved(setup, tmp_path_factory):
    """A toy base model + tokenizer and the perturbed adapter, saved as folders."""
    _, policy, tok, _, _ = setup
    root = tmp_path_factory.mktemp("adapter")
    base_dir, adapter_dir = root / "base", root / "adapter"
    make_model("gpt2").save_pretrained(base_dir)
    tok.save_pretrained(base_dir)
    policy.save_pretrained(adapter_dir)
    return base_dir, adapter_dir


def test_load_model_round_trip(setup, saved):
    base_dir, adapter_dir = saved
    _, policy, tok, exact_base, _ = setup
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # peft: fan_in_fan_out for GPT-2's Conv1D
        loaded, loaded_tok = llmsample.load_model(str(base_dir), adapter=str(adapter_dir))
    assert torch.allclose(logits(loaded), logits(policy), atol=1e-5)
    assert not any(p.requires_grad for p in loaded.parameters())  # loaded for inference
    out = run(loaded, loaded_tok, "adapter", runs=200, num_particles=16, seed=1)
    for mean, se in z_ratio(out, exact_base, 200):
        assert abs(mean - 1) < 3 * se
    assert not any(p.requires_grad for p in loaded.parameters())  # still frozen
    with loaded.disable_adapter():  # (peft's own context unfreezes it on exit)
        assert torch.allclose(logits(loaded), logits(make_model("gpt2")), atol=1e-5)


def test_load_model_bad_adapter_path(saved, tmp_path):
    base_dir, _ = saved
    missing = tmp_path / "no" / "such" / "adapter"
    with pytest.raises(FileNotFoundError, match=r"does not exist.*save_pretrained") as err:
        llmsample.load_model(str(base_dir), adapter=str(missing))
    assert str(missing) in str(err.value)
    with pytest.raises(FileNotFoundError, match=r"has no adapter_config\.json") as err:
        llmsample.load_model(str(base_dir), adapter=str(base_dir))  # a model, not an adapter
    assert str(base_dir) in str(err.value)
    with pytest.raises(ValueError, match=r"cannot load adapter 'nobody/no-such-adapter'"):
        llmsample.load_model(str(base_dir), adapter="nobody/no-such-adapter")  # hub, offline
