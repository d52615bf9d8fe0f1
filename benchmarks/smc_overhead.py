"""Overhead of `llmsample.smc_generate` over plain sampling with `model.generate`.

Each row also times the drop-in form, `model.generate(custom_generate=llmsample.smc_decoding)`
with the same particles and `num_return_sequences=N`, against plain `generate` (goal <= 1.05).

Same model, same prompts, same N rows per prompt, exactly T new tokens on both sides
(the model has no EOS token). SMC runs a cheap token-level potential (a banned-token
mask used as the twist) so weights change every step and resampling really happens.
The goal is smc/generate <= 1.10: SMC needs no extra forward passes.

    python benchmarks/smc_overhead.py                                  # CPU defaults
    python benchmarks/smc_overhead.py --device cuda --dtype bfloat16 \
        --particles 16 64 256 --layers 12 --hidden 768 --vocab 32000    # a GPU run
    python benchmarks/smc_overhead.py --model smollm2-135m-instruct --potential mask text
    python benchmarks/smc_overhead.py --backend vllm --model smollm2-135m-instruct --threads 1

``--model`` times a real model (any ``llmsample.load_model`` name or folder) on a chat
prompt instead of a random one. ``--potential text`` swaps the token mask for a text
potential whose twist decodes every particle's text at every step (a soft concept-coverage
twist, ``ConceptCoverage``): the cost to watch on a large vocabulary.

Writes the JSON to --out and replaces this benchmark's section for the device in
--markdown (between <!-- smc_overhead:DEVICE --> markers), leaving other sections.
"""

import argparse
import functools
import json
import os
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import report  # noqa: E402  (benchmarks/report.py: the script's own folder)
import torch  # noqa: E402
from transformers import AutoModelForCausalLM, GPT2Config, LlamaConfig  # noqa: E402

import llmsample  # noqa: E402
from llmsample.hf.prompts import encode_prompts  # noqa: E402
from llmsample.hf.session import vocab_size  # noqa: E402
from llmsample.potentials import TokenMask  # noqa: E402

GOAL = 1.10
GOAL_DECODING = 1.05  # generate(custom_generate=smc_decoding) / generate


def build_model(args):
    """(model, tokenizer): --model's, pretrained or random-init; else a random one, no tokenizer."""
    if args.model and args.random_init:  # the architecture and tokenizer, not the weights
        from transformers import AutoConfig, AutoTokenizer

        torch.manual_seed(args.seed)
        model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(args.model)).eval()
        tok = AutoTokenizer.from_pretrained(args.model)
        return model.to(device=args.device, dtype=getattr(torch, args.dtype)), tok
    if args.model:
        model, tok = llmsample.load_model(args.model, device=args.device)
        return model.to(dtype=getattr(torch, args.dtype)), tok
    common = dict(vocab_size=args.vocab, bos_token_id=None, eos_token_id=None, pad_token_id=None)
    if args.arch == "gpt2":
        cfg = GPT2Config(
            n_layer=args.layers,
            n_embd=args.hidden,
            n_head=args.hidden // 64,
            n_positions=256,
            **common,
        )
    else:
        cfg = LlamaConfig(
            hidden_size=args.hidden,
            intermediate_size=int(2.75 * args.hidden),
            num_hidden_layers=args.layers,
            num_attention_heads=args.hidden // 64,
            num_key_value_heads=max(1, args.hidden // 128),
            max_position_embeddings=256,
            **common,
        )
    torch.manual_seed(args.seed)
    model = AutoModelForCausalLM.from_config(cfg).eval()
    return model.to(device=args.device, dtype=getattr(torch, args.dtype)), None


def build_prompt(args, tok, g):
    """[B, P] prompt ids: random tokens (random model), a chat prompt (a chat template) or
    a text prompt of at most P tokens (a real model without one)."""
    if tok is not None and getattr(tok, "chat_template", None):
        text = "Write one short sentence about a dog, a ball and a park."
        ids = encode_prompts(tok, [text] * args.batch, chat=True).input_ids
    elif tok is not None:  # a real model without a chat template: a text prompt, cut to P
        text = "ROMEO:\nBut soft, what light through yonder window breaks? It is the east, and"
        one = tok(text, add_special_tokens=False).input_ids[: args.prompt_len]
        ids = torch.tensor([one] * args.batch)
    else:
        ids = torch.randint(1, args.vocab, (args.batch, args.prompt_len), generator=g)
    return ids.to(args.device), torch.ones_like(ids, device=args.device)


def build_potential(kind, args, vocab, g):
    """The SMC twist: a random TokenMask (mask) or a soft ConceptCoverage (text)."""
    if kind == "mask":
        banned = torch.randperm(vocab, generator=g)[: int(args.banned_frac * vocab)]
        return TokenMask(banned=banned.tolist())
    # a text potential with a prefix twist: every particle's text is decoded and its words
    # lemmatized every step (soft, so a random-weight model never zeroes it)
    from llmsample.potentials.concepts import ConceptCoverage

    return ConceptCoverage("dog", "ball", "park", beta=3.0, as_twist=True)


def timed(fn, device):
    """(seconds, result) of fn(), synchronized on cuda."""
    if device == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    out = fn()
    if device == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - t0, out


SAMPLING = dict(  # plain ancestral sampling: the whole distribution, no EOS
    do_sample=True, top_k=0, top_p=1.0, temperature=1.0, pad_token_id=0, eos_token_id=None
)
ORDER = ["gen", "smc", "dec"]


def make_runs(model, tok, args, n, ids, mask, potential):
    """The three timed calls, each taking a seed: generate, smc_generate, the drop-in."""
    T = args.new_tokens
    prompt = dict(input_ids=ids, attention_mask=mask)
    knobs = dict(potential=potential, twist="prefix", num_particles=n, max_new_tokens=T)
    knobs.update(ess_threshold=args.ess_threshold)
    decoding = functools.partial(llmsample.smc_decoding, tokenizer=tok)

    def gen(seed):  # the seed is unused: the caller's torch.manual_seed seeds it
        with torch.inference_mode():
            return model.generate(
                **prompt, **SAMPLING, num_return_sequences=n, max_new_tokens=T, min_new_tokens=T
            )

    def smc(seed):
        return llmsample.smc_generate(
            model, tok, **prompt, **knobs, eos_token_id=[], pad_token_id=0, seed=seed
        )

    def dec(seed):  # the drop-in: generate's own entry, SMC inside
        with torch.inference_mode():
            return model.generate(
                **prompt,
                **SAMPLING,
                **knobs,
                custom_generate=decoding,
                num_return_sequences=n,
                seed=seed,
            )

    return dict(gen=gen, smc=smc, dec=dec)


def run_interleaved(runs, args, n, shape):
    """Time args.repeats rounds of the runs, who goes first rotating; check every shape."""
    B, P, T = shape
    times = {which: [] for which in ORDER}
    resampled, last = [], None
    for r in range(args.repeats):
        for which in ORDER[r % 3 :] + ORDER[: r % 3]:
            torch.manual_seed(args.seed + r)
            dt, out = timed(functools.partial(runs[which], args.seed + r), args.device)
            times[which].append(dt)
            if which == "smc":
                assert out.sequences.shape == (B, n, P + T), out.sequences.shape
                resampled.append(int(out.resampled.sum()))
                last = out
            else:
                assert out.shape == (B * n, P + T), out.shape
    return times, resampled, last


def pair_ratio(base, other):
    """The median ratio of runs made in the same round."""
    return statistics.median(b / a for a, b in zip(base, other))


def summarize(n, shape, times, resampled, smc_out):
    """One result row: medians, ratios, throughputs and the raw times."""
    B, P, T = shape
    t_gen, t_smc, t_dec = times["gen"], times["smc"], times["dec"]
    g, s, d = statistics.median(t_gen), statistics.median(t_smc), statistics.median(t_dec)
    return dict(
        particles=n,
        gen_s=g,
        smc_s=s,
        ratio=s / g,
        pair_ratio=pair_ratio(t_gen, t_smc),
        min_ratio=min(t_smc) / min(t_gen),
        gen_tok_s=B * n * T / g,
        smc_tok_s=B * n * T / s,
        gen_forward_tokens=B * n * (P + T - 1),
        smc_forward_tokens=smc_out.num_forward_tokens,
        resampling_steps=statistics.median(resampled),
        steps=T,
        goal_met=s / g <= GOAL,
        decoding_s=d,
        decoding_ratio=d / g,
        decoding_pair_ratio=pair_ratio(t_gen, t_dec),
        decoding_goal_met=d / g <= GOAL_DECODING,
        gen_times=t_gen,
        smc_times=t_smc,
        decoding_times=t_dec,
        resampling_per_run=resampled,
    )


def bench(model, tok, args, n, ids, mask, potential):
    """Warm up, then time generate, smc_generate and the drop-in at N = n particles."""
    shape = (*ids.shape, args.new_tokens)
    runs = make_runs(model, tok, args, n, ids, mask, potential)
    for which in ORDER:  # warm-up
        timed(functools.partial(runs[which], 0), args.device)
    times, resampled, smc_out = run_interleaved(runs, args, n, shape)
    return summarize(n, shape, times, resampled, smc_out)


def markdown(res, info, args, command):
    """Replace this run's section of args.markdown with its table."""
    model = args.model or f"{args.arch} {args.layers}x{args.hidden}"
    P = info["prompt_tokens"]
    name = "random" if not args.model else Path(args.model).name + "-arch" * args.random_init
    key = f"smc_overhead:{args.device}:{name}:prompt{P}"
    potentials = {
        "mask": f"TokenMask banning {args.banned_frac:.0%} of the vocab",
        "text": "ConceptCoverage(dog, ball, park) as twist (decodes every text each step)",
    }
    lines = [
        f"<!-- {key} -->",
        f"### smc_overhead ({args.device}, {model}, prompt length {P})",
        "",
        f"`{command}`",
        "",
        f"{model}, vocab {info['vocab']}, "
        f"{'pretrained' if args.model and not args.random_init else 'random init'}, "
        f"{args.dtype}; {args.batch} prompt(s) of {P} tokens, "
        f"{args.new_tokens} new tokens, medians of {args.repeats} interleaved runs. "
        f"SMC twists: {'; '.join(f'{k}: {potentials[k]}' for k in args.potential)}; "
        f"ess_threshold {args.ess_threshold}. Machine: {info['device_name']}, "
        f"{info['cpu_count']} CPUs ({info['torch_threads']} torch threads), "
        f"{info['platform']}, torch {info['torch']}, transformers {info['transformers']}, "
        f"load avg {info['loadavg_start'][0]:.1f} -> {info['loadavg_end'][0]:.1f}.",
        "",
        "| potential | N | generate s | smc s | smc/gen (medians) | median pair ratio "
        "| smc/gen (mins) | gen tok/s | smc tok/s | fwd tokens gen / smc | resampling steps "
        "| <= 1.10 | generate(custom_generate=smc_decoding) s | its /gen (medians, pairs) "
        "| <= 1.05 |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in res:
        lines.append(
            f"| {r['potential']} | {r['particles']} | {r['gen_s']:.3f} | {r['smc_s']:.3f} "
            f"| {r['ratio']:.2f} "
            f"| {r['pair_ratio']:.2f} | {r['min_ratio']:.2f} "
            f"| {r['gen_tok_s']:.0f} | {r['smc_tok_s']:.0f} "
            f"| {r['gen_forward_tokens']} / {r['smc_forward_tokens']} "
            f"| {r['resampling_steps']:g} of {r['steps'] - 1} "
            f"| {'yes' if r['goal_met'] else 'NO'} "
            f"| {r['decoding_s']:.3f} | {r['decoding_ratio']:.2f}, {r['decoding_pair_ratio']:.2f} "
            f"| {'yes' if r['decoding_goal_met'] else 'NO'} |"
        )
    report.write_section(args.markdown, key, lines[1:])


def build_parser():
    """The command-line flags."""
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default=None, help="a real model: load_model name or folder")
    p.add_argument(
        "--random-init",
        action="store_true",
        help="with --model FOLDER: its config and tokenizer with random weights (the same "
        "compute; for machines the weights cannot reach)",
    )
    p.add_argument("--potential", nargs="+", choices=["mask", "text"], default=["mask"])
    p.add_argument("--arch", choices=["gpt2", "llama"], default="gpt2")
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--vocab", type=int, default=8192)
    p.add_argument("--particles", type=int, nargs="+", default=[16, 64])
    p.add_argument("--batch", type=int, default=1, help="number of prompts")
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--prompt-len", type=int, default=16)
    p.add_argument("--repeats", type=int, default=11)
    p.add_argument("--banned-frac", type=float, default=0.1)
    p.add_argument("--ess-threshold", type=float, default=0.5)
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch default)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="benchmarks/results/smc_overhead.json")
    p.add_argument("--markdown", default="benchmarks/RESULTS.md")
    p.add_argument(
        "--backend",
        choices=["hf", "vllm"],
        default="hf",
        help="vllm: SMC on a vLLM engine against vLLM's n=N sampling and SMC on HF "
        "(benchmarks/smc_vllm.py; needs the vLLM environment and --model)",
    )
    p.add_argument("--block", type=int, default=8, help="--backend vllm: K tokens per block")
    return p


def parse_args():
    """The flags, checked; --backend vllm's default --out is its own file per K."""
    p = build_parser()
    args = p.parse_args()
    if "text" in args.potential and not args.model:
        p.error("--potential text decodes text: it needs --model (a model with a tokenizer)")
    if args.backend == "vllm" and args.out == p.get_default("out"):
        args.out = f"benchmarks/results/smc_vllm_K{args.block}.json"
    return args


def print_row(kind, n, r):
    """One result row on stdout."""
    print(
        f"{kind:5s} N={n:4d}  generate {r['gen_s']:.3f}s ({r['gen_tok_s']:.0f} tok/s)  "
        f"smc {r['smc_s']:.3f}s ({r['smc_tok_s']:.0f} tok/s)  smc/gen {r['ratio']:.2f} "
        f"(pairs {r['pair_ratio']:.2f}, mins {r['min_ratio']:.2f})  "
        f"fwd tokens {r['gen_forward_tokens']}/{r['smc_forward_tokens']}  "
        f"resampled {r['resampling_steps']:g}/{r['steps'] - 1}"
        f"  goal <= {GOAL}: {'met' if r['goal_met'] else 'NOT met'}"
        f"  | custom_generate {r['decoding_s']:.3f}s, /gen {r['decoding_ratio']:.2f} "
        f"(pairs {r['decoding_pair_ratio']:.2f}), goal <= {GOAL_DECODING}: "
        f"{'met' if r['decoding_goal_met'] else 'NOT met'}",
        flush=True,
    )


def run_hf(args, info):
    """Every (potential, N) row on the HF backend; records the prompt and vocab in info."""
    model, tok = build_model(args)
    g = torch.Generator().manual_seed(args.seed)
    ids, mask = build_prompt(args, tok, g)
    info.update(prompt_tokens=ids.shape[1], vocab=vocab_size(model))
    res = []
    for kind, n in [(k, n) for k in args.potential for n in args.particles]:
        potential = build_potential(kind, args, vocab_size(model), g)
        r = dict(potential=kind, **bench(model, tok, args, n, ids, mask, potential))
        res.append(r)
        print_row(kind, n, r)
    return res


def write_json(args, command, info, res):
    """The results, machine and config as JSON at args.out."""
    body = dict(
        benchmark="smc_overhead",
        command=command,
        goal=GOAL,
        machine=info,
        config=vars(args),
        results=res,
    )
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(body, indent=2))


def main():
    """Run the benchmark on the chosen backend; write the JSON and the markdown section."""
    args = parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    command = " ".join(["python benchmarks/smc_overhead.py", *sys.argv[1:]])
    if args.backend == "vllm":
        import smc_vllm  # benchmarks/smc_vllm.py, next to this script

        smc_vllm.run(args, command)
        return
    info = report.machine_info(args.device, args.dtype)
    res = run_hf(args, info)
    info["loadavg_end"] = list(os.getloadavg())
    write_json(args, command, info, res)
    markdown(res, info, args, command)
    print(f"wrote {args.out} and {args.markdown}")


if __name__ == "__main__":
    main()
