"""peft adapters, one way each: is it a peft model, the base model with the adapter off.

is_peft(model)                  # a peft PeftModel?
off = adapter_off(policy)       # context-manager factory: policy.disable_adapter()
shares_base(policy, model)      # does calling `model` run through policy's LoRA layers?
BaseView(policy)                # the base model as a module: adapter off on every call
"""

from __future__ import annotations

import sys
from contextlib import contextmanager

import torch

__all__ = ["is_peft", "adapter_off", "shares_base", "BaseView", "lora_model"]


def is_peft(model) -> bool:
    """A peft ``PeftModel`` (peft is only looked up when already imported: no peft model
    can exist otherwise)."""
    peft = sys.modules.get("peft")
    cls = getattr(peft, "PeftModel", None)
    return cls is not None and isinstance(model, cls)


def adapter_off(policy):
    """A context-manager factory: ``policy.disable_adapter()`` that also restores the
    ``requires_grad`` flags peft's re-enabling sets on a frozen (inference) adapter."""
    params = list(policy.parameters())

    @contextmanager
    def off():
        flags = [q.requires_grad for q in params]
        try:
            with policy.disable_adapter():
                yield
        finally:
            for q, flag in zip(params, flags):
                if q.requires_grad != flag:
                    q.requires_grad_(flag)

    return off


def shares_base(policy, model) -> bool:
    """Whether ``model`` is the peft ``policy`` itself or runs through its base modules
    (peft injects LoRA layers into the base model in place, so calling the base model, its
    LoRA wrapper or another peft model on the same base applies the adapter too)."""
    if not is_peft(policy):
        return False
    base = policy.get_base_model()
    if any(model is m for m in (policy, base, getattr(policy, "base_model", None))):
        return True
    return is_peft(model) and model.get_base_model() is base


class BaseView(torch.nn.Module):
    """The base model of a peft ``policy``: every call runs with the adapter disabled.

    LoRA layers are injected into the base model in place, so the base module itself
    applies the adapter; potentials that need p_base (e.g. ``SuffixLikelihood``) take
    ``BaseView(policy)`` instead. It shares every weight with the policy.
    """

    def __init__(self, policy):
        super().__init__()
        if not is_peft(policy):
            raise TypeError("BaseView needs a peft model (one with disable_adapter())")
        self.policy = policy
        self.config = policy.config
        self._off = adapter_off(policy)

    @property
    def wrapped_model(self):
        """The peft model this view calls (``hf.session.cache_kwarg`` reads its signature)."""
        return self.policy

    def forward(self, *args, **kwargs):
        with self._off():
            return self.policy(*args, **kwargs)

    def get_output_embeddings(self):
        """The policy's output head (``teacher_force`` checks that, called outside this
        view, it gives the view's logits: not so when the adapter covers the head)."""
        return self.policy.get_output_embeddings()


def lora_model(
    model,
    *,
    rank: int,
    alpha: float,
    target_modules: list[str],
    modules_to_save: list[str] | None = None,
    seed: int = 0,
):
    """``model`` wrapped in a fresh peft LoRA adapter (the base stays frozen);
    ``["all-linear"]`` targets every linear layer. The adapter's random init depends only
    on ``seed``, not on the global RNG."""
    from peft import LoraConfig, get_peft_model

    lora = LoraConfig(
        r=rank,
        lora_alpha=alpha,
        target_modules=target_modules[0] if target_modules == ["all-linear"] else target_modules,
        modules_to_save=list(modules_to_save or []) or None,
        task_type="CAUSAL_LM",
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return get_peft_model(model, lora)
