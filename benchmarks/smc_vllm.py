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
from pathlib import Path

import report  # benchmarks/report.py, next to this script
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

import llmsample
from llmsample.hf.named_models import resolve
from llmsample.hf.prompts import encode_prompts
from llmsample.potentials import TokenMask

__all__ = ["run"]

GOAL = 1.3
PROMPT = "Write one short sentence about a dog, a ball and a park."


def _folder(name: str) -> Path:
    return Path(name) if Path(name).is_dir() else resolve(name)


def _timed(fn):
    t0 = time.perf_counter()
    out = fn()
    return time.perf_counter() - t0, out


def bench_one(llm, hf_model, tok, ids, potential, n, args) -> dict:
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    T, K = args.new_tokens, args.block
    cfg = llmsample.SMCConfig(
        num_particles=n, max_new_tokens=T, resample_every=K, ess_threshold=args.ess_threshold
    )
    kwargs = dict(input_ids=torch.tensor([ids]), potential=potential, twist="prefix")
    kwargs.update(eos_token_id=[], config=cfg)  # exactly T tokens on every side

    def plain(seed):
        params = SamplingParams(n=n, max_tokens=T, ignore_eos=True, seed=seed, detokenize=False)
        return llm.generate([TokensPrompt(prompt_token_ids=ids)], params, use_tqdm=False)

    def smc(model, seed):
        cfg.seed = seed
        return llmsample.smc_generate(model, tok, **kwargs)

    times = {"vllm_n": [], "smc_vllm": [], "smc_hf": []}
    for r in range(args.repeats):
        times["vllm_n"].append(_timed(lambda r=r: plain(r))[0])
        t, out_v = _timed(lambda r=r: smc(llm, r))
        times["smc_vllm"].append(t)
        t, out_h = _timed(lambda r=r: smc(hf_model, r))
        times["smc_hf"].append(t)
    med = {k: statistics.median(v) for k, v in times.items()}
    blocks = -(-T // K)
    P = len(ids)
    requested = sum(n * (P + b * K) + n * min(K, T - b * K) for b in range(blocks))
    return dict(
        particles=n,
        block=K,
        blocks=blocks,
        **{f"{k}_s": v for k, v in med.items()},
        all_s=times,
        smc_vllm_over_vllm_n=med["smc_vllm"] / med["vllm_n"],
        smc_hf_over_smc_vllm=med["smc_hf"] / med["smc_vllm"],
        goal_met=med["smc_vllm"] / med["vllm_n"] <= GOAL,
        computed_per_block=out_v.num_forward_tokens / blocks,
        requested_per_block=requested / blocks,
        hf_forward_per_block=out_h.num_forward_tokens / blocks,
        resampling_steps=int(out_v.resampled.any(dim=0).sum()),
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
        block_size=32,
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
    res = []
    for n in args.particles:
        r = bench_one(llm, hf_model, tok, ids, potential, n, args)
        res.append(r)
        print(
            f"N={n:4d} K={r['block']}  vllm n=N {r['vllm_n_s']:.2f}s  smc vllm "
            f"{r['smc_vllm_s']:.2f}s ({r['smc_vllm_over_vllm_n']:.2f}x, goal <= {GOAL}: "
            f"{'met' if r['goal_met'] else 'NOT met'})  smc hf {r['smc_hf_s']:.2f}s "
            f"({r['smc_hf_over_smc_vllm']:.2f}x vllm)  tokens/block computed "
            f"{r['computed_per_block']:.0f} of {r['requested_per_block']:.0f} requested",
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
    name = Path(args.model).name
    lines = [
        f"### smc on vLLM (cpu, {name}, K = {args.block}, prompt length {info['prompt_tokens']})",
        "",
        f"`{command}`",
        "",
        f"vLLM {info['vllm']} (fp32, prefix caching, KV block 32, engine start "
        f"{info['engine_start_s']:.0f} s) against vLLM's own n=N sampling and against SMC "
        f"on HF transformers {info['transformers']} ({info['torch_threads']} torch "
        f"threads), all in one process; {args.new_tokens} new tokens (no EOS), TokenMask "
        f"twist banning {args.banned_frac:.0%} of the vocab, resampling considered every "
        f"K = {args.block} tokens, ess_threshold {args.ess_threshold}; medians of "
        f"{args.repeats} interleaved runs. Machine: {info['cpu_count']} CPUs, "
        f"{info['platform']}, load avg {info['loadavg_start'][0]:.1f} -> "
        f"{info['loadavg_end'][0]:.1f}.",
        "",
        "| N | vLLM n=N s | SMC vLLM s | SMC vLLM / n=N | <= 1.3 | SMC HF s "
        "| SMC HF / SMC vLLM | tokens per block: computed / requested | resampling steps |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in res:
        lines.append(
            f"| {r['particles']} | {r['vllm_n_s']:.2f} | {r['smc_vllm_s']:.2f} "
            f"| **{r['smc_vllm_over_vllm_n']:.2f}** | {'yes' if r['goal_met'] else 'NO'} "
            f"| {r['smc_hf_s']:.2f} | {r['smc_hf_over_smc_vllm']:.2f} "
            f"| {r['computed_per_block']:.0f} / {r['requested_per_block']:.0f} "
            f"| {r['resampling_steps']} of {r['blocks'] - 1} |"
        )
    report.write_section(args.markdown, f"smc_vllm:cpu:{name}:K{args.block}", lines)
