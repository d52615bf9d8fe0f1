"""SMC on vLLM against vLLM's own sampling and against SMC on HF (``--backend vllm``).

    python benchmarks/smc_overhead.py --backend vllm --model smollm2-135m-instruct \
        --particles 16 64 --block 8 --threads 1

Needs the vLLM environment (README, "SMC on vLLM"). One chat prompt, exactly T new tokens
(no EOS), the same TokenMask twist as the HF benchmark, resampling considered at every
block of K tokens. Interleaved runs, medians, in one process:

- ``vllm n=N``: ``llm.generate(prompt, SamplingParams(n=N))``, plain sampling;
- ``smc vllm``: ``smc_generate(llm, ...)``, block SMC on the same engine (goal: at most
  1.3x ``vllm n=N`` on CPU);
- ``smc hf``: ``smc_generate(hf_model, ...)`` with the same settings (the token engine);
- tokens per block: what vLLM computed (``num_cached_tokens`` subtracted) against what the
  requests held (each particle's prompt + tokens so far, + the new ones): the forking.
"""

import json
import os
import statistics
import time
from dataclasses import replace
from pathlib import Path

import report  # benchmarks/report.py, next to this script
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

import llmsample
from llmsample.hf.named_models import resolve
from llmsample.hf.prompts import encode_prompts
from llmsample.potentials import TokenMask
from llmsample.smc.blocks import block_ends

__all__ = ["run"]

GOAL = 1.3
KV_BLOCK = 32  # the smallest KV block vLLM's CPU backend takes
PROMPT = "Write one short sentence about a dog, a ball and a park."


def _folder(name: str) -> Path:
    return Path(name) if Path(name).is_dir() else resolve(name)


def _timed(fn):
    t0 = time.perf_counter()
    out = fn()
    return time.perf_counter() - t0, out


def _requested(P: int, n: int, ends: list[int]) -> int:
    """Positions the requests of one run hold: each particle's prompt and tokens so far,
    plus the new ones, at every block."""
    starts = [0, *ends[:-1]]
    return sum(n * (P + a) + n * (b - a) for a, b in zip(starts, ends))


def bench_one(llm, hf_model, tok, ids, potential, n, args) -> dict:
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    T, K, P = args.new_tokens, args.block, len(ids)
    cfg = llmsample.SMCConfig(
        num_particles=n, max_new_tokens=T, resample_every=K, ess_threshold=args.ess_threshold
    )
    kwargs = dict(input_ids=torch.tensor([ids]), potential=potential, twist="prefix")
    kwargs.update(eos_token_id=[])  # exactly T tokens on every side

    def plain(seed):
        params = SamplingParams(n=n, max_tokens=T, ignore_eos=True, seed=seed, detokenize=False)
        return llm.generate([TokensPrompt(prompt_token_ids=ids)], params, use_tqdm=False)

    def smc(model, seed, align=True):
        c = replace(cfg, seed=seed, align_blocks=align)
        return llmsample.smc_generate(model, tok, config=c, **kwargs)

    times = {"vllm_n": [], "smc_vllm": [], "smc_vllm_unaligned": [], "smc_hf": []}
    for r in range(args.repeats):
        times["vllm_n"].append(_timed(lambda r=r: plain(r))[0])
        t, out_v = _timed(lambda r=r: smc(llm, r))
        times["smc_vllm"].append(t)
        t, out_u = _timed(lambda r=r: smc(llm, r, align=False))
        times["smc_vllm_unaligned"].append(t)
        t, out_h = _timed(lambda r=r: smc(hf_model, r))
        times["smc_hf"].append(t)
    med = {k: statistics.median(v) for k, v in times.items()}
    ends = {"aligned": block_ends(P, T, K, KV_BLOCK), "unaligned": block_ends(P, T, K)}
    per_block = {}
    for name, out in (("aligned", out_v), ("unaligned", out_u)):
        blocks = len(ends[name])
        assert out.ess.shape[1] == blocks, (name, out.ess.shape, ends[name])
        per_block[name] = dict(
            block_ends=ends[name],
            computed_per_block=out.num_forward_tokens / blocks,
            requested_per_block=_requested(P, n, ends[name]) / blocks,
            resampling_steps=int(out.resampled.any(dim=0).sum()),
        )
    return dict(
        particles=n,
        block=K,
        **{f"{k}_s": v for k, v in med.items()},
        all_s=times,
        smc_vllm_over_vllm_n=med["smc_vllm"] / med["vllm_n"],
        unaligned_over_vllm_n=med["smc_vllm_unaligned"] / med["vllm_n"],
        smc_hf_over_smc_vllm=med["smc_hf"] / med["smc_vllm"],
        goal_met=med["smc_vllm"] / med["vllm_n"] <= GOAL,
        **per_block,
        hf_forward_per_token=out_h.num_forward_tokens / T,
    )


def run(args, command: str) -> None:
    """The ``--backend vllm`` run of benchmarks/smc_overhead.py."""
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")
    from vllm import LLM

    if not args.model:
        raise SystemExit("--backend vllm needs --model (a load_model name or a model folder)")
    folder = _folder(args.model)
    info = report.machine_info("cpu", "float32")
    tok = AutoTokenizer.from_pretrained(folder)
    hf_model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    t0 = time.perf_counter()
    llm = LLM(
        str(folder),
        dtype="float32",
        enable_prefix_caching=True,
        block_size=KV_BLOCK,
        max_model_len=512,
        max_logprobs=-1,
        seed=args.seed,
    )
    info["engine_start_s"] = time.perf_counter() - t0
    ids = encode_prompts(tok, [PROMPT], chat=True).input_ids[0].tolist()
    g = torch.Generator().manual_seed(args.seed)
    V = hf_model.config.vocab_size
    banned = torch.randperm(V, generator=g)[: int(args.banned_frac * V)].tolist()
    potential = TokenMask(banned=banned)
    bench_one(llm, hf_model, tok, ids, potential, args.particles[0], args)  # warm-up
    res, K = [], args.block
    for n in args.particles:
        r = bench_one(llm, hf_model, tok, ids, potential, n, args)
        res.append(r)
        a, u = r["aligned"], r["unaligned"]
        print(
            f"N={n:4d} K={K}  vllm n=N {r['vllm_n_s']:.2f}s  smc vllm {r['smc_vllm_s']:.2f}s "
            f"({r['smc_vllm_over_vllm_n']:.2f}x, goal <= {GOAL}: "
            f"{'met' if r['goal_met'] else 'NOT met'}; unaligned "
            f"{r['unaligned_over_vllm_n']:.2f}x)  smc hf {r['smc_hf_s']:.2f}s "
            f"({r['smc_hf_over_smc_vllm']:.2f}x vllm)  tokens/block computed "
            f"{a['computed_per_block']:.0f} of {a['requested_per_block']:.0f} requested "
            f"(unaligned {u['computed_per_block']:.0f} of {u['requested_per_block']:.0f})",
            flush=True,
        )
    info.update(loadavg_end=list(os.getloadavg()), prompt_tokens=len(ids))
    import vllm

    info["vllm"] = vllm.__version__
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    config = {k: v for k, v in vars(args).items()}
    body = dict(benchmark="smc_vllm", command=command, goal=GOAL, machine=info, config=config)
    out.write_text(json.dumps(body | dict(results=res), indent=2))
    _markdown(res, info, args, command)
    print(f"wrote {out} and {args.markdown}")


def _markdown(res, info, args, command) -> None:
    name, K, P = Path(args.model).name, args.block, info["prompt_tokens"]
    ends = res[0]["aligned"]["block_ends"]
    lines = [
        f"### smc on vLLM (cpu, {name}, K = {K}, prompt length {P})",
        "",
        f"`{command}`",
        "",
        f"vLLM {info['vllm']} (fp32, prefix caching, KV block {KV_BLOCK}, engine start "
        f"{info['engine_start_s']:.0f} s) against vLLM's own n=N sampling and against SMC "
        f"on HF transformers {info['transformers']} ({info['torch_threads']} torch "
        f"threads), all in one process; {args.new_tokens} new tokens (no EOS), TokenMask "
        f"twist banning {args.banned_frac:.0%} of the vocab, resampling considered every "
        f"K = {K} tokens, ess_threshold {args.ess_threshold}; medians of "
        f"{args.repeats} interleaved runs. Aligned (the default, `align_blocks=True`): "
        f"block ends at t = {', '.join(map(str, ends))}; unaligned: every {K} tokens. "
        f"Machine: {info['cpu_count']} CPUs, {info['platform']}, load avg "
        f"{info['loadavg_start'][0]:.1f} -> {info['loadavg_end'][0]:.1f}.",
        "",
        "| N | vLLM n=N s | SMC vLLM s | SMC vLLM / n=N | <= 1.3 | unaligned / n=N "
        "| SMC HF s | SMC HF / SMC vLLM | computed / requested per block | unaligned "
        "| resampling steps |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in res:
        a, u = r["aligned"], r["unaligned"]
        lines.append(
            f"| {r['particles']} | {r['vllm_n_s']:.2f} | {r['smc_vllm_s']:.2f} "
            f"| **{r['smc_vllm_over_vllm_n']:.2f}** | {'yes' if r['goal_met'] else 'NO'} "
            f"| {r['unaligned_over_vllm_n']:.2f} | {r['smc_hf_s']:.2f} "
            f"| {r['smc_hf_over_smc_vllm']:.2f} "
            f"| {a['computed_per_block']:.0f} / {a['requested_per_block']:.0f} "
            f"| {u['computed_per_block']:.0f} / {u['requested_per_block']:.0f} "
            f"| {a['resampling_steps']} of {len(a['block_ends']) - 1} |"
        )
    report.write_section(args.markdown, f"smc_vllm:cpu:{name}:K{K}", lines)
