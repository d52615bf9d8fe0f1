"""Peak memory and throughput of one GFlowNet training step: ours vs gradient-through-rollout.

    python benchmarks/gfn_step.py                     # CPU, shakespeare-tiny; writes nothing
    python benchmarks/gfn_step.py --model smollm2-135m-instruct --max-new-tokens 32 64 \\
        --out benchmarks/results/gfn_step_smollm2.json --markdown benchmarks/RESULTS.md
    python benchmarks/gfn_step.py --device cuda --dtype bfloat16 --batch 4 --k 16 \\
        --max-new-tokens 128                          # a GPU row
    python benchmarks/gfn_step.py --quick --out /tmp/q.json   # smoke test, toy model

Both variants train the same LoRA policy (``add_lora``, ``all-linear``) on the same B
prompts, K samples each, T new tokens, trajectory balance with a scalar log Z, sampling
the untempered policy; log R = log p_base(x|c), the same model with the adapter off (one
teacher-forced pass, no grad: the same cost in both, not what is measured).

* **ours** (``llmsample.gfn.trainer``): ``sample_rollouts`` (KV cache, no autograd) ->
  log R -> log q from ONE teacher-forced pass with gradients -> TB -> backward -> AdamW.
* **reference** (gradient through the rollout, the style of Hu et al. 2024's code): a
  sampling loop on ``LMSession(..., grad=True)``: every cached one-token step runs WITH
  gradients, samples (detached) and adds log q of the sampled token to a differentiable
  sum (stopped rows add nothing) -> log R -> TB -> backward through the unrolled loop.

``--stop none`` (default: stop ids = [], every row generates exactly T tokens, identical
work) or ``eos`` (the variants then draw different samples). The test
(``tests/test_benchmark_gfn_step.py``) checks that for the same tokens the reference's
log q and TB gradients equal ours: both steps optimize the same thing.

Measurement: each variant in its own fresh subprocess, ABBA over ``--rounds``; a process
builds model, adapter and optimizer, runs each variant once at K=1, T=2 (lazy imports,
thread pools), then ``--warmup`` untimed and ``--repeats`` timed steps; medians over all
timed steps of a variant. Per step: seconds (samples/s = B*K / s) and phase times; peak
memory over the baseline (model + adapter + optimizer), the goal's number -- CUDA:
``max_memory_allocated()`` after ``reset_peak_memory_stats()`` minus ``memory_allocated()``
before; CPU, which keeps no such counter: live bytes of torch's allocator, the maximum of
the running sum of allocations and frees in one extra untimed step per process under
``torch.profiler(profile_memory=True)`` (shapes are the same every step). CPU cross-check:
peak RSS over the baseline RSS (VmHWM reset per step via /proc/self/clear_refs, else
``ru_maxrss``), a little above live bytes for both (glibc caching, fragmentation). In the
profiled step also: bytes of distinct storages autograd saved for backward (weights
excluded), deterministic: the reference saves every layer's growing K/V cache at every
step (O(T^2)), ours one pass (O(T)).

CPU timings: with more runnable threads than cores, OpenMP's spin-waiting can stall a
step for whole time slices, far more for the reference (about T times more, smaller ops;
10-50x slower steps seen). Workers run with ``OMP_WAIT_POLICY=PASSIVE`` (unset it with
``--omp-wait-policy ''``), and the table also gives the ratio of the fastest steps.

Goals (from the issue): peak memory ours/reference <= 0.5, samples/s ours/reference >= 1.
--out gets the JSON; --markdown gets this run's section (``report.write_section``, key
gfn_step:DEVICE:T...[:threadsN]), other sections kept. ``--quick``: a tiny llama over a
9-token vocabulary, T=8, one round.
"""

import argparse
import itertools
import json
import math
import os
import resource
import statistics
import subprocess
import sys
import time
from contextlib import nullcontext
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
ROOT = Path(__file__).resolve().parents[1]

import report  # noqa: E402  (benchmarks/report.py: the script's own folder)
import torch  # noqa: E402

import llmsample  # noqa: E402
from llmsample.gfn import GFNConfig, add_lora, sample_rollouts, trajectory_balance  # noqa: E402
from llmsample.hf.checkpointing import checkpointed_layers  # noqa: E402
from llmsample.hf.prompts import PromptBatch, encode_prompts  # noqa: E402
from llmsample.hf.session import LMSession, teacher_force  # noqa: E402

MEMORY_GOAL = 0.5  # peak memory ours / reference <= this
SPEED_GOAL = 1.0  # samples/s ours / reference >= this
VARIANTS = ("ours", "reference")
PROMPTS = ["ROMEO:", "JULIET:", "HAMLET:", "KING LEAR:", "First Citizen:", "MACBETH:"]
PROMPTS += ["PORTIA:", "OTHELLO:"]
TOY_PROMPTS = ["a b", "c", "d e f", "g h", "a", "b c", "e", "f g"]


# ---------------------------------------------------------------------- the two steps
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
    The row bookkeeping is ``llmsample.gfn.sample_rollouts``'s, with log q summed.
    """
    session = LMSession(policy, prompts, num_samples, grad=True)  # prefill, expand to B*K
    device, pad, T = session.device, prompts.pad_token_id, max_new_tokens
    R = session.logp.shape[0]
    stop = torch.as_tensor(stop_ids, dtype=torch.long, device=device)
    tokens = torch.full((R, T), pad, dtype=torch.long, device=device)
    lengths = torch.zeros(R, dtype=torch.long, device=device)
    done = torch.zeros(R, dtype=torch.bool, device=device)
    log_q = torch.zeros(R, device=device)
    for t in range(T):
        logp = session.logp  # [R, V], in the graph
        if forced is None:
            new = torch.multinomial(logp.detach().exp(), 1, generator=generator)[:, 0]
        else:
            new = forced[:, t].to(device)
        new = torch.where(done, pad, new)
        lp = logp.gather(1, new[:, None])[:, 0]
        log_q = log_q + torch.where(done, torch.zeros_like(lp), lp)  # finished rows: 0
        tokens[:, t] = new
        lengths += (~done).long()
        done = done | torch.isin(new, stop)
        if bool(done.all()) or t == T - 1:
            break
        session.step(new)  # one cached forward, with gradients
    return tokens, lengths, log_q


def log_prob(policy, prompts: PromptBatch, index, tokens, lengths, grad: bool = False):
    """log p(x | c) of each row [R], from one teacher-forced pass (with ``grad``: in the
    autograd graph)."""
    mask = torch.arange(tokens.shape[1], device=tokens.device) < lengths[:, None]
    ctx = prompts.input_ids[index], prompts.attention_mask[index]
    return teacher_force(policy, *ctx, tokens, mask.long(), grad=grad).token_logp.sum(1)


def log_reward(policy, prompts: PromptBatch, index, tokens, lengths):
    """log R = log p_base(x | c): the same model with the adapter disabled, no grad."""
    with policy.disable_adapter():
        log_r = log_prob(policy, prompts, index, tokens, lengths)
    return log_r.float().clone()  # a normal tensor (not inference)


def _load(args):
    """(model, tokenizer, prompt texts) for ``args.model`` ('toy': the embedded llama)."""
    dtype = getattr(torch, args.dtype)
    if args.model != "toy":
        model, tok = llmsample.load_model(args.model, device=args.device, dtype=dtype)
        return model, tok, PROMPTS
    from llmsample.diagnostics.exact import toy_model, toy_tokenizer

    model = toy_model("llama").to(device=args.device, dtype=dtype).eval()
    return model, toy_tokenizer(with_pad=True), TOY_PROMPTS


def _allocator_peak(prof) -> int:
    """Peak of the running sum of the allocations and frees a ``profile_memory`` run saw."""
    events = prof.profiler.kineto_results.events()
    allocs = sorted((e.start_ns(), e.nbytes()) for e in events if e.name() == "[memory]")
    return max([0, *itertools.accumulate(nbytes for _, nbytes in allocs)])


class Setup:
    """Policy + log Z + optimizer + prompts: everything both steps share."""

    def __init__(self, args):
        self.args = args
        model, tok, texts = _load(args)
        texts = [texts[i % len(texts)] for i in range(args.batch)]
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

    def _now(self) -> float:
        if self.args.device == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter()

    def _sample(self, variant: str, K: int, T: int):
        """(tokens, lengths, prompt index, log q): log q is None for ours (scored later)."""
        policy, prompts, stop_ids = self.policy, self.prompts, self.stop_ids
        if variant == "ours":
            ro = sample_rollouts(policy, prompts, K, T, stop_ids, generator=self.gen)
            return ro.tokens, ro.lengths, ro.prompt_index, None
        tokens, lengths, log_q = rollout_with_grad(
            policy, prompts, K, T, stop_ids, generator=self.gen
        )
        index = torch.arange(prompts.size, device=tokens.device).repeat_interleave(K)
        return tokens, lengths, index, log_q

    def step(self, variant: str, k: int | None = None, steps: int | None = None) -> dict:
        """One optimizer step of ``variant``; returns loss stats and phase times."""
        B, K, T = self.prompts.size, k or self.args.k, steps or self.args.max_new_tokens[0]
        t0 = self._now()
        tokens, lengths, index, log_q = self._sample(variant, K, T)
        t1 = self._now()
        log_r = log_reward(self.policy, self.prompts, index, tokens, lengths)
        t2 = self._now()
        if log_q is None:  # ours: log q from one teacher-forced pass with gradients
            ckpt = self.args.activation_checkpointing
            with checkpointed_layers(self.policy) if ckpt else nullcontext():
                log_q = log_prob(self.policy, self.prompts, index, tokens, lengths, grad=True)
        loss = trajectory_balance(log_q.view(B, K), log_r.view(B, K), self.log_z)
        loss.backward()
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        t3 = self._now()
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
        the backward, peak live bytes of torch's CPU allocator over the step's start, the
        CPU analogue of ``torch.cuda.max_memory_allocated``; None on CUDA)."""
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
        return sum(seen.values()), _allocator_peak(prof) if cpu else None


# ---------------------------------------------------------------------- memory probes
def _status_kb(field: str) -> int | None:
    """A field of /proc/self/status (VmRSS, VmHWM) in kB; None where there is none."""
    try:
        lines = Path("/proc/self/status").read_text().splitlines()
    except OSError:
        return None
    return next((int(x.split()[1]) for x in lines if x.startswith(field + ":")), None)


def _clear_refs() -> None:
    """Reset the process's VmHWM to its current RSS (Linux; OSError where refused)."""
    with open("/proc/self/clear_refs", "w") as fh:
        fh.write("5")


def _max_rss() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


class Memory:
    """Peak bytes over a baseline, per step (see the module docstring)."""

    def __init__(self, device: str):
        self.device = device
        self.method = "cuda max_memory_allocated"
        if device != "cuda":
            try:
                _clear_refs()
                self.method = "peak RSS (VmHWM, reset per step)"
            except OSError:
                self.method = "peak RSS (ru_maxrss, whole process)"
        self.hwm = self.method.startswith("peak RSS (VmHWM")
        self.baseline = self.current()

    def current(self) -> int:
        if self.device == "cuda":
            return torch.cuda.memory_allocated()
        rss = _status_kb("VmRSS")
        return _max_rss() if rss is None else rss * 1024  # None: not Linux

    def start(self) -> None:
        if self.device == "cuda":
            torch.cuda.synchronize()
            self.baseline = torch.cuda.memory_allocated()  # model + optimizer state
            torch.cuda.reset_peak_memory_stats()
        elif self.hwm:
            _clear_refs()

    def peak(self) -> int:
        """Peak since :meth:`start`, minus the baseline."""
        if self.device == "cuda":
            torch.cuda.synchronize()
            return torch.cuda.max_memory_allocated() - self.baseline
        return (_status_kb("VmHWM") * 1024 if self.hwm else _max_rss()) - self.baseline


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
WORKER_FLAGS = "model device dtype batch k stop lora_rank warmup repeats threads seed".split()
WORKER_SWITCHES = ["activation_checkpointing"]


def run_worker(args, variant: str, T: int) -> dict:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", variant]
    cmd += ["--max-new-tokens", str(T)]
    for name in WORKER_FLAGS:
        cmd += [f"--{name.replace('_', '-')}", str(getattr(args, name))]
    cmd += [f"--{name.replace('_', '-')}" for name in WORKER_SWITCHES if getattr(args, name)]
    env = dict(os.environ)
    if args.threads:
        env["OMP_NUM_THREADS"] = str(args.threads)
    if args.omp_wait_policy:
        env["OMP_WAIT_POLICY"] = args.omp_wait_policy
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=env)
    if proc.returncode != 0:
        raise RuntimeError(f"{variant} worker (T={T}) failed:\n{proc.stderr[-4000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


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


def measure(args, T: int) -> dict:
    """Both variants at T new tokens, each in fresh processes in ABBA order."""
    order = [v for r in range(args.rounds) for v in (VARIANTS if r % 2 == 0 else VARIANTS[::-1])]
    runs: dict[str, list[dict]] = {v: [] for v in VARIANTS}
    for variant in order:  # ABBA: ours, reference, reference, ours, ...
        runs[variant].append(run_worker(args, variant, T))
        med = statistics.median(x["step_s"] for x in runs[variant][-1]["steps"])
        print(f"T={T} {variant:9s} process: median {med:.3f} s/step", flush=True)
    res = {v: summarize(runs[v], args.batch * args.k) for v in VARIANTS}
    res["comparison"] = compare(res["ours"], res["reference"])
    return dict(max_new_tokens=T, **res)


# ---------------------------------------------------------------------- report
def _mb(x) -> str:
    return "-" if x is None else f"{x:.0f}"


def _met(ok: bool) -> str:
    return "met" if ok else "NOT met"


def tables(results: list[dict]) -> list[str]:
    """The two Markdown tables (per variant; ours/reference ratios), one row per T."""
    lines = [
        "| T | variant | s/step | samples/s | sample s | reward s | update s | peak MB "
        "| peak RSS MB | autograd saved MB | tokens/step | loss finite |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for res, name in itertools.product(results, VARIANTS):
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
            f"({_met(c['memory_goal_met'])}) | **{c['throughput_ratio']:.2f}** "
            f"({_met(c['throughput_goal_met'])}) "
            f"| {c['throughput_ratio_of_mins']:.2f} | {rss} | {c['saved_ratio']:.2f} "
            f"| {c['same_sample_steps']} of {c['timed_steps']} |"
        )
    return lines


def _setting(args, info: dict, o: dict) -> str:
    """The paragraph above the tables: what was run, how it was measured, and where."""
    cpu = args.device == "cpu"
    stop = "no stop token (every row generates exactly T tokens)" if args.stop == "none" else "EOS"
    peak = (
        "peak MB = live tensor bytes of torch's CPU allocator over the step (profiler, one "
        "untimed step per process); peak RSS MB = the process's peak RSS over its "
        "post-load RSS, median over timed steps"
        if cpu
        else "peak MB = torch.cuda.max_memory_allocated over the pre-step allocation, median"
    )
    return (
        f"One GFlowNet TB training step of {args.model} + LoRA (all-linear, r={args.lora_rank}, "
        f"{o['trainable_params']:,} trainable params), {args.dtype}; {args.batch} prompt(s) x "
        f"K={args.k} samples = {args.batch * args.k} rows, T new tokens, {stop}; "
        "log R = log p_base (adapter off), scalar log Z, AdamW. **ours** = rollouts "
        "with KV cache and no autograd + one teacher-forced pass with gradients"
        + (
            ", its decoder layers checkpointed (`--activation-checkpointing`: each layer "
            "recomputed in the backward instead of keeping its activations); "
            if args.activation_checkpointing
            else "; "
        )
        + "**reference** = sampling loop with KV cache and autograd on, backward through the "
        f"rollout. Each variant in its own fresh process, ABBA over {args.rounds} round(s), "
        f"{args.warmup} warm-up + {args.repeats} timed steps per process; medians over the "
        f"{args.rounds * args.repeats} timed steps. {peak}; autograd saved MB = distinct "
        "storages saved for backward (weights excluded). Machine: "
        f"{info['device_name']}, {info['cpu_count']} CPUs ({o['torch_threads']} torch threads, "
        f"OMP_WAIT_POLICY={args.omp_wait_policy or 'unset'}), "
        f"{info['platform']}, torch {info['torch']}, transformers {info['transformers']}, "
        f"load avg {info['loadavg_start'][0]:.1f} -> {info['loadavg_end'][0]:.1f}"
        + (" (other jobs shared the CPUs: timings are noisy, hence medians)." if cpu else ".")
    )


def section_key(args) -> str:
    key = f"gfn_step:{args.device}:T{'-'.join(map(str, args.max_new_tokens))}"
    key += f":threads{args.threads}" if args.device == "cpu" else ""
    return key + (":ckpt" if args.activation_checkpointing else "")


def markdown(results: list[dict], info: dict, args, command: str) -> None:
    """Replace this run's section of ``args.markdown`` (``report.write_section``)."""
    title = f"### gfn_step ({args.device}, T = {', '.join(map(str, args.max_new_tokens))}"
    title += f", {args.threads} threads" if args.device == "cpu" else ""
    title += ", activation checkpointing)" if args.activation_checkpointing else ")"
    setting = _setting(args, info, results[0]["ours"])
    lines = [title, "", f"`{command}`", "", setting, "", *tables(results)]
    report.write_section(args.markdown, section_key(args), lines)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", help="load_model name, or 'toy' (default shakespeare-tiny)")
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
    p.add_argument(
        "--activation-checkpointing",
        action="store_true",
        help="ours: checkpoint the decoder layers of the scoring pass (llmsample.hf.checkpointing)",
    )
    p.add_argument("--quick", action="store_true", help="tiny settings, for tests")
    p.add_argument("--out", default="", help="write the JSON here (e.g. benchmarks/results/)")
    p.add_argument("--markdown", default="", help="add the table here (benchmarks/RESULTS.md)")
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
    info = report.machine_info(args.device, args.dtype)
    results = []
    for T in args.max_new_tokens:
        results.append(measure(args, T))
        print("\n".join(tables(results[-1:])), flush=True)
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
