"""Peak memory and throughput of one GFlowNet training step: ours vs gradient-through-rollout.

    python benchmarks/gfn_step.py                         # prints; writes nothing
    python benchmarks/gfn_step.py --model smollm2-135m-instruct --max-new-tokens 32 64 \
        --out benchmarks/results/gfn_step_smollm2.json --markdown benchmarks/RESULTS.md

Both variants train the same LoRA policy (``llmsample.gfn.add_lora``, targets
``all-linear``) on the same prompts, with K samples per prompt, T new tokens and the
trajectory-balance loss with a scalar log Z, and sample from the same distribution (the
untempered policy):

* **ours** (``llmsample.gfn.trainer``): rollouts with the KV cache and no autograd
  (``sample_rollouts``) -> log R = log p_base(x|c) from the same model with the adapter
  disabled (one teacher-forced pass, no grad) -> log q from ONE teacher-forced pass with
  gradients (``teacher_force(..., grad=True)``) -> TB -> backward -> AdamW step.
* **reference** (gradient through the rollout, the style of Hu et al. 2024's code): a
  sampling loop that keeps autograd on; each step runs the policy on one token per row
  with the KV cache (``use_cache=True, past_key_values``) WITH gradients, takes
  log_softmax, samples the next token (the sampling itself detached) and adds log q of the
  sampled token to a differentiable sum (rows that have stopped add nothing) -> the same
  log R pass -> TB -> backward through the whole unrolled loop -> AdamW step.

log R is the base model's log-likelihood (phi = 1): the reward's cost is the same in both
and is not what is measured. By default no stop token is used (``--stop none``: stop ids
= [], so every row generates exactly T tokens in both variants and the work is identical);
``--stop eos`` stops rows at the tokenizer's EOS (then the two variants draw different
samples and their token counts differ a little). ``tests/test_benchmark_gfn_step.py``
checks that for the same tokens the reference loop's log q equals ours (teacher forced)
and that the two losses have the same gradients, so both steps optimize the same thing.

Measurement. Each variant runs in its own fresh subprocess (so neither inherits the
other's allocator state or warm caches), in ABBA order over ``--rounds`` rounds. A process
builds the model, adapter and optimizer, runs each variant once at K=1, T=2 (so lazy
imports and thread pools are loaded before the baseline is taken), then ``--warmup``
untimed and ``--repeats`` timed steps; reported numbers are medians over all timed steps
of a variant. Per step:

* seconds (and samples/s = B*K / seconds), with phase times (sample, reward, update);
* peak memory over the baseline (model + adapter + optimizer state), the goal's number.
  On CUDA: ``torch.cuda.max_memory_allocated()`` after ``reset_peak_memory_stats()``
  minus ``memory_allocated()`` before the step (median over steps). On CPU, where torch
  keeps no such counter, the same quantity -- live tensor bytes of torch's allocator --
  is rebuilt from one extra, untimed step per process under ``torch.profiler`` with
  ``profile_memory=True``: the running sum of every allocation and free it records, and
  its maximum. The shapes are identical every step, so one step is representative.
* CPU only, as a cross-check: the process's peak RSS over the baseline RSS (VmHWM from
  /proc/self/status, reset before every timed step by writing 5 to /proc/self/clear_refs;
  ``ru_maxrss`` over the whole process where that is refused). RSS is what the OS had to
  give; it also counts glibc caching and fragmentation, so it is a little higher than
  live bytes for both variants, and it is never double counted (freed heap is reused);
* in that profiled step: the bytes of distinct tensor storages that autograd saved for
  the backward pass (``saved_tensors_hooks``; model weights excluded). Deterministic and
  allocator-independent, it explains the peaks: the reference saves the growing K/V cache
  of every layer at every step (O(T^2) bytes), ours saves one pass (O(T)).

CPU timings on a shared machine: with more runnable threads than cores, OpenMP's default
spin-waiting at the end of every parallel op can stall a step for whole scheduler time
slices. That hits the reference (about T times more, smaller ops) far harder than ours and
showed up as 10-50x slower reference steps, which would flatter ours. The workers therefore
run with ``OMP_WAIT_POLICY=PASSIVE`` (``--omp-wait-policy ''`` to leave it unset), and the
table also gives the ratio of the fastest steps.

Goals (from the issue): peak memory ours/reference <= 0.5, samples/s ours/reference >= 1.

    python benchmarks/gfn_step.py                                # CPU, shakespeare-tiny
    python benchmarks/gfn_step.py --device cuda --dtype bfloat16 --batch 4 --k 16 \\
        --max-new-tokens 128                                      # a GPU row
    python benchmarks/gfn_step.py --quick --out /tmp/q.json   # smoke test, toy model

Writes the JSON to --out and replaces this benchmark's section for the device in
--markdown (between <!-- gfn_step:DEVICE:T...:threadsN --> markers), leaving other
sections. ``--quick`` (a tiny llama over a 9-token vocabulary, T=8, one round) writes
nothing unless --out / --markdown are given.
"""

import argparse
import json
import math
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
ROOT = Path(__file__).resolve().parents[1]

import report  # noqa: E402  (benchmarks/report.py: the script's own folder)
import torch  # noqa: E402

import llmsample  # noqa: E402
from llmsample.gfn import GFNConfig, add_lora, sample_rollouts, trajectory_balance  # noqa: E402
from llmsample.hf.prompts import PromptBatch, encode_prompts  # noqa: E402
from llmsample.hf.session import cache_kwarg, output_cache, teacher_force  # noqa: E402

MEMORY_GOAL = 0.5  # peak memory ours / reference <= this
SPEED_GOAL = 1.0  # samples/s ours / reference >= this
VARIANTS = ("ours", "reference")
PROMPTS = [
    "ROMEO:",
    "JULIET:",
    "HAMLET:",
    "KING LEAR:",
    "First Citizen:",
    "MACBETH:",
    "PORTIA:",
    "OTHELLO:",
]
TOY_PROMPTS = ["a b", "c", "d e f", "g h", "a", "b c", "e", "f g"]


# ---------------------------------------------------------------------- the two steps
def _positions(mask):
    """Position ids from a left-padded attention mask (as ``llmsample.hf.session`` does)."""
    return (mask.cumsum(-1) - 1).clamp(min=0)


def _device(model) -> torch.device:
    return next(model.parameters()).device


def rollout_with_grad(
    policy,
    prompts: PromptBatch,
    num_samples: int,
    max_new_tokens: int,
    stop_ids: list[int],
    *,
    generator: torch.Generator | None = None,
    forced: torch.Tensor | None = None,
):
    """Sample K continuations per prompt keeping the autograd graph of every step.

    Returns ``(tokens [R, T], lengths [R], log_q [R])`` with rows prompt-major and
    ``log_q`` differentiable: sum over each row's tokens (the stop token included) of
    log q(x_t | c, x_<t). ``forced`` [R, T] replays given tokens instead of sampling
    (to check this loop against teacher forcing); it must use the pad id after a stop.
    """
    device = _device(policy)
    prompts = prompts.to(device)
    B, K, T = prompts.size, num_samples, max_new_tokens
    R = B * K
    out = policy(
        input_ids=prompts.input_ids,
        attention_mask=prompts.attention_mask,
        position_ids=_positions(prompts.attention_mask),
        use_cache=True,
        logits_to_keep=1,
    )
    cache = output_cache(out)
    expand = torch.arange(B, device=device).repeat_interleave(K)  # [B] -> [B*K], like ours
    cache.reorder_cache(expand)
    logits = out.logits[:, -1].index_select(0, expand)
    mask = prompts.attention_mask.index_select(0, expand)
    pos = _positions(prompts.attention_mask)[:, -1].index_select(0, expand)
    stop = torch.as_tensor(stop_ids, dtype=torch.long, device=device)
    tokens = torch.full((R, T), prompts.pad_token_id, dtype=torch.long, device=device)
    lengths = torch.zeros(R, dtype=torch.long, device=device)
    done = torch.zeros(R, dtype=torch.bool, device=device)
    log_q = torch.zeros(R, device=device)
    for t in range(T):
        logp = torch.log_softmax(logits.float(), dim=-1)  # [R, V], in the graph
        if forced is None:
            new = torch.multinomial(logp.detach().exp(), 1, generator=generator)[:, 0]
        else:
            new = forced[:, t].to(device)
        new = torch.where(done, prompts.pad_token_id, new)
        lp = logp.gather(1, new[:, None])[:, 0]
        log_q = log_q + torch.where(done, torch.zeros_like(lp), lp)  # finished rows: 0
        tokens[:, t] = new
        lengths += (~done).long()
        done = done | torch.isin(new, stop)
        if bool(done.all()) or t == T - 1:
            break
        mask = torch.cat([mask, mask.new_ones((R, 1))], dim=1)
        pos = pos + 1
        out = policy(
            input_ids=new[:, None],
            attention_mask=mask,
            position_ids=pos[:, None],
            use_cache=True,
            **{cache_kwarg(policy): cache},
        )
        cache = output_cache(out)
        logits = out.logits[:, -1]
    return tokens, lengths, log_q


def log_reward(policy, prompts: PromptBatch, index, tokens, lengths):
    """log R = log p_base(x | c): the same model with the adapter disabled, no grad."""
    mask = torch.arange(tokens.shape[1], device=tokens.device) < lengths[:, None]
    with policy.disable_adapter():
        tf = teacher_force(
            policy,
            prompts.input_ids[index],
            prompts.attention_mask[index],
            tokens,
            mask.long(),
        )
    return tf.token_logp.sum(1).float().clone()  # a normal tensor (not inference)


class Setup:
    """Policy + log Z + optimizer + prompts: everything both steps share."""

    def __init__(self, args):
        self.args = args
        if args.model == "toy":
            from llmsample.diagnostics.exact import toy_model, toy_tokenizer

            model, tok = toy_model("llama"), toy_tokenizer(with_pad=True)
            model = model.to(device=args.device, dtype=getattr(torch, args.dtype)).eval()
            texts = TOY_PROMPTS
        else:
            dtype = getattr(torch, args.dtype)
            model, tok = llmsample.load_model(args.model, device=args.device, dtype=dtype)
            texts = PROMPTS
        texts = [texts[i % len(texts)] for i in range(args.batch)]
        self.tokenizer = tok
        self.stop_ids = [] if args.stop == "none" else [tok.eos_token_id]
        cfg = GFNConfig(lora_rank=args.lora_rank, target_modules=["all-linear"])
        torch.manual_seed(args.seed)  # same LoRA init in every process
        self.policy = add_lora(model, cfg)
        self.policy.eval()  # no dropout: log q must be exact
        self.log_z = torch.nn.Parameter(torch.zeros((), device=args.device))
        lora = [p for p in self.policy.parameters() if p.requires_grad]
        self.opt = torch.optim.AdamW(
            [dict(params=lora, lr=cfg.lr), dict(params=[self.log_z], lr=cfg.log_z_lr)]
        )
        self.prompts = encode_prompts(tok, texts).to(args.device)
        self.gen = torch.Generator(device=args.device).manual_seed(args.seed)
        self.weights = {p.untyped_storage().data_ptr() for p in self.policy.parameters()}
        self.weights |= {b.untyped_storage().data_ptr() for b in self.policy.buffers()}

    def _sync(self):
        if self.args.device == "cuda":
            torch.cuda.synchronize()

    def step(self, variant: str, k: int | None = None, steps: int | None = None) -> dict:
        """One optimizer step of ``variant``; returns loss stats and phase times."""
        B, K, T = self.prompts.size, k or self.args.k, steps or self.args.max_new_tokens[0]
        policy, prompts = self.policy, self.prompts
        self._sync()
        t0 = time.perf_counter()
        if variant == "ours":
            ro = sample_rollouts(policy, prompts, K, T, self.stop_ids, generator=self.gen)
            tokens, lengths, index = ro.tokens, ro.lengths, ro.prompt_index
        else:
            tokens, lengths, log_q = rollout_with_grad(
                policy, prompts, K, T, self.stop_ids, generator=self.gen
            )
            index = torch.arange(B, device=tokens.device).repeat_interleave(K)
        self._sync()
        t1 = time.perf_counter()
        log_r = log_reward(policy, prompts, index, tokens, lengths)
        self._sync()
        t2 = time.perf_counter()
        if variant == "ours":
            mask = torch.arange(tokens.shape[1], device=tokens.device) < lengths[:, None]
            tf = teacher_force(
                policy,
                prompts.input_ids[index],
                prompts.attention_mask[index],
                tokens,
                mask.long(),
                grad=True,
            )
            log_q = tf.token_logp.sum(1)
        loss = trajectory_balance(log_q.view(B, K), log_r.view(B, K), self.log_z)
        loss.backward()
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        self._sync()
        t3 = time.perf_counter()
        return dict(
            step_s=t3 - t0,
            sample_s=t1 - t0,
            reward_s=t2 - t1,
            update_s=t3 - t2,
            loss=float(loss.detach()),
            log_q=float(log_q.detach().mean()),
            log_r=float(log_r.mean()),
            log_z=float(self.log_z.detach()),
            tokens=int(lengths.sum()),
        )

    def profiled_step(self, variant: str) -> tuple[int, int | None]:
        """One untimed step: (bytes of the distinct non-weight storages autograd saves for
        the backward, peak live bytes of torch's CPU allocator over the step's start).

        The second is the CPU analogue of ``torch.cuda.max_memory_allocated``: the running
        sum of every allocation and free the profiler records (``profile_memory=True``),
        allocator caching and fragmentation excluded. None on CUDA.
        """
        from torch.profiler import ProfilerActivity, profile

        seen: dict[int, int] = {}

        def pack(t):
            s = t.untyped_storage()
            if s.data_ptr() not in self.weights:
                seen[s.data_ptr()] = s.nbytes()
            return t

        cpu = self.args.device == "cpu"
        with profile(activities=[ProfilerActivity.CPU], profile_memory=cpu) as prof:
            with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
                self.step(variant)
        peak = None
        if cpu:
            events = prof.profiler.kineto_results.events()
            allocs = sorted((e.start_ns(), e.nbytes()) for e in events if e.name() == "[memory]")
            live = peak = 0
            for _, nbytes in allocs:
                live += nbytes
                peak = max(peak, live)
        return sum(seen.values()), peak


# ---------------------------------------------------------------------- memory probes
def _status_kb(field: str) -> int | None:
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


class Memory:
    """Peak bytes over a baseline, per step (see the module docstring)."""

    def __init__(self, device: str):
        self.device = device
        self.method = "cuda max_memory_allocated"
        if device != "cuda":
            try:
                with open("/proc/self/clear_refs", "w") as fh:
                    fh.write("5")
                self.method = "peak RSS (VmHWM, reset per step)"
            except OSError:
                self.method = "peak RSS (ru_maxrss, whole process)"
        self.baseline = self.current()

    def current(self) -> int:
        if self.device == "cuda":
            return torch.cuda.memory_allocated()
        rss = _status_kb("VmRSS")
        if rss is None:  # pragma: no cover - not Linux
            return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        return rss * 1024

    def start(self) -> None:
        if self.device == "cuda":
            torch.cuda.synchronize()
            self.baseline = torch.cuda.memory_allocated()  # model + optimizer state
            torch.cuda.reset_peak_memory_stats()
        elif self.method.startswith("peak RSS (VmHWM"):
            with open("/proc/self/clear_refs", "w") as fh:
                fh.write("5")

    def peak(self) -> int:
        """Peak since :meth:`start`, minus the baseline."""
        if self.device == "cuda":
            torch.cuda.synchronize()
            return torch.cuda.max_memory_allocated() - self.baseline
        if self.method.startswith("peak RSS (VmHWM"):
            return _status_kb("VmHWM") * 1024 - self.baseline
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - self.baseline


def worker(args) -> dict:
    """Run one variant in this (fresh) process; return its per-step measurements."""
    if args.threads:
        torch.set_num_threads(args.threads)
    setup = Setup(args)
    for variant in VARIANTS:  # load every code path once (lazy imports, thread pools)
        setup.step(variant, k=1, steps=2)
    mem = Memory(args.device)  # baseline: model + adapter + optimizer, before real steps
    baseline = mem.baseline
    steps = []
    for i in range(args.warmup + args.repeats):
        mem.start()
        rec = setup.step(args.worker)
        rec["peak_bytes"] = mem.peak()
        if i >= args.warmup:
            steps.append(rec)
    saved, allocated = setup.profiled_step(args.worker)
    return dict(
        variant=args.worker,
        memory_method=mem.method,
        baseline_bytes=baseline,
        saved_bytes=saved,
        allocated_peak_bytes=allocated,
        steps=steps,
        torch_threads=torch.get_num_threads(),
        trainable_params=sum(p.numel() for p in setup.policy.parameters() if p.requires_grad),
    )


# ---------------------------------------------------------------------- driver
WORKER_FLAGS = (
    "model",
    "device",
    "dtype",
    "batch",
    "k",
    "stop",
    "lora_rank",
    "warmup",
    "repeats",
    "threads",
    "seed",
)


def run_worker(args, variant: str, T: int) -> dict:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", variant]
    cmd += ["--max-new-tokens", str(T)]
    for name in WORKER_FLAGS:
        cmd += [f"--{name.replace('_', '-')}", str(getattr(args, name))]
    env = dict(os.environ)
    if args.threads:
        env["OMP_NUM_THREADS"] = str(args.threads)
    if args.omp_wait_policy:
        env["OMP_WAIT_POLICY"] = args.omp_wait_policy
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=env)
    if proc.returncode != 0:
        raise RuntimeError(f"{variant} worker (T={T}) failed:\n{proc.stderr[-4000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def machine_info(args):
    return report.machine_info(args.device, args.dtype)


def summarize(runs: list[dict], rows: int) -> dict:
    steps = [s for r in runs for s in r["steps"]]
    med = {k: statistics.median(s[k] for s in steps) for k in steps[0] if k.endswith("_s")}
    step_peak = statistics.median(s["peak_bytes"] for s in steps) / 2**20
    cpu = runs[0]["allocated_peak_bytes"] is not None
    alloc = statistics.median(r["allocated_peak_bytes"] for r in runs) / 2**20 if cpu else None
    return dict(
        step_s=med["step_s"],
        samples_per_s=rows / med["step_s"],
        sample_s=med["sample_s"],
        reward_s=med["reward_s"],
        update_s=med["update_s"],
        min_step_s=min(s["step_s"] for s in steps),
        # the goal's memory: live tensor bytes over the baseline (CUDA: max_memory_allocated
        # per step, median; CPU: torch's allocator in one profiled step per process)
        peak_mb=alloc if cpu else step_peak,
        peak_method=(
            "torch CPU allocator (profiler), live bytes" if cpu else runs[0]["memory_method"]
        ),
        rss_peak_mb=step_peak if cpu else None,  # CPU: peak RSS over the baseline, median
        rss_method=runs[0]["memory_method"] if cpu else None,
        saved_mb=statistics.median(r["saved_bytes"] for r in runs) / 2**20,
        baseline_mb=statistics.median(r["baseline_bytes"] for r in runs) / 2**20,
        tokens_per_step=statistics.median(s["tokens"] for s in steps),
        losses=[s["loss"] for s in steps],
        losses_finite=all(math.isfinite(s["loss"]) for s in steps),
        log_q=[s["log_q"] for s in steps],
        log_r=[s["log_r"] for s in steps],
        torch_threads=runs[0]["torch_threads"],
        trainable_params=runs[0]["trainable_params"],
        step_times=[s["step_s"] for s in steps],
        step_peak_mb=[s["peak_bytes"] / 2**20 for s in steps],
        processes=len(runs),
    )


def compare(o: dict, r: dict) -> dict:
    mem, speed = o["peak_mb"] / r["peak_mb"], o["samples_per_s"] / r["samples_per_s"]
    rss = o["rss_peak_mb"] / r["rss_peak_mb"] if o["rss_peak_mb"] and r["rss_peak_mb"] else None
    return dict(
        memory_ratio=mem,
        throughput_ratio=speed,
        throughput_ratio_of_mins=r["min_step_s"] / o["min_step_s"],
        rss_ratio=rss,
        saved_ratio=o["saved_mb"] / r["saved_mb"],
        # same seed, same policy, same distribution: both variants draw the very same tokens
        # (equal log R) until float rounding of their different (equal in exact arithmetic)
        # gradients moves a sample across a boundary. A sanity check, not a goal.
        same_sample_steps=sum(
            math.isclose(a, b, rel_tol=1e-5, abs_tol=1e-4) for a, b in zip(o["log_r"], r["log_r"])
        ),
        timed_steps=len(o["log_r"]),
        memory_goal_met=mem <= MEMORY_GOAL,
        throughput_goal_met=speed >= SPEED_GOAL,
    )


def _mb(x) -> str:
    return "-" if x is None else f"{x:.0f}"


def section_key(args) -> str:
    key = f"gfn_step:{args.device}:T{'-'.join(map(str, args.max_new_tokens))}"
    return key + (f":threads{args.threads}" if args.device == "cpu" else "")


def markdown(results: list[dict], info: dict, args, command: str) -> None:
    key = section_key(args)
    o = results[0]["ours"]
    cpu = args.device == "cpu"
    stop = "no stop token (every row generates exactly T tokens)" if args.stop == "none" else "EOS"
    peak = (
        "peak MB = live tensor bytes of torch's CPU allocator over the step (profiler, one "
        "untimed step per process); peak RSS MB = the process's peak RSS over its "
        "post-load RSS, median over timed steps"
        if cpu
        else "peak MB = torch.cuda.max_memory_allocated over the pre-step allocation, median"
    )
    lines = [
        f"<!-- {key} -->",
        f"### gfn_step ({args.device}, T = {', '.join(map(str, args.max_new_tokens))}"
        + (f", {args.threads} threads)" if cpu else ")"),
        "",
        f"`{command}`",
        "",
        f"One GFlowNet TB training step of {args.model} + LoRA (all-linear, r={args.lora_rank}, "
        f"{o['trainable_params']:,} trainable params), {args.dtype}; {args.batch} prompt(s) x "
        f"K={args.k} samples = {args.batch * args.k} rows, T new tokens, {stop}; "
        "log R = log p_base (adapter off), scalar log Z, AdamW. **ours** = rollouts "
        "with KV cache and no autograd + one teacher-forced pass with gradients; "
        "**reference** = sampling loop with KV cache and autograd on, backward through the "
        f"rollout. Each variant in its own fresh process, ABBA over {args.rounds} round(s), "
        f"{args.warmup} warm-up + {args.repeats} timed steps per process; medians over the "
        f"{args.rounds * args.repeats} timed steps. {peak}; autograd saved MB = distinct "
        "storages saved for backward (weights excluded). Machine: "
        f"{info['device_name']}, {info['cpu_count']} CPUs ({o['torch_threads']} torch threads, "
        f"OMP_WAIT_POLICY={args.omp_wait_policy or 'unset'}), "
        f"{info['platform']}, torch {info['torch']}, transformers {info['transformers']}, "
        f"load avg {info['loadavg_start'][0]:.1f} -> {info['loadavg_end'][0]:.1f}"
        + (" (other jobs shared the CPUs: timings are noisy, hence medians)." if cpu else "."),
        "",
        "| T | variant | s/step | samples/s | sample s | reward s | update s | peak MB "
        "| peak RSS MB | autograd saved MB | tokens/step | loss finite |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for res in results:
        for name in VARIANTS:
            v = res[name]
            lines.append(
                f"| {res['max_new_tokens']} | {name} | {v['step_s']:.3f} "
                f"| {v['samples_per_s']:.1f} | {v['sample_s']:.3f} "
                f"| {v['reward_s']:.3f} | {v['update_s']:.3f} | {_mb(v['peak_mb'])} "
                f"| {_mb(v['rss_peak_mb'])} | {_mb(v['saved_mb'])} | {v['tokens_per_step']:g} "
                f"| {'yes' if v['losses_finite'] else 'NO'} |"
            )
    lines += [
        "",
        "| T | peak memory ours/ref (goal <= 0.5) | samples/s ours/ref (goal >= 1) "
        "| same, from min step times | peak RSS ours/ref | autograd saved ours/ref "
        "| steps with identical samples |",
        "|---|---|---|---|---|---|---|",
    ]
    for res in results:
        c = res["comparison"]
        rss = "-" if c["rss_ratio"] is None else f"{c['rss_ratio']:.2f}"
        lines.append(
            f"| {res['max_new_tokens']} | **{c['memory_ratio']:.2f}** "
            f"({'met' if c['memory_goal_met'] else 'NOT met'}) "
            f"| **{c['throughput_ratio']:.2f}** "
            f"({'met' if c['throughput_goal_met'] else 'NOT met'}) "
            f"| {c['throughput_ratio_of_mins']:.2f} | {rss} | {c['saved_ratio']:.2f} "
            f"| {c['same_sample_steps']} of {c['timed_steps']} |"
        )
    report.write_section(args.markdown, key, lines[1:])


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument(
        "--model", default=None, help="load_model name, or 'toy' (default shakespeare-tiny)"
    )
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default="float32")
    p.add_argument("--batch", type=int, default=2, help="number of prompts")
    p.add_argument("--k", type=int, default=8, help="samples per prompt")
    p.add_argument("--max-new-tokens", type=int, nargs="+", default=[64], help="T (a sweep)")
    p.add_argument("--stop", choices=["none", "eos"], default="none")
    p.add_argument("--lora-rank", type=int, default=8)
    p.add_argument("--warmup", type=int, default=1, help="untimed steps per process")
    p.add_argument("--repeats", type=int, default=5, help="timed steps per process")
    p.add_argument("--rounds", type=int, default=2, help="ABBA rounds of fresh processes")
    p.add_argument("--threads", type=int, default=2, help="torch threads (0: torch default)")
    p.add_argument(
        "--omp-wait-policy",
        default="PASSIVE",
        help="OMP_WAIT_POLICY of the worker processes ('' = leave unset); see the docstring",
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quick", action="store_true", help="tiny settings, for tests")
    p.add_argument(
        "--out", default="", help="write the JSON here (e.g. benchmarks/results/gfn_step.json)"
    )
    p.add_argument(
        "--markdown", default="", help="add the table to this file (e.g. benchmarks/RESULTS.md)"
    )
    p.add_argument("--worker", choices=VARIANTS, default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.model is None:
        args.model = "toy" if args.quick else "shakespeare-tiny"
    if args.quick:
        args.batch, args.k, args.max_new_tokens = 2, 2, [8]
        args.warmup, args.repeats, args.rounds = 1, 2, 1
    return args


def main(argv=None) -> dict:
    args = parse_args(argv)
    if args.worker:
        print(json.dumps(worker(args)), flush=True)
        return {}
    command = " ".join(["python benchmarks/gfn_step.py", *(sys.argv[1:] if argv is None else argv)])
    info = machine_info(args)
    order = [v for r in range(args.rounds) for v in (VARIANTS if r % 2 == 0 else VARIANTS[::-1])]
    results = []
    for T in args.max_new_tokens:
        runs: dict[str, list[dict]] = {v: [] for v in VARIANTS}
        for variant in order:  # ABBA: ours, reference, reference, ours, ...
            runs[variant].append(run_worker(args, variant, T))
            s = runs[variant][-1]["steps"]
            med = statistics.median(x["step_s"] for x in s)
            print(f"T={T} {variant:9s} process: median {med:.3f} s/step", flush=True)
        res = {v: summarize(runs[v], args.batch * args.k) for v in VARIANTS}
        res["comparison"] = c = compare(res["ours"], res["reference"])
        res = dict(max_new_tokens=T, **res)
        results.append(res)
        for v in VARIANTS:
            x = res[v]
            print(
                f"T={T} {v:9s} {x['step_s']:.3f} s/step ({x['samples_per_s']:.1f} samples/s; "
                f"sample {x['sample_s']:.3f} reward {x['reward_s']:.3f} update "
                f"{x['update_s']:.3f})  peak {_mb(x['peak_mb'])} MB  peak RSS "
                f"{_mb(x['rss_peak_mb'])} MB  autograd saved {_mb(x['saved_mb'])} MB  "
                f"tokens/step {x['tokens_per_step']:g}  loss finite {x['losses_finite']}"
            )
        print(
            f"T={T} ours/reference: memory {c['memory_ratio']:.2f} (goal <= {MEMORY_GOAL}: "
            f"{'met' if c['memory_goal_met'] else 'NOT met'}), throughput "
            f"{c['throughput_ratio']:.2f} (goal >= {SPEED_GOAL}: "
            f"{'met' if c['throughput_goal_met'] else 'NOT met'}; mins "
            f"{c['throughput_ratio_of_mins']:.2f}), identical samples in "
            f"{c['same_sample_steps']} of {c['timed_steps']} steps",
            flush=True,
        )
    info["loadavg_end"] = list(os.getloadavg())
    result = dict(
        benchmark="gfn_step",
        command=command,
        goal=dict(memory_ratio_max=MEMORY_GOAL, throughput_ratio_min=SPEED_GOAL),
        stop="none: every row generates exactly T tokens" if args.stop == "none" else "eos",
        machine=info,
        config=vars(args),
        results=results,
    )
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(result, indent=2))
        print(f"wrote {args.out}")
    if args.markdown:
        markdown(results, info, args, command)
        print(f"wrote {args.markdown}")
    return result


if __name__ == "__main__":
    main()
