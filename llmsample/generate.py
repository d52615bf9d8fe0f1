"""User entry points: SMC and the baselines, all returning :class:`SamplingOutput`.

They follow ``model.generate`` conventions: text ``prompts`` or
``input_ids``/``attention_mask`` (left or right padded), ``max_new_tokens``,
``eos_token_id``, ``pad_token_id``; ``config=`` takes an :class:`SMCConfig` whose
fields any explicitly passed keyword overrides.

    out = smc_generate(model, tok, prompts=["ROMEO:"], potential=Contains("love"),
                       num_particles=32, max_new_tokens=40, seed=0)
    out.texts, out.log_weights, out.log_z, out.ess, out.sample(4)

Methods:
- :func:`smc_generate`: twisted SMC with adaptive resampling.
- :func:`importance_generate`: the same without resampling (importance sampling;
  ``out.best()`` is best-of-N).
- :func:`ancestral_generate`: plain draws from the LM (tempered/top-k/top-p), unweighted;
  with a peft model, draws from the adapted model (the adapter as a plain sampler).
- :func:`beam_generate`: beam search through ``model.generate``, unweighted.
"""

from __future__ import annotations

import dataclasses
import math
import operator

import torch
from torch import nn

from llmsample.hf.adapters import adapter_off, is_peft, shares_base
from llmsample.hf.prompts import encode_prompts
from llmsample.hf.session import vocab_size
from llmsample.output import SamplingOutput
from llmsample.particles import Particles
from llmsample.potentials.base import Potential
from llmsample.proposals import LMProposal, LocallyOptimal, ModelProposal, Proposal
from llmsample.smc.config import SMCConfig
from llmsample.smc.engine import run_smc
from llmsample.twists import Twist, resolve_twist
from llmsample.vllm import EngineModel, is_vllm_engine, run_smc_vllm

__all__ = [
    "smc_generate",
    "importance_generate",
    "ancestral_generate",
    "beam_generate",
    "eos_ids",
]


def eos_ids(model, tokenizer, eos_token_id) -> list[int]:
    """The ids that end a continuation: ``eos_token_id``, else the model's generation
    config's, else the tokenizer's (``[]``: none). Refuses ids outside the vocabulary."""
    if eos_token_id is None:
        gen_cfg = getattr(model, "generation_config", None)
        eos_token_id = getattr(gen_cfg, "eos_token_id", None)
    if eos_token_id is None and tokenizer is not None:
        eos_token_id = tokenizer.eos_token_id
    if eos_token_id is None:
        return []  # continuations then end only at max_new_tokens
    scalar = _is_id(eos_token_id) or not hasattr(eos_token_id, "__iter__")
    ids = [eos_token_id] if scalar or isinstance(eos_token_id, str) else list(eos_token_id)
    V = vocab_size(model)
    for e in ids:
        if not _is_id(e) or not 0 <= operator.index(e) < V:
            raise ValueError(
                f"eos_token_id {e!r} is not a token id of this model (ids are 0..{V - 1}); "
                "pass the tokenizer's EOS id, a list of ids, or None for the model's own"
            )
    return [operator.index(e) for e in ids]


def _is_id(value) -> bool:
    """An integer (a Python, numpy or one-element torch integer), not a bool."""
    if isinstance(value, bool):
        return False
    try:
        operator.index(value)
    except TypeError:
        return False
    return True


def _check_counts(**counts) -> None:
    """Reject bools for integer counts (``True`` is an int to Python, not a count)."""
    for name, value in counts.items():
        if isinstance(value, bool):
            raise ValueError(f"{name} must be an integer >= 1, got {value!r} (a bool)")


def _check_text(prompts) -> None:
    """Text prompts must be strings a tokenizer can encode (valid Unicode: no lone
    surrogates, which is what undecodable command-line bytes turn into)."""
    for b, text in enumerate([prompts] if isinstance(prompts, str) else prompts):
        if not isinstance(text, str):
            raise TypeError(f"prompt {b} is a {type(text).__name__}, not a str")
        try:
            text.encode("utf-8")
        except UnicodeEncodeError as err:
            raise ValueError(
                f"prompt {b} is not valid text: {text[err.start : err.end]!r} at position "
                f"{err.start} is not a Unicode character (bytes that are not UTF-8?); pass "
                "UTF-8 text"
            ) from None


def _check_ids(batch, model) -> None:
    """Every prompt token (and the pad id, which the model also embeds) must be < V."""
    V = vocab_size(model)
    ids = batch.input_ids[batch.attention_mask.bool()]
    bad = ids[(ids < 0) | (ids >= V)]
    if len(bad):
        raise ValueError(
            f"prompt token id {int(bad[0])} is outside the model's vocabulary (ids 0..{V - 1}); "
            "check that `input_ids` (or the tokenizer) belong to this model"
        )
    if not 0 <= batch.pad_token_id < V:
        raise ValueError(
            f"pad_token_id {batch.pad_token_id} is outside the model's vocabulary "
            f"(ids 0..{V - 1}); pass a valid `pad_token_id`"
        )


def _prompts(tokenizer, prompts, input_ids, attention_mask, pad_token_id, eos, chat, messages):
    if pad_token_id is None and tokenizer is not None:
        pad_token_id = tokenizer.pad_token_id
    if pad_token_id is None:
        pad_token_id = eos[0] if eos else 0
    if prompts is not None:
        prompts = prompts if isinstance(prompts, str) else list(prompts)
        _check_text(prompts)
    return encode_prompts(
        tokenizer,
        prompts,
        input_ids=input_ids,
        attention_mask=attention_mask,
        pad_token_id=pad_token_id,
        chat=chat,
        messages=messages,
    )


def _resolve_proposal(proposal, model) -> tuple[Proposal, object]:
    """The proposal, and the context every forward of the target ``model`` runs in (the
    adapter disabled when the proposal is a peft adapter on ``model``'s own weights)."""
    if isinstance(proposal, str) and proposal == "adapter":
        if not is_peft(model):
            raise ValueError(
                "proposal='adapter' needs a peft model as `model` (e.g. from "
                "llmsample.load_model(base, adapter=path) or llmsample.gfn.add_lora); got "
                f"{type(model).__name__}. To use a separate proposal model pass it as "
                "`proposal=` instead"
            )
        return ModelProposal(model), adapter_off(model)
    if proposal is None:
        q = LMProposal()
    elif isinstance(proposal, Proposal):
        q = proposal
    elif isinstance(proposal, str) and proposal == "optimal":
        q = LocallyOptimal()
    elif isinstance(proposal, nn.Module):
        q = ModelProposal(proposal)
    else:
        got = repr(proposal) if isinstance(proposal, str) else type(proposal).__name__
        raise ValueError(
            f"proposal must be None, 'optimal', 'adapter', a Proposal or a causal LM, got {got}"
        )
    policy = q.model if isinstance(q, ModelProposal) else None
    if is_peft(policy) and shares_base(policy, model):
        return q, adapter_off(policy)
    return q, None


def smc_generate(
    model,
    tokenizer=None,
    prompts: str | list[str] | None = None,
    *,
    input_ids: torch.Tensor | None = None,
    attention_mask: torch.Tensor | None = None,
    chat: bool = False,
    messages: list[list[dict]] | None = None,
    potential: Potential | None = None,
    twist: str | Twist = "auto",
    proposal: str | Proposal | nn.Module | None = None,
    num_particles: int | None = None,
    max_new_tokens: int | None = None,
    resampling: str | None = None,
    ess_threshold: float | None = None,
    seed: int | None = None,
    progress: bool | None = None,
    stop_guard: bool | None = None,
    eos_token_id: int | list[int] | None = None,
    pad_token_id: int | None = None,
    config: SMCConfig | None = None,
    reference: list | None = None,
    _method: str = "smc",
) -> SamplingOutput:
    """Sample from sigma(x|c) ∝ p(x|c) phi(x,c) with SMC. See the module docstring.

    **Chat models.** ``chat=True`` sends each text prompt as one user message through
    the tokenizer's chat template (with the generation prompt); ``messages=`` takes the
    conversations themselves, one list of ``{"role", "content"}`` dicts per prompt. The
    continuation is the assistant's reply: it ends at the model's EOS (for chat models
    the end-of-turn token, e.g. ``<|im_end|>``), and potentials see only its text.

    ``reference`` (one complete continuation per prompt, as token ids) runs
    *conditional* SMC: row 0 of each prompt is clamped to it (see ``run_smc``); with an
    exact posterior sample its log Z_hat is an upper bound in expectation
    (:mod:`llmsample.diagnostics.bounds`).

    ``potential=None`` means phi = 1 (the target is the LM itself). ``twist`` is
    'auto' (the potential's prefix scores when it has them: its constructor says, e.g.
    ``prefix_bonus=``), 'prefix' (the same, required), 'none' or a :class:`Twist`;
    ``proposal`` is None (the base LM), 'optimal' (q ∝ p·psi, needs token-level
    twist scores), a :class:`Proposal`, another causal LM sharing the tokenizer, or
    'adapter' (below). ``stop_guard=True`` keeps the proposal from ending a reply that
    a hard potential would reject as it stands (EOS gets no mass there; the weights stay
    exact): with a constraint like :class:`~llmsample.potentials.concepts.Concepts`, far fewer
    particles die at EOS.

    **vLLM.** ``model`` may be a ``vllm.LLM``: block SMC on the engine (particles advance
    ``config.resample_every`` tokens per call; :mod:`llmsample.vllm` says what runs there).

    **LoRA adapters (peft).** A peft model as the proposal, e.g. a GFlowNet-tuned
    ``policy``, is q with its adapter on. When ``model`` is that same peft model, or
    its base model (``policy.get_base_model()``: peft injects the LoRA layers into it
    in place, so calling it would apply the adapter too), p is the base model with the
    adapter disabled: every target forward runs inside ``policy.disable_adapter()``
    and the weights are exact, p_base·phi/q. ``proposal='adapter'`` is shorthand for
    ``model=policy, proposal=policy``: ``model`` must be a peft model. Any other
    ``model`` is used as it is; so is a peft ``model`` with no adapter proposal (then
    p is the adapted model, as with ``ancestral_generate(policy, ...)``).
    """
    knobs = dict(
        num_particles=num_particles,
        max_new_tokens=max_new_tokens,
        resampling=resampling,
        ess_threshold=ess_threshold,
        seed=seed,
        progress=progress,
        stop_guard=stop_guard,
    )
    cfg = dataclasses.replace(
        config or SMCConfig(), **{k: v for k, v in knobs.items() if v is not None}
    )
    _check_counts(num_particles=cfg.num_particles, max_new_tokens=cfg.max_new_tokens)
    engine = model if is_vllm_engine(model) else None  # a vllm.LLM: block SMC on vLLM
    if engine is not None:
        model, tokenizer = EngineModel(engine), tokenizer or engine.get_tokenizer()
    eos = eos_ids(model, tokenizer, eos_token_id)
    batch = _prompts(
        tokenizer, prompts, input_ids, attention_mask, pad_token_id, eos, chat, messages
    )
    _check_ids(batch, model)
    method = "csmc" if reference is not None else _method
    if engine is not None:
        q, psi = proposal or LMProposal(), resolve_twist(twist, potential)
        return run_smc_vllm(
            engine, tokenizer, batch, potential, cfg, q, psi, eos, method, reference
        )
    q, model_context = _resolve_proposal(proposal, model)
    return run_smc(
        model,
        tokenizer,
        batch,
        potential,
        cfg,
        proposal=q,
        twist=resolve_twist(twist, potential),
        eos_token_ids=eos,
        method=method,
        model_context=model_context,
        reference=reference,
    )


def importance_generate(model, tokenizer=None, prompts=None, **kwargs) -> SamplingOutput:
    """Importance sampling (SMC that never resamples); ``out.best()`` is best-of-N."""
    kwargs["ess_threshold"] = 0.0
    return smc_generate(model, tokenizer, prompts, _method="importance", **kwargs)


def ancestral_generate(
    model,
    tokenizer=None,
    prompts: str | list[str] | None = None,
    *,
    potential: Potential | None = None,
    num_samples: int = 16,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    **kwargs,
) -> SamplingOutput:
    """Plain ancestral sampling; weights are uniform. ``potential`` is only evaluated
    (``out.log_potential``), never used to weight."""
    _check_counts(num_samples=num_samples)
    cfg = dataclasses.replace(kwargs.pop("config", None) or SMCConfig(), reweight=False)
    kwargs.setdefault("twist", "none")  # nothing is weighted, so nothing to twist
    return smc_generate(
        model,
        tokenizer,
        prompts,
        potential=potential,
        num_particles=num_samples,
        proposal=LMProposal(temperature, top_k, top_p),
        config=cfg,
        _method="ancestral",
        **kwargs,
    )


def beam_generate(
    model,
    tokenizer=None,
    prompts: str | list[str] | None = None,
    *,
    num_beams: int = 4,
    max_new_tokens: int = 32,
    potential: Potential | None = None,
    input_ids: torch.Tensor | None = None,
    attention_mask: torch.Tensor | None = None,
    chat: bool = False,
    messages: list[list[dict]] | None = None,
    eos_token_id: int | list[int] | None = None,
    pad_token_id: int | None = None,
) -> SamplingOutput:
    """Beam search via ``model.generate``: the N beams, uniformly weighted."""
    if is_vllm_engine(model):
        raise ValueError("beam_generate needs a Hugging Face model; vLLM has its own beam search")
    _check_counts(num_beams=num_beams, max_new_tokens=max_new_tokens)
    SMCConfig(num_particles=num_beams, max_new_tokens=max_new_tokens)  # validates
    eos = eos_ids(model, tokenizer, eos_token_id)
    batch = _prompts(
        tokenizer, prompts, input_ids, attention_mask, pad_token_id, eos, chat, messages
    )
    _check_ids(batch, model)
    device = next(model.parameters()).device
    B, P = batch.input_ids.shape
    with torch.inference_mode():
        seq = model.generate(
            input_ids=batch.input_ids.to(device),
            attention_mask=batch.attention_mask.to(device),
            num_beams=num_beams,
            num_return_sequences=num_beams,
            do_sample=False,
            max_new_tokens=max_new_tokens,
            eos_token_id=eos or None,
            pad_token_id=batch.pad_token_id,
        )
    cont = seq[:, P:]  # [B*N, T']
    eos_t = torch.as_tensor(eos, dtype=torch.long, device=cont.device)
    is_eos = torch.isin(cont, eos_t).long()
    first = torch.where(is_eos.any(1), is_eos.argmax(1) + 1, cont.shape[1])
    x = Particles(
        cont,
        first,
        torch.arange(B, device=cont.device).repeat_interleave(num_beams),
        batch.to(cont.device),
        tokenizer,
        eos_t,
        max_new_tokens,
        vocab_size(model),
    )
    texts = x.texts() if tokenizer is not None else [""] * x.num_rows
    log_phi = None if potential is None else potential.complete(x).view(B, num_beams).cpu()
    n = num_beams
    return SamplingOutput(
        method="beam",
        sequences=seq.view(B, n, -1).cpu(),
        prompt_length=P,
        texts=[texts[b * n : (b + 1) * n] for b in range(B)],
        log_weights=torch.full((B, n), -math.log(n), dtype=torch.float64),
        log_weights_unnormalized=torch.zeros(B, n, dtype=torch.float64),
        log_z=None,
        ess=torch.full((B, cont.shape[1]), float(n), dtype=torch.float64),
        resampled=torch.zeros(B, cont.shape[1], dtype=torch.bool),
        log_potential=log_phi,
        num_forward_tokens=B * n * (P + cont.shape[1] - 1),
    )
