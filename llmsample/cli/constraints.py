"""The constraint flags of ``llmsample generate`` turned into a potential and a twist.

    llmsample generate "ROMEO:" --contains love --concept stand --regex "^[^!]*$"
    llmsample generate "ROMEO:" --contains love --bonus 0 --twist none

    from llmsample.cli.constraints import choose_twist, product, text_potentials
    parts = text_potentials(args)          # validated before any model is loaded
    potential = product(parts)             # None, the one part, or their Product
    twist = choose_twist(args, potential)  # 'prefix' or 'none'

Mistakes in the flags (text that is not UTF-8, a bad regex, a negative --bonus, --twist
prefix without prefix scores) raise :class:`~llmsample.cli.common.UsageError`.
"""

from __future__ import annotations

import math

from llmsample.cli.common import UsageError

__all__ = ["CONTAINS_BONUS", "CONCEPT_BONUS", "text_potentials", "product", "choose_twist"]

CONTAINS_BONUS = 3.0  # the demo's: one word of the line found outweighs ~20 particles without
CONCEPT_BONUS = 2.0


def _check_utf8(flag: str, text: str) -> None:
    """Command-line bytes that are not UTF-8 reach Python as lone surrogates (\\udcXX for
    byte XX), which no tokenizer takes."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as err:
        code = ord(text[err.start])
        what = f"byte 0x{code - 0xDC00:02x}" if 0xDC80 <= code <= 0xDCFF else f"U+{code:04X}"
        raise UsageError(
            f"{flag} is not valid UTF-8 text ({what} at character {err.start}); pass UTF-8 "
            "(check the terminal's or the file's encoding)"
        ) from None


def text_potentials(args) -> list:
    """The potentials that need no model, built (and validated) before loading one."""
    from llmsample.potentials.concepts import Concepts
    from llmsample.potentials.text import Contains, Regex

    for flag, values in [
        ("the prompt", [args.prompt]),
        ("--contains", args.contains),
        ("--concept", args.concept),
        ("--regex", [args.regex or ""]),
        ("--infill-suffix", [args.infill_suffix or ""]),
    ]:
        for text in values:
            _check_utf8(flag, text)
    parts = []
    bonus = args.bonus
    if bonus is not None and not (bonus >= 0 and math.isfinite(bonus)):
        raise UsageError(f"--bonus (the twist's prefix_bonus) must be finite and >= 0, got {bonus}")
    try:
        if args.contains:
            b = CONTAINS_BONUS if bonus is None else bonus
            parts.append(Contains(*args.contains, prefix_bonus=b))
        if args.concept:
            b = CONCEPT_BONUS if bonus is None else bonus
            parts.append(Concepts(*args.concept, prefix_bonus=b))
        if args.regex is not None:
            parts.append(Regex(args.regex))
    except ValueError as err:
        raise UsageError(str(err)) from None
    if args.infill_suffix is not None and not args.infill_suffix.strip():
        raise UsageError("--infill-suffix needs non-empty text")
    return parts


def product(parts: list):
    """The potential of all ``parts``: None for none, the part itself for one."""
    from llmsample.potentials.base import Product

    return None if not parts else parts[0] if len(parts) == 1 else Product(*parts)


def choose_twist(args, potential) -> str:
    """--twist resolved as a library run resolves it (:func:`llmsample.twists.resolve_twist`):
    'prefix' when SMC will twist with the potential's prefix scores, else 'none'."""
    from llmsample.twists import PotentialTwist, resolve_twist

    try:
        twist = resolve_twist(args.twist, potential)
    except ValueError:
        raise UsageError(
            "--twist prefix needs a potential with prefix scores: --contains or --concept "
            "(with --bonus > 0) or --infill-suffix; or use --twist none"
        ) from None
    return "prefix" if isinstance(twist, PotentialTwist) else "none"
