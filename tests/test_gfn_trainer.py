"""GFlowNet trainer on a toy LM: exact KL goes down, resume is exact, bad input is refused.

The task (GFN_T, GFN_PROMPT, GFN_PHI, gfn_config) and its exact target (gfn_target) are
conftest's, shared with test_flow_twist.py.
"""

from __future__ import annotations

import os
import signal

import pytest
import torch
from conftest import GFN_PHI as PHI
from conftest import GFN_PROMPT as PROMPT
from conftest import GFN_T as T
from conftest import GFN_TARGETS, gfn_config

from llmsample.diagnostics.exact import TOY_EOS, enumerate_target, toy_model, toy_tokenizer
from llmsample.gfn import GFNConfig, GFNTrainer, ReplayBuffer, add_lora, sample_rollouts
from llmsample.hf.prompts import encode_prompts
from llmsample.hf.session import teacher_force
from llmsample.potentials import Constraint


def _kl(policy, tok, target) -> float:
    q = enumerate_target(policy, tok, PROMPT, None, T, TOY_EOS).log_p
    return float((q.exp() * (q - target.log_sigma)).sum())


@pytest.mark.parametrize("loss", ["tb", "vargrad", "subtb"])
def test_training_drives_exact_kl_down(tmp_path, gfn_target, loss):
    tok = toy_tokenizer(with_pad=True)
    policy = add_lora(toy_model("gpt2"), gfn_config(tmp_path))
    before = _kl(policy, tok, gfn_target)
    cfg = gfn_config(tmp_path, loss=loss)
    result = GFNTrainer(policy, tok, [PROMPT], PHI, cfg, stop_ids=[TOY_EOS]).train()
    after = _kl(policy, tok, gfn_target)
    assert result["finished"] and result["step"] == 40
    assert before > 1.0  # the base model is far from sigma ...
    assert after < before / 5, (before, after)  # ... and 40 steps close most of the gap
    assert (tmp_path / "run" / "adapter" / "adapter_config.json").is_file()
    assert (tmp_path / "run" / "metrics.jsonl").read_text().count('"train"') == 8
    # lm_head is a LoRA target and tied to the input embedding: no embedding copy saved
    from safetensors import safe_open

    with safe_open(str(tmp_path / "run" / "adapter" / "adapter_model.safetensors"), "pt") as f:
        keys = set(f.keys())
    assert keys and all("lora_" in k for k in keys), keys


def test_prompt_conditioned_log_z_learns_per_prompt(tmp_path):
    """Two prompts with different Z: the head must separate them."""
    model, tok = toy_model("gpt2"), toy_tokenizer(with_pad=True)
    prompts = ["a b", "c d e f"]
    zs = [enumerate_target(model, tok, p, PHI, T, TOY_EOS).log_z for p in prompts]
    cfg = gfn_config(tmp_path, log_z="prompt", prompts_per_step=2, steps=150, log_z_lr=0.05)
    trainer = GFNTrainer(add_lora(model, cfg), tok, prompts, PHI, cfg, stop_ids=[TOY_EOS])
    trainer.train()
    pb = encode_prompts(tok, prompts)  # the padded batch the trainer feeds the head
    empty = torch.zeros(2, 0, dtype=torch.long)
    tf = teacher_force(trainer.policy, pb.input_ids, pb.attention_mask, empty, empty, hidden=True)
    with torch.no_grad():
        learned = trainer.log_z(tf.context_hidden.clone()).tolist()
    assert abs(learned[0] - zs[0]) < 0.3 and abs(learned[1] - zs[1]) < 0.3, (learned, zs)


def test_resume_after_signal_matches_uninterrupted_run(tmp_path):
    tok = toy_tokenizer(with_pad=True)

    def run(out, interrupt_at=None):
        cfg = gfn_config(tmp_path, steps=8, out_dir=str(out), eval_every=4 if interrupt_at else 0)
        policy = add_lora(toy_model("gpt2"), cfg)

        def evaluate(model, step):
            if step == interrupt_at:
                os.kill(os.getpid(), signal.SIGTERM)  # as `kill` would: checkpoint and stop
            return {}

        trainer = GFNTrainer(policy, tok, [PROMPT], PHI, cfg, stop_ids=[TOY_EOS], evaluate=evaluate)
        return trainer.train(), trainer

    full, ref = run(tmp_path / "full")
    part, _ = run(tmp_path / "part", interrupt_at=4)
    assert not part["finished"] and part["step"] == 4
    resumed, again = run(tmp_path / "part")
    assert resumed["finished"] and resumed["step"] == 8
    for (name, a), (_, b) in zip(ref.policy.named_parameters(), again.policy.named_parameters()):
        if a.requires_grad:
            assert torch.equal(a, b), name
    assert len(again.replay) == len(ref.replay)
    # the checkpoint holds what training changes: the LoRA and log Z, no frozen weight
    from safetensors import safe_open

    ckpt = sorted((tmp_path / "part" / "checkpoints").glob("step_*"))[-1]
    saved = set()
    for file in ckpt.glob("model*.safetensors"):
        with safe_open(str(file), "pt") as f:
            saved |= set(f.keys())
    trainable = {n for n, p in again.policy.named_parameters() if p.requires_grad}
    trainable |= {n for n, p in again.log_z.named_parameters() if p.requires_grad}
    assert saved == trainable, saved ^ trainable


def test_time_budget_stop_leaves_a_usable_adapter(tmp_path):
    """max_minutes is a budget: the run stops resumably *and* exports what it learned."""
    tok = toy_tokenizer(with_pad=True)
    cfg = gfn_config(tmp_path, steps=8, max_minutes=1e-9)
    result = GFNTrainer(add_lora(toy_model("gpt2"), cfg), tok, [PROMPT], PHI, cfg).train()
    assert result["stopped_by"] == "max_minutes" and not result["finished"]
    assert result["step"] == 1
    assert (tmp_path / "run" / "adapter" / "adapter_config.json").is_file()
    assert sorted((tmp_path / "run" / "checkpoints").glob("step_*"))  # and resumable


def test_refuses_bad_input(tmp_path):
    tok = toy_tokenizer(with_pad=True)
    model = toy_model("gpt2")
    with pytest.raises(TypeError, match="peft model"):
        GFNTrainer(model, tok, [PROMPT], PHI, gfn_config(tmp_path))
    policy = add_lora(model, gfn_config(tmp_path))
    with pytest.raises(ValueError, match="single stop token"):
        GFNTrainer(policy, tok, [PROMPT], PHI, gfn_config(tmp_path, loss="subtb"), stop_ids=[0, 8])
    with pytest.raises(ValueError, match="at least one prompt"):
        GFNTrainer(policy, tok, [], PHI, gfn_config(tmp_path))
    hard = Constraint(lambda text: "c" in text.split(), name="has c")
    cfg = gfn_config(tmp_path, steps=3)
    with pytest.raises(ValueError, match="positive reward"):
        GFNTrainer(policy, tok, [PROMPT], hard, cfg, stop_ids=[TOY_EOS]).train()


@pytest.mark.parametrize(
    "bad, match",
    [
        (dict(loss="db"), "loss must be"),
        (dict(loss="vargrad", samples_per_prompt=1), "samples_per_prompt >= 2"),
        (dict(replay_fraction=1.0), "fresh"),
        (dict(epsilon_start=1.5), "epsilon_start"),
        (dict(temperature_min=0.0), "temperature_min"),
        (dict(steps=0), "steps"),
        (dict(mixed_precision="fp8"), "mixed_precision"),
        (dict(rollout_dtype="int8"), "rollout_dtype"),
        (dict(weight_decay=-0.1), "weight_decay must be >= 0"),
        (dict(max_grad_norm=float("nan")), "max_grad_norm must be >= 0"),
        (dict(max_minutes=-1.0), "max_minutes must be >= 0"),
    ],
)
def test_config_validation(bad, match):
    with pytest.raises(ValueError, match=match):
        GFNConfig(**bad)


def test_reward_temperature_schedule():
    cfg = GFNConfig(
        reward_temperature_start=4.0, reward_temperature_end=1.0, reward_temperature_steps=3
    )
    got = [cfg.reward_temperature(s) for s in range(5)]
    assert got == pytest.approx([4.0, 3.0, 2.0, 1.0, 1.0])


def test_rollouts_end_at_stop_or_cut():
    model, tok = toy_model("gpt2"), toy_tokenizer(with_pad=True)
    pb = encode_prompts(tok, ["a b", "c d e f"])
    g = torch.Generator().manual_seed(0)
    ro = sample_rollouts(model, pb, 64, 4, [TOY_EOS], temperature=1.5, epsilon=0.1, generator=g)
    assert ro.tokens.shape == (128, 4) and ro.prompt_index.tolist() == [0] * 64 + [1] * 64
    for row, n, stopped in zip(ro.tokens.tolist(), ro.lengths.tolist(), ro.stopped.tolist()):
        body = row[:n]
        assert (TOY_EOS in body) == stopped
        if stopped:
            assert body.index(TOY_EOS) == n - 1  # nothing after the stop token
        else:
            assert n == 4  # cut at T
    assert ro.stopped.any() and (~ro.stopped).any()


def test_replay_buffer_dedup_capacity_and_priority():
    buf = ReplayBuffer(capacity=3)
    buf.add(0, [(1,), (2,), (1,), (3,), (4,)], [0.0, 1.0, 0.5, 2.0, float("-inf")])
    assert buf.size(0) == 3  # (1,) deduplicated, -inf dropped, capacity keeps the top 3
    g = torch.Generator().manual_seed(0)
    draws = buf.sample(0, 3, generator=g)
    assert sorted(draws) == [(1,), (2,), (3,)]  # without replacement: all distinct
    counts = {s: 0 for s in [(1,), (2,), (3,)]}
    for _ in range(2000):
        counts[buf.sample(0, 1, generator=g)[0]] += 1
    probs = torch.softmax(torch.tensor([0.5, 1.0, 2.0]), 0).tolist()
    for s, p in zip([(1,), (2,), (3,)], probs):
        se = (p * (1 - p) / 2000) ** 0.5
        assert abs(counts[s] / 2000 - p) < 4 * se
    other = ReplayBuffer()
    other.load_state_dict(buf.state_dict())
    assert other.size(0) == 3 and other.sample(1, 2) == []


def test_replay_buffer_seeded_sequences_come_first_once():
    buf = ReplayBuffer(capacity=8)
    buf.add(0, [(1,)], [5.0])  # a high reward: priority alone would always pick it
    buf.seed(0, [(2,), (3,), (1,), (2,)])  # (1,) is already scored, (2,) repeats
    assert buf.size(0) == 3 and len(buf) == 3
    g = torch.Generator().manual_seed(0)
    first = buf.sample(0, 1, generator=g)
    assert first[0] in {(2,), (3,)}  # seeded (unscored) sequences are drawn first ...
    assert buf.size(0) == 2  # each seeded sequence is drawn once, then leaves the queue
    copy = ReplayBuffer()
    copy.load_state_dict(buf.state_dict())  # ... and the queue survives a checkpoint
    last = ({(2,), (3,)} - set(first)).pop()
    assert copy.sample(0, 2, generator=g) == buf.sample(0, 2, generator=g) == [last, (1,)]
    assert buf.size(0) == 1 and buf.sample(0, 2, generator=g) == [(1,)]  # only scored left
    buf.add(0, [(2,), (3,)], [-1.0, -2.0])  # the trainer adds them back with their reward
    assert buf.size(0) == 3


def test_demonstrations_enter_as_replay_rows_and_keep_sigma(tmp_path, gfn_target):
    """Human-style off-policy rows (here a low-probability sequence under the base model)
    are scored once and replayed; VarGrad's fixed point is still sigma."""
    tok = toy_tokenizer(with_pad=True)
    policy = add_lora(toy_model("gpt2"), gfn_config(tmp_path))
    before = _kl(policy, tok, gfn_target)
    cfg = gfn_config(tmp_path, loss="vargrad", replay_fraction=0.25)
    demos = [["c c", "a a", "c c c c c"]]  # the last is longer than T and is dropped
    trainer = GFNTrainer(policy, tok, [PROMPT], PHI, cfg, stop_ids=[TOY_EOS], demonstrations=demos)
    assert trainer.num_demonstrations == 2
    trainer.train()
    after = _kl(policy, tok, gfn_target)
    assert after < before / 5, (before, after)
    seeded = {(*tok("c c", add_special_tokens=False)["input_ids"], TOY_EOS)}
    assert seeded <= set(trainer.replay.rewards(0))  # scored and kept in the buffer
    events = (tmp_path / "run" / "metrics.jsonl").read_text()
    assert '"log_reward_replay"' in events


def test_demonstrations_refused_when_they_cannot_enter(tmp_path):
    tok = toy_tokenizer(with_pad=True)
    policy = add_lora(toy_model("gpt2"), gfn_config(tmp_path))
    cfg = gfn_config(tmp_path, replay_fraction=0.0)
    with pytest.raises(ValueError, match="raise replay_fraction"):
        GFNTrainer(policy, tok, [PROMPT], PHI, cfg, stop_ids=[TOY_EOS], demonstrations=[["c"]])
    cfg = gfn_config(tmp_path, replay_fraction=0.25)
    with pytest.raises(ValueError, match="one list per prompt"):
        GFNTrainer(policy, tok, [PROMPT], PHI, cfg, stop_ids=[TOY_EOS], demonstrations=[])


def test_activation_checkpointing_trains_the_same_policy(tmp_path):
    tok = toy_tokenizer(with_pad=True)
    trained = []
    for ckpt in (False, True):
        cfg = gfn_config(tmp_path / str(ckpt), steps=5, activation_checkpointing=ckpt)
        policy = add_lora(toy_model("gpt2"), cfg)
        GFNTrainer(policy, tok, [PROMPT], PHI, cfg, stop_ids=[TOY_EOS]).train()
        lora = {n: p.detach().clone() for n, p in policy.named_parameters() if p.requires_grad}
        trained.append(lora)
    assert trained[0].keys() == trained[1].keys() and trained[0]
    moved = max(float(p.abs().max()) for n, p in trained[0].items() if "lora_B" in n)
    assert moved > 1e-3  # five steps changed the adapter (lora_B starts at zero)
    for n, p in trained[0].items():
        torch.testing.assert_close(trained[1][n], p, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_merged_copy_gives_the_policys_logits_and_follows_its_updates(tmp_path, arch):
    """The rollout copy: LoRA merged into its own weights (a tied lm_head LoRA leaves the
    input embedding alone), the trained norm copied, and resynced after each update."""
    from llmsample.hf.adapters import MergedCopy

    norm = {"gpt2": "ln_f", "llama": "model.norm"}[arch]
    targets = {"gpt2": GFN_TARGETS, "llama": ["q_proj", "v_proj", "down_proj", "lm_head"]}[arch]
    cfg = gfn_config(tmp_path, target_modules=targets, modules_to_save=[norm])
    policy = add_lora(toy_model(arch), cfg)
    emb = policy.get_input_embeddings().weight.detach().clone()
    tied = policy.get_output_embeddings().base_layer.weight is policy.get_input_embeddings().weight
    assert tied == (arch == "gpt2")  # the toy GPT-2 ties lm_head to the input embedding
    vocab = policy.config.vocab_size
    ids = torch.arange(12).view(2, 6) % vocab

    def perturb(seed):
        g = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for p in policy.parameters():
                if p.requires_grad:
                    p.add_(0.3 * torch.randn(p.shape, generator=g))

    def logits(model):
        with torch.no_grad():
            return model(input_ids=ids).logits.float()

    perturb(0)
    exact, low = MergedCopy(policy, torch.float32), MergedCopy(policy, torch.bfloat16)
    assert len(exact.lora) >= 4 and len(exact.saved) == 1  # the final norm only
    torch.testing.assert_close(logits(exact.model), logits(policy), rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(exact.model.get_input_embeddings().weight, emb)
    assert all(p.dtype == torch.bfloat16 and not p.requires_grad for p in low.model.parameters())
    gap = (logits(low.model) - logits(policy)).abs().max()
    assert 0 < gap < 0.1 * logits(policy).abs().max()  # rounded, not another model

    perturb(1)  # an update: the copies are stale until synced
    assert not torch.allclose(logits(exact.model), logits(policy), atol=1e-3)
    exact.sync()
    torch.testing.assert_close(logits(exact.model), logits(policy), rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(exact.model.get_input_embeddings().weight, emb)


@pytest.mark.parametrize("mixed_precision", ["no", "bf16"])
def test_low_precision_rollouts_still_train_the_exact_task(tmp_path, gfn_target, mixed_precision):
    """rollout_dtype=bfloat16: sampled by a bf16 merged copy, scored under the fp32
    policy (or under bf16 autocast, as the CommonGen config does); the exact KL still
    falls as with on-policy fp32 steps."""
    tok = toy_tokenizer(with_pad=True)
    cfg = gfn_config(
        tmp_path, loss="vargrad", rollout_dtype="bfloat16", mixed_precision=mixed_precision
    )
    policy = add_lora(toy_model("gpt2"), cfg)
    before = _kl(policy, tok, gfn_target)
    trainer = GFNTrainer(policy, tok, [PROMPT], PHI, cfg, stop_ids=[TOY_EOS])
    trainer.train()
    after = _kl(policy, tok, gfn_target)
    assert after < before / 5, (before, after)
    assert {p.dtype for p in trainer.rollout.model.parameters()} == {torch.bfloat16}
    assert {p.dtype for p in policy.parameters()} == {torch.float32}
    trainer.rollout.sync()  # the copy holds the trained adapter, rounded
    name, src = next((n, m) for n, m in policy.named_modules() if n.endswith("c_attn"))
    dst = dict(trainer.rollout.model.named_modules())[name.removeprefix("base_model.model.")]
    merged = src.get_base_layer().weight + src.get_delta_weight("default")
    torch.testing.assert_close(dst.weight.float(), merged, rtol=1e-2, atol=1e-2)


def test_merged_copy_refuses_what_it_cannot_merge(tmp_path):
    from llmsample.hf.adapters import MergedCopy

    with pytest.raises(TypeError, match="peft model"):
        MergedCopy(toy_model("gpt2"), torch.bfloat16)
    embedding = add_lora(toy_model("gpt2"), gfn_config(tmp_path, target_modules=["wte", "c_fc"]))
    with pytest.raises(ValueError, match="plain LoRA on linear layers, not Embedding"):
        MergedCopy(embedding, torch.bfloat16)
    policy = add_lora(toy_model("gpt2"), gfn_config(tmp_path))
    with pytest.raises(ValueError, match="floating dtype"):
        MergedCopy(policy, torch.int8)
    rollout = MergedCopy(policy, torch.bfloat16)
    policy.merge_adapter()
    with pytest.raises(RuntimeError, match="unmerge"):
        rollout.sync()
