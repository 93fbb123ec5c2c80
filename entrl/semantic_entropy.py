"""Semantic entropy of a prompt's sampled final answers (docs/method.md, "Semantic entropy of a prompt").

SE(q) = -sum_k p_k ln p_k over the semantic classes C_k of the N sampled
answers, in nats. Low SE: the model answers consistently; high SE: many
different answers. It orders SENT's curriculum and is cheap to refresh online
from the training rollouts themselves.

Design decisions:
- Clustering is greedy against class representatives, in sample order: each
  answer is compared with the first member of every existing class; it joins
  every class it matches (union-find merges them, so classes are transitive
  even though pairwise verification is not) or founds a new class. Class ids
  are 0..C-1 in order of first appearance.
- Equivalence is the one used for rewards (`entrl.rewards`): identical
  normalised strings join without any call; other pairs go through
  `answers_equivalent` in BOTH directions, because math-verify's `verify` is
  asymmetric (`(1,2)` vs `1<x<2`).
- Pair checks are batched through a `pairs_equivalent(list of pairs) -> bools`
  hook. The default runs in this process (no timeout: fine for trusted or
  already-extracted answers); pass `Verifier.equivalent_pairs` to run them in
  the verifier pool with timeouts. `cluster_answer_groups` clusters many
  prompts in lockstep, so one batch holds the comparisons of all prompts.
- A missing answer (None) is never compared: it is its own singleton class by
  default, or all missing answers share one class (`no_answer="shared"`).
- Probabilities are count-based (p_k = |C_k| / N) or, with sequence
  log-probs, likelihood-weighted (p_k proportional to sum_{i in C_k} exp(lp_i),
  via logsumexp; with `lengths`, lp_i / len_i, i.e. per-token geometric mean).
- Pure functions of answers and flags: annotating a dataset with a policy (sampling, progress
  files, resume) is `entrl.annotate`.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import numpy as np

from entrl.rewards import answers_equivalent_both, normalize_answer

PairsEquivalent = Callable[[Sequence[tuple[str, str]]], Sequence[bool]]
NO_ANSWER_MODES = ("singleton", "shared")
# count: p_k = |C_k| / N; likelihood: p_k by the members' sequence probabilities; likelihood_per_token: by
# their per-token geometric means (log-prob / length)
WEIGHTINGS = ("count", "likelihood", "likelihood_per_token")


def _in_process_pairs(pairs: Sequence[tuple[str, str]]) -> list[bool]:
    return [answers_equivalent_both(a, b) for a, b in pairs]


class _Group:
    """Clustering state of one prompt's answers: union-find plus class representatives."""

    def __init__(self, answers: Sequence[str | None], no_answer: str):
        self.answers = list(answers)
        self.parent = list(range(len(answers)))
        self.reps: list[int] = []  # first member of each live class, by creation order
        self.by_norm: dict[str, int] = {}
        self.first_missing: int | None = None
        self.shared_missing = no_answer == "shared"
        self.pos = 0

    def find(self, i: int) -> int:
        while self.parent[i] != i:
            self.parent[i] = self.parent[self.parent[i]]
            i = self.parent[i]
        return i

    def union(self, i: int, j: int) -> None:
        ri, rj = self.find(i), self.find(j)
        if ri != rj:
            self.parent[max(ri, rj)] = min(ri, rj)

    def advance(self) -> int | None:
        """Settle answers that need no comparison; return the next one that does (or None: done)."""
        while self.pos < len(self.answers):
            i, a = self.pos, self.answers[self.pos]
            if a is None:
                if self.shared_missing:
                    if self.first_missing is None:
                        self.first_missing = i
                    else:
                        self.union(self.first_missing, i)
                self.pos += 1
                continue
            norm = normalize_answer(a)
            if norm in self.by_norm:
                self.union(self.by_norm[norm], i)
                self.pos += 1
                continue
            self.by_norm[norm] = i
            if not self.reps:
                self.reps.append(i)
                self.pos += 1
                continue
            return i
        return None

    def settle(self, i: int, matches: Sequence[bool]) -> None:
        """Apply the comparisons of answer i with the current representatives (same order)."""
        matched = [r for r, m in zip(self.reps, matches, strict=True) if m]
        if not matched:
            self.reps.append(i)
        else:
            for r in matched:
                self.union(r, i)
            merged = set(matched[1:])
            self.reps = [r for r in self.reps if r not in merged]
        self.pos += 1

    def class_ids(self) -> list[int]:
        ids: dict[int, int] = {}
        return [ids.setdefault(self.find(i), len(ids)) for i in range(len(self.answers))]


def cluster_answer_groups(
    groups: Sequence[Sequence[str | None]],
    *,
    no_answer: str = "singleton",
    pairs_equivalent: PairsEquivalent | None = None,
) -> list[list[int]]:
    """`cluster_answers` for many prompts at once; each round batches one comparison set per prompt."""
    if no_answer not in NO_ANSWER_MODES:
        raise ValueError(f"no_answer={no_answer!r}: expected one of {NO_ANSWER_MODES}")
    check = pairs_equivalent or _in_process_pairs
    states = [_Group(answers, no_answer) for answers in groups]
    active = states
    while active:
        asks = [(g, g.advance()) for g in active]
        asks = [(g, i) for g, i in asks if i is not None]
        pairs = [(g.answers[i], g.answers[r]) for g, i in asks for r in g.reps]
        decisions = list(check(pairs)) if pairs else []
        if len(decisions) != len(pairs):
            raise ValueError(f"pairs_equivalent returned {len(decisions)} decisions for {len(pairs)} pairs")
        at = 0
        for g, i in asks:
            n = len(g.reps)
            g.settle(i, decisions[at : at + n])
            at += n
        active = [g for g, _ in asks]
    return [g.class_ids() for g in states]


def cluster_answers(
    answers: Sequence[str | None],
    *,
    no_answer: str = "singleton",
    pairs_equivalent: PairsEquivalent | None = None,
) -> list[int]:
    """Semantic class id (0..C-1, first-appearance order) of each answer.

    Equivalent answers (normalised-string match, else math-verify in both
    directions) share a class; None answers are singletons (`no_answer=
    "singleton"`) or one shared class (`"shared"`).
    """
    return cluster_answer_groups([answers], no_answer=no_answer, pairs_equivalent=pairs_equivalent)[0]


def entropy_of_classes(
    class_ids: Sequence[int],
    *,
    logprobs: Sequence[float] | None = None,
    lengths: Sequence[int] | None = None,
) -> float:
    """-sum_k p_k ln p_k (nats) of a clustering; count-based or likelihood-weighted.

    logprobs: sequence log-probabilities, one per answer (finite); then
    p_k = sum_{i in C_k} exp(lp_i) / sum_i exp(lp_i), computed in log space.
    lengths: response lengths in tokens; each lp_i is divided by its length first.
    """
    ids = np.asarray(class_ids, dtype=np.int64)
    if ids.size == 0:
        raise ValueError("semantic entropy of an empty answer set is undefined")
    n_classes = int(ids.max()) + 1
    if logprobs is None:
        if lengths is not None:
            raise ValueError("lengths only apply to likelihood weighting: pass logprobs too")
        p = np.bincount(ids, minlength=n_classes) / ids.size
        log_p = np.log(p)
    else:
        lp = np.asarray(logprobs, dtype=np.float64)
        if lp.shape != ids.shape or not np.all(np.isfinite(lp)):
            raise ValueError(f"logprobs must be {ids.size} finite values, got shape {lp.shape}")
        if lengths is not None:
            ln = np.asarray(lengths, dtype=np.float64)
            if ln.shape != ids.shape or np.any(ln <= 0):
                raise ValueError(f"lengths must be {ids.size} positive values")
            lp = lp / ln
        # class log-mass: logsumexp over members, shifted by the global max for stability
        shift = lp.max()
        mass = np.zeros(n_classes)
        np.add.at(mass, ids, np.exp(lp - shift))
        with np.errstate(divide="ignore"):  # a class whose mass underflows has p = 0
            log_p = np.log(mass) - np.log(mass.sum())
        p = np.exp(log_p)
    se = -float(np.sum(p[p > 0] * log_p[p > 0]))
    return max(se, 0.0) + 0.0  # + 0.0 turns a -0.0 (one class) into 0.0


def semantic_entropy(
    answers: Sequence[str | None],
    *,
    logprobs: Sequence[float] | None = None,
    no_answer: str = "singleton",
    lengths: Sequence[int] | None = None,
    pairs_equivalent: PairsEquivalent | None = None,
) -> float:
    """Semantic entropy (nats) of one prompt's sampled answers; see the module docstring."""
    ids = cluster_answers(answers, no_answer=no_answer, pairs_equivalent=pairs_equivalent)
    return entropy_of_classes(ids, logprobs=logprobs, lengths=lengths)


def stats_from_classes(class_ids: Sequence[int], references_correct: Sequence[bool] | None = None, *,
                       logprobs: Sequence[float] | None = None, lengths: Sequence[int] | None = None) -> dict:
    """Per-prompt record: se, se_norm (SE / ln N; 0 when N == 1), n_classes, class_sizes, pass_rate.
    With `logprobs` (and `lengths`), SE is likelihood-weighted (`entropy_of_classes`)."""
    n = len(class_ids)
    se = entropy_of_classes(class_ids, logprobs=logprobs, lengths=lengths)
    sizes = sorted(np.bincount(np.asarray(class_ids, dtype=np.int64)).tolist(), reverse=True)
    if references_correct is not None and len(references_correct) != n:
        raise ValueError(f"{len(references_correct)} correctness flags for {n} answers")
    return {
        "se": se,
        "se_norm": se / math.log(n) if n > 1 else 0.0,
        "n_classes": len(sizes),
        "class_sizes": sizes,
        "pass_rate": None if references_correct is None else float(np.mean(references_correct)),
    }


def prompt_stats(
    answers: Sequence[str | None],
    references_correct: Sequence[bool] | None = None,
    *,
    no_answer: str = "singleton",
    pairs_equivalent: PairsEquivalent | None = None,
) -> dict:
    """Count-based SE record of one prompt (the columns of `entrl semantic-entropy`)."""
    ids = cluster_answers(answers, no_answer=no_answer, pairs_equivalent=pairs_equivalent)
    return stats_from_classes(ids, references_correct)


def batch_prompt_stats(
    groups: Sequence[Sequence[str | None]],
    references_correct: Sequence[Sequence[bool]] | None = None,
    *,
    no_answer: str = "singleton",
    pairs_equivalent: PairsEquivalent | None = None,
    logprobs: Sequence[Sequence[float]] | None = None,
    lengths: Sequence[Sequence[int]] | None = None,
) -> list[dict]:
    """`prompt_stats` for many prompts, with their comparisons batched (pass a pool's hook); with
    `logprobs` (per prompt, one sequence log-prob per answer; and `lengths`) likelihood-weighted."""
    all_ids = cluster_answer_groups(groups, no_answer=no_answer, pairs_equivalent=pairs_equivalent)
    none = [None] * len(groups)
    corrects = references_correct if references_correct is not None else none
    return [stats_from_classes(ids, c, logprobs=lp, lengths=ln)
            for ids, c, lp, ln in zip(all_ids, corrects, logprobs or none, lengths or none, strict=True)]


SE_COLUMNS = ("se", "se_norm", "n_classes", "class_sizes", "pass_rate")  # the keys of `stats_from_classes`
