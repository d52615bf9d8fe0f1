"""SMC draws as off-policy rows for GFlowNet training (a "teacher" for the policy).

    from llmsample.gfn.teacher import smc_demonstrations
    demos = smc_demonstrations(model, tok, prompts, hard_potentials, num_particles=8,
                               max_new_tokens=32, chat=True, cache="out/run/teacher.jsonl")
    GFNTrainer(policy, tok, prompts, reward_potential, cfg, demonstrations=demos)

Steps, per batch of prompts:

1. Run SMC on the *base* model (the model itself as proposal, the potential's prefix
   twist, ``stop_guard``), ``num_particles`` per prompt.
2. Keep each prompt's distinct final particles that the potential accepts
   (log phi > -inf), whatever their weight.
3. Append one JSON line per prompt to ``cache`` (``{"prompt", "texts"}``); a rerun reads
   the finished lines and continues after them, so a kill loses at most one batch.

Why it is sound: VarGrad and TB hold for rows from any behaviour distribution, so the
rows need not be exact posterior samples and no SMC weight is used; the trainer scores
each one with its own reward. Why SMC and not human references: SMC's accepted
particles are replies in the base model's own style that satisfy the constraint, so
raising their log q moves the policy towards sigma's modes rather than towards text
the model finds unlikely.
"""

from __future__ import annotations

import json
import warnings
from collections.abc import Sequence
from pathlib import Path

from tqdm.auto import tqdm

from llmsample.generate import smc_generate
from llmsample.potentials import PerPrompt, Potential

__all__ = ["smc_demonstrations"]


def _read_cache(path: Path, prompts: Sequence[str]) -> list[list[str]]:
    done = []
    if not path.is_file():
        return done
    for n, line in enumerate(path.read_text().splitlines()):
        row = json.loads(line)
        if n >= len(prompts) or row["prompt"] != prompts[n]:
            raise ValueError(
                f"{path}: line {n + 1} is for another prompt list than this run's; delete "
                "the file (or start the run afresh with --overwrite)"
            )
        done.append(list(row["texts"]))
    return done


def smc_demonstrations(
    model,
    tokenizer,
    prompts: Sequence[str],
    potentials: Sequence[Potential],
    *,
    num_particles: int = 8,
    max_new_tokens: int = 32,
    chat: bool = False,
    stop_ids: list[int] | None = None,
    batch_size: int = 16,
    seed: int = 0,
    cache: str | Path | None = None,
    progress: bool = True,
) -> list[list[str]]:
    """Per prompt, the distinct texts of SMC's accepted final particles (see the module
    docstring). ``potentials``: one per prompt, with a prefix score (the twist) and
    hard acceptance (log phi = -inf for a rejected reply)."""
    if len(potentials) != len(prompts):
        raise ValueError(f"got {len(potentials)} potentials for {len(prompts)} prompts")
    if num_particles < 1 or batch_size < 1:
        raise ValueError("num_particles and batch_size must be >= 1")
    path = Path(cache) if cache is not None else None
    done = _read_cache(path, prompts) if path is not None else []
    starts = range(len(done), len(prompts), batch_size)
    for start in tqdm(starts, desc="teacher (SMC)", unit="batch", disable=not progress):
        idx = range(start, min(start + batch_size, len(prompts)))
        with warnings.catch_warnings():  # expected for some prompts: they get no rows
            warnings.filterwarnings("ignore", message="the potential rejected every particle")
            out = smc_generate(
                model,
                tokenizer,
                [prompts[i] for i in idx],
                chat=chat,
                potential=PerPrompt([potentials[i] for i in idx]),
                twist="prefix",
                num_particles=num_particles,
                max_new_tokens=max_new_tokens,
                stop_guard=True,
                eos_token_id=stop_ids,
                seed=seed + start,
                progress=False,
            )
        rows = []
        for b in range(len(idx)):
            ok = [t for t, lp in zip(out.texts[b], out.log_potential[b].tolist()) if lp > -1e30]
            rows.append(list(dict.fromkeys(ok)))  # distinct, in particle order
        done += rows
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
            with path.open("a") as f:
                for i, texts in zip(idx, rows):
                    f.write(json.dumps({"prompt": prompts[i], "texts": texts}) + "\n")
    return done
