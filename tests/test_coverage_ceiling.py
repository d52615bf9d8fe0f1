"""The covering share of the soft-coverage target, against a hand computation."""

import math

import pytest

from evals.coverage_ceiling import covering_share


def test_covering_share_matches_the_reweighted_fraction():
    covs = [1.0, 0.5, 0.5, 0.0]
    beta = 2.0
    w = [1.0, math.exp(-1.0), math.exp(-1.0), math.exp(-2.0)]
    assert covering_share(covs, beta) == pytest.approx(w[0] / sum(w))
    assert covering_share(covs, 0.0) == pytest.approx(0.25)  # beta 0: the base's own share
    assert covering_share(covs, 200.0) == pytest.approx(1.0)  # hard constraint in the limit
    with pytest.raises(ValueError, match="no draws"):
        covering_share([], 1.0)
