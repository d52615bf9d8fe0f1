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
from llmsample.smc.blocks import Block, block_ends, run_smc_blocks
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
    [
        (1, {}),
        (2, {}),
        (3, dict(temperature=1.5)),
        (2, dict(temperature=0.8)),
        (3, dict(kv_block_size=5)),
    ],
    ids=["K=1", "K=2", "K=3-T1.5", "K=2-T0.8", "K=3-aligned"],
)
def test_block_z_hat_unbiased(setup, k, sampling):
    """Aligned blocks (kv_block_size=5): the two prompts end their blocks at different t,
    so rounds mix rows of different lengths; the estimate must stay unbiased."""
    model, tok, targets = setup
    runs = 200
    cfg = SMCConfig(num_particles=8, max_new_tokens=T, ess_threshold=0.9, resample_every=k, seed=1)
    out, backend = run(model, tok, [p for p in PROMPTS for _ in range(runs)], cfg, **sampling)
    assert out.resampled.any(), "the test must exercise resampling"
    kv = sampling.get("kv_block_size")
    ends = {tuple(block_ends(len(tok(p).input_ids), T, k, kv)) for p in PROMPTS}
    assert len(ends) == (2 if kv else 1), ends  # aligned: the prompts' block ends differ
    assert out.ess.shape[1] == max(map(len, ends))  # one entry per round
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
    kv_block_size = None

    def extend(self, sequences, max_tokens, seeds):
        return [Block([0] * (k - 1), 0.0, 0.0) for k in max_tokens]


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
    (blk,) = backend.extend([seq], [1], [0])
    with torch.no_grad():
        logits = model(torch.tensor([seq])).logits[0, -1].double()
    x = blk.tokens[0]
    assert blk.log_p == pytest.approx(float(logits.log_softmax(-1)[x]), abs=1e-5)
    assert blk.log_q == pytest.approx(float((logits / 2).log_softmax(-1)[x]), abs=1e-5)


@pytest.mark.parametrize("P", range(1, 70))
@pytest.mark.parametrize("K, kv", [(16, 32), (32, 32), (21, 32), (8, 16), (64, 32), (5, 3)])
def test_block_ends_fall_where_the_cache_serves_the_prefix(P, K, kv):
    """Without a KV block: every K tokens and T. With one: the first block holds K/2 to
    3K/2 tokens, later ones K (the last: what is left), and the aligned ends (prompt + t =
    1 mod kv) are the first t >= K/2 where that holds and every lcm(K, kv) tokens after
    it: all of them when K is a multiple of kv."""
    T = 96
    assert block_ends(P, T, K) == [*range(K, T, K), T]
    ends = block_ends(P, T, K, kv)
    steps = [b - a for a, b in zip([0, *ends], ends)]
    assert ends[-1] == T and all(s == K for s in steps[1:-1]) and 1 <= steps[-1] <= 3 * K / 2
    if len(ends) > 1:
        assert K / 2 <= steps[0] < 3 * K / 2
    first_aligned = next(t for t in range(math.ceil(K / 2), 10**4) if (P + t) % kv == 1)
    aligned = [e for e in ends[:-1] if (P + e) % kv == 1]
    period = math.lcm(K, kv)
    inner = ends[:-1]
    assert aligned == [e for e in inner if e >= first_aligned and (e - first_aligned) % period == 0]
    assert first_aligned in ends or first_aligned >= T
    if K % kv == 0:
        assert aligned == inner


def test_aligned_blocks_resize_the_first_block_only():
    """SmolLM2's 44-token chat prompt in 32-token KV blocks (44 + 21 = 65): K = 32 gives
    21, then 32s; K = 16 gives 21 (not 5: a short first block would add a round)."""
    assert block_ends(44, 96, 32, 32) == [21, 53, 85, 96]
    assert block_ends(44, 96, 16, 32) == [21, 37, 53, 69, 85, 96]
