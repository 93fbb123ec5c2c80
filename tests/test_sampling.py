"""Tests for entrl.sampling: strategies on raw logits, stop handling, and the model-driven sampler."""

from __future__ import annotations

import numpy as np
import pytest
import jax
import jax.numpy as jnp
from scipy import stats

from entrl import sampling
from entrl.sampling import SamplingConfig, filter_logits, sample_next_token


# ----------------------------------------------------------------------------
# Strategies on raw logits
# ----------------------------------------------------------------------------
LOGITS_V = np.array([2.0, 1.5, 0.3, -0.5, 1.0, -2.0, 0.8, -1.0], np.float32)


def _softmax(z):
    e = np.exp(z - z.max())
    return e / e.sum()


def test_filter_logits_hand_computed():
    z = jnp.asarray(LOGITS_V)[None]
    np.testing.assert_array_equal(np.isfinite(filter_logits(z, top_k=3))[0], [1, 1, 0, 0, 1, 0, 0, 0])
    # top-p: probabilities sorted descending, keep until the mass before a token reaches p.
    p = _softmax(LOGITS_V)
    order = np.argsort(-p)
    before = np.cumsum(p[order]) - p[order]
    for top_p in (0.05, 0.5, 0.9, 0.999):
        keep = np.zeros(8, bool)
        keep[order[before < top_p]] = True
        np.testing.assert_array_equal(np.isfinite(filter_logits(z, top_p=top_p))[0], keep)
    # top-k then top-p on the renormalised top-k distribution.
    pk = _softmax(LOGITS_V[[0, 1, 4]])  # tokens 0, 1, 4 in descending order
    assert pk[0] < 0.6 < pk[0] + pk[1]
    np.testing.assert_array_equal(np.isfinite(filter_logits(z, top_k=3, top_p=0.6))[0], [1, 1, 0, 0, 0, 0, 0, 0])
    # Off, and k >= V, are no-ops.
    np.testing.assert_array_equal(filter_logits(z), z)
    np.testing.assert_array_equal(filter_logits(z, top_k=100), z)


def test_logprob_is_full_softmax_before_truncation_and_ban():
    cfg = SamplingConfig(temperature=0.7, top_k=2, top_p=0.9, banned_ids=(0,))
    z = jnp.tile(jnp.asarray(LOGITS_V)[None], (64, 1))
    tokens, logp = sample_next_token(z, jax.random.key(0), cfg)
    full = np.log(_softmax(LOGITS_V / 0.7))
    np.testing.assert_allclose(logp, full[np.asarray(tokens)], rtol=0, atol=1e-6)
    assert set(np.asarray(tokens).tolist()) <= {1, 4}  # top-2 after banning token 0


def test_greedy_and_top1():
    z = jax.random.normal(jax.random.key(1), (16, 50))
    greedy, lp = sample_next_token(z, jax.random.key(2), SamplingConfig(temperature=0.0))
    np.testing.assert_array_equal(greedy, np.argmax(z, -1))
    np.testing.assert_allclose(lp, np.asarray(jax.nn.log_softmax(z))[np.arange(16), greedy], atol=1e-6)
    top1, lp1 = sample_next_token(z, jax.random.key(3), SamplingConfig(temperature=1.3, top_k=1))
    np.testing.assert_array_equal(top1, greedy)
    np.testing.assert_allclose(lp1, np.asarray(jax.nn.log_softmax(z / 1.3))[np.arange(16), greedy], atol=1e-6)
    # Greedy never picks a banned id, even the argmax.
    banned, _ = sample_next_token(z, jax.random.key(2), SamplingConfig(temperature=0.0, banned_ids=tuple(range(25))))
    np.testing.assert_array_equal(banned, 25 + np.argmax(z[:, 25:], -1))


@pytest.mark.parametrize(
    "temperature,top_k,top_p",
    [(1.0, 0, 1.0), (0.6, 0, 1.0), (1.5, 0, 1.0), (0.8, 3, 1.0), (1.0, 0, 0.75), (1.2, 5, 0.8)],
)
def test_chi_square_distribution(temperature, top_k, top_p):
    """Sampled frequencies match softmax(z/T) and its top-k / top-p truncations."""
    n_draws = 40_000
    cfg = SamplingConfig(temperature=temperature, top_k=top_k, top_p=top_p)
    z = jnp.broadcast_to(jnp.asarray(LOGITS_V), (n_draws, LOGITS_V.size))
    tokens, _ = jax.jit(sample_next_token, static_argnums=2)(z, jax.random.key(1234), cfg)
    counts = np.bincount(np.asarray(tokens), minlength=LOGITS_V.size)
    # Expected distribution, computed independently in numpy.
    p = _softmax(LOGITS_V.astype(np.float64) / temperature)
    order = np.argsort(-p)
    keep = np.zeros_like(p, bool)
    keep[order[: top_k or p.size]] = True
    if top_p < 1.0:
        pk = np.where(keep, p, 0) / p[keep].sum()
        before = np.cumsum(pk[order]) - pk[order]
        keep[:] = False
        keep[order[before < top_p]] = True
    expected = np.where(keep, p, 0) / p[keep].sum()
    assert counts[~keep].sum() == 0, "a truncated token was sampled"
    chi2, pval = stats.chisquare(counts[keep], n_draws * expected[keep])
    assert pval > 1e-3, (counts, n_draws * expected, chi2)


def test_record_stop_handling():
    """EOS is kept (mask 1); later columns are PAD with log-prob 0 and do not count."""
    cfg = SamplingConfig(max_new_tokens=4, eos_ids=(7,), pad_id=0)
    state = sampling._DecodeState(
        step=jnp.int32(0), tokens=jnp.zeros((2, 4), jnp.int32), logprobs=jnp.zeros((2, 4)),
        done=jnp.zeros(2, bool), length=jnp.zeros(2, jnp.int32), prompt_len=jnp.ones(2, jnp.int32),
        kv_mask=jnp.ones((2, 5), jnp.int32), cache=(), rng=jax.random.key(0),
    )  # fmt: skip
    record = jax.jit(sampling._record, static_argnums=3)
    for toks in ([5, 7], [9, 3], [9, 9], [7, 7]):  # one column per call: [row 0, row 1]
        state = record(state, jnp.asarray(toks, jnp.int32), jnp.full(2, -0.5), cfg)
    np.testing.assert_array_equal(state.tokens, [[5, 9, 9, 7], [7, 0, 0, 0]])
    np.testing.assert_array_equal(state.length, [4, 1])
    np.testing.assert_array_equal(state.done, [True, True])
    np.testing.assert_array_equal(state.logprobs, [[-0.5] * 4, [-0.5, 0, 0, 0]])


# ----------------------------------------------------------------------------
# Settings and prompt packing
# ----------------------------------------------------------------------------
@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(n=0), "n=0"),
        (dict(top_p=0.0), "top_p"),
        (dict(top_p=1.5), "top_p"),
        (dict(temperature=-0.1), "temperature"),
        (dict(top_k=-1), "top_k"),
        (dict(max_new_tokens=0), "max_new_tokens"),
        (dict(cache_dtype="int8"), "cache_dtype"),
        (dict(eos_ids=[1]), "eos_ids"),
    ],
)
def test_config_validation(kwargs, match):
    with pytest.raises(ValueError, match=match):
        SamplingConfig(**kwargs)


def test_config_normalises_and_hashes():
    a = SamplingConfig(temperature=1, eos_ids=(3, 2, 3), pad_id=2, banned_ids=(2, 5))
    b = SamplingConfig(temperature=1.0, eos_ids=(2, 3), pad_id=2, banned_ids=(5,))
    assert a == b and hash(a) == hash(b)
    assert a.banned_ids == (5,)  # PAD == EOS is not banned
    assert SamplingConfig(temperature=0).greedy and SamplingConfig(top_k=1).greedy
    assert SamplingConfig(temperature=0).logprob_temperature == 1.0
    with pytest.raises(ValueError, match="vocabulary"):
        SamplingConfig(eos_ids=(300,)).check_vocab(256)


def test_pad_prompts_and_buckets():
    ids, mask = sampling.pad_prompts([[5, 6, 7], [8]], pad_id=0, buckets=(2, 4, 8))
    np.testing.assert_array_equal(ids, [[0, 5, 6, 7], [0, 0, 0, 8]])
    np.testing.assert_array_equal(mask, [[0, 1, 1, 1], [0, 0, 0, 1]])
    assert sampling.choose_bucket(64) == 64 and sampling.choose_bucket(65) == 128
    with pytest.raises(ValueError, match="largest bucket"):
        sampling.pad_prompts([[1] * 9], pad_id=0, buckets=(4, 8))
    with pytest.raises(ValueError, match="empty"):
        sampling.pad_prompts([[1, 2], []], pad_id=0)
    with pytest.raises(ValueError, match="non-empty"):
        sampling.pad_prompts([], pad_id=0)
    with pytest.raises(ValueError, match="non-integer"):
        sampling.pad_prompts([[1.5, 2.0]], pad_id=0)
    with pytest.raises(ValueError, match="ascending"):
        sampling.pad_prompts([[1]], pad_id=0, buckets=(8, 4))
