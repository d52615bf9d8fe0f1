"""A catalogue of bad inputs (issue 13, sections 5-7): each gets a clear error at its root.

Every case is one row of ``CASES``: either a command line, which must exit with status 2
and print one line naming the problem and its fix (never a traceback), or a call of the
Python API, which must raise ValueError/TypeError with a message naming the problem. The
tests after the catalogue cover what is not an error: strict JSON, notes on stderr, and
the CLI's default twist.
"""

import json
import math
import re
import subprocess
import sys
import warnings
from dataclasses import dataclass
from types import SimpleNamespace

import pytest
import torch
from conftest import make_model, make_tokenizer

import llmsample
from llmsample.cli import main
from llmsample.potentials import Constraint, Contains, SuffixLikelihood, TokenMask
from llmsample.proposals import LMProposal

FAST = dict(num_particles=2, max_new_tokens=2, seed=0)
CUDA = "cuda:99" if torch.cuda.is_available() else "cuda"


@dataclass
class Case:
    """``argv`` (a CLI case; a callable gets the fixtures) or ``call`` (an API case)."""

    match: str  # a regex the error message must contain
    argv: list | object = None
    prompt: str = "ROMEO:"  # the CLI's prompt
    call: object = None
    error: type = ValueError


def _rejected_everything(f):
    """An SMC run whose potential rejected every particle (log_z = -inf)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return llmsample.smc_generate(f.model, f.tok, "a", potential=Constraint(lambda t: False))


def _ids(f, ids, **kw):
    return llmsample.smc_generate(f.model, input_ids=torch.tensor([ids]), **FAST, **kw)


CASES = {
    # ---- section 5: the command line
    "cli-device-cuda": Case(r"--device: device 'cuda(:99)?' is not available", ["--device", CUDA]),
    "cli-device-unknown": Case(r"--device: device 'foo' is not a device name", ["--device", "foo"]),
    "cli-prompt-not-utf8": Case(
        r"the prompt is not valid UTF-8 text \(byte 0xff", [], prompt="ROMEO:\udcff"
    ),
    "cli-contains-not-utf8": Case(r"--contains is not valid UTF-8", ["--contains", "l\udce9"]),
    "cli-adapter-other-base": Case(
        r"trained on base model 'toy-llama', not on the loaded model 'shakespeare-tiny'",
        lambda f: ["--adapter", str(f.other_base)],
    ),
    "cli-adapter-config-corrupt": Case(
        r"adapter config '.*adapter_config\.json' is not valid JSON",
        lambda f: ["--adapter", str(f.corrupt)],
    ),
    "cli-temperature-inf": Case(
        r"--temperature must be a finite number > 0", ["--temperature", "inf"]
    ),
    "cli-temperature-nan": Case(
        r"--temperature must be a finite number > 0", ["--temperature", "nan"]
    ),
    "cli-temperature-zero": Case(
        r"--temperature must be a finite number > 0", ["--temperature", "0"]
    ),
    "cli-prompt-empty": Case(r"prompt 0 is empty", [], prompt=""),
    "cli-show-negative": Case(r"--show must be >= 0", ["--show", "-1"]),
    "cli-particles-beyond-memory": Case(
        r"--particles 1000000000 needs about .* GB .* lower --particles",
        ["--particles", "1000000000"],
    ),
    "cli-bonus-negative": Case(
        r"--bonus .* must be finite and >= 0", ["--contains", "a", "--bonus", "-1"]
    ),
    "cli-twist-prefix-without-prefix-scores": Case(
        r"--twist prefix needs a potential with prefix scores",
        ["--regex", "a", "--twist", "prefix"],
    ),
    "cli-twist-with-beam": Case(
        r"--twist has no effect with --method beam", ["--method", "beam", "--twist", "none"]
    ),
    # ---- section 5: the same roots through the Python API
    "api-device-unknown": Case(
        r"device 'foo' is not a device name", call=lambda f: llmsample.load_model(device="foo")
    ),
    "api-adapter-other-base": Case(
        r"trained on base model 'toy-llama'",
        call=lambda f: llmsample.load_model(adapter=f.other_base),
    ),
    "api-temperature-inf": Case(
        r"temperature must be > 0 and finite, got inf", call=lambda f: LMProposal(math.inf)
    ),
    "api-temperature-nan": Case(
        r"temperature must be > 0 and finite, got nan", call=lambda f: LMProposal(math.nan)
    ),
    "api-prompt-not-utf8": Case(
        r"prompt 0 is not valid text",
        call=lambda f: llmsample.smc_generate(f.model, f.tok, "a\udcff", **FAST),
    ),
    "api-contains-bonus-inf": Case(
        r"prefix_bonus must be finite", call=lambda f: Contains("a", prefix_bonus=math.inf)
    ),
    # ---- section 6: the Python API
    "best-after-all-rejected": Case(
        r"prompt 0: every particle has weight 0", call=lambda f: _rejected_everything(f).best()
    ),
    "sample-zero": Case(
        r"k must be an integer >= 1 .*got 0", call=lambda f: _rejected_everything(f).sample(0)
    ),
    "tokenmask-allowed-empty": Case(
        r"allows no token but EOS", call=lambda f: TokenMask(allowed=[])
    ),
    "tokenmask-allowed-negative": Case(r"negative id -1", call=lambda f: TokenMask(allowed=[-1])),
    "tokenmask-banned-bool": Case(
        r"must be a list of integer ids, got True",
        call=lambda f: TokenMask(banned=[True]),
        error=TypeError,
    ),
    "input-ids-too-large": Case(
        r"prompt token id 99999 is outside the model's vocabulary \(ids 0..8\)",
        call=lambda f: _ids(f, [1, 99999]),
    ),
    "input-ids-negative": Case(r"prompt token id -3 is outside", call=lambda f: _ids(f, [-3])),
    "pad-token-id-out-of-range": Case(
        r"pad_token_id 50 is outside", call=lambda f: _ids(f, [1], pad_token_id=50)
    ),
    "num-particles-bool": Case(
        r"num_particles must be an integer >= 1, got True",
        call=lambda f: llmsample.smc_generate(f.model, f.tok, "a", num_particles=True),
    ),
    "num-particles-bool-in-config": Case(
        r"num_particles must be an integer >= 1, got True",
        call=lambda f: llmsample.smc_generate(
            f.model, f.tok, "a", config=llmsample.SMCConfig(num_particles=True)
        ),
    ),
    "num-samples-bool": Case(
        r"num_samples must be an integer",
        call=lambda f: llmsample.ancestral_generate(f.model, f.tok, "a", num_samples=True),
    ),
    "num-beams-bool": Case(
        r"num_beams must be an integer",
        call=lambda f: llmsample.beam_generate(f.model, f.tok, "a", num_beams=True),
    ),
    "suffix-list-wrong-length": Case(
        r"SuffixLikelihood has 2 suffixes but the batch has 1 prompt",
        call=lambda f: llmsample.smc_generate(
            f.model, f.tok, "a", potential=SuffixLikelihood(f.model, f.tok, ["b", "c"]), **FAST
        ),
    ),
    "suffix-list-empty": Case(
        r"a non-empty list of strings", call=lambda f: SuffixLikelihood(f.model, f.tok, [])
    ),
    "eos-token-id-negative": Case(
        r"eos_token_id -1 is not a token id of this model \(ids are 0..8\)",
        call=lambda f: llmsample.smc_generate(f.model, f.tok, "a", eos_token_id=-1, **FAST),
    ),
    "eos-token-id-too-large": Case(
        r"eos_token_id 1000000 is not a token id",
        call=lambda f: llmsample.smc_generate(f.model, f.tok, "a", eos_token_id=[8, 10**6], **FAST),
    ),
    "load-model-folder-without-config": Case(
        r"model folder '.*empty' has no config\.json",
        call=lambda f: llmsample.load_model(str(f.empty)),
    ),
}


@pytest.fixture(scope="module")
def fixtures(tmp_path_factory):
    """A toy model and tokenizer, an adapter trained on another base model (a toy llama),
    an adapter whose adapter_config.json is corrupt, and an empty folder."""
    from peft import LoraConfig, get_peft_model

    root = tmp_path_factory.mktemp("bad_inputs")
    other = get_peft_model(make_model("llama"), LoraConfig(r=2, target_modules=["q_proj"]))
    other.save_pretrained(str(root / "other_base"))
    config = root / "other_base" / "adapter_config.json"
    saved = json.loads(config.read_text())
    config.write_text(json.dumps({**saved, "base_model_name_or_path": "toy-llama"}))
    (root / "corrupt").mkdir()
    (root / "corrupt" / "adapter_config.json").write_text("{not json")
    (root / "empty").mkdir()
    return SimpleNamespace(
        model=make_model("gpt2"),
        tok=make_tokenizer(),
        other_base=root / "other_base",
        corrupt=root / "corrupt",
        empty=root / "empty",
    )


@pytest.mark.parametrize("name", list(CASES))
def test_bad_input_gets_a_clear_error(name, fixtures, capsys):
    case = CASES[name]
    if case.call is not None:
        with pytest.raises(case.error, match=case.match):
            case.call(fixtures)
        return
    argv = case.argv(fixtures) if callable(case.argv) else case.argv
    code = main(["generate", case.prompt, "--particles", "2", "--max-new-tokens", "2", *argv])
    err = capsys.readouterr().err
    assert code == 2, err
    assert "Traceback" not in err and err.count("\n") == 1 and err.startswith("llmsample: error:")
    assert re.search(case.match, err), err


def test_undecodable_argv_bytes_in_a_subprocess():
    """Real argv bytes that are not UTF-8 (surrogate escapes in sys.argv): one line, status 2."""
    proc = subprocess.run(
        [sys.executable, "-m", "llmsample.cli", "generate", b"ROMEO:\xff", "--max-new-tokens", "2"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2
    assert "not valid UTF-8" in proc.stderr and "Traceback" not in proc.stderr


# --------------------------------------------------------------------------- not errors


def _strict(text: str):
    def refuse(token):
        raise AssertionError(f"not strict JSON: {token}")

    return json.loads(text, parse_constant=refuse)


def test_json_is_strict_when_log_z_is_minus_inf(capsys):
    argv = ["generate", "ROMEO:", "--contains", "xylophonequartz", "--json"]
    assert main([*argv, "--particles", "2", "--max-new-tokens", "2"]) == 0
    res = _strict(capsys.readouterr().out)
    assert res["log_z"] == "-inf" and float(res["log_z"]) == -math.inf


def test_prompt_beyond_the_trained_length_warns(capsys):
    """shakespeare-tiny was trained on 256-token windows (training_metrics.json) though its
    config allows 1024 positions: a longer run still works, with a note on stderr."""
    prompt = "ROMEO: " + "love " * 300
    assert main(["generate", prompt, "--particles", "1", "--max-new-tokens", "1"]) == 0
    err = capsys.readouterr().err
    assert "more than the 256-token windows 'shakespeare-tiny' was trained on" in err
    assert "Traceback" not in err


def test_a_hub_name_says_it_contacts_the_hub(capsys, monkeypatch):
    def offline(name, **kw):
        raise ValueError(f"cannot load model {name!r}: not loadable from the Hugging Face hub")

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(llmsample, "load_model", offline)
    assert main(["generate", "ROMEO:", "--model", "nobody/nothing"]) == 2
    lines = capsys.readouterr().err.splitlines()
    assert "contacting the Hugging Face hub (set HF_HUB_OFFLINE=1" in lines[0]
    assert lines[1].startswith("llmsample: error: cannot load model") and len(lines) == 2
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert main(["generate", "ROMEO:", "--model", "nobody/nothing"]) == 2
    assert "contacting" not in capsys.readouterr().err


def test_readme_command_resamples_and_twist_none_gets_a_hint(capsys):
    """Section 7: the README's `--contains love --line --particles 32` does SMC with the
    prefix twist (bonus 3 per word found) and resamples; --twist none never can, and says so."""
    argv = ["generate", "ROMEO:\\n", "--contains", "love", "--line", "--particles", "32", "--json"]
    assert main(argv) == 0
    captured = capsys.readouterr()
    res = _strict(captured.out)
    assert res["twist"] == "prefix" and res["resampling_steps"] and "hint" not in captured.err
    assert main([*argv, "--twist", "none"]) == 0
    captured = capsys.readouterr()
    assert _strict(captured.out)["resampling_steps"] == []
    assert "hint: SMC never resampled" in captured.err and "--twist prefix" in captured.err
