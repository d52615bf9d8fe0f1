"""peft adapters, one way each: is it a peft model, the base model with the adapter off.

is_peft(model)                  # a peft PeftModel?
off = adapter_off(policy)       # context-manager factory: policy.disable_adapter()
shares_base(policy, model)      # does calling `model` run through policy's LoRA layers?
BaseView(policy)                # the base model as a module: adapter off on every call
copy = MergedCopy(policy, dtype)  # a frozen plain copy, LoRA merged in; copy.sync() per update
"""

from __future__ import annotations

import copy
import sys
from contextlib import contextmanager

import torch

__all__ = ["is_peft", "adapter_off", "shares_base", "BaseView", "MergedCopy", "lora_model"]


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


class MergedCopy:
    """A frozen, plain (peft-free) copy of a peft ``policy`` in ``dtype``, its LoRA merged
    into the weights: for sampling only, with no LoRA matmuls per call.

        rollout = MergedCopy(policy, torch.bfloat16)  # before accelerate wraps the policy
        rollout.sync()                                 # after each update, before sampling
        out = rollout.model(input_ids)

    ``sync`` writes ``W0 + delta`` of every LoRA layer, computed in the policy's precision
    and then rounded to ``dtype``, and copies the ``modules_to_save`` weights; the other
    weights are cast once. A LoRA-adapted weight gets its own tensor in the copy, so a tied
    output embedding with a LoRA leaves the copy's input embedding as it was. The copy
    samples a rounded policy: train on its samples as off-policy ones.
    """

    def __init__(self, policy, dtype: torch.dtype):
        from peft.tuners.lora import Linear as LoraLinear
        from peft.tuners.lora import LoraLayer
        from peft.utils import ModulesToSaveWrapper

        if not is_peft(policy):
            raise TypeError("MergedCopy needs a peft model")
        if not dtype.is_floating_point:
            raise ValueError(f"a merged copy needs a floating dtype, got {dtype}")
        self.model = copy.deepcopy(policy).unload().to(dtype).eval().requires_grad_(False)
        own = dict(self.model.named_modules())
        self.lora, self.saved = [], []  # [(policy's layer, copy's module)]
        for name, mod in policy.base_model.model.named_modules():
            if isinstance(mod, LoraLayer) and name in own:
                if not isinstance(mod, LoraLinear) or any(mod.use_dora.values()):
                    raise ValueError(
                        f"{name}: MergedCopy merges plain LoRA on linear layers, not "
                        f"{type(mod).__name__}{' with DoRA' if any(mod.use_dora.values()) else ''}"
                    )
                dst = own[name]
                dst.weight = torch.nn.Parameter(dst.weight.detach().clone(), requires_grad=False)
                self.lora.append((mod, dst))
            elif isinstance(mod, ModulesToSaveWrapper) and name in own:
                self.saved.append((mod, own[name]))
        self.sync()

    @torch.no_grad()
    def sync(self) -> None:
        """Copy the policy's current adapter into the copy."""
        for src, dst in self.lora:
            if src.merged:
                raise RuntimeError("the policy's adapter is merged into it; unmerge it first")
            weight = src.get_base_layer().weight
            for name in src.active_adapters:
                if name in src.lora_A:
                    weight = weight + src.get_delta_weight(name)
            dst.weight.copy_(weight)
        for src, dst in self.saved:
            trained = src.modules_to_save[src.active_adapters[0]]
            for p, q in zip(trained.parameters(), dst.parameters(), strict=True):
                q.copy_(p)


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
