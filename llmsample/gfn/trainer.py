"""GFlowNet LoRA fine-tuning: train q_theta = base + LoRA to sample sigma ∝ p_base · phi.

    policy = add_lora(model, cfg)
    trainer = GFNTrainer(policy, tokenizer, prompts, potential, cfg, stop_ids=[eos])
    metrics = trainer.train()            # resumes from cfg.out_dir/checkpoints if present

One optimizer step, per micro-batch (``gradient_accumulation_steps`` of them):

1. **Pick prompts** (``prompts_per_step``) and **explore**: K - K_r fresh rollouts per
   prompt from the policy with the KV cache and no autograd (on-policy, or at a random
   temperature on ``tempered_fraction`` of steps; epsilon-uniform mixing on top; with
   ``rollout_dtype`` bfloat16 from a frozen bf16 copy of the policy with the LoRA merged
   in, synced each step), plus
   K_r = ``replay_fraction`` K sequences from the reward-prioritized replay buffer
   (``demonstrations``, e.g. human replies, seed it: drawn first, each once, then
   replayed by reward like the rest; every loss here is valid off-policy).
2. **Reward** with the *same* model, adapter disabled: log R = (log p_base(x|c) +
   log phi(x,c)) / tau (``base_in_reward=False``: log phi / tau), tau on the
   reward-temperature schedule (one teacher-forced pass, no grad). For ``subtb`` also
   log R of every prefix followed by the stop token.
3. **Score** the rows under the untempered policy in one teacher-forced pass with
   gradients (memory: one forward + backward, not T steps of graph; with
   ``activation_checkpointing`` each layer's inside is recomputed in the backward
   instead of kept) and apply the loss
   (:mod:`llmsample.gfn.losses`). Every row (fresh, replayed or a demonstration's
   first draw) enters the replay buffer with its untempered log R.

The loop, checkpoints, resume, logs and stop signals are :class:`llmsample.train.base.Trainer`'s:
checkpoints (accelerate state + replay buffer + RNG + step + the config) land in
``out_dir/checkpoints`` every ``save_every`` steps, on SIGINT/SIGTERM and at
``max_minutes``; a rerun resumes from the newest one if its config differs only in
``GFNConfig.RESUMABLE_FIELDS`` (else it is refused; ``overwrite=True`` starts fresh). The
adapter and log Z are exported to ``out_dir/adapter`` at the end and when ``max_minutes``
runs out (a budget-limited run leaves a usable adapter); metrics go to
``out_dir/metrics.jsonl`` and to any accelerate tracker. ``train()`` returns the last
evaluation with the step it was measured at (``eval_step``), the step reached,
``finished`` and ``stopped_by`` (None, ``"SIGINT"``, ``"SIGTERM"`` or
``"max_minutes"``). Works under ``accelerate launch`` (DDP) unchanged.
"""

from __future__ import annotations

import dataclasses
import json
import time
from collections.abc import Callable, Sequence
from contextlib import nullcontext
from pathlib import Path

import torch
from torch import Tensor, nn

from llmsample.gfn.config import GFNConfig
from llmsample.gfn.losses import prefix_flows, subtrajectory_balance, trajectory_balance, vargrad
from llmsample.gfn.replay import ReplayBuffer
from llmsample.gfn.reward import log_rewards
from llmsample.gfn.rollout import (
    Rollouts,
    cat_rollouts,
    rollouts_from_sequences,
    sample_rollouts,
)
from llmsample.hf.adapters import MergedCopy, is_peft, lora_model
from llmsample.hf.checkpointing import checkpointed_layers
from llmsample.hf.prompts import PromptBatch, encode_prompts
from llmsample.hf.session import teacher_force
from llmsample.potentials.base import PerPrompt, Potential
from llmsample.train.base import Trainer, make_accelerator

__all__ = ["GFNTrainer", "LogZ", "add_lora"]


def add_lora(model, cfg: GFNConfig):
    """Wrap ``model`` in a fresh peft LoRA adapter as configured (the base stays frozen).
    The adapter's random init depends only on ``cfg.seed``, not on the global RNG."""
    return lora_model(
        model,
        rank=cfg.lora_rank,
        alpha=cfg.lora_alpha,
        target_modules=cfg.target_modules,
        modules_to_save=cfg.modules_to_save,
        seed=cfg.seed,
    )


class LogZ(nn.Module):
    """log Z(c): a scalar, or a linear head on the prompt's last hidden state (detached)."""

    def __init__(self, hidden_size: int | None = None):
        super().__init__()
        self.bias = nn.Parameter(torch.zeros(()))
        self.head = nn.Linear(hidden_size, 1) if hidden_size else None
        if self.head is not None:
            nn.init.zeros_(self.head.weight)
            nn.init.zeros_(self.head.bias)

    def forward(self, hidden: Tensor | None = None) -> Tensor:
        if self.head is None or hidden is None:
            return self.bias
        return self.bias + self.head(hidden.detach()).squeeze(-1)  # [R]


class GFNTrainer(Trainer):
    """Train a peft ``policy`` to sample sigma ∝ p_base · phi; see the module docstring."""

    name = "gfn"
    postfix = {"loss": ".3g", "log_z": ".2f"}

    def __init__(
        self,
        policy,
        tokenizer,
        prompts: list[str],
        potential: Potential | Sequence[Potential] | None,
        cfg: GFNConfig,
        *,
        stop_ids: list[int] | None = None,
        evaluate: Callable[[object, int], dict] | None = None,
        run_config=None,
        demonstrations: Sequence[Sequence[str]] | None = None,
    ):
        """``run_config``: the config recorded with each checkpoint and compared on resume
        (default ``cfg``); a recipe passes its whole config (task fields included).
        ``demonstrations``: per prompt, continuation texts that seed the replay buffer
        (each followed by the first stop id; those longer than ``max_new_tokens`` are
        dropped)."""
        if not is_peft(policy):
            raise TypeError(
                "policy must be a peft model (the reward uses the same model with the adapter "
                "disabled); wrap the base model with llmsample.gfn.add_lora(model, cfg)"
            )
        if not prompts:
            raise ValueError("GFNTrainer needs at least one prompt")
        if demonstrations is not None and len(demonstrations) != len(prompts):
            raise ValueError(
                f"got demonstrations for {len(demonstrations)} prompts, expected one list "
                f"per prompt ({len(prompts)})"
            )
        if demonstrations is not None and int(cfg.replay_fraction * cfg.samples_per_prompt) < 1:
            raise ValueError(
                "demonstrations enter training as replay rows, but replay_fraction * "
                f"samples_per_prompt = {cfg.replay_fraction} * {cfg.samples_per_prompt} < 1; "
                "raise replay_fraction"
            )
        if isinstance(potential, Sequence) and len(potential) != len(prompts):
            raise ValueError(
                f"got {len(potential)} per-prompt potentials for {len(prompts)} prompts; "
                "pass one Potential for all prompts or exactly one per prompt"
            )
        self.stop_ids = list(stop_ids or [tokenizer.eos_token_id])
        if cfg.loss == "subtb" and len(self.stop_ids) != 1:
            raise ValueError(
                f"loss='subtb' needs a single stop token (terminal rewards of every prefix), "
                f"got {len(self.stop_ids)}; use loss='tb' or 'vargrad' with several"
            )
        acc = make_accelerator(
            cfg,
            mixed_precision=cfg.mixed_precision,
            gradient_accumulation_steps=cfg.gradient_accumulation_steps,
        )
        super().__init__(cfg, acc, evaluate=evaluate, run_config=run_config)
        self.tokenizer, self.prompts, self.potential = tokenizer, prompts, potential
        torch.manual_seed(cfg.seed)
        hidden = policy.config.hidden_size if cfg.loss == "tb" and cfg.log_z == "prompt" else None
        self.log_z = LogZ(hidden)
        lora = [p for p in policy.parameters() if p.requires_grad]
        groups = [dict(params=lora, lr=cfg.lr, weight_decay=cfg.weight_decay)]
        if cfg.loss == "tb":
            groups.append(dict(params=list(self.log_z.parameters()), lr=cfg.log_z_lr))
        self.opt = torch.optim.AdamW(groups)
        warm = max(cfg.warmup_steps, 1)
        sched = torch.optim.lr_scheduler.LambdaLR(self.opt, lambda s: min(1.0, (s + 1) / warm))
        # copied before accelerate wraps the policy's forward (an autocast wrapper would
        # follow it into the copy); holds the frozen base weights again, at rollout_dtype
        low = cfg.rollout_dtype != "float32"
        self.rollout = MergedCopy(policy, getattr(torch, cfg.rollout_dtype)) if low else None
        self.policy, self.log_z, self.opt, self.sched = self.acc.prepare(
            policy, self.log_z, self.opt, sched
        )
        if self.rollout is not None:
            self.rollout.model.to(self.acc.device)
        self.policy.eval()  # no dropout, ever: every loss needs the exact log q of the policy
        self.replay = ReplayBuffer(cfg.replay_capacity)
        self.num_demonstrations = self._seed_replay(demonstrations or [])
        seed = cfg.seed + self.acc.process_index
        self.gen = torch.Generator().manual_seed(seed)  # host-side choices (prompts, replay)
        self.sample_gen = torch.Generator(device=self.acc.device).manual_seed(seed)  # rollouts

    @property
    def unwrapped(self):
        return self.acc.unwrap_model(self.policy)

    # ------------------------------------------------------------------ data
    def _seed_replay(self, demonstrations: Sequence[Sequence[str]]) -> int:
        """Queue each prompt's demonstration texts (tokenized, + stop) in the replay
        buffer; the number kept."""
        kept = 0
        for i, texts in enumerate(demonstrations):
            seqs = []
            for text in texts:
                ids = self.tokenizer(text, add_special_tokens=False)["input_ids"]
                seq = (*ids, self.stop_ids[0])
                if len(seq) <= self.cfg.max_new_tokens:
                    seqs.append(seq)
            self.replay.seed(i, seqs)
            kept += len(seqs)
        return kept

    def _potential(self, chosen: list[int]) -> Potential | None:
        if isinstance(self.potential, Sequence):  # one per prompt: index by batch row
            return PerPrompt([self.potential[i] for i in chosen])
        return self.potential

    def _batch(self) -> tuple[PromptBatch, list[int], Rollouts, int]:
        cfg = self.cfg
        n = min(cfg.prompts_per_step, len(self.prompts))
        chosen = torch.randperm(len(self.prompts), generator=self.gen)[:n].tolist()
        prompts = encode_prompts(self.tokenizer, [self.prompts[i] for i in chosen], chat=cfg.chat)
        K = cfg.samples_per_prompt
        # the same K_r for every prompt (the losses see a [B, K] batch): as many as the
        # emptiest buffer among the chosen prompts can give
        k_r = min([int(cfg.replay_fraction * K)] + [self.replay.size(i) for i in chosen])
        temp = 1.0
        if float(torch.rand((), generator=self.gen)) < cfg.tempered_fraction:
            u = float(torch.rand((), generator=self.gen))
            temp = cfg.temperature_min + u * (cfg.temperature_max - cfg.temperature_min)
        model = self.acc.unwrap_model(self.policy)
        if self.rollout is not None:
            self.rollout.sync()
            model = self.rollout.model
        fresh = sample_rollouts(
            model,
            prompts,
            K - k_r,
            cfg.max_new_tokens,
            self.stop_ids,
            temperature=temp,
            epsilon=cfg.epsilon(self.step),
            generator=self.sample_gen,
        )
        parts = [Rollouts(*(getattr(fresh, f).cpu() for f in Rollouts.__dataclass_fields__))]
        if k_r:
            seqs, idx = [], []
            for b, i in enumerate(chosen):
                got = self.replay.sample(i, k_r, cfg.replay_temperature, self.gen)
                seqs += got
                idx += [b] * len(got)
            pad = prompts.pad_token_id
            parts.append(rollouts_from_sequences(seqs, idx, cfg.max_new_tokens, self.stop_ids, pad))
        ro = cat_rollouts(parts)
        order = torch.sort(ro.prompt_index, stable=True).indices  # prompt-major [B*K]
        ro = Rollouts(*(getattr(ro, f)[order] for f in Rollouts.__dataclass_fields__))
        return prompts, chosen, ro, K - k_r

    # ------------------------------------------------------------------ loss
    def _loss(
        self, prompts: PromptBatch, chosen: list[int], ro: Rollouts, tau: float
    ) -> tuple[Tensor, dict, Tensor]:
        cfg = self.cfg
        subtb = cfg.loss == "subtb"
        terms = log_rewards(
            self.acc.unwrap_model(self.policy),
            self.tokenizer,
            prompts,
            ro,
            self._potential(chosen),
            self.stop_ids,
            base_in_reward=cfg.base_in_reward,
            prefixes=subtb,
        )
        log_r, stop_r, valid = terms.log_reward, terms.stop_reward, terms.stop_valid
        device = self.acc.device
        ctx_ids, ctx_mask = (
            prompts.input_ids[ro.prompt_index],
            prompts.attention_mask[ro.prompt_index],
        )
        head = cfg.loss == "tb" and cfg.log_z == "prompt"
        ckpt = checkpointed_layers(self.policy) if cfg.activation_checkpointing else nullcontext()
        with ckpt:
            tf = teacher_force(
                self.policy,
                ctx_ids,
                ctx_mask,
                ro.tokens,
                ro.mask.long(),
                grad=True,
                stop_ids=self.stop_ids if subtb else None,
                hidden=head,
            )
        B = prompts.size
        log_q = tf.token_logp.sum(1)  # [R]
        target = (log_r / tau).to(device=device, dtype=torch.float32)
        finite = torch.isfinite(target)
        if not bool(finite.all()):
            raise ValueError(
                f"{int((~finite).sum())} sampled sequence(s) have log R = -inf (phi = 0): GFlowNet "
                "losses need a positive reward; soften the potential (e.g. a penalty instead "
                "of a hard constraint) or add a floor to it"
            )
        if cfg.loss == "tb":
            lz = self.log_z(tf.context_hidden)  # [] or [R]
            lz_rows = lz.expand(log_q.shape[0]) if lz.dim() == 0 else lz
            loss = (lz_rows + log_q - target).pow(2).mean()
            stats = dict(log_z=float(lz_rows.detach().mean()))
            if lz.dim() == 0:  # the documented function, on [B, K]
                loss = trajectory_balance(log_q.view(B, -1), target.view(B, -1), lz)
        elif cfg.loss == "vargrad":
            loss, lz = vargrad(log_q.view(B, -1), target.view(B, -1))
            stats = dict(log_z=float(lz.mean()))
        else:
            loss, stats = self._subtb_loss(ro, tf, stop_r, valid, tau)
        stats["log_reward"] = float(log_r.mean())
        stats["log_q"] = float(log_q.detach().mean())
        return loss, stats, log_r

    def _subtb_loss(self, ro: Rollouts, tf, stop_r: Tensor, valid: Tensor, tau: float):
        """Modified SubTB over every prefix: the loss and the start flow log u_0 as log Z."""
        device = self.acc.device
        T = ro.tokens.shape[1]
        n = (ro.lengths - ro.stopped.long()).to(device)
        pos = torch.arange(T, device=device)
        q_tok = torch.where(pos[None, :] < n[:, None], tf.token_logp, 0.0)  # [R, T]
        q_stop = tf.stop_logp.clone()  # [R, T+1]
        cut = (~ro.stopped).to(device) & (n == T)
        q_stop[:, T] = torch.where(cut, 0.0, q_stop[:, T])
        valid_d = valid.to(device)
        q_stop = torch.where(valid_d, q_stop, 0.0)
        r_stop = torch.where(valid_d, (stop_r / tau).to(device, torch.float32), 0.0)
        loss = subtrajectory_balance(q_tok, q_stop, r_stop, valid_d, self.cfg.subtb_lambda)
        u0 = prefix_flows(q_tok, q_stop, r_stop)[:, 0]
        return loss, dict(log_z=float(u0.detach().mean()))

    # ------------------------------------------------------------------ one step
    def train_step(self) -> dict:
        """Explore, reward, score and update (``gradient_accumulation_steps`` micro-batches);
        the mean statistics of the micro-batches."""
        cfg = self.cfg
        t0 = time.monotonic()
        tau = cfg.reward_temperature(self.step)
        agg: dict[str, float] = {}
        n_rows, uniq = 0, []
        for _ in range(cfg.gradient_accumulation_steps):
            prompts, chosen, ro, n_fresh = self._batch()
            with self.acc.accumulate(self.policy):
                with self.acc.autocast():
                    loss, stats, log_r = self._loss(prompts, chosen, ro, tau)
                self.acc.backward(loss)
                if cfg.max_grad_norm > 0 and self.acc.sync_gradients:
                    self.acc.clip_grad_norm_(self.policy.parameters(), cfg.max_grad_norm)
                self.opt.step()
                self.sched.step()
                self.opt.zero_grad()
            stats["loss"] = float(loss.detach())
            if n_fresh < cfg.samples_per_prompt:  # rows are prompt-major, fresh ones first
                stats["log_reward_replay"] = float(log_r.view(len(chosen), -1)[:, n_fresh:].mean())
            for k, v in stats.items():
                agg[k] = agg.get(k, 0.0) + v / cfg.gradient_accumulation_steps
            self._remember(chosen, ro, log_r)
            seqs = ro.sequences()
            uniq.append(len(set(seqs)) / max(len(seqs), 1))
            n_rows += ro.num_rows
        dt = time.monotonic() - t0
        return dict(tau=tau, unique=sum(uniq) / len(uniq), **agg, samples_per_s=n_rows / dt)

    # ------------------------------------------------------------------ checkpoints and export
    def extra_state(self) -> dict:
        return {
            "replay": self.replay.state_dict(),
            "gen": self.gen.get_state(),
            "sample_gen": self.sample_gen.get_state(),
        }

    def load_extra_state(self, extra: dict) -> None:
        self.replay.load_state_dict(extra["replay"])
        self.gen.set_state(extra["gen"])
        self.sample_gen.set_state(extra["sample_gen"])

    def export(self, path: Path | None = None) -> Path:
        """Save the LoRA adapter (peft format) and log Z to ``out_dir/adapter``."""
        path = Path(path or self.out / "adapter")
        if self.acc.is_main_process:
            # only what training changed: with lm_head among the LoRA targets peft would
            # otherwise add the (frozen, often tied) embedding matrices to the adapter
            self.unwrapped.save_pretrained(str(path), save_embedding_layers=False)
            torch.save(self.acc.unwrap_model(self.log_z).state_dict(), path / "log_z.pt")
            (path / "gfn_config.json").write_text(
                json.dumps(dataclasses.asdict(self.cfg), indent=2)
            )
        self.acc.wait_for_everyone()
        return path

    def _remember(self, chosen: list[int], ro: Rollouts, log_r: Tensor) -> None:
        """Add this batch's sequences to the replay buffer with their untempered log R."""
        seqs, idx, vals = ro.sequences(), ro.prompt_index.tolist(), log_r.tolist()
        for b, i in enumerate(chosen):
            rows = [r for r in range(len(seqs)) if idx[r] == b]
            self.replay.add(i, [seqs[r] for r in rows], [vals[r] for r in rows])
