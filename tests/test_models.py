"""The decoder on tiny configs: invariants (KV-cache decode = full forward,
causality, padding, remat), ModelConfig <-> config.json, and real-size presets
shape-checked with `nnx.eval_shape` (no memory)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from entrl.models import PRESETS, KVCache, ModelConfig, Transformer, create_model
from entrl.models.transformer import rope_inv_freq

TINY = {
    "qwen2": ModelConfig(arch="qwen2", vocab_size=97, hidden_size=32, intermediate_size=48, num_layers=2,
                         num_heads=4, num_kv_heads=2, head_dim=8, qkv_bias=True),
    "qwen3": ModelConfig(arch="qwen3", vocab_size=97, hidden_size=32, intermediate_size=48, num_layers=2,
                         num_heads=4, num_kv_heads=2, head_dim=12, qk_norm=True, rope_theta=1e6),
    "llama": ModelConfig(arch="llama", vocab_size=97, hidden_size=32, intermediate_size=48, num_layers=2,
                         num_heads=4, num_kv_heads=1, head_dim=8, rope_theta=5e5, tie_word_embeddings=True,
                         rope_scaling=(("factor", 8.0), ("high_freq_factor", 4.0), ("low_freq_factor", 1.0),
                                       ("original_max_position_embeddings", 16.0))),
}


@pytest.fixture(scope="module")
def models():
    out = {}
    for name, cfg in TINY.items():
        m = create_model(cfg, seed=1)
        # Non-trivial biases and norm scales, so the tests see them.
        rng = np.random.default_rng(7)
        leaves, tree = jax.tree.flatten(nnx.state(m, nnx.Param))
        leaves = [jnp.asarray(x + 0.1 * rng.standard_normal(x.shape, np.float32)) for x in leaves]
        nnx.update(m, jax.tree.unflatten(tree, leaves))
        out[name] = m
    return out


def _batch(rng, B=3, T=9, V=97, pads=(0, 3, 6)):
    ids = rng.randint(0, V, (B, T)).astype(np.int32)
    mask = np.ones((B, T), np.int32)
    for b, p in enumerate(pads):
        mask[b, :p] = 0
    return jnp.asarray(ids), jnp.asarray(mask)


@nnx.jit
def _logits(model, ids, mask=None, positions=None):
    return model(ids, mask, positions)


@nnx.jit
def _hidden(model, ids, mask=None):
    return model.hidden(ids, mask)


@pytest.mark.parametrize("decode_weights", [False, True])
@pytest.mark.parametrize("arch", sorted(TINY))
def test_kv_cache_decode_equals_full_forward(models, arch, decode_weights):
    """Prefill a left-padded prompt, then decode one token per call: every real
    position's hidden state equals the full forward's, with the model's kernels
    or with the fused decode weights the sampler uses."""
    m = models[arch]
    ids, mask = _batch(np.random.RandomState(0))
    B, T = ids.shape
    P, S = 5, 12  # prompt length, cache slots
    full_h = _hidden(m, ids, mask)
    positions = jnp.maximum(jnp.cumsum(mask, -1) - 1, 0)
    kv_mask = jnp.zeros((B, S), jnp.int32).at[:, :T].set(mask)

    @jax.jit
    def step(state, ids_BxT, pos_BxT, cache, write_index):
        model = nnx.merge(graphdef, state)
        weights = model.decode_weights() if decode_weights else None
        return model.forward_cached(
            ids_BxT, pos_BxT, cache, write_index=write_index, kv_mask_BxS=kv_mask, weights=weights
        )

    graphdef, state = nnx.split(m)
    cache = m.init_cache(B, S)
    h, cache = step(state, ids[:, :P], positions[:, :P], cache, jnp.int32(0))
    hs = [h]
    for t in range(P, T):
        h, cache = step(state, ids[:, t:t + 1], positions[:, t:t + 1], cache, jnp.int32(t))
        hs.append(h)
    cached_h = jnp.concatenate(hs, axis=1)
    real = np.asarray(mask, bool)
    np.testing.assert_allclose(np.asarray(cached_h)[real], np.asarray(full_h)[real], atol=2e-5, rtol=2e-5)
    assert isinstance(cache, KVCache)
    assert len(cache.k) == len(cache.v) == m.cfg.num_layers and cache.slots == S
    K, Dh = m.cfg.num_kv_heads, m.cfg.head_dim
    assert all(k.shape == (B, K, Dh, S) for k in cache.k) and all(v.shape == (B, K, S, Dh) for v in cache.v)
    # slots past the written ones untouched
    assert not any(np.any(np.asarray(k)[..., T:]) for k in cache.k)
    assert not any(np.any(np.asarray(v)[:, :, T:]) for v in cache.v)


def test_left_padding_matches_unpadded_and_is_finite(models):
    m = models["qwen3"]
    ids, mask = _batch(np.random.RandomState(1))
    logits = _logits(m, ids, mask)
    assert logits.dtype == jnp.float32 and logits.shape == (3, 9, 97)
    assert np.isfinite(np.asarray(logits)).all()  # padding query rows too
    alone = _logits(m, ids[2:3, 6:])  # row 2 without its 6 padding tokens
    np.testing.assert_allclose(np.asarray(logits[2, 6:]), np.asarray(alone[0]), atol=2e-5, rtol=2e-5)


def test_causality_and_logits_from_hidden(models):
    m = models["qwen2"]
    ids, _ = _batch(np.random.RandomState(2), pads=(0, 0, 0))
    logits = _logits(m, ids)
    changed = _logits(m, ids.at[:, 5].set((ids[:, 5] + 1) % 97))
    np.testing.assert_array_equal(np.asarray(logits[:, :5]), np.asarray(changed[:, :5]))
    assert not np.allclose(np.asarray(logits[:, 5]), np.asarray(changed[:, 5]))
    h = _hidden(m, ids)
    assert h.shape == (3, 9, 32) and m.unembedding().shape == (32, 97)
    np.testing.assert_allclose(np.asarray(h @ m.unembedding()), np.asarray(logits), atol=1e-5, rtol=1e-5)


def test_tied_unembedding_is_embedding_transposed(models):
    m = models["llama"]
    assert not hasattr(m, "lm_head")
    np.testing.assert_array_equal(np.asarray(m.unembedding()), np.asarray(m.embedding[...]).T)


def test_explicit_positions_and_jit_equal_eager(models):
    m = models["llama"]
    ids, mask = _batch(np.random.RandomState(3))
    positions = jnp.maximum(jnp.cumsum(mask, -1) - 1, 0)
    eager = m(ids, mask, positions)
    jitted = nnx.jit(lambda model, i, a: model(i, a))(m, ids, mask)
    np.testing.assert_allclose(np.asarray(jitted), np.asarray(eager), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("policy", ["full", "dots"])
def test_remat_same_loss_and_grads(models, policy):
    m = models["qwen3"]
    ids, mask = _batch(np.random.RandomState(4))
    graphdef, state = nnx.split(m)

    def loss(state, remat):
        model = nnx.merge(graphdef, state)
        model.remat = remat
        return jnp.mean(jax.nn.log_softmax(model(ids, mask))[..., 0] * mask)

    grad_fn = jax.jit(jax.value_and_grad(loss), static_argnums=1)
    (l0, g0), (l1, g1) = grad_fn(state, "none"), grad_fn(state, policy)
    np.testing.assert_allclose(l0, l1, rtol=1e-6)
    for a, b in zip(jax.tree.leaves(g0), jax.tree.leaves(g1)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-6, rtol=1e-4)
    # The rematerialisation is really in the program: the backward pass recomputes forward matmuls
    # (all of a layer's under "full"; under "dots" only attention's, whose operands have batch dims).
    dots = lambda remat: grad_fn.lower(state, remat).as_text().count("dot_general")
    assert dots(policy) > dots("none")
    assert dots("full") > dots("dots")


def test_unknown_remat_policy_is_rejected():
    with pytest.raises(ValueError, match="remat='sometimes'"):
        Transformer(PRESETS["qwen3-14b"], rngs=nnx.Rngs(0), remat="sometimes")


def test_params_carry_logical_axes(models):
    state = nnx.state(models["qwen2"], nnx.Param)
    axes = {".".join(map(str, p)): v.get_metadata()["out_sharding"] for p, v in nnx.to_flat_state(state)}
    assert axes["embedding"] == ("vocab", "embed")
    assert axes["lm_head"] == ("embed", "vocab")
    # The decoder layers are stacked along a leading "layers" axis (scanned over).
    assert axes["layers.attn.q_kernel"] == ("layers", "embed", "q_heads", "head_dim")
    assert axes["layers.attn.k_kernel"] == ("layers", "embed", "kv_heads", "head_dim")
    assert axes["layers.attn.o_kernel"] == ("layers", "q_heads", "head_dim", "embed")
    assert axes["layers.mlp.down_kernel"] == ("layers", "mlp", "embed")
    assert axes["final_norm.scale"] == ("norm",)
    for p, v in nnx.to_flat_state(state):
        assert len(v.get_metadata()["out_sharding"]) == v.get_value().ndim, p


def test_llama3_rope_scaling_changes_low_frequencies_only():
    scaling = (("factor", 8.0), ("high_freq_factor", 4.0), ("low_freq_factor", 1.0),
               ("original_max_position_embeddings", 8192.0))  # Llama-3.1's values
    plain, scaled = rope_inv_freq(64, 5e5, None), rope_inv_freq(64, 5e5, scaling)
    np.testing.assert_allclose(scaled[0], plain[0])  # short wavelengths kept
    np.testing.assert_allclose(scaled[-1], plain[-1] / 8.0, rtol=1e-6)  # long ones divided by factor


# ---------------------------------------------------------------------------
# ModelConfig
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("arch", sorted(TINY))
def test_config_hf_dict_round_trip(arch):
    cfg = TINY[arch]
    assert ModelConfig.from_hf_dict(cfg.to_hf_dict()) == cfg
    hash(cfg)


def test_config_reads_transformers_v5_rope_parameters():
    d = TINY["qwen2"].to_hf_dict()
    d.pop("rope_theta")
    d["rope_parameters"] = {"rope_type": "default", "rope_theta": 12345.0}
    assert ModelConfig.from_hf_dict(d).rope_theta == 12345.0


@pytest.mark.parametrize(
    "change, match",
    [
        ({"model_type": "gpt2"}, "model_type='gpt2'"),
        ({"hidden_act": "gelu"}, "hidden_act"),
        ({"use_sliding_window": True}, "use_sliding_window"),
        ({"rope_scaling": {"rope_type": "yarn", "factor": 4.0}}, "yarn"),
    ],
)
def test_config_rejects_unsupported(change, match):
    with pytest.raises(ValueError, match=match):
        ModelConfig.from_hf_dict({**TINY["qwen2"].to_hf_dict(), **change})


def test_config_validation():
    with pytest.raises(ValueError, match="num_kv_heads"):
        ModelConfig(arch="qwen2", vocab_size=8, hidden_size=8, intermediate_size=8, num_layers=1,
                    num_heads=3, num_kv_heads=2, head_dim=4)
    with pytest.raises(ValueError, match="arch"):
        ModelConfig(arch="gpt2", vocab_size=8, hidden_size=8, intermediate_size=8, num_layers=1,
                    num_heads=2, num_kv_heads=2, head_dim=4)


@pytest.mark.parametrize(
    "name, published",
    [("deepseek-r1-distill-qwen-1.5b", 1.78e9), ("qwen2.5-math-7b", 7.62e9), ("qwen3-14b", 14.8e9)],
)
def test_presets_have_published_parameter_counts(name, published):
    cfg = PRESETS[name]
    abstract = nnx.eval_shape(lambda: Transformer(cfg, rngs=nnx.Rngs(0), param_dtype=jnp.bfloat16))
    n = sum(x.size for x in jax.tree.leaves(nnx.state(abstract, nnx.Param)))
    assert n == cfg.num_params()
    assert abs(n - published) / published < 0.005, (name, n)
