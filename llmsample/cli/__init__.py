"""The ``llmsample`` command line.

    llmsample generate "ROMEO:" --contains love --particles 32 --max-new-tokens 24
    llmsample generate "ROMEO:" --method ancestral --temperature 0.8 --json
    llmsample generate "ROMEO:\\n" --contains love --line --twist none   # SMC without a twist
    llmsample demo                      # SMC vs plain sampling on a hard constraint
    llmsample demo --model smollm2-135m-instruct   # the same on a chat model (CommonGen)
    llmsample models                    # the models known by name, and how to install them

Ordinary mistakes (an unknown model, a bad regex, conflicting flags, an impossible
constraint) print one clear line and exit with status 2; no traceback. Notes (a hub
download, a prompt beyond the trained length, a large memory estimate, an SMC run that
never resampled) go to stderr as single lines starting with ``llmsample:``.

This module is :func:`main` (dispatch and exit status); the rest has one module each:
``parser`` (flags), ``common`` (what subcommands share), ``constraints`` (flags to a
potential and twist), ``limits`` (memory and length checks), ``generate``, ``demo``,
``models`` (the subcommands), ``output`` (strict JSON and text).
"""

from __future__ import annotations

import os
import sys
import warnings

from llmsample.cli.common import UsageError, load_for_cli, note, set_threads, use_chat
from llmsample.cli.constraints import CONCEPT_BONUS, CONTAINS_BONUS
from llmsample.cli.generate import run_generate
from llmsample.cli.limits import decode_memory, memory_limit
from llmsample.cli.models import print_models, run_models
from llmsample.cli.output import print_generate, print_json, strict_json
from llmsample.cli.parser import JSON_HELP, build_parser

__all__ = [
    "main",
    # re-exported: importable from llmsample.cli before the split
    "build_parser",
    "set_threads",
    "run_generate",
    "run_models",
    "decode_memory",
    "memory_limit",
    "strict_json",
    "UsageError",
    "note",
    "use_chat",
    "load_for_cli",
    "CONTAINS_BONUS",
    "CONCEPT_BONUS",
    "JSON_HELP",
]


def main(argv: list[str] | None = None) -> int:
    """Run ``llmsample`` with ``argv`` (default: ``sys.argv[1:]``); the exit status."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    args = build_parser().parse_args(argv)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="the potential rejected every particle")
            if args.command != "models":
                set_threads(args)
            if args.command == "generate":
                res = run_generate(args)
                print_json(res) if args.json else print_generate(res)
            elif args.command == "models":
                res = run_models()
                print_json(res) if args.json else print_models(res)
            else:
                from llmsample.cli.demo import print_demo, run_demo

                res = run_demo(args)
                print_json(res) if args.json else print_demo(res)
    except UsageError as err:
        print(f"llmsample: error: {' '.join(str(err).split())}", file=sys.stderr)
        return 2
    except BrokenPipeError:  # e.g. `llmsample generate ... --json | head`
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1
    return 0
