"""recipes/gfn_lora.py end to end on the two enumerable tasks (short runs)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "recipes"))

from gfn_lora import GFNRecipeConfig, main  # noqa: E402

from llmsample.config import parse_config  # noqa: E402


def _run(tmp_path, config: str, *flags: str) -> dict:
    argv = ["--config", str(ROOT / "recipes" / "configs" / config), "--out_dir", str(tmp_path)]
    argv += ["--progress", "false", "--save_every", "0", *flags]
    return main(parse_config(GFNRecipeConfig, argv))


def test_exact_task_recipe_lowers_exact_kl(tmp_path):
    summary = _run(tmp_path, "gfn_exact.yaml", "--steps", "40", "--eval_every", "0")
    base, trained = summary["base"], summary["trained"]
    assert base["step"] == 0 and trained["step"] == 40
    assert base["num_sequences"] >= 10_000  # the acceptance problem size
    assert trained["kl_q_sigma"] < base["kl_q_sigma"] / 3
    assert trained["kl_sigma_q"] < base["kl_sigma_q"] / 3
    assert json.loads((tmp_path / "summary.json").read_text())["final"]["finished"]


def test_uniform_number_recipe_raises_valid_fraction(tmp_path):
    summary = _run(tmp_path, "gfn_uniform_number.yaml", "--steps", "60", "--eval_every", "0")
    base, trained = summary["base"], summary["trained"]
    assert trained["valid_fraction"] > max(0.5, 2 * base["valid_fraction"])
    assert trained["kl_q_sigma"] < base["kl_q_sigma"] / 3


def test_recipe_config_validation():
    with pytest.raises(ValueError, match="task must be one of"):
        GFNRecipeConfig(task="sudoku")
    with pytest.raises(ValueError, match="miss_penalty"):
        GFNRecipeConfig(miss_penalty=0.0)
    with pytest.raises(ValueError, match="only the commongen task has them"):
        GFNRecipeConfig(task="exact", demonstrations="references")
    with pytest.raises(ValueError, match="demonstrations must be one of"):
        GFNRecipeConfig(task="commongen", demonstrations="true")
    with pytest.raises(ValueError, match="teacher_particles"):
        GFNRecipeConfig(task="commongen", demonstrations="smc", teacher_particles=0)


def test_commongen_references_become_chat_replies():
    from gfn_tasks import commongen_reply

    assert commongen_reply("airliner on the apron as passengers disembark .") == (
        "Airliner on the apron as passengers disembark."
    )
    assert commongen_reply("a dog , a ball and a park") == "A dog, a ball and a park."
    assert commongen_reply("Is the dog in the park ?") == "Is the dog in the park?"


def test_commongen_recipe_on_a_chat_model_resumes_after_a_kill(tmp_path, monkeypatch):
    """gfn_commongen.yaml on a tiny chat Llama folder (chat template, end-of-turn stop):
    a run killed after logging step 3 (checkpoint at step 2) resumes to the same losses and
    bit-identical LoRA weights as an uninterrupted run; checkpoints and the exported
    adapter hold only what training changes."""
    import gfn_lora
    import torch
    from conftest import CHAT_WORDS, make_chat_tokenizer
    from safetensors.torch import load_file

    from llmsample.diagnostics.exact import toy_model

    words = ["dog", "ball", "park", "throw", "a", "the", *CHAT_WORDS]
    folder = tmp_path / "model"
    toy_model("llama", vocab_size=len(words) + 1).save_pretrained(folder)
    make_chat_tokenizer(words).save_pretrained(folder)
    flags = ["--model", str(folder), "--steps", "4", "--num_prompts", "3", "--save_every", "2"]
    flags += ["--samples_per_prompt", "4", "--eval_every", "0", "--eval_prompts", "2"]
    flags += ["--eval_samples", "4", "--num_threads", "1", "--max_minutes", "0", "--log_every", "1"]

    def run(out):
        argv = ["--config", str(ROOT / "recipes/configs/gfn_commongen.yaml"), "--out_dir", str(out)]
        return main(parse_config(GFNRecipeConfig, [*argv, "--progress", "false", *flags]))

    straight = run(tmp_path / "a")
    assert straight["final"]["finished"] and straight["trained"]["step"] == 4

    class Killed(Exception):
        pass

    log = gfn_lora.GFNTrainer.log

    def dying_log(self, record):
        log(self, record)
        if record["event"] == "train" and record["step"] == 3:
            raise Killed

    monkeypatch.setattr(gfn_lora.GFNTrainer, "log", dying_log)
    with pytest.raises(Killed):
        run(tmp_path / "b")
    monkeypatch.setattr(gfn_lora.GFNTrainer, "log", log)
    resumed = run(tmp_path / "b")
    assert resumed["final"]["finished"]

    def losses(out):
        events = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
        return [e["loss"] for e in events if e["event"] == "train"]

    assert losses(tmp_path / "b") == losses(tmp_path / "a") and len(losses(tmp_path / "a")) == 4
    a = load_file(str(tmp_path / "a" / "adapter" / "adapter_model.safetensors"))
    b = load_file(str(tmp_path / "b" / "adapter" / "adapter_model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert all("lora_" in k for k in a)  # no embedding or other frozen weight copied
    lora_bytes = sum(t.numel() * t.element_size() for t in a.values())
    file = tmp_path / "a" / "adapter" / "adapter_model.safetensors"
    assert file.stat().st_size <= 2 * lora_bytes
