"""Toy causal LMs over a 9-word vocabulary, built from configs: small enough to enumerate.

    tok = toy_tokenizer()               # "a".."h" are ids 0..7, "<eos>" is 8 (EOS and BOS)
    model = toy_model("llama", seed=0)  # gpt2, llama, qwen2 or mistral; nothing downloaded
    clf = toy_classifier()              # a GPT-2 sequence classifier, labels "neg"/"pos"

The tests, the ``exact`` eval task and :mod:`llmsample.diagnostics.exact` check samplers on
them against brute-force posteriors.
"""

from __future__ import annotations

import torch

__all__ = ["TOY_WORDS", "TOY_EOS", "toy_tokenizer", "toy_model", "toy_classifier"]

TOY_WORDS = list("abcdefgh")
TOY_EOS = 8  # id of "<eos>" (also BOS) in the toy vocabulary of 9 tokens


def toy_tokenizer(with_pad: bool = False, words: list[str] | None = None):
    """A word-level tokenizer: by default "a".."h" are ids 0..7 and "<eos>" is 8 (EOS and
    BOS); ``words`` replaces the word list (EOS is then id ``len(words)``)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = TOY_WORDS if words is None else list(words)
    vocab = {w: i for i, w in enumerate(words)} | {"<eos>": len(words)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<eos>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    kwargs = dict(tokenizer_object=tok, eos_token="<eos>", bos_token="<eos>")
    if with_pad:
        kwargs["pad_token"] = "<eos>"
    return PreTrainedTokenizerFast(**kwargs)


def toy_model(arch: str = "gpt2", seed: int = 0, scale: float = 4.0, vocab_size: int = 9):
    """A tiny random causal LM over the toy vocabulary, built from a config (no download).

    ``arch`` is gpt2, llama, qwen2 or mistral; ``scale`` multiplies the output head so
    next-token distributions are far from uniform. Small enough to enumerate for T <= 5.
    ``vocab_size`` (EOS = BOS = the last id) pairs with ``toy_tokenizer(words=...)``.
    """
    from transformers import (
        AutoModelForCausalLM,
        GPT2Config,
        LlamaConfig,
        MistralConfig,
        Qwen2Config,
    )

    eos = vocab_size - 1
    common = dict(vocab_size=vocab_size, bos_token_id=eos, eos_token_id=eos)
    if arch == "gpt2":
        config = GPT2Config(n_embd=32, n_layer=2, n_head=2, n_positions=64, **common)
    else:
        families = {"llama": LlamaConfig, "qwen2": Qwen2Config, "mistral": MistralConfig}
        if arch not in families:
            raise ValueError(f"toy arch must be gpt2 or one of {sorted(families)}, got {arch!r}")
        config = families[arch](
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=64,
            **common,
        )
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config)
    with torch.no_grad():
        model.get_output_embeddings().weight.mul_(scale)
    return model.eval()


def toy_classifier(seed: int = 0, scale: float = 20.0, vocab_size: int = 9):
    """A tiny random GPT-2 sequence classifier over the toy vocabulary, labels 0 "neg" and
    1 "pos" (pad = EOS, so pair it with ``toy_tokenizer(with_pad=True)``). ``scale``
    multiplies the classification head so labels are far from 50/50."""
    from transformers import GPT2Config, GPT2ForSequenceClassification

    eos = vocab_size - 1
    config = GPT2Config(
        vocab_size=vocab_size,
        n_embd=32,
        n_layer=1,
        n_head=2,
        n_positions=64,
        num_labels=2,
        bos_token_id=eos,
        eos_token_id=eos,
        pad_token_id=eos,
        id2label={0: "neg", 1: "pos"},
        label2id={"neg": 0, "pos": 1},
    )
    torch.manual_seed(seed)
    model = GPT2ForSequenceClassification(config)
    with torch.no_grad():
        model.score.weight.mul_(scale)
    return model.eval()
