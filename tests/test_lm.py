"""The cached incremental path equals full recomputation (fp32, atol 1e-5).

Checked for GPT-2, Llama, Qwen2 and Mistral configs, with left-padded prompts of
different lengths, after expansion to particles and after a resampling reorder
with duplicated rows.
"""

import pytest
import torch
from conftest import make_model, make_tokenizer

from llmsample.hf.prompts import encode_prompts
from llmsample.hf.session import LMSession, position_ids, teacher_force

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
    ctx = prompts.input_ids, prompts.attention_mask
    scored = teacher_force(model, *ctx, cont, cmask).token_logp
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
    from llmsample.hf.session import cache_kwarg

    model = make_model(arch)
    own = "cache" if "cache" in inspect.signature(type(model).forward).parameters else None
    expected = own or "past_key_values"
    policy = add_lora(make_model(arch), GFNConfig())
    assert cache_kwarg(model) == cache_kwarg(policy) == cache_kwarg(BaseView(policy)) == expected


def _full_teacher_force(model, prompts, cont, cmask, stop_ids):
    """The reference: full [R, T+1, V] logits, log-softmax, gather (no chunking)."""
    ids = torch.cat([prompts.input_ids, cont], 1)
    mask = torch.cat([prompts.attention_mask, cmask], 1)
    P, T = prompts.input_ids.shape[1], cont.shape[1]
    logits = model(input_ids=ids, attention_mask=mask, position_ids=position_ids(mask)).logits
    logp = torch.log_softmax(logits[:, P - 1 : P + T].float(), -1)  # [R, T+1, V]
    tok = logp[:, :T].gather(-1, cont[..., None])[..., 0] * cmask
    stop = logp[..., stop_ids].logsumexp(-1)
    return tok, stop


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
@pytest.mark.parametrize("chunk_bytes", [1, 9 * 4 * 6 * 2, 2**30])  # 1 step, 2 steps, all
def test_chunked_teacher_forcing_equals_full_logits_with_gradients(arch, chunk_bytes):
    """The memory-bounded head (time chunks, recomputed in backward) gives the same token
    and stop log-probs as full logits, and the same gradients, to 1e-5."""
    model, tok = make_model(arch), make_tokenizer()
    prompts = encode_prompts(tok, ["a b c", "d", "e f"])
    cont = torch.tensor([[1, 2, 3, 4, 5], [5, 6, 0, 0, 0], [7, 1, 2, 0, 0]])
    cmask = (torch.arange(5)[None] < torch.tensor([[5], [2], [3]])).long()
    stop_ids = [8, 3]
    params = [p for p in model.parameters() if p.requires_grad]

    def grads(tok_logp, stop_logp):
        loss = (tok_logp.sum(1) * torch.tensor([1.0, -2.0, 0.5])).sum() + stop_logp[:, 1].sum()
        return torch.autograd.grad(loss, params, allow_unused=True)

    got = teacher_force(
        model, prompts.input_ids, prompts.attention_mask, cont, cmask,
        grad=True, stop_ids=stop_ids, chunk_bytes=chunk_bytes,
    )  # fmt: skip
    want = _full_teacher_force(model, prompts, cont, cmask, stop_ids)
    assert torch.allclose(got.token_logp, want[0], atol=ATOL)
    assert torch.allclose(got.stop_logp, want[1], atol=ATOL)
    for g, w in zip(grads(got.token_logp, got.stop_logp), grads(*want)):
        assert (g is None and w is None) or torch.allclose(g, w, atol=ATOL)


def test_teacher_forcing_falls_back_when_the_model_rescales_its_logits():
    """A model whose logits are not head(last hidden state) (here: doubled by a hook, as
    logit scaling or soft-capping would) is scored on its own logits."""
    model, tok = make_model("llama"), make_tokenizer()

    def double(module, args, out):
        out.logits = 2 * out.logits
        return out

    model.register_forward_hook(double)
    prompts = encode_prompts(tok, ["a b", "c"])
    cont, cmask = torch.tensor([[1, 2, 3], [4, 5, 0]]), torch.tensor([[1, 1, 1], [1, 1, 0]])
    got = teacher_force(model, prompts.input_ids, prompts.attention_mask, cont, cmask, stop_ids=[8])
    with torch.no_grad():
        want = _full_teacher_force(model, prompts, cont, cmask, [8])
    assert torch.allclose(got.token_logp, want[0], atol=ATOL)
    assert torch.allclose(got.stop_logp, want[1], atol=ATOL)
