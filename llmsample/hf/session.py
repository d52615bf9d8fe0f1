"""Hugging Face adapter: batched prefill, cached steps, reorder, teacher forcing.

This is the only module that touches transformers internals. Rows of a session are
(prompt, particle) pairs laid out prompt-major: row ``b * N + i`` is particle ``i``
of prompt ``b``. Prompts are left padded and position ids come from the attention
mask, exactly as ``model.generate`` does, so a batch of prompts of different lengths
runs in one forward pass per step.

    prompts = encode_prompts(tokenizer, ["ROMEO:", "JULIET: Ay"])   # llmsample.hf.prompts
    session = LMSession(model, prompts, num_particles=8)   # prefill once, expand to 8
    logp = session.logp                                     # [16, V] next-token log-probs
    logp = session.step(tokens)                             # append one token per row
    session.reorder(ancestors)                              # resampling: permute rows
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from functools import lru_cache

import torch
from torch import Tensor

from llmsample.hf.prompts import PromptBatch

__all__ = [
    "LMSession",
    "teacher_force",
    "TeacherForced",
    "context_length",
    "vocab_size",
    "cache_kwarg",
    "output_cache",
    "position_ids",
    "model_device",
    "full_forward",
]


def context_length(model) -> int | None:
    """Maximum number of positions the model accepts, or None when unbounded/unknown."""
    cfg = model.config
    for name in ("max_position_embeddings", "n_positions", "n_ctx", "seq_length"):
        value = getattr(cfg, name, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def vocab_size(model) -> int:
    """Size of the model's output distribution (the logits' last dimension)."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if head is not None and getattr(head, "weight", None) is not None:
        return int(head.weight.shape[0])
    return int(model.config.vocab_size)


def cache_kwarg(model) -> str:
    """The forward keyword that takes the KV cache: ``cache`` (transformers 5.24+, where
    ``past_key_values`` is deprecated) or ``past_key_values`` (older releases and models
    that keep the old name)."""
    return _cache_kwarg(type(_base_module(model)))


def _base_module(model):
    # a wrapper that forwards **kwargs names what it wraps (gfn.BaseView: wrapped_model)
    model = getattr(model, "wrapped_model", model)
    get_base = getattr(model, "get_base_model", None)  # a peft model forwards **kwargs
    return get_base() if callable(get_base) else model


@lru_cache(maxsize=64)
def _cache_kwarg(cls) -> str:
    params = inspect.signature(cls.forward).parameters
    return "cache" if "cache" in params else "past_key_values"


@lru_cache(maxsize=64)
def _keeps_logits(cls) -> bool:
    """Whether ``cls.forward`` takes ``logits_to_keep`` (compute the last logits only)."""
    return "logits_to_keep" in inspect.signature(cls.forward).parameters


def output_cache(out):
    """The KV cache a forward returned, under either name (see :func:`cache_kwarg`)."""
    cache = out.get("cache") if hasattr(out, "get") else getattr(out, "cache", None)
    if cache is None:
        cache = out.get("past_key_values") if hasattr(out, "get") else None
    return cache


def position_ids(mask: Tensor) -> Tensor:
    return (mask.cumsum(-1) - 1).clamp(min=0)


def full_forward(
    model, input_ids: Tensor, attention_mask: Tensor | None = None, hidden: bool = False
) -> tuple[Tensor, Tensor | None]:
    """One uncached forward over whole (left-padded) rows: the logits [R, L, V] and, with
    ``hidden``, the last layer's hidden states [R, L, H] (else None)."""
    kw = {} if attention_mask is None else dict(attention_mask=attention_mask)
    if attention_mask is not None:
        kw["position_ids"] = position_ids(attention_mask)
    out = model(input_ids=input_ids, use_cache=False, output_hidden_states=hidden, **kw)
    return out.logits, out.hidden_states[-1] if hidden else None


class LMSession:
    """Incremental decoding state of one causal LM over B prompts x N particles.

    ``logp`` always holds the fp32 next-token log-probabilities of every row
    ([B*N, V]). ``forward_tokens`` counts the token positions pushed through the model
    (padding included: that is what the compute pays for). ``context``, a callable
    returning a context manager, wraps every forward (prefill and steps): e.g. a peft
    model's ``disable_adapter`` to decode with the base model under a LoRA adapter.
    With ``hidden=True`` it also keeps ``hidden``, each row's fp32 last-layer state at
    its last token ([B*N, H]), for heads on the model (e.g. a learned twist). Forwards run
    in inference mode; with ``grad=True`` they keep autograd on instead, so ``logp``
    carries gradients through the prompt, the cache and every step.
    """

    def __init__(
        self,
        model,
        prompts: PromptBatch,
        num_particles: int,
        context: Callable[[], AbstractContextManager] | None = None,
        hidden: bool = False,
        grad: bool = False,
    ):
        self.model = model
        self.grad = grad
        self.context = context or nullcontext
        self.keep_hidden = hidden
        self.hidden: Tensor | None = None
        self.device = model_device(model)
        prompts = prompts.to(self.device)
        B, P = prompts.input_ids.shape
        with self.context(), self._autograd():
            out = model(
                input_ids=prompts.input_ids,
                attention_mask=prompts.attention_mask,
                position_ids=position_ids(prompts.attention_mask),
                use_cache=True,
                logits_to_keep=1,
                output_hidden_states=hidden,
            )
        self.cache = output_cache(out)
        self._cache_kwarg = cache_kwarg(model)
        if self.cache is None or not hasattr(self.cache, "reorder_cache"):
            raise TypeError(
                f"{type(model).__name__} returned no reorderable KV cache "
                "(transformers `Cache`); SMC needs one to resample particles"
            )
        self.forward_tokens = B * P
        self.logp = torch.log_softmax(out.logits[:, -1].float(), dim=-1)  # [B, V]
        self._keep(out)
        self.attention_mask = prompts.attention_mask
        self.positions = position_ids(prompts.attention_mask)[:, -1]  # [B]
        self.reorder(
            torch.arange(B, device=self.device).repeat_interleave(num_particles)
        )  # expand the prompt cache once: [B] -> [B*N]

    def _autograd(self) -> AbstractContextManager:
        return torch.enable_grad() if self.grad else torch.inference_mode()

    def reorder(self, index: Tensor) -> None:
        """Make row r a copy of old row ``index[r]`` (resampling, or expansion)."""
        index = index.to(self.device)
        self.cache.reorder_cache(index)
        self.attention_mask = self.attention_mask.index_select(0, index)
        self.positions = self.positions.index_select(0, index)
        self.logp = self.logp.index_select(0, index)
        if self.hidden is not None:
            self.hidden = self.hidden.index_select(0, index)

    def _keep(self, out) -> None:
        if self.keep_hidden:
            self.hidden = out.hidden_states[-1][:, -1].float()  # [R, H]

    def advance(self, tokens: Tensor) -> None:
        """Append one token per row ([R]): the lifecycle name the SMC engine calls."""
        self.step(tokens)

    def step(self, tokens: Tensor) -> Tensor:
        """Append one token per row ([R]) and return the new next-token log-probs."""
        tokens = tokens.to(self.device)
        R = tokens.shape[0]
        self.attention_mask = torch.cat(
            [self.attention_mask, self.attention_mask.new_ones((R, 1))], dim=1
        )
        self.positions = self.positions + 1
        with self.context(), self._autograd():
            out = self.model(
                input_ids=tokens[:, None],
                attention_mask=self.attention_mask,
                position_ids=self.positions[:, None],
                use_cache=True,
                output_hidden_states=self.keep_hidden,
                **{self._cache_kwarg: self.cache},
            )
        self.cache = output_cache(out)
        self.forward_tokens += R
        self.logp = torch.log_softmax(out.logits[:, -1].float(), dim=-1)
        self._keep(out)
        return self.logp


def model_device(model) -> torch.device:
    try:
        return next(model.parameters()).device
    except StopIteration:  # pragma: no cover - parameterless model
        return torch.device("cpu")


@dataclass
class TeacherForced:
    """What one teacher-forced pass returns (fp32; see :func:`teacher_force`)."""

    token_logp: Tensor  # [R, T] log p(x_t | context, x_<t), 0 at masked positions
    stop_logp: Tensor | None  # [R, T+1] log p(stop | context, x_<=i) for i = 0..T
    context_hidden: Tensor | None  # [R, H] last-layer state at the last context token


def teacher_force(
    model,
    context_ids: Tensor,
    context_mask: Tensor,
    continuation_ids: Tensor,
    continuation_mask: Tensor,
    *,
    grad: bool = False,
    stop_ids: list[int] | None = None,
    hidden: bool = False,
    chunk_bytes: int = 64 * 2**20,
) -> TeacherForced:
    """One forward pass over context + continuation, no KV cache.

    ``context_*`` are left-padded [R, P] with at least one real token per row;
    ``continuation_*`` are right-padded [R, T]. ``stop_ids`` adds the log-probability
    of stopping (the sum over those tokens) after every continuation prefix, the empty
    one included; ``hidden`` adds the context's last hidden state. With ``grad`` the
    outputs carry gradients; otherwise the pass runs in inference mode.

    Memory: the body runs once and keeps only the last hidden states [R, T+1, H]; the
    output head then runs over time chunks of at most ``chunk_bytes`` of fp32 logits
    ([R, c, V]), each recomputed in the backward pass (activation checkpointing), so no
    [R, T+1, V] tensor is ever held. Models whose logits are not the head applied to the
    last hidden state (logit soft-capping or scaling; a view whose adapter covers the
    head) are detected on the spot, by comparing the head with the model's own last
    logits, and scored with the logits of the last T+1 positions, as are models without
    ``get_output_embeddings``.
    """
    device = model_device(model)
    ids = torch.cat([context_ids, continuation_ids], dim=1).to(device)  # [R, P+T]
    mask = torch.cat([context_mask, continuation_mask], dim=1).to(device)
    P, T = context_ids.shape[1], continuation_ids.shape[1]
    cont = continuation_ids.to(device)
    get_head = getattr(model, "get_output_embeddings", None)
    head = get_head() if callable(get_head) else None
    keeps = _keeps_logits(type(_base_module(model)))
    kw = dict(input_ids=ids, attention_mask=mask, position_ids=position_ids(mask), use_cache=False)
    ctx = torch.enable_grad() if grad else torch.inference_mode()
    with ctx:
        tok = stop = h = None
        if head is not None:
            out = model(**kw, output_hidden_states=True, **({"logits_to_keep": 1} if keeps else {}))
            h = out.hidden_states[-1][:, P - 1 :]  # [R, T+1, H] states that predict x_t
            with torch.no_grad():  # is the model's logit head(last hidden state)?
                last = out.logits[:, -1].float()  # [R, V]
                plain = torch.allclose(head(h[:, -1]).float(), last, 1e-3, 1e-3)
            if plain:
                tok, stop = _chunked_logprobs(head, h, cont, stop_ids, grad, chunk_bytes)
        if tok is None:  # no head to call, or the model post-processes its logits
            out = model(
                **kw, output_hidden_states=hidden, **({"logits_to_keep": T + 1} if keeps else {})
            )
            h = out.hidden_states[-1][:, P - 1 :] if hidden else None
            tok, stop = _logprobs(out.logits[:, -(T + 1) :].float(), cont, stop_ids)
        tok = torch.where(continuation_mask.to(device).bool(), tok, torch.zeros_like(tok))
        ctx_h = h[:, 0].float() if hidden else None  # [R, H]
        return TeacherForced(tok, stop, ctx_h)


def _logprobs(logits: Tensor, cont: Tensor, stop_ids: list[int] | None):
    """Token and stop log-probs from fp32 logits [R, c, V] of c positions, the first c' =
    cont.shape[1] <= c of which predict ``cont`` [R, c']: ([R, c'], [R, c] or None)."""
    norm = logits.logsumexp(-1)  # [R, c]; no [R, c, V] log-softmax kept for backward
    c = cont.shape[1]
    tok = logits[:, :c].gather(-1, cont[..., None])[..., 0] - norm[:, :c]  # [R, c']
    stop = None
    if stop_ids:
        sid = torch.as_tensor(stop_ids, device=logits.device)
        stop = logits[..., sid].logsumexp(-1) - norm  # [R, c]
    return tok, stop


def _chunked_logprobs(head, h: Tensor, cont: Tensor, stop_ids, grad: bool, chunk_bytes: int):
    """:func:`_logprobs` of ``head(h)`` over time chunks; h [R, T+1, H], cont [R, T]."""
    from torch.utils.checkpoint import checkpoint

    R, T1 = h.shape[:2]
    V = head.weight.shape[0]
    step = max(1, chunk_bytes // max(1, R * V * 4))  # time steps per chunk

    def block(h_c: Tensor, cont_c: Tensor):
        return _logprobs(head(h_c).float(), cont_c, stop_ids)

    toks, stops = [], []
    for s in range(0, T1, step):
        h_c, cont_c = h[:, s : s + step], cont[:, s : s + step]  # the last chunk has T+1
        if grad:
            tok, stop = checkpoint(block, h_c, cont_c, use_reentrant=False)
        else:
            tok, stop = block(h_c, cont_c)
        toks.append(tok)
        stops.append(stop)
    stop = torch.cat(stops, dim=1) if stop_ids else None  # [R, T+1]
    return torch.cat(toks, dim=1), stop  # [R, T]
