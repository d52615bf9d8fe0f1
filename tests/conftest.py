"""Shared fixtures: tiny random-config causal LMs over a 9-token vocabulary.

Token ids 0..7 are the words "a".."h" and 8 is "<eos>" (EOS and BOS). Models are
built from configs (never downloaded) with fixed seeds by ``llmsample.diagnostics.exact.toy_model``;
the logits are sharpened by a larger init so the targets are far from uniform.
"""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
# One torch thread per test process (and its subprocesses) unless the caller says otherwise:
# the models are tiny, and more threads than free cores slow a busy machine many-fold.
os.environ.setdefault("OMP_NUM_THREADS", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

_threads = os.environ["OMP_NUM_THREADS"]
torch.set_num_threads(int(_threads) if _threads.isdigit() and int(_threads) > 0 else 1)

from llmsample.diagnostics.exact import TOY_EOS as EOS  # noqa: E402
from llmsample.diagnostics.exact import enumerate_target  # noqa: E402
from llmsample.diagnostics.exact import toy_model as make_model  # noqa: E402
from llmsample.diagnostics.exact import toy_tokenizer as make_tokenizer  # noqa: E402
from llmsample.potentials import Reward  # noqa: E402

VOCAB = 9
__all__ = [
    "EOS",
    "VOCAB",
    "CHAT_WORDS",
    "GFN_PHI",
    "GFN_PROMPT",
    "GFN_T",
    "GFN_TARGETS",
    "continuations",
    "gfn_config",
    "make_model",
    "make_tokenizer",
    "make_chat_tokenizer",
    "perturbed_lora",
    "soft_reward",
]

# a toy chat template: "<turn> ROLE CONTENT <eos>" per message, then "<turn> assistant"
CHAT_WORDS = ["<turn>", "user", "assistant", "system"]
CHAT_TEMPLATE = (
    "{% for m in messages %}<turn> {{ m['role'] }} {{ m['content'] }} <eos> {% endfor %}"
    "{% if add_generation_prompt %}<turn> assistant {% endif %}"
)


def make_chat_tokenizer(words: list[str]):
    """A word-level toy tokenizer with a pad token and the chat template above; ``words``
    must include ``CHAT_WORDS``. EOS (also BOS and end of turn) is id ``len(words)``."""
    missing = [w for w in CHAT_WORDS if w not in words]
    assert not missing, f"the chat template needs the words {missing}"
    tok = make_tokenizer(with_pad=True, words=words)
    tok.chat_template = CHAT_TEMPLATE
    return tok


def soft_reward(c: float = 1.0, a: float = 0.7) -> Reward:
    """The toy soft reward log phi = c * #"c" - a * #"a" (counted over the text's words),
    scoring prefixes with the same function: a valid, non-optimal twist."""

    def score(texts):
        return [c * t.split().count("c") - a * t.split().count("a") for t in texts]

    return Reward(score, score)


def continuations(out, b: int) -> list[tuple[int, ...]]:
    """The continuations of row group ``b`` of a generate output as tuples (up to and
    including the first EOS; padding after it dropped)."""
    rows = out.continuations[b].tolist()
    return [tuple(r[: r.index(EOS) + 1] if EOS in r else r) for r in rows]


def perturbed_lora(model, target_modules: list[str], std: float, seed: int = 2):
    """``add_lora(model)`` on ``target_modules`` with its (zero-initialized) B matrices drawn
    from N(0, std^2), so the adapted q differs from the base p; in eval mode. peft adapts
    ``model`` in place."""
    import warnings

    from llmsample.gfn import GFNConfig, add_lora

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # peft: fan_in_fan_out for GPT-2's Conv1D
        policy = add_lora(model, GFNConfig(target_modules=target_modules))
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in policy.named_parameters():
            if "lora_B" in name:
                p.normal_(0, std, generator=gen)
    return policy.eval()


@pytest.fixture(scope="module")
def gpt2():
    return make_model("gpt2")


@pytest.fixture(scope="module")
def tok():
    """The toy tokenizer (no pad token; a module may override it with its own ``tok``)."""
    return make_tokenizer()


# The GFlowNet task of test_gfn_trainer.py and test_flow_twist.py: the toy GPT-2 with a
# LoRA on every linear layer (lm_head included), prompt "a b", T = 3 new tokens.
GFN_T = 3
GFN_PROMPT = "a b"
GFN_TARGETS = ["c_attn", "c_proj", "c_fc", "lm_head"]
GFN_PHI = soft_reward(2.0, 1.5)


def gfn_config(tmp_path, **kw):
    """A short GFNConfig for the GFlowNet task (40 steps, no saves or evals), writing under
    ``tmp_path / "run"``; ``kw`` overrides any field."""
    from llmsample.gfn import GFNConfig

    base = dict(
        steps=40,
        samples_per_prompt=32,
        max_new_tokens=GFN_T,
        lr=3e-3,
        out_dir=str(tmp_path / "run"),
        save_every=0,
        eval_every=0,
        log_every=5,
        progress=False,
        target_modules=GFN_TARGETS,
    )
    return GFNConfig(**(base | kw))


@pytest.fixture(scope="module")
def gfn_target():
    """The GFlowNet task's exact target (the toy GPT-2, padded tokenizer, GFN_PHI)."""
    return enumerate_target(
        make_model("gpt2"), make_tokenizer(with_pad=True), GFN_PROMPT, GFN_PHI, GFN_T, EOS
    )


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


def make_vllm_folder(path) -> str:
    """The toy Llama (9-token vocabulary, enumerable) saved as a model folder vLLM can load:
    head_dim 32, the smallest vLLM's CPU attention takes."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    config = LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=32,
        max_position_embeddings=128,
        bos_token_id=EOS,
        eos_token_id=EOS,
        pad_token_id=EOS,
        tie_word_embeddings=False,
    )
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config)
    with torch.no_grad():
        model.get_output_embeddings().weight.mul_(4.0)  # far from uniform, as the toys
    model.save_pretrained(path)
    make_tokenizer(with_pad=True).save_pretrained(path)
    return str(path)


@pytest.fixture(scope="session")
def vllm_engine(tmp_path_factory):
    """One vLLM engine per test session on the toy Llama folder (skips without vLLM):
    (the engine, the folder)."""
    pytest.importorskip("vllm", reason="vLLM is an optional install (see the README)")
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    from vllm import LLM

    folder = make_vllm_folder(tmp_path_factory.mktemp("toy-llama"))
    llm = LLM(
        folder,
        dtype="float32",
        enable_prefix_caching=True,
        block_size=32,  # the smallest CPU KV block: particles share prefixes in 32s
        max_model_len=128,
        max_logprobs=-1,  # tempered proposals read the full log p vector
        enforce_eager=True,
        seed=0,
    )
    yield llm, folder
    from llmsample.vllm import shutdown

    shutdown(llm)  # its processes stop now, not in a noisy interpreter-exit cleanup
