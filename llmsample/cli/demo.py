"""``llmsample demo``: SMC vs plain sampling on a hard constraint, on one model.

    llmsample demo                                   # embedded Shakespeare model, < 60 s
    llmsample demo --model smollm2-135m-instruct     # a chat model on CommonGen, < 2 min
    llmsample demo --json

Two scenarios, chosen by the model:
- a model without a chat template (the embedded ``shakespeare-tiny``): each speaker must
  continue with one line that contains *love* (``Contains`` with a word-count twist);
- a chat model (e.g. SmolLM2-135M-Instruct): a few CommonGen concept sets, each sent as
  one user message; the reply must use every concept in some inflected form
  (``Concepts`` with a concept-count twist).

For each prompt both methods spend the same N particles (one forward pass per token
each). Plain (ancestral) sampling keeps whatever it drew; SMC weights the particles by
the constraint and resamples towards prefixes that already use more of the words.
Reported per method: the share of its samples that satisfy the constraint (for SMC, of
posterior draws), log Z = log P(constraint) under the model (SMC's estimate; for plain
sampling the log of its hit rate), and samples.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

import torch

__all__ = ["DEMO", "CHAT_DEMO", "DemoSpec", "run_demo", "print_demo"]


@dataclass(frozen=True)
class DemoSpec:
    """One demo scenario: prompts, the words each must use, and the sampling settings."""

    prompts: tuple[str, ...]
    words: tuple[tuple[str, ...], ...]  # per prompt
    max_new_tokens: int
    prefix_bonus: float
    particles: int  # default N
    chat: bool  # prompts go through the chat template; the reply ends at EOS
    task: str


DEMO = DemoSpec(
    prompts=("ROMEO:\n", "JULIET:\n", "HAMLET:\n", "KING LEAR:\n"),
    words=(("love",),) * 4,
    max_new_tokens=20,
    prefix_bonus=3.0,
    particles=256,
    chat=False,
    task="continue each speaker with one line that contains 'love'",
)
# CommonGen dev concept sets (rows 0, 1 and 5 of the shipped dev split)
_SETS = (("field_N", "look_V", "stand_V"), ("kid_N", "room_N", "dance_V"))
_SETS += (("cat_N", "pet_V", "couch_N"),)
CHAT_DEMO = DemoSpec(
    prompts=(),  # built from the sets by commongen_prompt
    words=_SETS,
    max_new_tokens=32,
    prefix_bonus=2.0,
    particles=32,
    chat=True,
    task="write one sentence that uses every concept (any inflected form)",
)


def _setup(spec: DemoSpec, tok):
    """(prompts, plain potential, twisted potential, eos ids) for a scenario."""
    from llmsample.hf.prompts import line_end_ids
    from llmsample.potentials import Contains, PerPrompt
    from llmsample.potentials.concepts import Concepts

    if spec.chat:
        from llmsample.data.commongen import commongen_prompt

        prompts = [commongen_prompt(list(w)) for w in spec.words]
        plain = PerPrompt([Concepts(*w) for w in spec.words])
        twisted = PerPrompt([Concepts(*w, prefix_bonus=spec.prefix_bonus) for w in spec.words])
        return prompts, plain, twisted, None  # the reply ends at the model's EOS
    words = spec.words[0]
    plain, twisted = Contains(*words), Contains(*words, prefix_bonus=spec.prefix_bonus)
    return list(spec.prompts), plain, twisted, line_end_ids(tok)


def run_demo(args) -> dict:
    import llmsample
    from llmsample.cli.common import UsageError, load_for_cli, use_chat

    if args.particles is not None and args.particles < 1:
        raise UsageError(f"--particles must be >= 1, got {args.particles}")
    model, tok = load_for_cli(args)
    spec = CHAT_DEMO if use_chat(args, tok) else DEMO
    N = args.particles or spec.particles
    prompts, plain_phi, twisted_phi, eos = _setup(spec, tok)
    common = dict(max_new_tokens=spec.max_new_tokens, eos_token_id=eos, seed=args.seed)
    common["chat"] = spec.chat

    t0 = time.perf_counter()
    plain = llmsample.ancestral_generate(
        model, tok, prompts, num_samples=N, potential=plain_phi, **common
    )
    t1 = time.perf_counter()
    smc = llmsample.smc_generate(
        model, tok, prompts, potential=twisted_phi, num_particles=N, **common
    )
    t2 = time.perf_counter()

    rows = []
    for b, prompt in enumerate(prompts):
        hits = plain.log_potential[b] > -math.inf
        ok = [plain.texts[b][i] for i in torch.nonzero(hits).flatten().tolist()]
        rate = float(hits.double().mean())
        smc_ok = bool(torch.isfinite(smc.log_z[b]))
        draws = _draw(smc, b, N, args.seed) if smc_ok else []
        rows.append(
            dict(
                prompt=prompt.strip(),
                words=list(spec.words[b]),
                plain_rate=rate,
                plain_log_z=math.log(rate) if rate > 0 else -math.inf,
                plain_samples=(ok + plain.texts[b])[:2],
                smc_rate=1.0 if smc_ok else 0.0,
                smc_log_z=float(smc.log_z[b]),
                smc_samples=list(dict.fromkeys(draws))[:2],
                smc_unique_draws=len(set(draws)),
                smc_resampling_steps=len(smc.resampling_steps[b]),
            )
        )
    return dict(
        task=spec.task,
        model=args.model,
        particles=N,
        max_new_tokens=spec.max_new_tokens,
        rows=rows,
        plain_rate=sum(r["plain_rate"] for r in rows) / len(rows),
        smc_rate=sum(r["smc_rate"] for r in rows) / len(rows),
        plain_seconds=t1 - t0,
        smc_seconds=t2 - t1,
        plain_forward_tokens=plain.num_forward_tokens,
        smc_forward_tokens=smc.num_forward_tokens,
    )


def _draw(out, b: int, k: int, seed: int) -> list[str]:
    """k draws by weight from prompt b's particles."""
    gen = torch.Generator().manual_seed(seed)
    idx = torch.multinomial(out.log_weights[b].exp().float(), k, replacement=True, generator=gen)
    return [out.texts[b][i] for i in idx.tolist()]


def print_demo(res: dict) -> None:
    print(f"Task ({res['model']}): {res['task']}.")
    print(
        f"Both methods: {res['particles']} particles per prompt, "
        f"<= {res['max_new_tokens']} tokens.\n"
    )
    for r in res["rows"]:
        print(f"{r['prompt']}   [must use: {', '.join(r['words'])}]")
        print(
            f"  plain sampling: {r['plain_rate']:6.1%} of samples satisfy   "
            f"log Z ~ {r['plain_log_z']:.2f}"
        )
        for s in r["plain_samples"]:
            print(f"      {s!r}")
        print(
            f"  SMC:            {r['smc_rate']:6.1%} of posterior draws satisfy   "
            f"log Z = {r['smc_log_z']:.2f}   ({r['smc_resampling_steps']} resampling steps, "
            f"{r['smc_unique_draws']} distinct texts in {res['particles']} draws)"
        )
        for s in r["smc_samples"]:
            print(f"      {s!r}")
        print()
    print(
        f"Overall: plain sampling {res['plain_rate']:.1%} vs SMC {res['smc_rate']:.1%} "
        f"constraint satisfaction."
    )
    print(
        f"Time: plain {res['plain_seconds']:.1f}s ({res['plain_forward_tokens']} forward tokens), "
        f"SMC {res['smc_seconds']:.1f}s ({res['smc_forward_tokens']} forward tokens)."
    )
