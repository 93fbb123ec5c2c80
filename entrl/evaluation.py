"""Evaluation metrics from n graded samples per problem (SENT.md section 10): pass@k, avg@k, maj@k.

Inputs are a boolean `correct_PxN` matrix (problem p, sample j: did sample j's
final answer verify against the reference, graded by `entrl.rewards`, the same
code as training) and, for maj@k, the extracted answers in the same layout.

Definitions (k <= n; k > n is an error, never silently clipped):
- pass@k: the unbiased estimator of Chen et al. 2021 (arXiv 2107.03374),
  `1 - C(n-c, k) / C(n, k)` with c correct of n, averaged over problems.
  Computed as `1 - prod_{i=n-c+1}^{n} (1 - k/i)`, which never forms a binomial
  coefficient (no overflow at n = 1024) and, in the vectorised form, is a
  suffix sum of log1p terms.
- avg@k: mean over problems of the accuracy of their FIRST k samples. Its
  expectation does not depend on k; the paper reports it with exactly k
  samples, so using the first k (not all n) reproduces its protocol and variance.
- maj@k: per problem, the first k answers are clustered into semantic classes
  (`entrl.semantic_entropy.cluster_answer_groups`); the largest class wins,
  ties going to the class that appeared first; missing answers never vote
  (a problem whose k answers are all missing scores 0). The problem is correct
  iff the winning class's first member is correct.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from entrl.semantic_entropy import PairsEquivalent, cluster_answer_groups


def _check_k(n: int, k: int) -> None:
    if n < 1:
        raise ValueError(f"n={n}: need at least one sample")
    if not 1 <= k <= n:
        raise ValueError(f"k={k}: must be in [1, n={n}] (pass@k needs n >= k samples)")


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k for one problem with c correct out of n samples."""
    _check_k(n, k)
    if not 0 <= c <= n:
        raise ValueError(f"c={c}: must be in [0, n={n}]")
    if n - c < k:
        return 1.0
    prod = 1.0
    for i in range(n - c + 1, n + 1):
        prod *= 1.0 - k / i
    return 1.0 - prod


def pass_at_k_array(n: int, c: np.ndarray | Sequence[int], k: int) -> np.ndarray:
    """`pass_at_k` for an array of correct counts (same n and k), vectorised; float64."""
    _check_k(n, k)
    c = np.asarray(c, dtype=np.int64)
    if np.any((c < 0) | (c > n)):
        raise ValueError(f"correct counts must be in [0, n={n}]")
    i = np.arange(1, n + 1, dtype=np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        log_terms = np.log1p(-k / i)  # -inf/nan for i <= k: only reached when n - c < k
    # suffix[m] = sum of the top m terms, i = n-m+1 .. n
    suffix = np.concatenate([[0.0], np.cumsum(log_terms[::-1])])
    return np.where(n - c < k, 1.0, -np.expm1(suffix[np.minimum(c, n)]))


def _matrix(correct_PxN) -> np.ndarray:
    m = np.asarray(correct_PxN)
    if m.ndim != 2 or m.shape[0] == 0:
        raise ValueError(f"correct matrix must be [problems, samples] with problems > 0, got shape {m.shape}")
    return m.astype(bool)


def mean_pass_at_k(correct_PxN, k: int) -> float:
    """pass@k averaged over problems, from all n samples of each."""
    m = _matrix(correct_PxN)
    return float(pass_at_k_array(m.shape[1], m.sum(axis=1), k).mean())


def avg_at_k(correct_PxN, k: int) -> float:
    """Mean over problems of the accuracy of the first k samples."""
    m = _matrix(correct_PxN)
    _check_k(m.shape[1], k)
    return float(m[:, :k].mean(axis=1).mean())


def majority_votes(
    answers_PxN: Sequence[Sequence[str | None]],
    k: int,
    *,
    pairs_equivalent: PairsEquivalent | None = None,
) -> list[int | None]:
    """Per problem, the index (< k) of the winning class's first member; None if no answer voted."""
    firsts = [list(row[:k]) for row in answers_PxN]
    winners: list[int | None] = []
    for row, ids in zip(firsts, cluster_answer_groups(firsts, pairs_equivalent=pairs_equivalent)):
        votes = [cid for a, cid in zip(row, ids) if a is not None]
        if not votes:
            winners.append(None)
            continue
        sizes = np.bincount(votes)
        winner = int(np.argmax(sizes))  # argmax takes the lowest id on ties = first to appear
        winners.append(ids.index(winner))
    return winners


def maj_at_k(
    answers_PxN: Sequence[Sequence[str | None]],
    correct_PxN,
    k: int,
    *,
    pairs_equivalent: PairsEquivalent | None = None,
) -> float:
    """Majority-vote accuracy over the first k samples' clustered answers."""
    m = _matrix(correct_PxN)
    _check_k(m.shape[1], k)
    if len(answers_PxN) != m.shape[0] or any(len(row) != m.shape[1] for row in answers_PxN):
        raise ValueError(f"answers must have the correct matrix's shape {m.shape}")
    winners = majority_votes(answers_PxN, k, pairs_equivalent=pairs_equivalent)
    return float(np.mean([w is not None and m[p, w] for p, w in enumerate(winners)]))


def summarize(
    correct_PxN,
    answers_PxN: Sequence[Sequence[str | None]] | None = None,
    ks: Sequence[int] = (1,),
    *,
    pairs_equivalent: PairsEquivalent | None = None,
) -> dict[str, float | int]:
    """Every metric for every k: keys `avg@k`, `pass@k` (and `maj@k` when answers are given), plus `problems`, `n`."""
    m = _matrix(correct_PxN)
    out: dict[str, float | int] = {"problems": int(m.shape[0]), "n": int(m.shape[1])}
    for k in ks:
        out[f"avg@{k}"] = avg_at_k(m, k)
        out[f"pass@{k}"] = mean_pass_at_k(m, k)
        if answers_PxN is not None:
            out[f"maj@{k}"] = maj_at_k(answers_PxN, m, k, pairs_equivalent=pairs_equivalent)
    return out
