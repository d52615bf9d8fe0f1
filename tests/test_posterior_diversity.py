"""evals.posterior_diversity on hand-made draws: which draws count as exact posterior
draws, which sets enter the subset, and that compared cells use the same sets."""

import json

import pytest

from evals.posterior_diversity import main, subset_rows
from llmsample.data.tasks import build_task
from llmsample.potentials.concepts import covers_all


def _examples(n=3):
    return build_task("commongen", num_prompts=n, seed=0).examples


def _draws(examples, covering_sets):
    """Per set: 4 covering references (if the set is in ``covering_sets``) or 3, then a
    non-covering filler, so only some sets reach k = 4."""
    rows = []
    for i, e in enumerate(examples):
        refs = [r for r in e.references if covers_all(r, e.words)]
        assert len(refs) >= 4, "the test needs dev sets with 4 covering references"
        keep = refs[:4] if i in covering_sets else refs[:3]
        samples = ["the the the", *keep, "nothing here"]
        rows.append(dict(prompt=e.prompt, words=e.words, references=e.references, samples=samples))
    return rows


def test_subset_keeps_first_k_covering_draws_of_sets_that_have_k():
    ex = _examples()
    got = subset_rows(_draws(ex, {0, 2}))
    assert sorted(got) == sorted([ex[0].prompt, ex[2].prompt])
    for e in (ex[0], ex[2]):
        assert len(got[e.prompt]) == 4
        assert all(covers_all(t, e.words) for t in got[e.prompt])
        assert got[e.prompt] == [r for r in e.references if covers_all(r, e.words)][:4]


def test_main_scores_every_row_on_the_same_sets(tmp_path):
    ex = _examples()
    (tmp_path / "draws.jsonl").write_text("".join(json.dumps(r) + "\n" for r in _draws(ex, {0, 2})))
    cells = tmp_path / "cell.jsonl"  # a method whose draws are the references in reverse
    cells.write_text(
        "".join(
            json.dumps(dict(prompt=e.prompt, samples=e.references[:4][::-1])) + "\n" for e in ex
        )
    )
    assert (
        main(["--out", str(tmp_path), "--prompts", "3", "--draws", "6", "--compare", str(cells)])
        == 0
    )
    res = json.loads((tmp_path / "results.json").read_text())
    assert res["sets_with_k_covering"] == 2
    assert res["covering_draws"] == 4 + 3 + 4
    rows = res["rows"]
    # the exact draws of the two sets are their first 4 covering references, the same
    # texts as the references row and (in another order) the compared cell
    ref = rows["human references"]["self_bleu"]
    assert rows["exact posterior (rejection)"]["self_bleu"] == pytest.approx(ref)
    assert rows[f"{tmp_path.parent.name}/cell"]["self_bleu"] == pytest.approx(ref)
    assert "| exact posterior (rejection) |" in (tmp_path / "results.md").read_text()


def test_main_refuses_cells_of_other_prompts_and_stale_draws(tmp_path):
    ex = _examples()
    (tmp_path / "draws.jsonl").write_text("".join(json.dumps(r) + "\n" for r in _draws(ex, {0})))
    cells = tmp_path / "cell.jsonl"
    cells.write_text(json.dumps(dict(prompt="another prompt", samples=["a"] * 4)) + "\n")
    with pytest.raises(SystemExit, match="lacks 1 of the sets"):
        main(["--out", str(tmp_path), "--prompts", "3", "--compare", str(cells)])
    stale = tmp_path / "stale"
    stale.mkdir()
    (stale / "draws.jsonl").write_text(json.dumps(dict(prompt="another prompt")) + "\n")
    with pytest.raises(SystemExit, match="draws for other prompts"):
        main(["--out", str(stale), "--prompts", "3"])
    with pytest.raises(SystemExit, match="--draws must be"):
        main(["--out", str(stale), "--draws", "2"])
