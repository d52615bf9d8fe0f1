"""``model.generate(custom_generate=llmsample.smc_decoding)``: the drop-in, checked exactly.

Tiny GPT-2 and Llama models over 9 tokens (conftest). Targets are enumerated: every complete
continuation of length <= T (ended by EOS, by a stop string, or cut at T) with its exact
log p, and, for the proposal checks, the exact log q that ``generate``'s own processors give.
Tolerances are noise floors computed here from the sample sizes (DESIGN.md §6).
"""

import functools
import math
from pathlib import Path

import pytest
import torch
from conftest import EOS, VOCAB, make_model, make_tokenizer
from transformers import (
    GenerationConfig,
    LogitsProcessor,
    LogitsProcessorList,
    NoBadWordsLogitsProcessor,
    RepetitionPenaltyLogitsProcessor,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)
from transformers.generation.streamers import BaseStreamer
from transformers.modeling_outputs import CausalLMOutput

import llmsample
from llmsample.diagnostics.exact import ExactTarget, enumerate_target
from llmsample.hf.prompts import encode_prompts
from llmsample.particles import Particles
from llmsample.potentials import Contains, Reward, TokenMask
from llmsample.proposals import LMProposal

PROMPTS = ["a b", "c d e f"]  # ids [0, 1] and [2, 3, 4, 5]: left padding in every batch
HUB = Path(__file__).resolve().parents[1] / "hub" / "smc"
RUNS = 200  # independent SMC runs per prompt for the mean(Z_hat / Z) checks


def soft(texts):  # a soft reward that also scores prefixes (a valid twist)
    return [1.0 * t.count("c") - 0.7 * t.count("a") for t in texts]


SOFT = Reward(soft, soft)


@pytest.fixture(scope="module")
def tok():
    return make_tokenizer(with_pad=True)


@pytest.fixture(scope="module", params=["gpt2", "llama"])
def model(request):
    return make_model(request.param)


def char_tokenizer():
    """Ids as the toy tokenizer's, one character per token: what StopStringCriteria needs."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate("abcdefgh")} | {"<eos>": EOS}
    t = Tokenizer(models.WordLevel(vocab, unk_token="<eos>"))
    t.pre_tokenizer = pre_tokenizers.Split(Regex("."), "isolated")
    t.decoder = decoders.Fuse()
    kw = dict(eos_token="<eos>", bos_token="<eos>", pad_token="<eos>")
    return PreTrainedTokenizerFast(tokenizer_object=t, **kw)


def batch(tok, prompts):
    return tok(prompts, return_tensors="pt", padding=True, padding_side="left")


def continuation(row):
    row = list(row)
    return tuple(row[: row.index(EOS) + 1] if EOS in row else row)


@torch.no_grad()
def enumerate_complete(model, prompt, T, stop=lambda s: False, procs=()):
    """Every complete continuation with exact log p and log q (q: softmax of ``procs``
    applied to the raw logits, as generate samples)."""
    seqs, log_p, log_q, frontier = [], [], [], [((), 0.0, 0.0)]
    for depth in range(T):
        ids = torch.tensor([prompt + list(s) for s, _, _ in frontier])
        logits = model(input_ids=ids).logits[:, -1].double()
        scores = logits
        for proc in procs:
            scores = proc(ids, scores)
        lp, lq = torch.log_softmax(logits, -1).tolist(), torch.log_softmax(scores, -1).tolist()
        nxt = []
        for (s, a, b), ps, qs in zip(frontier, lp, lq):
            for v in range(VOCAB):
                item = (s + (v,), a + ps[v], b + qs[v])
                done = v == EOS or depth == T - 1 or stop(item[0])
                (seqs if done else nxt).append(item)
        frontier = nxt
    for _, a, b in seqs:
        log_p.append(a)
        log_q.append(b)
    f64 = dict(dtype=torch.float64)
    return [s for s, _, _ in seqs], torch.tensor(log_p, **f64), torch.tensor(log_q, **f64)


def log_phi(potential, tok, prompt, seqs, T):
    toks = torch.full((len(seqs), T), EOS)
    for r, s in enumerate(seqs):
        toks[r, : len(s)] = torch.tensor(s)
    lengths = torch.tensor([len(s) for s in seqs])
    pb = encode_prompts(input_ids=torch.tensor([prompt]), pad_token_id=EOS)
    x = Particles(
        toks,
        lengths,
        torch.zeros(len(seqs), dtype=torch.long),
        pb,
        tok,
        torch.tensor([EOS]),
        T,
        VOCAB,
    )
    return potential.complete(x).double()


def assert_unbiased(log_z, exact_log_z):
    """mean(Z_hat / Z) within 3 standard errors of 1, for each prompt (RUNS runs each)."""
    for b, exact in enumerate(exact_log_z):
        ratio = (log_z[b * RUNS : (b + 1) * RUNS] - exact).exp()
        se = ratio.std() / math.sqrt(RUNS)
        assert se > 0 and abs(ratio.mean() - 1) < 3 * se, (b, ratio.mean(), se)


# (a) one engine: generate(custom_generate=...) and smc_generate give the same tokens
# ("default" is do_sample=False: no warpers, SMC proposes from the LM itself)


@pytest.mark.parametrize("sampling", ["default", "warped"])
def test_same_tokens_as_smc_generate(model, tok, sampling):
    enc = batch(tok, PROMPTS)
    common = dict(potential=SOFT, twist="prefix", num_particles=8, seed=3, ess_threshold=1.5)
    gen_kw, proposal = {}, None
    if sampling == "warped":  # generate's warpers vs llmsample's truncated LMProposal
        gen_kw, proposal = dict(do_sample=True, temperature=0.7, top_k=5), LMProposal(0.7, 5)
    out = model.generate(
        **enc,
        custom_generate=functools.partial(llmsample.smc_decoding, tokenizer=tok),
        max_new_tokens=4,
        return_dict_in_generate=True,
        **gen_kw,
        **common,
    )
    ref = llmsample.smc_generate(model, tok, PROMPTS, max_new_tokens=4, proposal=proposal, **common)
    P = enc.input_ids.shape[1]
    assert torch.equal(out.particles[..., P:], ref.continuations)
    assert torch.equal(out.particles[..., :P], enc.input_ids[:, None].expand(2, 8, P))
    assert torch.allclose(out.log_weights, ref.log_weights, atol=1e-5)
    assert torch.allclose(out.log_z, ref.log_z, atol=1e-5)
    assert ref.resampled.any()
    # the returned sequence is the drawn particle, trimmed like generate's output
    drawn = out.particles[torch.arange(2), out.draw_indices[:, 0]]
    assert torch.equal(out.sequences, drawn[:, : out.sequences.shape[1]])
    assert (drawn[:, out.sequences.shape[1] :] == EOS).all()  # only padding was cut


def test_importance_decoding_is_importance_generate(tok):
    model, enc = make_model("gpt2"), batch(tok, PROMPTS)
    out = model.generate(
        **enc,
        custom_generate=functools.partial(llmsample.importance_decoding, tokenizer=tok),
        potential=SOFT,
        num_particles=8,
        max_new_tokens=4,
        seed=5,
        return_dict_in_generate=True,
    )
    ref = llmsample.importance_generate(
        model, tok, PROMPTS, potential=SOFT, num_particles=8, max_new_tokens=4, seed=5
    )
    assert torch.equal(out.particles[..., enc.input_ids.shape[1] :], ref.continuations)
    assert torch.allclose(out.log_z, ref.log_z) and not out.sampling.resampled.any()


# (b) potential=None, no resampling: the particles are generate(do_sample=True)'s draws


def test_proposal_is_generates_sampling_distribution(tok):
    """Particles ~ q exactly, q = what generate(do_sample=True, temperature, top_k, top_p)
    samples; their weights then give p restricted to q's support (the target).

    Three checks against enumerated distributions, each with the TV noise floor of as many
    exact draws (99th percentile): plain generate's draws match q (so the enumerated q is
    generate's), the SMC particles match q, and the weighted particles match the target.
    Negative control: the unweighted particles miss the target by more than its floor."""
    model, T, M = make_model("gpt2"), 3, 4000
    settings = dict(do_sample=True, temperature=0.8, top_k=6, top_p=0.9)
    procs = [TemperatureLogitsWarper(0.8), TopKLogitsWarper(6), TopPLogitsWarper(0.9)]
    seqs, lp, lq = enumerate_complete(model, [0, 1], T, procs=procs)
    zero = torch.zeros_like(lp)
    q = ExactTarget(seqs, lq, zero, {})
    support = torch.where(torch.isfinite(lq), zero, -math.inf)
    target = ExactTarget(seqs, lp, support, {})  # p restricted to what q can produce
    enc = batch(tok, ["a b"])
    torch.manual_seed(0)
    plain = model.generate(
        **enc, **settings, max_new_tokens=T, num_return_sequences=M, pad_token_id=EOS
    )
    floor = q.tv_noise_floor(M)
    assert q.tv([continuation(r) for r in plain[:, 2:].tolist()]) < floor
    out = model.generate(
        **enc,
        **settings,
        custom_generate=llmsample.smc_decoding,
        potential=None,
        ess_threshold=0.0,
        num_particles=M,
        max_new_tokens=T,
        seed=1,
        return_dict_in_generate=True,
    )
    assert not out.sampling.resampled.any()
    particles = [continuation(r) for r in out.particles[0, :, 2:].tolist()]
    assert q.tv(particles) < floor
    m = int(llmsample.smc.resampling.ess(out.log_weights[0]))
    assert target.tv(particles, out.log_weights[0]) < target.tv_noise_floor(m)
    assert target.tv(particles) > target.tv_noise_floor(M)  # the weights matter


# (c) with a potential and user logits processors: mean(Z_hat / Z) = 1 within 3 SE


@pytest.mark.filterwarnings("ignore:the potential rejected every particle")
def test_z_hat_unbiased_with_logits_processors(model, tok):
    """Bad words (ban "d"), a repetition penalty, min_new_tokens and temperature shape the
    proposal; sigma ∝ p · 1[contains c, no d] lies inside q's support, so Z is exact."""
    T, potential = 4, Contains("c") * TokenMask(banned=[3])
    exact = [enumerate_target(model, tok, p, potential, T, EOS).log_z for p in PROMPTS]
    procs = LogitsProcessorList(
        [NoBadWordsLogitsProcessor([[3]], eos_token_id=EOS), RepetitionPenaltyLogitsProcessor(1.5)]
    )
    enc = batch(tok, [p for p in PROMPTS for _ in range(RUNS)])
    out = model.generate(
        **enc,
        custom_generate=functools.partial(llmsample.smc_decoding, tokenizer=tok),
        logits_processor=procs,
        do_sample=True,
        temperature=1.3,
        min_new_tokens=1,
        potential=potential,
        num_particles=8,
        max_new_tokens=T,
        ess_threshold=1.5,
        seed=3,
        return_dict_in_generate=True,
    )
    assert out.sampling.resampled.any()
    P = enc.input_ids.shape[1]
    assert not (out.particles[..., P:] == 3).any()  # the processor shaped the proposal
    assert_unbiased(out.log_z, exact)


def first_stop(c):
    """The end of the first stop string ("b" or "cd") in continuation c, or None."""
    for i, v in enumerate(c):
        if v == EOS:
            return None
        if v == 1 or (i and c[i - 1 : i + 1] == [2, 3]):
            return i + 1
    return None


@pytest.mark.filterwarnings("ignore:the potential rejected every particle")
def test_z_hat_unbiased_with_stop_strings(model):
    """stop_strings=["b", "cd"] ("cd" spans two tokens) end a particle where they fire: the
    target lives on continuations ended by EOS, by a stop string, or cut at T; enumerated
    here. Stop strings end 13-68% of p's mass early, so a wrong weight at a stop (e.g. the
    forced EOS's p left in) moves mean(Z_hat / Z) by > 4 SE."""
    tok, T = char_tokenizer(), 4
    pot = Reward(lambda ts: [t.count("c") - 0.7 * t.count("a") for t in ts])
    exact = []
    for prompt in ([0, 1], [2, 3, 4, 5]):
        seqs, lp, _ = enumerate_complete(model, prompt, T, stop=lambda s: first_stop(list(s)))
        exact.append(float(torch.logsumexp(lp + log_phi(pot, tok, prompt, seqs, T), 0)))
    enc = batch(tok, [p for p in ("ab", "cdef") for _ in range(RUNS)])
    out = model.generate(
        **enc,
        custom_generate=functools.partial(llmsample.smc_decoding, tokenizer=tok),
        stop_strings=["b", "cd"],
        do_sample=True,
        repetition_penalty=1.5,
        potential=pot,
        num_particles=8,
        max_new_tokens=T,
        ess_threshold=1.5,
        seed=4,
        return_dict_in_generate=True,
    )
    cont = out.particles[..., enc.input_ids.shape[1] :].flatten(0, 1).tolist()
    fired = [(c, first_stop(c)) for c in cont if (first_stop(c) or T) < len(c)]
    assert fired  # stop strings ended particles before T
    for c, end in fired:  # nothing after a stop but padding: the forced EOS is not output
        assert all(v == EOS for v in c[end:])
    assert_unbiased(out.log_z, exact)


# (d) the folder form, from the local path


def test_folder_form_runs_offline(tok):
    model, enc = make_model("llama"), batch(tok, PROMPTS)
    kw = dict(
        potential=SOFT,
        num_particles=8,
        max_new_tokens=4,
        seed=3,
        do_sample=True,
        num_return_sequences=3,
        return_dict_in_generate=True,
    )
    out = model.generate(
        **enc, custom_generate=str(HUB), trust_remote_code=True, tokenizer=tok, **kw
    )
    ref = model.generate(
        **enc, custom_generate=functools.partial(llmsample.smc_decoding, tokenizer=tok), **kw
    )
    assert out.sequences.shape[0] == 6 and torch.equal(out.sequences, ref.sequences)
    assert torch.equal(out.log_z, ref.log_z)
    imp = model.generate(
        **enc,
        custom_generate=str(HUB),
        trust_remote_code=True,
        tokenizer=tok,
        decoding="importance",
        **kw,
    )
    assert not imp.sampling.resampled.any()


class Collect(BaseStreamer):
    def __init__(self):
        self.puts, self.ended = [], False

    def put(self, value):
        self.puts.append(value.clone())

    def end(self):
        self.ended = True


@pytest.mark.parametrize("form", ["callable", "folder"])
def test_streamer_gets_the_final_draws(tok, form):
    model, enc, streamer = make_model("gpt2"), batch(tok, ["a b"]), Collect()
    how = (
        dict(custom_generate=str(HUB), trust_remote_code=True, tokenizer=tok)
        if form == "folder"
        else dict(custom_generate=llmsample.smc_decoding)
    )
    out = model.generate(**enc, **how, num_particles=4, max_new_tokens=3, streamer=streamer)
    assert streamer.ended and len(streamer.puts) == 2
    assert torch.equal(streamer.puts[0], enc.input_ids)
    assert torch.equal(streamer.puts[1], out[:, 2:])


class BanA(LogitsProcessor):
    def __call__(self, input_ids, scores):
        return scores.index_fill(1, torch.tensor([0]), -math.inf)


class StatelessBanA(BanA):
    llmsample_stateless = True


def test_marked_processor_is_allowed(tok):
    model = make_model("gpt2")
    out = model.generate(
        **batch(tok, PROMPTS),
        custom_generate=llmsample.smc_decoding,
        num_particles=16,
        logits_processor=LogitsProcessorList([StatelessBanA()]),
        max_new_tokens=4,
        return_dict_in_generate=True,
    )
    assert not (out.particles[..., -4:] == 0).any()


def test_logits_hook_is_normalized_then_tempered():
    """LMProposal's hook: log q = truncate(log_softmax(hook(logp))); a row the hook leaves
    with no finite score keeps logp (still exact: the engine weighs by the log q returned)."""
    logp = torch.log_softmax(torch.randn(3, VOCAB, generator=torch.Generator().manual_seed(0)), -1)

    def hook(lp, x):
        out = lp.index_fill(1, torch.tensor([0]), -math.inf) + 2.0  # a shift: no effect
        out[2] = -math.inf
        return out

    logq = LMProposal(temperature=0.5, logits_hook=hook).log_probs(logp, None, None)
    masked = logp.index_fill(1, torch.tensor([0]), -math.inf)
    expected = torch.log_softmax(torch.log_softmax(masked, -1) / 0.5, -1)
    assert torch.allclose(logq[:2], expected[:2], atol=1e-6)
    assert torch.allclose(logq[2], torch.log_softmax(logp[2] / 0.5, -1), atol=1e-6)


# (e) bad inputs: a clear error naming the argument


class NoCache(torch.nn.Module):
    def __init__(self, m):
        super().__init__()
        self.m, self.config = m, m.config

    def get_output_embeddings(self):
        return self.m.get_output_embeddings()

    def forward(self, **kw):
        return CausalLMOutput(logits=self.m(**kw).logits)


BAD = {
    "num_beams": dict(num_beams=2),
    "length_penalty": dict(length_penalty=0.5),
    "early_stopping": dict(early_stopping=True),
    "BanA": dict(logits_processor=LogitsProcessorList([BanA()])),
    "guidance_scale": dict(guidance_scale=1.5),
    "num_return_sequences": dict(
        do_sample=True, num_return_sequences=4, num_particles=2, select="best"
    ),
    "assistant_model": dict(assistant_model="MODEL"),
    "prompt_lookup_num_tokens": dict(prompt_lookup_num_tokens=2),
    "use_cache": dict(use_cache=False),
    "max_time": dict(max_time=10.0),
    "output_scores": dict(output_scores=True, return_dict_in_generate=True),
    "stop_strings": dict(stop_strings=["c"]),
    "synced_gpus": dict(synced_gpus=True),
}


@pytest.mark.parametrize("name", list(BAD))
def test_bad_input_names_the_argument(tok, name):
    model = make_model("gpt2")
    kw = dict(BAD[name])
    if kw.get("assistant_model") == "MODEL":
        kw["assistant_model"] = make_model("gpt2", seed=1)
    with pytest.raises(ValueError, match=name):
        model.generate(
            **batch(tok, PROMPTS), custom_generate=llmsample.smc_decoding, max_new_tokens=3, **kw
        )


def test_bad_input_folder_form(tok):
    model = make_model("gpt2")
    with pytest.raises(ValueError, match="assistant_model"):
        model.generate(
            **batch(tok, PROMPTS),
            custom_generate=str(HUB),
            trust_remote_code=True,
            assistant_model=make_model("gpt2", seed=1),
            max_new_tokens=3,
        )


def test_text_potential_without_tokenizer_explains_the_fix(tok):
    with pytest.raises(ValueError, match="functools.partial"):
        make_model("gpt2").generate(
            **batch(tok, PROMPTS),
            custom_generate=llmsample.smc_decoding,
            potential=SOFT,
            max_new_tokens=3,
        )


def test_model_without_cache_is_rejected(tok):
    enc = batch(tok, PROMPTS)
    with pytest.raises(TypeError, match="NoCache returned no reorderable KV cache"):
        llmsample.smc_decoding(
            NoCache(make_model("gpt2")),
            enc.input_ids,
            generation_config=GenerationConfig(max_new_tokens=2),
            attention_mask=enc.attention_mask,
        )
