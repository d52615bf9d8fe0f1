"""Bad input gets a clear error that names the problem; degenerate runs never give NaN."""

import math
import warnings

import pytest
import torch
from conftest import EOS, make_model, make_tokenizer
from transformers import AutoModelForCausalLM, GPT2Config

import llmsample
from llmsample import SMCConfig, smc_generate
from llmsample.potentials import Constraint, Contains, Potential, Regex, Reward, TokenMask

FAST = dict(num_particles=4, max_new_tokens=4, seed=0)


# --------------------------------------------------------------------------- prompts


def test_empty_prompt(gpt2, tok):
    with pytest.raises(ValueError, match="prompt 0 is empty"):
        smc_generate(gpt2, tok, "", **FAST)
    with pytest.raises(ValueError, match="prompt 1 is empty"):
        smc_generate(gpt2, tok, ["a", ""], **FAST)


def test_empty_prompt_from_mask(gpt2):
    ids = torch.tensor([[0, 1], [2, 3]])
    mask = torch.tensor([[1, 1], [0, 0]])
    with pytest.raises(ValueError, match="prompt 1 is empty"):
        smc_generate(gpt2, input_ids=ids, attention_mask=mask, **FAST)


def test_empty_prompt_list(gpt2, tok):
    with pytest.raises(ValueError, match="empty list"):
        smc_generate(gpt2, tok, [], **FAST)


def test_prompts_and_input_ids_together(gpt2, tok):
    with pytest.raises(ValueError, match="exactly one of `prompts=`"):
        smc_generate(gpt2, tok, ["a"], input_ids=torch.tensor([[0]]), **FAST)
    with pytest.raises(ValueError, match="exactly one of `prompts=`"):
        smc_generate(gpt2, tok, **FAST)  # neither


def test_text_prompt_without_tokenizer(gpt2):
    with pytest.raises(ValueError, match="need a tokenizer"):
        smc_generate(gpt2, None, ["a"], **FAST)


def test_mask_shape_mismatch(gpt2):
    with pytest.raises(ValueError, match="does not match"):
        smc_generate(
            gpt2, input_ids=torch.tensor([[0, 1]]), attention_mask=torch.ones(1, 3), **FAST
        )


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_prompt_plus_max_new_tokens_beyond_context(arch, tok):
    model = make_model(arch)  # 64 positions
    with pytest.raises(ValueError, match=r"prompt length 3 \+ max_new_tokens 62 = 65 exceeds"):
        smc_generate(model, tok, ["a b c", "d"], num_particles=2, max_new_tokens=62)
    # exactly at the limit is fine
    out = smc_generate(
        model, tok, ["a b c"], num_particles=1, max_new_tokens=61, seed=0, eos_token_id=[]
    )
    assert out.sequences.shape == (1, 1, 64)


# --------------------------------------------------------------------------- config knobs


@pytest.mark.parametrize("n", [0, -3])
def test_num_particles_below_one(gpt2, tok, n):
    with pytest.raises(ValueError, match=rf"num_particles must be an integer >= 1, got {n}"):
        smc_generate(gpt2, tok, ["a"], num_particles=n, max_new_tokens=2)
    with pytest.raises(ValueError, match="num_particles"):
        SMCConfig(num_particles=n)


@pytest.mark.parametrize("n", [2.5, 4.0, "4"])
def test_num_particles_not_integer(gpt2, tok, n):
    with pytest.raises(ValueError, match="num_particles must be an integer"):
        smc_generate(gpt2, tok, ["a"], num_particles=n, max_new_tokens=2)


@pytest.mark.parametrize("t", [0, -1, 1.5])
def test_bad_max_new_tokens(gpt2, tok, t):
    with pytest.raises(ValueError, match="max_new_tokens must be an integer >= 1"):
        smc_generate(gpt2, tok, ["a"], num_particles=2, max_new_tokens=t)


def test_unknown_resampling_scheme(gpt2, tok):
    with pytest.raises(ValueError, match="unknown resampling scheme 'bogus'"):
        smc_generate(gpt2, tok, ["a"], resampling="bogus", **FAST)


@pytest.mark.parametrize("thr", [-0.1, float("nan")])
def test_bad_ess_threshold(gpt2, tok, thr):
    with pytest.raises(ValueError, match="ess_threshold must be >= 0"):
        smc_generate(gpt2, tok, ["a"], ess_threshold=thr, **FAST)


@pytest.mark.parametrize("k", [0, -2, 1.5, True])
def test_bad_resample_every(k):
    with pytest.raises(ValueError, match="resample_every must be an integer >= 1"):
        SMCConfig(resample_every=k)


def test_bad_sampling_knobs(gpt2, tok):
    with pytest.raises(ValueError, match="temperature must be > 0"):
        llmsample.ancestral_generate(gpt2, tok, ["a"], temperature=0.0, max_new_tokens=2)
    with pytest.raises(ValueError, match="top_k must be >= 1"):
        llmsample.ancestral_generate(gpt2, tok, ["a"], top_k=0, max_new_tokens=2)
    with pytest.raises(ValueError, match=r"top_p must be in \(0, 1\]"):
        llmsample.ancestral_generate(gpt2, tok, ["a"], top_p=1.5, max_new_tokens=2)


# --------------------------------------------------------------------------- tokenizer


def test_tokenizer_without_pad_token(gpt2):
    tok = make_tokenizer()
    assert tok.pad_token is None
    out = smc_generate(gpt2, tok, ["a b c", "d"], num_particles=3, max_new_tokens=4, seed=0)
    assert tok.pad_token is None and tok.pad_token_id is None  # not mutated
    assert out.sequences.shape[:2] == (2, 3)
    # the shorter prompt is left padded with the EOS id (the fallback pad id)
    assert out.sequences[1, :, :2].eq(EOS).all()
    assert out.sequences[1, :, 2].eq(3).all()


# --------------------------------------------------------------------------- proposal / twist


def test_proposal_vocab_mismatch(gpt2, tok):
    torch.manual_seed(0)
    other = AutoModelForCausalLM.from_config(
        GPT2Config(vocab_size=12, n_embd=16, n_layer=1, n_head=2, n_positions=64)
    ).eval()
    with pytest.raises(ValueError, match="vocabulary size 12 does not match the base model's 9"):
        smc_generate(gpt2, tok, ["a"], proposal=other, **FAST)


def test_bad_proposal_and_twist_types(gpt2, tok):
    with pytest.raises(ValueError, match="proposal must be"):
        smc_generate(gpt2, tok, ["a"], proposal="greedy", **FAST)
    with pytest.raises(ValueError, match="twist must be 'auto', 'prefix', 'none'"):
        smc_generate(gpt2, tok, ["a"], twist="learned", **FAST)


def test_prefix_twist_needs_prefix_scores(gpt2, tok):
    with pytest.raises(ValueError, match=r"twist='prefix' but .*contains \['a'\].* no prefix"):
        smc_generate(gpt2, tok, ["a"], potential=Contains("a"), twist="prefix", **FAST)
    with pytest.raises(ValueError, match="twist='prefix' needs a potential"):
        smc_generate(gpt2, tok, ["a"], twist="prefix", **FAST)


def test_optimal_proposal_needs_token_level_twist(gpt2, tok):
    mask = TokenMask(banned=[0])
    with pytest.raises(ValueError, match="locally optimal proposal needs a twist"):
        smc_generate(gpt2, tok, ["a"], potential=mask, twist="none", proposal="optimal", **FAST)
    # by default the run twists with the mask's token scores, so q never proposes token 0
    # (128 proposed tokens of V = 9: an ignored mask would show it with prob. 1 - 3e-7)
    many = FAST | dict(num_particles=32)
    out = smc_generate(gpt2, tok, ["a"], potential=mask, proposal="optimal", **many)
    assert out.sequences.numel() and not (out.continuations == 0).any()
    # a prefix twist without token scores (Regex) is not enough either
    with pytest.raises(ValueError, match="locally optimal proposal needs a twist"):
        smc_generate(
            gpt2,
            tok,
            ["a"],
            potential=Regex("a.*", mode="fullmatch"),
            twist="prefix",
            proposal="optimal",
            **FAST,
        )


# --------------------------------------------------------------------------- degenerate runs


class RejectPrompt0(Potential):
    """Rejects every particle of prompt 0; accepts everything else."""

    def complete(self, x):
        return torch.where(x.prompt_index == 0, -math.inf, 0.0).to(torch.float64)


@pytest.mark.parametrize("ess_threshold", [0.5, 2.0])
def test_all_rejected_prompt_gives_neg_inf_log_z(gpt2, tok, ess_threshold):
    with pytest.warns(
        UserWarning, match=r"rejected every particle of prompt\(s\) \[?0\]?: log_z = -inf"
    ):
        out = smc_generate(
            gpt2,
            tok,
            ["a b", "c"],
            potential=RejectPrompt0(),
            num_particles=6,
            max_new_tokens=6,
            seed=0,
            ess_threshold=ess_threshold,
        )
    for name in ("log_weights", "log_weights_unnormalized", "log_z", "ess", "log_potential"):
        assert not torch.isnan(getattr(out, name)).any(), name
    assert out.log_z[0] == -math.inf
    assert torch.isfinite(out.log_z[1])
    assert torch.isneginf(out.log_weights[0]).all()
    assert torch.isneginf(out.log_potential[0]).all()
    assert torch.isfinite(out.log_weights[1]).all()
    torch.testing.assert_close(
        out.log_weights[1].logsumexp(0), torch.tensor(0.0, dtype=torch.float64)
    )
    assert out.ess[0, -1] == 0  # no live particle left
    with pytest.raises(ValueError, match="prompt 0: every particle has weight 0"):
        out.sample(2)
    assert out.texts[1] and len(out.texts[1]) == 6


def test_all_rejected_by_constraint(gpt2, tok):
    with pytest.warns(UserWarning, match="log_z = -inf"):
        out = smc_generate(gpt2, tok, ["a"], potential=Constraint(lambda t: False), **FAST)
    assert out.log_z.tolist() == [-math.inf]
    assert not torch.isnan(out.log_weights).any()
    with pytest.raises(ValueError, match="nothing to sample"):
        out.sample(1, seed=0)


def test_healthy_run_does_not_warn(gpt2, tok):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        out = smc_generate(gpt2, tok, ["a"], potential=Constraint(lambda t: True), **FAST)
    assert out.log_z.tolist() == [0.0]  # phi = 1 and q = p: Z estimate is exactly 1


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_reward_nan_raises(gpt2, tok, bad):
    pot = Reward(lambda texts: [bad] * len(texts))
    with pytest.raises(ValueError, match="potential.complete returned NaN or \\+inf"):
        smc_generate(gpt2, tok, ["a"], potential=pot, **FAST)


def test_prefix_nan_raises(gpt2, tok):
    pot = Reward(lambda t: [0.0] * len(t), prefix_fn=lambda t: [float("nan")] * len(t))
    with pytest.raises(ValueError, match="twist.prefix returned NaN"):
        smc_generate(gpt2, tok, ["a"], potential=pot, twist="prefix", **FAST)


def test_reward_wrong_count_raises(gpt2, tok):
    pot = Reward(lambda texts: [0.0])
    with pytest.raises(ValueError, match="reward function returned"):
        smc_generate(
            gpt2,
            tok,
            ["a"],
            potential=pot,
            num_particles=4,
            max_new_tokens=3,
            seed=0,
            eos_token_id=[],  # all four rows complete together at the last step
        )
