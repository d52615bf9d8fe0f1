"""Block SMC (llmsample.smc.blocks) is exact: on the HF block backend, for any K.

The backend draws K tokens per row in one call and returns their summed log p and log q;
the engine scores and resamples only at block ends. Checked against brute-force
enumeration of the toy targets: mean(Z_hat / Z) within 3 SE of 1, and the weighted
particles within the TV noise floor of exact draws (with a negative control).
"""

import math

import pytest
import torch
from conftest import EOS, continuations, make_model, make_tokenizer, soft_reward

from llmsample.diagnostics.exact import enumerate_target
from llmsample.hf.blocks import HFBlocks
from llmsample.hf.prompts import encode_prompts
from llmsample.smc.blocks import Block, run_smc_blocks
from llmsample.smc.config import SMCConfig
from llmsample.smc.resampling import ess
from llmsample.twists import PotentialTwist

PROMPTS = ["a b", "c d e f"]
T = 4
SOFT = soft_reward()  # log phi = #c - 0.7 #a, scores prefixes too: a valid, non-optimal twist


@pytest.fixture(scope="module", params=["gpt2", "llama"])
def setup(request):
    model, tok = make_model(request.param), make_tokenizer()
    targets = [enumerate_target(model, tok, p, SOFT, T, EOS) for p in PROMPTS]
    return model, tok, targets


def run(model, tok, prompts, cfg, **sampling):
    backend = HFBlocks(model, pad_token_id=EOS, eos_token_ids=[EOS], **sampling)
    batch = encode_prompts(tok, prompts)
    out = run_smc_blocks(
        backend, tok, batch, SOFT, cfg, twist=PotentialTwist(SOFT), eos_token_ids=[EOS]
    )
    return out, backend


@pytest.mark.parametrize(
    "k, sampling",
    [(1, {}), (2, {}), (3, dict(temperature=1.5)), (2, dict(temperature=0.8))],
    ids=["K=1", "K=2", "K=3-T1.5", "K=2-T0.8"],
)
def test_block_z_hat_unbiased(setup, k, sampling):
    model, tok, targets = setup
    runs = 200
    cfg = SMCConfig(num_particles=8, max_new_tokens=T, ess_threshold=0.9, resample_every=k, seed=1)
    out, backend = run(model, tok, [p for p in PROMPTS for _ in range(runs)], cfg, **sampling)
    assert out.resampled.any(), "the test must exercise resampling"
    assert out.ess.shape[1] == math.ceil(T / k)  # one entry per block
    assert out.num_forward_tokens == backend.computed_tokens > 0
    for b, target in enumerate(targets):
        ratio = (out.log_z[b * runs : (b + 1) * runs] - target.log_z).exp()
        se = ratio.std() / math.sqrt(runs)
        assert abs(ratio.mean() - 1) < 3 * se, (PROMPTS[b], k, ratio.mean(), se)


def test_block_particles_match_posterior_within_noise_floor(setup):
    """TV(weighted particles, sigma) below the 99th percentile of exact draws' TV, at the
    particles' ESS; the unweighted particles (a negative control) must exceed it."""
    model, tok, _ = setup
    t3 = 3
    cfg = SMCConfig(num_particles=4096, max_new_tokens=t3, resample_every=2, seed=4)
    out, _ = run(model, tok, PROMPTS, cfg)
    for b, p in enumerate(PROMPTS):
        target = enumerate_target(model, tok, p, SOFT, t3, EOS)
        samples = continuations(out, b)
        floor = target.tv_noise_floor(int(ess(out.log_weights[b])), q=0.99)
        assert target.tv(samples, out.log_weights[b]) < floor
        assert target.tv(samples) > floor


class ShortBackend:
    """Returns one token fewer than asked, without EOS: a broken backend."""

    vocab_size = 9
    computed_tokens = 0

    def extend(self, sequences, max_tokens, seeds):
        return [Block([0] * (max_tokens - 1), 0.0, 0.0) for _ in sequences]


def test_block_engine_refuses_a_short_block():
    tok = make_tokenizer()
    batch = encode_prompts(tok, ["a b"])
    cfg = SMCConfig(num_particles=2, max_new_tokens=4, resample_every=2)
    with pytest.raises(RuntimeError, match="returned 1 tokens for a request of 2"):
        run_smc_blocks(ShortBackend(), tok, batch, None, cfg, eos_token_ids=[EOS])


def test_hf_blocks_log_q_is_the_drawn_distribution():
    """With temperature 2 the returned log q is the tempered log-prob of the drawn token,
    and log p the model's: checked against a direct forward."""
    model, tok = make_model("gpt2"), make_tokenizer()
    backend = HFBlocks(model, pad_token_id=EOS, eos_token_ids=[], temperature=2.0)
    seq = encode_prompts(tok, ["a b"]).input_ids[0].tolist()
    (blk,) = backend.extend([seq], 1, [0])
    with torch.no_grad():
        logits = model(torch.tensor([seq])).logits[0, -1].double()
    x = blk.tokens[0]
    assert blk.log_p == pytest.approx(float(logits.log_softmax(-1)[x]), abs=1e-5)
    assert blk.log_q == pytest.approx(float((logits / 2).log_softmax(-1)[x]), abs=1e-5)
