"""Shared fixtures: tiny random-config causal LMs over a 9-token vocabulary.

Token ids 0..7 are the words "a".."h" and 8 is "<eos>" (EOS and BOS). Models are
built from configs (never downloaded) with fixed seeds; the logits are sharpened by
a larger init so the targets are far from uniform.
"""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest  # noqa: E402
import torch  # noqa: E402
from tokenizers import Tokenizer, models, pre_tokenizers  # noqa: E402
from transformers import (  # noqa: E402
    AutoModelForCausalLM,
    GPT2Config,
    LlamaConfig,
    MistralConfig,
    PreTrainedTokenizerFast,
    Qwen2Config,
)

WORDS = list("abcdefgh")
EOS = 8
VOCAB = 9


def make_tokenizer(with_pad: bool = False) -> PreTrainedTokenizerFast:
    vocab = {w: i for i, w in enumerate(WORDS)} | {"<eos>": EOS}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<eos>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    kwargs = dict(tokenizer_object=tok, eos_token="<eos>", bos_token="<eos>")
    if with_pad:
        kwargs["pad_token"] = "<eos>"
    return PreTrainedTokenizerFast(**kwargs)


def _config(arch: str):
    common = dict(vocab_size=VOCAB, bos_token_id=EOS, eos_token_id=EOS)
    if arch == "gpt2":
        return GPT2Config(n_embd=32, n_layer=2, n_head=2, n_positions=64, **common)
    small = dict(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        **common,
    )
    return {"llama": LlamaConfig, "qwen2": Qwen2Config, "mistral": MistralConfig}[arch](**small)


def make_model(arch: str = "gpt2", seed: int = 0, scale: float = 4.0):
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(_config(arch))
    with torch.no_grad():  # sharper next-token distributions than the default init
        head = model.get_output_embeddings()
        head.weight.mul_(scale)
    return model.eval()


@pytest.fixture(scope="session")
def tokenizer():
    return make_tokenizer()


@pytest.fixture(scope="session", params=["gpt2", "llama"])
def model(request):
    return make_model(request.param)
