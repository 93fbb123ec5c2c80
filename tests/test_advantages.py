"""Tests of entrl.rl.advantages: hand-computed values, a NumPy reference, invariants, errors."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from entrl.rl import advantages as A

# ---------------------------------------------------------------------------
# Hand-computed
# ---------------------------------------------------------------------------


def test_grpo_hand_computed():
    # Group 1: rewards 1,0,0,1 -> mean 0.5, unbiased std sqrt(4 * 0.25 / 3) = sqrt(1/3).
    # Group 2: all equal -> 0.
    adv = A.grpo_advantages(jnp.array([1.0, 0.0, 0.0, 1.0, 1.0, 1.0, 1.0, 1.0]), 4)
    a = 0.5 / (math.sqrt(1 / 3) + 1e-6)
    np.testing.assert_allclose(adv, [a, -a, -a, a, 0, 0, 0, 0], rtol=1e-6)


def test_drgrpo_hand_computed():
    adv = A.grpo_advantages(jnp.array([1.0, 0.0, 0.0, 1.0, 2.0, 0.0]), 3, normalize_std=False)
    np.testing.assert_allclose(adv, [2 / 3, -1 / 3, -1 / 3, 0.0, 1.0, -1.0], rtol=1e-6)


def test_plus_minus_one_rewards_equal_zero_one_after_std_normalisation():
    r01 = jnp.array([1.0, 0.0, 1.0, 1.0, 0.0, 0.0, 0.0, 1.0])
    a01 = A.grpo_advantages(r01, 4, eps=0.0)
    apm = A.grpo_advantages(2 * r01 - 1, 4, eps=0.0)
    np.testing.assert_allclose(a01, apm, rtol=1e-6)


def test_group_of_one_follows_verl():
    np.testing.assert_allclose(A.grpo_advantages(jnp.array([1.0, 0.0]), 1), [1 / (1 + 1e-6), 0.0], rtol=1e-7)
    np.testing.assert_allclose(A.grpo_advantages(jnp.array([1.0, 0.0]), 1, normalize_std=False), [1.0, 0.0])


def test_entropy_shaped_hand_computed():
    # alpha 0.4, kappa 2: A + min(0.4 H, |A| / 2); none where A == 0 or masked.
    adv = jnp.array([[1.0, -1.0, 0.0, 0.2, 3.0]])
    ent = jnp.array([[1.0, 5.0, 3.0, 1.0, 1.0]])
    mask = jnp.array([[1, 1, 1, 1, 0]])
    out = A.entropy_shaped_advantages(adv, ent, mask)
    np.testing.assert_allclose(out, [[1.4, -0.5, 0.0, 0.3, 3.0]], rtol=1e-6)


def test_entropy_shaped_no_gradient_through_entropy():
    adv = jnp.array([[1.0, -1.0, 0.5]])
    g = jax.grad(lambda h: A.entropy_shaped_advantages(adv, h, jnp.ones((1, 3)), alpha=0.4).sum())(
        jnp.array([[0.1, 0.2, 0.3]]))
    np.testing.assert_array_equal(g, 0.0)


def test_broadcast_to_tokens():
    out = A.broadcast_to_tokens(jnp.array([2.0, -1.0]), jnp.array([[1, 1, 0], [1, 0, 0]]))
    np.testing.assert_array_equal(out, [[2.0, 2.0, 0.0], [-1.0, 0.0, 0.0]])


# ---------------------------------------------------------------------------
# NumPy reference and invariants
# ---------------------------------------------------------------------------


def np_grpo(r, n, normalize_std, eps=1e-6):
    out = np.empty(len(r))
    for s in range(0, len(r), n):
        g = np.asarray(r[s:s + n], np.float64)
        if n == 1:
            out[s:s + n] = g / (1 + eps) if normalize_std else g
            continue
        d = g - g.mean()
        out[s:s + n] = d / (np.std(g, ddof=1) + eps) if normalize_std else d
    return out


_grpo_jit = jax.jit(A.grpo_advantages, static_argnums=1, static_argnames="normalize_std")


@settings(max_examples=15, deadline=None)
@given(st.sampled_from([1, 4]), st.booleans(), st.data())
def test_grpo_matches_numpy_and_is_permutation_equivariant(n, norm, data):
    groups = 3
    r = np.array(data.draw(st.lists(st.sampled_from([0.0, 1.0, -1.0, 0.5]) | st.floats(-3, 3),
                                    min_size=n * groups, max_size=n * groups)), np.float32)
    got = np.asarray(_grpo_jit(jnp.asarray(r), n, normalize_std=norm))
    np.testing.assert_allclose(got, np_grpo(r, n, norm), rtol=1e-4, atol=1e-4)
    # Permuting responses inside their groups permutes the advantages the same way.
    perm = np.concatenate([g * n + np.random.default_rng(g).permutation(n) for g in range(groups)])
    np.testing.assert_allclose(np.asarray(_grpo_jit(jnp.asarray(r[perm]), n, normalize_std=norm)), got[perm],
                               rtol=1e-5, atol=1e-6)


def test_jit_equals_eager():
    r = jnp.asarray(np.random.default_rng(0).integers(0, 2, 12), jnp.float32)
    for norm in (True, False):
        np.testing.assert_allclose(_grpo_jit(r, 4, normalize_std=norm), A.grpo_advantages(r, 4, normalize_std=norm),
                                   rtol=1e-6, atol=1e-7)
    adv, ent = jnp.linspace(-1, 1, 12).reshape(3, 4), jnp.linspace(0, 2, 12).reshape(3, 4)
    mask = jnp.arange(12).reshape(3, 4) % 5 != 0
    np.testing.assert_array_equal(jax.jit(A.entropy_shaped_advantages)(adv, ent, mask),
                                  A.entropy_shaped_advantages(adv, ent, mask))


def test_errors():
    with pytest.raises(ValueError, match="groups of 3"):
        A.grpo_advantages(jnp.zeros(8), 3)
    with pytest.raises(ValueError, match="flat"):
        A.grpo_advantages(jnp.zeros((2, 4)), 4)
    with pytest.raises(ValueError, match="positive int"):
        A.grpo_advantages(jnp.zeros(4), 0)
    with pytest.raises(ValueError, match="kappa"):
        A.entropy_shaped_advantages(jnp.zeros((1, 2)), jnp.zeros((1, 2)), jnp.ones((1, 2)), kappa=0.0)
    with pytest.raises(ValueError, match="alpha"):
        A.entropy_shaped_advantages(jnp.zeros((1, 2)), jnp.zeros((1, 2)), jnp.ones((1, 2)), alpha=-1.0)
    with pytest.raises(ValueError, match="shape mismatch"):
        A.entropy_shaped_advantages(jnp.zeros((1, 2)), jnp.zeros((1, 3)), jnp.ones((1, 2)))
