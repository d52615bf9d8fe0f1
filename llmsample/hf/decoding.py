"""SMC as a decoding method of ``model.generate`` (transformers' ``custom_generate`` hook).

    smc = functools.partial(llmsample.smc_decoding, tokenizer=tok)  # text potentials need it
    ids = model.generate(**inputs, custom_generate=smc, potential=Contains("love"),
                         num_particles=32, max_new_tokens=40)      # LongTensor, like generate
    out = model.generate(**inputs, custom_generate=smc, potential=Contains("love"),
                         do_sample=True, num_return_sequences=4, return_dict_in_generate=True)
    out.sequences, out.log_weights, out.log_z, out.ess, out.particles
    model.generate(**inputs, custom_generate="hub/smc", trust_remote_code=True,  # folder form
                   tokenizer=tok, potential=Contains("love"))

Both run :func:`~llmsample.smc_generate` (one engine). ``generate``'s settings under SMC:

- **Target** sigma ∝ p·phi over continuations ended by an EOS id (a list too), a stopping
  criterion (``stop_strings``, ``stopping_criteria``: the particle ends where it fires) or
  ``max_new_tokens``. ``potential=None`` is phi = 1.
- **Proposal**: what ``generate`` would sample from: the processors it built from its config
  (``repetition_penalty``, ``bad_words_ids``, ...; with ``do_sample=True`` the warpers
  ``temperature``/``top_k``/``top_p``/...) and the user's ``logits_processor``, in its order,
  applied once (the engine's own tempering stays off); log q is their softmax, so the weights
  are exact. Processors see log-probs rather than raw logits: the same for shift-invariant
  ones; ``repetition_penalty`` thus always lowers a repeated token. Processors that remove
  tokens (top-k, top-p, bad words) restrict the target to what q can produce.
- ``do_sample=False`` is not greedy (a point mass has no weight): generate builds no warpers.
- ``num_return_sequences`` = k draws per prompt resampled by weight from the ``num_particles``
  particles (``select="best"``: the k heaviest).
- A ``streamer`` gets the final draws once, then ``end()``. With ``return_dict_in_generate``,
  the output adds the weights, ``log_z``, ESS and particles (:class:`SMCDecoderOutput`).

Allowed processors (:data:`EXACT_PROCESSORS`, or marked ``llmsample_stateless = True``) are
deterministic and stateless (resampling reorders rows between calls); others raise. transformers
(5.25) passes a callable only the keywords its signature adds to ``_sample``'s: ``tokenizer=``
is lost (bind it with ``functools.partial``, or use the folder form), and ``streamer`` and
``assistant_model`` are read back from the calling ``generate``: honoured or rejected.
"""

from __future__ import annotations

import copy
import functools
import inspect
import math
import sys

import torch
from torch import Tensor

from llmsample.generate import importance_generate, smc_generate
from llmsample.potentials.base import Potential
from llmsample.proposals import LMProposal
from llmsample.twists import resolve_twist

__all__ = ["smc_decoding", "importance_decoding", "folder_generate", "EXACT_PROCESSORS"]
__all__ += ["SMCDecoderOutput"]  # noqa: F822 (module __getattr__: built on first use)

EXACT_PROCESSORS = (  # names in transformers.generation.logits_process
    "TemperatureLogitsWarper TopKLogitsWarper TopPLogitsWarper MinPLogitsWarper TopHLogitsWarper "
    "TypicalLogitsWarper EpsilonLogitsWarper EtaLogitsWarper RepetitionPenaltyLogitsProcessor "
    "NoRepeatNGramLogitsProcessor NoBadWordsLogitsProcessor SequenceBiasLogitsProcessor "
    "MinLengthLogitsProcessor MinNewTokensLengthLogitsProcessor PrefixConstrainedLogitsProcessor "
    "ForcedBOSTokenLogitsProcessor ForcedEOSTokenLogitsProcessor SuppressTokensLogitsProcessor "
    "SuppressTokensAtBeginLogitsProcessor ExponentialDecayLengthPenalty "
    "InfNanRemoveLogitsProcessor LogitNormalization"
).split()
_BEAM = dict(num_beam_groups=1, diversity_penalty=0.0, length_penalty=1.0, early_stopping=False)
_BEAM |= dict(constraints=None, force_words_ids=None)  # beam-only options, at their defaults
_MODEL_KWARGS = {"attention_mask", "position_ids", "cache", "past_key_values", "use_cache"}
_MODEL_KWARGS |= {"logits_to_keep", "cache_position"}
_OUTPUTS = ("output_scores", "output_logits", "output_attentions", "output_hidden_states")


def _generate_locals() -> dict:
    """Locals of the ``GenerationMixin.generate`` call that runs us ({} when called directly)."""
    from transformers.generation.utils import GenerationMixin

    code, frame = inspect.unwrap(GenerationMixin.generate).__code__, sys._getframe(1)
    while frame is not None and frame.f_code is not code:
        frame = frame.f_back
    return {} if frame is None else frame.f_locals


def _check(gc, model_kwargs: dict, caller: dict, synced_gpus, k: int, N: int, select: str):
    if (gc.num_beams or 1) > 1:
        raise ValueError(f"num_beams={gc.num_beams} is beam search; SMC has particles: drop it")
    for name, default in _BEAM.items():
        if getattr(gc, name, None) not in (None, default):
            raise ValueError(f"`{name}` is a beam-search option; SMC has no beams: drop it")
    assisted = caller.get("assistant_model") is not None and "assistant_model"
    for name in ("prompt_lookup_num_tokens", "assistant_early_exit"):
        assisted = assisted or (getattr(gc, name, None) is not None and name)
    if assisted:
        raise ValueError(f"`{assisted}` asks for assisted decoding, which SMC does not do: drop it")
    if synced_gpus or caller.get("synced_gpus"):
        raise ValueError("`synced_gpus=True` is not supported by SMC decoding")
    if model_kwargs.get("use_cache") is False:
        raise ValueError("use_cache=False: SMC needs the KV cache to resample particles")
    cache = model_kwargs.get("cache", model_kwargs.get("past_key_values"))
    if cache is not None and cache.get_seq_length() > 0:
        raise ValueError("a pre-filled `cache`/`past_key_values` is not supported: pass the prompt")
    unknown = sorted(set(model_kwargs) - _MODEL_KWARGS)
    unknown += [n for n in _OUTPUTS if getattr(gc, n, False)]
    if unknown:
        raise ValueError(f"SMC decoding takes token prompts and returns tokens: drop {unknown}")
    if select not in ("sample", "best"):
        raise ValueError(f"select must be 'sample' or 'best', got {select!r}")
    if select == "best" and k > N:
        raise ValueError(
            f"num_return_sequences={k} > num_particles={N} with select='best' (the heaviest "
            "particles, no resampling): raise num_particles or use select='sample'"
        )


def _processors(logits_processor, k: int, N: int, B: int) -> list:
    """The processors, checked against the allow-list; per-row state re-laid out for B*N rows."""
    out = []
    for proc in logits_processor or []:
        name = type(proc).__name__
        if name not in EXACT_PROCESSORS and not getattr(proc, "llmsample_stateless", False):
            hint = "ClassifierFreeGuidance" in name and "drop `guidance_scale`"
            hint = hint or "Watermark" in name and "drop `watermarking_config`"
            hint = hint or f"if it is, set `{name}.llmsample_stateless = True`"
            raise ValueError(
                f"logits_processor {name} is not supported by SMC decoding (it must be stateless "
                f"and deterministic, rows are resampled between calls): {hint}"
            )
        if name == "PrefixConstrainedLogitsProcessor":
            proc = copy.copy(proc)
            proc._num_beams = N
        ignore = getattr(proc, "prompt_ignore_length", None)
        if name == "RepetitionPenaltyLogitsProcessor" and isinstance(ignore, Tensor):
            proc = copy.copy(proc)
            proc.prompt_ignore_length = ignore.view(B, k)[:, 0].repeat_interleave(N)
        out.append(proc)
    return out


def _criteria(stopping_criteria, gc, stop_strings, tokenizer, P: int):
    """(max_new_tokens, EOS ids, criteria that end particles where they fire)."""
    from transformers.generation import stopping_criteria as sc

    crit = list(stopping_criteria or [])
    if stop_strings:
        if tokenizer is None:
            raise ValueError(
                "`stop_strings` need the tokenizer: custom_generate=functools.partial("
                "llmsample.smc_decoding, tokenizer=tok)"
            )
        crit.append(sc.StopStringCriteria(tokenizer, stop_strings))
    T = gc.max_new_tokens if gc.max_new_tokens is not None else (gc.max_length or 0) - P
    eos = gc.eos_token_id
    eos = [] if eos is None else [eos] if isinstance(eos, int) else [int(e) for e in eos]
    extra = []
    for c in crit:
        if isinstance(c, sc.MaxLengthCriteria):
            T = min(T, c.max_length - P)
        elif isinstance(c, sc.EosTokenCriteria):
            eos += [e for e in c.eos_token_id.flatten().tolist() if e not in eos]
        elif isinstance(c, (sc.MaxTimeCriteria, sc.ConfidenceCriteria)):
            raise ValueError(
                f"stopping criterion {type(c).__name__} (from `max_time` or assisted decoding) "
                "does not depend on the text alone, so it cannot define a target: drop it"
            )
        else:
            extra.append(c)
    if extra and not eos:
        raise ValueError("stopping criteria end particles with an EOS: set `eos_token_id`")
    if T < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {T} (`max_length`/`max_new_tokens`)")
    return T, eos, extra


class _Proposal(LMProposal):
    """What ``generate`` samples from: ``processors`` on the log-probs. A row a stopping
    criterion ends gets one forced EOS (q(EOS) = 1), whose log p the potential takes back."""

    def __init__(self, processors, criteria, prompt_ids: Tensor, eos: list[int]):
        super().__init__(logits_hook=self._process if processors else None)
        self.processors, self.criteria = processors, criteria
        self.prompt_ids, self.eos = prompt_ids, eos

    def start(self, prompts, num_particles, base_vocab):
        device, R = prompts.input_ids.device, prompts.input_ids.shape[0] * num_particles
        self.rows_ids = self.prompt_ids.to(device).repeat_interleave(num_particles, 0)
        self.forced = torch.zeros(R, dtype=torch.bool, device=device)
        self.eos_logp = torch.zeros(R, dtype=torch.float64, device=device)

    def reorder(self, index):
        self.rows_ids = self.rows_ids[index]
        self.forced, self.eos_logp = self.forced[index], self.eos_logp[index]

    def _ids(self, x) -> Tensor:  # [R, P + t], laid out as generate's input_ids
        return torch.cat([self.rows_ids, x.tokens], dim=1)

    def _process(self, logp: Tensor, x) -> Tensor:
        ids, scores = self._ids(x), logp.clone()  # processors must never touch the engine's p
        for proc in self.processors:
            scores = proc(ids, scores)
        return scores

    def log_probs(self, base_logp, x, twist_scores):
        logq = super().log_probs(base_logp, x, twist_scores)
        if not self.criteria or x.step == 0:
            return logq
        ids, device = self._ids(x), logq.device  # criteria see generate's input_ids, no scores
        hit = [torch.as_tensor(c(ids, None), device=device).bool() for c in self.criteria]
        running = (x.lengths == x.step) & ~torch.isin(x.tokens[:, -1], x.eos_token_ids)
        force = torch.stack(torch.broadcast_tensors(*hit)).any(0) & running
        onehot = torch.full_like(logq, -math.inf)
        onehot[:, self.eos[0]] = 0.0
        self.eos_logp = torch.where(force, base_logp[:, self.eos[0]].double(), self.eos_logp)
        self.forced = self.forced | force
        return torch.where(force[:, None], onehot, logq)


class _StopCorrected(Potential):
    """phi of a row ended by a stopping criterion, divided by p(forced EOS): its weight is
    then p(x) phi(x) / q(x) of the stopped text. Everything else is the user's potential."""

    def __init__(self, inner: Potential | None, proposal: _Proposal):
        self.inner, self.proposal = inner, proposal
        self.has_prefix = bool(inner is not None and inner.has_prefix)

    def complete(self, x):
        phi = self.inner.complete(x) if self.inner is not None else torch.zeros(x.num_rows)
        q, rows = self.proposal, x.rows.to(self.proposal.forced.device)
        back = torch.where(q.forced[rows], q.eos_logp[rows], 0.0)
        return phi.to(back.device, torch.float64) - back

    def prefix(self, x):
        return (self.inner or super()).prefix(x)

    def token_scores(self, x):
        return (self.inner or super()).token_scores(x)

    @property
    def forward_tokens(self) -> int:
        return getattr(self.inner, "forward_tokens", 0)


@functools.cache
def _output_class():
    from dataclasses import dataclass

    from transformers.generation.utils import GenerateDecoderOnlyOutput

    @dataclass
    class SMCDecoderOutput(GenerateDecoderOnlyOutput):
        """generate's output, plus ``log_weights`` [B, N], ``log_z`` [B], ``ess`` [B, steps],
        ``particles`` [B, N, len], ``draw_indices`` [B, k] and the SamplingOutput ``sampling``."""

        log_weights: Tensor | None = None
        log_z: Tensor | None = None
        ess: Tensor | None = None
        particles: Tensor | None = None
        draw_indices: Tensor | None = None
        sampling: object = None

    SMCDecoderOutput.__module__, SMCDecoderOutput.__qualname__ = __name__, "SMCDecoderOutput"
    return SMCDecoderOutput


def __getattr__(name):  # the output class imports transformers: built on first use
    if name == "SMCDecoderOutput":
        return _output_class()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _decode(method: str, a: dict):
    """Run ``method`` on the arguments ``a`` of :func:`smc_decoding` (by name)."""
    from transformers import GenerationConfig

    caller, input_ids, config = _generate_locals(), a["input_ids"], a.get("config")
    gc, model_kwargs = a["generation_config"] or GenerationConfig(), a.get("model_kwargs") or {}
    k, N = gc.num_return_sequences or 1, a["num_particles"] or getattr(config, "num_particles", 16)
    _check(gc, model_kwargs, caller, a["synced_gpus"], k, N, a["select"])
    groups = input_ids.shape[0] % k == 0 and input_ids.view(-1, k, input_ids.shape[1])
    if groups is False or not (groups == input_ids[::k, None]).all():
        raise ValueError(
            f"input_ids must hold each prompt num_return_sequences={k} times in a row, as "
            "model.generate passes them: call this through model.generate(custom_generate=...)"
        )
    ids, mask = input_ids[::k], model_kwargs.get("attention_mask")
    procs = _processors(a["logits_processor"], k, N, ids.shape[0])
    tok, potential = a["tokenizer"], a["potential"]
    T, eos, crit = _criteria(a["stopping_criteria"], gc, a["stop_strings"], tok, ids.shape[1])
    pad = gc.pad_token_id if gc.pad_token_id is not None else (eos[0] if eos else 0)
    q = _Proposal(procs, crit, ids, eos)
    knobs = {n: a.get(n) for n in ("num_particles", "seed", "progress", "stop_guard")}
    if method == "smc":  # importance_generate never resamples
        knobs.update(resampling=a.get("resampling"), ess_threshold=a.get("ess_threshold"))
    knobs.update(proposal=q, max_new_tokens=T, eos_token_id=eos, pad_token_id=pad, config=config)
    knobs.update(input_ids=ids, attention_mask=None if mask is None else mask[::k])
    knobs["twist"] = resolve_twist(a["twist"], potential)  # the user's phi, not phi/p(EOS)
    phi = _StopCorrected(potential, q) if crit else potential
    try:
        run = importance_generate if method == "importance" else smc_generate
        out = run(a["model"], tok, potential=phi, **knobs)
    except ValueError as err:
        if tok is None and "needs a tokenizer" in str(err):
            raise ValueError(
                f"{err}. transformers does not pass generate's `tokenizer=` on to a "
                "custom_generate callable: use custom_generate=functools.partial("
                f"llmsample.{method}_decoding, tokenizer=tok), or the folder form"
            ) from err
        raise
    return _assemble(out, q, crit, eos, pad, ids, k, gc, caller, a)


def _assemble(out, q, crit, eos, pad, ids, k, gc, caller, a):
    """generate's output from the run: k draws per prompt, padded, trimmed like generate's."""
    cont = out.continuations.clone()  # [B, N, T'] on the CPU
    (B, n), P = out.log_weights.shape, ids.shape[1]
    is_eos = torch.isin(cont, torch.tensor(eos, dtype=torch.long))
    length = torch.where(is_eos.any(-1), is_eos.long().argmax(-1) + 1, cont.shape[-1])
    if crit:  # the forced EOS is not part of the text: pad it, as generate leaves it
        forced = q.forced.view(B, n).cpu()
        last = (length - 1).clamp(min=0)[..., None]
        cont.scatter_(-1, last, torch.where(forced[..., None], pad, cont.gather(-1, last)))
        length = length - forced.long()
    particles = torch.cat([ids.cpu()[:, None].expand(B, n, P), cont], dim=-1)
    lw = out.log_weights
    if a["select"] == "best":
        draws = lw.topk(k, dim=1).indices
    else:
        dead = torch.isinf(lw).all(dim=1, keepdim=True)  # warned by the engine: log_z = -inf
        w = torch.where(dead, 0.0, lw.exp()).float() + dead.float()  # dead: uniform draws
        gen = None if a["seed"] is None else torch.Generator().manual_seed(a["seed"] + 7919)
        draws = torch.multinomial(w, k, replacement=True, generator=gen)
    width = P + int(length.gather(1, draws).max())
    seqs = particles.gather(1, draws[..., None].expand(B, k, particles.shape[-1]))
    seqs = seqs.reshape(B * k, -1)[:, :width].to(a["input_ids"].device)
    streamer = a["streamer"] if a["streamer"] is not None else caller.get("streamer")
    if streamer is not None:
        if caller.get("streamer") is None:
            streamer.put(a["input_ids"].cpu())  # generate puts the prompt itself when it has it
        streamer.put(seqs[:, P:].cpu())
        streamer.end()
    if not gc.return_dict_in_generate:
        return seqs
    run = dict(log_weights=lw, log_z=out.log_z, ess=out.ess, particles=particles, sampling=out)
    return _output_class()(sequences=seqs, draw_indices=draws, **run)


def smc_decoding(
    model,
    input_ids: Tensor,
    logits_processor=None,
    stopping_criteria=None,
    generation_config=None,
    synced_gpus: bool = False,
    streamer=None,
    *,
    potential: Potential | None = None,
    num_particles: int | None = None,
    twist="auto",
    tokenizer=None,
    resampling: str | None = None,
    ess_threshold: float | None = None,
    seed: int | None = None,
    progress: bool | None = None,
    stop_guard: bool | None = None,
    config=None,
    stop_strings: str | list[str] | None = None,
    select: str = "sample",
    **model_kwargs,
):
    """SMC for ``model.generate(custom_generate=smc_decoding, ...)`` (module docstring). The
    keyword-only arguments mean what they mean for :func:`~llmsample.smc_generate`;
    ``num_particles`` (N) is not ``num_return_sequences`` (draws per prompt). ``stop_strings``
    is taken here, so that transformers does not demand a tokenizer it would not pass on."""
    return _decode("smc", locals())


def importance_decoding(*args, **kwargs):
    """Importance sampling (SMC that never resamples) for ``model.generate``; with
    ``select="best"`` and ``num_return_sequences=1`` it is best-of-N. Same arguments as
    :func:`smc_decoding` but ``resampling``/``ess_threshold``."""
    bound = _IMPORTANCE_SIGNATURE.bind(*args, **kwargs)
    bound.apply_defaults()
    return _decode("importance", bound.arguments)


_params = inspect.signature(smc_decoding).parameters.values()
_params = [p for p in _params if p.name not in ("resampling", "ess_threshold")]
_IMPORTANCE_SIGNATURE = inspect.Signature(_params)
importance_decoding.__signature__ = _IMPORTANCE_SIGNATURE  # what generate reads

_DECODERS = {"smc": smc_decoding, "importance": importance_decoding}


def folder_generate(model, *args, decoding: str = "smc", **kwargs):
    """``hub/smc/custom_generate/generate.py``: gets every argument of ``generate`` and runs
    :func:`smc_decoding` (or ``decoding="importance"``) with the tokenizer and streamer."""
    if decoding not in _DECODERS:
        raise ValueError(f"decoding must be one of {sorted(_DECODERS)}, got {decoding!r}")
    if kwargs.pop("assistant_model", None) is not None:
        raise ValueError("`assistant_model` asks for assisted decoding, which SMC does not do")
    bound = dict(tokenizer=kwargs.pop("tokenizer", None), streamer=kwargs.pop("streamer", None))
    fn = functools.partial(_DECODERS[decoding], **bound)
    return model.generate(*args, custom_generate=fn, **kwargs)
