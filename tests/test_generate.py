"""The entry points: smc_generate, importance_generate, ancestral_generate, beam_generate."""

import math

import pytest
import torch
from conftest import EOS, make_model

import llmsample
from llmsample import SMCConfig, smc_generate
from llmsample.potentials import Constraint, Contains, Reward, SuffixLikelihood

PROMPTS = ["a b c", "d"]
PROMPT_IDS = [[0, 1, 2], [3]]


def distinct_words(texts):
    """A reward with a wide spread: 0.7 per distinct word."""
    return [0.7 * len(set(t.split())) for t in texts]


REWARD = Reward(distinct_words)


def left_padded(pad):
    ids = torch.tensor([[0, 1, 2], [pad, pad, 3]])
    return ids, torch.tensor([[1, 1, 1], [0, 0, 1]])


def right_padded(pad):
    ids = torch.tensor([[0, 1, 2], [3, pad, pad]])
    return ids, torch.tensor([[1, 1, 1], [1, 0, 0]])


def assert_same_output(a, b):
    assert torch.equal(a.sequences, b.sequences)
    assert a.texts == b.texts
    torch.testing.assert_close(a.log_weights, b.log_weights)
    torch.testing.assert_close(a.log_z, b.log_z)
    assert torch.equal(a.resampled, b.resampled)


SMC = dict(potential=REWARD, num_particles=6, max_new_tokens=6, seed=1, ess_threshold=0.9)


# --------------------------------------------------------------------------- prompts


def test_input_ids_same_as_text_prompts(model, tok):
    text = smc_generate(model, tok, PROMPTS, **SMC)
    ids, mask = left_padded(EOS)
    tensors = smc_generate(model, tok, input_ids=ids, attention_mask=mask, **SMC)
    assert_same_output(text, tensors)
    no_tok = smc_generate(
        model, None, input_ids=ids, attention_mask=mask, **(SMC | {"potential": None})
    )
    ref = smc_generate(model, tok, PROMPTS, **(SMC | {"potential": None}))
    assert torch.equal(no_tok.sequences, ref.sequences)  # ids alone need no tokenizer


def test_right_padding_same_as_left_padding(model, tok):
    left = smc_generate(
        model, tok, input_ids=left_padded(5)[0], attention_mask=left_padded(5)[1], **SMC
    )
    ids, mask = right_padded(6)  # an arbitrary pad value under a zero mask
    right = smc_generate(model, tok, input_ids=ids, attention_mask=mask, **SMC)
    assert_same_output(left, right)
    assert left.prompt_length == 3


def test_single_string_prompt(gpt2, tok):
    one = smc_generate(gpt2, tok, "a b c", **SMC)
    listed = smc_generate(gpt2, tok, ["a b c"], **SMC)
    assert one.sequences.shape[0] == 1
    assert_same_output(one, listed)


# --------------------------------------------------------------------------- output contract


def test_output_shapes_and_normalization(gpt2, tok, monkeypatch):
    B, N, T = 2, 6, 7
    pools = []  # log weights handed to the resampler: [prompts, their running rows]
    real = llmsample.smc.conditional.resample

    def spy(log_w, scheme, generator):
        pools.append(log_w.clone())
        return real(log_w, scheme, generator)

    monkeypatch.setattr(llmsample.smc.conditional, "resample", spy)
    out = smc_generate(
        gpt2,
        tok,
        PROMPTS,
        potential=Reward(distinct_words, distinct_words),  # prefix scores make running
        twist="prefix",  # weights differ, so their ESS can fall
        num_particles=N,
        max_new_tokens=T,
        seed=0,
        ess_threshold=0.9,
    )
    P = 3
    S = out.ess.shape[1]
    assert 1 <= S <= T
    assert out.sequences.shape == (B, N, P + S)
    assert out.prompt_length == P and out.num_particles == N
    assert out.continuations.shape == (B, N, S)
    assert out.sequences[0, :, :P].eq(torch.tensor(PROMPT_IDS[0])).all()
    assert out.sequences[1, :, P - 1].eq(3).all()
    assert len(out.texts) == B and all(len(t) == N for t in out.texts)
    assert out.log_weights.shape == (B, N) and out.log_weights.dtype == torch.float64
    torch.testing.assert_close(out.log_weights.logsumexp(1), torch.zeros(B, dtype=torch.float64))
    assert out.log_z.shape == (B,) and torch.isfinite(out.log_z).all()
    assert out.ess.shape == (B, S) and out.resampled.shape == (B, S)
    assert out.resampled.dtype == torch.bool
    assert ((out.ess >= 1 - 1e-9) & (out.ess <= N + 1e-9)).all()
    # resampling happens only where the running rows' ESS / their count fell below the
    # threshold (finished rows stay out of the pool), never at the last step
    assert out.resampled.any()
    assert sum(pool.shape[0] for pool in pools) == int(out.resampled.sum())
    for pool in pools:
        n = pool.shape[1]
        assert 1 <= n <= N and (llmsample.smc.resampling.ess(pool) < 0.9 * n).all()
    assert any(pool.shape[1] < N for pool in pools)  # some resampling left finished rows out
    assert not out.resampled[:, -1].any()
    assert out.resampling_steps == [torch.nonzero(r).flatten().tolist() for r in out.resampled]
    # each text decodes its continuation (EOS stripped)
    for b in range(B):
        for i in range(N):
            cont = out.continuations[b, i].tolist()
            k = cont.index(EOS) if EOS in cont else len(cont)
            assert out.texts[b][i] == tok.decode(cont[:k])


def test_same_seed_same_output_different_seed_differs(gpt2, tok):
    a = smc_generate(gpt2, tok, PROMPTS, **SMC)
    b = smc_generate(gpt2, tok, PROMPTS, **SMC)
    assert_same_output(a, b)
    assert torch.equal(a.ess, b.ess)
    c = smc_generate(gpt2, tok, PROMPTS, **(SMC | {"seed": 2}))
    assert a.sequences.shape != c.sequences.shape or not torch.equal(a.sequences, c.sequences)


def test_twist_is_switched_once_by_the_potential(gpt2, tok):
    """The default twist ('auto') is the potential's prefix score when its constructor
    gave it one, else none: the same runs as naming 'prefix' or 'none' explicitly."""
    from llmsample.twists import NoTwist, PotentialTwist, resolve_twist

    bonus, plain = Contains("a", prefix_bonus=2.0), Contains("a")
    assert isinstance(resolve_twist("auto", None), NoTwist)
    assert isinstance(resolve_twist("auto", plain), NoTwist)
    auto = resolve_twist("auto", bonus)
    assert isinstance(auto, PotentialTwist) and auto.potential is bonus
    assert isinstance(resolve_twist("none", bonus), NoTwist)
    runs = {}
    for name, phi, twist in [
        ("auto-bonus", bonus, None),
        ("prefix", bonus, "prefix"),
        ("off", bonus, "none"),
        ("auto-plain", plain, None),
        ("none-plain", plain, "none"),
    ]:
        kw = SMC | {"potential": phi} | ({} if twist is None else {"twist": twist})
        runs[name] = smc_generate(gpt2, tok, PROMPTS, **kw)
    assert_same_output(runs["auto-bonus"], runs["prefix"])
    assert_same_output(runs["auto-plain"], runs["none-plain"])
    # the twist changes the run: the same potential with it switched off differs
    assert not torch.equal(runs["auto-bonus"].ess, runs["off"].ess)


def test_config_plus_overriding_kwarg(gpt2, tok):
    cfg = SMCConfig(
        num_particles=3, max_new_tokens=5, seed=7, resampling="multinomial", ess_threshold=2.0
    )
    out = smc_generate(gpt2, tok, PROMPTS, potential=REWARD, config=cfg, num_particles=5)
    ref = smc_generate(
        gpt2,
        tok,
        PROMPTS,
        potential=REWARD,
        num_particles=5,
        max_new_tokens=5,
        seed=7,
        resampling="multinomial",
        ess_threshold=2.0,
    )
    assert out.num_particles == 5  # the kwarg wins ...
    assert out.ess.shape[1] <= 5  # ... the config supplies the rest
    assert out.resampled[:, :-1].any()  # ess_threshold 2.0 from the config
    assert_same_output(out, ref)
    assert cfg.num_particles == 3  # the config object is not mutated


# --------------------------------------------------------------------------- particle freezing


def test_finished_particles_are_frozen(gpt2, tok):
    N, T, pad = 24, 9, 3
    out = smc_generate(
        gpt2,
        tok,
        PROMPTS,
        num_particles=N,
        max_new_tokens=T,
        seed=0,
        pad_token_id=pad,
        potential=REWARD,
        ess_threshold=0.9,
    )
    assert out.continuations.shape[-1] == T
    ended, cut = 0, 0
    for b in range(2):
        for i in range(N):
            cont = out.continuations[b, i].tolist()
            text = out.texts[b][i]
            assert "<eos>" not in text
            if EOS in cont:
                k = cont.index(EOS)
                assert all(v == pad for v in cont[k + 1 :])  # frozen after EOS
                assert text == tok.decode(cont[:k])
                ended += k + 1 < T
            else:
                assert len(text.split()) == T  # cut at max_new_tokens: exactly T tokens
                assert text == tok.decode(cont)
                cut += 1
    assert ended > 0 and cut > 0  # both cases occurred


# --------------------------------------------------------------------------- baselines


def test_importance_never_resamples_and_best(gpt2, tok):
    kw = dict(potential=REWARD, num_particles=8, max_new_tokens=6, seed=4)
    smc = smc_generate(gpt2, tok, PROMPTS, ess_threshold=2.0, **kw)
    assert smc.resampled.any()
    out = llmsample.importance_generate(gpt2, tok, PROMPTS, **kw)
    assert out.method == "importance"
    assert not out.resampled.any()
    # q = p and no twist: the importance weight is exactly phi
    torch.testing.assert_close(out.log_weights_unnormalized, out.log_potential)
    for b in range(2):
        rewards = torch.tensor(distinct_words(out.texts[b]), dtype=torch.float64)
        torch.testing.assert_close(out.log_potential[b], rewards)
        assert rewards.max() > rewards.min()  # the weights really differ
        assert out.best()[b] == out.texts[b][int(out.log_weights[b].argmax())]
        assert distinct_words([out.best()[b]])[0] == rewards.max()
        expected_log_z = rewards.logsumexp(0) - math.log(8)
        torch.testing.assert_close(out.log_z[b], expected_log_z)


def test_importance_skips_the_twist_it_cannot_use(gpt2, tok, monkeypatch):
    """A run that never resamples does not score prefixes for the twist: the psi terms
    telescope away (q = p, so the weights are phi exactly), and the output is the untwisted
    run's. Where a run can resample, or the proposal reads token scores, the twist is kept."""
    from llmsample.potentials import TokenMask

    bonus = Contains("a", prefix_bonus=2.0)
    calls = []
    real = bonus.prefix
    monkeypatch.setattr(bonus, "prefix", lambda x: calls.append(x.num_rows) or real(x))
    kw = dict(potential=bonus, num_particles=8, max_new_tokens=6, seed=4)
    out = llmsample.importance_generate(gpt2, tok, PROMPTS, **kw)
    assert calls == []
    torch.testing.assert_close(out.log_weights_unnormalized, out.log_potential)
    assert_same_output(out, llmsample.importance_generate(gpt2, tok, PROMPTS, twist="none", **kw))
    smc_generate(gpt2, tok, PROMPTS, ess_threshold=2.0, **kw)
    assert calls  # the same potential twists a run that can resample
    # the locally optimal proposal reads the mask's token scores: never proposes token 0
    kw = dict(potential=TokenMask(banned=[0]), num_particles=32, max_new_tokens=4, seed=0)
    out = llmsample.importance_generate(gpt2, tok, ["a"], proposal="optimal", **kw)
    assert out.sequences.numel() and not (out.continuations == 0).any()


def test_ancestral_uniform_weights(gpt2, tok):
    N = 5
    out = llmsample.ancestral_generate(
        gpt2, tok, PROMPTS, num_samples=N, max_new_tokens=5, seed=0, potential=Contains("a")
    )
    assert out.method == "ancestral" and out.log_z is None
    torch.testing.assert_close(
        out.log_weights, torch.full((2, N), -math.log(N), dtype=torch.float64)
    )
    assert torch.equal(out.log_weights_unnormalized, torch.zeros(2, N, dtype=torch.float64))
    assert not out.resampled.any()
    # the potential is evaluated, not used
    expected = [[0.0 if "a" in t.split() else -math.inf for t in row] for row in out.texts]
    assert out.log_potential.tolist() == expected
    assert any(-math.inf in row for row in expected)


def _greedy(model, ids, mask, T):
    with torch.no_grad():
        return model.generate(
            input_ids=ids,
            attention_mask=mask,
            do_sample=False,
            max_new_tokens=T,
            pad_token_id=EOS,
            eos_token_id=EOS,
        )


def test_ancestral_top_k_1_is_greedy(gpt2, tok):
    ids, mask = left_padded(EOS)
    out = llmsample.ancestral_generate(
        gpt2, tok, PROMPTS, num_samples=3, max_new_tokens=6, top_k=1, seed=0
    )
    greedy = _greedy(gpt2, ids, mask, 6)
    assert out.sequences.shape[-1] == greedy.shape[-1]
    for b in range(2):
        assert (out.sequences[b] == greedy[b]).all()


def test_ancestral_with_temperature_and_truncation(gpt2, tok):
    out = llmsample.ancestral_generate(
        gpt2,
        tok,
        ["a b c"],
        num_samples=8,
        max_new_tokens=5,
        temperature=0.7,
        top_k=2,
        top_p=0.95,
        seed=0,
    )
    assert out.sequences.shape[:2] == (1, 8)
    # every sampled token is among the top-2 next tokens of the model at that point
    for seq in out.sequences[0]:
        seq = seq.tolist()
        n = 3 + (seq[3:].index(EOS) + 1 if EOS in seq[3:] else len(seq) - 3)
        with torch.no_grad():
            logits = gpt2(input_ids=torch.tensor([seq[:n]])).logits[0]
        for pos in range(3, n):
            assert seq[pos] in logits[pos - 1].topk(2).indices.tolist()
    assert len({tuple(s.tolist()) for s in out.sequences[0]}) > 1  # still random


def test_beam_generate(gpt2, tok):
    out = llmsample.beam_generate(
        gpt2, tok, PROMPTS, num_beams=4, max_new_tokens=5, potential=Contains("b")
    )
    assert out.method == "beam" and out.log_z is None
    assert out.sequences.shape[:2] == (2, 4)
    torch.testing.assert_close(
        out.log_weights, torch.full((2, 4), -math.log(4), dtype=torch.float64)
    )
    for b in range(2):
        assert len(set(out.texts[b])) == 4  # distinct beams
        assert all("<eos>" not in t for t in out.texts[b])
        assert out.log_potential[b].tolist() == [
            0.0 if "b" in t.split() else -math.inf for t in out.texts[b]
        ]
    assert out.sequences[0, :, :3].eq(torch.tensor(PROMPT_IDS[0])).all()


# --------------------------------------------------------------------------- potentials in output


def test_log_potential_follows_resampled_particles(gpt2, tok):
    out = smc_generate(
        gpt2,
        tok,
        PROMPTS,
        potential=REWARD,
        num_particles=8,
        max_new_tokens=6,
        seed=0,
        ess_threshold=2.0,
    )
    assert out.resampled.any()
    for b in range(2):
        expected = torch.tensor(distinct_words(out.texts[b]), dtype=torch.float64)
        torch.testing.assert_close(out.log_potential[b], expected)
    assert smc_generate(gpt2, tok, PROMPTS, num_particles=2, max_new_tokens=2).log_potential is None


def test_constraint_log_potential_matches_texts(gpt2, tok):
    out = smc_generate(
        gpt2,
        tok,
        PROMPTS,
        potential=Constraint(lambda t: "e" not in t.split()),
        num_particles=8,
        max_new_tokens=6,
        seed=0,
    )
    for b in range(2):
        assert out.log_potential[b].tolist() == [
            -math.inf if "e" in t.split() else 0.0 for t in out.texts[b]
        ]
        # zero-weight particles are exactly the rejected ones
        assert torch.equal(torch.isneginf(out.log_weights[b]), torch.isneginf(out.log_potential[b]))


# --------------------------------------------------------------------------- peft / proposals


@pytest.mark.parametrize("arch,targets", [("gpt2", ["c_attn"]), ("llama", ["q_proj", "v_proj"])])
def test_peft_lora_model(arch, targets, tok):
    import peft  # a core dependency: a missing peft must fail, not skip

    base = make_model(arch)
    cfg = peft.LoraConfig(r=4, target_modules=targets, fan_in_fan_out=arch == "gpt2")
    wrapped = peft.get_peft_model(make_model(arch), cfg)  # fresh adapter: B = 0
    kw = dict(potential=REWARD, num_particles=6, max_new_tokens=6, seed=5, ess_threshold=0.9)
    a = smc_generate(base, tok, PROMPTS, **kw)
    b = smc_generate(wrapped, tok, PROMPTS, **kw)
    assert_same_output(a, b)
    assert a.num_forward_tokens == b.num_forward_tokens
    with torch.no_grad():  # a non-zero adapter must change the result
        for name, p in wrapped.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 1.0)
    c = smc_generate(wrapped, tok, PROMPTS, **kw)
    assert a.sequences.shape != c.sequences.shape or not torch.equal(a.sequences, c.sequences)


def _teacher_forced_logp(model, prompt, cont):
    with torch.no_grad():
        logp = torch.log_softmax(
            model(input_ids=torch.tensor([prompt + cont])).logits[0].double(), -1
        )
    return sum(float(logp[len(prompt) + j - 1, v]) for j, v in enumerate(cont))


def test_model_proposal_weights_and_forward_count(gpt2, tok):
    other = make_model("gpt2", seed=1)
    B, P, N, T = 2, 3, 4, 5
    out = llmsample.importance_generate(
        gpt2,
        tok,
        PROMPTS,
        proposal=other,
        num_particles=N,
        max_new_tokens=T,
        seed=0,
        eos_token_id=[],
    )
    assert out.sequences.shape == (B, N, P + T)
    assert out.num_forward_tokens == 2 * (B * P + B * N * (T - 1))  # both models
    # importance weight = p(x) / q(x) over the whole continuation
    for b in range(B):
        for i in range(N):
            cont = out.continuations[b, i].tolist()
            expected = _teacher_forced_logp(gpt2, PROMPT_IDS[b], cont) - _teacher_forced_logp(
                other, PROMPT_IDS[b], cont
            )
            assert abs(float(out.log_weights_unnormalized[b, i]) - expected) < 1e-3
    assert out.log_weights.exp().max() > 1.0 / N + 1e-3  # really non-uniform


def test_model_proposal_smc_runs(gpt2, tok):
    other = make_model("gpt2", seed=1)
    out = smc_generate(
        gpt2,
        tok,
        PROMPTS,
        proposal=other,
        potential=REWARD,
        num_particles=6,
        max_new_tokens=6,
        seed=0,
        ess_threshold=2.0,
        eos_token_id=[],
    )
    assert out.resampled.any()
    assert out.num_forward_tokens == 2 * (2 * 3 + 12 * 5)
    torch.testing.assert_close(out.log_weights.logsumexp(1), torch.zeros(2, dtype=torch.float64))


# --------------------------------------------------------------------------- forward counting


def test_num_forward_tokens_formula(gpt2, tok):
    B, P, N, T = 2, 3, 5, 6
    out = smc_generate(
        gpt2, tok, PROMPTS, num_particles=N, max_new_tokens=T, seed=0, eos_token_id=[]
    )
    assert out.sequences.shape == (B, N, P + T)  # nothing ends early
    assert out.num_forward_tokens == B * P + B * N * (T - 1)
    early = smc_generate(gpt2, tok, PROMPTS, num_particles=N, max_new_tokens=T, seed=0)
    assert 0 < early.num_forward_tokens <= B * P + B * N * (T - 1)


def test_num_forward_tokens_counts_suffix_likelihood(gpt2, tok):
    B, P, N, T = 2, 3, 3, 4
    pot = SuffixLikelihood(gpt2, tok, "g h")
    pot.forward_tokens = 1000  # tokens from an earlier run are not counted again
    out = smc_generate(
        gpt2,
        tok,
        PROMPTS,
        potential=pot,
        num_particles=N,
        max_new_tokens=T,
        seed=0,
        eos_token_id=[],
    )
    spent = pot.forward_tokens - 1000
    assert spent > 0
    assert out.num_forward_tokens == B * P + B * N * (T - 1) + spent
