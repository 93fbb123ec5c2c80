"""Semantic entropy: hand-computed values, clustering semantics, likelihood weighting."""

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from entrl.semantic_entropy import (
    batch_prompt_stats,
    cluster_answer_groups,
    cluster_answers,
    entropy_of_classes,
    prompt_stats,
    semantic_entropy,
)


def test_issue_example():
    answers = ["1/2", "0.5", "\\frac{1}{2}", "3"]
    assert cluster_answers(answers) == [0, 0, 0, 1]
    expected = -(0.75 * math.log(0.75) + 0.25 * math.log(0.25))
    assert semantic_entropy(answers) == pytest.approx(expected, abs=1e-12)


def test_all_equal_and_all_different():
    assert semantic_entropy(["7"] * 8) == 0.0
    assert semantic_entropy([str(i) for i in range(8)]) == pytest.approx(math.log(8))
    assert semantic_entropy(["42"]) == 0.0


def test_missing_answers_singleton_vs_shared():
    answers = [None, "2", None, "2.0", None]
    assert cluster_answers(answers) == [0, 1, 2, 1, 3]
    assert cluster_answers(answers, no_answer="shared") == [0, 1, 0, 1, 0]
    assert semantic_entropy([None] * 4) == pytest.approx(math.log(4))
    assert semantic_entropy([None] * 4, no_answer="shared") == 0.0
    with pytest.raises(ValueError):
        cluster_answers(answers, no_answer="drop")


def test_math_verify_path_both_directions():
    # not decidable by the fast paths: goes to math-verify in both directions
    assert cluster_answers(["\\sqrt{117}", "3\\sqrt{13}", "(1,2)", "1<x<2"]) == [0, 0, 1, 2]


def _relation(pairs_true):
    """A pairs_equivalent hook from an explicit symmetric relation; records its calls."""
    calls = []
    rel = {frozenset(p) for p in pairs_true}

    def check(pairs):
        calls.append(list(pairs))
        return [frozenset((a, b)) in rel for a, b in pairs]

    return check, calls


def test_union_find_merges_classes_matched_by_a_later_answer():
    # x~z and y~z but not x~y: z joins both classes, so they merge (transitive classes)
    check, calls = _relation([("x", "z"), ("y", "z")])
    assert cluster_answers(["x", "y", "z", "w"], pairs_equivalent=check) == [0, 0, 0, 1]
    # w is compared with the single merged representative, not with both
    assert calls[-1] == [("w", "x")]


def test_only_representatives_are_compared():
    check, calls = _relation([("a", "b")])
    cluster_answers(["a", "b", "c", "a", "c", "d"], pairs_equivalent=check)
    pairs = [p for batch in calls for p in batch]
    # duplicates of a normalised string need no call; each new answer meets each rep once
    assert pairs == [("b", "a"), ("c", "a"), ("d", "a"), ("d", "c")]


def test_groups_are_clustered_in_lockstep_batches():
    check, calls = _relation([("p", "q")])
    groups = [["p", "q", "r"], ["1", "2", "3", "4"], ["5", "5"], []]
    assert cluster_answer_groups(groups, pairs_equivalent=check) == [[0, 0, 1], [0, 1, 2, 3], [0, 0], []]
    assert len(calls) == 3  # one batch per round, not per prompt
    solo = [cluster_answers(g, pairs_equivalent=_relation([("p", "q")])[0]) for g in groups]
    assert solo == [[0, 0, 1], [0, 1, 2, 3], [0, 0], []]


_FORMS = {0.5: ["1/2", "0.5", "\\frac{1}{2}", "\\dfrac12"], 3.0: ["3", "3.0", "$3$"], -2.0: ["-2", "-\\frac{4}{2}"]}


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(sorted(_FORMS)), st.integers(0, 3)), min_size=1, max_size=10))
def test_partition_is_grouping_by_value(draws):
    answers = [_FORMS[v][k % len(_FORMS[v])] for v, k in draws]
    values = [v for v, _ in draws]
    ids = cluster_answers(answers)
    first = {}
    assert ids == [first.setdefault(v, len(first)) for v in values]
    counts = np.array(list({v: values.count(v) for v in values}.values())) / len(values)
    assert semantic_entropy(answers) == pytest.approx(-np.sum(counts * np.log(counts)))


def test_likelihood_weighting_by_hand():
    answers = ["1", "1", "2"]
    lp = [math.log(0.1), math.log(0.3), math.log(0.2)]
    p = np.array([0.4, 0.2]) / 0.6
    assert semantic_entropy(answers, logprobs=lp) == pytest.approx(-np.sum(p * np.log(p)))
    # length normalisation divides each sequence log-prob by its length
    lengths = [2, 4, 1]
    w = np.exp(np.array(lp) / lengths)
    q = np.array([w[0] + w[1], w[2]]) / w.sum()
    assert semantic_entropy(answers, logprobs=lp, lengths=lengths) == pytest.approx(-np.sum(q * np.log(q)))


def test_likelihood_weighting_is_stable_for_long_sequences():
    ids = [0, 0, 1, 1]
    lp = [-5000.0, -5000.0, -5000.0, -5000.0]  # exp underflows without logsumexp
    assert entropy_of_classes(ids, logprobs=lp) == pytest.approx(math.log(2))
    assert entropy_of_classes(ids, logprobs=[-1.0, -1.0, -900.0, -900.0]) == pytest.approx(0.0, abs=1e-12)
    with pytest.raises(ValueError):
        entropy_of_classes(ids, logprobs=[0.0, -np.inf, 0.0, 0.0])
    with pytest.raises(ValueError):
        entropy_of_classes(ids, lengths=[1, 1, 1, 1])
    with pytest.raises(ValueError):
        entropy_of_classes([])


def test_prompt_stats():
    stats = prompt_stats(["1/2", "0.5", None, "3"], [True, True, False, False])
    assert stats["n_classes"] == 3 and stats["class_sizes"] == [2, 1, 1]
    se = -(0.5 * math.log(0.5) + 2 * 0.25 * math.log(0.25))
    assert stats["se"] == pytest.approx(se)
    assert stats["se_norm"] == pytest.approx(se / math.log(4))
    assert stats["pass_rate"] == 0.5
    one = prompt_stats(["5"])
    assert one["se_norm"] == 0.0 and one["pass_rate"] is None
    many = batch_prompt_stats([["1/2", "0.5", None, "3"], ["5"]], [[True, True, False, False], [True]])
    assert many[0] == stats and many[1]["pass_rate"] == 1.0
