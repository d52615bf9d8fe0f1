"""Activation checkpointing of the scoring pass (``hf.checkpointing``): the same log q and
gradients with dropout configured on, less memory kept for backward, modes restored."""

from __future__ import annotations

from contextlib import nullcontext

import pytest
import torch
from conftest import make_model

from llmsample.hf.adapters import lora_model
from llmsample.hf.checkpointing import checkpointed_layers
from llmsample.hf.session import teacher_force


def _lora_with_dropout(arch: str):
    """A toy model with a LoRA whose dropout modules would fire in training mode."""
    base = make_model(arch)
    for m in base.modules():
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.5
        if hasattr(m, "attention_dropout"):
            m.attention_dropout = 0.5
    policy = lora_model(base, rank=4, alpha=8, target_modules=["all-linear"], seed=1)
    for name, p in policy.named_parameters():  # lora_B starts at zero: make it matter
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.1, generator=torch.Generator().manual_seed(3))
    return policy.eval()


def _score(policy, ckpt: bool):
    """(log q [R], LoRA grads, bytes of non-weight storages autograd saved)."""
    g = torch.Generator().manual_seed(0)
    V = policy.config.vocab_size
    ctx = torch.randint(0, V, (4, 5), generator=g)
    cont = torch.randint(0, V, (4, 6), generator=g)
    weights = {p.untyped_storage().data_ptr() for p in policy.parameters()}
    saved: dict[int, int] = {}

    def pack(t):
        if t.untyped_storage().data_ptr() not in weights:
            saved[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    policy.zero_grad(set_to_none=True)
    ones = torch.ones_like
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        with checkpointed_layers(policy) if ckpt else nullcontext():
            tf = teacher_force(policy, ctx, ones(ctx), cont, ones(cont), grad=True)
    log_q = tf.token_logp.sum(1)
    log_q.sum().backward()
    grads = {n: p.grad.clone() for n, p in policy.named_parameters() if p.requires_grad}
    return log_q.detach(), grads, sum(saved.values())


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_checkpointed_scoring_is_exact_dropout_free_and_smaller(arch):
    policy = _lora_with_dropout(arch)
    modes = {n: m.training for n, m in policy.named_modules()}
    q0, g0, bytes0 = _score(policy, ckpt=False)
    q1, g1, bytes1 = _score(policy, ckpt=True)
    torch.testing.assert_close(q1, q0, rtol=0, atol=1e-5)  # dropout (p = 0.5) stayed off
    assert g0.keys() == g1.keys() and g0
    for n in g0:
        torch.testing.assert_close(g1[n], g0[n], rtol=1e-4, atol=1e-6)
    assert bytes1 < bytes0 / 2, (bytes1, bytes0)  # the layers' insides are not kept
    assert {n: m.training for n, m in policy.named_modules()} == modes
    assert not any(getattr(m, "gradient_checkpointing", False) for m in policy.modules())


def test_checkpointing_refuses_a_model_without_layers():
    with pytest.raises(ValueError, match="does not support activation checkpointing"):
        with checkpointed_layers(torch.nn.Linear(2, 2)):
            pass
