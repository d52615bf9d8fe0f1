"""Chat prompts: the tokenizer's chat template, left-padded batches, assistant-only text."""

import pytest
import torch
from conftest import CHAT_WORDS, make_chat_tokenizer

import llmsample
from llmsample.diagnostics.exact import toy_model, toy_tokenizer
from llmsample.hf.prompts import chat_prompt_texts, encode_prompts
from llmsample.potentials import Potential

WORDS = ["a", "b", "c", "d", *CHAT_WORDS]
EOS = len(WORDS)  # "<eos>": EOS, BOS and the end-of-turn token


@pytest.fixture(scope="module")
def chat_tok():
    return make_chat_tokenizer(WORDS)


@pytest.fixture(scope="module", params=["llama", "gpt2"])
def chat_model(request):
    return toy_model(request.param, vocab_size=len(WORDS) + 1)


def _ids(tok, text):
    return tok(text, add_special_tokens=False)["input_ids"]


def test_chat_prompts_are_templated_and_left_padded(chat_tok):
    batch = encode_prompts(chat_tok, ["a b c d a", "b"], chat=True)
    long = _ids(chat_tok, "<turn> user a b c d a <eos> <turn> assistant")
    short = _ids(chat_tok, "<turn> user b <eos> <turn> assistant")
    assert batch.input_ids.shape == (2, len(long))
    assert batch.input_ids[0].tolist() == long
    pad = len(long) - len(short)
    assert batch.attention_mask[1].tolist() == [0] * pad + [1] * len(short)
    assert batch.input_ids[1, pad:].tolist() == short


def test_messages_equal_chat_true_and_keep_every_turn(chat_tok):
    convs = [
        [{"role": "user", "content": "a b"}],
        [
            {"role": "system", "content": "c"},
            {"role": "user", "content": "d"},
        ],
    ]
    batch = encode_prompts(chat_tok, messages=convs)
    assert batch.input_ids[0, batch.attention_mask[0].bool()].tolist() == (
        encode_prompts(chat_tok, ["a b"], chat=True).input_ids[0].tolist()
    )
    second = _ids(chat_tok, "<turn> system c <eos> <turn> user d <eos> <turn> assistant")
    assert batch.input_ids[1].tolist() == second
    assert chat_prompt_texts(chat_tok, convs[:1])[0].endswith("<turn> assistant ")


class _Recorder(Potential):
    """phi = 1; remembers every text it was shown."""

    def __init__(self):
        self.seen = []

    def complete(self, x):
        self.seen += x.texts()
        return torch.zeros(x.num_rows, dtype=torch.float64, device=x.device)


def test_chat_generation_matches_templated_ids_and_shows_only_the_reply(chat_model, chat_tok):
    prompts = ["a b c d a", "b"]
    rec = _Recorder()
    kw = dict(num_particles=6, max_new_tokens=4, seed=3, potential=rec)
    out = llmsample.smc_generate(chat_model, chat_tok, prompts, chat=True, **kw)
    batch = encode_prompts(chat_tok, prompts, chat=True)
    ref = llmsample.smc_generate(
        chat_model,
        chat_tok,
        input_ids=batch.input_ids,
        attention_mask=batch.attention_mask,
        **kw,
    )
    assert torch.equal(out.sequences, ref.sequences)
    assert out.texts == ref.texts
    # the potential saw only replies: at most 4 tokens, never the 6+ token prompt
    assert rec.seen and max(len(t.split()) for t in rec.seen) <= 4
    for b in range(2):
        for i, text in enumerate(out.texts[b]):
            toks = [t for t in out.continuations[b, i].tolist() if t != EOS]
            assert text == chat_tok.decode(toks)
    # the continuation ends at the end-of-turn token
    cont = out.continuations  # [B, N, T]
    for row in cont.reshape(-1, cont.shape[-1]).tolist():
        if EOS in row:
            assert all(t == EOS for t in row[row.index(EOS) :])


def test_ancestral_and_beam_take_chat_prompts(chat_model, chat_tok):
    a = llmsample.ancestral_generate(
        chat_model, chat_tok, ["a"], chat=True, num_samples=3, max_new_tokens=3, seed=0
    )
    b = llmsample.beam_generate(
        chat_model, chat_tok, ["a"], chat=True, num_beams=2, max_new_tokens=3
    )
    templated = encode_prompts(chat_tok, ["a"], chat=True).input_ids[0].tolist()
    for out in (a, b):
        assert out.sequences[0, 0, : out.prompt_length].tolist() == templated


def test_chat_errors_name_the_problem(chat_model, chat_tok):
    plain = toy_tokenizer(with_pad=True, words=WORDS)
    with pytest.raises(ValueError, match="no chat template"):
        encode_prompts(plain, ["a"], chat=True)
    with pytest.raises(ValueError, match="list of conversations"):
        encode_prompts(chat_tok, messages={"role": "user", "content": "a"})
    with pytest.raises(ValueError, match=r"messages\[1\]"):
        encode_prompts(chat_tok, messages=[[{"role": "user", "content": "a"}], ["a"]])
    with pytest.raises(ValueError, match="messages="):
        encode_prompts(chat_tok, ["a"], messages=[[{"role": "user", "content": "a"}]])
    with pytest.raises(ValueError, match="already templated"):
        encode_prompts(chat_tok, input_ids=torch.tensor([[1, 2]]), chat=True)
