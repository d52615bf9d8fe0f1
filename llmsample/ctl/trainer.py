"""CTLTrainer / train_ctl: train a :class:`~llmsample.ctl.head.TwistHead` with the CTL
objective of :mod:`llmsample.ctl` (the loss and its math live there).

    head = train_ctl(model, tok, prompts, potential, head, CTLConfig(out_dir="out/ctl"))

Each step alternates sampling (positives from ``smc_generate`` with the current twist,
negatives from q_psi or p) and an AdamW step on the head; the base model stays frozen.
Checkpoints (head, optimizer, schedule, step, RNG, the config; ``llmsample.train.checkpoints``)
go to ``out_dir/checkpoints`` every ``save_every`` steps, at ``max_minutes`` and on
SIGINT/SIGTERM (then the run stops); a rerun resumes from the newest if its config
differs only in ``CTLConfig.RESUMABLE_FIELDS`` (else it is refused; ``overwrite=True``
starts fresh), with ``metrics.jsonl`` cut back to the checkpoint. The head is exported
to ``out_dir/twist_head.pt`` (``TwistHead.load``). ``train()`` returns the last
evaluation with its ``eval_step``, the ``step`` reached, ``finished`` and ``stopped_by``.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor
from tqdm.auto import tqdm

from llmsample.config import help_field
from llmsample.ctl.head import LearnedTwist, TwistHead
from llmsample.ctl.loss import base_states, ctl_loss, lengths_of
from llmsample.hf.prompts import encode_prompts
from llmsample.particles import Particles
from llmsample.potentials.core import PerPrompt, Potential
from llmsample.train.checkpoints import (
    ResumeConflict,
    StopFlag,
    load_checkpoint,
    resume_point,
    save_checkpoint,
)

__all__ = ["CTLConfig", "CTLTrainer", "train_ctl"]


class _Memo(Potential):
    """``inner`` with its values memoized by (prompt row, tokens incl. EOS), so the loss
    reuses the EOS-column values the twisted sampler already computed."""

    def __init__(self, inner: Potential | None):
        self.inner = inner
        self.memo: dict[tuple[int, ...], float] = {}

    def complete(self, x: Particles) -> Tensor:
        out = torch.zeros(x.num_rows, dtype=torch.float64, device=x.device)
        if self.inner is None or x.num_rows == 0:
            return out
        keys = [
            (int(b), *row[:n].tolist())
            for b, row, n in zip(x.prompt_index.tolist(), x.tokens, x.lengths.tolist())
        ]
        todo = [r for r, key in enumerate(keys) if key not in self.memo]
        if todo:
            index = torch.tensor(todo, device=x.device)
            vals = self.inner.complete(x.select(index)).to(torch.float64).tolist()
            self.memo.update((keys[r], v) for r, v in zip(todo, vals))
        return torch.tensor([self.memo[k] for k in keys], dtype=torch.float64, device=x.device)


@dataclass
class CTLConfig:
    """Knobs of :class:`CTLTrainer` (validated on construction)."""

    steps: int = help_field("optimizer steps", 300)
    prompts_per_step: int = help_field("prompts per step", 2)
    num_particles: int = help_field(
        "positives: SMC particles (or IS draws) per prompt per step", 64
    )
    num_negatives: int = help_field("negatives: draws per prompt per step", 128)
    negatives: str = help_field(
        "twisted: draws from q ∝ p·psi (covers where psi is large: self-correcting) | "
        "base: ancestral draws from p | sampled: draws from p, scored at their sampled "
        "token only and pooled with the positives (a bounded loss; one potential call per "
        "draw instead of one per draw and step)",
        "twisted",
    )
    positives: str = help_field(
        "smc (SMC with the current twist) | importance (no resampling) | given (the exact "
        "posterior sample passed per prompt as references=, e.g. joint_infill_samples)",
        "smc",
    )
    proposal: str = help_field(
        "proposal of the positive runs: base (p) | optimal (q ∝ p·psi)", "base"
    )
    ess_threshold: float = help_field("resampling threshold of the positive SMC runs", 0.5)
    max_new_tokens: int = help_field("T: continuations end at EOS or after T tokens", 32)
    lr: float = help_field("AdamW learning rate of the head", 3e-3)
    lr_schedule: str = help_field("constant | cosine (decays to 0 at the last step)", "cosine")
    weight_decay: float = help_field("AdamW weight decay of the head", 0.0)
    max_grad_norm: float = help_field("gradient clipping norm (0 = off)", 1.0)
    seed: int = help_field("seed of prompt choice and sampling", 0)
    out_dir: str = help_field(
        "checkpoints, metrics.jsonl and twist_head.pt go here", "out/twist_ctl"
    )
    save_every: int = help_field("checkpoint every this many steps (0 = only at the end)", 50)
    keep_checkpoints: int = help_field("checkpoints kept on disk", 2)
    log_every: int = help_field("log training metrics every this many steps", 10)
    eval_every: int = help_field("run the evaluation callback every this many steps (0 = end)", 0)
    max_minutes: float = help_field(
        "stop (with a checkpoint) after this wall time (0 = no limit)", 0.0
    )
    progress: bool = help_field("show a progress bar", True)
    overwrite: bool = help_field(
        "start fresh: delete out_dir's checkpoints and metrics.jsonl instead of resuming", False
    )

    # Fields that may differ from the checkpoint's when a run resumes (budgets, intervals,
    # display); any other change is refused (llmsample.train.checkpoints.check_resume). A new
    # ``steps`` also stretches the cosine learning-rate schedule over the new length.
    RESUMABLE_FIELDS = (
        "steps",
        "max_minutes",
        "log_every",
        "eval_every",
        "save_every",
        "keep_checkpoints",
        "progress",
        "out_dir",
        "overwrite",
    )

    def __post_init__(self) -> None:
        for name in ("steps", "prompts_per_step", "num_particles", "num_negatives"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
        if not isinstance(self.max_new_tokens, int) or self.max_new_tokens < 2:
            raise ValueError(
                f"max_new_tokens must be an integer >= 2 (a twist acts between steps), "
                f"got {self.max_new_tokens!r}"
            )
        if self.positives not in ("smc", "importance", "given"):
            raise ValueError(
                f"positives must be 'smc', 'importance' or 'given', got {self.positives!r}"
            )
        if self.negatives not in ("twisted", "base", "sampled"):
            raise ValueError(
                f"negatives must be 'twisted', 'base' or 'sampled', got {self.negatives!r}"
            )
        if self.proposal not in ("base", "optimal"):
            raise ValueError(f"proposal must be 'base' or 'optimal', got {self.proposal!r}")
        if not self.ess_threshold >= 0:
            raise ValueError(f"ess_threshold must be >= 0, got {self.ess_threshold}")
        if self.lr_schedule not in ("constant", "cosine"):
            raise ValueError(
                f"lr_schedule must be 'constant' or 'cosine', got {self.lr_schedule!r}"
            )
        if not self.lr > 0 or not self.weight_decay >= 0 or not self.max_grad_norm >= 0:
            raise ValueError("lr must be > 0, weight_decay and max_grad_norm >= 0")
        for name in ("save_every", "log_every", "eval_every"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0")
        if self.log_every == 0:
            raise ValueError("log_every must be >= 1")
        if self.keep_checkpoints < 1 or not self.max_minutes >= 0:
            raise ValueError("keep_checkpoints must be >= 1 and max_minutes >= 0")


class CTLTrainer:
    """Train ``head`` (a :class:`TwistHead` on the frozen ``model``) by CTL; see the module
    docstring. ``potential`` is one Potential or one per prompt; ``evaluate(head, step)``
    returns a dict of metrics logged to ``metrics.jsonl``. ``conditions`` [len(prompts), C]
    feeds a conditional head (``cond_size=C``); ``references`` (one complete continuation
    per prompt, an exact draw from its sigma) are the positives of ``positives='given'``.
    ``run_config`` is the config recorded with each checkpoint and compared on resume
    (default ``cfg``; a recipe passes its whole config)."""

    def __init__(
        self,
        model,
        tokenizer,
        prompts: list[str],
        potential: Potential | Sequence[Potential] | None,
        head: TwistHead,
        cfg: CTLConfig,
        *,
        eos_token_ids: list[int] | None = None,
        evaluate: Callable[[TwistHead, int], dict] | None = None,
        conditions: Tensor | None = None,
        references: Sequence[Sequence[int]] | None = None,
        run_config=None,
    ):
        from accelerate import Accelerator

        if not prompts:
            raise ValueError("CTLTrainer needs at least one prompt")
        cond_size = getattr(head, "cond_size", 0)
        if bool(cond_size) != (conditions is not None):
            raise ValueError(
                f"the head has cond_size={cond_size}; pass conditions=[{len(prompts)}, "
                f"{cond_size}] for a conditional head and none for a plain one"
            )
        if conditions is not None and tuple(conditions.shape) != (len(prompts), cond_size):
            raise ValueError(
                f"conditions must be [{len(prompts)}, {cond_size}], got {tuple(conditions.shape)}"
            )
        if (cfg.positives == "given") != (references is not None):
            raise ValueError(
                "positives='given' needs references= (one exact posterior sample per prompt), "
                "and references are only used with positives='given'"
            )
        if references is not None and len(references) != len(prompts):
            raise ValueError(f"got {len(references)} references for {len(prompts)} prompts")
        self.conditions = conditions
        self.references = None if references is None else [list(r) for r in references]
        if isinstance(potential, Sequence) and len(potential) != len(prompts):
            raise ValueError(
                f"got {len(potential)} per-prompt potentials for {len(prompts)} prompts"
            )
        self.eos = list(eos_token_ids or [tokenizer.eos_token_id])
        if any(e is None for e in self.eos):
            raise ValueError("the tokenizer has no EOS token; pass eos_token_ids=")
        self.cfg, self.tokenizer, self.prompts, self.potential = cfg, tokenizer, prompts, potential
        self.evaluate = evaluate
        self.run_config = cfg if run_config is None else run_config
        self.out = Path(cfg.out_dir)
        self.log_path = self.out / "metrics.jsonl"
        self.acc = Accelerator()  # DDP over processes under `accelerate launch`
        for p in model.parameters():
            p.requires_grad_(False)
        self.model = model.to(self.acc.device).eval()
        self.opt = torch.optim.AdamW(head.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
        total = cfg.steps

        def factor(step: int) -> float:
            if cfg.lr_schedule == "constant":
                return 1.0
            return 0.5 * (1 + math.cos(math.pi * min(step, total) / total))

        self.sched = torch.optim.lr_scheduler.LambdaLR(self.opt, factor)
        self.head, self.opt = self.acc.prepare(head, self.opt)
        self.acc.register_for_checkpointing(self.sched)
        self.gen = torch.Generator().manual_seed(cfg.seed + self.acc.process_index)
        self.step, self.elapsed = 0, 0.0

    @property
    def unwrapped(self) -> TwistHead:
        return self.acc.unwrap_model(self.head)

    # ------------------------------------------------------------------ one batch
    def _potential(self, chosen: list[int]) -> Potential | None:
        if isinstance(self.potential, Sequence):
            return PerPrompt([self.potential[i] for i in chosen])
        return self.potential

    def _complete(self, potential, x: Particles) -> Tensor:
        if potential is None or x.num_rows == 0:
            return torch.zeros(x.num_rows, dtype=torch.float64, device=x.device)
        return potential.complete(x).to(dtype=torch.float64, device=x.device)

    def batch_loss(self) -> tuple[Tensor, dict]:
        """Sample positives and negatives for a few prompts; the CTL loss and statistics."""
        from llmsample.generate import ancestral_generate, smc_generate
        from llmsample.smc.config import SMCConfig

        cfg = self.cfg
        n = min(cfg.prompts_per_step, len(self.prompts))
        chosen = torch.randperm(len(self.prompts), generator=self.gen)[:n].tolist()
        texts = [self.prompts[i] for i in chosen]
        seeds = torch.randint(0, 2**31 - 1, (2,), generator=self.gen).tolist()
        potential = self._potential(chosen)
        T, S, K, M = (
            cfg.max_new_tokens,
            cfg.max_new_tokens - 1,
            cfg.num_particles,
            cfg.num_negatives,
        )
        cond = None if self.conditions is None else self.conditions[chosen]
        twist = LearnedTwist(self.model, self.unwrapped, potential, condition=cond)
        if cfg.positives == "given":
            K = 1
        else:
            pos = smc_generate(
                self.model,
                self.tokenizer,
                texts,
                potential=potential,
                twist=twist,
                proposal="optimal" if cfg.proposal == "optimal" else None,
                num_particles=K,
                max_new_tokens=T,
                ess_threshold=cfg.ess_threshold if cfg.positives == "smc" else 0.0,
                seed=seeds[0],
                eos_token_id=self.eos,
            )
        memo = _Memo(potential)
        if cfg.negatives == "twisted":  # plain draws from q ∝ p·psi (no weights, no resampling)
            # only the first T - 2 tokens are read (the parents x_<t, t <= T - 1): the last
            # one may come from p, which spares R·V potential calls (exact_last_step)
            twist = LearnedTwist(
                self.model, self.unwrapped, memo, condition=cond, exact_last_step=False
            )
            neg = smc_generate(
                self.model,
                self.tokenizer,
                texts,
                potential=memo,
                twist=twist,
                proposal="optimal",
                num_particles=M,
                max_new_tokens=T,
                seed=seeds[1],
                eos_token_id=self.eos,
                config=SMCConfig(reweight=False),
            )
        else:
            neg = ancestral_generate(
                self.model,
                self.tokenizer,
                texts,
                num_samples=M,
                max_new_tokens=T,
                seed=seeds[1],
                eos_token_id=self.eos,
            )
        prompts = encode_prompts(self.tokenizer, texts)
        device = self.acc.device
        B = len(texts)
        pad = prompts.pad_token_id

        def tokens_of(out) -> Tensor:
            c = out.continuations.reshape(-1, out.continuations.shape[-1])
            if c.shape[1] < T:
                c = torch.cat([c, c.new_full((c.shape[0], T - c.shape[1]), pad)], dim=1)
            return c.to(device)

        index = torch.arange(B, device=device)
        neg_tok = tokens_of(neg)  # [B*M, T]
        if cfg.positives == "given":
            pos_tok, pos_log_w, log_phi = self._given(chosen, potential, prompts, T)
        else:
            pos_tok, pos_log_w = tokens_of(pos), pos.log_weights_unnormalized.to(device)
            log_phi = pos.log_potential
            log_phi = (
                torch.zeros(B * K, dtype=torch.float64, device=device)
                if log_phi is None
                else log_phi.reshape(-1).to(device)
            )
        pos_len, neg_len = lengths_of(pos_tok, self.eos), lengths_of(neg_tok, self.eos)
        pi = torch.cat([index.repeat_interleave(K), index.repeat_interleave(M)])
        hidden, logp = base_states(self.model, prompts, pi, torch.cat([pos_tok, neg_tok]), S)
        row_cond = None if cond is None else cond.to(device)[pi][:, None, :]
        scores = self.head(hidden, row_cond)  # [B*(K+M), S, V], with grad
        steps = torch.arange(1, S + 1, device=device)  # t = 1..S
        # positives: log psi_t(x_<=t), or log phi where the row completed at t
        pos_scores = scores[: B * K].double()
        gathered = pos_scores.gather(2, pos_tok[:, :S, None])[..., 0]  # [B*K, S]
        done_at = steps[None, :] == pos_len[:, None]
        pos_log_psi = torch.where(done_at, log_phi[:, None], gathered)
        pos_mask = steps[None, :] <= pos_len[:, None]
        if cfg.negatives == "sampled":
            loss = self._sampled_loss(
                scores[B * K :].double(),
                neg_tok,
                neg_len,
                memo,
                prompts,
                pos_log_psi.view(B, K, S),
                pos_log_w,
                pos_mask.view(B, K, S),
            )
        else:
            loss = self._exact_last_token_loss(
                scores[B * K :].double(),
                logp[B * K :].double(),
                neg_tok,
                neg_len,
                memo,
                prompts,
                pos_log_psi.view(B, K, S),
                pos_log_w,
                pos_mask.view(B, K, S),
            )
        if cfg.positives == "given":
            return loss, dict(ess=1.0, log_phi=float(log_phi.mean()))
        ess = torch.exp(-torch.logsumexp(2 * pos.log_weights, dim=1))
        stats = dict(
            log_z=float(pos.log_z.mean()),
            ess=float(ess.mean()),
            resample_rate=float(pos.resampled.float().mean()),
        )
        return loss, stats

    def _sampled_loss(self, neg_scores, neg_tok, neg_len, memo, prompts, pos_psi, pos_w, pos_m):
        """``negatives='sampled'``: log Z_t from the draws of p at their sampled token
        (log phi where a draw completed at t), pooled with the positives (each positive
        set counted as K draws): log ((sum_m psi(y_m) + K sum_k w_k psi(y+_k)) / (M + K)).
        With the positives in the pool, the loss is bounded below by 0 per (prompt, step)."""
        B, K, S = pos_psi.shape
        M = neg_scores.shape[0] // B
        device = neg_scores.device
        steps = torch.arange(1, S + 1, device=device)
        gathered = neg_scores.gather(2, neg_tok[:, :S, None])[..., 0]  # [B*M, S]
        done = (neg_len <= S).nonzero()[:, 0]  # draws that complete within t = 1..S
        log_phi = torch.zeros(B * M, dtype=torch.float64, device=device)
        if done.numel():
            x = Particles(
                neg_tok[done],
                neg_len[done],
                torch.arange(B, device=device).repeat_interleave(M)[done],
                prompts.to(device),
                self.tokenizer,
                torch.as_tensor(self.eos, device=device),
                self.cfg.max_new_tokens,
                neg_scores.shape[-1],
            )
            log_phi[done] = memo.complete(x)
        neg_psi = torch.where(steps[None, :] == neg_len[:, None], log_phi[:, None], gathered)
        neg_mask = steps[None, :] <= neg_len[:, None]
        w = torch.log_softmax(pos_w.detach().double(), dim=1) + math.log(K)  # [B, K]
        pool_psi = torch.cat([neg_psi.view(B, M, S), pos_psi], dim=1)[..., None]  # [B, M+K, S, 1]
        pool_w = torch.cat([pos_w.new_zeros(B, M, dtype=torch.float64), w], dim=1)  # [B, M+K]
        return ctl_loss(
            pos_psi,
            pos_w,
            pos_m,
            pool_psi,
            torch.zeros_like(pool_psi),
            torch.cat([neg_mask.view(B, M, S), pos_m], dim=1),
            pool_w,
        )

    def _exact_last_token_loss(
        self, neg_scores, neg_logp, neg_tok, neg_len, memo, prompts, pos_psi, pos_w, pos_m
    ):
        """``negatives='base'|'twisted'``: every next token of each running parent, EOS
        columns log phi (the last token summed exactly; see :func:`ctl_loss`)."""
        B, K, S = pos_psi.shape
        M = neg_scores.shape[0] // B
        V = neg_scores.shape[-1]
        T = self.cfg.max_new_tokens
        device = neg_scores.device
        steps = torch.arange(1, S + 1, device=device)
        index = torch.arange(B, device=device)
        neg_mask = steps[None, :] <= neg_len[:, None]  # [B*M, S] the parent x_<t is running
        eos_t = torch.as_tensor(self.eos, device=device)
        fill = torch.zeros(B * M, S, V, dtype=torch.float64, device=device)
        is_eos = torch.zeros(V, dtype=torch.bool, device=device)
        is_eos[eos_t] = True
        prompt_rows = index.repeat_interleave(M)
        for t in range(1, S + 1):
            rows = neg_mask[:, t - 1].nonzero()[:, 0]
            for e in self.eos:
                toks = torch.cat([neg_tok[rows, : t - 1], torch.full_like(rows, e)[:, None]], dim=1)
                x = Particles(
                    toks,
                    torch.full_like(rows, t),
                    prompt_rows[rows],
                    prompts.to(device),
                    self.tokenizer,
                    eos_t,
                    T,
                    V,
                )
                fill[rows, t - 1, e] = memo.complete(x)
        neg_scores = torch.where(is_eos, fill, neg_scores)
        neg_log_w = None
        if self.cfg.negatives == "twisted":
            # (p/q)(x_<t) = prod_{s<t} p(x_s)/q(x_s), q ∝ p·psi as the sampler computed it
            log_q = torch.log_softmax(neg_logp + neg_scores, dim=-1).detach()
            nxt = neg_tok[:, : S - 1, None]
            lpq = (neg_logp[:, : S - 1].gather(2, nxt) - log_q[:, : S - 1].gather(2, nxt))[..., 0]
            real = steps[None, : S - 1] < neg_len[:, None]  # x_s is a real non-EOS token
            lpq = torch.where(real, lpq, 0.0)
            neg_log_w = torch.cat([lpq.new_zeros(B * M, 1), lpq.cumsum(1)], dim=1).view(B, M, S)
        return ctl_loss(
            pos_psi,
            pos_w,
            pos_m,
            neg_scores.view(B, M, S, V),
            neg_logp.view(B, M, S, V),
            neg_mask.view(B, M, S),
            neg_log_w,
        )

    def _given(self, chosen: list[int], potential, prompts, T: int):
        """The given exact samples of the chosen prompts as positives (K = 1, weight 1):
        tokens [B, T] (right-padded), log w [B, 1] and log phi [B]."""
        device = self.acc.device
        refs = [self.references[i] for i in chosen]
        if any(len(r) > T or len(r) == 0 for r in refs):
            raise ValueError(f"references must hold 1..max_new_tokens={T} tokens")
        pad = prompts.pad_token_id
        tok = torch.full((len(refs), T), pad, dtype=torch.long, device=device)
        for b, r in enumerate(refs):
            tok[b, : len(r)] = torch.tensor(r, device=device)
        lengths = torch.tensor([len(r) for r in refs], device=device)
        eos_t = torch.as_tensor(self.eos, device=device)
        vocab = self.unwrapped.config["vocab_size"]
        x = Particles(
            tok,
            lengths,
            torch.arange(len(refs), device=device),
            prompts.to(device),
            self.tokenizer,
            eos_t,
            T,
            vocab,
        )
        log_w = torch.zeros(len(refs), 1, dtype=torch.float64, device=device)
        return tok, log_w, self._complete(potential, x)

    # ------------------------------------------------------------------ checkpoints
    def save(self) -> Path:
        state = dict(step=self.step, elapsed=self.elapsed, head_config=self.unwrapped.config)
        folder = self.out / "checkpoints"
        extra = {"gen": self.gen.get_state()}
        return save_checkpoint(
            self.acc,
            folder,
            self.step,
            state,
            extra,
            self.cfg.keep_checkpoints,
            "ctl.pt",
            config=self.run_config,
            logs=[self.log_path],
        )

    def resume(self) -> bool:
        """Load the newest checkpoint if there is one (``overwrite``: delete them first);
        raises :class:`~llmsample.train.checkpoints.ResumeConflict` if the config changed in a
        field that may not change, or if the checkpoint holds another kind of head."""
        found = resume_point(
            self.out,
            self.run_config,
            logs=[self.log_path],
            acc=self.acc,
            overwrite=self.cfg.overwrite,
            name="ctl",
        )
        if found is None:
            return False
        state = json.loads((found / "trainer_state.json").read_text())
        if state["head_config"] != self.unwrapped.config:
            raise ResumeConflict(
                f"checkpoint {found} holds a head {state['head_config']}, not "
                f"{self.unwrapped.config}; use a new out_dir, or pass --overwrite to start fresh"
            )
        state, extra = load_checkpoint(self.acc, found, "ctl.pt")
        self.gen.set_state(extra["gen"])
        self.step, self.elapsed = state["step"], state["elapsed"]
        return True

    def export(self) -> Path:
        path = self.out / "twist_head.pt"
        if self.acc.is_main_process:
            self.out.mkdir(parents=True, exist_ok=True)
            self.unwrapped.save(path)
        self.acc.wait_for_everyone()
        return path

    # ------------------------------------------------------------------ loop
    def _log(self, record: dict) -> None:
        if self.acc.is_main_process:
            self.out.mkdir(parents=True, exist_ok=True)
            with open(self.log_path, "a", encoding="utf-8") as fh:
                fh.write(json.dumps(record) + "\n")

    def _eval(self) -> dict:
        if self.evaluate is None:
            return {}
        result = self.evaluate(self.unwrapped, self.step)
        self._log(dict(event="eval", step=self.step, **result))
        return dict(result, eval_step=self.step)

    def train(self) -> dict:
        """Run to ``cfg.steps`` (resuming if a checkpoint exists); returns the last eval
        (with its ``eval_step``), ``step``, ``finished`` and ``stopped_by``."""
        cfg = self.cfg
        resumed = self.resume()
        self._log(dict(event="resume" if resumed else "start", step=self.step))
        last = {} if resumed else self._eval()
        bar = tqdm(
            total=cfg.steps,
            initial=self.step,
            desc="ctl",
            disable=not cfg.progress or not self.acc.is_main_process,
        )
        start = time.monotonic() - self.elapsed
        stopped_by = None
        with StopFlag() as flag:
            while self.step < cfg.steps:
                t0 = time.monotonic()
                self.head.train()
                loss, stats = self.batch_loss()
                self.acc.backward(loss)
                if cfg.max_grad_norm > 0:
                    self.acc.clip_grad_norm_(self.head.parameters(), cfg.max_grad_norm)
                self.opt.step()
                self.sched.step()
                self.opt.zero_grad()
                self.step += 1
                self.elapsed = time.monotonic() - start
                bar.update(1)
                bar.set_postfix(loss=f"{float(loss.detach()):.3g}", ess=f"{stats['ess']:.1f}")
                if self.step % cfg.log_every == 0 or self.step == cfg.steps:
                    rec = dict(event="train", step=self.step, loss=float(loss.detach()), **stats)
                    rec.update(step_s=time.monotonic() - t0, elapsed_s=self.elapsed)
                    self._log(rec)
                timed_out = cfg.max_minutes and self.elapsed > 60 * cfg.max_minutes
                if cfg.eval_every and self.step % cfg.eval_every == 0 and self.step < cfg.steps:
                    last = self._eval()
                if (cfg.save_every and self.step % cfg.save_every == 0) or flag.hit or timed_out:
                    self.save()
                if flag.hit or timed_out:
                    stopped_by = flag.name or "max_minutes"
                    break
        bar.close()
        if stopped_by is None:
            self.save()
            last = self._eval()
            self.export()
            self._log(dict(event="done", step=self.step, elapsed_s=self.elapsed))
        else:
            self._log(dict(event="stop", step=self.step, elapsed_s=self.elapsed, reason=stopped_by))
        last.setdefault("eval_step", None)
        return dict(last, step=self.step, finished=stopped_by is None, stopped_by=stopped_by)


def train_ctl(
    model,
    tokenizer,
    prompts: list[str],
    potential: Potential | Sequence[Potential] | None,
    head: TwistHead,
    cfg: CTLConfig,
    *,
    eos_token_ids: list[int] | None = None,
    evaluate: Callable[[TwistHead, int], dict] | None = None,
    conditions: Tensor | None = None,
    references: Sequence[Sequence[int]] | None = None,
    run_config=None,
) -> dict:
    """Train ``head`` in place by CTL (resuming from ``cfg.out_dir``); returns what
    :meth:`CTLTrainer.train` does."""
    trainer = CTLTrainer(
        model,
        tokenizer,
        prompts,
        potential,
        head,
        cfg,
        eos_token_ids=eos_token_ids,
        evaluate=evaluate,
        conditions=conditions,
        references=references,
        run_config=run_config,
    )
    return trainer.train()
