"""CommonGen (Lin et al., Findings of EMNLP 2020; MIT, USC INK Research Lab), shipped.

The v1.0 dev (993 concept sets) and train (27,069) splits live in
``llmsample/data/files/commongen/`` (see the README there), so this works offline::

    from llmsample.data.commongen import load_commongen, commongen_prompt
    dev = load_commongen("dev")                 # a datasets.Dataset
    dev[0]["concepts"]    # ['field_N', 'look_V', 'stand_V'] (POS-tagged: _N noun, _V verb)
    dev[0]["words"]       # ['field', 'look', 'stand']
    dev[0]["references"]  # the human reference sentences
    commongen_prompt(dev[0]["words"])  # 'Make a sentence with the words field, look, stand.'
    is_one_sentence("A dog runs. It barks.")   # False: two sentences

``load_commongen(split, source="allenai/common_gen")`` (or another hub name or local
path in that format: one row per reference with ``concept_set_idx``, ``concepts``,
``target``) loads from the hub instead, grouped into the same schema; the hub's
concepts carry no POS tag, so there ``concepts == words``.
"""

from __future__ import annotations

import re
from pathlib import Path

__all__ = [
    "DATA_DIR",
    "PROMPT_TEMPLATE",
    "load_commongen",
    "commongen_prompt",
    "concept_words",
    "is_one_sentence",
]

DATA_DIR = Path(__file__).resolve().parent / "files" / "commongen"

#: The user instruction given to a chat model (``{words}``: comma-separated lemmas).
#: Chosen among 9 wordings by greedy decoding with SmolLM2-135M-Instruct on 70 dev
#: concept sets: every concept used in 57-60% of replies, against 17% for "Write one short
#: sentence about an everyday scene that uses all of these words: ..." (longer
#: instructions made the small model talk about the instruction).
PROMPT_TEMPLATE = "Make a sentence with the words {words}."


def concept_words(concepts: list[str]) -> list[str]:
    """Plain lemmas of POS-tagged concepts: ``["field_N", "look_V"] -> ["field", "look"]``."""
    return [c.rsplit("_", 1)[0] if c[-2:] in ("_N", "_V") else c for c in concepts]


def commongen_prompt(concepts: list[str] | str) -> str:
    """The instruction for one concept set (a list, tagged or not, or ``"a_N#b_V"``)."""
    if isinstance(concepts, str):
        concepts = concepts.split("#")
    return PROMPT_TEMPLATE.format(words=", ".join(concept_words(list(concepts))))


_CLOSE = "[\"'\u201d\u2019)\\]]*"  # closing quotes or brackets after the final mark
_END = re.compile(rf"[.!?]{_CLOSE}$")
_BOUNDARY = re.compile(rf"[.!?]{_CLOSE}\s+[\"'\u201c\u2018(\\[]?[A-Z0-9]")


def is_one_sentence(text: str) -> bool:
    """Exactly one complete sentence, by a simple rule: the stripped text is non-empty,
    has no line break, ends in ``.``, ``!`` or ``?`` (closing quotes/brackets may
    follow), and has no sentence boundary inside (``.``/``!``/``?``, then whitespace,
    then a capital letter or a digit). Abbreviations before a capital ("Mr. Smith")
    count as a boundary; a reply cut off mid-sentence does not end in a final mark."""
    t = text.strip()
    return bool(t) and "\n" not in t and bool(_END.search(t)) and not _BOUNDARY.search(t)


def _packaged(batch: dict) -> dict:
    concepts = [s.split("#") for s in batch["concept_set"]]
    return dict(
        concept_set=batch["concept_set"],
        concepts=concepts,
        words=[concept_words(c) for c in concepts],
        references=batch["scene"],
    )


def load_commongen(split: str = "dev", source: str | None = None):
    """One row per concept set: ``concept_set``, ``concepts``, ``words``, ``references``.

    ``source=None`` reads the packaged v1.0 files (splits ``"dev"``, ``"train"``; the
    test split's references are hidden, so it is not shipped). Otherwise ``source`` is
    passed to ``datasets.load_dataset`` (e.g. ``"allenai/common_gen"``, split
    ``"validation"`` or ``"train"``; ``"dev"`` is mapped to ``"validation"``).
    """
    import datasets

    if source is None:
        if split not in ("dev", "train"):
            raise ValueError(f"packaged CommonGen splits are 'dev' and 'train', got {split!r}")
        path = DATA_DIR / f"commongen.{split}.jsonl"
        ds = datasets.load_dataset("json", data_files=str(path), split="train")
        ds = ds.map(_packaged, batched=True, remove_columns=ds.column_names)
        return ds.select_columns(["concept_set", "concepts", "words", "references"])
    hub_split = "validation" if split == "dev" else split
    rows = datasets.load_dataset(source, split=hub_split)
    grouped: dict = {}
    for row in rows:
        key = row["concept_set_idx"]
        if key not in grouped:
            grouped[key] = dict(concepts=list(row["concepts"]), references=[])
        grouped[key]["references"].append(row["target"])
    return datasets.Dataset.from_list(
        [
            dict(
                concept_set="#".join(g["concepts"]),
                concepts=g["concepts"],
                words=concept_words(g["concepts"]),
                references=g["references"],
            )
            for g in grouped.values()
        ]
    )
