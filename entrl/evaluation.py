"""Evaluation metrics from n graded samples per problem (docs/method.md, "Evaluation"): pass@k, avg@k, maj@k.

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

import dataclasses
import functools
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from entrl.multihost import gather, gather_rows, local_rows
from entrl.progress import progress_bar
from entrl.sampling import DEFAULT_BUCKETS, FINISH_LENGTH, pad_prompts
from entrl.semantic_entropy import PairsEquivalent, cluster_answer_groups
from entrl.sharding import data_shards, sampler_prompts
from entrl.token_stats import compute_logprobs


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


# ---------------------------------------------------------------------------
# Sampling + grading a set of prompts with a policy (training-time and demo evaluation)
# ---------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class GradedBatch:
    """n graded samples for each of `problems` prompts; rows of one prompt are contiguous (R = problems * n)."""

    problems: int  # real prompts in the batch (padding copies excluded)
    responses: list[str]  # [R] decoded responses (special tokens skipped)
    answers: list[str | None]  # [R] extracted final answers
    status: list[str]  # [R] `entrl.rewards.STATUSES`
    correct_PxN: np.ndarray  # [problems, n] bool
    lengths: np.ndarray  # [R] response tokens, the stop token included
    finish_code: np.ndarray  # [R] `entrl.sampling.FINISH_LENGTH` (truncated) | `FINISH_STOP`
    rollout: Any  # the sampler's `Rollout`, padding rows included (for log-prob / entropy passes)
    seq_logp: np.ndarray | None = None  # [R] sum of the response's sampling log-probs (with `seq_logprobs`)


def sample_and_grade(sampler, graphdef, params, tokenizer, prompt_tokens: Sequence[Sequence[int]],
                     references: Sequence[str], *, verifier, rng, pad_to: int = 0,
                     buckets: Sequence[int] | None = None, seq_logprobs: bool = False) -> GradedBatch:
    """One sampler call on a batch of prompts (padded with copies of the first up to `pad_to`, then until
    its rows split over the mesh's data shards: `entrl.sharding.sampler_prompts`), decoded and graded.
    `seq_logprobs`: also each response's log-probability under the sampling distribution (log softmax of
    logits / T over the full vocabulary, summed over its tokens: at T = 1 the model's likelihood).

    Multi-host: every process calls it with the same prompts; each decodes and verifies only the rows
    its own devices hold, and the graded results are gathered, so every process returns all of them.
    """
    n = sampler.config.n
    chunk = [list(p) for p in prompt_tokens]
    real = len(chunk)
    if real == 0 or real != len(references):
        raise ValueError(f"{real} prompts vs {len(references)} references (need equal, non-zero)")
    chunk += [chunk[0]] * max(pad_to - real, 0)
    sharding = None
    if sampler.mesh is not None:  # rows that split over the shards: no device decodes all of them
        prompts, sharding = sampler_prompts(len(chunk), n, sampler.mesh, slots=getattr(sampler.config, "slots", 0))
        chunk += [chunk[0]] * (prompts - len(chunk))
    ids, mask = pad_prompts(chunk, pad_id=sampler.config.pad_id, buckets=tuple(buckets or DEFAULT_BUCKETS))
    if sharding is not None:  # the same host rows on every process: one global array
        ids, mask = (jax.device_put(x, sharding) for x in (ids, mask))
    roll = sampler.sample((graphdef, params), ids, mask, rng)
    rows, toks = local_rows(roll.tokens)
    _, rmask = local_rows(roll.mask)
    _, finish = local_rows(roll.finish_code)
    keep = rows < real * n  # padding copies are dropped
    rows, toks, rmask, finish = rows[keep], toks[keep], rmask[keep], finish[keep]
    extra = {}
    if seq_logprobs:  # summed on the devices: [R] floats cross to the host, not [R, L]
        _, seq = local_rows(jnp.sum(roll.logprobs * roll.mask, axis=-1))
        extra["seq_logp"] = [float(x) for x in seq[keep]]
    texts = [tokenizer.decode([int(t) for t in row[: int(m.sum())]]) for row, m in zip(toks, rmask)]
    res = verifier.score(texts, [references[int(r) // n] for r in rows])
    full = gather_rows(rows, {"text": texts, "answer": list(res.answers), "status": list(res.status),
                              "correct": [bool(c) for c in res.correct], "length": [int(m.sum()) for m in rmask],
                              "finish": [int(f) for f in finish], **extra}, total=real * n)
    return GradedBatch(real, full["text"], full["answer"], full["status"],
                       np.asarray(full["correct"], bool).reshape(real, n), np.asarray(full["length"], np.int64),
                       np.asarray(full["finish"], np.int64), roll,
                       np.asarray(full["seq_logp"], np.float64) if seq_logprobs else None)


def evaluate_prompts(sampler, graphdef, params, tokenizer, prompt_tokens: Sequence[Sequence[int]],
                     references: Sequence[str], *, verifier, n: int, ks: Sequence[int] = (1,), seed: int = 0,
                     batch_prompts: int = 64, buckets: Sequence[int] | None = None,
                     with_entropy: bool = False, entropy_micro_per_shard: int = 0, progress: str = "off") -> dict:
    """Sample `n` responses per prompt with `sampler`, grade them with `verifier`, summarise.

    The sampler must have been built with `n` samples per prompt (its static config). Prompts are
    processed in batches of `batch_prompts` (the last one padded with copies of the first prompt,
    which are discarded), so at most two shapes compile. Returns the `summarize` metrics plus
    `correct` [P, n], `answers`, `responses` ([P][n] lists), `per_problem_pass@1` (accuracy over the
    n samples of each problem), `response_length`, `truncation_rate`, and with `with_entropy` the
    mean per-token entropy of the sampled responses under the policy at the sampling temperature, from
    one forward of each call's rows in micro-batches of at most `entropy_micro_per_shard` rows per data
    shard (`entropy_micro_batches`; 0 = all of a shard's rows at once).
    `progress` (auto | on | off, `entrl.progress`): a transient bar over the problems.
    """
    if sampler.config.n != n:
        raise ValueError(f"sampler draws {sampler.config.n} samples per prompt, evaluation asked for n={n}")
    if len(prompt_tokens) != len(references) or not prompt_tokens:
        raise ValueError(f"{len(prompt_tokens)} prompts vs {len(references)} references (need equal, non-zero)")
    for k in ks:
        _check_k(n, k)
    buckets = tuple(buckets or DEFAULT_BUCKETS)
    P = len(prompt_tokens)
    correct = np.zeros((P, n), bool)
    answers: list[list[str | None]] = []
    responses: list[list[str]] = []
    lengths, truncated, ent_sum, ent_count = [], [], 0.0, 0
    key = jax.random.key(seed)
    with progress_bar(P, desc="eval", unit="problem", setting=progress, leave=False) as bar:
        for b0 in range(0, P, batch_prompts):
            g = sample_and_grade(sampler, graphdef, params, tokenizer, prompt_tokens[b0:b0 + batch_prompts],
                                 references[b0:b0 + batch_prompts], verifier=verifier, rng=jax.random.fold_in(key, b0),
                                 pad_to=batch_prompts if P > batch_prompts else 0, buckets=buckets)
            real, roll = g.problems, g.rollout
            correct[b0:b0 + real] = g.correct_PxN
            answers += [list(g.answers[i * n:(i + 1) * n]) for i in range(real)]
            responses += [g.responses[i * n:(i + 1) * n] for i in range(real)]
            lengths.append(g.lengths)
            truncated.append(g.finish_code == FINISH_LENGTH)
            if with_entropy:
                batch = {"prompt_ids": roll.prompt_ids, "prompt_mask": roll.prompt_mask, "resp_ids": roll.tokens}
                shards = data_shards(sampler.mesh) if getattr(sampler, "mesh", None) is not None else 1
                _, ent = compute_logprobs(graphdef, params, batch, temperature=sampler.config.logprob_temperature,
                                          num_micro=entropy_micro_batches(roll.tokens.shape[0], shards,
                                                                          entropy_micro_per_shard),
                                          chunk_size=ENTROPY_CHUNK, shards=shards)
                total, count = (float(gather(x)) for x in _entropy_sum(ent, roll.mask, real * n))
                ent_sum += total
                ent_count += int(count)
            bar.update(real)
    hook = getattr(verifier, "equivalent_pairs", None)
    out = dict(summarize(correct, answers, ks, pairs_equivalent=hook))
    out.update(correct=correct, answers=answers, responses=responses,
               **{"per_problem_pass@1": correct.mean(1)},
               response_length=float(np.concatenate(lengths).mean()),
               truncation_rate=float(np.concatenate(truncated).mean()))
    if with_entropy:
        out["entropy"] = ent_sum / max(ent_count, 1)
    return out


ENTROPY_CHUNK = 512  # response positions per log-softmax chunk of the entropy forward


def entropy_micro_batches(rows: int, shards: int, per_shard: int) -> int:
    """Micro-batches of a forward over `rows` split over `shards`: each holds the largest divisor of a
    shard's rows that is at most `per_shard` (0 = all of them: one micro-batch)."""
    local = rows // shards
    if not per_shard or per_shard >= local:
        return 1
    return local // max(d for d in range(1, per_shard + 1) if local % d == 0)


@functools.partial(jax.jit, static_argnums=2)
def _entropy_sum(ent_RxL, mask_RxL, real_rows: int):
    """(sum of entropy over the response tokens of the first `real_rows` rows, their count), on device."""
    keep = (jnp.arange(mask_RxL.shape[0]) < real_rows)[:, None] & (mask_RxL > 0)
    return jnp.where(keep, ent_RxL, 0.0).sum(), keep.sum()
