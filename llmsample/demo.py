"""``llmsample demo``: SMC vs plain sampling on a line that must contain given words.

    llmsample demo                  # the embedded Shakespeare model, CPU, < 60 s
    llmsample demo --json

For each speaker prompt, both methods spend the same N particles (one forward pass
per token each). Plain (ancestral) sampling keeps whatever it drew; SMC weights the
particles by the constraint, with a twist that resamples towards lines that already
contain one of the words. Reported per method: the fraction of its samples that
satisfy the constraint (for SMC, of posterior draws), log Z = log P(constraint) under
the model (SMC's estimate; for plain sampling the log of its hit rate), and samples.
"""

from __future__ import annotations

import math
import time

import torch

__all__ = ["DEMO", "run_demo", "print_demo"]

DEMO = dict(
    prompts=["ROMEO:\n", "JULIET:\n", "HAMLET:\n", "KING LEAR:\n"],
    words=("love",),
    max_new_tokens=20,
    prefix_bonus=3.0,
)


def run_demo(args) -> dict:
    import llmsample
    from llmsample.cli import UsageError, load_for_cli
    from llmsample.lm import line_end_ids
    from llmsample.potentials import Contains

    if args.particles < 1:
        raise UsageError(f"--particles must be >= 1, got {args.particles}")
    model, tok = load_for_cli(args)
    prompts, words, T = DEMO["prompts"], DEMO["words"], DEMO["max_new_tokens"]
    common = dict(max_new_tokens=T, eos_token_id=line_end_ids(tok), seed=args.seed)
    N = args.particles

    t0 = time.perf_counter()
    plain = llmsample.ancestral_generate(
        model, tok, prompts, num_samples=N, potential=Contains(*words), **common
    )
    t1 = time.perf_counter()
    twisted = Contains(*words, prefix_bonus=DEMO["prefix_bonus"])
    smc = llmsample.smc_generate(
        model, tok, prompts, potential=twisted, twist="prefix", num_particles=N, **common
    )
    t2 = time.perf_counter()

    rows = []
    for b, prompt in enumerate(prompts):
        hits = plain.log_potential[b] > -math.inf
        ok = [plain.texts[b][i] for i in torch.nonzero(hits).flatten().tolist()]
        rate = float(hits.double().mean())
        smc_ok = bool(torch.isfinite(smc.log_z[b]))
        rows.append(
            dict(
                prompt=prompt.strip(),
                plain_rate=rate,
                plain_log_z=math.log(rate) if rate > 0 else -math.inf,
                plain_samples=(ok + plain.texts[b])[:2],
                smc_rate=1.0 if smc_ok else 0.0,
                smc_log_z=float(smc.log_z[b]),
                smc_samples=_draw(smc, b, 2, args.seed) if smc_ok else [],
                smc_resampling_steps=len(smc.resampling_steps[b]),
            )
        )
    return dict(
        words=list(words),
        particles=N,
        max_new_tokens=T,
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
    words = " and ".join(repr(w) for w in res["words"])
    print(f"Task: continue each speaker with one line that contains {words}.")
    print(
        f"Both methods: {res['particles']} particles per prompt, "
        f"<= {res['max_new_tokens']} tokens.\n"
    )
    for r in res["rows"]:
        print(f"{r['prompt']}")
        print(
            f"  plain sampling: {r['plain_rate']:6.1%} of samples satisfy   "
            f"log Z ~ {r['plain_log_z']:.2f}"
        )
        for s in r["plain_samples"]:
            print(f"      {s!r}")
        print(
            f"  SMC:            {r['smc_rate']:6.1%} of posterior draws satisfy   "
            f"log Z = {r['smc_log_z']:.2f}   ({r['smc_resampling_steps']} resampling steps)"
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
