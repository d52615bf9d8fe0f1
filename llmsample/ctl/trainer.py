"""CTLTrainer / train_ctl: train a :class:`~llmsample.ctl.head.TwistHead` with the CTL
objective of :mod:`llmsample.ctl` (the loss and its math live there).

    head = train_ctl(model, tok, prompts, potential, head, CTLConfig(out_dir="out/ctl"))

Each step alternates sampling (positives from ``smc_generate`` with the current twist,
negatives from q_psi or p) and an AdamW step on the head; the base model stays frozen.
The loop is :class:`llmsample.train.base.Trainer`'s: checkpoints (head, optimizer, schedule,
step, RNG, the config) go to ``out_dir/checkpoints`` every ``save_every`` steps, at
``max_minutes`` and on SIGINT/SIGTERM (then the run stops); a rerun resumes from the newest
if its config differs only in ``CTLConfig.RESUMABLE_FIELDS`` and it holds the same kind of
head (else it is refused; ``overwrite=True`` starts fresh), with ``metrics.jsonl`` cut back
to the checkpoint. The head is exported to ``out_dir/twist_head.pt`` (``TwistHead.load``)
at the end and at ``max_minutes``. ``train()`` returns the last evaluation with its
``eval_step``, the ``step`` reached, ``finished`` and ``stopped_by``.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from torch import Tensor

from llmsample.ctl.config import CTLConfig
from llmsample.ctl.head import LearnedTwist, TwistHead
from llmsample.ctl.loss import base_states, lengths_of
from llmsample.ctl.terms import (
    MemoPotential,
    exact_last_token_loss,
    given_positives,
    sampled_loss,
)
from llmsample.hf.prompts import encode_prompts
from llmsample.potentials.base import PerPrompt, Potential
from llmsample.train.base import Trainer, make_accelerator

__all__ = ["CTLConfig", "CTLTrainer", "train_ctl"]


class CTLTrainer(Trainer):
    """Train ``head`` (a :class:`TwistHead` on the frozen ``model``) by CTL; see the module
    docstring. ``potential`` is one Potential or one per prompt; ``evaluate(head, step)``
    returns a dict of metrics logged to ``metrics.jsonl``. ``conditions`` [len(prompts), C]
    feeds a conditional head (``cond_size=C``); ``references`` (one complete continuation
    per prompt, an exact draw from its sigma) are the positives of ``positives='given'``.
    ``run_config`` is the config recorded with each checkpoint and compared on resume
    (default ``cfg``; a recipe passes its whole config)."""

    name = "ctl"
    postfix = {"loss": ".3g", "ess": ".1f"}

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
        # DDP over processes under `accelerate launch`
        super().__init__(cfg, make_accelerator(cfg), evaluate=evaluate, run_config=run_config)
        self.tokenizer, self.prompts, self.potential = tokenizer, prompts, potential
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

    @property
    def unwrapped(self) -> TwistHead:
        return self.acc.unwrap_model(self.head)

    # ------------------------------------------------------------------ one batch
    def _potential(self, chosen: list[int]) -> Potential | None:
        if isinstance(self.potential, Sequence):
            return PerPrompt([self.potential[i] for i in chosen])
        return self.potential

    def _draws(self, texts: list[str], potential, cond: Tensor | None, seeds: list[int]):
        """The positives (SMC with the learned twist; None when they are given), the
        negatives (twisted or ancestral draws) and the memoized potential the loss reads."""
        from llmsample.generate import ancestral_generate, smc_generate
        from llmsample.smc.config import SMCConfig

        cfg, T = self.cfg, self.cfg.max_new_tokens
        common = dict(max_new_tokens=T, eos_token_id=self.eos)
        pos = None
        if cfg.positives != "given":
            pos = smc_generate(
                self.model,
                self.tokenizer,
                texts,
                potential=potential,
                twist=LearnedTwist(self.model, self.unwrapped, condition=cond),  # phi: the run's
                proposal="optimal" if cfg.proposal == "optimal" else None,
                num_particles=cfg.num_particles,
                ess_threshold=cfg.ess_threshold if cfg.positives == "smc" else 0.0,
                seed=seeds[0],
                **common,
            )
        memo = MemoPotential(potential)
        if cfg.negatives == "twisted":  # plain draws from q ∝ p·psi (no weights, no resampling)
            # only the first T - 2 tokens are read (the parents x_<t, t <= T - 1): the last
            # one may come from p, which spares R·V potential calls (exact_last_step)
            twist = LearnedTwist(self.model, self.unwrapped, condition=cond, exact_last_step=False)
            neg = smc_generate(
                self.model,
                self.tokenizer,
                texts,
                potential=memo,
                twist=twist,
                proposal="optimal",
                num_particles=cfg.num_negatives,
                seed=seeds[1],
                config=SMCConfig(reweight=False),
                **common,
            )
        else:
            neg = ancestral_generate(
                self.model,
                self.tokenizer,
                texts,
                num_samples=cfg.num_negatives,
                seed=seeds[1],
                **common,
            )
        return pos, neg, memo

    def _tokens(self, out, pad: int) -> Tensor:
        """A run's continuations as [R, T] token rows, padded to T with ``pad``."""
        T = self.cfg.max_new_tokens
        c = out.continuations.reshape(-1, out.continuations.shape[-1])
        if c.shape[1] < T:
            c = torch.cat([c, c.new_full((c.shape[0], T - c.shape[1]), pad)], dim=1)
        return c.to(self.acc.device)

    def _positives(self, pos, chosen: list[int], potential, prompts) -> tuple:
        """The positives' tokens [B*K, T], log weights [B, K] and log phi [B*K]."""
        device, T = self.acc.device, self.cfg.max_new_tokens
        if pos is None:  # given references, one per prompt (K = 1)
            return given_positives(
                [self.references[i] for i in chosen],
                potential,
                prompts,
                T,
                tokenizer=self.tokenizer,
                eos=self.eos,
                vocab=self.unwrapped.config["vocab_size"],
                device=device,
            )
        pos_tok = self._tokens(pos, prompts.pad_token_id)
        log_phi = pos.log_potential
        if log_phi is None:
            log_phi = torch.zeros(pos_tok.shape[0], dtype=torch.float64, device=device)
        return pos_tok, pos.log_weights_unnormalized.to(device), log_phi.reshape(-1).to(device)

    def batch_loss(self) -> tuple[Tensor, dict]:
        """Sample positives and negatives for a few prompts; the CTL loss and statistics."""
        cfg = self.cfg
        n = min(cfg.prompts_per_step, len(self.prompts))
        chosen = torch.randperm(len(self.prompts), generator=self.gen)[:n].tolist()
        texts = [self.prompts[i] for i in chosen]
        seeds = torch.randint(0, 2**31 - 1, (2,), generator=self.gen).tolist()
        potential = self._potential(chosen)
        T, S, M = cfg.max_new_tokens, cfg.max_new_tokens - 1, cfg.num_negatives
        K = 1 if cfg.positives == "given" else cfg.num_particles
        cond = None if self.conditions is None else self.conditions[chosen]
        pos, neg, memo = self._draws(texts, potential, cond, seeds)
        prompts = encode_prompts(self.tokenizer, texts)
        device, B = self.acc.device, len(texts)
        neg_tok = self._tokens(neg, prompts.pad_token_id)  # [B*M, T]
        pos_tok, pos_log_w, log_phi = self._positives(pos, chosen, potential, prompts)
        pos_len, neg_len = lengths_of(pos_tok, self.eos), lengths_of(neg_tok, self.eos)
        index = torch.arange(B, device=device)
        pi = torch.cat([index.repeat_interleave(K), index.repeat_interleave(M)])
        hidden, logp = base_states(self.model, prompts, pi, torch.cat([pos_tok, neg_tok]), S)
        row_cond = None if cond is None else cond.to(device)[pi][:, None, :]
        scores = self.head(hidden, row_cond)  # [B*(K+M), S, V], with grad
        steps = torch.arange(1, S + 1, device=device)  # t = 1..S
        # positives: log psi_t(x_<=t), or log phi where the row completed at t
        gathered = scores[: B * K].double().gather(2, pos_tok[:, :S, None])[..., 0]  # [B*K, S]
        done_at = steps[None, :] == pos_len[:, None]
        pos_log_psi = torch.where(done_at, log_phi[:, None], gathered)
        pos_mask = steps[None, :] <= pos_len[:, None]
        where = dict(tokenizer=self.tokenizer, eos=self.eos, T=T)  # what a Particles needs
        pos_args = (pos_log_psi.view(B, K, S), pos_log_w, pos_mask.view(B, K, S))  # [B, K, S]
        neg_args = (neg_tok, neg_len, memo, prompts)
        neg_scores = scores[B * K :].double()
        if cfg.negatives == "sampled":
            loss = sampled_loss(neg_scores, *neg_args, *pos_args, **where)
        else:
            twisted = cfg.negatives == "twisted"
            neg_logp = logp[B * K :].double()
            loss = exact_last_token_loss(
                neg_scores, neg_logp, *neg_args, *pos_args, **where, twisted=twisted
            )
        if pos is None:
            return loss, dict(ess=1.0, log_phi=float(log_phi.mean()))
        ess = torch.exp(-torch.logsumexp(2 * pos.log_weights, dim=1))
        stats = dict(
            log_z=float(pos.log_z.mean()),
            ess=float(ess.mean()),
            resample_rate=float(pos.resampled.float().mean()),
        )
        return loss, stats

    # ------------------------------------------------------------------ Trainer hooks
    def train_step(self) -> dict:
        """One AdamW step of the head on :meth:`batch_loss`; the loss and its statistics."""
        cfg = self.cfg
        t0 = time.monotonic()
        self.head.train()
        loss, stats = self.batch_loss()
        self.acc.backward(loss)
        if cfg.max_grad_norm > 0:
            self.acc.clip_grad_norm_(self.head.parameters(), cfg.max_grad_norm)
        self.opt.step()
        self.sched.step()
        self.opt.zero_grad()
        return dict(loss=float(loss.detach()), **stats, step_s=time.monotonic() - t0)

    def extra_state(self) -> dict:
        return {"gen": self.gen.get_state()}

    def load_extra_state(self, extra: dict) -> None:
        self.gen.set_state(extra["gen"])

    def identity(self) -> dict:
        """The head's config: a checkpoint of another kind of head is not resumed."""
        return {"head_config": self.unwrapped.config}

    def export(self) -> Path:
        path = self.out / "twist_head.pt"
        if self.acc.is_main_process:
            self.out.mkdir(parents=True, exist_ok=True)
            self.unwrapped.save(path)
        self.acc.wait_for_everyone()
        return path


def train_ctl(*args, **kwargs) -> dict:
    """Train a head in place by CTL (resuming from ``cfg.out_dir``): ``CTLTrainer(*args,
    **kwargs).train()``, with :class:`CTLTrainer`'s arguments; returns what
    :meth:`CTLTrainer.train` does."""
    return CTLTrainer(*args, **kwargs).train()
