"""The cached incremental path equals full recomputation (fp32, atol 1e-5).

Checked for GPT-2, Llama, Qwen2 and Mistral configs, with left-padded prompts of
different lengths, after expansion to particles and after a resampling reorder
with duplicated rows.
"""

import pytest
import torch
from conftest import make_model, make_tokenizer

from llmsample.lm import LMSession, score_continuations
from llmsample.prompts import encode_prompts

ATOL = 1e-5


def full_logp(model, rows: list[list[int]]) -> torch.Tensor:
    """Next-token log-probs of each unpadded sequence, one at a time (no cache)."""
    out = []
    with torch.no_grad():
        for r in rows:
            logits = model(input_ids=torch.tensor([r])).logits[0, -1]
            out.append(torch.log_softmax(logits.float(), -1))
    return torch.stack(out)


@pytest.mark.parametrize("arch", ["gpt2", "llama", "qwen2", "mistral"])
def test_incremental_matches_recomputation_with_padding_and_reorder(arch):
    model, tok = make_model(arch), make_tokenizer()
    prompts = encode_prompts(tok, ["a", "b c d e f", "g h"])
    assert prompts.attention_mask[0].tolist() == [0, 0, 0, 0, 1]  # left padded
    n = 3
    session = LMSession(model, prompts, num_particles=n)
    history = [p for p in [[0], [1, 2, 3, 4, 5], [6, 7]] for _ in range(n)]
    gen = torch.Generator().manual_seed(0)
    for step in range(5):
        assert torch.allclose(session.logp, full_logp(model, history), atol=ATOL), step
        if step == 2:  # resampling: duplicate some rows, drop others
            index = torch.tensor([2, 2, 0, 3, 5, 5, 8, 6, 6])
            session.reorder(index)
            history = [list(history[i]) for i in index.tolist()]
            assert torch.allclose(session.logp, full_logp(model, history), atol=ATOL)
        tokens = torch.randint(0, 9, (len(history),), generator=gen)
        session.step(tokens)
        history = [h + [t] for h, t in zip(history, tokens.tolist())]
    assert session.forward_tokens == 3 * 5 + 5 * 9  # prefill B*P, then R per step


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_teacher_forced_scores_match_cached_steps(arch):
    model, tok = make_model(arch), make_tokenizer()
    prompts = encode_prompts(tok, ["a b c", "d"])
    cont = torch.tensor([[1, 2, 3, 4], [5, 6, 0, 0]])
    cmask = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0]])
    scored = score_continuations(model, prompts.input_ids, prompts.attention_mask, cont, cmask)
    session = LMSession(model, prompts, num_particles=1)
    stepwise = []
    for t in range(4):
        stepwise.append(session.logp.gather(1, cont[:, t : t + 1])[:, 0])
        session.step(cont[:, t])
    stepwise = torch.stack(stepwise, 1) * cmask
    assert torch.allclose(scored, stepwise, atol=ATOL)
    assert (scored[1, 2:] == 0).all()


def test_encode_prompts_left_pads_right_padded_input_ids():
    ids = torch.tensor([[3, 4, 5], [6, 0, 0]])
    mask = torch.tensor([[1, 1, 1], [1, 0, 0]])
    batch = encode_prompts(input_ids=ids, attention_mask=mask, pad_token_id=8)
    assert batch.input_ids.tolist() == [[3, 4, 5], [8, 8, 6]]
    assert batch.attention_mask.tolist() == [[1, 1, 1], [0, 0, 1]]


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_cache_keyword_seen_through_peft_and_base_view(arch):
    """The KV cache goes under the keyword the model's forward names (``cache`` on
    transformers 5.24+), also through peft and gfn.BaseView, which forward **kwargs."""
    import inspect

    from llmsample.gfn import BaseView, GFNConfig, add_lora
    from llmsample.lm import cache_kwarg

    model = make_model(arch)
    own = "cache" if "cache" in inspect.signature(type(model).forward).parameters else None
    expected = own or "past_key_values"
    policy = add_lora(make_model(arch), GFNConfig())
    assert cache_kwarg(model) == cache_kwarg(policy) == cache_kwarg(BaseView(policy)) == expected
