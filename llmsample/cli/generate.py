"""``llmsample generate``: sample continuations of a prompt with one --method.

    llmsample generate "ROMEO:" --contains love --particles 32 --max-new-tokens 24
    llmsample generate "ROMEO:" --method ancestral --temperature 0.8 --json

    from llmsample.cli.generate import run_generate
    res = run_generate(build_parser().parse_args(["generate", "ROMEO:"]))
    res["samples"], res["log_z"], res["ess"]   # the summary that the CLI prints

The flags are checked before the model loads (:mod:`llmsample.cli.constraints`), the
memory and length after (:mod:`llmsample.cli.limits`); then one call of
``smc_generate``, ``importance_generate``, ``ancestral_generate`` or ``beam_generate``.
"""

from __future__ import annotations

import math

from llmsample.cli.common import UsageError, load_for_cli, note, use_chat
from llmsample.cli.constraints import choose_twist, product, text_potentials
from llmsample.cli.limits import check_length, check_memory

__all__ = ["METHODS", "run_generate", "summary"]

# --method: the llmsample function it calls and the keyword that takes --particles there
# (the generate API has no shared name for it: particles, samples, beams)
METHODS: dict[str, tuple[str, str]] = {
    "smc": ("smc_generate", "num_particles"),
    "importance": ("importance_generate", "num_particles"),
    "ancestral": ("ancestral_generate", "num_samples"),
    "beam": ("beam_generate", "num_beams"),
}


def _check_flags(args) -> None:
    """The flag mistakes that need neither a model nor a potential."""
    if args.method == "beam" and args.temperature != 1.0:
        raise UsageError("--temperature has no effect with --method beam; drop one of them")
    if args.method in ("beam", "ancestral") and args.twist != "auto":
        raise UsageError(f"--twist has no effect with --method {args.method}; drop one of them")
    if not (args.temperature > 0 and math.isfinite(args.temperature)):
        raise UsageError(f"--temperature must be a finite number > 0, got {args.temperature}")
    if args.show < 0:
        raise UsageError(f"--show must be >= 0 (how many samples to print), got {args.show}")


def _method_kwargs(args, model, twist: str) -> dict:
    """The keywords of --method's function beyond the prompt, potential and lengths."""
    kwargs = {METHODS[args.method][1]: args.particles}
    if args.method == "beam":
        return kwargs  # deterministic: no seed, temperature or progress bar
    kwargs.update(seed=args.seed, progress=True)
    if args.method == "ancestral":
        kwargs.update(temperature=args.temperature)
    else:  # smc, importance
        from llmsample.proposals import LMProposal, ModelProposal

        adapter = args.adapter is not None  # the adapter is the proposal
        proposal = (
            ModelProposal(model, args.temperature) if adapter else LMProposal(args.temperature)
        )
        kwargs.update(twist=twist, proposal=proposal)
    return kwargs


def run_generate(args) -> dict:
    """Check the flags, load the model, sample; the summary (see :func:`summary`)."""
    import llmsample
    from llmsample.hf.prompts import encode_prompts, line_end_ids
    from llmsample.potentials.model import SuffixLikelihood

    _check_flags(args)
    parts = text_potentials(args)
    try:
        llmsample.SMCConfig(num_particles=args.particles, max_new_tokens=args.max_new_tokens)
    except ValueError as err:
        raise UsageError(str(err)) from None
    model, tok = load_for_cli(args)
    scorer = model
    if args.adapter is not None:  # potentials score with the base model, adapter off
        from llmsample.gfn import BaseView

        scorer = BaseView(model)
    if args.infill_suffix is not None:
        suffix = args.infill_suffix.replace("\\n", "\n")
        parts.append(SuffixLikelihood(scorer, tok, suffix, as_twist=args.twist == "prefix"))
    potential = product(parts)
    twist = choose_twist(args, potential)
    prompt = args.prompt.replace("\\n", "\n")
    eos = line_end_ids(tok) if args.line else None
    chat = use_chat(args, tok)
    try:
        prompt_tokens = encode_prompts(tok, [prompt], chat=chat).input_ids.shape[1]
    except ValueError as err:
        raise UsageError(str(err)) from None
    check_memory(args, model, prompt_tokens)
    check_length(args, model, tok, prompt_tokens)
    generate = getattr(llmsample, METHODS[args.method][0])
    try:
        out = generate(
            model,
            tok,
            [prompt],
            potential=potential,
            max_new_tokens=args.max_new_tokens,
            eos_token_id=eos,
            chat=chat,
            **_method_kwargs(args, model, twist),
        )
    except ValueError as err:
        raise UsageError(str(err)) from None
    rejected_all = out.log_z is not None and math.isinf(float(out.log_z[0]))
    if args.method == "smc" and potential is not None and not rejected_all:
        if not out.resampling_steps[0]:  # (all rejected is reported with log Z)
            _never_resampled_hint(twist)
    return summary(out, args.show, twist if args.method in ("smc", "importance") else None)


def _never_resampled_hint(twist: str) -> None:
    if twist == "none":
        note(
            "hint: SMC never resampled: without a prefix twist the constraint is checked only "
            "on finished continuations, so every particle kept the same weight until then "
            "(this was importance sampling); --twist prefix resamples on prefix scores (--bonus "
            "> 0 for --contains/--concept; --infill-suffix twists only under --twist prefix)"
        )
    else:
        note(
            "hint: SMC never resampled: the prefix twist never made the weights uneven "
            "enough (ESS stayed above half the particles); try a larger --bonus"
        )


def summary(out, show: int, twist: str | None) -> dict:
    """What ``llmsample generate`` reports of a one-prompt :class:`SamplingOutput`: the
    method and twist, log Z, the constraint rate, the ESS trace, the resampling steps, the
    forward tokens, and the ``show`` heaviest samples with their normalized weights."""
    lw = out.log_weights[0]
    order = lw.argsort(descending=True).tolist()
    log_z = None if out.log_z is None else float(out.log_z[0])
    sat = None
    if out.log_potential is not None:
        sat = float((out.log_potential[0] > -math.inf).double().mean())
    return dict(
        method=out.method,
        twist=twist,
        log_z=log_z,
        constraint_rate=sat,
        ess=[round(float(e), 2) for e in out.ess[0]],
        resampling_steps=out.resampling_steps[0],
        forward_tokens=out.num_forward_tokens,
        samples=[dict(text=out.texts[0][i], weight=math.exp(lw[i])) for i in order[:show]],
    )
