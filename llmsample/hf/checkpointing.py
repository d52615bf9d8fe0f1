"""Activation checkpointing of a model's decoder layers for the passes in a block, with
dropout left off.

    with checkpointed_layers(policy):
        tf = teacher_force(policy, ctx_ids, ctx_mask, x, x_mask, grad=True)  # keeps only
    tf.token_logp.sum().backward()            # each layer's input; recomputes each layer

transformers checkpoints a decoder layer (a ``GradientCheckpointingLayer``) only while
checkpointing is enabled on the model *and* that layer is in training mode. Training mode
would also switch dropout on, and the GFlowNet losses need the exact, dropout-free log q.
So this sets the training flag of the layers themselves only (their submodules:
attention, MLP, dropout stay in eval mode), enables checkpointing (non-reentrant) if it
was off, and restores both on exit. The backward pass after the block recomputes the
same dropout-free layer forwards. Memory: autograd keeps one [R, L, H] input per layer
instead of every activation inside it; compute: one more forward of the body.
"""

from __future__ import annotations

from contextlib import contextmanager

from transformers.modeling_layers import GradientCheckpointingLayer

from llmsample.hf.adapters import is_peft

__all__ = ["checkpointed_layers"]


def _pretrained(model):
    """The transformers model under a peft wrapper or accelerate's DDP/compile wrapper."""
    model = getattr(model, "module", model)
    return model.get_base_model() if is_peft(model) else model


@contextmanager
def checkpointed_layers(model):
    """Checkpoint every decoder layer of ``model`` (peft or plain) in the forwards run
    inside the block; see the module docstring."""
    base = _pretrained(model)
    layers = [m for m in base.modules() if isinstance(m, GradientCheckpointingLayer)]
    if not getattr(base, "supports_gradient_checkpointing", False) or not layers:
        raise ValueError(
            f"{type(base).__name__} does not support activation checkpointing of its layers; "
            "turn activation_checkpointing off for this model"
        )
    enabled = any(getattr(m, "gradient_checkpointing", False) for m in layers)
    if not enabled:
        enable = getattr(base, "activation_checkpointing_enable", None)
        (enable or base.gradient_checkpointing_enable)({"use_reentrant": False})
        base.disable_input_require_grads()  # only reentrant checkpointing needs the hook
    modes = [m.training for m in layers]
    for m in layers:
        m.training = True  # the layer alone: its submodules keep their (eval) mode
    try:
        yield model
    finally:
        for m, mode in zip(layers, modes):
            m.training = mode
        if not enabled:
            disable = getattr(base, "activation_checkpointing_disable", None)
            (disable or base.gradient_checkpointing_disable)()
