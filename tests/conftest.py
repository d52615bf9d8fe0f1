"""Shared fixtures: tiny random-config causal LMs over a 9-token vocabulary.

Token ids 0..7 are the words "a".."h" and 8 is "<eos>" (EOS and BOS). Models are
built from configs (never downloaded) with fixed seeds by ``llmsample.exact.toy_model``;
the logits are sharpened by a larger init so the targets are far from uniform.
"""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest  # noqa: E402

from llmsample.exact import TOY_EOS as EOS  # noqa: E402
from llmsample.exact import toy_model as make_model  # noqa: E402
from llmsample.exact import toy_tokenizer as make_tokenizer  # noqa: E402

VOCAB = 9
__all__ = ["EOS", "VOCAB", "make_model", "make_tokenizer"]


@pytest.fixture(scope="session")
def tokenizer():
    return make_tokenizer()


@pytest.fixture(scope="session", params=["gpt2", "llama"])
def model(request):
    return make_model(request.param)


@pytest.fixture(autouse=True)
def _fresh_accelerate_state():
    """accelerate keeps one process-wide state (mixed precision included): reset it after
    each test so a trainer built in one test never leaks its settings into the next."""
    yield
    import sys

    if "accelerate" in sys.modules:
        from accelerate.state import AcceleratorState, GradientState

        AcceleratorState._reset_state(True)
        GradientState._reset_state()
