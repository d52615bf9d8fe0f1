"""SMC on vLLM for CommonGen, scaled out: one engine per replica, the prompts sharded.

    python recipes/smc_vllm.py --prompts 8 --out out/smc_vllm.jsonl       # SmolLM2, CPU
    python recipes/smc_vllm.py --model HuggingFaceTB/SmolLM2-1.7B-Instruct --prompts 0 \
        --replicas 4 --tensor_parallel_size 2 --out out/smc.jsonl          # 8 GPUs, one node
    python recipes/smc_vllm.py ... --shard 1/2   # node 1 of 2 (concatenate the two files)

Steps:
1. The first ``prompts`` CommonGen dev concept sets (this node's ``--shard i/n``: every
   n-th from the i-th) are cut into chunks of ``prompts_per_call``.
2. ``replicas`` processes each start one ``vllm.LLM`` (``tensor_parallel_size`` GPUs each;
   replica r sees GPUs r*tp .. r*tp+tp-1 through ``CUDA_VISIBLE_DEVICES`` unless it is
   set) and take every ``replicas``-th chunk. Each chunk is one ``smc_generate`` call with
   ``SMCConfig.seed = seed + index of its first concept set``, so a concept set's draws do
   not depend on the number of replicas.
3. A replica appends each finished chunk to ``<out>.parts/replica-<r>.jsonl`` (one JSON
   line per concept set: the best reply, every particle's text and normalized log weight,
   log Z) and shuts its engine down.
4. The parts are merged, in dataset order, into ``out``.

Kill it and rerun the same command: concept sets already in the parts are kept, only
the rest are computed. ``--overwrite`` starts over. What was run: CPU, TP = 1, one and two
replicas (tests/test_vllm.py); several GPUs or nodes were not. Needs the vLLM environment
(README, "SMC on vLLM").
"""

from __future__ import annotations

import json
import multiprocessing as mp
import os
import shutil
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

from llmsample.config import help_field, run_recipe

__all__ = ["SMCvLLMConfig", "main"]


@dataclass
class SMCvLLMConfig:
    model: str = help_field(
        "a load_model name, a model folder, or a hub id", "smollm2-135m-instruct"
    )
    out: str = help_field("the merged JSONL file (parts go to <out>.parts/)", "out/smc_vllm.jsonl")
    prompts: int = help_field("the first N CommonGen dev concept sets (0: all 993)", 8)
    shard: str = help_field("i/n: this node takes every n-th concept set from the i-th", "0/1")
    replicas: int = help_field("engines on this node, one process each", 1)
    tensor_parallel_size: int = help_field("GPUs per engine (vLLM tensor parallelism)", 1)
    prompts_per_call: int = help_field("concept sets per smc_generate call (a chunk)", 4)
    num_particles: int = help_field("particles N per concept set", 16)
    max_new_tokens: int = help_field("T", 32)
    resample_every: int = help_field(
        "K: tokens per vLLM call between resampling steps (at least half the KV block: "
        "below that, calls cost more than they compute; benchmarks/RESULTS.md)",
        16,
    )
    beta: float = help_field("ConceptCoverage sharpness (log phi = beta * (coverage - 1))", 3.0)
    chat: bool = help_field("encode prompts with the model's chat template", True)
    seed: int = help_field("a chunk's SMC seed is seed + its first concept set's index", 0)
    dtype: str = help_field("the engines' dtype", "auto")
    kv_cache_gib: int = help_field("VLLM_CPU_KVCACHE_SPACE per engine (CPU runs)", 1)
    enforce_eager: bool = help_field("vLLM enforce_eager (skip graph capture)", False)
    overwrite: bool = help_field("delete earlier parts and start over", False)

    def __post_init__(self):
        for name in (
            "replicas",
            "tensor_parallel_size",
            "prompts_per_call",
            "num_particles",
            "max_new_tokens",
            "resample_every",
            "kv_cache_gib",
        ):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.prompts < 0:
            raise ValueError(f"prompts must be >= 0 (0: all), got {self.prompts}")
        try:
            i, n = (int(v) for v in self.shard.split("/"))
        except ValueError:
            raise ValueError(
                f"shard must be i/n with integers, e.g. 0/2; got {self.shard!r}"
            ) from None
        if not 0 <= i < n:
            raise ValueError(f"shard {self.shard!r}: need 0 <= i < n")


def _folder(name: str) -> str:
    from llmsample.hf.named_models import NAMED, resolve

    return str(resolve(name)) if name in NAMED and not Path(name).is_dir() else name


def _replica(cfg: SMCvLLMConfig, r: int, chunks: list[list[dict]], part: str) -> None:
    """One engine: SMC on each chunk of concept sets, appended to ``part`` as it finishes."""
    tp = cfg.tensor_parallel_size
    if os.environ.get("CUDA_VISIBLE_DEVICES") is None and cfg.replicas > 1:
        os.environ["CUDA_VISIBLE_DEVICES"] = ",".join(str(r * tp + g) for g in range(tp))
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", str(cfg.kv_cache_gib))
    from vllm import LLM

    import llmsample
    from llmsample.data.commongen import commongen_prompt
    from llmsample.potentials import PerPrompt
    from llmsample.potentials.concepts import ConceptCoverage
    from llmsample.vllm import shutdown

    llm = LLM(
        _folder(cfg.model),
        dtype=cfg.dtype,
        tensor_parallel_size=tp,
        enable_prefix_caching=True,
        block_size=32,
        enforce_eager=cfg.enforce_eager,
        seed=cfg.seed + r,
    )
    try:
        for rows in chunks:
            smc = llmsample.SMCConfig(
                num_particles=cfg.num_particles,
                max_new_tokens=cfg.max_new_tokens,
                resample_every=cfg.resample_every,
                seed=cfg.seed + rows[0]["index"],
            )
            phi = PerPrompt(
                [ConceptCoverage(*w["words"], beta=cfg.beta, as_twist=True) for w in rows]
            )
            prompts = [commongen_prompt(w["words"]) for w in rows]
            out = llmsample.smc_generate(
                llm, None, prompts, chat=cfg.chat, potential=phi, config=smc
            )
            best = out.best()
            lines = [
                json.dumps(
                    dict(
                        index=row["index"],
                        concepts=row["words"],
                        best=best[b],
                        texts=out.texts[b],
                        log_weights=out.log_weights[b].tolist(),
                        log_z=float(out.log_z[b]),
                        replica=r,
                    )
                )
                + "\n"
                for b, row in enumerate(rows)
            ]
            _append(Path(part), "".join(lines))  # a whole chunk: a kill loses at most one
    finally:
        shutdown(llm)  # else the engine's processes keep this one from exiting


def _append(part: Path, text: str) -> None:
    old = part.read_bytes() if part.exists() else b""
    if old and not old.endswith(b"\n"):
        text = "\n" + text  # after a line cut by a kill, start a new one
    with open(part, "a") as f:
        f.write(text)


def _read_parts(folder: Path) -> dict[int, dict]:
    done = {}
    for part in sorted(folder.glob("replica-*.jsonl")):
        for line in part.read_text().splitlines():
            try:
                row = json.loads(line)
            except json.JSONDecodeError:  # a line cut by a kill: computed again
                continue
            done[row["index"]] = row
    return done


def main(cfg: SMCvLLMConfig) -> dict:
    from llmsample.data.commongen import load_commongen

    ds = load_commongen("dev")
    n = len(ds) if cfg.prompts == 0 else min(cfg.prompts, len(ds))
    i, of = (int(v) for v in cfg.shard.split("/"))
    mine = [dict(index=j, words=ds[j]["words"]) for j in range(i, n, of)]
    out = Path(cfg.out)
    parts = out.parent / (out.name + ".parts")
    if cfg.overwrite and parts.exists():
        shutil.rmtree(parts)
    parts.mkdir(parents=True, exist_ok=True)
    done = _read_parts(parts)
    todo = [row for row in mine if row["index"] not in done]
    size = cfg.prompts_per_call
    chunks = [todo[a : a + size] for a in range(0, len(todo), size)]
    if done:
        print(f"resuming: {len(mine) - len(todo)} of {len(mine)} concept sets already in {parts}")
    ctx = mp.get_context("spawn")  # a fresh process per engine (vLLM starts its own)
    procs = []
    for r in range(cfg.replicas):
        if chunks[r :: cfg.replicas]:
            part = str(parts / f"replica-{r}.jsonl")
            procs.append(
                ctx.Process(target=_replica, args=(cfg, r, chunks[r :: cfg.replicas], part))
            )
    for p in procs:
        p.start()
    for p in procs:
        p.join()
    done = _read_parts(parts)
    missing = [row["index"] for row in mine if row["index"] not in done]
    if missing:
        failed = [r for r, p in enumerate(procs) if p.exitcode != 0]
        raise SystemExit(
            f"replica(s) {failed} failed (see above): {len(mine) - len(missing)} of {len(mine)} "
            f"concept sets done; rerun the same command to compute the other {len(missing)}"
        )
    rows = [done[row["index"]] for row in mine]
    out.write_text("".join(json.dumps(row) + "\n" for row in rows))
    print(
        f"wrote {len(rows)} concept sets to {out} "
        f"({len(todo)} computed now, {len(procs)} replica(s))"
    )
    return dict(config=asdict(cfg), prompts=len(rows), computed=len(todo))


if __name__ == "__main__":
    sys.exit(run_recipe(SMCvLLMConfig, main, __doc__))
