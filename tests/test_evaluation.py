"""Evaluation metrics: pass@k against brute-force enumeration, avg@k and maj@k by hand."""

import itertools

import numpy as np
import pytest

from entrl.evaluation import avg_at_k, maj_at_k, majority_votes, mean_pass_at_k, pass_at_k, pass_at_k_array, summarize


def _brute_pass_at_k(n, c, k):
    """Fraction of the k-subsets of n samples (c of them correct) with at least one correct."""
    samples = [True] * c + [False] * (n - c)
    subsets = list(itertools.combinations(range(n), k))
    return sum(any(samples[i] for i in s) for s in subsets) / len(subsets)


@pytest.mark.parametrize("n", [1, 2, 3, 5, 8])
def test_pass_at_k_equals_enumeration(n):
    for c in range(n + 1):
        for k in range(1, n + 1):
            assert pass_at_k(n, c, k) == pytest.approx(_brute_pass_at_k(n, c, k), abs=1e-12)
        np.testing.assert_allclose(
            pass_at_k_array(n, [c] * 2, 1), [_brute_pass_at_k(n, c, 1)] * 2, atol=1e-12
        )


def test_pass_at_k_edge_cases():
    assert pass_at_k(8, 0, 4) == 0.0
    assert pass_at_k(8, 8, 4) == 1.0
    assert pass_at_k(8, 1, 8) == 1.0  # k = n: pass iff any correct
    assert pass_at_k(8, 0, 8) == 0.0
    assert pass_at_k(10, 3, 1) == pytest.approx(0.3)
    for bad in [(8, 2, 9), (8, 2, 0), (8, 9, 2), (8, -1, 2), (0, 0, 1)]:
        with pytest.raises(ValueError):
            pass_at_k(*bad)
    with pytest.raises(ValueError):
        pass_at_k_array(4, [1, 2], 5)
    with pytest.raises(ValueError):
        pass_at_k_array(4, [5], 2)


def test_pass_at_k_array_matches_scalar_at_scale():
    n, k = 1024, 32  # C(1024, 32) overflows float64; the product form does not
    c = np.arange(n + 1)
    vec = pass_at_k_array(n, c, k)
    assert np.all(np.isfinite(vec)) and np.all(np.diff(vec) >= -1e-15)
    np.testing.assert_allclose(vec, [pass_at_k(n, int(ci), k) for ci in c], rtol=1e-9, atol=1e-12)


def test_avg_and_mean_pass_at_k_by_hand():
    correct = np.array([[1, 0, 1, 1], [0, 0, 0, 1], [1, 1, 1, 1]], dtype=bool)
    assert avg_at_k(correct, 1) == pytest.approx(2 / 3)
    assert avg_at_k(correct, 2) == pytest.approx((0.5 + 0 + 1) / 3)
    assert avg_at_k(correct, 4) == pytest.approx((0.75 + 0.25 + 1) / 3)
    assert mean_pass_at_k(correct, 2) == pytest.approx((1 + pass_at_k(4, 1, 2) + 1) / 3)
    with pytest.raises(ValueError):
        avg_at_k(correct, 5)
    with pytest.raises(ValueError):
        avg_at_k(np.zeros(4, dtype=bool), 1)


def test_maj_at_k():
    answers = [
        ["1/2", "3", "0.5", "3", "\\frac12"],  # 1/2 wins 3-2 (equivalent forms pooled)
        ["3", "4", "4", "3", "5"],  # first 4: tie 2-2, the class seen first (3) wins
        [None, None, "7", None, None],  # missing answers do not vote
        [None, None, None, None, None],  # nobody voted: wrong
    ]
    correct = np.array(
        [[1, 0, 1, 0, 1], [0, 1, 1, 0, 0], [0, 0, 1, 0, 0], [0, 0, 0, 0, 0]], dtype=bool
    )
    assert majority_votes(answers, 5) == [0, 0, 2, None]
    assert majority_votes(answers, 4)[1] == 0
    assert maj_at_k(answers, correct, 5) == pytest.approx(2 / 4)
    assert maj_at_k(answers, correct, 1) == pytest.approx(1 / 4)
    with pytest.raises(ValueError):
        maj_at_k(answers[:2], correct, 2)


def test_summarize():
    correct = np.array([[1, 0, 0, 1], [0, 0, 0, 0]], dtype=bool)
    answers = [["2", "3", "3", "2.0"], ["1", None, "5", "6"]]
    out = summarize(correct, answers, ks=(1, 4))
    assert out == {
        "problems": 2,
        "n": 4,
        "avg@1": 0.5,
        "pass@1": pytest.approx(0.25),
        "maj@1": 0.5,
        "avg@4": 0.25,
        "pass@4": 0.5,
        "maj@4": 0.5,
    }
    assert "maj@1" not in summarize(correct, ks=(1,))
    with pytest.raises(ValueError):
        summarize(correct, ks=(8,))
