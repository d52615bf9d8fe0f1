"""Prompt sets shared by the evals and the recipes, built from the held-out plays (never
the training plays) and from CommonGen dev.

- ``line-infill``: given a speaker, the previous and the next verse line of a speech,
  write the middle line. Target: p(middle | context) * p(next | context, middle).
  Reference: the real middle line.
- ``keywords``: write a line that contains 2 or 3 given content words (a hard
  constraint, like CommonGen). References: the held-out lines that contain them.
- ``commongen``: CommonGen v1.0 dev (``llmsample.data.commongen``, not Shakespeare): a chat
  model is asked for one sentence that uses every concept (any inflection: "stood"
  covers ``stand_V``); a hard constraint (``llmsample.potentials.concepts.Concepts``). References:
  the human sentences. Chat prompts (``Task.chat``): the continuation ends at the
  model's EOS (``<|im_end|>``), not at a line end.

    from llmsample.data.tasks import build_task
    task = build_task("keywords", num_prompts=50)
    task.examples[0].prompt, task.examples[0].references, task.potential(model, tok)
    build_task("commongen", num_prompts=100)   # 100 seeded dev concept sets
    build_task("line-infill", num_prompts=8, plays=("macbeth",))  # one held-out play

Selection is deterministic (``seed``), so every method sees the same prompts. The evals
(``evals/run.py``, ``evals/infill_bounds.py``) and the recipes (``recipes/gfn_tasks.py``,
``recipes/twist_ctl_infill.py``) import this module; ``evals.tasks`` re-exports it.
"""

from __future__ import annotations

import random
import re
from collections import Counter
from dataclasses import dataclass, field

from llmsample.data.shakespeare import DEFAULT_HELDOUT, list_plays, load_plays
from llmsample.potentials import Contains, PerPrompt, Potential, SuffixLikelihood

__all__ = ["Example", "Task", "build_task", "speeches", "TASKS", "PREFIX_BONUS"]

# the heuristic prefix twist of keywords/commongen (smc-twist rows, the SMC teacher):
# log psi = PREFIX_BONUS x (words or concepts the prefix already covers)
PREFIX_BONUS = 2.0

_WORD = re.compile(r"[A-Za-z']+")
STOPWORDS = set(
    """a an and are as at be but by for from had has have he her him his i if in is it its
    let me my no nor not now of on or our shall she so that the thee their them then there
    these they thou thy this those to too upon us was we were what when where which while
    who whom why will with would ye yet you your hath doth art thus more most than into
    o oh ay come make good well like must such very well give take know tell here hence""".split()
)


@dataclass
class Example:
    """One prompt of a task with its references and its potential's arguments."""

    prompt: str
    references: list[str]
    words: list[str] = field(default_factory=list)  # keywords; commongen: ["stand_V", ...]
    suffix: str = ""  # line-infill: the text that must follow the middle line
    source: str = ""  # play name (commongen: the concept set)


@dataclass
class Task:
    name: str
    examples: list[Example]
    max_new_tokens: int
    description: str
    chat: bool = False  # prompts are user messages for a chat model; stop at the model's EOS

    def potential(self, model, tokenizer, examples: list[Example] | None = None, twist=False):
        """The task's potential over a batch of examples (one per prompt)."""
        examples = self.examples if examples is None else examples
        if self.name == "line-infill":
            return SuffixLikelihood(model, tokenizer, [e.suffix for e in examples], as_twist=twist)
        bonus = PREFIX_BONUS if twist else 0.0
        if self.name == "commongen":
            from llmsample.potentials.concepts import Concepts

            return PerPrompt([Concepts(*e.words, prefix_bonus=bonus) for e in examples])
        return PerPrompt([Contains(*e.words, prefix_bonus=bonus) for e in examples])

    def satisfied(self, example: Example, text: str) -> bool | None:
        """Hard-constraint check (keywords, commongen); None for tasks without one."""
        if self.name == "commongen":
            from llmsample.potentials.concepts import covers_all

            return bool(covers_all(text, example.words))
        if self.name != "keywords":
            return None
        pot: Potential = Contains(*example.words)
        return bool(pot.predicate(text))


def speeches(text: str) -> list[tuple[str, list[str]]]:
    """(speaker, verse lines) for every speech of a cleaned play."""
    out = []
    for para in text.split("\n\n"):
        lines = [ln.strip() for ln in para.split("\n") if ln.strip()]
        if len(lines) >= 2 and lines[0].endswith(":"):
            out.append((lines[0][:-1], lines[1:]))
    return out


def _verse(line: str) -> bool:
    words = _WORD.findall(line)
    return len(words) >= 5 and not line.isupper()


def _content_words(line: str) -> list[str]:
    words = [w.lower().strip("'") for w in _WORD.findall(line)]
    return [w for w in dict.fromkeys(words) if len(w) >= 4 and w.isalpha() and w not in STOPWORDS]


def _line_infill(plays: dict[str, str], n: int, rng: random.Random) -> list[Example]:
    pool = []
    for name, text in plays.items():
        for speaker, lines in speeches(text):
            for i in range(1, len(lines) - 1):
                if all(_verse(x) for x in lines[i - 1 : i + 2]):
                    prompt = f"{speaker}:\n{lines[i - 1]}\n"
                    pool.append(
                        Example(prompt, [lines[i]], suffix="\n" + lines[i + 1], source=name)
                    )
    return rng.sample(pool, min(n, len(pool)))


def _keywords(plays: dict[str, str], n: int, rng: random.Random) -> list[Example]:
    all_lines = [
        (name, speaker, line)
        for name, text in plays.items()
        for speaker, lines in speeches(text)
        for line in lines
        if _verse(line)
    ]
    counts = Counter(w for _, _, line in all_lines for w in _content_words(line))
    common = {w for w, c in counts.items() if c >= 8}  # words the model has a chance to know
    pool = []
    for name, speaker, line in all_lines:
        words = [w for w in _content_words(line) if w in common]
        if len(words) >= 2:
            k = 3 if len(words) >= 3 and rng.random() < 0.3 else 2
            pool.append((name, speaker, sorted(rng.sample(words, k))))
    examples = []
    for name, speaker, words in rng.sample(pool, min(n, len(pool))):
        check = Contains(*words)
        refs = [line for _, _, line in all_lines if check.predicate(line)]
        examples.append(Example(f"{speaker}:\n", refs, words=words, source=name))
    return examples


def _commongen(n: int, rng: random.Random) -> list[Example]:
    from llmsample.data.commongen import commongen_prompt, load_commongen

    dev = load_commongen("dev")
    rows = [dev[i] for i in rng.sample(range(len(dev)), min(n, len(dev)))]
    return [
        Example(
            commongen_prompt(r["concepts"]),
            list(r["references"]),
            words=list(r["concepts"]),
            source=r["concept_set"],
        )
        for r in rows
    ]


# commongen: 99.4% of the dev references fit in 32 SmolLM2 tokens (with <|im_end|>)
COMMONGEN = ("write one sentence that uses every concept (CommonGen dev)", None, 32)

TASKS = {
    "line-infill": ("write the missing middle line of a speech", _line_infill, 24),
    "keywords": ("write a line that contains the given words", _keywords, 24),
    "commongen": COMMONGEN,
}


def build_task(name: str, num_prompts: int = 50, seed: int = 0, plays=DEFAULT_HELDOUT) -> Task:
    """The task ``name`` on ``num_prompts`` examples drawn from the held-out ``plays``
    (commongen: from the CommonGen dev split; ``plays`` is ignored)."""
    if name not in TASKS:
        raise ValueError(f"unknown task {name!r}; choose from {sorted(TASKS)} or 'exact'")
    if name == "commongen":
        description, _, max_new_tokens = TASKS[name]
        examples = _commongen(num_prompts, random.Random(seed))
        return Task(name, examples, max_new_tokens, description, chat=True)
    unknown = set(plays) - set(list_plays())
    if unknown:
        raise ValueError(f"unknown plays {sorted(unknown)}")
    description, build, max_new_tokens = TASKS[name]
    examples = build(load_plays(plays), num_prompts, random.Random(seed))
    return Task(name, examples, max_new_tokens, description)
