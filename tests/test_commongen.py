"""CommonGen: the packaged data and its loader, the prompt, the eval task, its methods
(on a toy chat model) and its metrics against hand-computed values."""

import math
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from conftest import CHAT_WORDS, make_chat_tokenizer  # noqa: E402

from evals import methods as M  # noqa: E402
from evals import report  # noqa: E402
from evals.run import _record  # noqa: E402
from evals.tasks import Example, Task, build_task  # noqa: E402
from llmsample.data.commongen import (  # noqa: E402
    commongen_prompt,
    concept_words,
    is_one_sentence,
    load_commongen,
)
from llmsample.diagnostics.exact import toy_model  # noqa: E402
from llmsample.output import SamplingOutput  # noqa: E402

FIRST_DEV = {
    "concept_set": "field_N#look_V#stand_V",
    "concepts": ["field_N", "look_V", "stand_V"],
    "words": ["field", "look", "stand"],
    "references": [
        "The player stood in the field looking at the batter.",
        "The coach stands along the field, looking at the goalkeeper.",
        "I stood and looked across the field, peacefully.",
        "Someone stands, looking around the empty field.",
    ],
}


@pytest.fixture(scope="module")
def dev():
    return load_commongen("dev")


def test_packaged_splits(dev):
    assert dev.num_rows == 993
    assert dev.column_names == ["concept_set", "concepts", "words", "references"]
    assert dev[0] == FIRST_DEV
    assert all(3 <= len(c) <= 5 for c in dev["concepts"])
    train = load_commongen("train")
    assert train.num_rows == 27069
    assert train[0]["concepts"] == ["broccoli_N", "cheese_N", "chicken_N", "pizza_N"]
    assert train[0]["words"] == ["broccoli", "cheese", "chicken", "pizza"]
    with pytest.raises(ValueError, match="dev"):
        load_commongen("test")


def test_prompt():
    want = "Make a sentence with the words field, look, stand."
    assert commongen_prompt(["field_N", "look_V", "stand_V"]) == want
    assert commongen_prompt("field_N#look_V#stand_V") == want
    assert commongen_prompt(["field", "look", "stand"]) == want
    assert concept_words(["ice_cream", "take_V", "dog"]) == ["ice_cream", "take", "dog"]


def test_task_is_a_fixed_subset():
    a, b = build_task("commongen", num_prompts=100), build_task("commongen", num_prompts=100)
    assert len(a.examples) == 100 and a.chat and a.max_new_tokens == 32
    assert [e.prompt for e in a.examples] == [e.prompt for e in b.examples]
    assert len({e.source for e in a.examples}) == 100  # distinct concept sets
    assert build_task("commongen", num_prompts=100, seed=1).examples != a.examples
    e = a.examples[0]
    assert e.prompt == commongen_prompt(e.words) and e.references
    assert all(w[-2:] in ("_N", "_V") for w in e.words)
    assert a.satisfied(e, " and ".join(concept_words(e.words)) + ".")
    assert not a.satisfied(e, "Nothing here.")
    assert a.potential(None, None, a.examples[:2], twist=True).has_prefix
    assert not a.potential(None, None, a.examples[:2]).has_prefix
    assert not build_task("keywords", num_prompts=5).chat  # the other tasks are unchanged


@pytest.mark.parametrize(
    "text, one",
    [
        ("A dog runs.", True),
        ("  A dog runs in the park!  ", True),
        ('He said "stand."', True),
        ("A dog runs. It barks.", False),  # two sentences
        ("A dog runs", False),  # cut off: no final mark
        ("A dog runs.\nIt barks.", False),
        ("", False),
    ],
)
def test_one_sentence(text, one):
    assert is_one_sentence(text) is one


# a toy chat model: word-level vocabulary, EOS = id len(WORDS)
WORDS = ["the", "dog", "dogs", "ran", "run", "ball", "a", "park", ".", *CHAT_WORDS]


@pytest.fixture(scope="module")
def toy():
    tok = make_chat_tokenizer(WORDS)
    return toy_model("llama", seed=1, scale=1.0, vocab_size=len(WORDS) + 1), tok


def _toy_task(n=2, max_new_tokens=6):
    ex = [
        Example("the dog run", ["the dog ran ."], words=["dog_N", "run_V"], source="dog_N#run_V"),
        Example("a ball", ["a ball ."], words=["ball_N"], source="ball_N"),
    ]
    return Task("commongen", ex[:n], max_new_tokens, "toy", chat=True)


def test_score_texts_matches_teacher_forcing(toy):
    model, tok = toy
    prompts, texts = ["the dog", "a ball ."], ["dog ran .", "the"]
    got = M.score_texts(model, tok, prompts, texts, chat=True)
    eos = tok.eos_token_id
    for p, t, (lp, n) in zip(prompts, texts, got):
        ctx = tok(f"<turn> user {p} <eos> <turn> assistant ", add_special_tokens=False)["input_ids"]
        cont = tok(t, add_special_tokens=False)["input_ids"] + [eos]
        with torch.no_grad():
            logits = model(torch.tensor([ctx + cont])).logits[0].double()
        logp = logits.log_softmax(-1)
        want = sum(float(logp[len(ctx) - 1 + i, c]) for i, c in enumerate(cont))
        assert n == len(cont) and lp == pytest.approx(want, abs=1e-4)


def _fake_output(texts: list[str], log_phi: list[float]) -> SamplingOutput:
    n = len(texts)
    return SamplingOutput(
        method="fake",
        sequences=torch.zeros(1, n, 3, dtype=torch.long),
        prompt_length=1,
        texts=[texts],
        log_weights=torch.full((1, n), -math.log(n), dtype=torch.float64),
        log_weights_unnormalized=torch.zeros(1, n, dtype=torch.float64),
        log_z=None,
        ess=torch.full((1, 2), float(n), dtype=torch.float64),
        resampled=torch.zeros(1, 2, dtype=torch.bool),
        log_potential=torch.tensor([log_phi], dtype=torch.float64),
        num_forward_tokens=10,
    )


def test_record_and_report_metrics():
    task = _toy_task(n=1)
    ex = task.examples[0]  # concepts dog_N, run_V
    draws = ["The dogs ran.", "The dog sat. It ran", "A cat sat.", "The dogs ran."]
    out = _fake_output(draws, [0.0, 0.0, -math.inf, 0.0])
    fluency = [(-6.0, 3), (-8.0, 4), (-3.0, 1), (-6.0, 3)]
    method = M.Method("fake", "k=4", None)
    rec = _record(task, method, 0, 0, ex, out, 0, draws, [0, 1, 2, 3], False, 1.5, fluency)
    assert rec["satisfied"] == [True, True, False, True]
    assert rec["coverage"] == [1.0, 1.0, 0.0, 1.0]
    assert rec["one_sentence"] == [True, False, True, True]
    assert rec["fluency"] == [-2.0, -2.0, -3.0, -2.0]
    assert rec["distinct_particles"] == 3 and rec["distinct_draws"] == 3
    assert rec["particle_satisfied_frac"] == 0.75
    other = dict(rec, prompt_id=1, samples=["A dog.", "A dog.", "A dog.", "Run!"])
    other.update(satisfied=[False] * 3 + [False], coverage=[0.5, 0.5, 0.5, 0.5])
    other.update(one_sentence=[True] * 4, fluency=[-1.0] * 4, distinct_draws=2)
    row = report._seed_row([rec, other])
    assert row["coverage_all"] == pytest.approx((0.75 + 0.0) / 2)
    assert row["concept_frac"] == pytest.approx((0.75 + 0.5) / 2)
    assert row["one_sentence"] == pytest.approx((0.75 + 1.0) / 2)
    assert row["unique_ratio"] == pytest.approx((3 / 4 + 2 / 4) / 2)
    assert row["fluency"] == pytest.approx((-9.0 - 4.0) / 8)
    assert row["distinct_draws"] == 2.5


def test_commongen_grid_on_a_toy_chat_model(toy, tmp_path, monkeypatch):
    model, tok = toy
    task, k = _toy_task(), 4
    monkeypatch.setattr(M, "ADAPTERS", tmp_path)  # no trained adapter yet (the repo has one)
    grid = M.methods("commongen", samples=k)
    keys = [m.key for m in grid]
    assert keys == [
        "ancestral[T=1.0]",
        "ancestral[T=0.7]",
        "beam[B=16]",
        "best-of-n[N=16]",
        "importance[N=16]",
        "smc[N=16]",
        "smc-twist[N=16]",
        "smc-indep[N=16,K=4]",
        "smc-twist-indep[N=16,K=4]",
        "smc-guard[N=16]",
        "smc-guard-indep[N=16,K=4]",
        "smc-guard[N=64]",
    ]
    rows = []
    for m in grid:
        out = m.run(model, tok, task, task.examples, 0)
        n = 4 * M.N_COMMONGEN if m.knob == "N=64" else M.N_COMMONGEN
        assert out.num_particles == n and out.num_forward_tokens > 0
        texts, index, failed = M.draws(out, k, 0)
        assert all(len(t) == k for t in texts)
        if m.name == "best-of-n":  # ranked by (log phi, log p): distinct, best first
            for b, idx in enumerate(index):
                phi, lp = out.log_potential[b].tolist(), out.extras["rerank_logp"][b]
                top = list(dict.fromkeys(idx))
                assert idx == [top[j % len(top)] for j in range(k)]
                assert phi[top[0]] == max(phi)
                assert all((phi[i], lp[i]) >= (phi[j], lp[j]) for i, j in zip(top, top[1:]))
                assert len({out.texts[b][i] for i in top}) == len(top)
        if m.name.endswith("-indep"):  # one draw from each run of N/K particles
            size = M.N_COMMONGEN // k
            assert all(r * size <= i < (r + 1) * size for idx in index for r, i in enumerate(idx))
            runs = torch.tensor(out.extras["log_z_runs"], dtype=torch.float64)
            want = runs.logsumexp(1) - math.log(k)
            assert torch.allclose(out.log_z, want, equal_nan=True)
        flu = M.score_texts(
            model,
            tok,
            [e.prompt for e in task.examples for _ in range(k)],
            [t for ts in texts for t in ts],
            chat=True,
        )
        for b, ex in enumerate(task.examples):
            rows.append(
                _record(
                    task,
                    m,
                    0,
                    b,
                    ex,
                    out,
                    b,
                    texts[b],
                    index[b],
                    failed[b],
                    0.1,
                    flu[b * k : (b + 1) * k],
                )
            )
    summary = report.summarize(rows)
    table = report.markdown(
        summary,
        dict(
            task="commongen",
            command="test",
            model="toy",
            num_prompts=2,
            seeds=[0],
            samples_per_prompt=k,
        ),
    )
    assert "coverage % (95% CI)" in table and table.count("\n| ") == len(grid) + 1
    # the GFlowNet rows appear once the task's adapter exists
    (tmp_path / "commongen").mkdir()
    (tmp_path / "commongen" / "adapter_config.json").write_text("{}")
    assert {"gfn", "smc-gfn"} <= {m.name for m in M.methods("commongen", quick=True)}
    # or those of any adapter folder given explicitly (evals.run --adapter)
    other = tmp_path / "elsewhere"
    other.mkdir()
    names = lambda adapter: {m.name for m in M.methods("commongen", True, 4, adapter)}  # noqa: E731
    assert "gfn" not in names(other)
    (other / "adapter_config.json").write_text("{}")
    assert {"gfn", "smc-gfn"} <= names(other)
    from evals.run import main

    with pytest.raises(SystemExit) as err:
        main(["--task", "commongen", "--out", str(tmp_path / "o"), "--adapter", str(tmp_path)])
    assert err.value.code == 2
