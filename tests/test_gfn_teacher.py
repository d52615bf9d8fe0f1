"""SMC teacher rows (``llmsample.gfn.teacher``): accepted, distinct, cached and resumable."""

import json

import pytest
from conftest import EOS

import llmsample.gfn.teacher as teacher
from llmsample.gfn.teacher import smc_demonstrations
from llmsample.potentials.concepts import Concepts, covers_all

PROMPTS = ["a b", "d e", "f g"]


def _potentials():
    return [
        Concepts("c", prefix_bonus=1.0),
        Concepts("h", prefix_bonus=1.0),
        Concepts("c", prefix_bonus=0.5),
    ]


def _run(gpt2, tok, **kw):
    kw = dict(num_particles=8, max_new_tokens=3, stop_ids=[EOS], seed=0, progress=False) | kw
    return smc_demonstrations(gpt2, tok, PROMPTS, _potentials(), **kw)


def test_rows_are_distinct_accepted_particles(gpt2, tok):
    rows = _run(gpt2, tok, batch_size=2)
    assert len(rows) == len(PROMPTS)
    assert sum(map(len, rows)) >= 3  # the toy model produces the words within 3 tokens
    for texts, word in zip(rows, ["c", "h", "c"]):
        assert len(set(texts)) == len(texts)
        assert all(covers_all(t, word) for t in texts), texts


def test_a_rerun_reads_the_cache_and_a_partial_cache_resumes(gpt2, tok, tmp_path, monkeypatch):
    cache = tmp_path / "teacher.jsonl"
    full = _run(gpt2, tok, batch_size=1, cache=cache)
    lines = cache.read_text().splitlines()
    assert [json.loads(line)["prompt"] for line in lines] == PROMPTS
    cache.write_text(lines[0] + "\n")  # killed after the first batch
    assert _run(gpt2, tok, batch_size=1, cache=cache) == full  # same seeds per batch
    monkeypatch.setattr(teacher, "smc_generate", lambda *a, **k: pytest.fail("reran SMC"))
    assert _run(gpt2, tok, batch_size=1, cache=cache) == full  # all read back


def test_errors_name_the_problem(gpt2, tok, tmp_path):
    cache = tmp_path / "teacher.jsonl"
    cache.write_text(json.dumps({"prompt": "another prompt", "texts": []}) + "\n")
    with pytest.raises(ValueError, match="another prompt list"):
        _run(gpt2, tok, cache=cache)
    with pytest.raises(ValueError, match="2 potentials for 3 prompts"):
        smc_demonstrations(gpt2, tok, PROMPTS, _potentials()[:2])
    with pytest.raises(ValueError, match="num_particles"):
        _run(gpt2, tok, num_particles=0)
