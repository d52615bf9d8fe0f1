"""The llmsample command's argument parser: the subcommands and their flags.

llmsample --help
llmsample generate --help

from llmsample.cli.parser import build_parser
args = build_parser().parse_args(["generate", "ROMEO:", "--contains", "love"])
"""

from __future__ import annotations

import argparse

from llmsample.cli.constraints import CONCEPT_BONUS, CONTAINS_BONUS

__all__ = ["DESCRIPTION", "JSON_HELP", "add_model_flags", "build_parser"]

DESCRIPTION = "The ``llmsample`` command line."
JSON_HELP = (
    "machine-readable output (strict JSON: a number that is not finite, such as log_z of "
    'a run whose particles were all rejected, is the string "-inf", "inf" or "nan"; '
    "Python's float() reads it back)"
)


def add_model_flags(p: argparse.ArgumentParser) -> None:
    """--model, --adapter, --device, --seed, --threads and --chat (generate and demo)."""
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
    p.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N (checked up front)")
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


def _add_generate(sub) -> None:
    g = sub.add_parser("generate", help="sample continuations of a prompt")
    g.add_argument("prompt", help="the prompt text (use '\\n' for a newline)")
    add_model_flags(g)
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
        "--twist",
        choices=["auto", "prefix", "none"],
        default="auto",
        help="smc/importance: 'prefix' resamples on the potential's prefix scores (the "
        "--bonus of --contains/--concept; the suffix likelihood of --infill-suffix); 'none' "
        "checks the constraint only on finished continuations, so SMC has nothing to "
        "resample on; 'auto' (default): prefix for the --contains/--concept bonus; the "
        "suffix likelihood twists only under 'prefix' (it scores the suffix for every "
        "particle at every step)",
    )
    g.add_argument(
        "--bonus",
        "--concept-bonus",
        dest="bonus",
        type=float,
        default=None,
        help="the prefix twist of --contains/--concept: log psi = bonus x words (concepts) "
        f"used so far; default {CONTAINS_BONUS:g} for --contains, {CONCEPT_BONUS:g} for "
        "--concept; 0: no twist",
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
    g.add_argument("--show", type=int, default=8, help="how many samples to print (>= 0)")
    g.add_argument("--json", action="store_true", help=JSON_HELP)


def build_parser() -> argparse.ArgumentParser:
    """The parser of ``llmsample``: subcommands generate, demo and models."""
    parser = argparse.ArgumentParser(prog="llmsample", description=DESCRIPTION)
    sub = parser.add_subparsers(dest="command", required=True)
    _add_generate(sub)

    d = sub.add_parser("demo", help="SMC vs plain sampling on a constrained line")
    add_model_flags(d)
    d.add_argument(
        "--particles",
        type=int,
        default=None,
        help="per prompt (default: 256, or 32 on a chat model)",
    )
    d.add_argument("--json", action="store_true", help=JSON_HELP)

    m = sub.add_parser("models", help="list the models known by name")
    m.add_argument("--json", action="store_true", help=JSON_HELP)
    return parser
