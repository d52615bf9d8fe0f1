"""The ``llmsample`` command line.

    llmsample generate "ROMEO:" --contains love --particles 32 --max-new-tokens 24
    llmsample generate "ROMEO:" --method ancestral --temperature 0.8 --json
    llmsample demo                      # SMC vs plain sampling on a hard constraint
    llmsample demo --model smollm2-135m-instruct   # the same on a chat model (CommonGen)
    llmsample models                    # the models known by name, and how to install them

Ordinary mistakes (an unknown model, a bad regex, conflicting flags, an impossible
constraint) print one clear line and exit with status 2; no traceback.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import warnings

__all__ = ["main"]


class UsageError(Exception):
    """A user mistake: printed as one line, exit status 2."""


def _add_model_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--model",
        default="shakespeare-tiny",
        help="a model name (see `llmsample models`), a local folder or a hub id",
    )
    p.add_argument(
        "--adapter",
        default=None,
        help="a peft adapter folder (e.g. a GFlowNet policy): smc/importance use it as the "
        "proposal with the base model as target; ancestral samples it",
    )
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--seed", type=int, default=0, help="random seed")
    p.add_argument(
        "--threads",
        type=int,
        default=None,
        help="CPU threads for torch (default: $OMP_NUM_THREADS if set, else half the cores; "
        "more threads than free cores slows decoding many-fold)",
    )
    p.add_argument(
        "--chat",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="send the prompt as a user message through the tokenizer's chat template "
        "(default: on when the tokenizer has a chat template, e.g. smollm2-135m-instruct)",
    )


def set_threads(args) -> int:
    """Pick torch's CPU thread count deliberately (see --threads) and return it."""
    import torch

    n = args.threads
    if n is None:
        env = os.environ.get("OMP_NUM_THREADS", "")
        n = int(env) if env.isdigit() and int(env) > 0 else max(1, (os.cpu_count() or 2) // 2)
    if n < 1:
        raise UsageError(f"--threads must be >= 1, got {n}")
    torch.set_num_threads(n)
    return n


def use_chat(args, tokenizer) -> bool:
    """--chat / --no-chat, or (by default) whether the tokenizer has a chat template."""
    has_template = getattr(tokenizer, "chat_template", None) is not None
    if args.chat and not has_template:
        raise UsageError(
            f"--chat: the tokenizer of {args.model!r} has no chat template; drop --chat"
        )
    return has_template if args.chat is None else args.chat


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="llmsample", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)

    g = sub.add_parser("generate", help="sample continuations of a prompt")
    g.add_argument("prompt", help="the prompt text (use '\\n' for a newline)")
    _add_model_flags(g)
    g.add_argument("--method", choices=["smc", "ancestral", "importance", "beam"], default="smc")
    g.add_argument("--particles", type=int, default=16, help="particles / samples / beams")
    g.add_argument("--max-new-tokens", type=int, default=32)
    g.add_argument(
        "--contains",
        action="append",
        default=[],
        metavar="WORD",
        help="the continuation must contain WORD (repeatable)",
    )
    g.add_argument(
        "--concept",
        action="append",
        default=[],
        metavar="WORD",
        help="the continuation must use WORD in some inflected form (repeatable; 'stand' is "
        "met by 'stood'); SMC resamples towards replies that already use more of them",
    )
    g.add_argument(
        "--concept-bonus",
        type=float,
        default=2.0,
        help="the --concept twist: log psi = bonus x concepts used so far (0: no twist)",
    )
    g.add_argument("--regex", default=None, help="the continuation must match this regex")
    g.add_argument(
        "--infill-suffix",
        default=None,
        metavar="TEXT",
        help="weight by the likelihood of TEXT following the continuation",
    )
    g.add_argument(
        "--temperature",
        type=float,
        default=1.0,
        help="proposal temperature (SMC/importance weights correct for it)",
    )
    g.add_argument("--line", action="store_true", help="stop each continuation at a newline")
    g.add_argument("--show", type=int, default=8, help="how many samples to print")
    g.add_argument("--json", action="store_true", help="machine-readable output")

    d = sub.add_parser("demo", help="SMC vs plain sampling on a constrained line")
    _add_model_flags(d)
    d.add_argument(
        "--particles",
        type=int,
        default=None,
        help="per prompt (default: 256, or 32 on a chat model)",
    )
    d.add_argument("--json", action="store_true", help="machine-readable output")

    m = sub.add_parser("models", help="list the models known by name")
    m.add_argument("--json", action="store_true", help="machine-readable output")
    return parser


def run_models() -> list[dict]:
    """The embedded and named models: whether each is installed and converted."""
    from llmsample.loading import DEFAULT_MODEL, EMBEDDED
    from llmsample.named_models import NAMED, list_models

    rows = [
        dict(
            name=name,
            description="embedded in the package" + (" (default)" * (name == DEFAULT_MODEL)),
            installed=True,
            ready=path.exists(),
            path=str(path),
            install=None,
        )
        for name, path in EMBEDDED.items()
    ]
    for r in list_models():
        rows.append(
            dict(
                name=r.name,
                description=r.description,
                installed=r.installed,
                ready=r.cached,
                path=str(r.path),
                install=None if r.installed else NAMED[r.name].install,
            )
        )
    return rows


def _print_models(rows: list[dict]) -> None:
    for r in rows:
        state = "ready" if r["ready"] else "converted on first use" if r["installed"] else ""
        print(f"{r['name']:24s} {r['description']}")
        print(f"{'':24s} {state or 'not installed: ' + r['install']}   {r['path']}")


def _text_potentials(args) -> list:
    """The potentials that need no model, built (and validated) before loading one."""
    from llmsample.concepts import Concepts
    from llmsample.potentials import Contains, Regex

    parts = []
    try:
        if args.contains:
            parts.append(Contains(*args.contains))
        if args.concept:
            parts.append(Concepts(*args.concept, prefix_bonus=args.concept_bonus))
        if args.regex is not None:
            parts.append(Regex(args.regex))
    except ValueError as err:
        raise UsageError(str(err)) from None
    if args.infill_suffix is not None and not args.infill_suffix.strip():
        raise UsageError("--infill-suffix needs non-empty text")
    return parts


def _product(parts: list):
    from llmsample.potentials import Product

    return None if not parts else parts[0] if len(parts) == 1 else Product(*parts)


def load_for_cli(args):
    """load_model from the flags; a failure becomes a one-line UsageError."""
    from transformers.utils import logging as hf_logging

    import llmsample

    hf_logging.disable_progress_bar()  # keep the terminal for our own output
    try:
        return llmsample.load_model(args.model, adapter=args.adapter, device=args.device)
    except (ValueError, FileNotFoundError) as err:
        raise UsageError(str(err)) from None


def run_generate(args) -> dict:
    import llmsample
    from llmsample.potentials import SuffixLikelihood
    from llmsample.prompts import line_end_ids
    from llmsample.proposals import LMProposal, ModelProposal

    if args.method == "beam" and args.temperature != 1.0:
        raise UsageError("--temperature has no effect with --method beam; drop one of them")
    parts = _text_potentials(args)
    try:
        llmsample.SMCConfig(num_particles=args.particles, max_new_tokens=args.max_new_tokens)
        LMProposal(args.temperature)
    except ValueError as err:
        raise UsageError(str(err)) from None
    model, tok = load_for_cli(args)
    scorer = model
    if args.adapter is not None:  # potentials score with the base model, adapter off
        from llmsample.gfn import BaseView

        scorer = BaseView(model)
    if args.infill_suffix is not None:
        parts.append(SuffixLikelihood(scorer, tok, args.infill_suffix.replace("\\n", "\n")))
    potential = _product(parts)
    prompt = args.prompt.replace("\\n", "\n")
    eos = line_end_ids(tok) if args.line else None
    common = dict(max_new_tokens=args.max_new_tokens, eos_token_id=eos, chat=use_chat(args, tok))
    try:
        if args.method == "beam":
            out = llmsample.beam_generate(
                model, tok, [prompt], num_beams=args.particles, potential=potential, **common
            )
        elif args.method == "ancestral":
            out = llmsample.ancestral_generate(
                model,
                tok,
                [prompt],
                num_samples=args.particles,
                temperature=args.temperature,
                potential=potential,
                seed=args.seed,
                progress=True,
                **common,
            )
        else:
            fn = llmsample.smc_generate if args.method == "smc" else llmsample.importance_generate
            out = fn(
                model,
                tok,
                [prompt],
                potential=potential,
                twist="prefix" if potential is not None and potential.has_prefix else "none",
                num_particles=args.particles,
                proposal=ModelProposal(model, args.temperature)
                if args.adapter is not None
                else LMProposal(args.temperature),
                seed=args.seed,
                progress=True,
                **common,
            )
    except ValueError as err:
        raise UsageError(str(err)) from None
    return _summary(out, args.show)


def _summary(out, show: int) -> dict:
    lw = out.log_weights[0]
    order = lw.argsort(descending=True).tolist()
    log_z = None if out.log_z is None else float(out.log_z[0])
    sat = None
    if out.log_potential is not None:
        sat = float((out.log_potential[0] > -math.inf).double().mean())
    return dict(
        method=out.method,
        log_z=log_z,
        constraint_rate=sat,
        ess=[round(float(e), 2) for e in out.ess[0]],
        resampling_steps=out.resampling_steps[0],
        forward_tokens=out.num_forward_tokens,
        samples=[dict(text=out.texts[0][i], weight=math.exp(lw[i])) for i in order[:show]],
    )


def _print_generate(res: dict) -> None:
    print(f"method: {res['method']}")
    for s in res["samples"]:
        print(f"  w={s['weight']:.3f}  {s['text']!r}")
    if res["log_z"] is not None:
        z = res["log_z"]
        print(
            f"log Z: {z:.3f}"
            + ("  (no particle satisfied the constraint)" if z == -math.inf else "")
        )
    if res["constraint_rate"] is not None:
        print(f"constraint satisfied by {res['constraint_rate']:.0%} of particles")
    print("ESS trace: " + " ".join(f"{e:.1f}" for e in res["ess"]))
    print(
        f"resampled at steps: {res['resampling_steps']}   forward tokens: {res['forward_tokens']}"
    )


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    args = build_parser().parse_args(argv)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="the potential rejected every particle")
            if args.command != "models":
                set_threads(args)
            if args.command == "generate":
                res = run_generate(args)
                print(json.dumps(res, indent=2)) if args.json else _print_generate(res)
            elif args.command == "models":
                res = run_models()
                print(json.dumps(res, indent=2)) if args.json else _print_models(res)
            else:
                from llmsample.demo import print_demo, run_demo

                res = run_demo(args)
                print(json.dumps(res, indent=2)) if args.json else print_demo(res)
    except UsageError as err:
        print(f"llmsample: error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
