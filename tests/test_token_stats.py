"""Tests for entrl.token_stats: chunked per-token log-probs and entropies.

Tiers: hand-computed values; parity with the full-logits reference (values and
gradients); invariants (jit, bfloat16, stop_gradient, sharding); the memory
property itself (compiled temp bytes); input validation.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from entrl.token_stats import naive_token_stats, token_logprobs, token_logprobs_and_entropy

TOL = dict(rtol=1e-5, atol=1e-5)


def _inputs(seed, B, T, D, V, dtype=jnp.float32, scale=1.0):
    # numpy RNG: eager jax.random would compile a kernel per op on this slow box.
    rng = np.random.default_rng(seed)
    h = jnp.asarray(rng.standard_normal((B, T, D), np.float32)).astype(dtype)
    w = jnp.asarray(scale / np.sqrt(D) * rng.standard_normal((D, V)).astype(np.float32)).astype(dtype)
    y = jnp.asarray(rng.integers(0, V, (B, T)), jnp.int32)
    a = jnp.asarray(rng.standard_normal((B, T)), jnp.float32)
    b = jnp.asarray(rng.standard_normal((B, T)), jnp.float32)
    return h, w, y, a, b


# (B, T, D, V, chunk_size, temperature): T not a multiple of the chunk, exact
# multiples, a chunk larger than all tokens, one token, T != 1.
CASES = [
    (2, 37, 16, 50, 16, 1.0),
    (1, 5, 8, 11, 4, 0.7),
    (3, 64, 32, 300, 64, 1.6),
    (2, 9, 8, 40, 1024, 0.5),
    (1, 1, 4, 7, 3, 1.0),
]


def test_uniform_logits_hand_computed():
    # w = 0 -> every logit is 0 -> p uniform: logp = -ln V, H = ln V, any T.
    B, T, D, V = 2, 5, 3, 13
    h, _, y, _, _ = _inputs(0, B, T, D, V)
    logp, ent = token_logprobs_and_entropy(h, jnp.zeros((D, V)), y, temperature=0.3, chunk_size=4)
    np.testing.assert_allclose(logp, np.full((B, T), -np.log(V)), rtol=1e-6)
    np.testing.assert_allclose(ent, np.full((B, T), np.log(V)), rtol=1e-6)
    assert logp.dtype == ent.dtype == jnp.float32 and logp.shape == (B, T)


@pytest.mark.parametrize("B,T,D,V,chunk,temp", CASES)
def test_matches_naive(B, T, D, V, chunk, temp):
    h, w, y, _, _ = _inputs(1, B, T, D, V, scale=3.0)
    logp, ent = token_logprobs_and_entropy(h, w, y, temperature=temp, chunk_size=chunk)
    logp0, ent0 = naive_token_stats(h, w, y, temp)
    np.testing.assert_allclose(logp, logp0, **TOL)
    np.testing.assert_allclose(ent, ent0, **TOL)
    np.testing.assert_allclose(token_logprobs(h, w, y, temperature=temp, chunk_size=chunk), logp0, **TOL)


def _objective(fn, y, a, b, stop_entropy=False):
    def f(h, w, temp):
        logp, ent = fn(h, w, y, temp)
        if stop_entropy:
            ent = jax.lax.stop_gradient(ent)
        return jnp.sum(a * logp) + jnp.sum(b * ent)

    return f


def _grad(f, argnums):
    return jax.jit(jax.grad(f, argnums=argnums))


def _chunked(chunk):
    return lambda h, w, y, t: token_logprobs_and_entropy(h, w, y, temperature=t, chunk_size=chunk)


@pytest.mark.parametrize("B,T,D,V,chunk,temp", CASES[:3])
def test_gradients_match_naive(B, T, D, V, chunk, temp):
    h, w, y, a, b = _inputs(2, B, T, D, V, scale=3.0)
    g = _grad(_objective(_chunked(chunk), y, a, b), argnums=(0, 1, 2))(h, w, temp)
    g0 = _grad(_objective(naive_token_stats, y, a, b), argnums=(0, 1, 2))(h, w, temp)
    np.testing.assert_allclose(g[0], g0[0], **TOL)
    np.testing.assert_allclose(g[1], g0[1], **TOL)
    # dT sums over all B*T*V logits: compare relative to its magnitude.
    np.testing.assert_allclose(g[2], g0[2], rtol=1e-5)


def test_stop_gradient_entropy_leaves_logp_gradient_only():
    h, w, y, a, b = _inputs(3, 2, 21, 8, 30, scale=2.0)
    g_sg = _grad(_objective(_chunked(8), y, a, b, stop_entropy=True), argnums=(0, 1))(h, w, 1.3)
    g_logp = _grad(_objective(_chunked(8), y, a, 0.0 * b), argnums=(0, 1))(h, w, 1.3)
    g_naive = _grad(_objective(naive_token_stats, y, a, 0.0 * b), argnums=(0, 1))(h, w, 1.3)
    for x, x1, x0 in zip(g_sg, g_logp, g_naive):
        np.testing.assert_array_equal(x, x1)
        np.testing.assert_allclose(x, x0, **TOL)


def test_jit_equals_eager_and_traced_temperature():
    h, w, y, a, b = _inputs(4, 2, 19, 8, 33, scale=2.0)
    eager = token_logprobs_and_entropy(h, w, y, temperature=0.8, chunk_size=8)
    jitted = jax.jit(lambda h, w, y, t: token_logprobs_and_entropy(h, w, y, temperature=t, chunk_size=8))(
        h, w, y, jnp.float32(0.8)
    )
    for x, x0 in zip(jitted, eager):
        np.testing.assert_allclose(x, x0, rtol=1e-6, atol=1e-6)
    f = _objective(_chunked(8), y, a, b)
    g_eager = jax.grad(f, argnums=(0, 1))(h, w, 0.8)
    g_jit = jax.jit(jax.grad(f, argnums=(0, 1)))(h, w, jnp.float32(0.8))
    for x, x0 in zip(g_jit, g_eager):
        np.testing.assert_allclose(x, x0, rtol=1e-5, atol=1e-6)


def test_bfloat16_close_to_float32():
    h, w, y, a, b = _inputs(5, 2, 40, 32, 200, scale=3.0)
    h16, w16 = h.astype(jnp.bfloat16), w.astype(jnp.bfloat16)
    logp16, ent16 = token_logprobs_and_entropy(h16, w16, y, temperature=0.9, chunk_size=16)
    assert logp16.dtype == ent16.dtype == jnp.float32
    # Reference on the same (rounded) inputs in float32: only the matmul precision differs.
    logp, ent = naive_token_stats(h16.astype(jnp.float32), w16.astype(jnp.float32), y, 0.9)
    np.testing.assert_allclose(logp16, logp, atol=2e-2, rtol=1e-2)
    np.testing.assert_allclose(ent16, ent, atol=2e-2, rtol=1e-2)
    g16 = _grad(_objective(_chunked(16), y, a, b), argnums=(0, 1))(h16, w16, 0.9)
    g32 = _grad(_objective(naive_token_stats, y, a, b), argnums=(0, 1))(
        h16.astype(jnp.float32), w16.astype(jnp.float32), 0.9
    )
    for x, x0 in zip(g16, g32):
        assert x.dtype == jnp.bfloat16
        x, x0 = np.asarray(x, np.float32), np.asarray(x0)
        assert np.linalg.norm(x - x0) <= 2e-2 * np.linalg.norm(x0)


def test_batch_sharded_equals_unsharded():
    mesh = jax.make_mesh((8,), ("data",), axis_types=(jax.sharding.AxisType.Auto,))
    h, w, y, a, b = _inputs(6, 8, 12, 8, 24, scale=2.0)
    shard = NamedSharding(mesh, P("data"))
    h_s, y_s, a_s, b_s = (jax.device_put(x, shard) for x in (h, y, a, b))
    f = _objective(_chunked(16), y_s, a_s, b_s)
    out = jax.jit(lambda h, w: token_logprobs_and_entropy(h, w, y_s, chunk_size=16))(h_s, w)
    g = jax.jit(jax.grad(f, argnums=(0, 1)))(h_s, w, 1.0)
    out0 = token_logprobs_and_entropy(h, w, y, chunk_size=16)
    g0 = _grad(_objective(_chunked(16), y, a, b), argnums=(0, 1))(h, w, 1.0)
    for x, x0 in zip((*out, *g), (*out0, *g0)):
        np.testing.assert_allclose(x, x0, rtol=1e-5, atol=1e-6)


def test_never_materialises_full_logits():
    # Compiled scratch memory of forward and forward+backward stays far below one
    # [B*T, V] float32 buffer (the naive version needs at least two).
    B, T, D, V, chunk = 1, 512, 16, 4096, 32
    h, w, y, a, b = _inputs(7, B, T, D, V)
    full_logits_bytes = B * T * V * 4

    def temp_bytes(fn):
        return jax.jit(fn).lower(h, w).compile().memory_analysis().temp_size_in_bytes

    fwd = temp_bytes(lambda h, w: token_logprobs_and_entropy(h, w, y, chunk_size=chunk))
    bwd = temp_bytes(lambda h, w: _grad(_objective(_chunked(chunk), y, a, b), argnums=(0, 1))(h, w, 1.0))
    naive = temp_bytes(lambda h, w: naive_token_stats(h, w, y))
    chunk_logits_bytes = chunk * V * 4
    assert naive >= full_logits_bytes
    assert fwd <= 3 * chunk_logits_bytes, fwd
    assert bwd <= 3 * chunk_logits_bytes + D * V * 4, bwd  # + the float32 dW accumulator


def test_out_of_range_target_under_jit_is_nan():
    h, w, y, _, _ = _inputs(8, 1, 4, 4, 6)
    y = y.at[0, 2].set(6)
    logp, _ = jax.jit(lambda y: token_logprobs_and_entropy(h, w, y, chunk_size=2))(y)
    assert np.isnan(logp[0, 2]) and np.isfinite(np.delete(np.asarray(logp[0]), 2)).all()


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(temperature=0.0), "temperature"),
        (dict(temperature=-1.0), "temperature"),
        (dict(temperature=float("nan")), "temperature"),
        (dict(chunk_size=0), "chunk_size"),
        (dict(chunk_size=2.5), "chunk_size"),
    ],
)
def test_bad_settings_raise(kwargs, match):
    h, w, y, _, _ = _inputs(9, 1, 4, 4, 6)
    with pytest.raises(ValueError, match=match):
        token_logprobs_and_entropy(h, w, y, **kwargs)


def test_bad_inputs_raise():
    h, w, y, _, _ = _inputs(10, 1, 4, 4, 6)
    with pytest.raises(ValueError, match=r"\[0, 6\)"):
        token_logprobs_and_entropy(h, w, y.at[0, 1].set(6))
    with pytest.raises(ValueError, match=r"\[0, 6\)"):
        token_logprobs_and_entropy(h, w, y.at[0, 1].set(-1))
    with pytest.raises(ValueError, match="hidden size"):
        token_logprobs_and_entropy(h, w[:3], y)
    with pytest.raises(ValueError, match="targets must have shape"):
        token_logprobs_and_entropy(h, w, y[:, :3])
    with pytest.raises(ValueError, match="integer"):
        token_logprobs_and_entropy(h, w, y.astype(jnp.float32))
    with pytest.raises(ValueError, match=r"\[B, T, D\]"):
        token_logprobs_and_entropy(h[0], w, y)
